"""Lower ``jacquant.PackedLinear`` nodes of an exported ONNX graph to a runtime's integer-weight ops.

The exporter writes each packed site as one node ``jacquant.PackedLinear(x, packed, scale, zero_point
[, bias])`` with attributes ``bits`` (the packing container, 2/4/8) and ``group`` (G); its three weight inputs are initializers: packed [N, K/G, G·c/8] uint8 in
MatMulNBits layout, scale [N, K/G], zero_point [N, K/G] uint8. Two lowerings, both exact in the
weights (W = s·(c - z)):

  ``ort``:  com.microsoft.MatMulNBits(x, packed, scale, zp_packed | "", "", bias | "")
            attrs K, N, bits, block_size = G, accuracy_level; zp_packed [N, ceil(K/G·c/8)] uint8,
            omitted where every z = 2^(c-1) (MatMulNBits' default grid).
  ``onnx``: y = MatMul(x, DequantizeLinear(Wq, s^T, z^T, axis=0, block_size=G)) (+ bias) with
            Wq [K, N] as UINT2 (opset 25) or UINT4 (opset 21), s^T [K/G, N], z^T [K/G, N] of Wq's type;
            2-bit codes of a layer with N % 4 != 0 as UINT4 (onnxruntime mis-fuses those in UINT2).

Functions here take and return ``onnx.ModelProto``; nothing else is changed.
"""
from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from jacquant.primitives.packing import pack_rows, pack_zero_points, unpack_codes

DOMAIN = "jacquant"
OP_TYPE = "PackedLinear"
MS_DOMAIN = "com.microsoft"
ONNX_INT_TYPES = {2: TensorProto.UINT2, 4: TensorProto.UINT4, 8: TensorProto.UINT8}
FLOAT_TYPES = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}
ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # MatMulNBits: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 activations
MAX_PROTO_BYTES = 2 ** 31 - 1  # protobuf's limit on one serialized ModelProto


def packed_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The ``jacquant.PackedLinear`` nodes of the main graph, in order."""
    return [n for n in model.graph.node if n.domain == DOMAIN and n.op_type == OP_TYPE]


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def _weights(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    missing = [name for name in node.input[1:4] if name not in inits]
    if missing:
        raise ValueError(f"node {node.name}: weight inputs {missing} are not initializers; the exported graph computes "
                         "them, which an integer-weight op cannot take")
    return tuple(numpy_helper.to_array(inits[name]) for name in node.input[1:4])  # type: ignore[return-value]


def _activation_type(model: onnx.ModelProto, node: onnx.NodeProto) -> int:
    """Element type of the node's output (= its activation), FLOAT where the graph does not say."""
    for vi in list(model.graph.value_info) + list(model.graph.output):
        if vi.name == node.output[0]:
            return vi.type.tensor_type.elem_type
    return TensorProto.FLOAT


def _scale_array(scale: np.ndarray, elem_type: int, node: onnx.NodeProto) -> np.ndarray:
    if elem_type not in FLOAT_TYPES:
        raise TypeError(f"node {node.name}: activations of ONNX type {TensorProto.DataType.Name(elem_type)} are not "
                        "supported; export the model in float32 or float16")
    return scale.astype(FLOAT_TYPES[elem_type])


def _replace(model: onnx.ModelProto, old: onnx.NodeProto, new_nodes: list[onnx.NodeProto],
             new_inits: list[onnx.TensorProto]) -> None:
    nodes = list(model.graph.node)
    i = nodes.index(old)
    del model.graph.node[:]
    model.graph.node.extend(nodes[:i] + new_nodes + nodes[i + 1:])
    model.graph.initializer.extend(new_inits)


def _prefix(node: onnx.NodeProto) -> str:
    """Name stem for a layer's new initializers: its packed buffer's name less ``.packed``
    (``blocks.0.qkv.weight_packed``), so a lowered graph still names its layers."""
    return node.input[1].removesuffix(".packed")


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    used = {name for n in model.graph.node for name in n.input} | {o.name for o in model.graph.output}
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def _set_opset(model: onnx.ModelProto, domain: str, version: int) -> None:
    for o in model.opset_import:
        if o.domain == domain:
            o.version = max(o.version, version)
            return
    model.opset_import.append(helper.make_opsetid(domain, version))


def _remove_domain(model: onnx.ModelProto, domain: str) -> None:
    keep = [o for o in model.opset_import if o.domain != domain]
    del model.opset_import[:]
    model.opset_import.extend(keep)


def to_matmulnbits(model: onnx.ModelProto, accuracy_level: int) -> onnx.ModelProto:
    """Each PackedLinear -> ``com.microsoft.MatMulNBits`` (see the module docstring), in place."""
    inits = _initializers(model)
    for node in packed_nodes(model):
        a = _attrs(node)
        bits, group = a["bits"], a["group"]
        packed, scale, zp = _weights(node, inits)
        n, blocks, _ = packed.shape
        prefix = _prefix(node)
        scale_name = prefix + ".scales"
        new_inits = [numpy_helper.from_array(_scale_array(scale, _activation_type(model, node), node), scale_name)]
        zp_name = ""
        if not (zp == 1 << (bits - 1)).all():
            zp_name = prefix + ".zero_points"
            zp_packed = pack_zero_points(torch.from_numpy(zp.copy()), bits).numpy()  # [N, ceil(K/G·bits/8)]
            new_inits.append(numpy_helper.from_array(zp_packed, zp_name))
        bias = node.input[4] if len(node.input) > 4 else ""
        inputs = [node.input[0], node.input[1], scale_name, zp_name, "", bias]
        while inputs[-1] == "":
            inputs.pop()
        mnb = helper.make_node("MatMulNBits", inputs, list(node.output), name=node.name, domain=MS_DOMAIN,
                               K=blocks * group, N=n, bits=bits, block_size=group, accuracy_level=accuracy_level)
        _replace(model, node, [mnb], new_inits)
    _drop_unused_initializers(model)
    _remove_domain(model, DOMAIN)
    _set_opset(model, MS_DOMAIN, 1)
    return model


def with_accuracy_level(model: onnx.ModelProto, accuracy_level: int) -> onnx.ModelProto:
    """A copy of ``model`` whose every ``MatMulNBits`` has ``accuracy_level`` (0/1: fp32 activations, 4: int8).

    The weights are untouched: the level only selects onnxruntime's kernel (and so whether the activations
    are quantized to int8 on the fly). Raises ValueError for a model with no MatMulNBits.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = [n for n in out.graph.node if n.op_type == "MatMulNBits" and n.domain == MS_DOMAIN]
    if not nodes:
        raise ValueError("with_accuracy_level: the model has no com.microsoft.MatMulNBits node")
    for node in nodes:
        kept = [a for a in node.attribute if a.name != "accuracy_level"]
        del node.attribute[:]
        node.attribute.extend(kept + [helper.make_attribute("accuracy_level", accuracy_level)])
    return out


def to_dequantize_linear(model: onnx.ModelProto) -> onnx.ModelProto:
    """Each PackedLinear -> blocked ``DequantizeLinear`` + ``MatMul`` (+ ``Add``), standard ops only, in place.

    Codes go to [K, N] UINT2 / UINT4 / UINT8 initializers (the container width), packed low bits first
    as ONNX stores sub-byte types; the default-domain opset is raised to 25 for UINT2, 21 otherwise.
    """
    inits = _initializers(model)
    opset = 21
    for node in packed_nodes(model):
        a = _attrs(node)
        bits, group = a["bits"], a["group"]
        packed, scale, zp = _weights(node, inits)
        codes = unpack_codes(torch.from_numpy(packed.copy()), bits, group)  # [N, K] uint8
        n, k = codes.shape
        # onnxruntime (1.32) fuses DQ(UINT2) + MatMul into MatMulNBits wrongly when N % 4 != 0 (the spec's
        # reference evaluator and its unfused kernels agree with us): such layers go out exactly as UINT4
        width = 4 if bits == 2 and n % 4 else bits
        qtype = ONNX_INT_TYPES[width]
        opset = max(opset, 25 if width == 2 else 21)
        prefix = _prefix(node)
        wq = _int_tensor(codes.t().contiguous(), width, qtype, prefix + ".codes")  # [K, N]
        zq = _int_tensor(torch.from_numpy(zp.copy()).t().contiguous(), width, qtype, prefix + ".zero_points")  # [K/G, N]
        sc = numpy_helper.from_array(
            np.ascontiguousarray(_scale_array(scale, _activation_type(model, node), node).T), prefix + ".scales")
        w_name, y_name = prefix + ".dequantized", node.output[0]
        bias = node.input[4] if len(node.input) > 4 and node.input[4] else ""
        mm_out = y_name if not bias else node.name + "_xW"
        nodes = [helper.make_node("DequantizeLinear", [wq.name, sc.name, zq.name], [w_name], name=node.name + "_dq",
                                  axis=0, block_size=group),
                 helper.make_node("MatMul", [node.input[0], w_name], [mm_out], name=node.name + "_matmul")]
        if bias:
            nodes.append(helper.make_node("Add", [mm_out, bias], [y_name], name=node.name + "_bias"))
        _replace(model, node, nodes, [wq, zq, sc])
    _drop_unused_initializers(model)
    _remove_domain(model, DOMAIN)
    _set_opset(model, "", opset)
    return model


def _int_tensor(values: torch.Tensor, bits: int, data_type: int, name: str) -> onnx.TensorProto:
    """A [rows, cols] tensor of unsigned b-bit values as an ONNX initializer of ``data_type``."""
    raw = values.to(torch.uint8).numpy().tobytes() if bits == 8 else pack_rows(values.reshape(-1), bits).numpy().tobytes()
    t = TensorProto(name=name, data_type=data_type, dims=list(values.shape))
    t.raw_data = raw
    return t

