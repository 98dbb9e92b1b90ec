"""GPTQ on jacquant's grid: Hessian-aware rounding of one weight matrix, as pure functions.

For a linear layer y = x·W^T with calibration inputs X [M, K], the output error of a rounded
weight Q is ‖X (W − Q)^T‖² = Σ_rows (w − q) H (w − q)^T with H = X^T X [K, K]. GPTQ (Frantar et
al. 2023) rounds the columns of W one at a time, in order, and after rounding column j moves the
columns not yet rounded so as to cancel its error in the least-squares sense:

    e_j = (w_j − q_j) / U_jj            w_{j+1:} ← w_{j+1:} − e_j · U_{j, j+1:}

where U is the upper Cholesky factor of H^{-1} (H damped by λ·mean(diag H)·I), so U_{j, j:} / U_jj
is the optimal update of the remaining columns given the columns already fixed (the Optimal Brain
Surgeon step). The column updates are applied in blocks (lazy batch updates) with the same result.

Grid: each group of G columns gets its scale s and integer zero point z from the group's columns
*as they are when its first column is reached* (after the error feedback of the groups before it),
by jacquant's own init (:func:`jacquant.primitives.grid.init_scale`: min/max or the MSE clipping search),
so the result lives on the same grid as the fake-quant op: Q = s·(clamp(round(w/s + z), 0, 2^b − 1) − z).

The *latent* weight returned is each column as it was when it was rounded (the error-compensated
value, not the original): Q(latent) is exactly GPTQ's result, and QAT continues from those latent
weights, whose offsets inside their bins still carry GPTQ's rounding margins.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from jacquant.primitives.grid import fake_quantize, group_size, init_scale


def damped_hessian(h: Tensor, damp: float = 0.01) -> tuple[Tensor, Tensor]:
    """(H + λ·mean(diag H)·I with dead inputs made harmless, dead mask).

    A dead input (diag H = 0: never nonzero in the calibration data) gets H_jj = 1, so the Cholesky
    factor exists; its weight does not affect the calibration output, and GPTQ rounds it like RTN.
    """
    if h.ndim != 2 or h.shape[0] != h.shape[1]:
        raise ValueError(f"the Hessian must be square [K, K], got {tuple(h.shape)}")
    h = h.to(torch.float64).clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    lam = damp * torch.diagonal(h).mean()
    h += lam * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    return h, dead


def inverse_cholesky(h: Tensor) -> Tensor:
    """U, the upper Cholesky factor of H^{-1} (H^{-1} = U^T U), float64 [K, K]."""
    lower = torch.linalg.cholesky(h)
    return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)


def gptq_quantize(
    w: Tensor, h: Tensor, bits: int, group: int, *, init: str = "mse", symmetric: bool = False,
    damp: float = 0.01, block: int = 128, stored_scale: Optional[Callable[[Tensor], Tensor]] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """GPTQ of ``w`` [N, K] against the Hessian ``h`` = X^T X [K, K] on the b-bit grid with groups of ``group``.

    Returns (latent weights [N, K] in w's dtype, scale float32 [N, K/G], zero point uint8 [N, K/G]) with
    ``fake_quantize(latent, scale, zero_point, bits, group)`` the rounded weight (see the module docstring).
    ``init`` chooses each group's scale ("minmax" or "mse"), ``damp`` is λ, ``block`` the lazy-update width
    (rounded up to a multiple of G; it changes the arithmetic's order only). ``stored_scale`` maps a group's
    fitted scale to the value the forward will multiply by (e.g. rounded to fp16 for GGUF's Q4_0), so the
    columns are rounded, and their errors fed forward, on the grid the model will really use.
    """
    n, k = w.shape
    g = group_size(k, group)
    if k % g:
        raise ValueError(f"in_features {k} is not divisible by group {g}")
    if h.shape != (k, k):
        raise ValueError(f"the Hessian is {tuple(h.shape)}, the weight has K = {k}: it must be [{k}, {k}]")
    hd, dead = damped_hessian(h, damp)
    u = inverse_cholesky(hd)
    W = w.detach().to(torch.float64).clone()
    W[:, dead] = 0.0  # as GPTQ does: a dead input's weight carries no signal
    latent = torch.empty_like(W)
    scale = torch.empty(n, k // g, dtype=torch.float32, device=w.device)
    zero = torch.empty(n, k // g, dtype=torch.uint8, device=w.device)
    block = max(g, -(-block // g) * g)
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        Wb = W[:, b0:b1].clone()  # the block's columns, updated column by column
        err = torch.zeros_like(Wb)
        for j in range(b1 - b0):
            col = b0 + j
            if col % g == 0:  # a new group: its grid from its columns as they are now
                s, z = init_scale(Wb[:, j:j + g].to(torch.float32), bits, g, init, symmetric)
                s = stored_scale(s) if stored_scale is not None else s
                scale[:, col // g], zero[:, col // g] = s[:, 0], z[:, 0]
            wj = Wb[:, j]
            latent[:, col] = wj
            qj = fake_quantize(wj.to(torch.float32).unsqueeze(1), scale[:, col // g:col // g + 1],
                               zero[:, col // g:col // g + 1], bits, 1).squeeze(1).to(torch.float64)
            e = (wj - qj) / u[col, col]
            Wb[:, j:] -= e.unsqueeze(1) * u[col, col:b1].unsqueeze(0)
            err[:, j] = e
        W[:, b1:] -= err @ u[b0:b1, b1:]
    return latent.to(w.dtype), scale, zero


def output_error(w: Tensor, q: Tensor, h: Tensor) -> float:
    """‖X (W − Q)^T‖² = Σ_rows (w − q) H (w − q)^T for H = X^T X: the calibration output error of Q."""
    d = (w - q).to(torch.float64)
    return float(((d @ h.to(torch.float64)) * d).sum())
