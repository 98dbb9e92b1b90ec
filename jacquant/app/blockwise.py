"""The block-wise phase: each decoder block in turn trained to reproduce the full-precision block's outputs.

For block i of a transformed LM, with cached activations of the calibration windows:

    target     Y_i = fp_block_i(X_i^fp)                    (what the fp model computes there)
    input      X_i = X_i^q (outputs of the already trained quantized blocks 0..i−1; ``inputs="quantized"``)
               or X_i^fp (the fp model's own activations; ``inputs="fp"``)
    loss       mean ‖q_block_i(X_i) − Y_i‖²                (weights, scales and norms of the block)

trained by :func:`jacquant.app.train.train` with the recipe's own backward rule (STE, StableQAT, JacQuant,
the per-element hooks), so the methods compare here as they do end to end; then X_{i+1}^q =
q_block_i(X_i^q) and X_{i+1}^fp = Y_i. With quantized inputs a block also learns to undo the error
of the blocks before it (as EfficientQAT's Block-AP and OmniQuant do).

Memory: three activation caches of [windows, T, d] float32 (:class:`jacquant.calibration.blocks.ActivationCache`,
memory-mapped past their budget). Resumable: after each block the model's state and the block index
are saved in ``checkpoint_dir`` (the block in progress has its own training checkpoint there), and a
rerun replays the finished blocks forward to rebuild the caches, then continues.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor
from tqdm import tqdm

from jacquant.app.recipes import Recipe
from jacquant.app.train import train
from jacquant.calibration.blocks import (
    ActivationCache,
    BlockInputs,
    capture_inputs,
    find_blocks,
)
from jacquant.calibration.gptq import default_run
from jacquant.qat.refresh import detach

INPUTS = ("quantized", "fp")
LOSSES = ("mse", "channel")


@dataclass(frozen=True)
class BlockwiseConfig:
    """Settings of the block-wise phase.

    Attributes:
        steps: optimizer steps per block (0 skips the phase).
        lr: peak learning rate (cosine decay over each block's steps).
        batch: calibration windows per step.
        inputs: "quantized" (X^q, the trained blocks' outputs) or "fp" (the fp model's activations).
        loss: "mse", mean (ŷ − y)², or "channel", mean (ŷ − y)²/P_c with P_c the mean square of the target's
            channel c over the calibration windows (a residual stream's few huge channels no longer dominate).
        max_cache_bytes: RAM budget of each activation cache; past it the cache is a file.
    """

    steps: int = 0
    lr: float = 1e-4
    batch: int = 4
    inputs: str = "quantized"
    loss: str = "mse"
    max_cache_bytes: int = 2 << 30

    def __post_init__(self) -> None:
        if self.inputs not in INPUTS:
            raise ValueError(f"BlockwiseConfig.inputs={self.inputs!r} is not one of {INPUTS}")
        if self.loss not in LOSSES:
            raise ValueError(f"BlockwiseConfig.loss={self.loss!r} is not one of {LOSSES}")
        if self.steps < 0 or self.batch < 1 or not self.lr > 0:
            raise ValueError(f"BlockwiseConfig: steps {self.steps} must be >= 0, batch {self.batch} >= 1, lr {self.lr} > 0")


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


def _index_batches(n: int, batch: int, steps: int, seed: int):
    """``steps`` index batches: shuffled epochs over the n windows, ``batch`` at a time."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=g)
    pos = 0
    for _ in range(steps):
        if pos + batch > n:
            order, pos = torch.randperm(n, generator=g), 0
        yield order[pos:pos + batch].sort().values
        pos += batch


def train_blocks(model: nn.Module, fp_model: nn.Module, recipe: Recipe, windows: Tensor, config: BlockwiseConfig, *,
                 seed: int = 0, checkpoint_dir: Optional[str] = None, progress: bool = True) -> dict:
    """Train ``model``'s decoder blocks one by one against ``fp_model``'s (module docstring) on ``windows``
    [n, T] of token ids. In place; returns ``{"curves": [per block, the loss per step]}``."""
    path, blocks = find_blocks(model)
    fp_blocks = fp_model.get_submodule(path)
    if len(fp_blocks) != len(blocks):
        raise ValueError(f"the fp model has {len(fp_blocks)} blocks at `{path}`, the quantized one {len(blocks)}")
    if config.batch > len(windows):
        raise ValueError(f"BlockwiseConfig.batch={config.batch} is more than the {len(windows)} calibration windows")
    state_path = os.path.join(checkpoint_dir, "blockwise.pt") if checkpoint_dir else None
    start, curves = 0, []
    if state_path and os.path.exists(state_path):
        saved = torch.load(state_path, map_location="cpu", weights_only=True)
        model.load_state_dict(saved["model"], strict=True)
        start, curves = int(saved["block"]), list(saved["curves"])
        if start == len(blocks):
            return {"curves": curves}  # finished before: nothing to rebuild
    fp_model.eval()
    with torch.no_grad():
        xq = capture_inputs(model, blocks[0], list(windows.split(config.batch)), default_run, config.max_cache_bytes)
    xf = BlockInputs(_copy(xq.hidden, config.max_cache_bytes), xq.kwargs, xq.batch)
    y = ActivationCache(*xq.hidden.shape, max_bytes=config.max_cache_bytes)
    try:
        for i in range(start):  # resumed: replay the finished blocks to rebuild the caches
            _forward(fp_blocks[i], xf, xf.hidden)
            _forward(blocks[i], xq, xq.hidden)
        for i in tqdm(range(start, len(blocks)), desc=f"block-wise {recipe.name}", disable=not progress, initial=start,
                      total=len(blocks)):
            _forward(fp_blocks[i], xf, y)
            src = xq if config.inputs == "quantized" else xf
            weight = 1.0 / _channel_power(y) if config.loss == "channel" else None

            def loss_fn(block: nn.Module, idx: Tensor, src=src, weight=weight) -> Tensor:
                err = (_out(block(src.hidden.read(idx), **src.kwargs_for(len(idx)))) - y.read(idx)).square()
                return (err if weight is None else err * weight).mean()

            block_ckpt = os.path.join(checkpoint_dir, f"block{i}.pt") if checkpoint_dir else None
            batches = _index_batches(len(windows), config.batch, config.steps, seed * 1000 + i)
            calib = torch.arange(min(config.batch, len(windows)))
            curves.append(train(blocks[i], recipe, batches, loss_fn, config.steps, config.lr, seed=seed,
                                warmup=max(1, config.steps // 20), calib_batch=calib,
                                desc=f"block {i + 1}/{len(blocks)} {recipe.name}",
                                checkpoint=block_ckpt, checkpoint_every=max(1, config.steps // 2) if block_ckpt else 0))
            detach(blocks[i])  # the refresh clock belongs to one block's run
            blocks[i].eval()
            _forward(blocks[i], xq, xq.hidden)
            xf.hidden, y = y, xf.hidden  # X^fp_{i+1} = Y_i; the old X^fp buffer holds the next targets
            if state_path:
                tmp = state_path + ".tmp"
                torch.save({"model": model.state_dict(), "block": i + 1, "curves": curves}, tmp)
                os.replace(tmp, state_path)
                if block_ckpt and os.path.exists(block_ckpt):
                    os.remove(block_ckpt)
    finally:
        for c in (xq.hidden, xf.hidden, y):
            c.close()
    return {"curves": curves}
