"""The learned shape of the quantizer's Jacobian across a bin: a family, and the Dither fit of it.

Notation (method.md): v = w/s + z, r = v − round(v) ∈ [−½, ½] the position of a weight in its bin
(r = 0 on a grid point, r = ±½ on a decision threshold), g = m ⊙ dL/dq the clipped-STE gradient.
A per-element surrogate multiplies g by B(r). The family:

    B(r) = 1 + Σ_{k=1}^{n} a_k · cos(2πk r)            (mean 1 over the bin; a = 0 is STE)

with one coefficient vector a per layer. StableQAT's factor f_A(r) = (1 − c·cos πr)/(1 + c·cos πr),
c = √2·π·A, is, divided by its mean, one point of it (:func:`fourier_shape`): the prior before any fit.
Under AdamW a constant factor cancels, so only the *shape* (the ratio between weights at different r, and
how it changes as weights move) can matter; the mean-1 normalisation just fixes the scale.

The fit (Dither, :func:`dither_shape`): the slope of the Gaussian-dithered quantizer, d/dw E_u[Q(w + u)],
u ~ N(0, σ²s²), as a function of r is a periodic comb of Gaussians centred on the thresholds, whose
Fourier series is exactly  1 + Σ_k 2(−1)^k e^{−2π²k²σ²} cos(2πk r)  (mean 1). σ is *measured*: the
distance the weights actually travel between refreshes, RMS |w_t − w_{t−K}|/s per layer (:func:`travel`):
a layer whose weights move a bin or more gets STE, one whose weights creep gets a sharp shape. Every fitted
shape is made safe (:func:`positive`): if B dips below ``b_min`` anywhere in the bin, the coefficients are
shrunk toward 0 until it does not.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from jacquant.primitives.grid import SCALE_FLOOR, grouped, scaled

_GRID = (torch.arange(200, dtype=torch.float32) + 0.5) / 200 - 0.5  # bin midpoints: means are exact for low harmonics


def cosine_basis(r: Tensor, n: int) -> Tensor:
    """cos(2πk r) for k = 1..n, shape [*r.shape, n] (float32)."""
    k = torch.arange(1, n + 1, dtype=torch.float32, device=r.device)
    return torch.cos(2 * math.pi * r.to(torch.float32).unsqueeze(-1) * k)


def shape_factor(r: Tensor, coeffs: Tensor) -> Tensor:
    """B(r) = 1 + Σ_k a_k cos(2πk r); ``coeffs`` [n] (one shape) or [..., n] broadcasting against r's shape.

    B is 1-periodic, so r may be any v = r + integer (the scaled weight w/s + z itself: no rounding needed).
    One cosine per element, c = cos 2πr, then the series in c by Clenshaw's recurrence (cos 2πkr = T_k(c)):

        b_{n+1} = b_{n+2} = 0,   b_k = a_k + 2c·b_{k+1} − b_{k+2}  (k = n..1),   B = 1 + c·b_1 − b_2

    in place on two buffers (no [*r.shape, n] tensor: this runs on every weight at every step)."""
    a = coeffs.to(device=r.device, dtype=torch.float32)
    c = r.to(torch.float32).mul(2 * math.pi).cos_()
    out_shape = torch.broadcast_shapes(c.shape, a.shape[:-1])  # a shape per group may outnumber r (B at 2 points)
    b1 = a[..., -1].expand(out_shape).clone()  # b_n
    b2 = torch.zeros(out_shape, device=c.device)  # b_{n+1}
    for k in range(a.shape[-1] - 2, -1, -1):  # b_k for k = n−1..1 (a[..., k] is a_{k+1})
        b2.neg_().addcmul_(c, b1, value=2.0).add_(a[..., k])
        b1, b2 = b2, b1
    return b2.neg_().addcmul_(c, b1).add_(1.0)


def scale_by_shape_(grad: Tensor, w: Tensor, scale: Tensor, zero_point: Tensor, group: int, coeffs: Tensor) -> Tensor:
    """grad ← grad · B(v), v = w/s + z, in place; ``grad`` and ``w`` [N, K], ``coeffs`` [n] (one shape for the
    layer) or [N, K/G, n] (one per group). The shape hook's step: what :mod:`jacquant.kernels.fused_cpu` fuses
    into one loop over the weight. Returns ``grad``."""
    v = scaled(w, scale, zero_point, group)  # [N, K/G, G]; B is 1-periodic, so v serves for r
    b = shape_factor(v, coeffs if coeffs.ndim == 1 else coeffs.unsqueeze(-2))
    return grad.mul_(b.reshape(grad.shape).to(grad.dtype))


def fourier_factor(r: Tensor, amplitude) -> Tensor:
    """StableQAT's f_A(r) = (1 − c cos πr)/(1 + c cos πr), c = √2·π·A (A a float or a tensor broadcasting on r)."""
    c = math.sqrt(2.0) * math.pi * amplitude * torch.cos(math.pi * r.to(torch.float32))
    return (1 - c) / (1 + c)


def project(values: Tensor, n: int) -> Tensor:
    """Coefficients a [n] of the mean-1 cosine series nearest to ``values`` sampled on the bin grid (divided by
    their mean first): a_k = 2·mean_r(f(r)/mean f · cos 2πk r), the orthogonal projection on [−½, ½]."""
    f = values / values.mean()
    return 2 * (f.unsqueeze(-1) * cosine_basis(_GRID, n)).mean(0)


def fourier_shape(amplitude: float, n: int) -> Tensor:
    """StableQAT's factor with amplitude A as a point of the family: :func:`project` of f_A, [n]."""
    return project(fourier_factor(_GRID, amplitude), n)


def dither_shape(sigma: Tensor, n: int) -> Tensor:
    """The Gaussian-dithered quantizer's slope across the bin, a_k = 2(−1)^k exp(−2π²k²σ²), [*sigma.shape, n].

    σ in bin units (a tensor: one per layer or per group); σ → ∞ gives a = 0 (STE), small σ a sharp peak at
    the thresholds (truncated to n terms, then :func:`positive`)."""
    k = torch.arange(1, n + 1, dtype=torch.float32)
    s = sigma.to(torch.float32).unsqueeze(-1)
    return 2 * (-1.0) ** k * torch.exp(-2 * math.pi ** 2 * k * k * s * s)


def positive(coeffs: Tensor, b_min: float = 0.02) -> Tensor:
    """Shrink each shape toward STE just enough that B(r) >= b_min on the whole bin, [..., n]."""
    lowest = (cosine_basis(_GRID, coeffs.shape[-1]) * coeffs.unsqueeze(-2)).sum(-1).amin(-1)  # min of B − 1
    scale = torch.where(lowest < b_min - 1, (1 - b_min) / (-lowest).clamp_min(1e-12), torch.ones_like(lowest))
    return coeffs * scale.unsqueeze(-1)


def travel(w_now: Tensor, w_before: Tensor, scale: Tensor, group: int, per: str) -> Tensor:
    """RMS distance the weights moved, in bin units: sqrt(mean((w_now − w_before)² / s²)) over each layer
    (``per="layer"``, a 0-d tensor) or each group (``per="group"``, [N, K/G])."""
    s = scale.detach().to(torch.float32).clamp_min(SCALE_FLOOR).unsqueeze(-1)
    d2 = (grouped((w_now - w_before).to(torch.float32), group) / s).square()
    return d2.mean().sqrt() if per == "layer" else d2.mean(-1).sqrt()


def bin_offset(w: Tensor, scale: Tensor, zero_point: Tensor, group: int) -> Tensor:
    """r = v − round(v), v = w/s + z: the position of each weight in its bin, in [−½, ½], [N, K] fp32."""
    v = scaled(w.detach(), scale.detach(), zero_point, group)
    return (v - v.round()).reshape(w.shape).to(torch.float32)
