"""Fake quantization forward and surrogate backward in torch, for every tensor Triton does not take (CPU).

The same operations as the references (:func:`jacquant.primitives.grid.fake_quantize`,
:func:`jacquant.primitives.surrogates.backward`) in the same order, so the results are equal bit for bit, but
written into as few fresh tensors as possible: every weight-sized temporary of the reference is a
new allocation, and on CPU a fresh multi-megabyte tensor costs its page faults (on SmolLM2-135M the
reference's forward took ~60x the time of this one on the same weight, almost all of it in the
allocator). Here the forward allocates its output only:

    Q = ((w / s + z).round().clamp(0, 2^b - 1) - z) · s        (one buffer, updated in place)

and the backward one float buffer for dL/dw, one for v = w/s + z (reused for dq/ds) and the mask:

    m = 1[0 <= v <= 2^b - 1]        dL/dw = (dL/dq · m) · f
    dq/ds = (clamp(round v) - z) - where(m, v - z, 0)      dL/ds = γ · sum_g dL/dq · dq/ds

Multiplication is commutative in IEEE arithmetic, so ``(c - z)·s`` equals the reference's
``s·(c - z)``; the group sum runs over the same contiguous [N, K/G, G] layout, so it adds in the
same order. Under ``torch.compile`` these functions are traced and functionalized like the
reference (the in-place updates act on tensors created here, never on the inputs).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from jacquant.primitives.grid import SCALE_FLOOR, grouped, qmax
from jacquant.primitives.surrogates import RULES, stableqat_factor


def _grid(w: Tensor, scale: Tensor, zero_point: Tensor) -> tuple[torch.dtype, Tensor, Tensor]:
    """(compute dtype, s [N, K/G, 1] floored, z [N, K/G, 1]) as in :func:`jacquant.primitives.grid.scaled`."""
    dt = torch.promote_types(w.dtype, torch.float32)
    return dt, scale.to(dt).clamp_min(SCALE_FLOOR).unsqueeze(-1), zero_point.to(dt).unsqueeze(-1)


def fake_quant_forward(w: Tensor, scale: Tensor, zero_point: Tensor, bits: int, group: int) -> Tensor:
    """Q(w) = s · (clamp(round(w/s + z), 0, 2^b - 1) - z), [N, K] in w's dtype; one allocation (two for
    a weight narrower than fp32, which is quantized in fp32 and cast back)."""
    dt, s, z = _grid(w, scale, zero_point)
    q = torch.div(grouped(w.to(dt), group), s)
    q.add_(z).round_().clamp_(0, qmax(bits)).sub_(z).mul_(s)
    return q.reshape(w.shape).to(w.dtype)


def fake_quant_backward(
    grad_q: Tensor, w: Tensor, scale: Tensor, zero_point: Tensor, jac: Tensor,
    bits: int, group: int, rule: str, amplitude: float,
) -> tuple[Tensor, Tensor]:
    """(dL/dw [N, K] in w's dtype, dL/ds [N, K/G] in scale's dtype), equal to :func:`jacquant.primitives.surrogates.backward`.

    dL/dw = f·m·dL/dq with f = 1 (ste), B_g (jacquant), (1 - S)/(1 + S) (stableqat);
    dL/ds_g = γ·sum_{i in g} dL/dq_i·((c_i - z) - m_i·(v_i - z)), γ = 1/sqrt(G·(2^b - 1)).
    """
    if rule not in RULES:
        raise ValueError(f"unknown backward rule {rule!r}; use one of {RULES}")
    dt, s, z = _grid(w, scale, zero_point)
    top = qmax(bits)
    gq = grouped(grad_q, group)
    v = torch.div(grouped(w.to(dt), group), s).add_(z)  # v = w/s + z
    m = torch.ge(v, 0).logical_and_(torch.le(v, top))
    g = torch.mul(gq, m)
    if rule == "jacquant":
        g.mul_(jac.to(gq.dtype).unsqueeze(-1))
    elif rule == "stableqat":
        g.mul_(stableqat_factor(w, scale, amplitude, group).reshape(gq.shape).to(gq.dtype))
    grad_w = g.reshape(w.shape).to(w.dtype)
    dq_ds = torch.round(v).clamp_(0, top).sub_(z)  # c - z
    dq_ds.sub_(v.sub_(z).masked_fill_(m.logical_not_(), 0))  # - where(m, v - z, 0)
    grad_s = dq_ds.mul_(gq.to(dt)).sum(-1).mul_(1.0 / math.sqrt(v.shape[-1] * top)).to(scale.dtype)
    return grad_w, grad_s


# ----------------------------------------------------------------------------- scale-and-min grid (GGUF Q4_1, Q2_K)
def _affine_grid(w: Tensor, scale: Tensor, minimum: Tensor) -> tuple[torch.dtype, Tensor, Tensor]:
    """(compute dtype, s [N, K/G, 1] floored, m [N, K/G, 1]) as in :func:`jacquant.primitives.grid.scaled_affine`."""
    dt = torch.promote_types(w.dtype, torch.float32)
    return dt, scale.to(dt).clamp_min(SCALE_FLOOR).unsqueeze(-1), minimum.to(dt).unsqueeze(-1)


def affine_forward(w: Tensor, scale: Tensor, minimum: Tensor, bits: int, group: int) -> Tensor:
    """Q(w) = s · clamp(round((w - m)/s), 0, 2^b - 1) + m, [N, K] in w's dtype, in one buffer:

        Q = ((w - m) / s).round().clamp(0, 2^b - 1) · s + m

    equal to :func:`jacquant.primitives.grid.fake_quantize_affine` bit for bit (c·s = s·c in IEEE arithmetic)."""
    dt, s, m = _affine_grid(w, scale, minimum)
    q = torch.sub(grouped(w.to(dt), group), m)
    q.div_(s).round_().clamp_(0, qmax(bits)).mul_(s).add_(m)
    return q.reshape(w.shape).to(w.dtype)


def affine_backward(
    grad_q: Tensor, w: Tensor, scale: Tensor, minimum: Tensor, jac: Tensor,
    bits: int, group: int, rule: str, amplitude: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dL/dw, dL/ds, dL/dm), equal to :func:`jacquant.primitives.surrogates.backward_affine`:

        v = (w - m)/s,  mask = 1[0 <= v <= 2^b - 1],  dL/dw = (dL/dq · mask) · f
        dL/ds_g = γ·sum_g dL/dq·(c - where(mask, v, 0)),  dL/dm_g = γ·sum_g dL/dq·(1 - mask)
    """
    if rule not in RULES:
        raise ValueError(f"unknown backward rule {rule!r}; use one of {RULES}")
    dt, s, m = _affine_grid(w, scale, minimum)
    top = qmax(bits)
    gq = grouped(grad_q, group)
    v = torch.sub(grouped(w.to(dt), group), m).div_(s)  # v = (w - m)/s
    inside = torch.ge(v, 0).logical_and_(torch.le(v, top))
    g = torch.mul(gq, inside)
    if rule == "jacquant":
        g.mul_(jac.to(gq.dtype).unsqueeze(-1))
    elif rule == "stableqat":
        S = torch.round(v).add_(v).mul_(math.pi).cos_().mul_(math.sqrt(2.0) * math.pi * amplitude)
        g.mul_(torch.neg(S).add_(1).div_(S.add_(1)).to(gq.dtype))
    grad_w = g.reshape(w.shape).to(w.dtype)
    gamma = 1.0 / math.sqrt(v.shape[-1] * top)
    gqf = gq.to(dt)
    grad_m = torch.mul(gqf, inside.logical_not()).sum(-1).mul_(gamma).to(minimum.dtype)
    dq_ds = torch.round(v).clamp_(0, top).sub_(v.masked_fill_(inside.logical_not_(), 0))  # c - where(mask, v, 0)
    grad_s = dq_ds.mul_(gqf).sum(-1).mul_(gamma).to(scale.dtype)
    return grad_w, grad_s, grad_m
