"""The data-driven estimator of JacQuant's B̂ [N, K/G]: they measure the training loss at perturbed weights.

Notation as in :mod:`jacquant.primitives.estimators` (the closed forms over one weight tensor):
v = w/s + z, groups of G along K. :func:`data_probe` perturbs every site's
weights at once (antithetic pairs ±), reads the loss, and regresses the change on the perturbation
per group; the weights are restored bit for bit afterwards.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator, Optional

import torch
from torch import Tensor
from tqdm.auto import tqdm

from jacquant.primitives.estimators import _check_width
from jacquant.primitives.grid import SCALE_FLOOR, grouped
from jacquant.qat.quantizer import Site, sites


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
