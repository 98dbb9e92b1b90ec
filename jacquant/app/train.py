"""The one training loop every track, phase and benchmark shares.

:func:`train` runs AdamW with a cosine schedule over the given batches (a :class:`~jacquant.app.recipes.Recipe`
says which rule; JacQuant's B scales the update and ``jacquant.step`` refreshes it after each step; a research
rule's hook acts around the optimizer), and logs ``jacquant.stats`` to a JSONL file when asked. Every method
gets the same batches, steps and learning-rate rule.
"""
from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import replace
from typing import Callable, Iterable, Optional

import torch
import torch.nn as nn
from torch import Tensor
from tqdm import tqdm

from jacquant.api import transform
from jacquant.app.recipes import Recipe
from jacquant.config import QuantConfig
from jacquant.qat.checkpoint import load_checkpoint, save_checkpoint
from jacquant.qat.guard import guard
from jacquant.qat.optim import scale_updates_by_b
from jacquant.qat.quantizer import sites
from jacquant.qat.refresh import attach
from jacquant.qat.refresh import step as refresh_step
from jacquant.qat.stats import StatsLogger


def quantize_copy(model: nn.Module, recipe: Recipe, config: QuantConfig, example_inputs=None) -> nn.Module:
    """A deep copy of the full-precision ``model`` transformed with ``recipe``'s rule."""
    q = copy.deepcopy(model)
    cfg = replace(config, method=recipe.rule if recipe.train else "ste")
    return transform(q, config=cfg, example_inputs=example_inputs)


def make_optimizer(model: nn.Module, recipe: Recipe, lr: float, scale_lr: Optional[float] = None
                   ) -> torch.optim.Optimizer:
    """AdamW over every trainable parameter (weights, biases, norms at ``lr``; the quantizers' parameters at
    ``scale_lr``, None: ``lr``), no weight decay; for JacQuant, hooked by
    :func:`jacquant.qat.optim.scale_updates_by_b` (B on the update)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if scale_lr is not None:
        quant = {id(p) for s in sites(model) for p in s.quantizer.parameters()}
        groups = [{"params": [p for p in params if id(p) not in quant], "lr": lr},
                  {"params": [p for p in params if id(p) in quant], "lr": scale_lr}]
        params = [g for g in groups if g["params"]]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    if recipe.is_jacquant:
        scale_updates_by_b(opt, model)
    return opt


def cosine(steps: int, warmup: int = 0) -> Callable[[int], float]:
    """lr multiplier: linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``steps``."""
    def f(t: int) -> float:
        if t < warmup:
            return (t + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (t - warmup) / max(steps - warmup, 1)))
    return f


class TimedSchedule:
    """The lr schedule of a run given in wall seconds: at the fraction f of ``seconds`` spent, each group's lr is its
    peak × (f·20 for f < 1/20, else ½(1 + cos π(f − 1/20)/(19/20))); :meth:`set_lr` returns False once f ≥ 1."""

    WARMUP = 0.05
    clock = staticmethod(time.perf_counter)  # seconds; tests swap in a clock of their own

    def __init__(self, optimizer: torch.optim.Optimizer, seconds: float):
        if not seconds >= 0:
            raise ValueError(f"seconds={seconds} must be >= 0")
        self.opt, self.seconds = optimizer, seconds
        self.peaks = [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups]  # before any scheduler scaled them
        self.t0 = self.clock()

    def elapsed(self) -> float:
        return self.clock() - self.t0

    def resume(self, elapsed: float) -> None:
        self.t0 = self.clock() - elapsed

    def set_lr(self) -> bool:
        f = self.elapsed() / self.seconds if self.seconds > 0 else 1.0
        if f >= 1.0:
            return False
        w = self.WARMUP
        mult = f / w if f < w else 0.5 * (1 + math.cos(math.pi * (f - w) / (1 - w)))
        for g, peak in zip(self.opt.param_groups, self.peaks):
            g["lr"] = peak * mult
        return True


def train(
    model: nn.Module,
    recipe: Recipe,
    batches: Iterable,
    loss_fn: Callable[[nn.Module, object], Tensor],
    steps: int,
    lr: float,
    *,
    seed: int = 0,
    warmup: int = 0,
    calib_batch: object = None,
    log_path: Optional[str] = None,
    log_every: int = 10,
    desc: str = "",
    checkpoint: Optional[str] = None,
    checkpoint_every: int = 0,
    scale_lr: Optional[float] = None,
    seconds: Optional[float] = None,
) -> list[float]:
    """Train ``model`` (already transformed, or full precision for pretraining) for ``steps`` steps.

    Each step: ``loss_fn(model, batch).backward()``, optimizer step through
    ``jacquant.guard(..., on_nonfinite="raise")`` for a transformed model (a NaN/Inf in any
    parameter, scale, B or gradient raises :class:`jacquant.NonFiniteError` naming it), cosine lr,
    and for JacQuant
    ``jacquant.step(model)`` (B refreshed at step 0 and every K steps; the data-driven Probe measures
    ``loss_fn(model, calib_batch)``). Returns the training-loss curve. With ``log_path``, per-site
    diagnostics (:func:`jacquant.stats`) are written to that JSONL file (replaced) every ``log_every`` steps.

    With ``checkpoint`` (a file path) and ``checkpoint_every = N > 0``, the model (weights, scales, B, refresh
    clock and RNG), optimizer, lr schedule, loss curve, a research rule's state
    and global RNG are saved there every N steps
    (:func:`jacquant.save_checkpoint`, written to a temporary file and renamed, so a kill never leaves a torn
    file). When that file exists at the start, training resumes from it: the first ``step`` batches are
    drawn and skipped, so a resumed run equals an uninterrupted one bit for bit on the CPU.

    ``scale_lr``: the quantizers' parameters' peak lr (None: ``lr``). ``seconds``: train for that wall time (at most
    ``steps``): the schedule then runs on the fraction f of the time spent (linear warm-up over f < 1/20, cosine to 0
    at f = 1); a resumed run continues the clock from the checkpoint.
    """
    if recipe.is_jacquant:
        attach(model, recipe.refresh_config(seed))
    opt = make_optimizer(model, recipe, lr, scale_lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine(steps, warmup))
    timed = TimedSchedule(opt, seconds) if seconds is not None else None
    # a NaN/Inf anywhere stops the run, naming the tensor (the guard needs quantized sites: not for fp pretraining)
    checked = guard(opt, model, on_nonfinite="raise") if any(True for _ in sites(model)) else opt
    probe_loss = None
    if recipe.needs_calib:
        if calib_batch is None:
            raise ValueError(f"recipe {recipe.name!r} measures a calibration loss: it needs a calib_batch")
        probe_loss = lambda: loss_fn(model, calib_batch)  # noqa: E731
    hooks = None
    if recipe.train and recipe.hook is not None:
        hooks = recipe.hook(opt, model)
        model.jacquant_hook_history = hooks.history  # a research rule's fits over the run
    curve: list[float] = []
    start = 0
    if checkpoint and os.path.exists(checkpoint):
        extra = load_checkpoint(checkpoint, model, opt)
        sched.load_state_dict(extra["schedule"])
        start, curve = int(extra["step"]), list(extra["curve"])
        if timed is not None:
            timed.resume(float(extra.get("elapsed", 0.0)))
        if hooks is not None:
            hooks.load_state_dict(extra["hook"])
    elif log_path and os.path.exists(log_path):
        os.remove(log_path)  # a fresh log per run: StatsLogger appends
    logger = StatsLogger(log_path) if log_path else None
    model.train()
    bar = tqdm(batches, total=steps if timed is None else None, initial=0, desc=desc or recipe.name, leave=False)
    for t, batch in enumerate(bar):
        if t >= steps:
            break
        if t < start:
            continue  # resumed: this batch was trained on before the checkpoint
        if timed is not None and not timed.set_lr():
            break  # the wall time is spent
        loss = loss_fn(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        checked.step()
        sched.step()
        if recipe.is_jacquant:
            refresh_step(model, probe_loss)
        curve.append(loss.item())
        if logger is not None and (t % log_every == 0 or t == steps - 1):
            logger.log(model, t, curve[-1])
        bar.set_postfix(loss=f"{curve[-1]:.3f}")
        if checkpoint and checkpoint_every > 0 and ((t + 1) % checkpoint_every == 0 or t + 1 == steps):
            tmp = checkpoint + ".tmp"
            extra = {"step": t + 1, "curve": curve, "schedule": sched.state_dict()}
            if timed is not None:
                extra["elapsed"] = timed.elapsed()
            if hooks is not None:
                extra["hook"] = hooks.state_dict()
            save_checkpoint(tmp, model, opt, extra=extra)
            os.replace(tmp, checkpoint)
    return curve
