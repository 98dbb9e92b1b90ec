"""The block-wise phase: each decoder block in turn trained to reproduce the full-precision block's outputs.

For block i of a transformed LM, with cached activations of the calibration windows:

    target     Y_i = fp_block_i(X_i^fp)                    (what the fp model computes there)
    input      X_i = X_i^q (outputs of the already trained quantized blocks 0..i−1; ``inputs="quantized"``)
               or X_i^fp (the fp model's own activations; ``inputs="fp"``)
    loss       L_i = mean ‖q_block_i(X_i) − Y_i‖²        (``loss="channel"``: each channel divided by the
                                                           target's mean square over the calibration windows)

What trains: AutoRound's rounding search on jacquant's latent weights. Sign descent in units of the bin,

    w ← clip(w − η_t·s₀·sign(∂L/∂w), w₀ − s₀/2, w₀ + s₀/2)        s ← s − η^s_t·|s₀|·sign(∂L/∂s)

(s₀ the start's scale of the weight's group: a weight may round to the neighbouring code of its start, never
further); norms and biases stay; η_t = η·(1 − f), linear to 0 over the block's run. EfficientQAT's Block-AP
(AdamW on every block parameter) measured worse at the same windows (docs/pipeline.md) and was removed. The recipe's
backward rule gives ∂L/∂w (STE's; StableQAT's surrogate, whose positive per-element factor sign descent does not
see; JacQuant's B on the update, which scales each group's step, refreshed as end to end). Then X_{i+1}^q = q_block_i(X_i^q) and X_{i+1}^fp = Y_i: with quantized inputs a block
also learns to undo the error of the blocks before it (as EfficientQAT's Block-AP, OmniQuant, AutoRound).

**The best state is kept.** The block's loss over *all* calibration windows is measured at the start, after each
of ``checks`` equal parts of its run and at the end; the block keeps its lowest-loss state, so no block ends worse
than it started on the calibration set (AutoRound keeps its best iteration the same way, by the batch loss).

Time: ``steps`` iterations per block, or ``seconds`` for the whole phase: each block then gets the time left
over the blocks left, less what the block before spent beyond its allowance (the forwards that fill the caches,
its last check, the checkpoint); its schedule runs on the fraction f of that time spent (``steps``, when also
given, caps it), and a block left no time keeps its start. Memory: three activation caches of [windows, T, d]
float32 (:class:`ActivationCache`, memory-mapped past their budget). Resumable: after each block the model's state and the block index are saved in
``checkpoint_dir``; a rerun replays the finished blocks forward to rebuild the caches, then continues.
"""
from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
import torch.nn as nn
from torch import Tensor
from tqdm import tqdm

from jacquant.app.recipes import Recipe
from jacquant.calibration.blocks import (
    ActivationCache,
    BlockInputs,
    capture_inputs,
    find_blocks,
)
from jacquant.calibration.gptq import default_run
from jacquant.qat.guard import guard
from jacquant.qat.optim import SignSGD, expand_b, scale_updates_by_b
from jacquant.qat.quantizer import sites
from jacquant.qat.refresh import attach, detach
from jacquant.qat.refresh import step as refresh_step

INPUTS = ("quantized", "fp")
LOSSES = ("mse", "channel")


@dataclass(frozen=True)
class BlockwiseConfig:
    """Settings of the block-wise phase (module docstring).

    Attributes:
        steps: iterations per block (0 with no ``seconds`` skips the phase; with ``seconds``, the most per block).
        lr: bins a weight moves per step at the start (η).
        scale_lr: the quantizer parameters' step, a fraction of their start value per step at the start.
        batch: calibration windows per step.
        inputs: "quantized" (X^q, the trained blocks' outputs) or "fp" (the fp model's activations).
        loss: "mse", mean (ŷ − y)², or "channel", mean (ŷ − y)²/P_c with P_c the mean square of the target's
            channel c over the calibration windows (a residual stream's few huge channels no longer dominate).
        checks: how many times during a block's run its loss over all calibration windows is measured to keep the
            best state (besides the start).
        seconds: wall seconds for the whole phase (None: ``steps`` per block).
        max_cache_bytes: RAM budget of each activation cache; past it the cache is a file.
    """

    steps: int = 0
    lr: float = 5e-3
    scale_lr: float = 5e-3
    batch: int = 8
    inputs: str = "quantized"
    loss: str = "mse"
    checks: int = 4
    seconds: Optional[float] = None
    max_cache_bytes: int = 2 << 30

    def __post_init__(self) -> None:
        if self.inputs not in INPUTS:
            raise ValueError(f"BlockwiseConfig.inputs={self.inputs!r} is not one of {INPUTS}")
        if self.loss not in LOSSES:
            raise ValueError(f"BlockwiseConfig.loss={self.loss!r} is not one of {LOSSES}")
        if self.steps < 0 or self.batch < 1 or not self.lr > 0 or not self.scale_lr >= 0 or self.checks < 1:
            raise ValueError(f"BlockwiseConfig: steps {self.steps} must be >= 0, batch {self.batch} >= 1, lr {self.lr} "
                             f"> 0, scale_lr {self.scale_lr} >= 0, checks {self.checks} >= 1")
        if self.seconds is not None and not self.seconds >= 0:
            raise ValueError(f"BlockwiseConfig.seconds={self.seconds} must be >= 0 (None: steps per block)")

    @property
    def active(self) -> bool:
        """Whether the phase runs at all."""
        return self.steps > 0 if self.seconds is None else self.seconds > 0


def _out(y) -> Tensor:
    return y[0] if isinstance(y, tuple) else y


@torch.no_grad()
def _forward(block: nn.Module, src: BlockInputs, dst: ActivationCache) -> None:
    """dst ← block(src), chunk by chunk (dst may be src's own cache)."""
    n, b = len(src.hidden), src.batch
    for r in range(0, n, b):
        x = src.hidden.read(slice(r, min(r + b, n)))
        dst.write(r, _out(block(x, **src.kwargs_for(x.shape[0]))))


def _copy(cache: ActivationCache, max_bytes: int) -> ActivationCache:
    out = ActivationCache(*cache.shape, max_bytes=max_bytes)
    for r in range(0, len(cache), 64):
        out.write(r, cache.read(slice(r, min(r + 64, len(cache)))))
    return out


def _channel_power(cache: ActivationCache) -> Tensor:
    """Mean square of each channel over every cached token, [d] (floored so that a dead channel stays finite)."""
    total = torch.zeros(cache.shape[-1], dtype=torch.float64)
    for r in range(0, len(cache), 64):
        total += cache.read(slice(r, min(r + 64, len(cache)))).double().square().sum((0, 1))
    power = (total / (cache.shape[0] * cache.shape[1])).float()
    return power.clamp_min(power.mean() * 1e-6)


def _index_batches(n: int, batch: int, seed: int):
    """Endless index batches: shuffled epochs over the n windows, ``batch`` at a time."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=g)
    pos = 0
    while True:
        if pos + batch > n:
            order, pos = torch.randperm(n, generator=g), 0
        yield order[pos:pos + batch].sort().values
        pos += batch


def linear_decay(f: float) -> float:
    """AutoRound's schedule: 1 − f at the fraction f ∈ [0, 1] of the run."""
    return max(0.0, 1.0 - f)


class BlockOptimizer:
    """The optimizer of one block's run (module docstring): sign descent in bins, JacQuant's B on the update, the
    bin bounds.

    ``step()`` is the guarded optimizer step (a NaN/Inf raises, naming the tensor), then the bounds; ``set_fraction(f)``
    sets every group's lr to its peak × (1 − f); ``close()`` removes the hooks and restores which parameters train.
    """

    def __init__(self, block: nn.Module, recipe: Recipe, config: BlockwiseConfig):
        self.block, self.config = block, config
        self._trainable = {id(p): p.requires_grad for p in block.parameters()}
        found = list(sites(block))
        weights = [s.weight for s in found]
        quant = [p for s in found for p in s.quantizer.parameters() if p.requires_grad]
        for p in block.parameters():
            p.requires_grad_(False)
        self._bounds: list[tuple[Tensor, Tensor, Tensor]] = []
        units = []
        for s in found:
            q = s.quantizer
            bin_ = expand_b(q.effective_scale().detach().float(), q.group, q.transposed).to(s.weight.dtype)
            w0 = s.weight.detach()
            self._bounds.append((s.weight, w0 - bin_ / 2, w0 + bin_ / 2))
            units.append(bin_)
        for p in weights:
            p.requires_grad_(True)
        groups = [{"params": weights, "units": units, "lr": config.lr}]
        if quant and config.scale_lr > 0:
            for p in quant:
                p.requires_grad_(True)
            groups.append({"params": quant, "units": [p.detach().abs().clone() for p in quant], "lr": config.scale_lr})
        self.opt = SignSGD(groups)
        self._scaling = scale_updates_by_b(self.opt, block) if recipe.is_jacquant else None
        self._checked = guard(self.opt, block, on_nonfinite="raise")
        self._peaks = [g["lr"] for g in self.opt.param_groups]

    def set_fraction(self, f: float) -> None:
        for g, peak in zip(self.opt.param_groups, self._peaks):
            g["lr"] = peak * linear_decay(f)

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def step(self) -> None:
        self._checked.step()
        for w, low, high in self._bounds:
            torch.clamp(w, low, high, out=w)

    def close(self) -> None:
        if self._scaling is not None:
            self._scaling.remove()
        for p in self.block.parameters():
            p.requires_grad_(self._trainable.get(id(p), p.requires_grad))


@dataclass
class BlockRun:
    """What one block's run did: its batch-loss curve, its calibration loss at the start and the kept state's, the
    steps taken, its wall seconds."""

    curve: list
    start_loss: float
    best_loss: float
    steps: int
    seconds: float

    def as_dict(self) -> dict:
        return {"start_loss": self.start_loss, "best_loss": self.best_loss, "steps": self.steps,
                "seconds": self.seconds}


def train_block(block: nn.Module, recipe: Recipe, config: BlockwiseConfig, loss_fn: Callable[[nn.Module, Tensor], Tensor],
                full_loss: Callable[[nn.Module], float], batches: Iterable[Tensor], *, seed: int = 0,
                seconds: Optional[float] = None, desc: str = "") -> BlockRun:
    """Train one block in place (module docstring): up to ``config.steps`` iterations (0: no cap) or until
    ``seconds`` have passed, the lr schedule at the fraction f = max(t/steps, elapsed/seconds) of the run; the
    state with the lowest ``full_loss`` (at the start, at each of ``config.checks`` parts, at the end) is kept."""
    if config.steps == 0 and seconds is None:
        raise ValueError("a block's run needs steps or seconds")
    t0 = time.perf_counter()
    if recipe.is_jacquant:
        attach(block, recipe.refresh_config(seed))
    opt = BlockOptimizer(block, recipe, config)

    def fraction(t: int) -> float:
        f = t / config.steps if config.steps else 0.0
        if seconds is None:
            return f
        return max(f, (time.perf_counter() - t0) / seconds) if seconds > 0 else 1.0  # no time: no step

    def snapshot() -> dict:
        return {k: v.detach().clone() for k, v in block.state_dict().items()}

    block.train()
    start_loss = best_loss = full_loss(block)
    best = snapshot()
    curve: list[float] = []
    next_check, checked_last = 1, True
    bar = tqdm(total=config.steps or None, desc=desc, leave=False)
    try:
        for idx in batches:
            f = fraction(len(curve))
            if f >= 1.0:
                break
            opt.set_fraction(f)
            loss = loss_fn(block, idx)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if recipe.is_jacquant:
                refresh_step(block)
            curve.append(loss.item())
            checked_last = False
            bar.update(1)
            bar.set_postfix(loss=f"{curve[-1]:.4g}")
            if fraction(len(curve)) >= next_check / config.checks:
                current = full_loss(block)
                next_check = math.floor(fraction(len(curve)) * config.checks) + 1
                checked_last = True
                if current < best_loss:
                    best_loss, best = current, snapshot()
        if not checked_last:
            current = full_loss(block)
            if current < best_loss:
                best_loss, best = current, snapshot()
    finally:
        bar.close()
        opt.close()
    block.load_state_dict(best)
    detach(block)  # the refresh clock belongs to one block's run
    return BlockRun(curve, start_loss, best_loss, len(curve), time.perf_counter() - t0)


def train_blocks(model: nn.Module, fp_model: nn.Module, recipe: Recipe, windows: Tensor, config: BlockwiseConfig, *,
                 seed: int = 0, checkpoint_dir: Optional[str] = None, progress: bool = True) -> dict:
    """Train ``model``'s decoder blocks one by one against ``fp_model``'s (module docstring) on ``windows``
    [n, T] of token ids. In place; returns ``{"curves": [per block, the batch loss per step], "blocks": [per block,
    BlockRun.as_dict()], "seconds"}``."""
    if recipe.hook is not None:
        warnings.warn(f"{recipe.name}: a research rule's hook rescales gradient magnitudes, which sign descent does not "
                      "see; the block-wise rounding search runs as STE for it (its hook acts end to end)", stacklevel=2)
    path, blocks = find_blocks(model)
    fp_blocks = fp_model.get_submodule(path)
    if len(fp_blocks) != len(blocks):
        raise ValueError(f"the fp model has {len(fp_blocks)} blocks at `{path}`, the quantized one {len(blocks)}")
    if config.batch > len(windows):
        raise ValueError(f"BlockwiseConfig.batch={config.batch} is more than the {len(windows)} calibration windows")
    t_phase = time.perf_counter()
    state_path = os.path.join(checkpoint_dir, "blockwise.pt") if checkpoint_dir else None
    start, curves, runs, spent = 0, [], [], 0.0
    if state_path and os.path.exists(state_path):
        saved = torch.load(state_path, map_location="cpu", weights_only=True)
        model.load_state_dict(saved["model"], strict=True)
        start, curves, runs, spent = int(saved["block"]), list(saved["curves"]), list(saved["blocks"]), saved["seconds"]
        if start == len(blocks):
            return {"curves": curves, "blocks": runs, "seconds": spent}  # finished before: nothing to rebuild
    fp_model.eval()
    with torch.no_grad():
        xq = capture_inputs(model, blocks[0], list(windows.split(config.batch)), default_run, config.max_cache_bytes)
    xf = BlockInputs(_copy(xq.hidden, config.max_cache_bytes), xq.kwargs, xq.batch)
    y = ActivationCache(*xq.hidden.shape, max_bytes=config.max_cache_bytes)
    n = len(windows)
    try:
        for i in range(start):  # resumed: replay the finished blocks to rebuild the caches
            _forward(fp_blocks[i], xf, xf.hidden)
            _forward(blocks[i], xq, xq.hidden)
        overhead = 0.0  # the last block's seconds beyond its training allowance (forwards, last check, checkpoint)
        for i in tqdm(range(start, len(blocks)), desc=f"block-wise {recipe.name}", disable=not progress, initial=start,
                      total=len(blocks)):
            t_block = time.perf_counter()
            _forward(fp_blocks[i], xf, y)
            src = xq if config.inputs == "quantized" else xf
            weight = 1.0 / _channel_power(y) if config.loss == "channel" else None

            def loss_fn(block: nn.Module, idx, src=src, weight=weight) -> Tensor:
                x = src.hidden.read(idx)
                err = (_out(block(x, **src.kwargs_for(x.shape[0]))) - y.read(idx)).square()
                return (err if weight is None else err * weight).mean()

            @torch.no_grad()
            def full_loss(block: nn.Module) -> float:
                was = block.training
                block.eval()
                total = sum(float(loss_fn(block, slice(r, min(r + src.batch, n)))) * (min(r + src.batch, n) - r)
                            for r in range(0, n, src.batch))
                block.train(was)
                return total / n

            seconds = None
            if config.seconds is not None:  # the time left, less each block's own forwards, over the blocks left
                left = config.seconds - spent - (time.perf_counter() - t_phase)
                seconds = max(0.0, left / (len(blocks) - i) - overhead)
            run = train_block(blocks[i], recipe, config, loss_fn, full_loss,
                              _index_batches(n, config.batch, seed * 1000 + i), seed=seed, seconds=seconds,
                              desc=f"block {i + 1}/{len(blocks)} {recipe.name}")
            curves.append(run.curve)
            runs.append(run.as_dict())
            blocks[i].eval()
            _forward(blocks[i], xq, xq.hidden)
            xf.hidden, y = y, xf.hidden  # X^fp_{i+1} = Y_i; the old X^fp buffer holds the next targets
            if state_path:
                tmp = state_path + ".tmp"
                torch.save({"model": model.state_dict(), "block": i + 1, "curves": curves, "blocks": runs,
                            "seconds": spent + time.perf_counter() - t_phase}, tmp)
                os.replace(tmp, state_path)
            overhead = time.perf_counter() - t_block - (seconds or 0.0)
    finally:
        for c in (xq.hidden, xf.hidden, y):
            c.close()
    return {"curves": curves, "blocks": runs, "seconds": spent + time.perf_counter() - t_phase}
