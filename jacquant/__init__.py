"""jacquant: ultra-low-bit quantization-aware training with learned Jacobian surrogates.

The public API, by concept (each name's home in brackets):

    transform, summary, QuantConfig        what to quantize, and the rewrite that does it   [api, config]
    sites, WeightQuantizer, step, RefreshConfig, guard, check_finite, NonFiniteError, stats, StatsLogger,
    save_checkpoint, load_checkpoint, compile_blocks, optim
                                           what a training loop calls                        [qat/]
    calibrate                              a GPTQ start, block by block                      [calibration/]
    convert, save_converted, load_converted, export_onnx, export_gguf
                                           the packed integer model and its runtimes         [export/]
"""
from jacquant.api import summary, transform
from jacquant.calibration.gptq import calibrate
from jacquant.config import QuantConfig
from jacquant.export.convert import convert, load_converted, save_converted
from jacquant.qat import optim
from jacquant.qat.checkpoint import load_checkpoint, save_checkpoint
from jacquant.qat.compile import compile_blocks
from jacquant.qat.guard import NonFiniteError, check_finite, guard
from jacquant.qat.quantizer import WeightQuantizer, sites
from jacquant.qat.refresh import RefreshConfig, step
from jacquant.qat.stats import StatsLogger, stats

__all__ = [
    "QuantConfig", "RefreshConfig", "StatsLogger", "WeightQuantizer",
    "convert", "export_gguf", "export_onnx", "load_checkpoint", "load_converted", "optim", "plot", "save_checkpoint",
    "save_converted", "sites", "stats", "step", "summary", "transform",
    "NonFiniteError", "check_finite", "guard", "compile_blocks", "calibrate",
]
__version__ = "0.1.0"

# need onnx, gguf, matplotlib: imported on first use
_LAZY = {"export_onnx": "jacquant.export.onnx", "export_gguf": "jacquant.export.gguf", "plot": "jacquant.qat.plot"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'jacquant' has no attribute {name!r}")
