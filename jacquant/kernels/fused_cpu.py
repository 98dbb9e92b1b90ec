"""Fused CPU kernels for eager callers: the torch path compiled alone by inductor, once per shape family.

An eager model calls the quantized op 7 times per decoder layer; each call's fake quantization is a
chain of elementwise torch ops, each a full pass over the weight. Compiled alone
(``torch.compile(fullgraph=True)`` of :mod:`jacquant.kernels.fake_quant_torch`), inductor fuses the
chain into one loop over W: the forward reads W and writes Q(W), the backward reads dL/dq and W and
writes dL/dW and dL/ds, so the user's model gets fused kernels without being compiled itself.
The first call per function compiles (~10-20 s on CPU, inductor's start-up included); the second
weight shape compiles a dynamic-shape version that serves every later shape.

Results: the forward Q(W) and dL/dW are equal to the reference bit for bit (same IEEE operations,
inductor does not contract or reassociate them), except StableQAT's dL/dW, whose Fourier factor takes a
cos that inductor vectorises (an ulp from libm's); dL/ds, a sum over each group, adds in inductor's
vectorised order and may differ from the eager sum in the last bits (a few ulp of the group sum).

Used only where it can be: plain CPU tensors (no tensor subclass, no dispatch mode active, not
inside torch.compile or export, which trace the torch path themselves). ``JACQUANT_FUSED_CPU=0``
turns it off; if inductor cannot compile here (no C++ compiler), it warns once and falls back to the
torch path for the rest of the process.
"""
from __future__ import annotations

import os
import warnings
from typing import Callable, Optional

import torch
from torch import Tensor

from jacquant.kernels import fake_quant_torch

_state: dict[str, object] = {"failed": False}
_compiled: dict[str, Callable] = {}
_PLAIN = (torch.Tensor, torch.nn.Parameter)  # no other subclass (fake, functional, DTensor...)


def enabled() -> bool:
    """The fused path is on (``JACQUANT_FUSED_CPU`` unset or not "0") and has not failed to compile."""
    return os.environ.get("JACQUANT_FUSED_CPU", "1") != "0" and not _state["failed"]


def usable(*tensors: Optional[Tensor]) -> bool:
    """True when the fused kernels may run for these tensors (see the module docstring)."""
    if not enabled() or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    if torch.utils._python_dispatch._get_current_dispatch_mode() is not None:
        return False
    return all(t is None or (type(t) in _PLAIN and t.device.type == "cpu") for t in tensors)


def _get(name: str, fn: Callable) -> Callable:
    if name not in _compiled:
        _compiled[name] = torch.compile(fn, fullgraph=True)
    return _compiled[name]


# Each (bits, group, rule, dtype) is one specialisation (and a new shape one more, until shapes go dynamic):
# a process that quantizes with many settings (a test session, a sweep) needs more than dynamo's default 8.
RECOMPILE_LIMIT = 64


def run(name: str, fn: Callable, *args):
    """``fn(*args)`` compiled alone by inductor (once per ``name`` and shape family), or ``fn`` itself where that
    fails: how a pure torch function elsewhere (a research rule's hook, say) gets a fused CPU kernel. Call it only
    where :func:`usable` is true for the tensors."""
    return _run(name, fn, fn, *args)


def _run(name: str, fn: Callable, fallback: Callable, *args):
    try:
        # detached: plain tensors, so a Parameter and a Tensor share one compiled kernel
        with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            return _get(name, fn)(*(a.detach() if isinstance(a, Tensor) else a for a in args))
    except Exception as err:  # no compiler, an inductor bug: the torch path computes the same values
        if "RecompileLimit" in type(err).__name__:  # this setting only: the others keep their kernels
            return fallback(*args)
        _state["failed"] = True
        warnings.warn(f"jacquant: the fused CPU fake-quant kernels could not be compiled ({type(err).__name__}: "
                      f"{str(err).splitlines()[0] if str(err) else ''}); using the torch path (set "
                      "JACQUANT_FUSED_CPU=0 to silence this)", RuntimeWarning, stacklevel=3)
        return fallback(*args)


def fake_quant_forward(w: Tensor, scale: Tensor, zero_point: Tensor, bits: int, group: int) -> Tensor:
    """Q(w) = s · (clamp(round(w/s + z), 0, 2^b - 1) - z), fused; equal to the reference bit for bit."""
    return _run("forward", fake_quant_torch.fake_quant_forward, fake_quant_torch.fake_quant_forward,
                w, scale, zero_point, bits, group)


def fake_quant_backward(
    grad_q: Tensor, w: Tensor, scale: Tensor, zero_point: Tensor, jac: Tensor,
    bits: int, group: int, rule: str, amplitude: float,
) -> tuple[Tensor, Tensor]:
    """(dL/dw, dL/ds) fused: dL/dw = f·m·dL/dq bit for bit (StableQAT's f to an ulp); dL/ds = γ·sum_g dL/dq·dq/ds
    to a few ulp."""
    return _run("backward", fake_quant_torch.fake_quant_backward, fake_quant_torch.fake_quant_backward,
                grad_q, w, scale, zero_point, jac, bits, group, rule, amplitude)


def affine_forward(w: Tensor, scale: Tensor, minimum: Tensor, bits: int, group: int) -> Tensor:
    """Q(w) = s · clamp(round((w - m)/s), 0, 2^b - 1) + m, fused; equal to the reference bit for bit."""
    return _run("affine_forward", fake_quant_torch.affine_forward, fake_quant_torch.affine_forward,
                w, scale, minimum, bits, group)


def affine_backward(
    grad_q: Tensor, w: Tensor, scale: Tensor, minimum: Tensor, jac: Tensor,
    bits: int, group: int, rule: str, amplitude: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dL/dw, dL/ds, dL/dm) of the scale-and-min grid, fused (dL/dw bit for bit, the group sums to a few ulp)."""
    return _run("affine_backward", fake_quant_torch.affine_backward, fake_quant_torch.affine_backward,
                grad_q, w, scale, minimum, jac, bits, group, rule, amplitude)
