"""jacquant: ultra-low-bit quantization-aware training with learned Jacobian surrogates."""
from .api import summary, transform
from .config import QuantConfig
from .site import WeightQuantizer, sites

__all__ = ["QuantConfig", "WeightQuantizer", "sites", "summary", "transform"]
__version__ = "0.1.0"
