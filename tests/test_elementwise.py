"""Per-element rules (jacquant.research.elementwise) against closed forms and independent references."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import jacquant
from jacquant.app.qat import RECIPES, Recipe, quantize_copy, train
from jacquant.config import QuantConfig
from jacquant.research.elementwise import (ElementwiseConfig, _gauss_periodic, attach, bin_offset, cage_term, ewgs_delta,
                                  ewgs_factor, exact_scale_grad, gaussian_slope, hutchinson_trace)
from jacquant.primitives.grid import qmax, scaled
from jacquant.qat.quantizer import sites


def _model(seed=0, k=32, n=8, group=16):
    torch.manual_seed(seed)
    return jacquant.transform(nn.Sequential(nn.Linear(k, n, bias=False)), bits=2, group=group, method="ste")


def _data(seed=0, k=32, n=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(64, k, generator=g), torch.randn(64, n, generator=g)


def _quad(model, x, y):
    return 0.5 * (model(x) - y).square().sum() / len(x)


def test_ewgs_factor_closed_form():
    r = torch.tensor([0.4, 0.4, -0.3, -0.3, 0.0])
    g = torch.tensor([2.0, -1.0, 5.0, -0.1, 3.0])
    np.testing.assert_allclose(ewgs_factor(r, g, 0.5).numpy(), [1.2, 0.8, 0.85, 1.15, 1.0], rtol=1e-6)
    assert torch.equal(ewgs_factor(r, g, 0.0), torch.ones(5))


def test_bin_offset_is_distance_to_grid_point_in_scale_units():
    w = torch.tensor([[0.26, 0.09, -0.14, 0.31]])  # v = w/0.2 + 1 = 2.3, 1.45, 0.3, 2.55
    s, z = torch.tensor([[0.2]]), torch.tensor([[1]], dtype=torch.uint8)
    np.testing.assert_allclose(bin_offset(w, s, z, 4).numpy(), [[0.3, 0.45, 0.3, -0.45]], atol=1e-5)


def test_gaussian_slope_is_the_derivative_of_the_dithered_quantizer():
    """d/dv E_u[clamp(round(v + u), 0, q)], u ~ N(0, σ²): E = Σ_k P(v + u > τ_k) = Σ_k Φ((v − τ_k)/σ),
    differentiated by a central difference (the CDF form, not the density the code sums)."""
    bits, sigma = 2, 0.3
    tau = torch.arange(qmax(bits), dtype=torch.float64) + 0.5

    def smooth(v):
        return float(torch.special.ndtr((v - tau) / sigma).sum())

    v = torch.tensor([-0.4, 0.0, 0.3, 0.5, 1.1, 2.5, 3.0, 3.6])
    h = 1e-5
    ref = [(smooth(x + h) - smooth(x - h)) / (2 * h) for x in v.double()]
    np.testing.assert_allclose(gaussian_slope(v, bits, sigma).numpy(), ref, atol=1e-4)
    # the rule used in training: the same slope read from the bin offset, for interior weights
    interior = torch.tensor([1.1, 1.5, 1.9, 2.0])
    np.testing.assert_allclose(_gauss_periodic(interior - interior.round(), sigma).numpy(),
                               gaussian_slope(interior, 8, sigma).numpy(), atol=1e-5)


def test_ewgs_delta_formula_and_clip():
    g = torch.tensor([1.0, -1.0, 3.0, -3.0])
    sd = float(g.double().std())
    assert ewgs_delta(0.6, g) == pytest.approx(0.6 / (3 * sd))
    assert ewgs_delta(1e9, g) == 1.5 and ewgs_delta(-1.0, g) == 0.0 and ewgs_delta(1.0, torch.zeros(4)) == 0.0


def test_cage_term_closed_form():
    r = torch.tensor([0.5, -0.25, 0.0])
    g = torch.tensor([3.0, 4.0, 0.0])
    rms = math.sqrt(25 / 3)
    np.testing.assert_allclose(cage_term(r, g, 0.5).numpy(), [0.5 * rms, -0.25 * rms, 0.0], rtol=1e-6)


def test_hutchinson_trace_is_exact_for_a_quadratic_loss_per_probe():
    """L = ½ mean_b ‖Q(W) x_b − y_b‖²: H_q = I_N ⊗ XᵀX/B, so zᵀ H_v z = Σ_n (s_n⊙z_n)ᵀ (XᵀX/B) (s_n⊙z_n)."""
    model = _model()
    x, y = _data()
    st = list(sites(model))
    w0 = st[0].weight.detach().clone()
    got = hutchinson_trace(lambda: _quad(model, x, y), st, n_probes=1, generator=torch.Generator().manual_seed(3))
    assert torch.equal(st[0].weight, w0) and "forward" not in vars(st[0].quantizer)
    z = torch.randint(0, 2, (8, 32), generator=torch.Generator().manual_seed(3)).float() * 2 - 1
    sz = st[0].quantizer.scale.detach().repeat_interleave(16, dim=1) * z
    ref = float(((sz @ (x.t() @ x / len(x))) * sz).sum()) / z.numel()
    assert got[st[0].name] == pytest.approx(ref, rel=1e-3)


def _per_weight_scale(s):
    return s.repeat_interleave(16, 1)


def _sgd_step(model, cfg, x, y, lr=0.1):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    attach(opt, model, cfg, loss_fn=lambda: _quad(model, x, y))
    _quad(model, x, y).backward()
    opt.step()
    return opt


def _reference_grads(x, y):
    ref = _model()
    _quad(ref, x, y).backward()
    st = list(sites(ref))[0]
    q = st.quantizer
    return st.weight.detach().clone(), st.weight.grad.clone(), q.scale.detach().clone(), q.scale.grad.clone(), q


@pytest.mark.parametrize("placement", ["grad", "update"])
def test_ewgs_on_gradient_and_on_sgd_update_scale_each_element(placement):
    x, y = _data()
    w0, g, s0, gs, q = _reference_grads(x, y)
    r = bin_offset(w0, s0, q.zero_point, 16)
    model = _model()
    _sgd_step(model, ElementwiseConfig(rule="ewgs", delta=0.8, placement=placement), x, y)
    expected = w0 - 0.1 * g * (1 + 0.8 * torch.sign(g) * r)
    torch.testing.assert_close(model[0].weight.detach(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("placement", ["grad", "update"])
def test_gauss_scales_each_element_by_the_dithered_slope_at_its_position(placement):
    x, y = _data()
    w0, g, s0, gs, q = _reference_grads(x, y)
    v = w0 / _per_weight_scale(s0) + q.zero_point.to(torch.float32).repeat_interleave(16, 1)
    model = _model()
    _sgd_step(model, ElementwiseConfig(rule="gauss", sigma=0.3, placement=placement), x, y)
    # the slope of the whole dithered quantizer (clamped range included); g is 0 outside [0, 2^b - 1]
    slope = gaussian_slope(v, q.bits, 0.3)
    # the hooks use the periodic form (thresholds at ±½, ±3/2 around the grid point): it equals the full sum
    # where the two virtual thresholds beyond the range (−½ and 2^b − ½) are ≥ 1.5 = 5σ away
    interior = (v > 1.0) & (v < 2 ** q.bits - 2.0)
    assert interior.sum() > 20
    expected = w0 - 0.1 * g * slope
    torch.testing.assert_close(model[0].weight.detach()[interior], expected[interior], rtol=1e-4, atol=1e-6)


def test_fourier_hook_scales_the_gradient_like_the_stableqat_op():
    """rule "fourier" through the optimizer hook: one SGD step equals the StableQAT op's own step."""
    x, y = _data()
    torch.manual_seed(0)  # as _model(): the same weights and scales, StableQAT's rule in the op
    ref = jacquant.transform(nn.Sequential(nn.Linear(32, 8, bias=False)), bits=2, group=16, method="stableqat")
    w0 = ref[0].weight.detach().clone()
    _quad(ref, x, y).backward()
    g_stable = ref[0].weight.grad.clone()
    model = _model()
    _sgd_step(model, ElementwiseConfig(rule="fourier", amplitude=0.21), x, y)
    torch.testing.assert_close(model[0].weight.detach(), w0 - 0.1 * g_stable, rtol=1e-5, atol=1e-7)


def test_ewgs_on_the_adamw_update_uses_minus_the_update_as_the_gradient_sign():
    x, y = _data()
    w0, g, s0, gs, q = _reference_grads(x, y)
    r = bin_offset(w0, s0, q.zero_point, 16)
    ref = _model()
    opt = torch.optim.AdamW(ref.parameters(), lr=0.01, weight_decay=0.0)
    _quad(ref, x, y).backward()
    opt.step()
    delta = ref[0].weight.detach() - w0
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.0)
    attach(opt, model, ElementwiseConfig(rule="ewgs", delta=0.8, placement="update"))
    _quad(model, x, y).backward()
    opt.step()
    torch.testing.assert_close(model[0].weight.detach(), w0 + (1 - 0.8 * torch.sign(delta) * r) * delta,
                               rtol=1e-5, atol=1e-7)


def test_cage_adds_the_pull_to_the_grid():
    x, y = _data()
    w0, g, s0, gs, q = _reference_grads(x, y)
    r = bin_offset(w0, s0, q.zero_point, 16)
    model = _model()
    _sgd_step(model, ElementwiseConfig(rule="none", cage=0.5), x, y)
    torch.testing.assert_close(model[0].weight.detach(), w0 - 0.1 * (g + 2 * 0.5 * g.square().mean().sqrt() * r),
                               rtol=1e-5, atol=1e-7)


def test_code_phase_holds_codes_and_steps_the_scale_on_its_exact_gradient():
    """Reference: L(s) with q = s·(c − z) held, its gradient by central finite differences, times LSQ's γ."""
    x, y = _data()
    w0, g, s0, gs, q = _reference_grads(x, y)
    codes0 = torch.clamp(torch.round(scaled(w0, s0, q.zero_point, 16)), 0, 3)
    zc = codes0 - q.zero_point.float().unsqueeze(-1)  # [8, 2, 16]

    def loss_of_s(s):
        wq = (s.unsqueeze(-1) * zc.double()).reshape(8, 32)
        return 0.5 * (x.double() @ wq.t() - y.double()).square().sum() / len(x)

    eps = 1e-3
    fd = torch.zeros_like(s0, dtype=torch.float64)
    for i in range(s0.numel()):
        e = torch.zeros(s0.numel(), dtype=torch.float64)
        e[i] = eps
        e = e.reshape(s0.shape)
        fd.view(-1)[i] = (loss_of_s(s0.double() + e).double().item() - loss_of_s(s0.double() - e).item()) / (2 * eps)
    gamma = 1 / math.sqrt(16 * 3)
    torch.testing.assert_close(exact_scale_grad(gs, g, w0, s0, q.zero_point, 2, 16).double(), gamma * fd,
                               rtol=1e-3, atol=1e-6)
    model = _model()
    _sgd_step(model, ElementwiseConfig(rule="none", code_period=1, code_steps=1), x, y)
    mq = model[0].weight_quantizer
    torch.testing.assert_close(mq.scale.detach().double(), s0.double() - 0.1 * gamma * fd, rtol=1e-4, atol=1e-7)
    v_new = scaled(model[0].weight.detach(), mq.scale.detach(), mq.zero_point, 16)
    torch.testing.assert_close(v_new, scaled(w0, s0, q.zero_point, 16), rtol=1e-5, atol=1e-5)


def test_ewgs_with_delta_zero_trains_bit_for_bit_like_ste():
    torch.manual_seed(0)
    fp = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8))
    x, y = _data(k=32, n=8)
    batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    loss = lambda m, b: 0.5 * (m(b[0]) - b[1]).square().mean()  # noqa: E731
    out = []
    for recipe in (RECIPES["ste"], Recipe("ewgs0", elementwise=ElementwiseConfig(rule="ewgs", delta=0.0))):
        m = quantize_copy(fp, recipe, QuantConfig(bits=2, group=16))
        out.append(train(m, recipe, batches, loss, 4, 1e-2))
        out.append(torch.cat([p.detach().flatten() for p in m.parameters()]))
    assert out[0] == out[2] and torch.equal(out[1], out[3])


def test_fitted_delta_recipe_trains_and_fits_delta_from_curvature():
    torch.manual_seed(0)
    fp = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8))
    x, y = _data(k=32, n=8)
    batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    loss = lambda m, b: 0.5 * (m(b[0]) - b[1]).square().mean()  # noqa: E731
    recipe = RECIPES["jq-ewgs"]
    m = quantize_copy(fp, recipe, QuantConfig(bits=2, group=16))
    with pytest.raises(ValueError, match="calib"):
        train(m, recipe, batches, loss, 2, 1e-2)
    m = quantize_copy(fp, recipe, QuantConfig(bits=2, group=16))
    curve = train(m, recipe, batches, loss, 4, 1e-2, calib_batch=batches[0])
    assert len(curve) == 4 and all(math.isfinite(c) for c in curve)


def test_attach_refuses_non_ste_sites_and_bad_configs():
    model = jacquant.transform(nn.Sequential(nn.Linear(32, 8)), bits=2, group=16, method="jacquant")
    with pytest.raises(ValueError, match="rule"):
        attach(torch.optim.SGD(model.parameters(), lr=0.1), model, ElementwiseConfig(delta=0.5))
    with pytest.raises(ValueError, match="delta"):
        ElementwiseConfig(delta=2.5)
    with pytest.raises(ValueError, match="code_steps"):
        ElementwiseConfig(code_period=2, code_steps=3)
