"""Export quantized models: ONNX with integer weights (``ort`` MatMulNBits or standard ``onnx`` ops)."""
from .onnx import export_onnx
from .validate import check_onnx, load_onnx

__all__ = ["check_onnx", "export_onnx", "load_onnx"]
