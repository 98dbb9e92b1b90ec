"""A model's repeated blocks, and the activations that flow into them, for block-by-block work.

Calibration (GPTQ) and block-wise training treat a transformer one block at a time: run block i
on the inputs it sees in the model, change it, and pass its outputs on to block i + 1. This file
holds the pieces both use:

- :func:`find_blocks`: the model's decoder blocks (the ``nn.ModuleList`` that holds the most
  quantized sites, e.g. ``model.model.layers`` of a Hugging Face Llama);
- :func:`capture_inputs`: the hidden states that enter block 0 for each calibration batch, and the
  keyword arguments the model passes to every block (attention mask, rotary tables, positions),
  caught by a forward pre-hook that stops the forward there;
- :class:`ActivationCache`: hidden states [n, T, d] in memory up to a byte budget, on disk beyond it
  (a memory-mapped file), so that the cache never holds more RAM than it is given.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from jacquant.qat.quantizer import WeightQuantizer


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(path, blocks): the ``nn.ModuleList`` of the model that holds the most quantized sites.

    Raises ValueError when the model has no quantized site inside a ModuleList (not transformed, or
    a model without repeated blocks, which has nothing to do block by block).
    """
    best, count = None, 0
    for path, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) > 0:
            n = sum(isinstance(q, WeightQuantizer) for q in m.modules())
            if n > count:
                best, count = (path, m), n
    if best is None:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of blocks holding quantized sites; transform "
                         "it with jacquant.transform first (block-wise work needs repeated blocks, such as "
                         "model.model.layers)")
    return best


class _Stop(Exception):
    """Raised by the capture hook to end the model's forward at block 0."""


@dataclass
class BlockInputs:
    """What enters block 0: hidden states [n, T, d] and the keyword arguments every block receives.

    ``kwargs`` were captured for batches of ``batch`` sequences; they hold no per-sequence data (a causal
    mask without padding, rotary tables, positions), so they serve any batch of up to that many sequences
    of length T (tensors whose leading dimension is ``batch`` are cut to the batch used).
    """

    hidden: "ActivationCache"
    kwargs: dict
    batch: int

    def kwargs_for(self, b: int) -> dict:
        """The block kwargs for a batch of ``b`` sequences."""
        return {k: _cut(v, self.batch, b) for k, v in self.kwargs.items()}


def _cut(v: Any, full: int, b: int) -> Any:
    if isinstance(v, Tensor) and v.ndim > 0 and v.shape[0] == full and b != full:
        return v[:b]
    if isinstance(v, tuple):
        return tuple(_cut(x, full, b) for x in v)
    return v


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return isinstance(b, (tuple, list)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a is b or a == b


@torch.no_grad()
def capture_inputs(model: nn.Module, first_block: nn.Module, batches: Sequence[Tensor],
                   run: Callable[[nn.Module, Tensor], Any], max_bytes: int = 2 << 30) -> BlockInputs:
    """Run ``run(model, batch)`` for each batch [b, T] up to ``first_block`` and store what enters it.

    Hidden states go into an :class:`ActivationCache` of ``max_bytes`` (in batch order); the block's keyword
    arguments are kept from the first batch and must be equal for every later one of the same size (same
    length, no padding): otherwise ValueError, since one set of kwargs would then be wrong for some sequences.
    """
    seen: dict = {}

    def hook(module, args, kwargs):
        seen["args"], seen["kwargs"] = args, kwargs
        raise _Stop

    n = sum(x.shape[0] for x in batches)
    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    kwargs, batch, cache, row = None, None, None, 0
    try:
        for x in batches:
            try:
                run(model, x)
            except _Stop:
                pass
            else:
                raise RuntimeError("the model's forward never reached its first block")
            args, kw = seen["args"], dict(seen["kwargs"])
            hidden = args[0] if args else kw.pop("hidden_states")
            kw = {k: v for k, v in kw.items() if k not in ("cache", "past_key_values", "past_key_value", "use_cache")}
            if kwargs is None:
                kwargs, batch = kw, hidden.shape[0]
                cache = ActivationCache(n, hidden.shape[1], hidden.shape[2], max_bytes)
            elif hidden.shape[0] == batch and not all(_same(kw.get(k), v) for k, v in kwargs.items()):
                raise ValueError("calibration batches reach the blocks with different attention masks or positions; "
                                 "use windows of one length without padding")
            cache.write(row, hidden)
            row += hidden.shape[0]
    finally:
        handle.remove()
    if kwargs is None:
        raise ValueError("no calibration batch was given")
    return BlockInputs(cache, kwargs, batch)


class ActivationCache:
    """Float32 activations [n, T, d] in RAM when they fit ``max_bytes``, else in a memory-mapped temp file.

    ``write(row, x)`` stores x [b, T, d] at rows row..row+b; ``read(idx)`` returns the rows ``idx`` (a slice or
    index tensor) as a tensor. The file (if any) is deleted when the cache is closed or collected.
    """

    def __init__(self, n: int, seq: int, dim: int, max_bytes: int = 2 << 30, folder: Optional[str] = None):
        self.shape = (n, seq, dim)
        nbytes = n * seq * dim * 4
        self.path = None
        if nbytes <= max_bytes:
            self.data = torch.empty(self.shape, dtype=torch.float32)
        else:
            fd, self.path = tempfile.mkstemp(prefix="jacquant-acts-", suffix=".f32", dir=folder)
            os.close(fd)
            self._mm = np.memmap(self.path, dtype=np.float32, mode="w+", shape=self.shape)
            self.data = torch.from_numpy(self._mm)

    @property
    def on_disk(self) -> bool:
        return self.path is not None

    def write(self, row: int, x: Tensor) -> None:
        if x.shape[1:] != self.shape[1:] or row + x.shape[0] > self.shape[0]:
            raise ValueError(f"activations {tuple(x.shape)} at row {row} do not fit the cache {self.shape}")
        self.data[row:row + x.shape[0]] = x.detach().to("cpu", torch.float32)

    def read(self, idx) -> Tensor:
        return self.data[idx]

    def __len__(self) -> int:
        return self.shape[0]

    def close(self) -> None:
        if self.path is not None:
            self.data = None
            self._mm = None
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
            self.path = None

    def __del__(self):
        self.close()
