"""Export quantized models: ONNX with integer weights (``ort`` MatMulNBits or standard ``onnx`` ops)."""
from .onnx import export_onnx

__all__ = ["export_onnx"]
