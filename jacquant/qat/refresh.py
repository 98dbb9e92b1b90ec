"""When and how B is refreshed: a config, a small state module on the model, and ``step(model)``.

Every ``refresh_every`` optimizer steps (and at step 0) each site's B [N, K/G] is re-estimated and
smoothed (method.md):

    B ← β·B + (1 - β)·clip(λ·B̂ + (1 - λ), b_min, b_max)

Usage::

    jacquant.transform(model, bits=2, method="jacquant")
    jacquant.qat.refresh.attach(model, RefreshConfig(estimator="dither", width=2.0))   # optional
    for batch in data:
        loss(model, batch).backward(); opt.step(); opt.zero_grad()
        jacquant.step(model)          # counts steps, refreshes B when due

The step counter and the estimator's RNG state are buffers on the model's root (``jacquant_step``,
``jacquant_rng``), so they travel with ``model.state_dict()`` and :mod:`jacquant.qat.checkpoint`; the
config is the attribute ``model.jacquant_refresh_config``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
from torch import Tensor

from jacquant.kernels import estimators as fast
from jacquant.primitives import estimators
from jacquant.qat.data_estimators import data_probe
from jacquant.qat.quantizer import sites

ESTIMATORS = ("dither", "probe", "data_probe")
STEP, RNG = "jacquant_step", "jacquant_rng"


@dataclass
class RefreshConfig:
    """How B is estimated and smoothed.

    Attributes:
        estimator: ``"dither"`` (closed form), ``"probe"`` (sampled, closed form in expectation),
            ``"data_probe"`` (measures the loss; needs ``loss_fn`` in :func:`step`).
        width: the estimator's width in scale units: Dither's h, Probe's δ_max, data Probe's δ.
        refresh_every: K, steps between refreshes (refresh at step 0, K, 2K, ...).
        beta: β, smoothing of B across refreshes (0 = take the new estimate).
        lam: λ, shrinkage of B̂ towards 1 (STE); 0 keeps B = 1.
        b_min, b_max: bounds of the clipped estimate.
        n_probes: probes per refresh for ``"data_probe"``.
        seed: seed of the estimator's RNG (``"probe"``, ``"data_probe"``).

    Defaults from ``benchmarks/width_sweep.py`` (W2 g64 MLP distillation, 300 steps, 2 seeds): with
    B on the update, h = 2 beat h = 1 (held-out MSE 31.8e-3 vs 32.1e-3, STE 32.6e-3) and K = 100 was
    no worse than K = 10; with B on the gradient under AdamW no width differed from STE beyond noise.
    """

    estimator: str = "dither"
    width: float = 2.0
    refresh_every: int = 100
    beta: float = 0.5
    lam: float = 1.0
    b_min: float = 0.1
    b_max: float = 2.0
    n_probes: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"RefreshConfig.estimator={self.estimator!r} is not one of {ESTIMATORS}")
        if not (math.isfinite(self.width) and self.width > 0):
            raise ValueError(f"RefreshConfig.width={self.width} must be a positive width in scale units")
        if isinstance(self.refresh_every, bool) or not isinstance(self.refresh_every, int) or self.refresh_every < 1:
            raise ValueError(f"RefreshConfig.refresh_every={self.refresh_every!r} must be a positive int")
        if not 0.0 <= self.beta < 1.0:
            raise ValueError(f"RefreshConfig.beta={self.beta} must lie in [0, 1) (1 would never update B)")
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"RefreshConfig.lam={self.lam} must lie in [0, 1]")
        if not 0.0 <= self.b_min <= self.b_max or not math.isfinite(self.b_max):
            raise ValueError(f"RefreshConfig bounds b_min={self.b_min}, b_max={self.b_max} need 0 <= b_min <= b_max < inf")
        if not isinstance(self.n_probes, int) or self.n_probes < 1:
            raise ValueError(f"RefreshConfig.n_probes={self.n_probes!r} must be a positive int")


def smooth(b: Tensor, b_hat: Tensor, beta: float, lam: float, b_min: float, b_max: float) -> Tensor:
    """B_new = β·B + (1 - β)·clip(λ·B̂ + (1 - λ), b_min, b_max), in B's dtype."""
    target = (lam * b_hat.to(torch.float32) + (1.0 - lam)).clamp(b_min, b_max)
    return (beta * b.to(torch.float32) + (1.0 - beta) * target).to(b.dtype)


class RefreshState:
    """A view of one model's refresh state: ``config`` (an attribute) and two buffers on the model's root,
    ``jacquant_step`` (int64 scalar, the step counter t) and ``jacquant_rng`` (the CPU generator state).

    Buffers rather than a submodule: an ``nn.Sequential`` runs every child, so none is added.
    """

    def __init__(self, model: nn.Module):
        self.model = model

    @property
    def config(self) -> RefreshConfig:
        return self.model.jacquant_refresh_config

    @config.setter
    def config(self, value: RefreshConfig) -> None:
        if not isinstance(value, RefreshConfig):
            raise TypeError(f"refresh config must be a RefreshConfig, got {type(value).__name__}")
        self.model.jacquant_refresh_config = value

    @property
    def step(self) -> Tensor:
        return self.model.jacquant_step

    @property
    def rng(self) -> Tensor:
        return self.model.jacquant_rng

    def generator(self) -> torch.Generator:
        g = torch.Generator()
        g.set_state(self.rng.cpu())
        return g


def attach(model: nn.Module, config: Optional[RefreshConfig] = None) -> RefreshState:
    """Set ``model``'s refresh config (default :class:`RefreshConfig`) and reset its clock and RNG to the seed."""
    if not any(True for _ in sites(model)):
        raise ValueError(f"{type(model).__name__} has no quantized site; call jacquant.transform(model, ...) first")
    state = RefreshState(model)
    state.config = config or RefreshConfig()
    device = next(s.quantizer.jac.device for s in sites(model))
    model.register_buffer(STEP, torch.zeros((), dtype=torch.int64, device=device))
    model.register_buffer(RNG, torch.Generator().manual_seed(state.config.seed).get_state())
    return state


def state_of(model: nn.Module) -> Optional[RefreshState]:
    """The model's refresh state, or None before :func:`attach` / the first :func:`step`."""
    ok = isinstance(getattr(model, "jacquant_refresh_config", None), RefreshConfig) and STEP in model._buffers
    return RefreshState(model) if ok else None


@torch.no_grad()
def refresh(model: nn.Module, loss_fn: Optional[Callable[[], Tensor]] = None) -> None:
    """Re-estimate and smooth B on every site now (regardless of the clock)."""
    state = state_of(model) or attach(model)
    c = state.config
    gen = state.generator()
    if c.estimator == "data_probe":
        if loss_fn is None:
            raise ValueError(f"RefreshConfig.estimator={c.estimator!r} measures the loss: call "
                             "jacquant.step(model, loss_fn=lambda: loss_on_calibration_batch(model))")
        with torch.enable_grad():
            b_hats = data_probe(loss_fn, model, c.width, c.n_probes, generator=gen)
    for s in sites(model):
        q = s.quantizer
        w, scale, zero_point = q.grid_inputs(q.as_nk(s.weight.detach()))  # v = w/s + z as the forward has it
        if c.estimator == "dither":
            b_hat = fast.dither(w, scale, zero_point, q.bits, q.group, c.width)  # Triton on CUDA
        elif c.estimator == "probe":
            delta = estimators.probe_deltas(w, scale, q.group, c.width, generator=gen)
            b_hat = fast.probe_from_deltas(w, scale, zero_point, q.bits, q.group, delta)
        else:
            b_hat = b_hats[s.name]
        q.jac.copy_(smooth(q.jac, b_hat.to(q.jac.device), c.beta, c.lam, c.b_min, c.b_max))
    state.rng.copy_(gen.get_state())


def step(model: nn.Module, loss_fn: Optional[Callable[[], Tensor]] = None) -> bool:
    """Call once after each ``optimizer.step()``: refreshes B when the step counter t is 0 mod K.

    Uses the model's refresh state (attached with the default :class:`RefreshConfig` on the first
    call if absent). ``loss_fn`` is needed only by the ``"data_probe"`` estimator. Returns True
    when B was refreshed at this call.
    """
    state = state_of(model) or attach(model)
    due = int(state.step) % state.config.refresh_every == 0
    if due:
        refresh(model, loss_fn)
    state.step.add_(1)
    return due


def hf_callback(config: Optional[RefreshConfig] = None, loss_fn: Optional[Callable[[], Tensor]] = None):
    """A ``transformers.TrainerCallback`` that calls :func:`step` after every optimizer step.

    ``trainer.add_callback(jacquant.qat.refresh.hf_callback(RefreshConfig(...)))``; transformers is
    imported only here.
    """
    from transformers import TrainerCallback

    class JacQuantRefreshCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if model is None:
                return
            current = state_of(model)
            if current is None:
                attach(model, config)
            elif config is not None:
                current.config = config  # keep the (possibly resumed) clock and RNG

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if model is None:
                raise ValueError("JacQuantRefreshCallback needs the model in on_step_end (Trainer passes it)")
            step(model, loss_fn)

    return JacQuantRefreshCallback()


def detach(model: nn.Module) -> None:
    """Remove the refresh state (config, step counter and RNG buffers) from ``model``, e.g. before
    :func:`jacquant.convert` makes an inference model that no longer trains. No-op when absent."""
    for name in (STEP, RNG):
        model._buffers.pop(name, None)
    if "jacquant_refresh_config" in vars(model):
        del model.jacquant_refresh_config
