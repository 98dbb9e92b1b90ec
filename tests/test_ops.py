import pytest
import torch
import torch.nn.functional as F

import jacquant  # noqa: F401  (registers the ops)
from jacquant.primitives.grid import fake_quantize, init_mse
from jacquant.primitives.surrogates import lsq_scale_grad, weight_grad


def _inputs(bits=2, group=32, bias=True):
    w = torch.randn(24, 96, requires_grad=True)
    s, z = init_mse(w, bits, group)
    s.requires_grad_()
    x = torch.randn(3, 5, 96, requires_grad=True)
    b = torch.randn(24, requires_grad=True) if bias else None
    return x, w, s, z, torch.rand_like(s) + 0.5, b


@pytest.mark.parametrize("rule", ["ste", "stableqat", "jacquant"])
@pytest.mark.parametrize("bias", [True, False])
def test_qlinear_passes_opcheck(rule, bias):
    x, w, s, z, B, b = _inputs(bias=bias)
    torch.library.opcheck(torch.ops.jacquant.qlinear.default, (x, w, s, z, B, b, 2, 32, rule, 0.21))


@pytest.mark.parametrize("rule", ["ste", "stableqat", "jacquant"])
def test_qlinear_forward_and_backward_match_reference(rule):
    x, w, s, z, B, b = _inputs()
    y = torch.ops.jacquant.qlinear(x, w, s, z, B, b, 2, 32, rule, 0.21)
    gy = torch.randn_like(y)
    y.backward(gy)
    q = fake_quantize(w.detach(), s.detach(), z, 2, 32)
    torch.testing.assert_close(y, F.linear(x, q, b))
    torch.testing.assert_close(x.grad, gy @ q)
    torch.testing.assert_close(b.grad, gy.sum((0, 1)))
    gq = gy.reshape(-1, 24).t() @ x.detach().reshape(-1, 96)
    torch.testing.assert_close(w.grad, weight_grad(gq, w.detach(), s.detach(), z, B, 2, 32, rule, 0.21))
    torch.testing.assert_close(s.grad, lsq_scale_grad(gq, w.detach(), s.detach(), z, 2, 32))


def test_qlinear_accepts_a_transposed_weight_view():
    x, w, s, z, B, b = _inputs()
    wt = w.detach().t().contiguous().requires_grad_()  # stored [K, N], as GPT-2's Conv1D
    y = torch.ops.jacquant.qlinear(x, wt.t(), s, z, B, b, 2, 32, "ste", 0.0)
    y.sum().backward()
    y_ref = torch.ops.jacquant.qlinear(x, w, s, z, B, b, 2, 32, "ste", 0.0)
    y_ref.sum().backward()
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(wt.grad, w.grad.t())


def test_qlinear_multiplies_in_the_activation_dtype_under_bf16():
    x, w, s, z, B, b = _inputs()
    y = torch.ops.jacquant.qlinear(x.detach().bfloat16(), w, s, z, B, b, 2, 32, "ste", 0.0)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert w.grad.dtype == torch.float32 and torch.isfinite(w.grad).all()
