"""One quantized matmul site: its quantizer state, and the call into the quantized op."""
from __future__ import annotations

from typing import Iterator, NamedTuple, Optional

import torch
import torch.nn as nn
from torch import Tensor

from jacquant.config import QuantConfig
from jacquant.primitives import formats
from jacquant.primitives.grid import group_size, init_scale, quantize, quantize_affine
from jacquant.qat import ops  # noqa: F401  (registers torch.ops.jacquant.*)


class WeightQuantizer(nn.Module):
    """Quantizer state for one weight that feeds a matmul, registered on the module that runs it.

    Holds, per group of G weights along the input dimension K:
      ``scale``       s, a learnable Parameter [N, K/G] (LSQ gradient); the forward multiplies by fp16(s), the
                      value an exported model stores (:func:`effective_scale`),
      ``zero_point``  z, an integer buffer [N, K/G] (uint8),
      ``jac``         B, JacQuant's Jacobian surrogate, a buffer [N, K/G] (1 = STE).

    Calling it computes ``x · Q(W)^T + bias`` through ``torch.ops.jacquant.qlinear``. ``weight`` is
    passed in as the owner stores it: [N, K], or [K, N] for ``transposed`` sites (GPT-2's Conv1D,
    ``x @ W``); the quantizer works on the [N, K] view.

    ``format`` is None, or ``"q4_0"`` (GGUF's Q4_0: zero point 8, group 32). The scale-and-min formats are
    :class:`AffineQuantizer`.
    """

    format: Optional[str] = None

    def __init__(self, weight: Tensor, config: QuantConfig, *, name: str, weight_attr: str, op: str, transposed: bool,
                 format: Optional[str] = None):
        super().__init__()
        w = weight.detach().t() if transposed else weight.detach()  # [N, K]
        n, k = w.shape
        self.name, self.weight_attr, self.op, self.transposed = name, weight_attr, op, transposed
        self.rule, self.amplitude = config.method, float(config.amplitude)
        self.init, self.symmetric = config.init, config.symmetric  # how the grid is (re)fitted: calibrate, GPTQ
        self.format = format
        if format == "q4_0":
            self.bits, self.group = 4, 32
            scale, zero_point = formats.init_q4_0(w, config.init)
        elif format is None:
            self.bits, self.group = config.bits, group_size(k, config.group)
            scale, zero_point = init_scale(w, config.bits, self.group, config.init, config.symmetric)
        else:
            raise ValueError(f"layer `{name}`: format {format!r} is a scale-and-min format: use AffineQuantizer")
        self.scale = nn.Parameter(formats.fp16_scale(scale).to(w.device))
        self.register_buffer("zero_point", zero_point.to(w.device))
        self.register_buffer("jac", torch.ones_like(self.scale, requires_grad=False))

    def effective_scale(self) -> Tensor:
        """The scale the forward uses: fp16(s), clamped to [2^-24, 65504], with a straight-through gradient.

        Every grid stores its scales in fp16 (GGUF's d, compressed-tensors' ``weight_scale``, AutoRound's), so the
        model trains on the values it ships: 16 bits per group, not 32."""
        return formats.ste(self.scale, formats.fp16_scale(self.scale))

    def grid_inputs(self, w_nk: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(w', s, z) with the forward's v = w'/s + z: what diagnostics and estimators read (no gradient)."""
        return w_nk, self.effective_scale().detach(), self.zero_point

    def forward(self, x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        w = weight.t() if self.transposed else weight
        return torch.ops.jacquant.qlinear(
            x, w, self.effective_scale(), self.zero_point, self.jac, bias, self.bits, self.group, self.rule,
            self.amplitude)

    def as_nk(self, weight: Tensor) -> Tensor:
        """The weight in [N, K] layout (a view)."""
        return weight.t() if self.transposed else weight

    @torch.no_grad()
    def quantized_weight(self, weight: Tensor) -> Tensor:
        """Q(W) in [N, K] layout, what the forward multiplies by."""
        return torch.ops.jacquant.fake_quant(self.as_nk(weight), self.effective_scale(), self.zero_point, self.bits,
                                             self.group)

    @torch.no_grad()
    def codes(self, weight: Tensor) -> Tensor:
        """Integer codes c = clamp(round(W/s + z), 0, 2^b - 1), uint8 [N, K]."""
        return quantize(self.as_nk(weight), self.effective_scale(), self.zero_point, self.bits, self.group)

    def extra_repr(self) -> str:
        n, groups = self.scale.shape
        return (f"{self.weight_attr}: [{n}, {groups * self.group}], bits={self.bits}, group={self.group}, "
                f"{f'format={self.format}, ' if self.format else ''}"
                f"method={self.rule}, op={self.op}{', transposed' if self.transposed else ''}")


class AffineQuantizer(WeightQuantizer):
    """Quantizer state for a GGUF scale-and-min format (``q4_1``, ``q2_k``): Q(W) = s·c + m per group.

    Learnable, per group of G weights along K (:mod:`jacquant.primitives.formats` gives the formulas):
      ``scale``        Q4_1: d; Q2_K: the sub-block scale latent σ  [N, K/G]
      ``min``          Q4_1: m; Q2_K: the sub-block min latent μ (≤ 0) [N, K/G]
      ``super_scale``  Q2_K only: 15·d per super-block of 256 [N, K/256]
      ``super_min``    Q2_K only: 15·dmin per super-block [N, K/256]
    and the buffer ``jac`` (B) [N, K/G]. The forward calls ``torch.ops.jacquant.qlinear_affine`` with
    (s, m) = :func:`jacquant.primitives.formats.affine_grid` of these, whose roundings (fp16, 4-bit indices) pass
    gradients straight through.
    """

    def __init__(self, weight: Tensor, config: QuantConfig, *, name: str, weight_attr: str, op: str, transposed: bool,
                 format: str):
        nn.Module.__init__(self)
        spec = formats.FORMATS[format]
        if not spec.affine:
            raise ValueError(f"layer `{name}`: format {format!r} has an integer zero point: use WeightQuantizer")
        w = weight.detach().t() if transposed else weight.detach()  # [N, K]
        self.name, self.weight_attr, self.op, self.transposed = name, weight_attr, op, transposed
        self.rule, self.amplitude = config.method, float(config.amplitude)
        self.format, self.bits, self.group = format, spec.bits, spec.group
        init = formats.init_affine(w, spec, config.init)
        self.scale = nn.Parameter(init["scale"].to(w.device))
        self.min = nn.Parameter(init["min"].to(w.device))
        if spec.super_block:
            self.super_scale = nn.Parameter(init["super_scale"].to(w.device))
            self.super_min = nn.Parameter(init["super_min"].to(w.device))
        self.register_buffer("jac", torch.ones_like(self.scale, requires_grad=False))

    @property
    def spec(self) -> formats.FormatSpec:
        return formats.FORMATS[self.format]

    def affine_grid(self) -> tuple[Tensor, Tensor]:
        """(s, m) [N, K/G] as the forward uses them, differentiable in the learnable parameters."""
        sup = self.spec.super_block
        return formats.affine_grid(self.spec, self.scale, self.min, self.super_scale if sup else None,
                                   self.super_min if sup else None)

    def effective_scale(self) -> Tensor:
        return self.affine_grid()[0]

    def grid_inputs(self, w_nk: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(w - m, s, 0): the forward's v = (w - m)/s in the integer grid's form v = w'/s + z."""
        with torch.no_grad():
            s, m = self.affine_grid()
            shifted = (w_nk.float().reshape(*s.shape, -1) - m.unsqueeze(-1)).reshape(w_nk.shape)
        return shifted, s, torch.zeros_like(s, dtype=torch.uint8)

    def forward(self, x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        w = weight.t() if self.transposed else weight
        s, m = self.affine_grid()
        return torch.ops.jacquant.qlinear_affine(x, w, s, m, self.jac, bias, self.bits, self.group, self.rule,
                                                 self.amplitude)

    @torch.no_grad()
    def quantized_weight(self, weight: Tensor) -> Tensor:
        """Q(W) = s·c + m in [N, K] layout, what the forward multiplies by."""
        s, m = self.affine_grid()
        return torch.ops.jacquant.fake_quant_affine(self.as_nk(weight), s, m, self.bits, self.group)

    @torch.no_grad()
    def codes(self, weight: Tensor) -> Tensor:
        """Integer codes c = clamp(round((W - m)/s), 0, 2^b - 1), uint8 [N, K]."""
        s, m = self.affine_grid()
        return quantize_affine(self.as_nk(weight), s, m, self.bits, self.group)

    @torch.no_grad()
    def gguf_params(self) -> dict[str, Tensor]:
        """What the GGUF block stores besides the codes: Q4_1 ``d``, ``m`` [N, K/32] (fp16 values in fp32);
        Q2_K ``d``, ``dmin`` [N, K/256] and ``sc``, ``mn`` [N, K/16] (uint8)."""
        if self.format == "q4_1":
            s, m = self.affine_grid()
            return {"d": s, "m": m}
        d, dmin, sc, mn = formats.q2_k_indices(self.scale, self.min, self.super_scale, self.super_min, self.spec)
        return {"d": d, "dmin": dmin, "sc": sc.to(torch.uint8), "mn": mn.to(torch.uint8)}


class Site(NamedTuple):
    """A quantized site as found in a transformed model."""

    name: str
    owner: nn.Module
    quantizer: WeightQuantizer
    weight: nn.Parameter


def sites(model: nn.Module) -> Iterator[Site]:
    """Every quantized site of a transformed model, in module order, each weight once."""
    for path, q in model.named_modules():
        if isinstance(q, WeightQuantizer):
            owner = model.get_submodule(path.rpartition(".")[0])
            yield Site(q.name, owner, q, owner.get_parameter(q.weight_attr))
