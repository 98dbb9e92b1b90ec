"""QAT diagnostics per quantized site: code flips, clamping, B, distance to the thresholds.

For a site with v = w/s + z, codes c = clamp(round v, 0, q), q = 2^b - 1, thresholds τ_k = k + 1/2:

    flip_rate   mean_i 1[c_i != c_i at the previous call]       (None on the first call)
    clamped     mean_i 1[v_i < 0 or v_i > q]                      (1 - clipped-STE mask mean)
    b_mean, b_min, b_max                                          (B over the site's groups)
    thr_dist    mean_i min_k |v_i - τ_k|                          (in scale units, 0 .. 1/2 inside)

The previous codes live in a non-persistent buffer ``prev_codes`` on each quantizer (not in the
state_dict). :class:`StatsLogger` appends one JSON line per call; :func:`jacquant.qat.plot.plot` draws it.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch
import torch.nn as nn

from jacquant.primitives.grid import qmax, scaled
from jacquant.qat.quantizer import sites

PREV = "prev_codes"


@torch.no_grad()
def site_stats(quantizer: nn.Module, weight: torch.Tensor) -> dict[str, Optional[float]]:
    """The diagnostics of one site (see module docstring); updates its ``prev_codes``."""
    q = quantizer
    v = scaled(*q.grid_inputs(q.as_nk(weight.detach())), q.group)  # [N, K/G, G]
    top = qmax(q.bits)
    codes = v.round().clamp(0, top).to(torch.uint8)
    prev = getattr(q, PREV, None)
    flip = None if prev is None or prev.shape != codes.shape else float((codes != prev).float().mean())
    if prev is None or prev.shape != codes.shape:
        q.register_buffer(PREV, codes.clone(), persistent=False)
    else:
        prev.copy_(codes)
    nearest = (v - 0.5).round().clamp(0, top - 1) + 0.5
    b = q.jac.float()
    return {
        "flip_rate": flip,
        "clamped": float(((v < 0) | (v > top)).float().mean()),
        "b_mean": float(b.mean()), "b_min": float(b.min()), "b_max": float(b.max()),
        "thr_dist": float((v - nearest).abs().mean()),
        "numel": int(v.numel()),
    }


def stats(model: nn.Module) -> dict[str, dict[str, Optional[float]]]:
    """{site name: diagnostics} for every quantized site; flip rates are since the previous call."""
    out = {s.name: site_stats(s.quantizer, s.weight) for s in sites(model)}
    if not out:
        raise ValueError(f"{type(model).__name__} has no quantized site; call jacquant.transform(model, ...) first")
    return out


@torch.no_grad()
def model_codes(model: nn.Module) -> list[torch.Tensor]:
    """The integer codes c = clamp(round(w/s + z), 0, q) of every quantized site, in ``sites(model)`` order."""
    return [s.quantizer.codes(s.weight) for s in sites(model)]


def codes_moved(before: list[torch.Tensor], after: list[torch.Tensor]) -> float:
    """The fraction of codes that differ between two :func:`model_codes` of one model:
    Σ_sites #{i : c_i ≠ c'_i} / Σ_sites #c (how far training, or another start, has moved the integer model)."""
    changed = sum(int((a != b).sum()) for a, b in zip(before, after, strict=True))
    return changed / sum(a.numel() for a in before)


def aggregate(per_site: dict[str, dict[str, Optional[float]]]) -> dict[str, Optional[float]]:
    """Weight-count-weighted means over sites (min/max of B over all sites)."""
    n = sum(d["numel"] for d in per_site.values())
    agg: dict[str, Optional[float]] = {}
    for key in ("flip_rate", "clamped", "b_mean", "thr_dist"):
        vals = [(d[key], d["numel"]) for d in per_site.values()]
        agg[key] = None if any(v is None for v, _ in vals) else sum(v * k for v, k in vals) / n
    agg["b_min"] = min(d["b_min"] for d in per_site.values())
    agg["b_max"] = max(d["b_max"] for d in per_site.values())
    return agg


class StatsLogger:
    """Appends ``{"step", "loss", "all": aggregate, "sites": {name: stats}}`` as one JSON line per ``log``."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        parent = os.path.dirname(self.path)
        if parent:
            os.makedirs(parent, exist_ok=True)

    def log(self, model: nn.Module, step: int, loss: Optional[float] = None) -> dict:
        per_site = stats(model)
        record = {"step": int(step), "loss": None if loss is None else float(loss), "all": aggregate(per_site),
                  "sites": per_site}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        return record
