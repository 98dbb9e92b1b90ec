"""One quantized matmul site: its quantizer state, and the call into the quantized op."""
from __future__ import annotations

from typing import Iterator, NamedTuple, Optional

import torch
import torch.nn as nn
from torch import Tensor

from . import ops  # noqa: F401  (registers torch.ops.jacquant.*)
from .config import QuantConfig
from .quantizer import group_size, init_scale, quantize


class WeightQuantizer(nn.Module):
    """Quantizer state for one weight that feeds a matmul, registered on the module that runs it.

    Holds, per group of G weights along the input dimension K:
      ``scale``       s, a learnable Parameter [N, K/G] (LSQ gradient),
      ``zero_point``  z, an integer buffer [N, K/G] (uint8),
      ``jac``         B, JacQuant's Jacobian surrogate, a buffer [N, K/G] (1 = STE).

    Calling it computes ``x · Q(W)^T + bias`` through ``torch.ops.jacquant.qlinear``. ``weight`` is
    passed in as the owner stores it: [N, K], or [K, N] for ``transposed`` sites (GPT-2's Conv1D,
    ``x @ W``); the quantizer works on the [N, K] view.
    """

    def __init__(self, weight: Tensor, config: QuantConfig, *, name: str, weight_attr: str, op: str, transposed: bool):
        super().__init__()
        w = weight.detach().t() if transposed else weight.detach()  # [N, K]
        n, k = w.shape
        self.name, self.weight_attr, self.op, self.transposed = name, weight_attr, op, transposed
        self.bits, self.group = config.bits, group_size(k, config.group)
        self.rule, self.amplitude = config.method, float(config.amplitude)
        self.init, self.symmetric = config.init, config.symmetric  # how the grid is (re)fitted: calibrate, GPTQ
        scale, zero_point = init_scale(w, config.bits, self.group, config.init, config.symmetric)
        self.scale = nn.Parameter(scale.to(w.device))
        self.register_buffer("zero_point", zero_point.to(w.device))
        self.register_buffer("jac", torch.ones_like(self.scale, requires_grad=False))

    def forward(self, x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        w = weight.t() if self.transposed else weight
        return torch.ops.jacquant.qlinear(
            x, w, self.scale, self.zero_point, self.jac, bias, self.bits, self.group, self.rule, self.amplitude)

    def as_nk(self, weight: Tensor) -> Tensor:
        """The weight in [N, K] layout (a view)."""
        return weight.t() if self.transposed else weight

    @torch.no_grad()
    def quantized_weight(self, weight: Tensor) -> Tensor:
        """Q(W) in [N, K] layout, what the forward multiplies by."""
        return torch.ops.jacquant.fake_quant(self.as_nk(weight), self.scale, self.zero_point, self.bits, self.group)

    @torch.no_grad()
    def codes(self, weight: Tensor) -> Tensor:
        """Integer codes c = clamp(round(W/s + z), 0, 2^b - 1), uint8 [N, K]."""
        return quantize(self.as_nk(weight), self.scale, self.zero_point, self.bits, self.group)

    def extra_repr(self) -> str:
        n, groups = self.scale.shape
        return (f"{self.weight_attr}: [{n}, {groups * self.group}], bits={self.bits}, group={self.group}, "
                f"method={self.rule}, op={self.op}{', transposed' if self.transposed else ''}")


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
