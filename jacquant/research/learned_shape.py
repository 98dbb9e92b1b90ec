"""The learned-shape rule (``jq-shape``): the clipped-STE gradient of every weight multiplied by the layer's B(v).

Kept for study, not the product: it is the one per-element rule that was below STE on every seed of the
block-wise phase at 20 steps per block (docs/method.md), and end to end it is within the noise of the
default JacQuant. The sites use the rule "ste" (w.grad = m ⊙ dL/dq), so the rule acts around the
optimizer without touching the quantized op: before each ``optimizer.step()``,

    w.grad ← w.grad ⊙ B(w/s + z),    B(v) = 1 + Σ_k a_k cos(2πk v)      (:func:`jacquant.research.shape.shape_factor`)

with one coefficient vector a per layer, refitted every ``refresh_every`` steps from how far the layer's
weights travelled since the last refit (:func:`jacquant.research.shape.dither_shape` of σ = RMS travel in
bins, :func:`jacquant.research.shape.travel`); StableQAT's shape (amplitude ``prior_amplitude``) until the
first travel is known. On plain CPU tensors the multiply runs as one fused loop
(:func:`jacquant.kernels.fused_cpu.run`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from jacquant.kernels import fused_cpu
from jacquant.qat.quantizer import sites
from jacquant.research.shape import (
    dither_shape,
    fourier_shape,
    positive,
    scale_by_shape_,
    shape_factor,
    travel,
)


@dataclass(frozen=True)
class LearnedShape:
    """The rule's settings.

    Attributes:
        refresh_every: steps between refits of the shapes (a refit at step 0, K, 2K, ...).
        n_basis: harmonics n of the shape family.
        prior_amplitude: StableQAT's A, whose shape (:func:`jacquant.research.shape.fourier_shape`) every layer
            has until its first travel is measured.
        sigma_min: the smallest travel (bin units) a fit uses.
    """

    refresh_every: int = 10
    n_basis: int = 3
    prior_amplitude: float = 0.21
    sigma_min: float = 0.05

    def __post_init__(self) -> None:
        if self.refresh_every < 1 or self.n_basis < 1:
            raise ValueError(f"LearnedShape: refresh_every={self.refresh_every} and n_basis={self.n_basis} must be >= 1")
        if not self.sigma_min > 0:
            raise ValueError(f"LearnedShape.sigma_min={self.sigma_min} must be > 0")


class LearnedShapeHooks:
    """Handle of :func:`attach`: the per-site shapes, the refit history, the seconds spent per step, ``remove()``."""

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, config: LearnedShape):
        found = list(sites(model))
        if not found:
            raise ValueError(f"{type(model).__name__} has no quantized site; call jacquant.transform(model, ...) first")
        bad = [s.name for s in found if s.quantizer.rule != "ste"]
        if bad:
            raise ValueError(f"the learned-shape rule reads w.grad as m·dL/dq: sites {bad[:3]} use another rule; "
                             "transform with method='ste'")
        scaled_min = [s.name for s in found if hasattr(s.quantizer, "affine_grid")]
        if scaled_min:
            raise ValueError(f"the learned-shape rule acts on the integer-zero-point grid: sites {scaled_min[:3]} use a "
                             "GGUF scale-and-min format (q4_1, q2_k); train them with a product method")
        self.sites, self.config = found, config
        self.t = 0
        prior = fourier_shape(config.prior_amplitude, config.n_basis)
        self.shapes = {s.name: prior.clone() for s in found}  # a per site, [n]
        self._before: dict[str, Tensor] = {}  # the weights at the last refit
        self.history: list[dict] = []  # per refit: the step, and per site B(0)/B(1/2)
        self.seconds: list[float] = []  # per step: wall seconds inside the hook, refits included (the rule's cost)
        self._handles: list[RemovableHandle] = [optimizer.register_step_pre_hook(self._pre)]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def state_dict(self) -> dict:
        """What the hook carries between steps: the step count, the shapes and the weights at the last refit."""
        return {"t": self.t, "shapes": dict(self.shapes), "before": dict(self._before)}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (a resumed run then continues bit for bit)."""
        missing = set(self.shapes) - set(state["shapes"])
        if missing:
            raise ValueError(f"learned-shape state has no shape for sites {sorted(missing)[:3]}: saved from another model?")
        self.t = int(state["t"])
        self.shapes = {k: v.clone() for k, v in state["shapes"].items()}
        self._before = {k: v.clone() for k, v in state["before"].items()}

    @torch.no_grad()
    def refit(self) -> None:
        """Every site's shape from the RMS distance its weights travelled since the last refit."""
        c = self.config
        for st in self.sites:
            q, w = st.quantizer, st.quantizer.as_nk(st.weight).detach()
            if st.name in self._before:
                sigma = travel(w, self._before[st.name], q.scale, q.group, "layer").clamp_min(c.sigma_min)
                self.shapes[st.name] = positive(dither_shape(sigma, c.n_basis))
            self._before[st.name] = w.clone()
        self.history.append({"t": self.t, "contrast": {n: contrast(a) for n, a in self.shapes.items()}})

    @torch.no_grad()
    def _pre(self, opt, args, kwargs) -> None:
        start = time.perf_counter()
        if self.t % self.config.refresh_every == 0:
            self.refit()
        for st in self.sites:
            q, w = st.quantizer, st.weight
            if w.grad is None:
                continue
            g, w_nk, a = q.as_nk(w.grad), q.as_nk(w).detach(), self.shapes[st.name].to(w.grad.device)
            hook_args = (g, w_nk, q.scale.detach(), q.zero_point, q.group, a)
            if fused_cpu.usable(g, w_nk, q.scale, q.zero_point, a):
                fused_cpu.run("scale_by_shape", scale_by_shape_, *hook_args)
            else:
                scale_by_shape_(*hook_args)
        self.t += 1
        self.seconds.append(time.perf_counter() - start)


def contrast(coeffs: Tensor) -> float:
    """B on a grid point over B on a threshold: 1 for STE, small for a sharp shape."""
    ends = shape_factor(torch.tensor([0.0, 0.5]), coeffs)
    return float(ends[0] / ends[1])


def attach(optimizer: torch.optim.Optimizer, model: nn.Module, config: Optional[LearnedShape] = None
           ) -> LearnedShapeHooks:
    """Hook ``optimizer`` so that every quantized weight of ``model`` (rule "ste") gets its layer's learned shape
    (module docstring) before each step."""
    return LearnedShapeHooks(optimizer, model, config or LearnedShape())
