"""QAT recipes and the one training loop every track and benchmark shares.

A :class:`Recipe` names a method as the accuracy benchmark compares them: the backward rule, and
for JacQuant which estimator refreshes B and where B enters (method.md):

    rtn          round-to-nearest PTQ: the MSE-initialised grid, no training
    gptq         the calibrated start (GPTQ on the calibration windows), no training
    ste          clipped straight-through estimator
    stableqat    StableQAT's Fourier surrogate, A = 0.21
    jacquant     the library default: Dither (h = 2), B on the update, AdamW
    jq-dither-grad, jq-probe, jq-data-probe, jq-mars, ste-mars
                 the variants of the benchmark (B on the gradient, the other estimators, MARS-AdamW)

:func:`train` runs AdamW (or MARS-AdamW) with a cosine schedule over the given batches, calls
``jacquant.step`` after each step for the JacQuant recipes, and logs ``jacquant.stats`` to a JSONL
file when asked. Every method gets the same batches, steps and learning-rate rule.
"""
from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Optional

import torch
import torch.nn as nn
from torch import Tensor
from tqdm import tqdm

from jacquant.api import transform
from jacquant.qat.checkpoint import load_checkpoint, save_checkpoint
from jacquant.config import QuantConfig
from jacquant.qat.guard import guard
from jacquant.qat.quantizer import sites
from jacquant.research.elementwise import ElementwiseConfig
from jacquant.research.elementwise import attach as attach_elementwise
from jacquant.qat.optim import MarsAdamW, VRMomentum, scale_updates_by_b
from jacquant.qat.refresh import RefreshConfig, attach
from jacquant.qat.refresh import step as refresh_step
from jacquant.qat.stats import StatsLogger


@dataclass(frozen=True)
class Recipe:
    """One QAT method.

    Attributes:
        name: the row label.
        rule: the backward rule of the sites ("ste", "stableqat", "jacquant"); ignored when not ``train``.
        estimator: for rule "jacquant", the B estimator ("dither", "probe", "data_probe").
        placement: for rule "jacquant", where B enters: "update" (after AdamW's preconditioning)
            or "grad" (in the op's backward).
        optimizer: "adamw" or "mars" (:class:`jacquant.qat.optim.MarsAdamW`).
        width: the estimator's width in scale units (Dither's h, Probe's δ).
        train: False for RTN.
        elementwise: a per-element rule around the optimizer (:mod:`jacquant.research.elementwise`; rule "ste" sites).
    """

    name: str
    rule: str = "ste"
    estimator: Optional[str] = None
    placement: str = "update"
    optimizer: str = "adamw"
    width: float = 2.0
    train: bool = True
    elementwise: Optional[ElementwiseConfig] = None

    @property
    def is_jacquant(self) -> bool:
        return self.train and self.rule == "jacquant"

    @property
    def needs_calib(self) -> bool:
        """True when the recipe measures a calibration loss (data-driven estimators, fitted δ)."""
        return (self.is_jacquant and self.estimator in ("data_probe", "data_dither")) or \
            (self.train and self.elementwise is not None and self.elementwise.needs_loss)

    def refresh_config(self, seed: int) -> RefreshConfig:
        return RefreshConfig(estimator=self.estimator or "dither", width=self.width, seed=seed)


RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("rtn", train=False),
    Recipe("gptq", train=False),  # the calibrated start (jacquant.calibrate), untrained
    Recipe("ste"),
    Recipe("stableqat", rule="stableqat"),
    Recipe("jacquant", rule="jacquant", estimator="dither"),
    Recipe("jq-dither-grad", rule="jacquant", estimator="dither", placement="grad"),
    Recipe("jq-probe", rule="jacquant", estimator="probe"),
    Recipe("jq-data-probe", rule="jacquant", estimator="data_probe", width=1.0),
    Recipe("ste-mars", optimizer="mars"),
    Recipe("jq-mars", rule="jacquant", estimator="dither", optimizer="mars"),
    # issue 14's candidates (benchmarks/screen.py): per-element rules, data Dither, code phases, VR momentum
    Recipe("jq-ewgs", elementwise=ElementwiseConfig(rule="ewgs")),
    Recipe("jq-ewgs-upd", elementwise=ElementwiseConfig(rule="ewgs", placement="update")),
    Recipe("jq-gauss-upd", elementwise=ElementwiseConfig(rule="gauss", placement="update")),
    # the Gaussian slope where StableQAT's Fourier slope acts, on the gradient (added after StableQAT's 3 seeds)
    Recipe("jq-gauss", elementwise=ElementwiseConfig(rule="gauss")),
    # σ = 0.15: a threshold-to-grid contrast like StableQAT's (2.66 vs 0.02; StableQAT 1 vs 0.035), chosen from
    # benchmarks/adam_eps.py (Adam cancels a constant factor, so only how fast it swings can matter)
    Recipe("jq-gauss-sharp", elementwise=ElementwiseConfig(rule="gauss", sigma=0.15)),
    # control: StableQAT's own factor through the same hook (is it the factor's shape or where it is applied?)
    Recipe("ste-fourier-hook", elementwise=ElementwiseConfig(rule="fourier")),
    # issue 21: the learned shape B(r) = 1 + Σ a_k cos 2πk r (jacquant.research.shape) and StableQAT's shape with a fitted A
    Recipe("jq-shape-fixed", elementwise=ElementwiseConfig(rule="shape", n_basis=3)),  # control: StableQAT's, 3 terms
    Recipe("jq-shape", elementwise=ElementwiseConfig(rule="shape", fit="dither", refresh_every=10)),
    Recipe("jq-shape-group", elementwise=ElementwiseConfig(rule="shape", fit="dither", per="group", refresh_every=10)),
    Recipe("jq-shape-k30", elementwise=ElementwiseConfig(rule="shape", fit="dither", refresh_every=30)),
    Recipe("jq-amp", elementwise=ElementwiseConfig(rule="fourier", fit="dither", refresh_every=10)),
    Recipe("jq-amp-group", elementwise=ElementwiseConfig(rule="fourier", fit="dither", per="group", refresh_every=10)),
    Recipe("jq-shape-probe", elementwise=ElementwiseConfig(rule="shape", fit="probe", refresh_every=10)),
    Recipe("jq-amp-probe", elementwise=ElementwiseConfig(rule="fourier", fit="probe", refresh_every=10)),
    # the amplitude schedule over training (hand-set, StableQAT's A = 0.21 at its strongest)
    Recipe("ste-fourier-decay", elementwise=ElementwiseConfig(rule="fourier", schedule="decay")),
    Recipe("ste-fourier-grow", elementwise=ElementwiseConfig(rule="fourier", schedule="grow")),
    Recipe("jq-cage", elementwise=ElementwiseConfig(rule="none", cage=0.5)),
    Recipe("jq-codes", elementwise=ElementwiseConfig(rule="none", code_period=4, code_steps=1)),
    Recipe("jq-data-dither", rule="jacquant", estimator="data_dither", width=0.5),
    Recipe("ste-vrm", optimizer="vrm"),
    Recipe("jq-ewgs-vrm", optimizer="vrm", elementwise=ElementwiseConfig(rule="ewgs")),
)}
# The default JacQuant of `jacquant train` (docs/method.md "The default follows the measurement"): the per-group B
# refreshed by Dither. Issue 21's learned shape ``jq-shape`` was the default for one round; on the main job at 3 seeds
# on this code (2026-12-03) it trails ``jacquant`` by +0.84 ± 1.66 perplexity (ahead on 1 seed of 3), so the default went
# back: no measurement in the default (end-to-end) pipeline puts either ahead, and ``jacquant`` acts on every grid,
# the GGUF scale-and-min formats included. The main job keeps training ``jq-shape`` beside it.
DEFAULT_JACQUANT = "jacquant"
DEFAULT_METHODS = ("rtn", "gptq", "ste", "stableqat", DEFAULT_JACQUANT, "jq-shape")


def recipes(names: Iterable[str]) -> list[Recipe]:
    """The recipes called ``names`` (see :data:`RECIPES`), in order; unknown names are an error."""
    names = list(names)
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {list(RECIPES)}")
    return [RECIPES[n] for n in names]


def quantize_copy(model: nn.Module, recipe: Recipe, config: QuantConfig, example_inputs=None) -> nn.Module:
    """A deep copy of the full-precision ``model`` transformed with ``recipe``'s rule."""
    q = copy.deepcopy(model)
    cfg = replace(config, method=recipe.rule if recipe.train else "ste")
    return transform(q, config=cfg, example_inputs=example_inputs)


def make_optimizer(model: nn.Module, recipe: Recipe, lr: float) -> torch.optim.Optimizer:
    """AdamW or MARS-AdamW over every trainable parameter (weights, biases, scales), no weight decay;
    for JacQuant with ``placement="update"``, hooked by :func:`jacquant.qat.optim.scale_updates_by_b`."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = MarsAdamW(params, lr=lr, weight_decay=0.0) if recipe.optimizer == "mars" else \
        VRMomentum(params, lr=lr) if recipe.optimizer == "vrm" else torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    if recipe.is_jacquant and recipe.placement == "update":
        scale_updates_by_b(opt, model)
    return opt


def cosine(steps: int, warmup: int = 0) -> Callable[[int], float]:
    """lr multiplier: linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``steps``."""
    def f(t: int) -> float:
        if t < warmup:
            return (t + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (t - warmup) / max(steps - warmup, 1)))
    return f


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
    clock and RNG), optimizer, lr schedule, loss curve, the per-element rule's state (step count, δ, RNG)
    and global RNG are saved there every N steps
    (:func:`jacquant.save_checkpoint`, written to a temporary file and renamed, so a kill never leaves a torn
    file). When that file exists at the start, training resumes from it: the first ``step`` batches are
    drawn and skipped, so a resumed run equals an uninterrupted one bit for bit on the CPU.
    """
    if recipe.is_jacquant:
        attach(model, recipe.refresh_config(seed))
    opt = make_optimizer(model, recipe, lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine(steps, warmup))
    # a NaN/Inf anywhere stops the run, naming the tensor (the guard needs quantized sites: not for fp pretraining)
    checked = guard(opt, model, on_nonfinite="raise") if any(True for _ in sites(model)) else opt
    probe_loss = None
    if recipe.needs_calib:
        if calib_batch is None:
            raise ValueError(f"recipe {recipe.name!r} measures a calibration loss: it needs a calib_batch")
        probe_loss = lambda: loss_fn(model, calib_batch)  # noqa: E731
    hooks = None
    if recipe.train and recipe.elementwise is not None:
        hooks = attach_elementwise(opt, model, recipe.elementwise, probe_loss, seed, steps)
        model.jacquant_elementwise_history = hooks.history  # fitted shapes over the run (issue 21's schedule)
    curve: list[float] = []
    start = 0
    if checkpoint and os.path.exists(checkpoint):
        extra = load_checkpoint(checkpoint, model, opt)
        sched.load_state_dict(extra["schedule"])
        start, curve = int(extra["step"]), list(extra["curve"])
        if hooks is not None:
            hooks.load_state_dict(extra["elementwise"])
    elif log_path and os.path.exists(log_path):
        os.remove(log_path)  # a fresh log per run: StatsLogger appends
    logger = StatsLogger(log_path) if log_path else None
    model.train()
    bar = tqdm(batches, total=steps, initial=0, desc=desc or recipe.name, leave=False)
    for t, batch in enumerate(bar):
        if t >= steps:
            break
        if t < start:
            continue  # resumed: this batch was trained on before the checkpoint
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
            if hooks is not None:
                extra["elementwise"] = hooks.state_dict()
            save_checkpoint(tmp, model, opt, extra=extra)
            os.replace(tmp, checkpoint)
    return curve
