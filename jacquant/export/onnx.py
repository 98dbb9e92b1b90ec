"""Export a quantized model to ONNX with integer weights: ``torch.onnx.export(dynamo=True)`` plus lowering.

Pipeline (each step a function):

    transformed model --copy + convert--> converted model   (a converted model is used as is)
        --torch.onnx.export, jacquant::packed_linear -> jacquant.PackedLinear node--> ModelProto
        --lower (``ort``: MatMulNBits, ``onnx``: DequantizeLinear + MatMul)--> checked, saved file

Targets and what each runtime computes (W = s·(c - z) exactly; only activations may be rounded):

  ``ort``   com.microsoft.MatMulNBits, onnxruntime's fast path. CPU kernels take 2, 4, 8 bits and a
            power-of-two block_size >= 16. ``accuracy_level`` 0 keeps activations in fp32 (matches
            PyTorch to ~1e-5 relative); 4 quantizes them to int8 per block (fastest, ~1% relative).
  ``onnx``  standard ops only: blocked DequantizeLinear (opset 21 UINT4, opset 25 UINT2) + MatMul.
            onnxruntime fuses DQ + MatMul into MatMulNBits with its session option
            ``session.qdq_matmulnbits_accuracy_level`` (default 4); 1.32 fuses UINT2 too, wrongly
            where N % 4 != 0, so those layers are written as UINT4 (exact, see ``lower``).

3-bit codes have no ONNX type and no MatMulNBits CPU kernel: they are refused unless
``widen_bits=True``, which exports them exactly in a 4-bit container (4 bits per weight).
"""
from __future__ import annotations

import inspect
from typing import Any, Optional

import onnx
import torch
import torch.nn as nn
from onnx.defs import OpSchema

from jacquant.export.convert import converted_copy, packed_sites
from jacquant.export.decoder import export_decoder
from jacquant.export.lower import (
    ACCURACY_LEVELS,
    MAX_PROTO_BYTES,
    packed_nodes,
    to_dequantize_linear,
    to_matmulnbits,
)
from jacquant.export.validate import check_onnx

TARGETS = ("ort", "onnx")


def _packed_linear_schema() -> OpSchema:
    fp = OpSchema.FormalParameter
    floats = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
    return OpSchema(
        "PackedLinear", "jacquant", 1,
        inputs=[fp("x", "T"), fp("packed", "tensor(uint8)"), fp("scale", "S"), fp("zero_point", "tensor(uint8)"),
                fp("bias", "T", param_option=OpSchema.FormalParameterOption.Optional)],
        outputs=[fp("y", "T")],
        type_constraints=[("T", floats, "activations"), ("S", floats, "scales")],
        attributes=[OpSchema.Attribute("bits", OpSchema.AttrType.INT, "container width 2, 4 or 8"),
                    OpSchema.Attribute("group", OpSchema.AttrType.INT, "G, weights per block along K")])


def _translation_table() -> dict:
    """``jacquant::packed_linear`` -> one ``jacquant.PackedLinear`` node (lowered after export)."""
    from onnxscript import values

    op = values.Op(values.Opset("jacquant", 1), "PackedLinear", _packed_linear_schema())

    def packed_linear(x, packed, scale, zero_point, bias=None, bits: int = 4, group: int = 64):
        return op(x, packed, scale, zero_point, bias, bits=bits, group=group)

    return {torch.ops.jacquant.packed_linear.default: packed_linear}


def check_target(model: nn.Module, target: str, widen_bits: bool = False) -> None:
    """Refuse, before the slow export, a packed layer the target cannot represent exactly."""
    for s in packed_sites(model):
        p = s.packed
        if not hasattr(p, "zero_point"):
            raise ValueError(f"layer `{s.name}`: GGUF's {p.format} grid (scale and min) has no ONNX form; export it "
                             "with jacquant.export.export_gguf, or train with format='q4_0', which exports to both")
        if p.bits != p.storage_bits and not widen_bits:
            raise ValueError(f"layer `{s.name}`: {p.bits}-bit codes have no ONNX integer type and no onnxruntime "
                             f"MatMulNBits CPU kernel (2, 4, 8 bits); pass widen_bits=True to export them exactly in "
                             f"a {p.storage_bits}-bit container, or quantize with bits=2 or 4")
        if target == "ort" and (p.group < 16 or p.group & (p.group - 1)):
            raise ValueError(f"layer `{s.name}`: group {p.group} is not a power of two >= 16, which MatMulNBits' "
                             "block_size must be; use target='onnx' (DequantizeLinear takes any block size) or "
                             "quantize with group 16, 32, 64 or 128")


def default_dynamic_shapes(model: nn.Module, args: tuple, kwargs: dict) -> dict:
    """Every dim of integer inputs (token ids [B, T]) and all but the last of float inputs ([..., K]) dynamic."""
    bound = inspect.signature(model.forward).bind(*args, **kwargs).arguments

    def spec(v: Any) -> Any:
        if not isinstance(v, torch.Tensor):
            return None
        dims = range(v.dim()) if not v.is_floating_point() else range(v.dim() - 1)
        return {d: torch.export.Dim.AUTO for d in dims} or None

    return {name: spec(v) for name, v in bound.items()}


def export_onnx(
    model: nn.Module,
    example_inputs: Any = None,
    path: Optional[str] = None,
    target: str = "ort",
    accuracy_level: int = 4,
    *,
    dynamic: bool = True,
    opset_version: Optional[int] = None,
    widen_bits: bool = False,
    kv_cache: bool = False,
    tokenizer: Any = None,
    head_bits: Optional[int] = None,
    head_group: int = 32,
    attention: str = "gqa",
    fold_zero_points: bool = False,
) -> onnx.ModelProto:
    """Export a jacquant model with integer weights to ONNX; write it to ``path`` if given, return it.

    ``model`` is transformed (fake-quant; a converted copy is exported and the model is left as it
    is) or converted (:func:`jacquant.convert`). ``example_inputs`` is a tuple of args, a dict of
    kwargs, or one tensor; Hugging Face models get ``use_cache=False``. With ``dynamic`` every dim
    of integer inputs and all but the last of float inputs is dynamic (batch, sequence).
    ``target``: ``"ort"`` (MatMulNBits, ``accuracy_level`` 0-4) or ``"onnx"`` (standard ops; the
    level is not used). ``opset_version`` defaults to 21, or 25 where the onnx target has 2-bit
    weights. The result passes ``onnx.checker`` and :func:`jacquant.export.load_onnx`'s checks, and carries
    the lowest IR version its opset needs.

    ``kv_cache=True`` (Hugging Face Llama-family causal LMs) writes instead a decoder with a KV cache
    for generation, built node by node (:mod:`jacquant.export.decoder`): inputs input_ids,
    attention_mask, position_ids and past keys/values per layer, outputs logits and present
    keys/values; packed layers as MatMulNBits (``ort``) or DequantizeLinear + MatMul with standard
    norm/rotary/attention ops (``onnx``), a full-precision model as fp32 MatMul; ``tokenizer`` is
    saved beside ``path``; ``head_bits`` (2/4/8, blocks of ``head_group``) quantizes a full-precision LM head (and its tied embedding) round-to-nearest; ``attention``
    ``"gqa"`` (com.microsoft.GroupQueryAttention) or ``"standard"`` (MatMul/Softmax);
    ``fold_zero_points`` moves zero points out of MatMulNBits into an exact per-block correction
    (see :func:`jacquant.export.decoder.build_decoder`). ``example_inputs``
    is not used. Generate with :func:`jacquant.export.generate`.
    """
    if kv_cache:
        if not isinstance(model, nn.Module):
            raise TypeError(f"export_onnx expects an nn.Module, got {type(model).__name__}")
        return export_decoder(model, path, tokenizer=tokenizer, accuracy_level=accuracy_level, head_bits=head_bits,
                              head_group=head_group, attention=attention, target=target,
                              fold_zero_points=fold_zero_points)
    if example_inputs is None:
        raise ValueError("export_onnx: example_inputs are needed (a tensor, tuple of args or dict of kwargs) unless "
                         "kv_cache=True")
    if target not in TARGETS:
        raise ValueError(f"export_onnx: target={target!r} is not one of {TARGETS}")
    if accuracy_level not in ACCURACY_LEVELS:
        raise ValueError(f"export_onnx: accuracy_level={accuracy_level} is not one of {ACCURACY_LEVELS} "
                         "(0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 activations)")
    if not isinstance(model, nn.Module):
        raise TypeError(f"export_onnx expects an nn.Module, got {type(model).__name__}")
    packed_model = converted_copy(model)
    check_target(packed_model, target, widen_bits)
    args, kwargs = _split_inputs(packed_model, example_inputs)
    if opset_version is None:
        two_bit = any(s.packed.storage_bits == 2 for s in packed_sites(packed_model))
        opset_version = 25 if target == "onnx" and two_bit else 21
    was_training = packed_model.training
    packed_model.eval()
    try:
        program = torch.onnx.export(
            packed_model, args, kwargs=kwargs, dynamo=True, custom_translation_table=_translation_table(),
            dynamic_shapes=default_dynamic_shapes(packed_model, args, kwargs) if dynamic else None,
            opset_version=opset_version, verbose=False)
    finally:
        packed_model.train(was_training)
    proto = program.model_proto
    if len(packed_nodes(proto)) != sum(1 for _ in packed_sites(packed_model)):
        raise RuntimeError(f"export_onnx: the exported graph has {len(packed_nodes(proto))} PackedLinear nodes for "
                           f"{sum(1 for _ in packed_sites(packed_model))} packed layers; a layer was folded or "
                           "duplicated by the exporter")
    proto = to_matmulnbits(proto, accuracy_level) if target == "ort" else to_dequantize_linear(proto)
    proto.ir_version = max(proto.ir_version, _min_ir_version(proto))
    _strip_node_metadata(proto)
    if proto.ByteSize() > MAX_PROTO_BYTES:
        raise ValueError(f"export_onnx: the model is {proto.ByteSize() / 2**30:.1f} GiB, over protobuf's 2 GiB; "
                         "external-data export is not supported yet")
    check_onnx(proto, "export_onnx")  # what load_onnx will demand of the file, and onnx.checker
    if path is not None:
        onnx.save(proto, path)
    return proto


def _strip_node_metadata(proto: onnx.ModelProto) -> None:
    """Drop the exporter's per-node metadata (stack traces, FX node text): a third of a small model's bytes."""
    for node in proto.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""


def _min_ir_version(proto: onnx.ModelProto) -> int:
    standard = [o for o in proto.opset_import if o.domain in ("", "ai.onnx")]
    return onnx.helper.find_min_ir_version_for(standard, ignore_unknown=True)


def _split_inputs(model: nn.Module, example_inputs: Any) -> tuple[tuple, dict]:
    if isinstance(example_inputs, torch.Tensor):
        args, kwargs = (example_inputs,), {}
    elif isinstance(example_inputs, tuple):
        args, kwargs = example_inputs, {}
    elif isinstance(example_inputs, dict):
        args, kwargs = (), dict(example_inputs)
    else:
        raise TypeError(f"export_onnx: example_inputs must be a tensor, a tuple of args or a dict of kwargs, got "
                        f"{type(example_inputs).__name__}")
    if getattr(getattr(model, "config", None), "use_cache", None) is not None:
        kwargs.setdefault("use_cache", False)  # a KV cache object is not an exportable output
    return args, kwargs
