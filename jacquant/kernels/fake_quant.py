"""Fake quantization forward and surrogate backward: Triton kernels, launchers and dispatch.

The torch reference is the pure math of :mod:`jacquant.primitives.grid` and :mod:`jacquant.primitives.surrogates`;
every other device runs :mod:`jacquant.kernels.fake_quant_torch` (the same operations, in place, equal
bit for bit), for plain CPU tensors in eager compiled alone into one fused loop (:mod:`jacquant.kernels.fused_cpu`). The Triton kernels below run for CUDA tensors and are tested against the reference (on CPU under
``TRITON_INTERPRET=1``). Both kernels view a contiguous W [N, K] as R = N·K/G group rows of G
entries, so each program owns whole groups and the per-group reduction of LSQ's scale gradient
needs no atomics:

    v = w/s + z      c = clamp(round(v), 0, 2^b - 1)      Q = s·(c - z)      m = 1[0 <= v <= 2^b - 1]
    dL/dw = f·m·dL/dq          dL/ds_g = γ · sum_i dL/dq_i · ((c_i - z) - m_i·(v_i - z))

with f = 1 (ste), B_g (jacquant) or StableQAT's (1 - S)/(1 + S), γ = 1/sqrt(G·(2^b - 1)).
Rounding matches torch: w/s is an IEEE division (``tl.div_rn``), round is half-to-even.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from jacquant.kernels import fake_quant_torch, fused_cpu
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
from jacquant.primitives import grid as quantizer
from jacquant.primitives import surrogates
from jacquant.primitives.grid import SCALE_FLOOR, group_size, qmax

RULE_IDS = {"ste": 0, "jacquant": 1, "stableqat": 2}


# ----------------------------------------------------------------------------- torch references
def fake_quant_forward_reference(w: Tensor, scale: Tensor, zero_point: Tensor, bits: int, group: int) -> Tensor:
    """Q(w) = s · (clamp(round(w/s + z), 0, 2^b - 1) - z), [N, K] in w's dtype."""
    return quantizer.fake_quantize(w, scale, zero_point, bits, group)


def fake_quant_backward_reference(
    grad_q: Tensor, w: Tensor, scale: Tensor, zero_point: Tensor, jac: Tensor,
    bits: int, group: int, rule: str, amplitude: float,
) -> tuple[Tensor, Tensor]:
    """(dL/dw, dL/ds): :func:`surrogates.backward` (weight_grad and lsq_scale_grad from one v and mask)."""
    return surrogates.backward(grad_q, w, scale, zero_point, jac, bits, group, rule, amplitude)


# ----------------------------------------------------------------------------- dispatch
def fake_quant_forward(w: Tensor, scale: Tensor, zero_point: Tensor, bits: int, group: int) -> Tensor:
    """Q(w) = s · (clamp(round(w/s + z), 0, 2^b - 1) - z), [N, K] in w's dtype."""
    if use_triton(w, scale, zero_point):
        return fake_quant_forward_triton(w, scale, zero_point, bits, group)[0]
    if fused_cpu.usable(w, scale, zero_point):
        return fused_cpu.fake_quant_forward(w, scale, zero_point, bits, group)
    return fake_quant_torch.fake_quant_forward(w, scale, zero_point, bits, group)


def fake_quant_backward(
    grad_q: Tensor, w: Tensor, scale: Tensor, zero_point: Tensor, jac: Tensor,
    bits: int, group: int, rule: str, amplitude: float,
) -> tuple[Tensor, Tensor]:
    """(dL/dw, dL/ds): the surrogate weight gradient f·m·dL/dq and LSQ's scale gradient."""
    if use_triton(grad_q, w, scale, zero_point, jac):
        return fake_quant_backward_triton(grad_q, w, scale, zero_point, jac, bits, group, rule, amplitude)
    if fused_cpu.usable(grad_q, w, scale, zero_point, jac):
        return fused_cpu.fake_quant_backward(grad_q, w, scale, zero_point, jac, bits, group, rule, amplitude)
    return fake_quant_torch.fake_quant_backward(grad_q, w, scale, zero_point, jac, bits, group, rule, amplitude)


def affine_forward(w: Tensor, scale: Tensor, minimum: Tensor, bits: int, group: int) -> Tensor:
    """Q(w) = s · clamp(round((w - m)/s), 0, 2^b - 1) + m (GGUF's Q4_1, Q2_K), [N, K] in w's dtype.

    No Triton kernel: CUDA tensors take the torch path (the formats are trained on CPU for llama.cpp here;
    a kernel would mirror :func:`_fake_quant_fwd_kernel` with ``(w - m)/s`` and ``c·s + m``)."""
    if fused_cpu.usable(w, scale, minimum):
        return fused_cpu.affine_forward(w, scale, minimum, bits, group)
    return fake_quant_torch.affine_forward(w, scale, minimum, bits, group)


def affine_backward(
    grad_q: Tensor, w: Tensor, scale: Tensor, minimum: Tensor, jac: Tensor,
    bits: int, group: int, rule: str, amplitude: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dL/dw, dL/ds, dL/dm) of the scale-and-min grid (:func:`jacquant.primitives.surrogates.backward_affine`)."""
    if fused_cpu.usable(grad_q, w, scale, minimum, jac):
        return fused_cpu.affine_backward(grad_q, w, scale, minimum, jac, bits, group, rule, amplitude)
    return fake_quant_torch.affine_backward(grad_q, w, scale, minimum, jac, bits, group, rule, amplitude)


# ----------------------------------------------------------------------------- forward kernel
@triton.jit
def _fake_quant_fwd_kernel(
    w_ptr, s_ptr, z_ptr, q_ptr, c_ptr, m_ptr,  # w, q, c, m: [R, G]; s, z: [R]
    R, G,
    QMAX: tl.constexpr, FLOOR: tl.constexpr, STORE_CODES: tl.constexpr, STORE_MASK: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr,
):
    rows, row_ok, s, z = group_rows(s_ptr, z_ptr, R, FLOOR, BLOCK_R)
    for g0 in range(0, G, BLOCK_G):
        ok, offs = group_tile(rows, row_ok, g0, G, BLOCK_G)
        w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        v = tl.div_rn(w, s) + z
        c = tl.minimum(tl.maximum(round_half_even(v), 0.0), QMAX)
        tl.store(q_ptr + offs, (s * (c - z)).to(q_ptr.dtype.element_ty), mask=ok)
        if STORE_CODES:
            tl.store(c_ptr + offs, c.to(tl.uint8), mask=ok)
        if STORE_MASK:
            tl.store(m_ptr + offs, ((v >= 0.0) & (v <= QMAX)).to(tl.int8), mask=ok)


def _blocks(rows: int, g: int, elements: int = 4096) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_G): whole groups per program up to ``elements`` entries, G chunked above 1024."""
    block_g = min(triton.next_power_of_2(g), 1024)
    block_r = max(1, min(elements // block_g, triton.next_power_of_2(rows)))
    return block_r, block_g


def _group_rows(w: Tensor, scale: Tensor, zero_point: Tensor, group: int) -> tuple[int, int, int]:
    """(N, G, R) after checking that scale and zero point are [N, K/G]."""
    n, k = w.shape
    g = group_size(k, group)
    if k % g or scale.shape != (n, k // g) or zero_point.shape != (n, k // g):
        raise ValueError(f"W {tuple(w.shape)} with group {group}: scale {tuple(scale.shape)} and zero point "
                         f"{tuple(zero_point.shape)} must be [{n}, {k // g if g else '?'}] and K a multiple of G")
    return n, g, n * (k // g)


def fake_quant_forward_triton(
    w: Tensor, scale: Tensor, zero_point: Tensor, bits: int, group: int,
    return_codes: bool = False, return_mask: bool = False,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Launcher: (Q(w) [N, K] in w's dtype, codes uint8 [N, K] or None, in-range mask bool [N, K] or None).

    One pass over W; runs for any device Triton can launch on (CUDA, or CPU when interpreting).
    """
    check_triton("fake_quant_forward_triton")
    check_float("w", w)
    _, g, r = _group_rows(w, scale, zero_point, group)
    w, scale, zero_point = w.contiguous(), scale.contiguous(), zero_point.contiguous()
    q = torch.empty_like(w)
    codes = torch.empty(w.shape, dtype=torch.uint8, device=w.device) if return_codes else None
    mask = torch.empty(w.shape, dtype=torch.bool, device=w.device) if return_mask else None
    block_r, block_g = _blocks(r, g)
    launch(_fake_quant_fwd_kernel)[(triton.cdiv(r, block_r),)](
        w, scale, zero_point, q, q if codes is None else codes, q if mask is None else mask.view(torch.int8),
        r, g, QMAX=qmax(bits), FLOOR=SCALE_FLOOR, STORE_CODES=return_codes, STORE_MASK=return_mask,
        BLOCK_R=block_r, BLOCK_G=block_g,
    )
    return q, codes, mask


# ----------------------------------------------------------------------------- backward kernel
@triton.jit
def _fake_quant_bwd_kernel(
    gq_ptr, w_ptr, s_ptr, z_ptr, b_ptr, gw_ptr, gs_ptr,  # gq, w, gw: [R, G]; s, z, b, gs: [R]
    R, G, stable_amp, gamma,
    QMAX: tl.constexpr, FLOOR: tl.constexpr, RULE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr,
):
    rows, row_ok, s, z = group_rows(s_ptr, z_ptr, R, FLOOR, BLOCK_R)
    gq_ty = gq_ptr.dtype.element_ty
    if RULE == 1:  # B_g, rounded to grad_q's dtype as the reference multiplies in it
        b = tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(gq_ty).to(tl.float32)[:, None]
    acc = tl.full([BLOCK_R], 0.0, tl.float32)
    for g0 in range(0, G, BLOCK_G):
        ok, offs = group_tile(rows, row_ok, g0, G, BLOCK_G)
        w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        gq = tl.load(gq_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        u = tl.div_rn(w, s)  # w/s
        v = u + z
        inside = (v >= 0.0) & (v <= QMAX)
        if RULE == 0:
            g = gq
        elif RULE == 1:
            g = gq * b
        else:  # cos(pi·(u + round u)) = cos(pi·(u - round u)): reduced argument, same value
            S = stable_amp * tl.cos(3.141592653589793 * (u - round_half_even(u)))
            g = gq * tl.div_rn(1.0 - S, 1.0 + S).to(gq_ty).to(tl.float32)
        g = tl.where(inside, g, 0.0).to(gq_ty)
        tl.store(gw_ptr + offs, g.to(gw_ptr.dtype.element_ty), mask=ok)
        c = tl.minimum(tl.maximum(round_half_even(v), 0.0), QMAX)
        dq_ds = (c - z) - tl.where(inside, v - z, 0.0)
        acc += row_sum(tl.where(ok, gq * dq_ds, 0.0))
    tl.store(gs_ptr + rows, (acc * gamma).to(gs_ptr.dtype.element_ty), mask=row_ok)


def fake_quant_backward_triton(
    grad_q: Tensor, w: Tensor, scale: Tensor, zero_point: Tensor, jac: Tensor,
    bits: int, group: int, rule: str, amplitude: float,
) -> tuple[Tensor, Tensor]:
    """Launcher: (dL/dw [N, K] in w's dtype, dL/ds [N, K/G] in scale's dtype) in one pass over W."""
    check_triton("fake_quant_backward_triton")
    if rule not in RULE_IDS:
        raise ValueError(f"unknown backward rule {rule!r}; use one of {tuple(RULE_IDS)}")
    for name, t in (("grad_q", grad_q), ("w", w), ("scale", scale), ("jac", jac)):
        check_float(name, t)
    if grad_q.shape != w.shape:
        raise ValueError(f"grad_q {tuple(grad_q.shape)} must have W's shape {tuple(w.shape)}")
    _, g, r = _group_rows(w, scale, zero_point, group)
    if rule == "jacquant" and jac.shape != scale.shape:
        raise ValueError(f"jac (B) {tuple(jac.shape)} must have the scale's shape {tuple(scale.shape)}")
    grad_q, w, scale, zero_point, jac = (t.contiguous() for t in (grad_q, w, scale, zero_point, jac))
    grad_w = torch.empty_like(w)
    grad_s = torch.empty_like(scale)
    block_r, block_g = _blocks(r, g)
    launch(_fake_quant_bwd_kernel)[(triton.cdiv(r, block_r),)](
        grad_q, w, scale, zero_point, jac, grad_w, grad_s,
        r, g, math.sqrt(2.0) * math.pi * amplitude, 1.0 / math.sqrt(g * qmax(bits)),
        QMAX=qmax(bits), FLOOR=SCALE_FLOOR, RULE=RULE_IDS[rule], BLOCK_R=block_r, BLOCK_G=block_g,
    )
    return grad_w, grad_s
