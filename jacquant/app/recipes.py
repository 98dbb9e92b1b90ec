"""The methods a user picks: each a backward rule and what trains, on the same op, data and budget.

    rtn          round-to-nearest PTQ: the MSE-initialised grid, no training
    gptq         the calibrated start (GPTQ on the calibration windows), no training
    ste          clipped straight-through estimator
    stableqat    StableQAT's Fourier surrogate, A = 0.21
    jacquant     the per-group B refreshed by Dither (h = 2, every 100 steps), on AdamW's update

Research rules kept for study (:mod:`jacquant.research`) are not in this table: :func:`recipe` builds one
when it is named (``jq-shape``: the learned-shape rule). Every variant that measured no better was
deleted; its numbers stay in docs/method.md and benchmarks/results/.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn as nn

from jacquant.qat.refresh import RefreshConfig


@dataclass(frozen=True)
class Recipe:
    """One QAT method.

    Attributes:
        name: the row label.
        rule: the backward rule of the sites ("ste", "stableqat", "jacquant"). JacQuant's B, refreshed by
            ``estimator`` of width ``width`` (:class:`jacquant.RefreshConfig`), scales AdamW's update
            (:func:`jacquant.optim.scale_updates_by_b`, which sets the sites to "ste" while it trains).
        train: False for RTN and GPTQ.
        hook: for a research rule, ``hook(optimizer, model)`` installs it around the optimizer and returns a handle
            with ``state_dict``, ``load_state_dict`` and ``history``.
    """

    name: str
    rule: str = "ste"
    estimator: str = "dither"
    width: float = 2.0
    train: bool = True
    hook: Optional[Callable[[torch.optim.Optimizer, nn.Module], Any]] = None

    @property
    def is_jacquant(self) -> bool:
        return self.train and self.rule == "jacquant"

    @property
    def needs_calib(self) -> bool:
        """True when the recipe measures a calibration loss (the data-driven Probe)."""
        return self.is_jacquant and self.estimator == "data_probe"

    def refresh_config(self, seed: int) -> RefreshConfig:
        return RefreshConfig(estimator=self.estimator, width=self.width, seed=seed)


RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("rtn", train=False),
    Recipe("gptq", train=False),
    Recipe("ste"),
    Recipe("stableqat", rule="stableqat"),
    Recipe("jacquant", rule="jacquant"),
)}
# The JacQuant recipe of the tables (docs/method.md "The default follows the measurement").
DEFAULT_JACQUANT = "jacquant"
# `jacquant train`'s method: STE. In the block-wise rounding search, which decides most of the result, JacQuant was
# behind STE on every one of 3 seeds (docs/pipeline.md, "The backward rules in the block-wise phase"); end to end
# the rules are within the seed spread of each other.
DEFAULT_METHOD = "ste"
DEFAULT_METHODS = ("rtn", "gptq", "ste", "stableqat", DEFAULT_JACQUANT)
TRAINED = tuple(k for k, r in RECIPES.items() if r.train)


def _learned_shape() -> Recipe:
    from jacquant.research import learned_shape

    return Recipe("jq-shape", hook=lambda opt, model: learned_shape.attach(opt, model, learned_shape.LearnedShape()))


RESEARCH: dict[str, Callable[[], Recipe]] = {"jq-shape": _learned_shape}


def recipe(name: str) -> Recipe:
    """The recipe called ``name``: a product method of :data:`RECIPES`, or a research rule of :data:`RESEARCH`
    (imported only now)."""
    if name in RECIPES:
        return RECIPES[name]
    if name in RESEARCH:
        return RESEARCH[name]()
    raise ValueError(f"unknown method {name!r}; choose from {list(RECIPES)} (research: {list(RESEARCH)})")


def recipes(names: Iterable[str]) -> list[Recipe]:
    """The recipes called ``names`` (see :func:`recipe`), in order; unknown names are an error."""
    names = list(names)
    unknown = [n for n in names if n not in RECIPES and n not in RESEARCH]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {list(RECIPES)} (research: {list(RESEARCH)})")
    return [recipe(n) for n in names]
