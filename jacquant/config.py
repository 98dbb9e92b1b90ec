"""What to quantize and how: one validated config object that everything downstream trusts."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch.nn as nn

SUPPORTED_BITS = (2, 3, 4, 8)
METHODS = ("ste", "stableqat", "jacquant")
SCALE_INITS = ("minmax", "mse")


@dataclass
class QuantConfig:
    """Weight-quantization settings for :func:`jacquant.transform`.

    Attributes:
        bits: weight bit width b, one of 2, 3, 4, 8 (codes in [0, 2^b - 1]).
        group: G, consecutive weights along the input dimension (K) sharing one scale and zero
            point; must divide every quantized layer's in_features. ``-1`` means per output channel
            (G = K).
        method: backward rule for the weight, ``"ste"`` (clipped STE), ``"stableqat"`` (Fourier
            surrogate) or ``"jacquant"`` (learned group-wise Jacobian surrogate B).
        init: scale initialisation, ``"minmax"`` or ``"mse"`` (clipping-ratio search).
        symmetric: fixed zero point 2^(b-1) (onnxruntime's default grid) instead of a fitted one.
        amplitude: StableQAT's A (0 gives STE; must stay below 1/(sqrt(2)·pi) ≈ 0.225).
        include_head: also quantize the LM head (a matmul whose weight is tied to an embedding, or
            the model's ``get_output_embeddings()``).
        filter: ``filter(name, module) -> bool``; a site is quantized only where it returns True.
            ``name`` is the site's name as :func:`jacquant.summary` prints it.
    """

    bits: int = 2
    group: int = 64
    method: str = "jacquant"
    init: str = "mse"
    symmetric: bool = False
    amplitude: float = 0.21
    include_head: bool = False
    filter: Optional[Callable[[str, nn.Module], bool]] = None

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise TypeError(f"QuantConfig.bits must be an int, got {type(self.bits).__name__}")
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"QuantConfig.bits={self.bits} is not supported; use one of {SUPPORTED_BITS}")
        if isinstance(self.group, bool) or not isinstance(self.group, int):
            raise TypeError(f"QuantConfig.group must be an int, got {type(self.group).__name__}")
        if self.group != -1 and self.group < 1:
            raise ValueError(f"QuantConfig.group={self.group} must be a positive divisor of in_features or -1 (per channel)")
        if self.method not in METHODS:
            raise ValueError(f"QuantConfig.method={self.method!r} is not one of {METHODS}")
        if self.init not in SCALE_INITS:
            raise ValueError(f"QuantConfig.init={self.init!r} is not one of {SCALE_INITS}")
        if not 0.0 <= self.amplitude < 1.0 / (2 ** 0.5 * 3.141592653589793):
            raise ValueError(f"QuantConfig.amplitude={self.amplitude} must lie in [0, 1/(sqrt(2)·pi)) for a positive, bounded surrogate")
        if self.filter is not None and not callable(self.filter):
            raise TypeError("QuantConfig.filter must be a callable filter(name, module) -> bool")
