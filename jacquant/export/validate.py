"""Load an exported ONNX model from an untrusted file, and check its integer-weight nodes.

Runtimes trust their inputs: MatMulNBits reads ``N · ceil(K/block_size) · block_size·bits/8`` bytes of
B whatever its dims say. So before a session is built, :func:`check_onnx` checks

  * every initializer: its payload holds exactly prod(dims) elements of its type (sub-byte types
    packed: ceil(prod(dims)·bits/8) bytes); no external data (jacquant never writes any, and a
    location is a path the file chooses);
  * ``com.microsoft.MatMulNBits``: attributes K, N > 0, bits in {2, 4, 8}, block_size a power of
    two >= 16; B uint8 [N, ceil(K/bs), bs·bits/8], scales N·ceil(K/bs) finite floats, zero_points
    uint8 N·ceil(ceil(K/bs)·bits/8) (or N·ceil(K/bs) of the scales' type), bias [N];
  * blocked ``DequantizeLinear`` on an initializer x [K, N] (axis 0, block_size bs): scale
    [ceil(K/bs), N] finite, zero point of x's type and the scale's dims;
  * the whole model with ``onnx.checker``.

Errors are ValueError naming the tensor or node.
"""
from __future__ import annotations

import math
import os
from typing import Union

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SUB_BYTE_BITS = {getattr(TensorProto, name): bits for name, bits in  # the types this onnx version knows
                 (("UINT2", 2), ("INT2", 2), ("UINT4", 4), ("INT4", 4), ("FLOAT4E2M1", 4)) if hasattr(TensorProto, name)}
FLOATS = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16}


def load_onnx(source: Union[str, os.PathLike, bytes]) -> onnx.ModelProto:
    """Parse an ONNX model from a path or bytes without external data, then :func:`check_onnx` it.

    A file that does not parse (truncated, not ONNX) or fails a check raises ValueError.
    """
    where = "<bytes>" if isinstance(source, (bytes, bytearray)) else os.fspath(source)
    try:
        if isinstance(source, (bytes, bytearray)):
            proto = onnx.load_from_string(bytes(source))
        else:
            proto = onnx.load(where, load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends: the bytes are not a ModelProto
        raise ValueError(f"{where}: not a readable ONNX model ({type(e).__name__}: {e})") from None
    check_onnx(proto, where)
    return proto


def _payload_ok(t: TensorProto) -> tuple[bool, str]:
    """Whether the initializer's stored data holds exactly its dims' elements; and what it holds."""
    if any(d < 0 for d in t.dims):
        return False, f"negative dims {list(t.dims)}"
    n = math.prod(t.dims)
    if t.data_type == TensorProto.STRING:
        return len(t.string_data) == n, f"{len(t.string_data)} strings"
    if t.HasField("raw_data"):
        bits = SUB_BYTE_BITS.get(t.data_type)
        itemsize = None if bits else helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        need = -(-n * bits // 8) if bits else n * itemsize
        return len(t.raw_data) == need, f"{len(t.raw_data)} bytes, {need} needed"
    try:
        size = numpy_helper.to_array(t).size
    except Exception as e:
        return False, f"unreadable data ({e})"
    return size == n, f"{size} elements"


def _check_initializers(proto: onnx.ModelProto, where: str) -> dict[str, TensorProto]:
    inits = {}
    for t in proto.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL or len(t.external_data):
            raise ValueError(f"{where}: initializer `{t.name}` refers to external data; jacquant's exports keep every "
                             "weight in the file and external locations are not followed")
        if t.data_type == TensorProto.UNDEFINED:
            raise ValueError(f"{where}: initializer `{t.name}` has no data type")
        ok, holds = _payload_ok(t)
        if not ok:
            raise ValueError(f"{where}: initializer `{t.name}` is {TensorProto.DataType.Name(t.data_type)} "
                             f"{list(t.dims)} but holds {holds}")
        inits[t.name] = t
    return inits


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _init(node: onnx.NodeProto, i: int, inits: dict, where: str, role: str):
    if i >= len(node.input) or node.input[i] == "":
        return None
    if node.input[i] not in inits:
        raise ValueError(f"{where}: node `{node.name}` ({node.op_type}): {role} `{node.input[i]}` is not an "
                         "initializer; integer weights must be constants")
    return inits[node.input[i]]


def _fail(where: str, node: onnx.NodeProto, t: TensorProto, what: str) -> ValueError:
    return ValueError(f"{where}: node `{node.name}` ({node.op_type}): initializer `{t.name}` {what}")


def _check_scale(where: str, node: onnx.NodeProto, t: TensorProto) -> None:
    if t.data_type not in FLOATS:
        raise _fail(where, node, t, f"is {TensorProto.DataType.Name(t.data_type)}, not a float type")
    if not np.isfinite(numpy_helper.to_array(t).astype(np.float32)).all():
        raise _fail(where, node, t, "has non-finite scales")


def _check_matmulnbits(node: onnx.NodeProto, inits: dict, where: str) -> None:
    k, n, bits, bs = (_attr(node, a) for a in ("K", "N", "bits", "block_size"))
    if not (isinstance(k, int) and isinstance(n, int) and k > 0 and n > 0):
        raise ValueError(f"{where}: node `{node.name}` (MatMulNBits): K={k}, N={n} must be positive ints")
    if bits not in (2, 4, 8) or not isinstance(bs, int) or bs < 16 or bs & (bs - 1):
        raise ValueError(f"{where}: node `{node.name}` (MatMulNBits): bits={bits} must be 2, 4 or 8 and "
                         f"block_size={bs} a power of two >= 16")
    blocks = -(-k // bs)
    b = _init(node, 1, inits, where, "B")
    if b is None or b.data_type != TensorProto.UINT8 or list(b.dims) != [n, blocks, bs * bits // 8]:
        got = "missing" if b is None else f"{TensorProto.DataType.Name(b.data_type)} {list(b.dims)}"
        raise ValueError(f"{where}: node `{node.name}` (MatMulNBits): B `{node.input[1]}` is {got}; K={k}, N={n}, "
                         f"bits={bits}, block_size={bs} need UINT8 {[n, blocks, bs * bits // 8]}")
    scales = _init(node, 2, inits, where, "scales")
    if scales is None or math.prod(scales.dims) != n * blocks:
        raise ValueError(f"{where}: node `{node.name}` (MatMulNBits): scales `{node.input[2]}` must hold N·ceil(K/"
                         f"block_size) = {n * blocks} values, got {None if scales is None else list(scales.dims)}")
    _check_scale(where, node, scales)
    zp = _init(node, 3, inits, where, "zero_points")
    if zp is not None:
        packed_ok = zp.data_type == TensorProto.UINT8 and math.prod(zp.dims) == n * -(-blocks * bits // 8)
        typed_ok = zp.data_type == scales.data_type and math.prod(zp.dims) == n * blocks
        if not (packed_ok or typed_ok):
            raise _fail(where, node, zp, f"is {TensorProto.DataType.Name(zp.data_type)} {list(zp.dims)}; zero points "
                                         f"need UINT8 with {n * -(-blocks * bits // 8)} bytes or the scales' type "
                                         f"with {n * blocks} values")
    bias = _init(node, 5, inits, where, "bias")
    if bias is not None and math.prod(bias.dims) != n:
        raise _fail(where, node, bias, f"has dims {list(bias.dims)}, N={n} needed")


def _check_dequantize_linear(node: onnx.NodeProto, inits: dict, where: str) -> None:
    x = _init(node, 0, inits, where, "x")
    bs = _attr(node, "block_size", 0)
    if x is None or not bs:
        return  # activations, or per-tensor / per-axis: onnx.checker's shape rules apply
    axis = _attr(node, "axis", 1)
    dims = list(x.dims)
    if not -len(dims) <= axis < len(dims):
        raise _fail(where, node, x, f"has rank {len(dims)}, axis={axis} is out of range")
    expect = dims.copy()
    expect[axis] = -(-dims[axis] // bs)
    scale = _init(node, 1, inits, where, "scale")
    if scale is None or list(scale.dims) != expect:
        raise ValueError(f"{where}: node `{node.name}` (DequantizeLinear): scale `{node.input[1]}` must be {expect} "
                         f"for x {dims} with block_size={bs} on axis {axis}, got "
                         f"{None if scale is None else list(scale.dims)}")
    _check_scale(where, node, scale)
    zp = _init(node, 2, inits, where, "zero point")
    if zp is not None and (list(zp.dims) != expect or zp.data_type != x.data_type):
        raise _fail(where, node, zp, f"is {TensorProto.DataType.Name(zp.data_type)} {list(zp.dims)}; x's type "
                                     f"{TensorProto.DataType.Name(x.data_type)} and dims {expect} needed")


def check_onnx(proto: onnx.ModelProto, where: str = "<model>") -> None:
    """Check the initializers, the integer-weight nodes and the model (see the module docstring)."""
    inits = _check_initializers(proto, where)
    for node in proto.graph.node:
        if node.op_type == "MatMulNBits" and node.domain == "com.microsoft":
            _check_matmulnbits(node, inits, where)
        elif node.op_type == "DequantizeLinear" and node.domain in ("", "ai.onnx"):
            _check_dequantize_linear(node, inits, where)
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as e:
        raise ValueError(f"{where}: onnx.checker refuses the model: {e}") from None
