"""Packing integer codes into bytes, in onnxruntime's MatMulNBits layout (one layout for all uses).

Codes c [N, K] (uint8, values < 2^b) with blocks of G along K pack to

    packed [N, K/G, G·b/8] uint8,  element j of a byte's 8/b elements in bits [j·b, (j+1)·b)

i.e. low bits first, as ``com.microsoft::MatMulNBits`` reads its input B. Zero points [N, K/G]
pack along the block axis the same way to [N, ceil(K/G · b/8)]. Bits 2, 4, 8 only.
"""
from __future__ import annotations

import torch
from torch import Tensor

PACKABLE_BITS = (2, 4, 8)


def _check(bits: int) -> int:
    if bits not in PACKABLE_BITS:
        raise ValueError(f"bits={bits} cannot be packed in the MatMulNBits layout; use one of {PACKABLE_BITS}")
    return 8 // bits


def pack_rows(values: Tensor, bits: int) -> Tensor:
    """Pack the last axis of a uint8 tensor [..., L] into bytes [..., ceil(L·b/8)], low bits first.

    Values must lie in [0, 2^b - 1] (a larger one would spill into its neighbours' bits): ValueError.
    """
    per = _check(bits)
    if values.numel() and (int(values.min()) < 0 or int(values.max()) >= 1 << bits):
        raise ValueError(f"values in [{int(values.min())}, {int(values.max())}] do not fit {bits} bits "
                         f"([0, {(1 << bits) - 1}]); packing them would corrupt their neighbours")
    *lead, length = values.shape
    pad = (-length) % per
    v = torch.nn.functional.pad(values.to(torch.uint8), (0, pad)).reshape(*lead, (length + pad) // per, per).to(torch.int32)
    shifts = torch.arange(per, device=values.device, dtype=torch.int32) * bits
    return (v << shifts).sum(-1).to(torch.uint8)


def unpack_rows(packed: Tensor, bits: int, length: int) -> Tensor:
    """Inverse of :func:`pack_rows`: bytes [..., B] -> uint8 values [..., length]."""
    per = _check(bits)
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * bits
    v = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return v.reshape(*packed.shape[:-1], packed.shape[-1] * per)[..., :length].to(torch.uint8)  # sizes explicit: 0-size dims


def pack_codes(codes: Tensor, bits: int, group: int) -> Tensor:
    """Codes [N, K] -> MatMulNBits B [N, K/G, G·b/8]."""
    n, k = codes.shape
    if k % group or (group * bits) % 8:
        raise ValueError(f"K={k} must be a multiple of group={group}, and group·bits a multiple of 8")
    return pack_rows(codes.reshape(n, k // group, group), bits)


def unpack_codes(packed: Tensor, bits: int, group: int) -> Tensor:
    """MatMulNBits B [N, K/G, G·b/8] -> codes [N, K]."""
    n, blocks, _ = packed.shape
    return unpack_rows(packed, bits, group).reshape(n, blocks * group)


def pack_zero_points(zero_point: Tensor, bits: int) -> Tensor:
    """Zero points [N, K/G] -> MatMulNBits zero_points [N, ceil(K/G·b/8)]."""
    return pack_rows(zero_point, bits)


def unpack_zero_points(packed: Tensor, bits: int, blocks: int) -> Tensor:
    """Inverse of :func:`pack_zero_points`."""
    return unpack_rows(packed, bits, blocks)
