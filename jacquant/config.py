"""What to quantize and how: one validated config object that everything downstream trusts."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch.nn as nn

from jacquant.primitives.formats import FORMATS

SUPPORTED_BITS = (2, 3, 4, 8)
METHODS = ("ste", "stableqat", "jacquant")
SCALE_INITS = ("minmax", "mse", "llama")


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
        init: scale initialisation, ``"minmax"``, ``"mse"`` (clipping-ratio search) or, with a ``format``,
            ``"llama"`` (llama.cpp's own choice: a weighted least-squares search per block, see
            :func:`jacquant.primitives.formats.init_llama`).
        symmetric: fixed zero point 2^(b-1) (onnxruntime's default grid) instead of a fitted one.
        amplitude: StableQAT's A (0 gives STE; must stay below 1/(sqrt(2)·pi) ≈ 0.225).
        include_head: also quantize the LM head (a matmul whose weight is tied to an embedding, or
            the model's ``get_output_embeddings()``).
        filter: ``filter(name, module) -> bool``; a site is quantized only where it returns True.
            ``name`` is the site's name as :func:`jacquant.summary` prints it.
        format: a GGUF format, ``"q4_0"``, ``"q4_1"`` or ``"q2_k"`` (:data:`jacquant.primitives.formats.FORMATS`): the
            forward fake-quant equals llama.cpp's dequantization of that format bit for bit, and the trained
            model exports to GGUF (:func:`jacquant.export.export_gguf`). It sets the bits, group and grid
            (``bits``, ``group`` and ``symmetric`` are then not used). A callable ``format(name, module)``
            chooses per site (returning a format name, or None for ``fallback``).
        fallback: the format of a layer whose in_features is not a multiple of ``format``'s block (llama.cpp
            falls back to ``"q4_0"`` for rows that k-quants cannot hold). None: such a layer is an error.
    """

    bits: int = 2
    group: int = 64
    method: str = "jacquant"
    init: str = "mse"
    symmetric: bool = False
    amplitude: float = 0.21
    include_head: bool = False
    filter: Optional[Callable[[str, nn.Module], bool]] = None
    format: Union[str, Callable[[str, nn.Module], Optional[str]], None] = None
    fallback: Optional[str] = None

    def __post_init__(self) -> None:
        for field in ("format", "fallback"):
            value = getattr(self, field)
            if isinstance(value, str) and value not in FORMATS:
                raise ValueError(f"QuantConfig.{field}={value!r} is not a GGUF format jacquant trains; use one of "
                                 f"{tuple(FORMATS)}")
        if self.format is not None and not isinstance(self.format, str) and not callable(self.format):
            raise TypeError("QuantConfig.format must be a format name or a callable format(name, module) -> str")
        if self.fallback is not None and self.format is None:
            raise ValueError("QuantConfig.fallback is the format of layers the main format cannot hold; set format too")
        if isinstance(self.format, str):  # the format decides the grid; bits/group describe it for summary()
            spec = FORMATS[self.format]
            self.bits, self.group, self.symmetric = spec.bits, spec.group, spec.zero_point is not None
        if self.init == "llama" and self.format is None:
            raise ValueError("QuantConfig.init='llama' is llama.cpp's scale search for a GGUF format; set format= "
                             "or use init='mse'")
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
