"""Every Triton kernel against its torch reference, on CPU under TRITON_INTERPRET=1.

Triton chooses between compiling and interpreting when ``@triton.jit`` runs, i.e. when the kernel
modules are imported; the ``interpreted`` fixture therefore sets the variable and reloads them, and
restores both afterwards. Shapes are deliberately awkward (N = 37, M not a multiple of the tile).
The interpreter rounds fp32 -> bf16 by truncation (the GPU rounds to nearest even), so bf16 outputs
are compared to within two bf16 steps; fp32 and fp16 outputs of the elementwise kernels match exactly.
"""
from __future__ import annotations

import importlib
import os

import pytest
import torch

pytest.importorskip("triton")

from jacquant.primitives import estimators as lib_estimators  # noqa: E402
from jacquant.kernels import estimators as est, fake_quant as fq, packed_matmul as pm, triton_util  # noqa: E402
from jacquant.primitives.packing import pack_codes  # noqa: E402
from jacquant.primitives.grid import in_range_mask, init_scale, quantize  # noqa: E402

BITS = (2, 4, 8)
GROUPS = (32, 64, 128)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
N = 37


@pytest.fixture(scope="module", autouse=True)
def interpreted():
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    for mod in (triton_util, fq, est, pm):  # helpers first: kernels import them by name
        importlib.reload(mod)
    yield
    if old is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = old
    for mod in (triton_util, fq, est, pm):
        importlib.reload(mod)


def _layer(bits: int, group: int, dtype: torch.dtype, k: int | None = None):
    """W [N, K] in dtype with a min/max grid shrunk by 0.8 (so some weights clamp) and a zero weight."""
    k = k or (3 * group if group < 128 else 2 * group)
    w = torch.randn(N, k).to(dtype)
    w[0, :3] = 0
    scale, zero_point = init_scale(w.float(), bits, group, "minmax")
    return w, scale * 0.8, zero_point


def _close(a: torch.Tensor, b: torch.Tensor, **tol) -> None:
    if a.dtype == torch.bfloat16 and not tol:
        tol = dict(rtol=2 ** -6, atol=1e-6)  # B and the product each truncated: two bf16 steps
    if tol:
        torch.testing.assert_close(a, b, **tol)
    else:
        assert torch.equal(a, b), (a - b).abs().max()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("bits", BITS)
def test_fake_quant_forward_matches_reference(bits, group, dtype):
    w, s, z = _layer(bits, group, dtype)
    q, codes, mask = fq.fake_quant_forward_triton(w, s, z, bits, group, return_codes=True, return_mask=True)
    _close(q, fq.fake_quant_forward_reference(w, s, z, bits, group))
    assert torch.equal(codes, quantize(w, s, z, bits, group))
    assert torch.equal(mask, in_range_mask(w, s, z, bits, group))


@pytest.mark.parametrize("rule", ("ste", "jacquant", "stableqat"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("bits", BITS)
def test_fake_quant_backward_matches_reference(bits, group, dtype, rule):
    w, s, z = _layer(bits, group, dtype)
    grad_q = torch.randn(w.shape).to(dtype)
    jac = torch.rand(s.shape) + 0.5
    grad_w, grad_s = fq.fake_quant_backward_triton(grad_q, w, s, z, jac, bits, group, rule, 0.21)
    ref_w, ref_s = fq.fake_quant_backward_reference(grad_q, w, s, z, jac, bits, group, rule, 0.21)
    # StableQAT's slope (1 - S)/(1 + S) amplifies the reference's cos(pi·(v + round v)) argument error
    if rule == "stableqat":
        _close(grad_w, ref_w, rtol=2 ** -6 if dtype == torch.bfloat16 else 5e-3, atol=1e-5)
    else:
        _close(grad_w, ref_w)
    torch.testing.assert_close(grad_s, ref_s, rtol=1e-4, atol=1e-5)
    assert grad_w.dtype == w.dtype and grad_s.dtype == s.dtype


def test_jacquant_rule_with_unit_b_equals_ste():
    w, s, z = _layer(4, 64, torch.float32)
    grad_q = torch.randn(w.shape)
    ste = fq.fake_quant_backward_triton(grad_q, w, s, z, torch.ones_like(s), 4, 64, "ste", 0.0)
    jq = fq.fake_quant_backward_triton(grad_q, w, s, z, torch.ones_like(s), 4, 64, "jacquant", 0.0)
    assert torch.equal(ste[0], jq[0]) and torch.equal(ste[1], jq[1])


@pytest.mark.parametrize("k", (200, 1500))  # one group per row, G not a power of two; G > 1024 (chunked)
def test_fake_quant_per_channel_group(k):
    w, s, z = _layer(4, -1, torch.float32, k=k)
    assert torch.equal(fq.fake_quant_forward_triton(w, s, z, 4, -1)[0], fq.fake_quant_forward_reference(w, s, z, 4, -1))
    grad_q = torch.randn(w.shape)
    got = fq.fake_quant_backward_triton(grad_q, w, s, z, s, 4, -1, "ste", 0.0)
    ref = fq.fake_quant_backward_reference(grad_q, w, s, z, s, 4, -1, "ste", 0.0)
    assert torch.equal(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1], rtol=1e-4, atol=1e-5)


def test_dispatch_takes_reference_on_cpu():
    assert not triton_util.use_triton(torch.zeros(1))
    w, s, z = _layer(2, 32, torch.float32)
    assert torch.equal(fq.fake_quant_forward(w, s, z, 2, 32), fq.fake_quant_forward_reference(w, s, z, 2, 32))


def test_launchers_reject_bad_shapes():
    w, s, z = _layer(4, 32, torch.float32)
    with pytest.raises(ValueError, match="scale"):
        fq.fake_quant_forward_triton(w, s[:, :1], z, 4, 32)
    with pytest.raises(ValueError, match="rule"):
        fq.fake_quant_backward_triton(w, w, s, z, s, 4, 32, "nope", 0.0)
    with pytest.raises(TypeError, match="dtype"):
        fq.fake_quant_forward_triton(w.double(), s, z, 4, 32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("bits", BITS)
def test_dither_matches_reference(bits, group, dtype):
    w, s, z = _layer(bits, group, dtype)
    for h in (0.3, 1.0, 2.5):
        torch.testing.assert_close(est.dither_triton(w, s, z, bits, group, h),
                                   lib_estimators.dither(w, s, z, bits, group, h), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("bits", BITS)
def test_probe_from_deltas_matches_reference(bits, group, dtype):
    w, s, z = _layer(bits, group, dtype)
    delta = torch.rand(w.shape) * s.repeat_interleave(group, 1) * 0.7 + 1e-3
    torch.testing.assert_close(est.probe_from_deltas_triton(w, s, z, bits, group, delta),
                               lib_estimators.probe_from_deltas(w, s, z, bits, group, delta), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16))  # bf16 tl.dot is wrong in the interpreter
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("bits", BITS)
def test_packed_linear_matches_reference(bits, group, dtype):
    k = 3 * group if group < 128 else group
    w = torch.randn(45, k)
    s, z = init_scale(w, bits, group, "minmax")
    packed = pack_codes(quantize(w, s, z, bits, group), bits, group)
    bias = torch.randn(45)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-2, atol=2e-2)
    for m in (1, 5, 33, 130):  # decode, middle and prefill tiles, none a multiple of its BLOCK_M
        x = torch.randn(m, k).to(dtype)
        y = pm.packed_linear_triton(x, packed, s, z, bias, bits, group)
        torch.testing.assert_close(y, pm.packed_linear_reference(x, packed, s, z, bias, bits, group), **tol)
    x3 = torch.randn(2, 3, k).to(dtype)  # leading batch dims, no bias
    torch.testing.assert_close(pm.packed_linear_triton(x3, packed, s, z, None, bits, group),
                               pm.packed_linear_reference(x3, packed, s, z, None, bits, group), **tol)
