"""Closed-form Dither and Probe-from-deltas estimators of B_g, reduced per group in one pass.

In v-units v = w/s + z the decision thresholds are τ_k = k + 1/2, k = 0 .. 2^b - 2 (method.md):

    Dither   B̂_g = mean_{i in g} (1/h)·#{k : |τ_k - v_i| <= h/2}
             (count of integers k in [v - h/2 - 1/2, v + h/2 - 1/2] ∩ [0, 2^b - 2]: ceil/floor)
    Probe    B̂_g = mean_{i in g} [Q(w_i + δ_i) - Q(w_i - δ_i)] / (2δ_i)       (δ in weight units)

Each kernel owns whole groups (rows of the [N·K/G, G] view of W), like the fake-quant kernels.
The torch references here are minimal and independent; :mod:`jacquant.estimators` holds the
library's own (the tests compare against both when it exists).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..quantizer import SCALE_FLOOR, fake_quantize, grouped, qmax, scaled
from .fake_quant import _blocks, _group_rows
from .triton_util import check_float, check_triton, round_half_even, tl, triton, use_triton


# ----------------------------------------------------------------------------- torch references
def dither_reference(w: Tensor, scale: Tensor, zero_point: Tensor, bits: int, group: int, h: float) -> Tensor:
    """B̂_g = mean_i (1/h)·#{τ_k within h/2 of v_i}, counted threshold by threshold. [N, K/G] fp32."""
    v = scaled(w, scale, zero_point, group).to(torch.float32)  # [N, K/G, G]
    tau = torch.arange(qmax(bits), dtype=torch.float32, device=w.device) + 0.5  # [2^b - 1]
    count = ((tau - v.unsqueeze(-1)).abs() <= h / 2).sum(-1)  # [N, K/G, G]
    return count.to(torch.float32).div(h).mean(-1)


def probe_from_deltas_reference(
    w: Tensor, scale: Tensor, zero_point: Tensor, bits: int, group: int, delta: Tensor
) -> Tensor:
    """B̂_g = mean_i [Q(w_i + δ_i) - Q(w_i - δ_i)]/(2δ_i), computed in fp32. [N, K/G] fp32."""
    wf, d = w.to(torch.float32), delta.to(torch.float32)
    slope = (fake_quantize(wf + d, scale, zero_point, bits, group)
             - fake_quantize(wf - d, scale, zero_point, bits, group)) / (2 * d)
    return grouped(slope, group).mean(-1)


# ----------------------------------------------------------------------------- dispatch
def dither(w: Tensor, scale: Tensor, zero_point: Tensor, bits: int, group: int, h: float) -> Tensor:
    """Closed-form Dither B̂ [N, K/G]: Triton on CUDA, the reference elsewhere."""
    if use_triton(w, scale, zero_point):
        return dither_triton(w, scale, zero_point, bits, group, h)
    return dither_reference(w, scale, zero_point, bits, group, h)


def probe_from_deltas(w: Tensor, scale: Tensor, zero_point: Tensor, bits: int, group: int, delta: Tensor) -> Tensor:
    """Probe B̂ [N, K/G] from given deltas [N, K]: Triton on CUDA, the reference elsewhere."""
    if use_triton(w, scale, zero_point, delta):
        return probe_from_deltas_triton(w, scale, zero_point, bits, group, delta)
    return probe_from_deltas_reference(w, scale, zero_point, bits, group, delta)


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _dither_kernel(
    w_ptr, s_ptr, z_ptr, out_ptr,  # w: [R, G]; s, z, out: [R]
    R, G, half_h, inv_hg,
    QMAX: tl.constexpr, FLOOR: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    s = tl.maximum(tl.load(s_ptr + rows, mask=row_ok, other=1.0).to(tl.float32), FLOOR)[:, None]
    z = tl.load(z_ptr + rows, mask=row_ok, other=0).to(tl.float32)[:, None]
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for g0 in range(0, G, BLOCK_G):
        cols = g0 + tl.arange(0, BLOCK_G)
        ok = row_ok[:, None] & (cols < G)[None, :]
        offs = rows.to(tl.int64)[:, None] * G + cols[None, :]
        w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        v = tl.div_rn(w, s) + z
        lo = tl.maximum(tl.ceil(v - half_h - 0.5), 0.0)
        hi = tl.minimum(tl.floor(v + half_h - 0.5), QMAX - 1.0)
        count = tl.maximum(hi - lo + 1.0, 0.0)
        acc += tl.sum(tl.where(ok, count, 0.0), axis=1)
    tl.store(out_ptr + rows, acc * inv_hg, mask=row_ok)


@triton.jit
def _fq(w, s, z, QMAX: tl.constexpr):
    """Q(w) in fp32 for a tile, s and z broadcast per row."""
    c = tl.minimum(tl.maximum(round_half_even(tl.div_rn(w, s) + z), 0.0), QMAX)
    return s * (c - z)


@triton.jit
def _probe_kernel(
    w_ptr, d_ptr, s_ptr, z_ptr, out_ptr,  # w, d: [R, G]; s, z, out: [R]
    R, G, inv_g,
    QMAX: tl.constexpr, FLOOR: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    s = tl.maximum(tl.load(s_ptr + rows, mask=row_ok, other=1.0).to(tl.float32), FLOOR)[:, None]
    z = tl.load(z_ptr + rows, mask=row_ok, other=0).to(tl.float32)[:, None]
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for g0 in range(0, G, BLOCK_G):
        cols = g0 + tl.arange(0, BLOCK_G)
        ok = row_ok[:, None] & (cols < G)[None, :]
        offs = rows.to(tl.int64)[:, None] * G + cols[None, :]
        w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        d = tl.load(d_ptr + offs, mask=ok, other=1.0).to(tl.float32)
        slope = tl.div_rn(_fq(w + d, s, z, QMAX) - _fq(w - d, s, z, QMAX), 2.0 * d)
        acc += tl.sum(tl.where(ok, slope, 0.0), axis=1)
    tl.store(out_ptr + rows, acc * inv_g, mask=row_ok)


# ----------------------------------------------------------------------------- launchers
def dither_triton(w: Tensor, scale: Tensor, zero_point: Tensor, bits: int, group: int, h: float) -> Tensor:
    """Launcher for the closed-form Dither estimator; B̂ [N, K/G] fp32."""
    check_triton("dither_triton")
    check_float("w", w)
    if h <= 0:
        raise ValueError(f"dither width h={h} must be positive")
    n, g, r = _group_rows(w, scale, zero_point, group)
    w, scale, zero_point = w.contiguous(), scale.contiguous(), zero_point.contiguous()
    out = torch.empty(scale.shape, dtype=torch.float32, device=w.device)
    block_r, block_g = _blocks(r, g)
    _dither_kernel[(triton.cdiv(r, block_r),)](
        w, scale, zero_point, out, r, g, h / 2, 1.0 / (h * g),
        QMAX=qmax(bits), FLOOR=SCALE_FLOOR, BLOCK_R=block_r, BLOCK_G=block_g,
    )
    return out


def probe_from_deltas_triton(
    w: Tensor, scale: Tensor, zero_point: Tensor, bits: int, group: int, delta: Tensor
) -> Tensor:
    """Launcher for the Probe estimator from given deltas [N, K] (> 0, weight units); B̂ [N, K/G] fp32."""
    check_triton("probe_from_deltas_triton")
    check_float("w", w)
    check_float("delta", delta)
    if delta.shape != w.shape:
        raise ValueError(f"delta {tuple(delta.shape)} must have W's shape {tuple(w.shape)}")
    n, g, r = _group_rows(w, scale, zero_point, group)
    w, delta, scale, zero_point = (t.contiguous() for t in (w, delta, scale, zero_point))
    out = torch.empty(scale.shape, dtype=torch.float32, device=w.device)
    block_r, block_g = _blocks(r, g)
    _probe_kernel[(triton.cdiv(r, block_r),)](
        w, delta, scale, zero_point, out, r, g, 1.0 / g,
        QMAX=qmax(bits), FLOOR=SCALE_FLOOR, BLOCK_R=block_r, BLOCK_G=block_g,
    )
    return out
