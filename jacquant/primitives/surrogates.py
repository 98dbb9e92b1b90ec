"""Backward rules for the weight: what dL/dw is given dL/dq. The forward quantizer is untouched.

All rules share one form (method.md):

    dL/dw_i = f_i · m_i · dL/dq_i        m_i = 1[0 <= w_i/s + z <= 2^b - 1]

    ste        f_i = 1                                   (clipped straight-through estimator)
    stableqat  f_i = (1 - S_i)/(1 + S_i),  S_i = sqrt(2)·pi·A·cos(pi·(v_i + round v_i)),  v = w/s
    jacquant   f_i = B_g   (one learned scalar per group, a buffer refreshed by the estimators)

The scale always gets LSQ's gradient (see :func:`lsq_scale_grad`).

The scale-and-min grid Q = s·c + m (:func:`jacquant.primitives.grid.fake_quantize_affine`) takes the same rules
with v = (w - m)/s (:func:`backward_affine`).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from jacquant.primitives.grid import SCALE_FLOOR, grouped, qmax, scaled, scaled_affine

RULES = ("ste", "stableqat", "jacquant")


def stableqat_factor(w: Tensor, scale: Tensor, amplitude: float, group: int) -> Tensor:
    """StableQAT's Fourier surrogate slope, per element.

        v = w/s,  S = sqrt(2)·pi·A·cos(pi·(v + round v)),  g = (1 - S)/(1 + S)

    g = 1 at the decision thresholds (v = n + 1/2), g = (1 - sqrt(2)·pi·A)/(1 + sqrt(2)·pi·A) on
    the grid points (v = n), and g ≡ 1 for A = 0. Returns [N, K] float32.
    """
    s = scale.to(torch.float32).clamp_min(SCALE_FLOOR).unsqueeze(-1)
    v = grouped(w.to(torch.float32), group) / s
    S = math.sqrt(2.0) * math.pi * amplitude * torch.cos(math.pi * (v + v.round()))
    return ((1 - S) / (1 + S)).reshape(w.shape)


def weight_grad(
    grad_q: Tensor,
    w: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    jac: Tensor,
    bits: int,
    group: int,
    rule: str,
    amplitude: float,
) -> Tensor:
    """dL/dw = f · m · dL/dq for ``rule`` in ("ste", "stableqat", "jacquant"); [N, K] like w.

    ``jac`` is B, one value per group [N, K/G] (used by "jacquant" only). With B ≡ 1 "jacquant"
    equals "ste" bit for bit: the only extra operation is a multiplication by 1.0, which is exact.
    """
    v = scaled(w, scale, zero_point, group)  # [N, K/G, G]
    return _weight_grad(grouped(grad_q, group), v, _mask(v, bits), w, scale, jac, group, rule, amplitude)


def lsq_scale_grad(
    grad_q: Tensor, w: Tensor, scale: Tensor, zero_point: Tensor, bits: int, group: int
) -> Tensor:
    """LSQ's gradient for the per-group scale, [N, K/G].

        dq/ds = (c - z) - m · w/s       (round passed straight through inside the range)
        dL/ds_g = γ · sum_{i in g} dL/dq_i · dq_i/ds,    γ = 1/sqrt(G · (2^b - 1))

    γ is LSQ's gradient scale 1/sqrt(numel · Q_p), with numel the G weights that share the scale.
    """
    v = scaled(w, scale, zero_point, group)
    return _lsq_scale_grad(grouped(grad_q, group), v, _mask(v, bits), scale, zero_point, bits)


def backward(
    grad_q: Tensor, w: Tensor, scale: Tensor, zero_point: Tensor, jac: Tensor,
    bits: int, group: int, rule: str, amplitude: float,
) -> tuple[Tensor, Tensor]:
    """(:func:`weight_grad`, :func:`lsq_scale_grad`) from one v = w/s + z and one mask m: the
    quantized op's backward, which needs both."""
    v = scaled(w, scale, zero_point, group)
    m = _mask(v, bits)
    gq = grouped(grad_q, group)
    return (_weight_grad(gq, v, m, w, scale, jac, group, rule, amplitude),
            _lsq_scale_grad(gq, v, m, scale, zero_point, bits))


def _mask(v: Tensor, bits: int) -> Tensor:
    """m = 1[0 <= v <= 2^b - 1], the clipped-STE mask."""
    return (v >= 0) & (v <= qmax(bits))


def _weight_grad(gq: Tensor, v: Tensor, m: Tensor, w: Tensor, scale: Tensor, jac: Tensor, group: int,
                 rule: str, amplitude: float) -> Tensor:
    if rule == "ste":
        g = gq * m
    elif rule == "jacquant":
        g = gq * m * jac.to(gq.dtype).unsqueeze(-1)
    elif rule == "stableqat":
        g = gq * m * stableqat_factor(w, scale, amplitude, group).reshape(gq.shape).to(gq.dtype)
    else:
        raise ValueError(f"unknown backward rule {rule!r}; use one of {RULES}")
    return g.reshape(w.shape).to(w.dtype)


def _lsq_scale_grad(gq: Tensor, v: Tensor, m: Tensor, scale: Tensor, zero_point: Tensor, bits: int) -> Tensor:
    c = v.round().clamp(0, qmax(bits))
    z = zero_point.to(v.dtype).unsqueeze(-1)
    dq_ds = (c - z) - torch.where(m, v - z, torch.zeros_like(v))  # v - z = w/s
    gamma = 1.0 / math.sqrt(v.shape[-1] * qmax(bits))
    return (gq.to(v.dtype) * dq_ds).sum(-1).mul(gamma).to(scale.dtype)


def backward_affine(
    grad_q: Tensor, w: Tensor, scale: Tensor, minimum: Tensor, jac: Tensor,
    bits: int, group: int, rule: str, amplitude: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dL/dw [N, K], dL/ds [N, K/G], dL/dm [N, K/G]) for the scale-and-min grid Q = s·c + m.

    With v = (w - m)/s, c = clamp(round v, 0, q), q = 2^b - 1, m_i = 1[0 <= v_i <= q] and the rounding
    passed straight through inside the range (Q = w there):

        dL/dw_i = f_i · m_i · dL/dq_i          f as for the integer grid, StableQAT's S from this v
        dq/ds   = c - m_i · v_i                dL/ds_g = γ · sum_{i in g} dL/dq_i · (c_i - m_i·v_i)
        dq/dm   = 1 - m_i                      dL/dm_g = γ · sum_{i in g} dL/dq_i · (1 - m_i)

    γ = 1/sqrt(G·q), LSQ's gradient scale, on both (LSQ+ scales its offset's gradient alike). With B ≡ 1,
    "jacquant" equals "ste" bit for bit.
    """
    v = scaled_affine(w, scale, minimum, group)  # [N, K/G, G]
    mask = _mask(v, bits)
    gq = grouped(grad_q, group)
    if rule == "stableqat":
        S = math.sqrt(2.0) * math.pi * amplitude * torch.cos(math.pi * (v + v.round()))
        g = gq * mask * ((1 - S) / (1 + S)).to(gq.dtype)
    elif rule in ("ste", "jacquant"):
        g = gq * mask if rule == "ste" else gq * mask * jac.to(gq.dtype).unsqueeze(-1)
    else:
        raise ValueError(f"unknown backward rule {rule!r}; use one of {RULES}")
    c = v.round().clamp(0, qmax(bits))
    gamma = 1.0 / math.sqrt(v.shape[-1] * qmax(bits))
    gqf = gq.to(v.dtype)
    grad_s = (gqf * (c - torch.where(mask, v, torch.zeros_like(v)))).sum(-1).mul(gamma).to(scale.dtype)
    grad_m = (gqf * (~mask)).sum(-1).mul(gamma).to(minimum.dtype)
    return g.reshape(w.shape).to(w.dtype), grad_s, grad_m
