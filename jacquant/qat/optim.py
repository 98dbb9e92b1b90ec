"""Where B meets the optimizer, and a variance-reduced AdamW.

Adam-type optimizers divide by the running RMS of the gradient, which cancels a per-group
multiplier B that is constant over time. So B can sit in two places (method.md):

  (a) on the gradient: dL/dw = B·m·dL/dq. This is what ``method="jacquant"`` does in the op's
      backward; use any optimizer, nothing here is needed.
  (b) on the update, after preconditioning: w ← w + B ⊙ Δw_opt. :func:`scale_updates_by_b` hooks an
      existing optimizer so that, for every quantized weight, the update it computes is scaled by
      B expanded per group; the sites then use the clipped-STE gradient (rule ``"ste"``) so B is
      not applied twice.

:class:`MarsAdamW` is MARS-AdamW (variance reduction by a scaled gradient difference):

    c_t = g_t + γ · β1/(1 - β1) · (g_t - g_{t-1}),   c_t ← c_t / max(1, ‖c_t‖₂)   (per tensor)
    m_t = β1 m + (1 - β1) c_t,   v_t = β2 v + (1 - β2) c_t²
    w ← w - lr · (m_t/(1 - β1^t)) / (sqrt(v_t/(1 - β2^t)) + ε) - lr · λ_wd · w

:class:`SignSGD` is sign descent in given units, the rounding search of AutoRound on jacquant's latent weights:

    w ← w - lr · u ⊙ sign(∂L/∂w)      (u: the bin width s per weight, so lr is in bins per step)
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from jacquant.qat.quantizer import sites


def expand_b(jac: Tensor, group: int, transposed: bool) -> Tensor:
    """B [N, K/G] -> per-weight [N, K] (or [K, N] for a transposed site), repeating each value G times."""
    full = jac.repeat_interleave(group, dim=1)
    return full.t() if transposed else full


class UpdateScaling:
    """Handle returned by :func:`scale_updates_by_b`; ``remove()`` restores the optimizer and rules."""

    def __init__(self, handles: list[RemovableHandle], rules: list[tuple[nn.Module, str]]):
        self._handles, self._rules = handles, rules

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        for q, rule in self._rules:
            q.rule = rule
        self._handles, self._rules = [], []


def scale_updates_by_b(optimizer: torch.optim.Optimizer, model: nn.Module) -> UpdateScaling:
    """Place B on the update: after each ``optimizer.step()``, w ← w_old + B ⊙ (w_new - w_old).

    Applies to every quantized weight of ``model`` that ``optimizer`` updates (``torch.lerp``, so
    B = 1 leaves the step bit for bit unchanged). The sites' gradient rule is switched from
    "jacquant" to "ste" (B on the gradient would be cancelled by Adam and then applied twice);
    ``remove()`` undoes both. Costs one copy of the quantized weights per step.
    """
    found = list(sites(model))
    if not found:
        raise ValueError(f"{type(model).__name__} has no quantized site; call jacquant.transform(model, ...) first")
    owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
    targets = [s for s in found if id(s.weight) in owned]
    missing = [s.name for s in found if id(s.weight) not in owned]
    if missing:
        raise ValueError(f"optimizer does not update the quantized weights of {missing}; pass model.parameters() to it")
    rules = [(s.quantizer, s.quantizer.rule) for s in targets]
    for s in targets:
        if s.quantizer.rule == "jacquant":
            s.quantizer.rule = "ste"
    before: list[Tensor] = []

    def pre(opt, args, kwargs):
        before[:] = [s.weight.detach().clone() for s in targets]

    @torch.no_grad()
    def post(opt, args, kwargs):
        for s, w_old in zip(targets, before):
            q = s.quantizer
            b = expand_b(q.jac, q.group, q.transposed).to(s.weight.dtype)
            s.weight.copy_(torch.lerp(w_old, s.weight, b))
        before.clear()

    return UpdateScaling([optimizer.register_step_pre_hook(pre), optimizer.register_step_post_hook(post)], rules)


class _Corrected(torch.optim.Optimizer):
    """The loop both optimizers below share: for every parameter with a gradient, the MARS/STORM
    correction c_t = g_t + γ·β/(1 - β)·(g_t - g_{t-1}) (c_1 = g_1), then the subclass's update."""

    def _init_state(self, st: dict, p: Tensor) -> None:
        raise NotImplementedError

    def _update(self, p: Tensor, c: Tensor, st: dict, group: dict) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta = group["betas"][0] if "betas" in group else group["beta"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                st = self.state[p]
                if not st:
                    self._init_state(st, p)
                    st["prev_grad"] = g.clone()
                c = g + (group["gamma"] * beta / (1 - beta)) * (g - st["prev_grad"])
                st["prev_grad"].copy_(g)
                self._update(p, c, st, group)
        return loss


class MarsAdamW(_Corrected):
    """MARS-AdamW: AdamW on the variance-reduced, norm-clipped c_t (formula in the module docstring).

    ``gamma`` = γ (0 gives AdamW on gradients clipped to norm 1 per tensor); ``max_norm`` the clip.
    The first step has no previous gradient and uses c_1 = g_1.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.99),
                 eps: float = 1e-8, weight_decay: float = 0.0, gamma: float = 0.025, max_norm: float = 1.0):
        if lr < 0 or eps < 0 or weight_decay < 0 or gamma < 0 or max_norm <= 0:
            raise ValueError(f"MarsAdamW: lr={lr}, eps={eps}, weight_decay={weight_decay}, gamma={gamma} must be >= 0 "
                             f"and max_norm={max_norm} > 0")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"MarsAdamW: betas={betas} must lie in [0, 1)")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, gamma=gamma,
                                      max_norm=max_norm))

    def _init_state(self, st: dict, p: Tensor) -> None:
        st["step"] = torch.zeros((), dtype=torch.float32)
        st["exp_avg"] = torch.zeros_like(p)
        st["exp_avg_sq"] = torch.zeros_like(p)

    def _update(self, p: Tensor, c: Tensor, st: dict, group: dict) -> None:
        b1, b2 = group["betas"]
        norm = torch.linalg.vector_norm(c)
        c = c / torch.clamp(norm / group["max_norm"], min=1.0)
        st["step"] += 1
        t = float(st["step"])
        st["exp_avg"].mul_(b1).add_(c, alpha=1 - b1)
        st["exp_avg_sq"].mul_(b2).addcmul_(c, c, value=1 - b2)
        denom = (st["exp_avg_sq"] / (1 - b2 ** t)).sqrt_().add_(group["eps"])
        if group["weight_decay"]:
            p.mul_(1 - group["lr"] * group["weight_decay"])
        p.addcdiv_(st["exp_avg"], denom, value=-group["lr"] / (1 - b1 ** t))


class SignSGD(torch.optim.Optimizer):
    """Sign descent in per-element units: p ← p − lr · u ⊙ sign(∂L/∂p).

    A param group may carry ``units``, one tensor per parameter broadcastable to it (default: 1 for every
    element). With u the quantization bin width of each weight (its group's scale), ``lr`` is the fraction of a
    bin a weight may move per step whatever its group's scale: AutoRound's rounding offsets V (∈ [−½, ½] bins,
    lr 1/iterations) trained on the latent weight w = w₀ + s·V instead of a separate tensor.
    """

    def __init__(self, params: Iterable, lr: float = 5e-3):
        if not lr >= 0:
            raise ValueError(f"SignSGD: lr={lr} must be >= 0")
        super().__init__(params, dict(lr=lr, units=None))
        for group in self.param_groups:
            units = group["units"]
            if units is not None and len(units) != len(group["params"]):
                raise ValueError(f"SignSGD: {len(units)} units for {len(group['params'])} parameters in a group")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            units = group["units"] or [None] * len(group["params"])
            for p, u in zip(group["params"], units):
                if p.grad is None:
                    continue
                d = p.grad.sign()
                p.add_(d if u is None else d * u, alpha=-group["lr"])
        return loss
