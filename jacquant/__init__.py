"""jacquant: ultra-low-bit quantization-aware training with learned Jacobian surrogates."""
from . import optim
from .api import summary, transform
from .calibrate import calibrate
from .checkpoint import load_checkpoint, save_checkpoint
from .compile import compile_blocks
from .config import QuantConfig
from .convert import convert, load_converted, save_converted
from .faults import NonFiniteError, check_finite, guard
from .refresh import RefreshConfig, step
from .site import WeightQuantizer, sites
from .stats import StatsLogger, stats

__all__ = [
    "QuantConfig", "RefreshConfig", "StatsLogger", "WeightQuantizer",
    "convert", "export_gguf", "export_onnx", "load_checkpoint", "load_converted", "optim", "plot", "save_checkpoint",
    "save_converted", "sites", "stats", "step", "summary", "transform",
]
__all__ += ["NonFiniteError", "check_finite", "guard"]
__all__ += ["compile_blocks", "calibrate"]
__version__ = "0.1.0"

_LAZY = {"export_onnx": ".export", "export_gguf": ".export", "plot": ".plot"}  # need onnx, gguf, matplotlib: on first use


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'jacquant' has no attribute {name!r}")
