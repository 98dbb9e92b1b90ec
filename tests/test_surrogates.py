import math

import pytest
import torch

from jacquant.primitives.grid import init_mse, qmax
from jacquant.primitives.surrogates import lsq_scale_grad, stableqat_factor, weight_grad


def lsq_autograd_reference(w, s, z, bits, group, grad_q):
    """Clipped STE + LSQ built from autograd primitives (independent of surrogates.py)."""
    n, k = w.shape
    w = w.clone().requires_grad_()
    s = s.clone().requires_grad_()
    gamma = 1.0 / math.sqrt(group * qmax(bits))
    s_scaled = s * gamma + (s - s * gamma).detach()  # LSQ's gradient scale
    v = w.reshape(n, -1, group) / s_scaled.unsqueeze(-1) + z.float().unsqueeze(-1)
    vc = v.clamp(0, qmax(bits))
    c = vc + (vc.round() - vc).detach()  # round with a straight-through gradient
    q = (s_scaled.unsqueeze(-1) * (c - z.float().unsqueeze(-1))).reshape(n, k)
    q.backward(grad_q)
    return w.grad, s.grad


@pytest.mark.parametrize("bits", [2, 4])
def test_ste_and_lsq_match_an_autograd_reference(bits):
    w = torch.randn(8, 128)
    s, z = init_mse(w, bits, 64)
    s = s * 0.8  # push some weights out of range so the clip matters
    gq = torch.randn(8, 128)
    gw_ref, gs_ref = lsq_autograd_reference(w, s, z, bits, 64, gq)
    gw = weight_grad(gq, w, s, z, torch.ones_like(s), bits, 64, "ste", 0.0)
    torch.testing.assert_close(gw, gw_ref)
    torch.testing.assert_close(lsq_scale_grad(gq, w, s, z, bits, 64), gs_ref, rtol=1e-5, atol=1e-5)
    assert 0 < int((gw == 0).sum()) < gw.numel()  # some clipped, some passed


def test_jacquant_with_b_one_equals_ste_bit_for_bit():
    w = torch.randn(16, 256)
    s, z = init_mse(w, 2, 64)
    gq = torch.randn(16, 256)
    ste = weight_grad(gq, w, s, z, torch.ones_like(s), 2, 64, "ste", 0.0)
    jq = weight_grad(gq, w, s, z, torch.ones_like(s), 2, 64, "jacquant", 0.0)
    assert torch.equal(ste, jq)


def test_jacquant_scales_each_group_by_b():
    w = torch.randn(4, 128)
    s, z = init_mse(w, 2, 64)
    gq = torch.randn(4, 128)
    B = torch.rand(4, 2) + 0.5
    ste = weight_grad(gq, w, s, z, torch.ones_like(s), 2, 64, "ste", 0.0)
    jq = weight_grad(gq, w, s, z, B, 2, 64, "jacquant", 0.0)
    torch.testing.assert_close(jq, ste * B.repeat_interleave(64, dim=1))


def test_stableqat_formula_at_known_points():
    A = 0.21
    S0 = math.sqrt(2) * math.pi * A
    s = torch.ones(1, 1)
    # v on the grid: cos(2·pi·n) = 1;  v at a threshold n + 1/2: cos = 0 -> g = 1;  v = n + 1/4: cos(pi/4)
    v = torch.tensor([[0.0, 1.0, -2.0, 0.5, 1.5, 0.25, 2.75]])
    g = stableqat_factor(v, s, A, group=7)
    S = S0 * torch.tensor([1, 1, 1, 0, 0, math.cos(math.pi / 4), math.cos(math.pi / 4)])
    torch.testing.assert_close(g[0], (1 - S) / (1 + S))
    assert abs(float(g[0, 0]) - (1 - S0) / (1 + S0)) < 1e-6
    # A = 0 gives STE
    torch.testing.assert_close(stableqat_factor(torch.randn(2, 8), torch.ones(2, 1), 0.0, 8), torch.ones(2, 8))


def test_stableqat_weight_grad_is_factor_times_clipped_ste():
    w = torch.randn(4, 64)
    s, z = init_mse(w, 2, 32)
    gq = torch.randn(4, 64)
    ste = weight_grad(gq, w, s, z, torch.ones_like(s), 2, 32, "ste", 0.0)
    sq = weight_grad(gq, w, s, z, torch.ones_like(s), 2, 32, "stableqat", 0.21)
    torch.testing.assert_close(sq, ste * stableqat_factor(w, s, 0.21, 32))
    assert bool((stableqat_factor(w, s, 0.21, 32) > 0).all())


def test_unknown_rule_is_refused():
    w = torch.randn(2, 32)
    s, z = init_mse(w, 2, 32)
    with pytest.raises(ValueError, match="unknown backward rule"):
        weight_grad(w, w, s, z, torch.ones_like(s), 2, 32, "sgd", 0.0)


@pytest.mark.parametrize("rule", ["ste", "jacquant", "stableqat"])
def test_backward_equals_the_two_gradients_computed_apart(rule):
    from jacquant.primitives.surrogates import backward

    w = torch.randn(8, 128)
    s, z = init_mse(w, 2, 64)
    gq, B = torch.randn(8, 128), torch.rand(8, 2) + 0.5
    gw, gs = backward(gq, w, s, z, B, 2, 64, rule, 0.21)
    assert torch.equal(gw, weight_grad(gq, w, s, z, B, 2, 64, rule, 0.21))
    assert torch.equal(gs, lsq_scale_grad(gq, w, s, z, 2, 64))
