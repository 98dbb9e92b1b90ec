"""Save and resume QAT: model (weights, scales, zero points, B, refresh clock and RNG), optimizer,
and the global torch RNG, as plain state dicts loadable with ``torch.load(weights_only=True)``."""
from __future__ import annotations

import os
from dataclasses import asdict
from typing import Any, Optional

import torch
import torch.nn as nn

from jacquant.qat.refresh import RefreshConfig, attach, state_of


def save_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                    extra: Optional[dict[str, Any]] = None) -> None:
    """Write ``{"model", "optimizer", "refresh_config", "torch_rng", "extra"}`` with ``torch.save``."""
    state = state_of(model)
    torch.save({
        "model": model.state_dict(),
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "refresh_config": None if state is None else asdict(state.config),
        "torch_rng": torch.get_rng_state(),
        "extra": extra or {},
    }, path)


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                    restore_rng: bool = True) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote into a model transformed the same way; returns ``extra``.

    The refresh config (``model.jacquant_refresh_config``) is attached from the saved config when missing.
    Loading is strict: a model transformed differently raises (naming the keys).
    """
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt["refresh_config"] is not None:
        cfg = RefreshConfig(**ckpt["refresh_config"])
        current = state_of(model)
        if current is None:
            attach(model, cfg)
        else:
            current.config = cfg
    model.load_state_dict(ckpt["model"], strict=True)
    if optimizer is not None:
        if ckpt["optimizer"] is None:
            raise ValueError(f"{path}: the checkpoint has no optimizer state; save it with save_checkpoint(..., optimizer)")
        optimizer.load_state_dict(ckpt["optimizer"])
    if restore_rng:
        torch.set_rng_state(ckpt["torch_rng"])
    return ckpt["extra"]
