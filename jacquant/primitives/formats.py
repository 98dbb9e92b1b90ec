"""GGUF's weight formats as jacquant grids: what each format stores, and its parameters as pure functions.

A format fixes the grid that llama.cpp dequantizes (gguf-py's ``gguf.quants.dequantize`` is the reference):

    q4_0   blocks of 32:  w = d·(q - 8)                   q in 0..15, d fp16
    q4_1   blocks of 32:  w = d·q + m                     q in 0..15, d and m fp16
    q2_k   super-blocks of 256 = 16 sub-blocks of 16:
                          w = (d·sc)·q - dmin·mn          q in 0..3, sc and mn in 0..15 per sub-block,
                                                          d and dmin fp16 per super-block

jacquant trains on exactly these values. Q4_0 is the integer-zero-point grid of :mod:`jacquant.primitives.grid`
(zero point 8, group 32) with the scale rounded to fp16 in the forward. Q4_1 and Q2_K are the
*scale-and-min* grid Q = s·c + m (:func:`jacquant.primitives.grid.fake_quantize_affine`) with

    q4_1   s = fp16(d),  m = fp16(m)
    q2_k   s = fp16(d)·sc,  m = -(fp16(dmin)·mn),   sc = clamp(round(σ/fp16(d)), 1, 15),
                                                    mn = clamp(round(-μ/fp16(dmin)), 0, 15)

where σ, μ are continuous per-sub-block latents (μ the signed min, ≤ 0 where llama.cpp can store it) and d,
dmin learnable per super-block. Every rounding passes the gradient straight through (:func:`ste`), so
σ gets dL/ds, and d gets LSQ's gradient of the index quantization, dL/dd = Σ_j dL/ds_j·(sc_j - σ_j/d)
(clipped: only σ_j/d inside [1, 15] passes to σ_j). Products of an fp16 value and a 4-bit index are exact in
fp32, so s and m are the very numbers llama.cpp computes, and Q = fl(s·c + m) is gguf's fl(d·q + m) and
fl(dl·q - ml) bit for bit. sc ≥ 1 keeps s > 0 (a subset of what the format can store).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

FP16_TINY = 2.0 ** -24  # the smallest positive fp16 (subnormal): the floor of every fp16 scale
FP16_MAX = 65504.0
INDEX_MAX = 15  # Q2_K's 4-bit sub-block scale and min indices


@dataclass(frozen=True)
class FormatSpec:
    """One GGUF weight format.

    Attributes:
        name: ``q4_0``, ``q4_1``, ``q2_k``.
        bits: code width b (codes 0 .. 2^b - 1).
        group: weights sharing one (s, m) or (s, z) along K: the block, or Q2_K's sub-block of 16.
        block: the row length must be a multiple of this (32, or Q2_K's super-block of 256).
        zero_point: the fixed integer zero point (8 for Q4_0), None for the scale-and-min formats.
        ggml_type: the ``gguf.GGMLQuantizationType`` member name.
    """

    name: str
    bits: int
    group: int
    block: int
    zero_point: Optional[int]
    ggml_type: str

    @property
    def affine(self) -> bool:
        """True for the scale-and-min formats (Q = s·c + m)."""
        return self.zero_point is None

    @property
    def super_block(self) -> bool:
        """True when sub-block scales are 4-bit indices against per-super-block fp16 scales (k-quants)."""
        return self.block != self.group


FORMATS: dict[str, FormatSpec] = {f.name: f for f in (
    FormatSpec("q4_0", bits=4, group=32, block=32, zero_point=8, ggml_type="Q4_0"),
    FormatSpec("q4_1", bits=4, group=32, block=32, zero_point=None, ggml_type="Q4_1"),
    FormatSpec("q2_k", bits=2, group=16, block=256, zero_point=None, ggml_type="Q2_K"),
)}


def site_format(fmt, fallback: Optional[str], name: str, module, in_features: int) -> Optional[str]:
    """The format of one site: ``fmt`` (a name, or ``fmt(name, module)``), else ``fallback`` where the row does
    not fit; None when the config has no format. Raises ValueError naming the layer and the fix."""
    if fmt is None:
        return None
    chosen = fmt(name, module) if callable(fmt) else fmt
    if chosen is None:
        chosen = fallback
    if chosen is None:
        raise ValueError(f"layer `{name}`: the format callable chose no format and there is no fallback; return a "
                         f"format from {tuple(FORMATS)} or set fallback=")
    if chosen not in FORMATS:
        raise ValueError(f"layer `{name}`: format {chosen!r} is not one of {tuple(FORMATS)}")
    spec = FORMATS[chosen]
    if in_features % spec.block == 0:
        return chosen
    if fallback is not None and chosen != fallback and in_features % FORMATS[fallback].block == 0:
        return fallback
    fix = ("pass fallback='q4_0' (what llama.cpp does for such rows) or exclude it with filter="
           if fallback is None else f"the fallback {fallback} does not fit either; exclude it with filter=")
    raise ValueError(f"layer `{name}`: in_features {in_features} is not a multiple of {chosen}'s block of "
                     f"{spec.block}; {fix}")


# ----------------------------------------------------------------------------- roundings with a straight-through gradient
def ste(x: Tensor, rounded: Tensor) -> Tensor:
    """``rounded`` in the forward, the identity's gradient for ``x`` in the backward.

    Computed as rounded + (x - x): x - x is +0 exactly, so the value is ``rounded`` bit for bit (the usual
    x + (r - x).detach() is not: r - x and the sum may round)."""
    return rounded.detach() + (x - x.detach())


def fp16_scale(x: Tensor) -> Tensor:
    """A positive scale as fp16 stores it: clamp to [2^-24, 65504], round to fp16, back to fp32 (no gradient)."""
    return x.detach().float().clamp(FP16_TINY, FP16_MAX).half().float()


def fp16_value(x: Tensor) -> Tensor:
    """A signed value as fp16 stores it: clamp to ±65504, round to fp16, back to fp32 (no gradient)."""
    return x.detach().float().clamp(-FP16_MAX, FP16_MAX).half().float()


def index(t: Tensor, lo: int, hi: int = INDEX_MAX) -> Tensor:
    """clamp(round(t), lo, hi) with a clipped straight-through gradient (1 inside [lo, hi], 0 outside)."""
    tc = t.clamp(lo, hi)
    return ste(tc, tc.detach().round())


def expand_super(x: Tensor, spec: FormatSpec) -> Tensor:
    """Per-super-block [N, K/256] -> per-sub-block [N, K/16]."""
    return x.repeat_interleave(spec.block // spec.group, dim=-1)


def q2_k_indices(scale: Tensor, minimum: Tensor, d: Tensor, dmin: Tensor, spec: FormatSpec
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(fp16 d, fp16 dmin, sc, mn) of Q2_K, each with straight-through gradients (see the module docstring).

    scale σ and minimum μ are per sub-block [N, K/16]; ``d`` and ``dmin`` are per super-block [N, K/256] and hold
    15·d and 15·dmin (the largest sub-block scale and min the super-block can express: the same magnitude as σ,
    so that an optimizer step moves them by as much, relatively, as the sub-block latents). sc in 1..15,
    mn in 0..15, both float tensors holding integers, per sub-block."""
    d, dmin = d / INDEX_MAX, dmin / INDEX_MAX  # stored as 15·d: the super-block's largest sub-block scale
    dq = ste(d, fp16_scale(d))
    dminq = ste(dmin, fp16_scale(dmin))
    sc = index(scale / expand_super(dq, spec), 1)
    mn = index(-minimum / expand_super(dminq, spec), 0)
    return dq, dminq, sc, mn


def affine_grid(spec: FormatSpec, scale: Tensor, minimum: Tensor, d: Optional[Tensor] = None,
                dmin: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """(s, m) [N, K/G] fp32 of a scale-and-min format from its learnable parameters, differentiable.

        q4_1  s = fp16(scale),  m = fp16(minimum)
        q2_k  s = fp16(d)·sc,   m = -(fp16(dmin)·mn)        (:func:`q2_k_indices`)

    Both products are exact in fp32 (an fp16 value times an integer below 16)."""
    if spec.name == "q4_1":
        return ste(scale, fp16_scale(scale)), ste(minimum, fp16_value(minimum))
    if spec.name == "q2_k":
        dq, dminq, sc, mn = q2_k_indices(scale, minimum, d, dmin, spec)
        return expand_super(dq, spec) * sc, -(expand_super(dminq, spec) * mn)
    raise ValueError(f"format {spec.name!r} has no scale-and-min grid")


# ----------------------------------------------------------------------------- initialisation
def init_affine(w: Tensor, spec: FormatSpec, method: str) -> dict[str, Tensor]:
    """Initial parameters of a scale-and-min format for W [N, K]: ``scale``, ``min`` [N, K/G] and for Q2_K
    ``super_scale``, ``super_min`` [N, K/256] (d, dmin).

    ``method``:
      ``"mse"`` / ``"minmax"``: jacquant's integer-zero-point init (:func:`jacquant.primitives.grid.init_scale`,
          asymmetric), read as s and m = -s·z (a grid that holds 0 exactly);
      ``"llama"``: llama.cpp's choice: Q4_1 the block's min/max (d = (max - min)/15, m = min); Q2_K a
          weighted search per sub-block (:func:`search_scale_min`, weights |w|, the error summed as
          Σ|w|·|Q - w|, 16 candidate steps), then the sub-block scales and mins as 4-bit indices of
          d = max σ/15, dmin = max(-μ)/15 (``super_scale``, ``super_min`` hold 15·d, 15·dmin).
    """
    from jacquant.primitives.grid import grouped, init_scale

    wg = grouped(w.detach().float(), spec.group)  # [N, K/G, G]
    if method in ("mse", "minmax"):
        s, z = init_scale(w, spec.bits, spec.group, method, symmetric=False)
        s = s.float()
        m = -s * z.float()
    elif method == "llama" and spec.name == "q4_1":
        lo, hi = wg.amin(-1), wg.amax(-1)
        s, m = ((hi - lo) / 15).clamp_min(FP16_TINY), lo
    elif method == "llama" and spec.name == "q2_k":
        s, m = search_scale_min(wg, (1 << spec.bits) - 1, weights=wg.abs())
        s = s.clamp_min(FP16_TINY)
    else:
        raise ValueError(f"unknown init {method!r} for format {spec.name}; use 'mse', 'minmax' or 'llama'")
    out = {"scale": s, "min": m}
    if spec.super_block:
        per = spec.block // spec.group
        n = s.shape[0]
        out["super_scale"] = s.reshape(n, -1, per).amax(-1).clamp_min(FP16_TINY * INDEX_MAX)  # 15·d
        out["super_min"] = (-m).clamp_min(0).reshape(n, -1, per).amax(-1).clamp_min(FP16_TINY * INDEX_MAX)
    return out


def search_scale_min(x: Tensor, nmax: int, weights: Tensor, rmin: float = -0.5, rdelta: float = 0.1,
                     nstep: int = 15) -> tuple[Tensor, Tensor]:
    """Per row of x [..., G]: the (s, m) with m ≤ 0 that a make_qkx2-style search picks, m the additive offset.

    With lo = min(min x, 0), hi = max x, candidates of the inverse step are (nmax + rmin + rdelta·k)/(hi - lo),
    k = 0..nstep, and the plain nmax/(hi - lo). For each: codes L = clamp(round((x - lo)·iscale), 0, nmax),
    then (s, m) by weighted least squares min Σ w(s·L + m - x)², with m clamped to ≤ 0 (then s = Σ wxL/Σ wL²);
    the candidate with the least Σ w·|s·L + m - x| wins. A constant row (hi = lo) gets s = 0, m = lo.
    Returns (s, m) of shape x.shape[:-1].
    """
    x, w = x.float(), weights.float()
    lo = x.amin(-1, keepdim=True).clamp_max(0)
    hi = x.amax(-1, keepdim=True)
    span = (hi - lo).clamp_min(1e-30)
    sw, swx = w.sum(-1, keepdim=True), (w * x).sum(-1, keepdim=True)

    def fit(iscale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        L = ((x - lo) * iscale).round().clamp(0, nmax)
        swl, swl2, swxl = (w * L).sum(-1, keepdim=True), (w * L * L).sum(-1, keepdim=True), (w * x * L).sum(-1, keepdim=True)
        det = sw * swl2 - swl * swl
        ok = det > 0
        s = torch.where(ok, (sw * swxl - swx * swl) / det.where(ok, torch.ones_like(det)), torch.zeros_like(det))
        m = torch.where(ok, (swl2 * swx - swl * swxl) / det.where(ok, torch.ones_like(det)), lo)
        pos = m > 0
        s = torch.where(pos, swxl / swl2.clamp_min(1e-30), s)
        m = m.clamp_max(0)
        err = (w * (s * L + m - x).abs()).sum(-1, keepdim=True)
        return s, m, err

    best_s, best_m, best_err = fit(nmax / span)
    for k in range(nstep + 1):
        s, m, err = fit((nmax + rmin + rdelta * k) / span)
        better = (err < best_err) & (s > 0)
        best_s, best_m = torch.where(better, s, best_s), torch.where(better, m, best_m)
        best_err = torch.minimum(best_err, torch.where(s > 0, err, best_err))
    const = (hi - lo) <= 0
    best_s = torch.where(const, torch.zeros_like(best_s), best_s)
    best_m = torch.where(const, lo, best_m)
    return best_s.squeeze(-1), best_m.squeeze(-1)


def init_q4_0(w: Tensor, method: str) -> tuple[Tensor, Tensor]:
    """(scale, zero_point) of Q4_0 (zero point 8, group 32). ``"llama"``: s = max|w|/8 per block (llama.cpp
    takes d = (the signed value of largest magnitude)/(-8), so its d may be negative; jacquant keeps s > 0,
    which differs only where that value is positive, then clamped at 7·s); else :func:`init_scale`, symmetric."""
    from jacquant.primitives.grid import grouped, init_scale

    if method == "llama":
        s = grouped(w.detach().float(), 32).abs().amax(-1) / 8
        s = s.clamp_min(FP16_TINY)
        return s, torch.full_like(s, 8, dtype=torch.uint8)
    return init_scale(w, 4, 32, method, symmetric=True)

