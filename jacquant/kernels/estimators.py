"""Closed-form Dither and Probe-from-deltas estimators of B_g, reduced per group in one pass.

In v-units v = w/s + z the decision thresholds are τ_k = k + 1/2, k = 0 .. 2^b - 2 (method.md):

    Dither   B̂_g = mean_{i in g} (1/h)·#{k : v_i - h/2 < τ_k <= v_i + h/2}
             k from floor(v - (h+1)/2) + 1 to floor(v + (h-1)/2), cut to [0, 2^b - 2]
    Probe    B̂_g = mean_{i in g} [Q(w_i + δ_i) - Q(w_i - δ_i)] / (2δ_i)       (δ in weight units)

The half-open window is :func:`jacquant.primitives.estimators.threshold_count`'s (a weight on a grid point
sees one threshold at h = 1). Each kernel owns whole groups (rows of the [N·K/G, G] view of W),
like the fake-quant kernels; the torch references are :mod:`jacquant.primitives.estimators`' pure functions.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from jacquant.kernels.fake_quant import _blocks, _group_rows
from jacquant.kernels.triton_util import (
    check_float,
    check_triton,
    group_rows,
    group_tile,
    launch,
    round_half_even,
    row_sum,
    tl,
    triton,
    use_triton,
)
from jacquant.primitives import estimators
from jacquant.primitives.grid import SCALE_FLOOR, qmax


# ----------------------------------------------------------------------------- torch references
def dither_reference(w: Tensor, scale: Tensor, zero_point: Tensor, bits: int, group: int, h: float) -> Tensor:
    """:func:`jacquant.primitives.estimators.dither`: B̂ [N, K/G] fp32."""
    return estimators.dither(w, scale, zero_point, bits, group, h)


def probe_from_deltas_reference(
    w: Tensor, scale: Tensor, zero_point: Tensor, bits: int, group: int, delta: Tensor
) -> Tensor:
    """:func:`jacquant.primitives.estimators.probe_from_deltas`: B̂ [N, K/G] fp32."""
    return estimators.probe_from_deltas(w, scale, zero_point, bits, group, delta)


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
    R, G, lo_off, hi_off, inv_hg,  # lo_off = (h+1)/2, hi_off = (h-1)/2
    QMAX: tl.constexpr, FLOOR: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr,
):
    rows, row_ok, s, z = group_rows(s_ptr, z_ptr, R, FLOOR, BLOCK_R)
    acc = tl.full([BLOCK_R], 0.0, tl.float32)
    for g0 in range(0, G, BLOCK_G):
        ok, offs = group_tile(rows, row_ok, g0, G, BLOCK_G)
        w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        v = tl.div_rn(w, s) + z
        lo = tl.maximum(tl.floor(v - lo_off) + 1.0, 0.0)
        hi = tl.minimum(tl.floor(v + hi_off), QMAX - 1.0)
        count = tl.maximum(hi - lo + 1.0, 0.0)
        acc += row_sum(tl.where(ok, count, 0.0))
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
    rows, row_ok, s, z = group_rows(s_ptr, z_ptr, R, FLOOR, BLOCK_R)
    acc = tl.full([BLOCK_R], 0.0, tl.float32)
    for g0 in range(0, G, BLOCK_G):
        ok, offs = group_tile(rows, row_ok, g0, G, BLOCK_G)
        w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        d = tl.load(d_ptr + offs, mask=ok, other=1.0).to(tl.float32)
        slope = tl.div_rn(_fq(w + d, s, z, QMAX) - _fq(w - d, s, z, QMAX), 2.0 * d)
        acc += row_sum(tl.where(ok, slope, 0.0))
    tl.store(out_ptr + rows, acc * inv_g, mask=row_ok)


# ----------------------------------------------------------------------------- launchers
def dither_triton(w: Tensor, scale: Tensor, zero_point: Tensor, bits: int, group: int, h: float) -> Tensor:
    """Launcher for the closed-form Dither estimator; B̂ [N, K/G] fp32."""
    check_triton("dither_triton")
    check_float("w", w)
    if not (math.isfinite(h) and h > 0):
        raise ValueError(f"dither width h={h!r} must be a positive finite width in scale units (e.g. 1.0)")
    n, g, r = _group_rows(w, scale, zero_point, group)
    w, scale, zero_point = w.contiguous(), scale.contiguous(), zero_point.contiguous()
    out = torch.empty(scale.shape, dtype=torch.float32, device=w.device)
    block_r, block_g = _blocks(r, g)
    launch(_dither_kernel)[(triton.cdiv(r, block_r),)](
        w, scale, zero_point, out, r, g, (h + 1) / 2, (h - 1) / 2, 1.0 / (h * g),
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
        raise ValueError(f"probe delta {tuple(delta.shape)} must have the weight's shape {tuple(w.shape)}")
    n, g, r = _group_rows(w, scale, zero_point, group)
    w, delta, scale, zero_point = (t.contiguous() for t in (w, delta, scale, zero_point))
    out = torch.empty(scale.shape, dtype=torch.float32, device=w.device)
    block_r, block_g = _blocks(r, g)
    launch(_probe_kernel)[(triton.cdiv(r, block_r),)](
        w, delta, scale, zero_point, out, r, g, 1.0 / g,
        QMAX=qmax(bits), FLOOR=SCALE_FLOOR, BLOCK_R=block_r, BLOCK_G=block_g,
    )
    return out
