
import numpy as np
import pytest
import torch
import torch.nn as nn

import jacquant
from jacquant.primitives.estimators import dither, probe, probe_from_deltas, probe_mean, threshold_count
from jacquant.qat.data_estimators import data_probe
from jacquant.primitives.grid import SCALE_FLOOR, in_range_mask, init_minmax, qmax


def _weights(n=8, k=64, group=32, bits=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    s, z = init_minmax(w, bits, group)
    return w, s * 0.8, z  # a tighter grid so some weights clamp


def _count_reference(v: np.ndarray, bits: int, h: float) -> np.ndarray:
    tau = np.arange(qmax(bits)) + 0.5
    return ((v[..., None] - h / 2 < tau) & (tau <= v[..., None] + h / 2)).sum(-1).astype(np.float64)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("h", [0.3, 1.0, 2.5, 7.0])
def test_dither_matches_threshold_enumeration(bits, h):
    w, s, z = _weights(bits=bits)
    v = (w.reshape(8, 2, 32).double() / s.double().unsqueeze(-1) + z.double().unsqueeze(-1)).numpy()
    ref = (_count_reference(v, bits, h) / h).mean(-1)
    np.testing.assert_allclose(dither(w, s, z, bits, 32, h).numpy(), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_dither_h1_equals_clipped_ste_mask_mean(bits):
    w, s, z = _weights(bits=bits)
    w[0, :4] = 0.0  # v = z exactly, on a grid point
    w[1, :2] = -z[1, 0] * s[1, 0]  # v = 0 exactly, the bottom edge of the mask
    mask_mean = in_range_mask(w, s, z, bits, 32).float().reshape(8, 2, 32).mean(-1)
    assert torch.equal(dither(w, s, z, bits, 32, 1.0), mask_mean)


def test_probe_with_constant_delta_is_dither_of_width_2delta():
    w, s, z = _weights()
    for d in (0.1, 0.4, 1.3):
        delta = (d * s).repeat_interleave(32, dim=1)
        torch.testing.assert_close(probe_from_deltas(w, s, z, 2, 32, delta), dither(w, s, z, 2, 32, 2 * d),
                                   rtol=1e-5, atol=1e-5)


def _probe_moments(v: np.ndarray, bits: int, H: float):
    """E and Var of one element's probe term X = n(h)/h, h ~ U(0, H), n(h) = #{k : 2 d_k <= h}."""
    d = np.abs(v[..., None] - (np.arange(qmax(bits)) + 0.5))  # [..., q]
    mean = np.log(np.maximum(H / (2 * d), 1.0)).sum(-1) / H
    dmax = np.maximum(d[..., :, None], d[..., None, :])  # pairs (k, l)
    second = (np.maximum(1 / (2 * dmax) - 1 / H, 0.0)).sum((-1, -2)) / H
    return mean, second - mean ** 2


def test_sampled_probe_mean_equals_dither_averaged_over_width():
    """E_δ[probe] = (1/H)∫_0^H dither(h) dh, H = 2 δ_max; tolerance 5 standard errors of the sample mean."""
    bits, group, delta_max, draws = 2, 32, 0.75, 400
    w, s, z = _weights(n=4, k=64, bits=bits)
    v = w.reshape(4, 2, 32) / s.unsqueeze(-1) + z.unsqueeze(-1)
    frac = v - v.floor()
    v = torch.where((frac - 0.5).abs() < 0.05, v + 0.1, v)  # keep weights off the thresholds (finite variance)
    w = ((v - z.unsqueeze(-1)) * s.unsqueeze(-1)).reshape(4, 64)
    vn = (w.reshape(4, 2, 32).double() / s.double().unsqueeze(-1) + z.double().unsqueeze(-1)).numpy()
    mean_i, var_i = _probe_moments(vn, bits, 2 * delta_max)
    expect = mean_i.mean(-1)
    se = np.sqrt(var_i.sum(-1) / group ** 2 / draws)
    gen = torch.Generator().manual_seed(1)
    got = torch.stack([probe(w, s, z, bits, group, delta_max, generator=gen) for _ in range(draws)]).double().mean(0)
    assert np.all(np.abs(got.numpy() - expect) < 5 * se + 1e-6), (got.numpy() - expect) / se
    # the same expectation by quadrature of the closed-form dither over h
    hs = (np.arange(4000) + 0.5) * (2 * delta_max / 4000)
    quad = np.mean([dither(w, s, z, bits, group, float(h)).double().numpy() for h in hs[::20]], axis=0)
    np.testing.assert_allclose(probe_mean(w, s, z, bits, group, delta_max).numpy(), expect, rtol=1e-5)
    np.testing.assert_allclose(quad, expect, rtol=0.05, atol=0.02)


def test_edge_cases_give_finite_b():
    bits, group = 2, 8
    s = torch.tensor([[0.5, 0.5, SCALE_FLOOR]])
    z = torch.tensor([[1, 1, 2]], dtype=torch.uint8)
    w = torch.cat([torch.full((8,), 0.25),  # v = 1.5, exactly on a threshold
                   torch.full((8,), 0.3),   # a group of identical weights
                   torch.zeros(8)]).reshape(1, 24)  # all-zero group, scale at SCALE_FLOOR
    gen = torch.Generator().manual_seed(0)
    for b in (dither(w, s, z, bits, group, 1.0), dither(w, s, z, bits, group, 0.01),
              probe(w, s, z, bits, group, 0.5, generator=gen)):
        assert torch.isfinite(b).all()
    assert dither(w, s, z, bits, group, 1.0).tolist() == [[1.0, 1.0, 1.0]]
    assert dither(w, s, z, bits, group, 0.5)[0, 0] == 2.0  # the threshold itself is within 0.25
    top = torch.full((1, 8), 1.0)  # v = 3 = 2^b - 1 exactly with s = 0.5, z = 1: the documented null-set exception
    assert dither(top, s[:, :1], z[:, :1], bits, group, 1.0).item() == 0.0
    with pytest.raises(ValueError, match="width"):
        dither(w, s, z, bits, group, 0.0)


def test_threshold_count_outside_range_is_zero():
    v = torch.tensor([-3.0, -0.6, 3.6, 9.0, 1.0])
    assert threshold_count(v, 2, 1.0).tolist() == [0.0, 0.0, 0.0, 0.0, 1.0]


def _linear_model(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, 16, bias=False))
    jacquant.transform(model, bits=4, group=16, method="jacquant", init="minmax")
    x = torch.randn(256, 32)
    y = torch.randn(256, 16)
    return model, x, y


def test_data_probe_recovers_clipped_ste_slope_on_linear_loss_and_restores_weights():
    """L = <Y, X Q(W)^T>: linear in Q, so ΔL = <dL/dq, Q(W+εr) - Q(W-εr)>; at a wide δ the slope is ≈ mask mean."""
    model, x, y = _linear_model()
    w0 = model[0].weight.detach().clone()
    loss_fn = lambda: (model(x) * y).sum() / 256
    gen = torch.Generator().manual_seed(0)
    b = data_probe(loss_fn, model, delta=4.0, n_probes=64, generator=gen)
    assert torch.equal(model[0].weight, w0)
    assert set(b) == {"0"} and b["0"].shape == (16, 2)
    assert torch.isfinite(b["0"]).all()
    # a 4-bit grid with δ = 4 steps: Q(w±δ) moves by ≈ ±δ inside the range -> slope ≈ 1 (noise from other groups)
    assert abs(b["0"].mean().item() - 1.0) < 0.25


def test_data_probe_needs_positive_args():
    model, x, y = _linear_model()
    with pytest.raises(ValueError, match="n_probes"):
        data_probe(lambda: model(x).sum(), model, 1.0, 0)
    with pytest.raises(ValueError, match="no quantized site"):
        data_probe(lambda: x.sum(), nn.Linear(2, 2), 1.0, 1)
