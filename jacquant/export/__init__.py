"""Export quantized models: ONNX with integer weights (``ort`` MatMulNBits or standard ``onnx`` ops),
and a KV-cache decoder for Llama-family LMs with :func:`generate` to run it in onnxruntime."""
from .decoder import export_decoder
from .generation import Decoder, Generation, generate
from .onnx import export_onnx
from .validate import check_onnx, load_onnx

__all__ = ["Decoder", "Generation", "check_onnx", "export_decoder", "export_onnx", "generate", "load_onnx"]
