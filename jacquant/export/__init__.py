"""Export quantized models: ONNX with integer weights (``ort`` MatMulNBits or standard ``onnx`` ops),
and a KV-cache decoder for Llama-family LMs with :func:`generate` to run it in onnxruntime; a GGUF file for
llama.cpp (:func:`export_gguf`) with :mod:`jacquant.export.llamacpp` to run and measure it.

Modules, top-down: ``onnx`` (export_onnx) uses ``decoder`` (the KV-cache graph), both use ``lower``
(MatMulNBits / DequantizeLinear lowering) and ``validate``; ``generation`` runs decoders; ``gguf`` writes
GGUF files; ``llamacpp`` runs them (llama-cpp-python, imported on use)."""
from .decoder import export_decoder
from .generation import Decoder, Generation, generate
from .gguf import export_gguf
from .onnx import export_onnx
from .validate import check_onnx, load_onnx

__all__ = ["Decoder", "Generation", "check_onnx", "export_decoder", "export_gguf", "export_onnx", "generate",
           "load_onnx"]
