"""The quantized matmul as ``torch.library`` custom ops.

``jacquant::qlinear(x, W, s, z, B, bias, bits, group, rule, A)`` computes

    y = x · Q(W)^T + bias                                   (forward quantizer unchanged)

and its backward

    dL/dx = dL/dy · Q(W)
    dL/dq = (dL/dy)^T · x                                   [N, K]
    dL/dW, dL/ds = surrogate rule and LSQ (``jacquant::fake_quant_backward``)

``jacquant::qlinear_affine(x, W, s, m, B, bias, bits, group, rule, A)`` is the same for the scale-and-min
grid of GGUF's Q4_1 and Q2_K, Q(W) = s·clamp(round((W - m)/s), 0, 2^b - 1) + m, with dL/dm beside dL/ds
(``jacquant::fake_quant_affine_backward``, :func:`jacquant.primitives.surrogates.backward_affine`).

Q(W) is recomputed in the backward rather than saved, so no extra weight-sized tensor lives
between forward and backward.

The ops are ``torch.library.triton_op``: in eager they run like any custom op, and under
``torch.compile`` the compiler traces into their bodies (the Triton launches through
``wrap_triton`` on CUDA, the torch reference elsewhere), so on CPU inductor fuses the fake
quantization into the surrounding graph instead of calling an opaque kernel. Under autocast the op quantizes in the weight's dtype (fp32 master
weights) and multiplies in the activation's dtype. The per-device work lives in
:mod:`jacquant.kernels` (Triton on CUDA, the torch reference elsewhere).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from jacquant import kernels


@torch.library.triton_op("jacquant::fake_quant", mutates_args=())
def fake_quant(w: Tensor, scale: Tensor, zero_point: Tensor, bits: int, group: int) -> Tensor:
    """Q(W) for W [N, K] with per-group scale and integer zero point [N, K/G] (no autograd)."""
    return kernels.fake_quant_forward(w, scale, zero_point, bits, group)



@torch.library.triton_op("jacquant::fake_quant_backward", mutates_args=())
def fake_quant_backward(
    grad_q: Tensor, w: Tensor, scale: Tensor, zero_point: Tensor, jac: Tensor,
    bits: int, group: int, rule: str, amplitude: float,
) -> tuple[Tensor, Tensor]:
    """(dL/dW [N, K], dL/ds [N, K/G]) from dL/dq by the surrogate ``rule`` and LSQ."""
    return kernels.fake_quant_backward(grad_q, w, scale, zero_point, jac, bits, group, rule, amplitude)



@torch.library.triton_op("jacquant::qlinear", mutates_args=())
def qlinear(
    x: Tensor, weight: Tensor, scale: Tensor, zero_point: Tensor, jac: Tensor, bias: Optional[Tensor],
    bits: int, group: int, rule: str, amplitude: float,
) -> Tensor:
    """y = x · Q(W)^T + bias, x [..., K], W [N, K] -> y [..., N] in x's dtype."""
    q = kernels.fake_quant_forward(weight, scale, zero_point, bits, group).to(x.dtype)
    return F.linear(x, q, None if bias is None else bias.to(x.dtype))



def _setup_context(ctx, inputs, output):
    x, weight, scale, zero_point, jac, bias, bits, group, rule, amplitude = inputs
    ctx.save_for_backward(x, weight, scale, zero_point, jac)
    ctx.args = (bits, group, rule, amplitude)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad_y):
    x, weight, scale, zero_point, jac = ctx.saved_tensors
    bits, group, rule, amplitude = ctx.args
    n, k = weight.shape
    grad_x = grad_w = grad_s = grad_b = None
    if ctx.needs_input_grad[0]:
        # Q(W) lives only for this product (one weight-sized temporary, freed before dL/dW)
        grad_x = grad_y @ torch.ops.jacquant.fake_quant(weight, scale, zero_point, bits, group).to(grad_y.dtype)
    gy = grad_y.reshape(-1, n)  # [M, N]
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        # under autocast x may be fp32 (after a LayerNorm) while dL/dy is bf16: multiply in dL/dy's dtype
        grad_q = (gy.t() @ x.reshape(-1, k).to(gy.dtype)).to(weight.dtype)  # [N, K]
        grad_w, grad_s = torch.ops.jacquant.fake_quant_backward(
            grad_q, weight, scale, zero_point, jac, bits, group, rule, amplitude)
        grad_w = grad_w if ctx.needs_input_grad[1] else None
        grad_s = grad_s if ctx.needs_input_grad[2] else None
    if ctx.bias_dtype is not None and ctx.needs_input_grad[5]:
        grad_b = gy.sum(0).to(ctx.bias_dtype)
    return grad_x, grad_w, grad_s, None, None, grad_b, None, None, None, None


qlinear.register_autograd(_backward, setup_context=_setup_context)



# ----------------------------------------------------------------------------- scale-and-min grid (GGUF Q4_1, Q2_K)
@torch.library.triton_op("jacquant::fake_quant_affine", mutates_args=())
def fake_quant_affine(w: Tensor, scale: Tensor, minimum: Tensor, bits: int, group: int) -> Tensor:
    """Q(W) = s·c + m for W [N, K] with per-group scale and float min [N, K/G] (no autograd)."""
    return kernels.affine_forward(w, scale, minimum, bits, group)


@torch.library.triton_op("jacquant::fake_quant_affine_backward", mutates_args=())
def fake_quant_affine_backward(
    grad_q: Tensor, w: Tensor, scale: Tensor, minimum: Tensor, jac: Tensor,
    bits: int, group: int, rule: str, amplitude: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dL/dW [N, K], dL/ds [N, K/G], dL/dm [N, K/G]) from dL/dq by the surrogate ``rule``, LSQ and LSQ+."""
    return kernels.affine_backward(grad_q, w, scale, minimum, jac, bits, group, rule, amplitude)


@torch.library.triton_op("jacquant::qlinear_affine", mutates_args=())
def qlinear_affine(
    x: Tensor, weight: Tensor, scale: Tensor, minimum: Tensor, jac: Tensor, bias: Optional[Tensor],
    bits: int, group: int, rule: str, amplitude: float,
) -> Tensor:
    """y = x · Q(W)^T + bias with Q(W) = s·c + m, x [..., K], W [N, K] -> y [..., N] in x's dtype."""
    q = kernels.affine_forward(weight, scale, minimum, bits, group).to(x.dtype)
    return F.linear(x, q, None if bias is None else bias.to(x.dtype))


def _affine_backward(ctx, grad_y):
    x, weight, scale, minimum, jac = ctx.saved_tensors
    bits, group, rule, amplitude = ctx.args
    n, k = weight.shape
    grad_x = grad_w = grad_s = grad_m = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = grad_y @ torch.ops.jacquant.fake_quant_affine(weight, scale, minimum, bits, group).to(grad_y.dtype)
    gy = grad_y.reshape(-1, n)  # [M, N]
    if any(ctx.needs_input_grad[1:4]):
        grad_q = (gy.t() @ x.reshape(-1, k).to(gy.dtype)).to(weight.dtype)  # [N, K]
        grad_w, grad_s, grad_m = torch.ops.jacquant.fake_quant_affine_backward(
            grad_q, weight, scale, minimum, jac, bits, group, rule, amplitude)
        grad_w = grad_w if ctx.needs_input_grad[1] else None
        grad_s = grad_s if ctx.needs_input_grad[2] else None
        grad_m = grad_m if ctx.needs_input_grad[3] else None
    if ctx.bias_dtype is not None and ctx.needs_input_grad[5]:
        grad_b = gy.sum(0).to(ctx.bias_dtype)
    return grad_x, grad_w, grad_s, grad_m, None, grad_b, None, None, None, None


qlinear_affine.register_autograd(_affine_backward, setup_context=_setup_context)
