"""y = x · dequant(packed W)^T + bias from MatMulNBits-packed codes: Triton kernel, reference, dispatch.

W [N, K] is stored as packed codes [N, K/G, G·b/8] (see :mod:`jacquant.primitives.packing`), scales [N, K/G]
and integer zero points [N, K/G] (uint8, unpacked); W = s · (c - z). Read as bytes, a row of the
packed codes is [K·b/8]: code k sits in byte k·b/8, bits [(k mod 8/b)·b, (k mod 8/b + 1)·b).

The kernel tiles y [M, N] by (BLOCK_M, BLOCK_N) and walks K in steps of BLOCK_K, a divisor of G,
so one K step meets one group per output column and the scale leaves the inner product:

    y[m, n] = sum_g s[n, g] · sum_{k in g} x[m, k] · (c[n, k] - z[n, g])

(c - z) is an integer below 2^8 in magnitude, exact in fp16/bf16, so the inner sum is one
``tl.dot`` of x's dtype with fp32 accumulation; codes are unpacked in registers, never in memory.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from jacquant.kernels.triton_util import (
    check_float,
    check_triton,
    launch,
    tl,
    triton,
    use_triton,
)
from jacquant.primitives.grid import dequantize, group_size
from jacquant.primitives.packing import PACKABLE_BITS, unpack_codes


def packed_linear_reference(
    x: Tensor, packed: Tensor, scale: Tensor, zero_point: Tensor, bias: Optional[Tensor], bits: int, group: int
) -> Tensor:
    """Torch reference: unpack, dequantize to x's dtype, F.linear. x [..., K] -> [..., N]."""
    w = dequantize(unpack_codes(packed, bits, group), scale, zero_point, group, dtype=x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def packed_linear(
    x: Tensor, packed: Tensor, scale: Tensor, zero_point: Tensor, bias: Optional[Tensor], bits: int, group: int
) -> Tensor:
    """Dispatch: the Triton kernel for CUDA tensors it supports, the reference elsewhere."""
    tensors = (x, packed, scale, zero_point) + (() if bias is None else (bias,))
    k = x.shape[-1]
    if use_triton(*tensors) and bits in PACKABLE_BITS and _block_k(group_size(k, group)) >= 16:
        return packed_linear_triton(x, packed, scale, zero_point, bias, bits, group)
    return packed_linear_reference(x, packed, scale, zero_point, bias, bits, group)


@triton.jit
def _packed_matmul_kernel(
    x_ptr, p_ptr, s_ptr, z_ptr, b_ptr, y_ptr,  # x [M, K]; p [N, K·b/8] bytes; s, z [N, K/G]; b [N]; y [M, N]
    M, N, K, G,
    stride_xm, stride_ym,
    BITS: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    PER: tl.constexpr = 8 // BITS  # codes per byte
    MASK: tl.constexpr = (1 << BITS) - 1
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    n64 = rn.to(tl.int64)
    groups = K // G
    row_bytes = K // PER
    shift = ((rk % PER) * BITS)[:, None]  # [BLOCK_K, 1]
    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptr + rm.to(tl.int64)[:, None] * stride_xm + (k0 + rk)[None, :],
                    mask=m_ok[:, None], other=0.0)  # [BLOCK_M, BLOCK_K]
        byte = tl.load(p_ptr + n64[None, :] * row_bytes + ((k0 + rk) // PER)[:, None],
                       mask=n_ok[None, :], other=0)  # [BLOCK_K, BLOCK_N], each byte read PER times
        c = (byte.to(tl.int32) >> shift) & MASK
        g = k0 // G
        s = tl.load(s_ptr + n64 * groups + g, mask=n_ok, other=0.0).to(tl.float32)  # [BLOCK_N]
        z = tl.load(z_ptr + n64 * groups + g, mask=n_ok, other=0).to(tl.int32)
        wq = (c - z[None, :]).to(x_ptr.dtype.element_ty)  # integers, exact
        if IEEE:
            part = tl.dot(x, wq, input_precision="ieee")
        else:
            part = tl.dot(x, wq)
        acc += part * s[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(x_ptr.dtype.element_ty).to(tl.float32)[None, :]
    tl.store(y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :],
             acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _block_k(g: int, cap: int = 128) -> int:
    """Largest power of two <= cap dividing G (a K step never straddles two groups)."""
    b = cap
    while g % b:
        b //= 2
    return b


def _config(m: int, g: int) -> dict:
    """Tile sizes: decode (M <= 16) keeps BLOCK_M at tl.dot's minimum and narrow N tiles for more
    programs; prefill (M >= 128) uses 128x128 tiles; in between, 64x64."""
    if m <= 16:
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=_block_k(g, 128), num_warps=4, num_stages=4)
    if m < 128:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=_block_k(g, 64), num_warps=4, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=_block_k(g, 64), num_warps=8, num_stages=3)


def packed_linear_triton(
    x: Tensor, packed: Tensor, scale: Tensor, zero_point: Tensor, bias: Optional[Tensor], bits: int, group: int
) -> Tensor:
    """Launcher: x [..., K] (fp16/bf16/fp32) -> [..., N] in x's dtype, W read packed (W2/W4/W8 A16)."""
    check_triton("packed_linear_triton")
    check_float("x", x)
    if bits not in PACKABLE_BITS:
        raise ValueError(f"bits={bits}: the packed matmul takes {PACKABLE_BITS}")
    n, blocks, per_block = packed.shape
    k = x.shape[-1]
    g = group_size(k, group)
    if packed.dtype != torch.uint8 or blocks * g != k or per_block * 8 != g * bits:
        raise ValueError(f"packed codes {tuple(packed.shape)} {packed.dtype} do not match x's K={k}, group {group}, "
                         f"bits {bits}: expected uint8 [N, {k // g}, {g * bits // 8}] from jacquant.primitives.packing.pack_codes")
    if scale.shape != (n, blocks) or zero_point.shape != (n, blocks):
        raise ValueError(f"scale {tuple(scale.shape)} and zero point {tuple(zero_point.shape)} must be [{n}, {blocks}]")
    cfg = _config(x.numel() // max(k, 1), g)
    if cfg["BLOCK_K"] < 16:
        raise ValueError(f"group {g} has no power-of-two divisor >= 16 for tl.dot; use the reference")
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    packed, scale, zero_point = packed.contiguous(), scale.contiguous(), zero_point.contiguous()
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))
    launch(_packed_matmul_kernel)[grid](
        x2, packed, scale, zero_point, y if bias is None else bias.contiguous(), y,
        m, n, k, g, x2.stride(0), y.stride(0),
        BITS=bits, HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32, **cfg,
    )
    return y.reshape(*x.shape[:-1], n)
