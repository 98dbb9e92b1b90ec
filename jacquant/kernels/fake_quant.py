"""Fake quantization forward and surrogate backward: dispatch between Triton and the reference.

The torch reference is the pure math of :mod:`jacquant.quantizer` and :mod:`jacquant.surrogates`;
a Triton implementation, where present, runs for CUDA tensors and is tested against it.
"""
from __future__ import annotations

from torch import Tensor

from .. import quantizer, surrogates


def fake_quant_forward(w: Tensor, scale: Tensor, zero_point: Tensor, bits: int, group: int) -> Tensor:
    """Q(w) = s · (clamp(round(w/s + z), 0, 2^b - 1) - z), [N, K] in w's dtype."""
    return quantizer.fake_quantize(w, scale, zero_point, bits, group)


def fake_quant_backward(
    grad_q: Tensor, w: Tensor, scale: Tensor, zero_point: Tensor, jac: Tensor,
    bits: int, group: int, rule: str, amplitude: float,
) -> tuple[Tensor, Tensor]:
    """(dL/dw, dL/ds): the surrogate weight gradient f·m·dL/dq and LSQ's scale gradient."""
    grad_w = surrogates.weight_grad(grad_q, w, scale, zero_point, jac, bits, group, rule, amplitude)
    grad_s = surrogates.lsq_scale_grad(grad_q, w, scale, zero_point, bits, group)
    return grad_w, grad_s
