"""The learned-shape family (jacquant.research.shape) and its rule (jacquant.research.learned_shape) against
independent references: Dither's closed-form coefficients against the numerical Fourier series of the periodic
Gaussian slope, StableQAT's amplitude recovered from its projection, the hook's gradient against the series
written out at r."""
import math

import pytest
import torch

import jacquant
from jacquant.research import shape
from jacquant.research.learned_shape import LearnedShape, attach
from jacquant.research.shape import bin_offset
from jacquant.qat.quantizer import sites

R = torch.linspace(-0.5, 0.5, 2001)


def _series(values, n):
    """Fourier cosine coefficients of values(r) on [-1/2, 1/2], by the trapezoid rule (mean-1 normalised)."""
    f = values / torch.trapezoid(values, R)
    k = torch.arange(1, n + 1, dtype=torch.float32)
    return torch.stack([2 * torch.trapezoid(f * torch.cos(2 * math.pi * kk * R), R) for kk in k])


def _gauss_periodic(r, sigma):
    """The Gaussian-dithered quantizer's slope at bin offset r: Gaussians of width σ on the thresholds ±1/2, ±3/2."""
    k = torch.tensor([-1.5, -0.5, 0.5, 1.5])
    d = (k - r.unsqueeze(-1)) / sigma
    return torch.exp(-0.5 * d * d).sum(-1) / (sigma * math.sqrt(2 * math.pi))


@pytest.mark.parametrize("sigma", [0.12, 0.2, 0.35])
def test_dither_shape_is_the_fourier_series_of_the_gaussian_dithered_slope(sigma):
    want = _series(_gauss_periodic(R, sigma), 4)
    torch.testing.assert_close(shape.dither_shape(torch.tensor(sigma), 4), want, rtol=1e-3, atol=2e-4)


def test_fourier_shape_is_stableqats_factor_over_its_mean_and_zero_is_ste():
    torch.testing.assert_close(shape.fourier_shape(0.0, 3), torch.zeros(3), rtol=0, atol=1e-6)
    b = shape.shape_factor(R, shape.fourier_shape(0.1, 8))  # 8 terms: close to f_A / mean f_A (f_A has a kink at ±1/2)
    f = shape.fourier_factor(R, 0.1)
    err = (b - f / torch.trapezoid(f, R)).abs()
    assert float(err.mean()) < 0.01 and float(err.max()) < 0.07


@pytest.mark.parametrize("n", [1, 2, 3, 10])
def test_shape_factor_is_the_cosine_sum_per_group(n):
    """Clenshaw's recurrence against the sum of cosines written out, for one shape and for one shape per group."""
    g = torch.Generator().manual_seed(n)
    r = torch.rand(5, 3, 64, generator=g) - 0.5
    a = torch.randn(5, 3, n, generator=g) * 0.3
    k = torch.arange(1, n + 1, dtype=torch.float64)
    want = 1 + (a.double().unsqueeze(-2) * torch.cos(2 * math.pi * k * r.double().unsqueeze(-1))).sum(-1)
    torch.testing.assert_close(shape.shape_factor(r, a.unsqueeze(-2)).double(), want, rtol=0, atol=1e-5)
    want1 = 1 + (a[0, 0].double() * torch.cos(2 * math.pi * k * r.double().unsqueeze(-1))).sum(-1)
    torch.testing.assert_close(shape.shape_factor(r, a[0, 0]).double(), want1, rtol=0, atol=1e-5)
    # every group's shape at a few points (more shapes than points: the result takes the broadcast shape)
    r2 = torch.tensor([0.0, 0.25, 0.5])
    want2 = 1 + (a.double().unsqueeze(-2) * torch.cos(2 * math.pi * k * r2.double().unsqueeze(-1))).sum(-1)
    torch.testing.assert_close(shape.shape_factor(r2, a.unsqueeze(-2)).double(), want2, rtol=0, atol=1e-5)


@pytest.mark.parametrize("per", ["layer", "group"])
def test_scale_by_shape_multiplies_by_the_series_at_the_bin_offset_eager_and_fused(per):
    """grad · B(r) with r = v − round v, v = w/s + z, written out in float64, against the in-place step on v itself
    (B is 1-periodic) and its fused CPU kernel; the gradient a transposed view, as a transposed site's is."""
    from jacquant.kernels import fused_cpu

    g = torch.Generator().manual_seed(3)
    n, k_, grp = 24, 128, 32
    w = torch.randn(n, k_, generator=g) * 0.02
    s = w.reshape(n, -1, grp).abs().amax(-1) / 1.5
    z = torch.randint(0, 4, (n, k_ // grp), generator=g).to(torch.uint8)
    a = torch.randn(3, generator=g) * 0.3 if per == "layer" else torch.randn(n, k_ // grp, 3, generator=g) * 0.3
    grad = torch.randn(k_, n, generator=g).t()  # [N, K], not contiguous
    v = w.double().reshape(n, -1, grp) / s.double().unsqueeze(-1) + z.double().unsqueeze(-1)
    r = (v - v.round()).unsqueeze(-1)
    ak = a.double() if per == "layer" else a.double().unsqueeze(-2)
    want = grad.double() * (1 + (ak * torch.cos(2 * math.pi * torch.arange(1, 4) * r)).sum(-1)).reshape(n, k_)
    eager, fused = grad.clone().t().contiguous().t(), grad.clone().t().contiguous().t()
    assert shape.scale_by_shape_(eager, w, s, z, grp, a) is eager
    fused_cpu.run("scale_by_shape", shape.scale_by_shape_, fused, w, s, z, grp, a)
    torch.testing.assert_close(eager.double(), want, rtol=0, atol=1e-5)
    torch.testing.assert_close(fused.double(), want, rtol=0, atol=1e-5)
    assert not fused_cpu._state["failed"]


def test_positive_shrinks_only_shapes_that_dip_below_the_floor():
    sharp = shape.dither_shape(torch.tensor(0.04), 3)
    assert float(shape.shape_factor(R, sharp).min()) < 0
    fixed = shape.positive(sharp, b_min=0.05)
    assert float(shape.shape_factor(R, fixed).min()) == pytest.approx(0.05, abs=1e-3)
    mild = shape.fourier_shape(0.1, 3)
    assert torch.equal(shape.positive(mild), mild)


def test_bin_offset_is_distance_to_grid_point_in_scale_units():
    w = torch.tensor([[0.3, 1.45, 2.3, 3.55]])
    s, z = torch.ones(1, 1), torch.zeros(1, 1)
    torch.testing.assert_close(bin_offset(w, s, z, 4), torch.tensor([[0.3, 0.45, 0.3, -0.45]]), rtol=0, atol=1e-5)


def _hooked_steps(cfg, n):
    """A Linear(64, 32) transformed W2 g32 (rule "ste") with ``cfg``'s hook on SGD(lr = 0), loss Σ y² on one batch.

    Per step t yields (t, site, hooks, g0, r) just after ``opt.step()``: g0 the weight's gradient before the hook,
    r the bin offsets it saw, ``site.weight.grad`` the hooked gradient. The gradient is zeroed on resuming.
    """
    torch.manual_seed(0)
    model = jacquant.transform(torch.nn.Sequential(torch.nn.Linear(64, 32)), bits=2, group=32, method="ste")
    st = next(iter(sites(model)))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    hooks = attach(opt, model, cfg)
    x = torch.randn(8, 64)
    for t in range(n):
        model(x).square().sum().backward()
        q = st.quantizer
        g0 = st.weight.grad.clone()
        r = bin_offset(st.weight, q.scale, q.zero_point, q.group)
        opt.step()
        yield t, st, hooks, g0, r
        opt.zero_grad()


def test_hook_multiplies_the_gradient_by_the_shape_and_dither_refits_from_travel():
    cfg = LearnedShape(refresh_every=2, n_basis=3)
    # refreshes at t = 0 (StableQAT's shape, no history yet) and t = 2 (σ = the travel since t = 0)
    for t, st, hooks, g0, r in _hooked_steps(cfg, 3):
        if t == 0:
            torch.testing.assert_close(st.weight.grad, g0 * shape.shape_factor(r, shape.fourier_shape(0.21, 3)))
        if t == 1:
            with torch.no_grad():  # travel 0.1 bin before the refresh
                st.weight.add_(0.1 * st.quantizer.scale.repeat_interleave(32, dim=1))
    want = shape.positive(shape.dither_shape(torch.tensor(0.1), 3))
    torch.testing.assert_close(hooks.shapes[st.name], want, rtol=1e-4, atol=1e-5)
    assert len(hooks.seconds) == 3 and all(s > 0 for s in hooks.seconds)  # the rule's own time, one entry per step


def test_bad_shape_settings_are_clear_errors():
    with pytest.raises(ValueError, match="refresh_every"):
        LearnedShape(refresh_every=0)
    model = jacquant.transform(torch.nn.Sequential(torch.nn.Linear(64, 32)), bits=2, group=32, method="stableqat")
    with pytest.raises(ValueError, match="method='ste'"):
        attach(torch.optim.SGD(model.parameters(), lr=0.0), model)


def test_hook_seconds_are_the_pre_step_hook_interval_of_each_step(monkeypatch):
    """``hooks.seconds[t]`` is end − start of the pre-step hook, read on a fake clock that advances by known amounts:
    nothing outside the hook (forward, backward, the optimizer's own update) is counted."""
    import types

    import jacquant.research.learned_shape as ls
    ticks = iter([0.0, 1.5,     # step 0: 1.5 s
                  20.0, 22.0])  # step 1: 2 s
    monkeypatch.setattr(ls, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks)))
    seen = [hooks.seconds.copy() for _, _, hooks, _, _ in _hooked_steps(LearnedShape(refresh_every=100), 2)]
    assert seen == [[1.5], [1.5, 2.0]]
