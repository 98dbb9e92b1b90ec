"""GGUF block bytes: written from trained codes and parameters, read back in torch, held by a converted model.

Each row of a weight W [N, K] is K/block blocks, little-endian, as llama.cpp lays them out (gguf-py's
``gguf.quants`` dequantizes them; the tests compare every byte's meaning against it):

    q4_0  18 bytes / 32 weights:  d fp16 | 16 bytes of nibbles
    q4_1  20 bytes / 32 weights:  d fp16 | m fp16 | 16 bytes of nibbles
          nibbles: byte j holds code j (low 4 bits) and code j + 16 (high 4 bits)
    q2_k  84 bytes / 256 weights: 16 bytes sc | mn << 4 (sub-block j) | 64 bytes of 2-bit codes | d fp16 | dmin fp16
          codes: weight h·128 + l·32 + p (h in 0..1, l in 0..3, p in 0..31) sits in byte h·32 + p, bits 2l..2l+1

Packing only moves bits: the codes and fp16 values are the trained model's, never re-quantized.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from jacquant.primitives.formats import FORMATS

TYPE_SIZE = {"q4_0": 18, "q4_1": 20, "q2_k": 84}


def row_bytes(fmt: str, k: int) -> int:
    """Bytes of one row of K weights in ``fmt``."""
    spec = FORMATS[fmt]
    if k % spec.block:
        raise ValueError(f"a row of {k} weights is not a multiple of {fmt}'s block of {spec.block}")
    return k // spec.block * TYPE_SIZE[fmt]


def _fp16_bytes(x: Tensor) -> Tensor:
    """fp16 values (held in fp32) as little-endian bytes, [..., 2] uint8; refuses values fp16 does not hold."""
    h = x.to(torch.float16)
    if not torch.equal(h.float(), x.float()):
        raise ValueError("a block scale is not an fp16 value; it must come from the format's quantizer")
    return h.contiguous().view(torch.uint8).reshape(*x.shape, 2)


def _nibbles(codes: Tensor) -> Tensor:
    """[..., 32] codes in 0..15 -> [..., 16] bytes: byte j = code j | code (j + 16) << 4."""
    return codes[..., :16] | (codes[..., 16:] << 4)


def pack_q4_0(codes: Tensor, d: Tensor) -> Tensor:
    """Q4_0 rows: codes uint8 [N, K], d [N, K/32] (fp16 values) -> uint8 [N, K/32·18]."""
    n, k = codes.shape
    blocks = torch.cat([_fp16_bytes(d), _nibbles(codes.reshape(n, k // 32, 32))], dim=-1)
    return blocks.reshape(n, -1)


def pack_q4_1(codes: Tensor, d: Tensor, m: Tensor) -> Tensor:
    """Q4_1 rows: codes uint8 [N, K], d, m [N, K/32] (fp16 values) -> uint8 [N, K/32·20]."""
    n, k = codes.shape
    blocks = torch.cat([_fp16_bytes(d), _fp16_bytes(m), _nibbles(codes.reshape(n, k // 32, 32))], dim=-1)
    return blocks.reshape(n, -1)


def pack_q2_k(codes: Tensor, d: Tensor, dmin: Tensor, sc: Tensor, mn: Tensor) -> Tensor:
    """Q2_K rows: codes uint8 [N, K] in 0..3, d, dmin [N, K/256] (fp16 values), sc, mn uint8 [N, K/16] in
    0..15 -> uint8 [N, K/256·84]."""
    n, k = codes.shape
    nb = k // 256
    scales = (sc | (mn << 4)).reshape(n, nb, 16)
    c = codes.reshape(n, nb, 2, 4, 32)  # [.., h, l, p]
    qs = c[..., 0, :] | (c[..., 1, :] << 2) | (c[..., 2, :] << 4) | (c[..., 3, :] << 6)  # [n, nb, 2, 32]
    blocks = torch.cat([scales, qs.reshape(n, nb, 64), _fp16_bytes(d), _fp16_bytes(dmin)], dim=-1)
    return blocks.reshape(n, -1)


def _fp16_at(blocks: Tensor, offset: int) -> Tensor:
    """The fp16 at byte ``offset`` of each block [..., type_size] as fp32 [...]."""
    return blocks[..., offset:offset + 2].contiguous().view(torch.float16).squeeze(-1).float()


def _unnibble(qs: Tensor) -> Tensor:
    """[..., 16] bytes -> [..., 32] codes (inverse of :func:`_nibbles`)."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def dequantize(blocks: Tensor, fmt: str, k: int) -> Tensor:
    """W [N, K] fp32 from GGUF rows uint8 [N, row_bytes]: llama.cpp's arithmetic, in fp32,

        q4_0  d·(q - 8)        q4_1  d·q + m        q2_k  (d·sc)·q - dmin·mn
    """
    n = blocks.shape[0]
    spec = FORMATS[fmt]
    b = blocks.reshape(n, k // spec.block, TYPE_SIZE[fmt])
    if fmt == "q4_0":
        q = _unnibble(b[..., 2:]).float()
        w = _fp16_at(b, 0).unsqueeze(-1) * (q - 8)
    elif fmt == "q4_1":
        q = _unnibble(b[..., 4:]).float()
        w = _fp16_at(b, 0).unsqueeze(-1) * q + _fp16_at(b, 2).unsqueeze(-1)
    elif fmt == "q2_k":
        sc, mn = (b[..., :16] & 0x0F).float(), (b[..., :16] >> 4).float()  # [n, nb, 16]
        dl = _fp16_at(b, 80).unsqueeze(-1) * sc
        ml = _fp16_at(b, 82).unsqueeze(-1) * mn
        qs = b[..., 16:80].reshape(n, -1, 2, 1, 32)
        shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 1, 4, 1)
        q = ((qs >> shifts) & 3).reshape(n, -1, 16, 16).float()  # [n, nb, sub-block, 16]
        w = dl.unsqueeze(-1) * q - ml.unsqueeze(-1)
    else:
        raise ValueError(f"unknown GGUF format {fmt!r}; jacquant writes {tuple(TYPE_SIZE)}")
    return w.reshape(n, k)


class GGUFWeight(nn.Module):
    """The integer form of a weight trained on a GGUF scale-and-min format (``q4_1``, ``q2_k``), registered on
    its owner as ``<weight>_packed`` by :func:`jacquant.convert`: the file's own block bytes.

    Calling it computes ``x · dequantize(blocks)^T + bias`` (:func:`dequantize`: llama.cpp's values, equal
    to the fake-quant forward bit for bit). :func:`jacquant.export.export_gguf` writes ``blocks`` as they are.
    """

    def __init__(self, blocks: Tensor, *, format: str, in_features: int, name: str, weight_attr: str,
                 transposed: bool):
        super().__init__()
        spec = FORMATS[format]
        self.format, self.bits, self.group, self.storage_bits = format, spec.bits, spec.group, spec.bits
        self.name, self.weight_attr, self.transposed = name, weight_attr, transposed
        self._in_features = in_features
        self.register_buffer("blocks", blocks)  # uint8 [N, row_bytes]

    @classmethod
    @torch.no_grad()
    def from_quantizer(cls, q, weight: Tensor) -> "GGUFWeight":
        """Pack an :class:`~jacquant.qat.quantizer.AffineQuantizer`'s codes and parameters."""
        codes = q.codes(weight)
        p = q.gguf_params()
        if q.format == "q4_1":
            blocks = pack_q4_1(codes, p["d"], p["m"])
        else:
            blocks = pack_q2_k(codes, p["d"], p["dmin"], p["sc"], p["mn"])
        return cls(blocks.contiguous(), format=q.format, in_features=codes.shape[1], name=q.name,
                   weight_attr=q.weight_attr, transposed=q.transposed)

    @property
    def out_features(self) -> int:
        return self.blocks.shape[0]

    @property
    def in_features(self) -> int:
        return self._in_features

    def dequantized(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """W [N, K] as llama.cpp computes it."""
        return dequantize(self.blocks, self.format, self.in_features).to(dtype)

    def forward(self, x: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        return F.linear(x, self.dequantized(x.dtype), None if bias is None else bias.to(x.dtype))

    def layer_info(self) -> dict:
        """What a checkpoint's metadata records for this layer."""
        return {"bits": self.bits, "group": self.group, "storage_bits": self.storage_bits, "out_features":
                self.out_features, "in_features": self.in_features, "weight_attr": self.weight_attr,
                "transposed": self.transposed, "format": self.format}

    def extra_repr(self) -> str:
        return f"{self.weight_attr}: [{self.out_features}, {self.in_features}], format={self.format}"
