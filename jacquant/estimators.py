"""Estimators of JacQuant's group-wise Jacobian surrogate B̂ [N, K/G] (method.md).

Notation: v = w/s + z (v-units: one unit is one scale step), b bits, q = 2^b - 1 the largest code,
decision thresholds τ_k = k + 1/2 for k = 0 .. q - 1 (between code k and code k + 1).

Closed forms over one weight tensor W [N, K] (no data):

    dither   B̂_g = mean_i (1/h) · #{k : v_i - h/2 < τ_k <= v_i + h/2}
                  = mean_i d/dw E_u[Q(w_i + u)],   u ~ U(-h·s/2, h·s/2)
    probe    B̂_g = mean_i [Q(w_i + δ_i) - Q(w_i - δ_i)] / (2 δ_i),   δ_i ~ U(0, δ_max · s)

The identity that ties them: for one fixed δ, Q(w + δ) - Q(w - δ) = s · #{τ_k in (v - δ/s, v + δ/s]},
so [Q(w+δ) - Q(w-δ)]/(2δ) is *exactly* the dither term with width h = 2δ/s. Averaging over
δ ~ U(0, δ_max·s) (h ~ U(0, H), H = 2·δ_max) gives, with d_k = |v - τ_k|,

    E_δ[probe_i] = (1/H) ∫_0^H dither_i(h) dh = (1/H) · Σ_k max(0, ln(H / (2 d_k)))

(:func:`probe_mean`). Sampled probe is therefore a log-weighted, wider-tailed Dither; its variance
grows as a weight approaches a threshold, so tests keep weights off the thresholds.

Data-driven (measures the loss): :func:`data_probe`, :func:`data_dither`.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterable, Iterator, Optional

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .quantizer import SCALE_FLOOR, fake_quantize, grouped, qmax, scaled
from .site import Site, sites


def _check_width(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name}={value!r} must be a positive finite width in scale units (e.g. 1.0)")


def threshold_count(v: Tensor, bits: int, h: float) -> Tensor:
    """#{k in 0..q-1 : v - h/2 < k + 1/2 <= v + h/2}, same shape as v (float).

    The window is half-open so that a weight on a grid point (e.g. w = 0, v = z) sees exactly one
    threshold at h = 1, as the clipped-STE mask says. Counted in closed form: k runs from
    floor(v - h/2 - 1/2) + 1 to floor(v + h/2 - 1/2), cut to [0, q-1].
    """
    q = qmax(bits)
    lo = (torch.floor(v - (h + 1) / 2) + 1).clamp_min(0)
    hi = torch.floor(v + (h - 1) / 2).clamp_max(q - 1)
    return (hi - lo + 1).clamp_min(0)


def dither(w: Tensor, scale: Tensor, zero_point: Tensor, bits: int, group: int, h: float) -> Tensor:
    """Closed-form Dither estimate, one value per group, float32 [N, K/G].

        B̂_g = mean_{i in g} (1/h) · #{thresholds τ_k = k + 1/2 with v_i - h/2 < τ_k <= v_i + h/2},  v = w/s + z

    the slope of the dithered quantizer E_u[Q(w + u)], u ~ U(-h·s/2, h·s/2). With h = 1 it equals
    the clipped-STE mask mean, mean_i 1[0 <= v_i <= 2^b - 1], at every v except v = 2^b - 1 exactly
    (the top edge, where the half-open window counts no threshold; a null set). ``h`` is in scale units. Finite for
    every finite w (an all-zero group at SCALE_FLOOR gives v = z exactly).
    """
    _check_width("dither width h", h)
    v = scaled(w.detach(), scale.detach(), zero_point, group)  # [N, K/G, G]
    return (threshold_count(v, bits, h) / h).mean(-1).to(torch.float32)


def probe_from_deltas(w: Tensor, scale: Tensor, zero_point: Tensor, bits: int, group: int, delta: Tensor) -> Tensor:
    """Probe estimate for given absolute half-widths δ (a tensor like w, δ > 0), float32 [N, K/G].

        B̂_g = mean_{i in g} [Q(w_i + δ_i) - Q(w_i - δ_i)] / (2 δ_i)

    For a constant δ this equals :func:`dither` with h = 2δ/s.
    """
    if delta.shape != w.shape:
        raise ValueError(f"probe delta has shape {tuple(delta.shape)}; it must match the weight {tuple(w.shape)}")
    if not bool((delta > 0).all()):
        raise ValueError("probe delta must be > 0 everywhere (it divides the finite difference)")
    w = w.detach().to(torch.float32)
    d = delta.to(torch.float32)
    diff = fake_quantize(w + d, scale.detach(), zero_point, bits, group) - fake_quantize(w - d, scale.detach(), zero_point, bits, group)
    return grouped(diff / (2 * d), group).mean(-1)


def probe(
    w: Tensor, scale: Tensor, zero_point: Tensor, bits: int, group: int, delta_max: float,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Sampled Probe: δ_i ~ U(0, δ_max·s_g] per element, then :func:`probe_from_deltas`; [N, K/G].

    ``delta_max`` is in scale units; ``generator`` is a CPU generator (the draw is moved to w's device).
    E[B̂] = :func:`probe_mean` (Dither averaged over widths h ~ U(0, 2·δ_max)).
    """
    return probe_from_deltas(w, scale, zero_point, bits, group, probe_deltas(w, scale, group, delta_max, generator))


def probe_deltas(
    w: Tensor, scale: Tensor, group: int, delta_max: float, generator: Optional[torch.Generator] = None
) -> Tensor:
    """The Probe's widths δ_i ~ U(0, δ_max·s_g] in weight units, [N, K] fp32 on w's device."""
    _check_width("probe delta_max", delta_max)
    u = 1.0 - torch.rand(w.shape, generator=generator, dtype=torch.float32)  # (0, 1]
    s = scale.detach().to(torch.float32).clamp_min(SCALE_FLOOR).unsqueeze(-1)  # [N, K/G, 1]
    return (grouped(u.to(w.device), group) * (delta_max * s)).reshape(w.shape)


def probe_mean(w: Tensor, scale: Tensor, zero_point: Tensor, bits: int, group: int, delta_max: float) -> Tensor:
    """E_δ of :func:`probe`, in closed form, float32 [N, K/G].

        E[B̂_g] = mean_i (1/H) Σ_k max(0, ln(H / (2 |v_i - τ_k|))),   H = 2·δ_max

    Infinite for a weight exactly on a threshold (the sampled probe stays finite, s/(2δ)).
    """
    _check_width("probe delta_max", delta_max)
    H = 2.0 * delta_max
    v = scaled(w.detach(), scale.detach(), zero_point, group).to(torch.float64).unsqueeze(-1)  # [N, K/G, G, 1]
    tau = torch.arange(qmax(bits), dtype=torch.float64, device=v.device) + 0.5
    d = (v - tau).abs()
    return (torch.log(H / (2 * d)).clamp_min(0).sum(-1) / H).mean(-1).to(torch.float32)


def _data_sites(name: str, model_or_sites, n_probes: int) -> list[Site]:
    """The sites a data-driven estimator fits, after checking ``n_probes``."""
    if not isinstance(n_probes, int) or n_probes < 1:
        raise ValueError(f"{name} n_probes={n_probes!r} must be a positive int")
    found = list(sites(model_or_sites)) if isinstance(model_or_sites, torch.nn.Module) else list(model_or_sites)
    if not found:
        raise ValueError(f"{name} found no quantized site; call jacquant.transform(model, ...) first")
    return found


def _ste_gradients(loss_fn: Callable[[], Tensor], found: list[Site]) -> list[Tensor]:
    """m ⊙ dL/dq per site through the clipped-STE rule, grouped [N, K/G, G] fp32."""
    rules = [s.quantizer.rule for s in found]
    try:
        for s in found:
            s.quantizer.rule = "ste"
        loss = loss_fn()
        grads = torch.autograd.grad(loss, [s.weight for s in found], allow_unused=True)
    finally:
        for s, r in zip(found, rules):
            s.quantizer.rule = r
    out = []
    for s, g in zip(found, grads):
        if g is None:
            raise ValueError(f"site `{s.name}`: loss_fn() does not depend on its weight; pass a loss over the whole model")
        out.append(grouped(s.quantizer.as_nk(g).detach().to(torch.float32), s.quantizer.group))
    return out


def _set_weights(found: list[Site], saved: list[Tensor], steps: list[Tensor], sign: float) -> None:
    for s, w0, st in zip(found, saved, steps):
        w0nk = s.quantizer.as_nk(w0)
        s.quantizer.as_nk(s.weight).copy_((grouped(w0nk, s.quantizer.group) + sign * st).reshape(w0nk.shape))


@contextlib.contextmanager
def _weights_restored(found: list[Site]) -> Iterator[list[Tensor]]:
    """Yields copies of the sites' weights, and writes them back bit for bit on exit; no autograd inside."""
    saved = [s.weight.detach().clone() for s in found]
    try:
        with torch.no_grad():
            yield saved
    finally:
        with torch.no_grad():
            for s, w0 in zip(found, saved):
                s.weight.copy_(w0)


def _antithetic(loss_fn: Callable[[], Tensor], found: list[Site], saved: list[Tensor], steps: list[Tensor]) -> float:
    """ΔL = L(W0 + step) − L(W0 − step), every site moved at once (steps grouped [N, K/G, G])."""
    _set_weights(found, saved, steps, 1.0)
    loss_plus = float(loss_fn())
    _set_weights(found, saved, steps, -1.0)
    return loss_plus - float(loss_fn())


def data_dither(
    loss_fn: Callable[[], Tensor],
    model_or_sites: torch.nn.Module | Iterable[Site],
    sigma: float,
    n_probes: int,
    generator: Optional[torch.Generator] = None,
) -> dict[str, Tensor]:
    """Data-driven Dither (method.md): fit B̂ per group from antithetic Gaussian dithers of the loss.

    With a = m ⊙ dL/dq (the clipped-STE gradient), per probe p a dither u ~ N(0, σ² s_g²) on every
    weight of every site at once:

        ΔL_p = L(Q(W + u)) − L(Q(W − u)),     ĝ_p = ΔL_p · u / (2 σ² s²)
        B̂_g  = mean_p ⟨ĝ_p,g, a_g⟩ / ‖a_g‖²

    ĝ estimates the gradient of the smoothed loss E_u L(Q(W + u)) (Stein's lemma, antithetic). For a
    loss linear in Q, L = ⟨C, Q(W)⟩, E[B̂_g] = Σ_i C_i a_i D_i / Σ_i a_i², D_i the Gaussian-dithered
    slope :func:`jacquant.elementwise.gaussian_slope` at v_i (a test checks this). Different groups'
    terms are zero-mean noise that falls as 1/sqrt(n_probes). A group with ‖a_g‖ = 0 gets B̂ = 1.
    ``sigma`` is in scale units. Weights are restored bit for bit afterwards.
    """
    _check_width("data_dither sigma", sigma)
    found = _data_sites("data_dither", model_or_sites, n_probes)
    a_dir = _ste_gradients(loss_fn, found)
    sd = [sigma * s.quantizer.scale.detach().to(torch.float32).clamp_min(SCALE_FLOOR) for s in found]  # [N, K/G]
    num = [torch.zeros_like(e) for e in sd]
    with _weights_restored(found) as saved:
        for _ in range(n_probes):
            us = [torch.randn(a.shape, generator=generator).to(a.device) * e.unsqueeze(-1) for a, e in zip(a_dir, sd)]
            dl = _antithetic(loss_fn, found, saved, us)
            for i, (u, a, e) in enumerate(zip(us, a_dir, sd)):
                num[i] += dl * (u * a).sum(-1) / (2 * e * e)
    out = {}
    for s, n_, a in zip(found, num, a_dir):
        den = a.square().sum(-1)
        out[s.name] = torch.where(den > 0, n_ / n_probes / den.clamp_min(torch.finfo(torch.float32).tiny),
                                  torch.ones_like(den))
    return out


def data_probe(
    loss_fn: Callable[[], Tensor],
    model_or_sites: torch.nn.Module | Iterable[Site],
    delta: float,
    n_probes: int,
    generator: Optional[torch.Generator] = None,
    progress: bool = False,
) -> dict[str, Tensor]:
    """Data-driven Probe: fit B̂ per group from the loss itself; returns {site name: B̂ [N, K/G]}.

    ``loss_fn()`` evaluates the (transformed) model on a fixed calibration batch and returns a scalar;
    it must be deterministic (eval mode, no dropout): two calls at the same weights must agree.
    With a = m ⊙ dL/dq (the clipped-STE gradient at the current weights), per probe p a random sign
    vector r (±1 per weight, all sites at once), and ε_g = δ·s_g:

        ΔL_p  = L(Q(W + ε r)) - L(Q(W - ε r))                     (two extra forward passes)
        a_g,p = 2 ε_g ⟨a_g, r_g⟩
        B̂_g   = Σ_p ΔL_p · a_g,p / Σ_p a_g,p²

    Linearising, ΔL_p ≈ Σ_g B_g a_g,p and the a's of different groups are uncorrelated (random
    signs), so each B̂_g is a least-squares slope whose noise (the other groups' terms) falls as
    1/sqrt(n_probes). A group with no gradient (Σ a² = 0, e.g. all codes clamped) gets B̂ = 1 (STE).
    ``delta`` is in scale units. Weights are restored bit for bit afterwards.
    """
    _check_width("data_probe delta", delta)
    found = _data_sites("data_probe", model_or_sites, n_probes)
    a_dir = _ste_gradients(loss_fn, found)  # [N, K/G, G] per site
    eps = [delta * s.quantizer.scale.detach().to(torch.float32).clamp_min(SCALE_FLOOR) for s in found]  # [N, K/G]
    num = [torch.zeros_like(e) for e in eps]
    den = [torch.zeros_like(e) for e in eps]
    with _weights_restored(found) as saved:
        for _ in tqdm(range(n_probes), desc="data_probe", disable=not progress):
            steps, slopes = [], []
            for e, a in zip(eps, a_dir):
                r = torch.randint(0, 2, a.shape, generator=generator).to(a.device, torch.float32) * 2 - 1
                steps.append(e.unsqueeze(-1) * r)  # ε r [N, K/G, G]
                slopes.append(2 * e * (a * r).sum(-1))  # a_g,p [N, K/G]
            dl = _antithetic(loss_fn, found, saved, steps)
            for i, ap in enumerate(slopes):
                num[i] += dl * ap
                den[i] += ap * ap
    out = {}
    for s, n_, d_ in zip(found, num, den):
        out[s.name] = torch.where(d_ > 0, n_ / d_.clamp_min(torch.finfo(torch.float32).tiny), torch.ones_like(d_))
    return out
