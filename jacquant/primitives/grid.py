"""The forward quantizer as pure functions of tensors.

Notation (method.md): weight W of shape [N, K] (out, in), groups of G consecutive entries along K,
b bits, per-group scale s_g > 0 and integer zero point z_g:

    v = w / s + z            codes c = clamp(round(v), 0, 2^b - 1)            Q(w) = s · (c - z)

Scales and zero points have shape [N, K/G]; every function here broadcasts them over the group.

The *scale-and-min* grid (GGUF's Q4_1 and Q2_K, :mod:`jacquant.primitives.formats`) has a float offset m per group
instead of an integer zero point:

    v = (w - m) / s          codes c = clamp(round(v), 0, 2^b - 1)            Q(w) = s · c + m

computed in fp32 in this order, so that with s and m fp16 values (and s·c exact) Q is llama.cpp's d·q + m.
"""
from __future__ import annotations

import torch
from torch import Tensor

SCALE_FLOOR = 1e-8  # a scale never goes below this (an all-zero group, or a collapsing LSQ scale)


def qmax(bits: int) -> int:
    """Largest code, 2^b - 1."""
    return (1 << bits) - 1


def group_size(in_features: int, group: int) -> int:
    """G for a layer: ``group``, or K when ``group == -1`` (per output channel)."""
    return in_features if group == -1 else group


def grouped(w: Tensor, group: int) -> Tensor:
    """View [N, K] as [N, K/G, G]."""
    n, k = w.shape
    g = group_size(k, group)
    return w.reshape(n, k // g, g)


def expand(per_group: Tensor, group: int) -> Tensor:
    """Broadcast a per-group tensor [N, K/G] to [N, K/G, 1] for use against ``grouped(w)``."""
    return per_group.unsqueeze(-1)


def scaled(w: Tensor, scale: Tensor, zero_point: Tensor, group: int) -> Tensor:
    """v = w/s + z, shape [N, K/G, G], in w's dtype (float32 at least)."""
    dt = torch.promote_types(w.dtype, torch.float32)
    s = scale.to(dt).clamp_min(SCALE_FLOOR).unsqueeze(-1)
    z = zero_point.to(dt).unsqueeze(-1)
    return grouped(w.to(dt), group) / s + z


def quantize(w: Tensor, scale: Tensor, zero_point: Tensor, bits: int, group: int) -> Tensor:
    """Integer codes c = clamp(round(w/s + z), 0, 2^b - 1) as uint8, shape [N, K]."""
    v = scaled(w, scale, zero_point, group)
    return v.round().clamp(0, qmax(bits)).to(torch.uint8).reshape(w.shape)


def dequantize(codes: Tensor, scale: Tensor, zero_point: Tensor, group: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Q = s · (c - z) from uint8 codes [N, K]; result [N, K] in ``dtype``."""
    c = grouped(codes.to(torch.float32), group)
    s = scale.to(torch.float32).clamp_min(SCALE_FLOOR).unsqueeze(-1)
    z = zero_point.to(torch.float32).unsqueeze(-1)
    return (s * (c - z)).reshape(codes.shape).to(dtype)


def fake_quantize(w: Tensor, scale: Tensor, zero_point: Tensor, bits: int, group: int) -> Tensor:
    """Q(w) = s · (clamp(round(w/s + z), 0, 2^b - 1) - z), same shape and dtype as w."""
    v = scaled(w, scale, zero_point, group)
    c = v.round().clamp(0, qmax(bits))
    s = scale.to(v.dtype).clamp_min(SCALE_FLOOR).unsqueeze(-1)
    z = zero_point.to(v.dtype).unsqueeze(-1)
    return (s * (c - z)).reshape(w.shape).to(w.dtype)


def scaled_affine(w: Tensor, scale: Tensor, minimum: Tensor, group: int) -> Tensor:
    """v = (w - m)/s, shape [N, K/G, G], fp32 (at least)."""
    dt = torch.promote_types(w.dtype, torch.float32)
    s = scale.to(dt).clamp_min(SCALE_FLOOR).unsqueeze(-1)
    m = minimum.to(dt).unsqueeze(-1)
    return (grouped(w.to(dt), group) - m) / s


def quantize_affine(w: Tensor, scale: Tensor, minimum: Tensor, bits: int, group: int) -> Tensor:
    """Integer codes c = clamp(round((w - m)/s), 0, 2^b - 1) as uint8, shape [N, K]."""
    return scaled_affine(w, scale, minimum, group).round().clamp(0, qmax(bits)).to(torch.uint8).reshape(w.shape)


def fake_quantize_affine(w: Tensor, scale: Tensor, minimum: Tensor, bits: int, group: int) -> Tensor:
    """Q(w) = s · clamp(round((w - m)/s), 0, 2^b - 1) + m, same shape and dtype as w."""
    v = scaled_affine(w, scale, minimum, group)
    c = v.round().clamp(0, qmax(bits))
    s = scale.to(v.dtype).clamp_min(SCALE_FLOOR).unsqueeze(-1)
    return (s * c + minimum.to(v.dtype).unsqueeze(-1)).reshape(w.shape).to(w.dtype)


def in_range_mask(w: Tensor, scale: Tensor, zero_point: Tensor, bits: int, group: int) -> Tensor:
    """m_i = 1[0 <= w_i/s + z <= 2^b - 1] (the clipped-STE mask), bool [N, K]."""
    v = scaled(w, scale, zero_point, group)
    return ((v >= 0) & (v <= qmax(bits))).reshape(w.shape)


def _check_finite(w: Tensor) -> None:
    if not torch.isfinite(w).all():
        bad = (~torch.isfinite(w)).nonzero()[0].tolist()
        raise ValueError(f"weight has non-finite values (first at index {bad}); fix the weights before quantizing")


def _grid_from_range(lo: Tensor, hi: Tensor, bits: int, symmetric: bool) -> tuple[Tensor, Tensor]:
    """Scale and integer zero point that cover [lo, hi] (which contains 0)."""
    q = qmax(bits)
    if symmetric:
        z = torch.full_like(lo, float(1 << (bits - 1)))
        s = torch.maximum(-lo / z, hi / (q - z))
    else:
        s = (hi - lo) / q
        z = (-lo / s.clamp_min(SCALE_FLOOR)).round().clamp(0, q)
    return s.clamp_min(SCALE_FLOOR), z.to(torch.uint8)


def init_minmax(w: Tensor, bits: int, group: int, symmetric: bool = False) -> tuple[Tensor, Tensor]:
    """Scale and zero point from each group's range, widened to contain 0.

    lo = min(min_g w, 0), hi = max(max_g w, 0); asymmetric: s = (hi - lo)/(2^b - 1),
    z = clamp(round(-lo/s), 0, 2^b - 1); symmetric: z = 2^(b-1), s = max(-lo/z, hi/(2^b - 1 - z)).
    Containing 0 makes an all-zero group exact (s = SCALE_FLOOR) and a constant group exact.
    Returns (scale float32 [N, K/G], zero_point uint8 [N, K/G]).
    """
    _check_finite(w)
    wg = grouped(w.detach().to(torch.float32), group)
    lo = wg.amin(-1).clamp_max(0)
    hi = wg.amax(-1).clamp_min(0)
    return _grid_from_range(lo, hi, bits, symmetric)


def init_mse(
    w: Tensor, bits: int, group: int, symmetric: bool = False, ratios: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Scale and zero point minimising each group's squared error over clipping ratios r.

    For r in ``ratios`` (default 1.00, 0.98, ..., 0.30): grid from [r·lo, r·hi] as in
    :func:`init_minmax`; per group keep the r with the least sum_i (Q(w_i) - w_i)^2.
    r = 1 is the min/max grid, so the result is never worse than :func:`init_minmax`.
    """
    _check_finite(w)
    wg = grouped(w.detach().to(torch.float32), group)
    lo = wg.amin(-1).clamp_max(0)
    hi = wg.amax(-1).clamp_min(0)
    ratios = torch.linspace(1.0, 0.3, 36) if ratios is None else ratios
    best_s, best_z = _grid_from_range(lo, hi, bits, symmetric)
    best_err = _group_error(wg, best_s, best_z, bits)
    for r in ratios[1:].tolist():
        s, z = _grid_from_range(lo * r, hi * r, bits, symmetric)
        err = _group_error(wg, s, z, bits)
        better = err < best_err
        best_s = torch.where(better, s, best_s)
        best_z = torch.where(better, z, best_z)
        best_err = torch.minimum(err, best_err)
    return best_s, best_z


def _group_error(wg: Tensor, s: Tensor, z: Tensor, bits: int) -> Tensor:
    """sum over each group of (Q(w) - w)^2, with wg [N, K/G, G]."""
    zf = z.to(torch.float32).unsqueeze(-1)
    sf = s.unsqueeze(-1)
    c = (wg / sf + zf).round().clamp(0, qmax(bits))
    return ((sf * (c - zf) - wg) ** 2).sum(-1)


def init_scale(w: Tensor, bits: int, group: int, method: str = "mse", symmetric: bool = False) -> tuple[Tensor, Tensor]:
    """Dispatch to :func:`init_minmax` or :func:`init_mse`."""
    if method == "minmax":
        return init_minmax(w, bits, group, symmetric)
    if method == "mse":
        return init_mse(w, bits, group, symmetric)
    raise ValueError(f"unknown scale init {method!r}; use 'minmax' or 'mse'")
