"""Numerical faults in QAT: find non-finite values cheaply, and an optimizer guard that skips or raises.

A step is *faulty* when any tensor it reads or writes holds NaN or ±Inf: a quantized site's weight W,
scale s, Jacobian surrogate B (``jac``), or the gradients dL/dW, dL/ds, or any other parameter the
optimizer updates and its gradient. The check is one fused reduction over all of them,

    bad_t = not isfinite(max_i |x_{t,i}|)        (the ∞-norm is NaN or Inf iff x_t has a NaN or an Inf)

by ``torch._foreach_norm(ord=inf)`` and one host sync per step; only when a flag is set are the
tensors walked again to name the first offender and count its bad entries.

:func:`guard` wraps an optimizer so that ``step()`` checks before stepping::

    opt = jacquant.guard(torch.optim.AdamW(model.parameters(), lr=1e-4), model, on_nonfinite="skip_step")
    scale_updates_by_b(opt, model)            # optional, as without the guard
    for batch in loader:
        loss = model(**batch).loss
        loss.backward()
        if opt.step():                        # False: the step was skipped, nothing changed
            jacquant.step(model)              # the refresh clock counts real steps only
            scheduler.step()                  # a scheduler built on opt.optimizer
        opt.zero_grad()

After a real step every quantized scale is clamped to :data:`jacquant.primitives.grid.SCALE_FLOOR` (an
LSQ step can drive s to 0 or below; the forward already uses max(s, floor), the clamp makes the
stored value agree).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from jacquant.primitives.grid import SCALE_FLOOR
from jacquant.qat.quantizer import sites

ACTIONS = ("raise", "skip_step")


class NonFiniteError(FloatingPointError):
    """A tensor of a training step holds NaN or Inf; ``site`` and ``tensor`` name it."""

    def __init__(self, message: str, site: str, tensor: str):
        super().__init__(message)
        self.site, self.tensor = site, tensor


class NonFiniteWarning(RuntimeWarning):
    """A step was skipped because a tensor held NaN or Inf (``on_nonfinite="skip_step"``)."""


@dataclass(frozen=True)
class Fault:
    """The first non-finite tensor: its site (or parameter name), which tensor, how many bad entries."""

    site: str
    tensor: str
    count: int

    def __str__(self) -> str:
        if self.count == 0:  # seen on another rank only
            return f"{self.site} holds non-finite values (NaN/Inf)"
        return f"`{self.site}`: {self.tensor} has {self.count} non-finite values (NaN/Inf)"


NamedTensor = tuple[str, str, Tensor]  # (site or parameter name, tensor name, tensor)


def _local(t: Tensor) -> Tensor:
    """A DTensor's local shard (each rank checks what it holds), any other tensor as is."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def nonfinite_flags(tensors: Sequence[Tensor]) -> Tensor:
    """bool [T]: flag_t = some entry of tensors[t] is NaN or ±Inf; one fused ∞-norm, no host sync.

    Empty tensors are finite. The flags live on the first tensor's device.
    """
    if not tensors:
        return torch.zeros(0, dtype=torch.bool)
    # the ∞-norm of an empty tensor is undefined: it stands in as a finite 0
    norms = torch._foreach_norm([t.detach() if t.numel() else t.new_zeros(1) for t in tensors], ord=math.inf)
    device = norms[0].device
    return ~torch.isfinite(torch.stack([n.to(device, torch.float32) for n in norms]))


def first_nonfinite(named: Sequence[NamedTensor]) -> Optional[Fault]:
    """The first (site, tensor) in ``named`` holding NaN/Inf, or None when all are finite.

    One fused check (:func:`nonfinite_flags`) and one host sync; the offender's entries are counted
    only when there is one.
    """
    if not named:
        return None
    flags = nonfinite_flags([t for _, _, t in named])
    if not bool(flags.any()):
        return None
    i = int(flags.nonzero()[0])
    site, tensor, t = named[i]
    return Fault(site, tensor, int((~torch.isfinite(t.detach())).sum()))


def step_tensors(model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> list[NamedTensor]:
    """What a training step reads and writes, in module order, each tensor once.

    Per quantized site: ``weight``, ``scale``, ``B``, ``weight.grad``, ``scale.grad`` (grads when
    present); then every other parameter of ``optimizer`` (named by ``model.named_parameters``) and
    its grad. DTensors contribute their local shard.
    """
    out: list[NamedTensor] = []
    seen: set[int] = set()

    def add(site: str, tensor: str, t: Optional[Tensor]) -> None:
        if t is not None and id(t) not in seen:
            seen.add(id(t))
            out.append((site, tensor, _local(t)))

    for s in sites(model):
        q = s.quantizer
        add(s.name, "weight", s.weight)
        add(s.name, "scale", q.scale)
        add(s.name, "B", q.jac)
        add(s.name, "weight.grad", s.weight.grad)
        add(s.name, "scale.grad", q.scale.grad)
    if optimizer is not None:
        names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
        for p in _params(optimizer):
            if id(p) not in seen:
                name = names.get(id(p), "<optimizer parameter>")
                add(name, "parameter", p)
                add(name, "grad", p.grad)
    return out


def _params(optimizer: torch.optim.Optimizer) -> Iterator[Tensor]:
    for group in optimizer.param_groups:
        yield from group["params"]


def _any_rank(bad: bool, device: torch.device) -> bool:
    """Whether ``bad`` holds on some rank (one all-reduce when a process group is initialised)."""
    if not (dist.is_available() and dist.is_initialized()):
        return bad
    flag = torch.tensor([int(bad)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


@torch.no_grad()
def clamp_scales(model: nn.Module) -> None:
    """s ← max(s, SCALE_FLOOR) for every quantized scale, in place (one foreach op)."""
    scales = [_local(s.quantizer.scale) for s in sites(model)]
    if scales:
        torch._foreach_clamp_min_(scales, SCALE_FLOOR)


class GuardedOptimizer:
    """An optimizer whose ``step()`` first checks the step's tensors for NaN/Inf (see :func:`guard`).

    Attributes: ``optimizer`` (the wrapped one; schedulers and ``scale_updates_by_b`` may use it or
    this wrapper), ``steps`` (steps taken), ``skipped`` (steps skipped), ``last_fault`` (the most
    recent :class:`Fault` or None). Every other attribute (``param_groups``, ``state``,
    ``state_dict``, hooks, ...) is the wrapped optimizer's.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, on_nonfinite: str = "skip_step",
                 max_consecutive_skips: int = 20):
        if on_nonfinite not in ACTIONS:
            raise ValueError(f"guard: on_nonfinite={on_nonfinite!r} is not one of {ACTIONS}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"guard expects a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(max_consecutive_skips, bool) or not isinstance(max_consecutive_skips, int) \
                or max_consecutive_skips < 1:
            raise ValueError(f"guard: max_consecutive_skips={max_consecutive_skips!r} must be a positive int")
        if not any(True for _ in sites(model)):
            raise ValueError(f"{type(model).__name__} has no quantized site; call jacquant.transform(model, ...) "
                             "before jacquant.guard")
        self.optimizer, self.model, self.on_nonfinite = optimizer, model, on_nonfinite
        self.max_consecutive_skips = max_consecutive_skips
        self.steps, self.skipped, self._in_a_row = 0, 0, 0
        self.last_fault: Optional[Fault] = None

    def __getattr__(self, name: str):
        if name == "optimizer":  # not yet set (copy, unpickling)
            raise AttributeError(name)
        return getattr(self.optimizer, name)

    def check(self) -> Optional[Fault]:
        """The first non-finite tensor of this step (agreed across ranks), or None."""
        named = step_tensors(self.model, self.optimizer)
        fault = first_nonfinite(named)
        device = named[0][2].device if named else torch.device("cpu")
        if _any_rank(fault is not None, device) and fault is None:
            fault = Fault("another rank", "", 0)
        return fault

    def step(self) -> bool:
        """Check, then step and clamp the scales; returns True when the step was taken.

        On a fault: ``"raise"`` raises :class:`NonFiniteError` (nothing changed, gradients kept for
        inspection); ``"skip_step"`` drops the gradients (``zero_grad``), leaves parameters, scales,
        B and optimizer state as they were, counts the skip, warns (:class:`NonFiniteWarning`) and
        returns False; after ``max_consecutive_skips`` skips in a row it raises (the model's own
        state is then non-finite, or every batch is: skipping cannot recover).
        """
        fault = self.check()
        if fault is None:
            self.optimizer.step()
            clamp_scales(self.model)
            self.steps += 1
            self._in_a_row = 0
            return True
        self.last_fault = fault
        where = f"step {self.steps + self.skipped}: {fault}"
        if self.on_nonfinite == "raise":
            raise NonFiniteError(f"{where}; the step was not taken (on_nonfinite='raise')", fault.site, fault.tensor)
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped += 1
        self._in_a_row += 1
        if self._in_a_row >= self.max_consecutive_skips:
            raise NonFiniteError(f"{where}; {self._in_a_row} steps in a row skipped (max_consecutive_skips); the "
                                 "model's state or every batch is non-finite: resume from a checkpoint",
                                 fault.site, fault.tensor)
        warnings.warn(f"jacquant.guard: skipped {where}", NonFiniteWarning, stacklevel=2)
        return False

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def __repr__(self) -> str:
        return (f"GuardedOptimizer({type(self.optimizer).__name__}, on_nonfinite={self.on_nonfinite!r}, "
                f"steps={self.steps}, skipped={self.skipped})")


def guard(optimizer: torch.optim.Optimizer, model: nn.Module, on_nonfinite: str = "skip_step", *,
          max_consecutive_skips: int = 20) -> GuardedOptimizer:
    """Wrap ``optimizer`` so that each ``step()`` refuses non-finite tensors of ``model``'s quantized sites.

    Before each step: one fused finite check (:func:`first_nonfinite`) over every quantized site's
    W, s, B, dL/dW, dL/ds and every other parameter of ``optimizer`` and its gradient. With a
    process group initialised the verdict is all-reduced, so every rank skips or steps together.
    ``on_nonfinite``: ``"raise"`` (:class:`NonFiniteError` naming the site and tensor) or
    ``"skip_step"`` (no update at all, gradients dropped, a warning naming the site; ``step()``
    returns False). After a taken step, s ← max(s, SCALE_FLOOR). See the module docstring for the
    training loop (call ``jacquant.step(model)`` only when ``step()`` returned True).
    """
    return GuardedOptimizer(optimizer, model, on_nonfinite, max_consecutive_skips)


def check_finite(model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
    """Raise :class:`NonFiniteError` naming the first non-finite site tensor (e.g. once per refresh)."""
    fault = first_nonfinite(step_tensors(model, optimizer))
    if fault is not None:
        raise NonFiniteError(str(fault), fault.site, fault.tensor)

