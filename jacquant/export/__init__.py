"""The packed integer model and the runtimes that run it.

``convert`` turns a trained model's fake-quant sites into packed integer weights (:func:`jacquant.convert`;
``gguf_blocks`` holds GGUF's block bytes). From there: ONNX with integer weights (``ort`` MatMulNBits or
standard ``onnx`` ops) and a KV-cache decoder for Llama-family LMs with :func:`generate` to run it in
onnxruntime; a GGUF file for llama.cpp (:func:`export_gguf`) with :mod:`jacquant.export.llamacpp` to run and
measure it; a Hugging Face directory in compressed-tensors' pack-quantized format for transformers and vLLM
(:func:`export_hf`), read back as a QAT start by :func:`load_hf_quantized`.

Modules, top-down: ``onnx`` (export_onnx) uses ``decoder`` (the KV-cache graph), both use ``lower``
(MatMulNBits / DequantizeLinear lowering) and ``validate``; ``generation`` runs decoders; ``gguf`` writes
GGUF files; ``llamacpp`` runs them (llama-cpp-python, imported on use); ``hf`` writes and reads
compressed-tensors checkpoints (imported on use). The names below import on first use, so that
``jacquant.export.convert`` needs neither onnx nor gguf."""
import importlib

_NAMES = {
    "Decoder": "generation", "Generation": "generation", "generate": "generation",
    "check_onnx": "validate", "load_onnx": "validate",
    "export_decoder": "decoder", "export_gguf": "gguf", "export_onnx": "onnx",
    "export_hf": "hf", "load_hf_quantized": "hf", "read_hf_quantized": "hf",
}
__all__ = sorted(_NAMES)


def __getattr__(name: str):
    if name in _NAMES:
        return getattr(importlib.import_module(f"jacquant.export.{_NAMES[name]}"), name)
    raise AttributeError(f"module 'jacquant.export' has no attribute {name!r}")
