"""What every Triton kernel here shares: the optional import, dispatch tests and exact rounding.

Triton is optional: without it ``HAS_TRITON`` is False, ``triton.jit`` is the identity and every
dispatcher takes its torch reference. Kernels are compiled for CUDA tensors; with
``TRITON_INTERPRET=1`` set before this package is imported they run on CPU tensors too (that is
how the tests compare them to their references without a GPU).
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    HAS_TRITON = False

    class _Stub:
        """Stands in for ``triton`` and ``triton.language`` so the kernel modules still import."""

        constexpr = object

        @staticmethod
        def jit(fn=None, **_):
            return fn if fn is not None else (lambda f: f)

    triton = tl = _Stub()

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def launch(kernel):
    """``kernel`` wrapped for ``torch.library.wrap_triton``: launches as usual in eager, and lets
    ``torch.compile`` trace the launch inside a ``torch.library.triton_op`` (see :mod:`jacquant.qat.ops`)."""
    return torch.library.wrap_triton(kernel) if HAS_TRITON else kernel


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(*tensors: Tensor) -> bool:
    """Dispatch test: Triton is importable, every tensor is on CUDA and the floats are fp16/bf16/fp32."""
    return HAS_TRITON and all(t.is_cuda for t in tensors) and all(
        t.dtype in FLOAT_DTYPES for t in tensors if t.is_floating_point())


def check_triton(name: str) -> None:
    """Raise a clear error when a Triton launcher is called without Triton."""
    if not HAS_TRITON:
        raise RuntimeError(f"{name} needs triton; install it, or call the dispatcher, which falls back to torch")


def check_float(name: str, t: Tensor) -> None:
    """Kernels load fp16, bf16 or fp32 and compute in fp32."""
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; the Triton kernels take {FLOAT_DTYPES} (use the reference)")


@triton.jit
def round_half_even(v):
    """torch.round in fp32: round to nearest, ties to even, exact for every finite v.

    f = floor(v), d = v - f (exact); up when d > 1/2, or d = 1/2 and f is odd.
    """
    f = tl.floor(v)
    d = v - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
    up = (d > 0.5) | ((d == 0.5) & odd)
    return tl.where(up, f + 1.0, f)


@triton.jit
def group_rows(s_ptr, z_ptr, R, FLOOR: tl.constexpr, BLOCK_R: tl.constexpr):
    """This program's tile of group rows: (rows, row_ok, s, z), with the scale floored at FLOOR and
    s, z as fp32 [BLOCK_R, 1] columns that broadcast over the group."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    s = tl.maximum(tl.load(s_ptr + rows, mask=row_ok, other=1.0).to(tl.float32), FLOOR)[:, None]
    z = tl.load(z_ptr + rows, mask=row_ok, other=0).to(tl.float32)[:, None]
    return rows, row_ok, s, z


@triton.jit
def group_tile(rows, row_ok, g0, G, BLOCK_G: tl.constexpr):
    """(in-bounds mask, flat int64 offsets) of the [BLOCK_R, BLOCK_G] tile at column g0 of [R, G]."""
    cols = g0 + tl.arange(0, BLOCK_G)
    ok = row_ok[:, None] & (cols < G)[None, :]
    offs = rows.to(tl.int64)[:, None] * G + cols[None, :]
    return ok, offs


# triton's own sum combine: the interpreter reduces with it by np.sum, any other combine element by element
_sum_combine = tl.standard._sum_combine if HAS_TRITON else None


@triton.jit
def row_sum(x):
    """Sum of a [BLOCK_R, BLOCK_G] tile along axis 1.

    ``tl.reduce`` rather than ``tl.sum``: ``tl.sum`` and ``tl.zeros`` are themselves
    ``@triton.jit`` functions, compiled or interpreted as TRITON_INTERPRET was when triton was
    first imported, so they fail in a test process that switches to the interpreter later.
    """
    return tl.reduce(x, 1, _sum_combine)
