"""The in-place CPU path (jacquant.kernels.fake_quant_torch) against the pure references, bit for bit."""
import itertools

import pytest
import torch

from jacquant.kernels import fake_quant_torch as ft
from jacquant.primitives.grid import fake_quantize, init_minmax
from jacquant.primitives.surrogates import lsq_scale_grad, weight_grad

CASES = list(itertools.product((2, 3, 4, 8), (32, -1), (torch.float32, torch.bfloat16, torch.float16, torch.float64)))


def _layer(bits, group, dtype):
    g = torch.Generator().manual_seed(bits * 100 + (group % 97))
    w = torch.randn(37, 192, generator=g).to(dtype)
    w[0, :3] = 0
    s, z = init_minmax(w.float(), bits, group)
    return w, s * 0.8, z, torch.rand(s.shape, generator=g) + 0.5, torch.randn(37, 192, generator=g).to(dtype)


def _bits_equal(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), (a - b).abs().max()  # also the sign of zeros


@pytest.mark.parametrize("bits,group,dtype", CASES)
def test_forward_equals_reference_bit_for_bit(bits, group, dtype):
    w, s, z, _, _ = _layer(bits, group, dtype)
    _bits_equal(ft.fake_quant_forward(w, s, z, bits, group), fake_quantize(w, s, z, bits, group))


@pytest.mark.parametrize("rule", ["ste", "jacquant", "stableqat"])
@pytest.mark.parametrize("bits,group,dtype", CASES)
def test_backward_equals_reference_bit_for_bit(bits, group, dtype, rule):
    w, s, z, B, gq = _layer(bits, group, dtype)
    gw, gs = ft.fake_quant_backward(gq, w, s, z, B, bits, group, rule, 0.21)
    _bits_equal(gw, weight_grad(gq, w, s, z, B, bits, group, rule, 0.21))
    _bits_equal(gs, lsq_scale_grad(gq, w, s, z, bits, group))


def test_inputs_are_not_modified():
    w, s, z, B, gq = _layer(2, 32, torch.float32)
    before = [t.clone() for t in (w, s, z, B, gq)]
    ft.fake_quant_forward(w, s, z, 2, 32)
    ft.fake_quant_backward(gq, w, s, z, B, 2, 32, "jacquant", 0.0)
    for a, b in zip(before, (w, s, z, B, gq)):
        assert torch.equal(a, b)


def test_unknown_rule_is_refused():
    w, s, z, B, gq = _layer(2, 32, torch.float32)
    with pytest.raises(ValueError, match="unknown backward rule"):
        ft.fake_quant_backward(gq, w, s, z, B, 2, 32, "lsq", 0.0)


def test_fused_cpu_kernels_equal_the_reference():
    """The eager fused path (the torch path compiled alone): Q and dL/dW bit for bit, dL/ds to a few ulp."""
    from jacquant.kernels import fused_cpu

    w, s, z, B, gq = _layer(2, 32, torch.float32)
    assert fused_cpu.usable(w, s, z)
    _bits_equal(fused_cpu.fake_quant_forward(w, s, z, 2, 32), fake_quantize(w, s, z, 2, 32))
    gw, gs = fused_cpu.fake_quant_backward(gq, w, s, z, B, 2, 32, "jacquant", 0.0)
    _bits_equal(gw, weight_grad(gq, w, s, z, B, 2, 32, "jacquant", 0.0))
    ref = lsq_scale_grad(gq, w, s, z, 2, 32)
    torch.testing.assert_close(gs, ref, rtol=0, atol=1e-6 * ref.abs().max().item())
    assert not fused_cpu._state["failed"]


def test_fused_cpu_path_is_not_used_while_tracing():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from jacquant.kernels import fused_cpu

    w = torch.randn(4, 32)
    with FakeTensorMode():
        assert not fused_cpu.usable(torch.empty(4, 32))
    assert not fused_cpu.usable(w.to("meta"))
    assert fused_cpu.usable(w, None) and fused_cpu.usable(torch.nn.Parameter(w))  # model weights are Parameters


@pytest.mark.parametrize("method", ["ste", "jacquant", "stableqat"])
def test_eager_cpu_step_with_the_fused_kernels_equals_the_plain_torch_path(monkeypatch, method):
    """A two-layer model: loss, dL/dx, dL/dW and dL/ds with the fused kernels equal the unfused torch
    path bit for bit (dL/ds to a few ulp: the fused group sum adds in another order; under StableQAT the
    first layer's gradients too, through the last bit of its factor's cos)."""
    import jacquant

    def run():
        torch.manual_seed(0)
        model = jacquant.transform(torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(),
                                                       torch.nn.Linear(96, 64)), bits=2, group=32, method=method)
        x = torch.randn(5, 64, requires_grad=True)
        loss = model(x).square().sum()
        loss.backward()
        return loss, x.grad, {n: p.grad for n, p in model.named_parameters()}

    loss, gx, grads = run()
    monkeypatch.setenv("JACQUANT_FUSED_CPU", "0")
    loss0, gx0, grads0 = run()
    _bits_equal(loss.reshape(1), loss0.reshape(1))
    _bits_equal(gx, gx0)
    for name, g in grads.items():
        # dL/ds: the group sum; StableQAT's dL/dW: its cos, which inductor vectorises (an ulp from libm's)
        if name.endswith("scale") or method == "stableqat":
            torch.testing.assert_close(g, grads0[name], rtol=1e-5, atol=1e-6 * grads0[name].abs().max().item())
        else:
            _bits_equal(g, grads0[name])
