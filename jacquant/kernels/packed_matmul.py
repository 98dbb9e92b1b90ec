"""y = x · dequant(packed W)^T + bias from MatMulNBits-packed codes: dispatch and torch reference.

W [N, K] is stored as packed codes [N, K/G, G·b/8] (see :mod:`jacquant.packing`), scales [N, K/G]
and integer zero points [N, K/G] (uint8, unpacked); W = s · (c - z).
"""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor

from ..packing import unpack_codes
from ..quantizer import dequantize


def packed_linear_reference(
    x: Tensor, packed: Tensor, scale: Tensor, zero_point: Tensor, bias: Optional[Tensor], bits: int, group: int
) -> Tensor:
    """Torch reference: unpack, dequantize to x's dtype, F.linear. x [..., K] -> [..., N]."""
    w = dequantize(unpack_codes(packed, bits, group), scale, zero_point, group, dtype=x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def packed_linear(
    x: Tensor, packed: Tensor, scale: Tensor, zero_point: Tensor, bias: Optional[Tensor], bits: int, group: int
) -> Tensor:
    """Dispatch: a Triton kernel for CUDA tensors where one exists, the reference elsewhere."""
    return packed_linear_reference(x, packed, scale, zero_point, bias, bits, group)
