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

The data-driven estimators, which measure the loss, are in :mod:`jacquant.qat.data_estimators`.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from jacquant.primitives.grid import SCALE_FLOOR, fake_quantize, grouped, qmax, scaled


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
