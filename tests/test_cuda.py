"""CUDA only (skipped elsewhere; run by benchmarks/gpu.sh): every Triton kernel compiled for the GPU against its
torch reference on the same CUDA tensors, torch.compile parity of a transformed model, and bf16 autocast.

The CPU suite checks the same kernels under TRITON_INTERPRET=1 (tests/test_kernels.py); this file checks the
compiled GPU code, where bf16 rounds to nearest even (so bf16 outputs match the reference exactly, like fp32).
"""
from __future__ import annotations

import copy
import os

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
                                reason="needs a CUDA GPU and compiled (not interpreted) Triton")

BITS = (2, 4, 8)
GROUPS = (32, 64, 128)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DEV = "cuda"


def _layer(bits, group, dtype, n=37):
    from jacquant.primitives.grid import init_scale

    g = torch.Generator().manual_seed(bits * 1000 + group)
    k = 3 * group if group < 128 else 2 * group
    w = torch.randn(n, k, generator=g).to(dtype)
    w[0, :3] = 0
    s, z = init_scale(w.float(), bits, group, "minmax")
    return w.to(DEV), (s * 0.8).to(DEV), z.to(DEV)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("bits", BITS)
def test_fake_quant_forward_kernel(bits, group, dtype):
    from jacquant.kernels import fake_quant as fq
    from jacquant.primitives.grid import in_range_mask, quantize

    w, s, z = _layer(bits, group, dtype)
    q, codes, mask = fq.fake_quant_forward_triton(w, s, z, bits, group, return_codes=True, return_mask=True)
    assert torch.equal(q, fq.fake_quant_forward_reference(w, s, z, bits, group))
    assert torch.equal(codes, quantize(w, s, z, bits, group))
    assert torch.equal(mask, in_range_mask(w, s, z, bits, group))


@pytest.mark.parametrize("rule", ("ste", "jacquant", "stableqat"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", BITS)
def test_fake_quant_backward_kernel(bits, dtype, rule):
    from jacquant.kernels import fake_quant as fq

    w, s, z = _layer(bits, 64, dtype)
    grad_q = torch.randn(w.shape, device=DEV).to(dtype)
    jac = torch.rand(s.shape, device=DEV) + 0.5
    gw, gs = fq.fake_quant_backward_triton(grad_q, w, s, z, jac, bits, 64, rule, 0.21)
    rw, rs = fq.fake_quant_backward_reference(grad_q, w, s, z, jac, bits, 64, rule, 0.21)
    if rule == "stableqat":  # cos on the GPU vs torch's: a few ulp in the slope
        torch.testing.assert_close(gw, rw, rtol=2 ** -6 if dtype == torch.bfloat16 else 5e-3, atol=1e-5)
    else:
        assert torch.equal(gw, rw)
    torch.testing.assert_close(gs, rs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bits", BITS)
def test_estimator_kernels(bits):
    from jacquant.primitives import estimators
    from jacquant.kernels import estimators as est

    w, s, z = _layer(bits, 64, torch.float32)
    for h in (0.3, 1.0, 2.5):
        torch.testing.assert_close(est.dither_triton(w, s, z, bits, 64, h), estimators.dither(w, s, z, bits, 64, h),
                                   rtol=1e-5, atol=1e-6)
    delta = torch.rand(w.shape, device=DEV) * s.repeat_interleave(64, 1) * 0.7 + 1e-3
    torch.testing.assert_close(est.probe_from_deltas_triton(w, s, z, bits, 64, delta),
                               estimators.probe_from_deltas(w, s, z, bits, 64, delta), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", (2, 4, 8))
def test_packed_linear_kernel(bits, dtype):
    from jacquant.kernels import packed_matmul as pm
    from jacquant.primitives.packing import pack_codes
    from jacquant.primitives.grid import init_scale, quantize

    w = torch.randn(45, 192)
    s, z = init_scale(w, bits, 64, "minmax")
    packed = pack_codes(quantize(w, s, z, bits, 64), bits, 64).to(DEV)
    s, z, bias = s.to(DEV), z.to(DEV), torch.randn(45, device=DEV)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-2, atol=2e-2)
    for m in (1, 5, 33, 130):
        x = torch.randn(m, 192, device=DEV).to(dtype)
        torch.testing.assert_close(pm.packed_linear_triton(x, packed, s, z, bias, bits, 64),
                                   pm.packed_linear_reference(x, packed, s, z, bias, bits, 64), **tol)


def _tiny():
    import jacquant
    from jacquant.testing.tiny_gpt import GPTConfig, TinyGPT

    torch.manual_seed(0)
    model = jacquant.transform(TinyGPT(GPTConfig(vocab_size=64, dim=64, n_layer=2)), bits=2, group=32).to(DEV)
    with torch.no_grad():
        for s in jacquant.sites(model):
            s.quantizer.jac.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("regional", (False, True))
def test_compile_matches_eager_on_cuda(regional):
    import jacquant
    from conftest import assert_step_matches_eager

    torch._dynamo.reset()
    eager = _tiny()
    other = copy.deepcopy(eager)
    run = jacquant.compile_blocks(other) if regional else torch.compile(other, fullgraph=True)
    assert_step_matches_eager(eager, other, run, torch.randint(0, 64, (2, 16), device=DEV),
                              loss_tol=(1e-5, 1e-5), grad_tol=(1e-4, 1e-5))


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_autocast_on_cuda_quantizes_the_fp32_weight(dtype):
    import jacquant
    from jacquant.primitives.grid import quantize
    from jacquant.testing.tiny_gpt import lm_loss

    model = _tiny()
    idx = torch.randint(0, 64, (2, 16), device=DEV)
    with torch.autocast("cuda", dtype=dtype):
        logits = model(idx)
    assert logits.dtype == dtype
    lm_loss(logits.float(), idx).backward()
    for s in jacquant.sites(model):
        assert s.weight.grad.dtype == torch.float32 and torch.isfinite(s.weight.grad).all(), s.name
        q = s.quantizer
        k = q.as_nk(s.weight).shape[1]
        with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
            qt = q(torch.eye(k, device=DEV), s.weight)  # I · Q(W)^T in dtype
        w = s.weight.detach()
        assert torch.equal(quantize(qt.t().float(), q.scale, q.zero_point, q.bits, q.group), q.codes(w)), s.name
