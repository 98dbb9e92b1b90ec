"""Per-element surrogates of the quantizer's Jacobian, applied around the optimizer (not in the op).

Notation (method.md): W [N, K], groups of G along K, v = w/s + z (v-units: one unit is one scale
step), r = v − round(v) ∈ [−½, ½] the position of a weight inside its bin, τ_k = k + ½ the decision
thresholds, m = 1[0 <= v <= 2^b − 1] the clipped-STE mask, g_q = dL/dq. With the sites' rule "ste"
the weight's gradient is w.grad = m ⊙ g_q, so any per-element rule f_i(w, s, sign g) can be applied
to w.grad after ``backward()`` (an optimizer pre-step hook), or to the update the optimizer
computed (a post-step hook), without touching the quantized op.

Rules (pure functions below; :class:`ElementwiseConfig` and :func:`attach` wire them to training):

    ewgs      B_i = 1 + δ · sign(g_i) · r_i                  (EWGS, Lee et al. 2021)
              δ per layer from a Hutchinson estimate of the Hessian trace in v-units:
              δ = (tr H_v / n) / (3 · std(g_v)),  H_v = diag(s) H_q diag(s),  g_v = s ⊙ g_q
    gauss     B_i = Σ_k φ((τ_k − v_i)/σ) / σ                 (slope of the Gaussian-dithered quantizer)
    fourier   B_i = (1 − c cos πr_i)/(1 + c cos πr_i), c = √2πA   (StableQAT's factor; A fixed, or fitted per
                                                              layer/group with ``fit``)
    shape     B_i = 1 + Σ_k a_k cos(2πk r_i)                 (the learned shape, :mod:`jacquant.research.shape`: a fixed at
                                                              StableQAT's, or fitted per layer/group by Dither or Probe)
    cage      dL/dw_i += λ · rms(m ⊙ g_q) · 2 r_i            (CAGE's pull λ'(w − Q(w)) toward the grid,
                                                              λ' = 2λ·rms(g)/s relative to the layer's gradient)
    code phase   codes held: w frozen in v (w ← w · s_new/s_old after the step), the scale trains on
              its exact gradient with codes fixed, γ · Σ_i g_q,i (c_i − z) (LSQ's γ kept).

Placement: ``"grad"`` multiplies w.grad by B (before the optimizer), ``"update"`` multiplies the
optimizer's update Δ = w_new − w_old by B with sign(g) read as −sign(Δ) (after preconditioning, where
Adam's per-coordinate normalisation cannot cancel it).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from jacquant.primitives.grid import SCALE_FLOOR, grouped, qmax, scaled
from jacquant.research.shape import (amplitude_for_shape, amplitude_for_sigma, dither_shape, fourier_factor, fourier_shape, positive, probe_shape,
                    scale_by_shape_, scheduled_amplitude, shape_factor, travel)
from jacquant.kernels import fused_cpu
from jacquant.qat.quantizer import Site, sites

RULES = ("none", "ewgs", "gauss", "fourier", "shape")
FITS = ("fixed", "dither", "probe")
PER = ("layer", "group")
PLACEMENTS = ("grad", "update")
SCHEDULES = ("constant", "decay", "grow")


# ----------------------------------------------------------------------------- pure math

def bin_offset(w: Tensor, scale: Tensor, zero_point: Tensor, group: int) -> Tensor:
    """r = v − round(v), v = w/s + z: the position of each weight in its bin, in [−½, ½], [N, K] fp32."""
    v = scaled(w.detach(), scale.detach(), zero_point, group)
    return (v - v.round()).reshape(w.shape).to(torch.float32)


def ewgs_factor(r: Tensor, grad: Tensor, delta: Tensor | float) -> Tensor:
    """EWGS's per-element scale B_i = 1 + δ · sign(g_i) · r_i (same shape as ``r``).

    g > 0 asks q to decrease, i.e. w to cross the lower threshold τ = round(v) − ½; the farther w
    sits above its grid point (r > 0) the farther that threshold, and the larger the factor. ``delta``
    is a scalar or broadcasts against ``r``; B > 0 for 0 <= δ < 2 (|r| <= ½).
    """
    return 1.0 + delta * torch.sign(grad).to(r.dtype) * r


def gaussian_slope(v: Tensor, bits: int, sigma: float) -> Tensor:
    """Slope of the Gaussian-dithered quantizer in v-units, per element:

        B_i = d/dv E_u[round_clamped(v_i + u)] = Σ_{k=0}^{q−1} φ((τ_k − v_i)/σ) / σ,   u ~ N(0, σ²)

    (φ the standard normal density, τ_k = k + ½, q = 2^b − 1). Large near thresholds, small on grid
    points; integrates to q over the real line.
    """
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"gaussian_slope sigma={sigma!r} must be a positive width in scale units")
    tau = torch.arange(qmax(bits), dtype=torch.float32, device=v.device) + 0.5
    d = (tau - v.to(torch.float32).unsqueeze(-1)) / sigma
    return (torch.exp(-0.5 * d * d).sum(-1) / (sigma * math.sqrt(2 * math.pi)))


def ewgs_delta(trace_per_weight: float, grad_v: Tensor, delta_max: float = 1.5) -> float:
    """EWGS's δ = (tr H_v / n) / (3 · std(g_v)), clipped to [0, ``delta_max``]; 0 when std(g_v) = 0.

    ``trace_per_weight`` = tr H_v / n and ``grad_v`` = s ⊙ dL/dq are both in v-units, so δ is a pure number.
    """
    sd = float(grad_v.to(torch.float64).std()) if grad_v.numel() > 1 else 0.0
    if not (sd > 0 and math.isfinite(trace_per_weight)):
        return 0.0
    return float(min(max(trace_per_weight / (3.0 * sd), 0.0), delta_max))


def cage_term(r: Tensor, grad: Tensor, lam: float) -> Tensor:
    """CAGE's pull toward the grid, λ'·(w − Q(w)) with λ' = 2λ·rms(g)/s: as a tensor, λ · rms(g) · 2r.

    ``grad`` is the layer's masked gradient (its RMS sets the units, so λ is a pure number: at the
    bin edge the pull equals λ times the layer's gradient RMS). Zero for λ = 0 or on grid points.
    """
    rms = grad.to(torch.float32).square().mean().sqrt()
    return (lam * 2.0) * rms * r


def exact_scale_grad(lsq_grad: Tensor, w_grad: Tensor, w: Tensor, scale: Tensor, zero_point: Tensor,
                     bits: int, group: int) -> Tensor:
    """The scale's gradient with codes held, in LSQ's units: γ · Σ_{i∈g} g_q,i (c_i − z), [N, K/G].

    LSQ's gradient is γ Σ g_q ((c − z) − m (v − z)) and the sites' rule "ste" gives w.grad = m ⊙ g_q,
    so the exact one is recovered without the op: lsq_grad + γ · Σ_{i∈g} w.grad_i · (v_i − z),
    γ = 1/sqrt(G (2^b − 1)). Elements outside the range (m = 0) hold c clamped in both.
    """
    v = scaled(w.detach(), scale.detach(), zero_point, group)  # [N, K/G, G]
    z = zero_point.to(v.dtype).unsqueeze(-1)
    gamma = 1.0 / math.sqrt(v.shape[-1] * qmax(bits))
    corr = (grouped(w_grad.to(v.dtype), group) * (v - z)).sum(-1) * gamma
    return (lsq_grad.to(v.dtype) + corr).to(lsq_grad.dtype)


def hutchinson_trace(loss_fn: Callable[[], Tensor], found: list[Site], n_probes: int = 1, eps: float = 1e-2,
                     generator: Optional[torch.Generator] = None) -> dict[str, float]:
    """Per site, tr(H_v)/n by Hutchinson with a central finite difference of the gradient in q:

        z ~ Rademacher,  H_v z ≈ s ⊙ [∇_q L(q + ε s⊙z) − ∇_q L(q − ε s⊙z)] / (2ε)
        tr(H_v)/n ≈ mean_p ⟨z, H_v z⟩ / n

    evaluated at q = Q(W) (the fake-quantized weights, which the forward uses). Each site's forward
    is replaced for the duration by a plain ``F.linear`` on a leaf q (exact for a quadratic loss);
    all sites are probed at once, so each site's estimate also carries zero-mean cross terms.
    Costs 2 forward+backward passes of ``loss_fn`` per probe; parameters' .grad are not touched.
    """
    qs, zs, ss = [], [], []
    for st in found:
        q = st.quantizer
        qs.append(q.quantized_weight(st.weight).detach().to(torch.float32))
        ss.append(_per_weight(q.scale.detach().to(torch.float32).clamp_min(SCALE_FLOOR), q.group))
    acc = {st.name: 0.0 for st in found}
    saved_forward = [st.quantizer.__dict__.get("forward") for st in found]
    try:
        for _ in range(n_probes):
            zs = [(torch.randint(0, 2, q.shape, generator=generator).to(q.device, torch.float32) * 2 - 1) for q in qs]
            grads = []
            for sign in (1.0, -1.0):
                leaves = [(q + sign * eps * s * z).requires_grad_(True) for q, s, z in zip(qs, ss, zs)]
                for st, leaf in zip(found, leaves):
                    st.quantizer.forward = _fixed_linear(leaf)
                with torch.enable_grad():
                    grads.append(torch.autograd.grad(loss_fn(), leaves, allow_unused=True))
            for st, gp, gm, s, z in zip(found, grads[0], grads[1], ss, zs):
                if gp is None or gm is None:
                    raise ValueError(f"site `{st.name}`: loss_fn() does not depend on its weight")
                hz = s * (gp - gm) / (2 * eps)
                acc[st.name] += float((z * hz).sum()) / z.numel() / n_probes
    finally:
        for st, f in zip(found, saved_forward):
            if f is None:
                st.quantizer.__dict__.pop("forward", None)
            else:
                st.quantizer.forward = f
    return acc


def _per_weight(per_group: Tensor, group: int) -> Tensor:
    """[N, K/G] -> [N, K], each group's value repeated G times."""
    return per_group.repeat_interleave(group, dim=1)


def _fixed_linear(q_leaf: Tensor):
    def forward(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        return F.linear(x, q_leaf.to(x.dtype), None if bias is None else bias.to(x.dtype))
    return forward


# ----------------------------------------------------------------------------- training wiring

@dataclass(frozen=True)
class ElementwiseConfig:
    """A per-element rule and where it acts.

    Attributes:
        rule: "none", "ewgs" (B_i = 1 + δ sign(g_i) r_i), "gauss" (Gaussian-dithered slope, width ``sigma``)
            or "fourier" (StableQAT's factor, amplitude ``amplitude``, applied by this hook instead of the op:
            a control that separates the factor's shape from where it is applied).
        placement: "grad" (scale w.grad) or "update" (scale the optimizer's update, sign(g) = −sign(Δ)).
        delta: EWGS's δ; None fits it per layer by Hutchinson (:func:`hutchinson_trace`, :func:`ewgs_delta`)
            every ``refresh_every`` steps on the calibration loss.
        delta_mult: multiplies the fitted δ.
        sigma: width of "gauss" in scale units.
        amplitude: StableQAT's A for "fourier".
        cage: λ of :func:`cage_term` (0 = off), added to w.grad.
        code_period, code_steps: every ``code_period`` steps the last ``code_steps`` are code-preserving
            (codes held, scales on their exact gradient, latent weights frozen in v); 0 = never.
        refresh_every, n_probes: the Hutchinson refresh of δ (and the refresh period of a fitted shape).
        fit: for "shape" and "fourier": "fixed" (StableQAT's shape / ``amplitude``), "dither" (σ = the distance the
            weights travelled since the last refresh, :func:`jacquant.research.shape.dither_shape`) or "probe" (loss changes
            of ±δ probes regressed on the basis, :func:`jacquant.research.shape.probe_shape`; needs the calibration loss).
        per: "layer" (one shape per site) or "group" (one per group of G weights; not with "probe").
        n_basis: harmonics n of the shape family.
        shape_probes, probe_delta, probe_ridge: Probe's probes per refresh, their size δ (scale units), the ridge
            toward StableQAT's shape.
        sigma_min: the smallest dither width (bin units) "dither" uses.
        schedule: for "fourier" with ``fit="fixed"``, the amplitude over the T training steps: "constant" A,
            "decay" A·(1 − t/T) (StableQAT's shape early, STE at the end), "grow" A·t/T (STE early).
    """

    rule: str = "ewgs"
    placement: str = "grad"
    delta: Optional[float] = None
    delta_mult: float = 1.0
    sigma: float = 0.3
    amplitude: float = 0.21
    cage: float = 0.0
    code_period: int = 0
    code_steps: int = 0
    refresh_every: int = 100
    n_probes: int = 1
    fit: str = "fixed"
    per: str = "layer"
    n_basis: int = 3
    shape_probes: int = 32
    probe_delta: float = 0.5
    probe_ridge: float = 1.0
    sigma_min: float = 0.05
    schedule: str = "constant"

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"ElementwiseConfig.rule={self.rule!r} is not one of {RULES}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"ElementwiseConfig.placement={self.placement!r} is not one of {PLACEMENTS}")
        if self.delta is not None and not 0 <= self.delta < 2:
            raise ValueError(f"ElementwiseConfig.delta={self.delta} must lie in [0, 2) so that B stays positive")
        if self.code_period < 0 or not 0 <= self.code_steps <= self.code_period:
            raise ValueError(f"ElementwiseConfig code_steps={self.code_steps} must lie in [0, code_period={self.code_period}]")
        if self.refresh_every < 1 or self.n_probes < 1:
            raise ValueError("ElementwiseConfig.refresh_every and n_probes must be >= 1")
        if self.fit not in FITS or self.per not in PER:
            raise ValueError(f"ElementwiseConfig fit={self.fit!r} / per={self.per!r}: choose fit from {FITS}, per from {PER}")
        if self.fit != "fixed" and self.rule not in ("shape", "fourier"):
            raise ValueError(f"ElementwiseConfig.fit={self.fit!r} fits a shape: use rule 'shape' or 'fourier'")
        if self.fit == "probe" and self.per == "group":
            raise ValueError("ElementwiseConfig: fit='probe' regresses one shape per layer (per='layer'); a shape per "
                             "group would need more probes than any budget allows")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"ElementwiseConfig.schedule={self.schedule!r} is not one of {SCHEDULES}")
        if self.schedule != "constant" and (self.rule != "fourier" or self.fit != "fixed"):
            raise ValueError("ElementwiseConfig.schedule sets a hand schedule of the amplitude: rule 'fourier' with "
                             "fit 'fixed' only (a fitted amplitude follows the data)")
        if self.n_basis < 1 or self.shape_probes < 1:
            raise ValueError("ElementwiseConfig.n_basis and shape_probes must be >= 1")

    @property
    def needs_loss(self) -> bool:
        return (self.rule == "ewgs" and self.delta is None) or self.fit == "probe"

    @property
    def fitted(self) -> bool:
        return self.rule in ("shape", "fourier") and self.fit != "fixed"


class ElementwiseHooks:
    """Handle of :func:`attach`: ``deltas`` (the current δ per site), ``remove()``."""

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, config: ElementwiseConfig,
                 loss_fn: Optional[Callable[[], Tensor]], seed: int, steps: Optional[int] = None):
        found = list(sites(model))
        if not found:
            raise ValueError(f"{type(model).__name__} has no quantized site; call jacquant.transform(model, ...) first")
        bad = [s.name for s in found if s.quantizer.rule != "ste"]
        if bad:
            raise ValueError(f"per-element rules read w.grad as m·dL/dq: sites {bad[:3]} use another rule; "
                             "transform with method='ste'")
        scaled_min = [s.name for s in found if hasattr(s.quantizer, "affine_grid")]
        if scaled_min:
            raise ValueError(f"per-element rules act on the integer-zero-point grid: sites {scaled_min[:3]} use a GGUF "
                             "scale-and-min format (q4_1, q2_k); use a recipe without an elementwise rule for them")
        if config.schedule != "constant" and not (steps and steps > 0):
            raise ValueError(f"ElementwiseConfig.schedule={config.schedule!r} runs over the training steps: pass steps")
        self.steps = steps
        if config.needs_loss and loss_fn is None:
            raise ValueError("ElementwiseConfig with delta=None fits δ on a calibration loss: pass loss_fn")
        self.sites, self.config, self.loss_fn = found, config, loss_fn
        self.gen = torch.Generator().manual_seed(seed)
        self.t = 0
        self.deltas = {s.name: (config.delta if config.delta is not None else 0.0) for s in found}
        prior = fourier_shape(config.amplitude, config.n_basis)
        self.shapes = {s.name: prior.clone() for s in found}  # "shape": a per site, [n] or [N, K/G, n]
        self.amplitudes = {s.name: torch.tensor(float(config.amplitude)) for s in found}  # "fourier": A, [] or [N, K/G]
        self._before: dict[str, Tensor] = {}  # "dither": the weights at the last refresh
        self.history: list[dict] = []  # per refit: step, and per site the mean amplitude A and B(0)/B(1/2)
        self.seconds: list[float] = []  # per step: wall seconds inside the hooks, refits included (the rule's cost)
        self._pre_seconds = 0.0
        self._saved: list = []
        self._handles: list[RemovableHandle] = [optimizer.register_step_pre_hook(self._pre),
                                                optimizer.register_step_post_hook(self._post)]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def state_dict(self) -> dict:
        """What the hooks carry between steps: the step count (code phases), δ, the fitted shapes or amplitudes and
        the weights at the last refresh per site, the probes' RNG."""
        return {"t": self.t, "deltas": dict(self.deltas), "rng": self.gen.get_state(), "shapes": dict(self.shapes),
                "amplitudes": dict(self.amplitudes), "before": dict(self._before)}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (a resumed run then continues bit for bit)."""
        missing = set(self.deltas) - set(state["deltas"])
        if missing:
            raise ValueError(f"elementwise state has no δ for sites {sorted(missing)[:3]}: saved from another model?")
        self.t, self.deltas = int(state["t"]), {k: float(v) for k, v in state["deltas"].items()}
        self.gen.set_state(state["rng"])
        self.shapes = {k: v.clone() for k, v in state.get("shapes", self.shapes).items()}
        self.amplitudes = {k: v.clone() for k, v in state.get("amplitudes", self.amplitudes).items()}
        self._before = {k: v.clone() for k, v in state.get("before", {}).items()}

    def code_phase(self, t: int) -> bool:
        c = self.config
        return c.code_period > 0 and c.code_steps > 0 and t % c.code_period >= c.code_period - c.code_steps

    @torch.no_grad()
    def refresh(self) -> None:
        """Fit δ per site: Hutchinson tr(H_v)/n on the calibration loss, std of s ⊙ w.grad."""
        c = self.config
        traces = hutchinson_trace(self.loss_fn, self.sites, c.n_probes, generator=self.gen)
        for st in self.sites:
            q = st.quantizer
            g = q.as_nk(st.weight.grad) if st.weight.grad is not None else None
            if g is None:
                continue
            gv = g.to(torch.float32) * _per_weight(q.scale.detach().to(torch.float32), q.group)
            self.deltas[st.name] = c.delta_mult * ewgs_delta(traces[st.name], gv)

    @torch.no_grad()
    def refit(self) -> None:
        """Fit the shape ("shape") or the amplitude ("fourier") of every site (see :class:`ElementwiseConfig`.fit)."""
        c = self.config
        if c.fit == "probe":
            grads, offsets = [], []
            for st in self.sites:
                q = st.quantizer
                grads.append(q.as_nk(st.weight.grad) if st.weight.grad is not None else torch.zeros_like(q.as_nk(st.weight)))
                offsets.append(bin_offset(q.as_nk(st.weight), q.scale, q.zero_point, q.group))
            fitted = probe_shape(self.loss_fn, self.sites, grads, offsets, c.n_basis, c.probe_delta, c.shape_probes,
                                 fourier_shape(c.amplitude, c.n_basis), c.probe_ridge, self.gen)
        else:  # dither: σ = how far the weights moved since the last refresh (StableQAT's shape before any history)
            fitted = {}
            for st in self.sites:
                q, w = st.quantizer, st.quantizer.as_nk(st.weight).detach()
                if st.name in self._before:
                    sigma = travel(w, self._before[st.name], q.scale, q.group, c.per).clamp_min(c.sigma_min)
                    if c.rule == "fourier":
                        self.amplitudes[st.name] = amplitude_for_sigma(sigma, c.n_basis)
                    else:
                        fitted[st.name] = positive(dither_shape(sigma, c.n_basis))
                self._before[st.name] = w.clone()
        for name, a in fitted.items():
            self.shapes[name] = a
            if c.rule == "fourier":
                self.amplitudes[name] = amplitude_for_shape(a)
        self.history.append({"t": self.t, "amplitude": {n: float(v.float().mean()) for n, v in self.amplitudes.items()},
                             "contrast": {n: _contrast(a) for n, a in self.shapes.items()}})

    @torch.no_grad()
    def _factor(self, st: Site, r: Tensor, direction: Tensor) -> Tensor:
        c = self.config
        if c.rule == "ewgs":
            return ewgs_factor(r, direction, self.deltas[st.name])
        if c.rule == "gauss":
            return _gauss_periodic(r, c.sigma)
        if c.rule in ("fourier", "shape"):
            group = st.quantizer.group
            rg = r.reshape(r.shape[0], -1, group)  # [N, K/G, G]
            if c.rule == "fourier":
                amp = self.amplitudes[st.name] if c.fitted else \
                    scheduled_amplitude(c.amplitude, c.schedule, self.t, self.steps)
                amp = amp.unsqueeze(-1).to(r.device) if isinstance(amp, Tensor) and amp.ndim else amp
                return fourier_factor(rg, amp).reshape(r.shape)
            return self._shape(st, rg).reshape(r.shape)
        return torch.ones_like(r)

    def _shape(self, st: Site, v: Tensor) -> Tensor:
        """B of ``st``'s fitted shape at v [N, K/G, G] (r, or any v = r + integer: B is 1-periodic)."""
        a = self.shapes[st.name]
        return shape_factor(v, a.unsqueeze(-2) if a.ndim > 1 else a)

    @torch.no_grad()
    def _pre(self, opt, args, kwargs) -> None:
        start = time.perf_counter()
        self._pre_rule()
        self._pre_seconds = time.perf_counter() - start

    @torch.no_grad()
    def _pre_rule(self) -> None:
        c = self.config
        if c.rule == "ewgs" and c.needs_loss and self.t % c.refresh_every == 0:
            self.refresh()
        if c.fitted and self.t % c.refresh_every == 0:
            self.refit()
        code = self.code_phase(self.t)
        self._saved = []
        for st in self.sites:
            q, w = st.quantizer, st.weight
            if code:
                if q.scale.grad is not None and w.grad is not None:
                    q.scale.grad.copy_(exact_scale_grad(q.scale.grad, q.as_nk(w.grad), q.as_nk(w), q.scale,
                                                        q.zero_point, q.bits, q.group))
                w.grad = None  # the optimizer skips w: codes move only with the scale, undone in _post
                self._saved.append(q.scale.detach().clone())
                continue
            if w.grad is None:
                self._saved.append(None)
                continue
            g = q.as_nk(w.grad)
            if c.rule == "shape" and c.placement == "grad" and not c.cage:
                # B is 1-periodic: evaluated on v = w/s + z itself, r = v − round v is not needed (the step's cost)
                w_nk, a = q.as_nk(w).detach(), self.shapes[st.name].to(g.device)
                fuse = fused_cpu.usable(g, w_nk, q.scale, q.zero_point, a)
                args = (g, w_nk, q.scale.detach(), q.zero_point, q.group, a)
                fused_cpu.run("scale_by_shape", scale_by_shape_, *args) if fuse else scale_by_shape_(*args)
                self._saved.append(None)
                continue
            r = bin_offset(q.as_nk(w), q.scale, q.zero_point, q.group) if (c.rule != "none" or c.cage) else None
            if c.rule != "none" and c.placement == "grad":
                g.mul_(self._factor(st, r, g).to(g.dtype))
            if c.cage:
                g.add_(cage_term(r, g, c.cage).to(g.dtype))
            self._saved.append((w.detach().clone(), r) if c.rule != "none" and c.placement == "update" else None)

    @torch.no_grad()
    def _post(self, opt, args, kwargs) -> None:
        start = time.perf_counter()
        code = self.code_phase(self.t)
        for st, saved in zip(self.sites, self._saved):
            q, w = st.quantizer, st.weight
            if code:  # hold v = w/s + z: w ← w · s_new/s_old
                ratio = _per_weight(q.scale.detach().clamp_min(SCALE_FLOOR) / saved.clamp_min(SCALE_FLOOR), q.group)
                q.as_nk(w).mul_(ratio.to(w.dtype))
            elif saved is not None:
                w_old, r = saved
                delta = q.as_nk(w) - q.as_nk(w_old)
                b = self._factor(st, r, -delta)
                q.as_nk(w).copy_(q.as_nk(w_old) + b.to(w.dtype) * delta)
        self._saved = []
        self.t += 1
        self.seconds.append(self._pre_seconds + time.perf_counter() - start)


def _contrast(coeffs: Tensor) -> float:
    """B on a grid point over B on a threshold, mean over the groups: 1 for STE, small for a sharp shape."""
    ends = shape_factor(torch.tensor([0.0, 0.5]), coeffs.unsqueeze(-2) if coeffs.ndim > 1 else coeffs)
    return float((ends[..., 0] / ends[..., 1]).mean())


def _gauss_periodic(r: Tensor, sigma: float) -> Tensor:
    """:func:`gaussian_slope` of an interior weight from its bin offset r (thresholds at r = ±½, ±3/2),
    the clamped range ignored (the mask already zeroes gradients outside it)."""
    k = torch.tensor([-1.5, -0.5, 0.5, 1.5], dtype=torch.float32, device=r.device)
    d = (k - r.to(torch.float32).unsqueeze(-1)) / sigma
    return torch.exp(-0.5 * d * d).sum(-1) / (sigma * math.sqrt(2 * math.pi))


def attach(optimizer: torch.optim.Optimizer, model: nn.Module, config: ElementwiseConfig,
           loss_fn: Optional[Callable[[], Tensor]] = None, seed: int = 0, steps: Optional[int] = None) -> ElementwiseHooks:
    """Hook ``optimizer`` so that ``config``'s per-element rule acts on every quantized weight of ``model``.

    The sites must use rule "ste" (w.grad = m ⊙ dL/dq). Each ``optimizer.step()`` then: refreshes δ when
    due (EWGS with ``delta=None``; calls ``loss_fn`` twice per probe), and either (code phase) replaces the
    scales' gradients by :func:`exact_scale_grad`, skips the latent weights and rescales them to hold
    their codes, or applies the rule to w.grad (``placement="grad"``, plus CAGE's term) or to the update.
    ``steps``: the run's length, for an amplitude ``schedule``.
    """
    return ElementwiseHooks(optimizer, model, config, loss_fn, seed, steps)
