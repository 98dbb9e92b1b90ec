"""A Llama-family decoder with a KV cache as an ONNX graph for onnxruntime, built node by node.

Graph (B batch, S new tokens, P cached tokens, T = P + S, H heads, Hk key/value heads, d head dim):

    inputs   input_ids int64 [B, S], attention_mask int64 [B, T] (1 = token, 0 = padding),
             position_ids int64 [B, S], past_key_values.{i}.key / .value float32 [B, Hk, P, d]
    outputs  logits float32 [B, S, V], present.{i}.key / .value float32 [B, Hk, T, d]

    h_0 = Embed(input_ids)
    per layer i:  a = RMSNorm(h) ; q, k, v = a·W_qkv^T (one fused MatMulNBits) ; q, k = RoPE(q, k; position_ids)
                  K = concat(past K, k), V = concat(past V, v)                                   (present)
                  o = softmax(q K^T / sqrt(d) + M) V,  M[b, s, t] = 0 if t <= P + s and mask[b, t] else -3.4e38
                  h = h + o·W_o^T ;  m = RMSNorm(h) ; g, u = m·W_gu^T ; h = h + (silu(g)·u)·W_down^T
    logits = RMSNorm(h)·W_head^T

Attention: ``"gqa"`` (default) is one ``com.microsoft.GroupQueryAttention`` node per layer after
``RotaryEmbedding`` of q and k at position_ids (GQA's own rotary ignores position_ids when decoding),
with seqlens_k = T - 1 for every row and M as its attention_bias, so left-padded batches are exact.
``"standard"`` spells it in MatMul/Softmax: grouped-query heads share a K/V head by reshaping q
[B, H, S, d] to [B, Hk, (H/Hk)·S, d] (HF's repeat_kv order: query head j reads key/value head
j // (H/Hk)), so no K/V copy is made.

Weights: a packed layer of a jacquant-converted model goes out as ``com.microsoft.MatMulNBits`` with
its codes, scales and zero points unchanged (W = s·(c - z), exact); a full-precision layer as MatMul
with W^T (so the fp32 model exports through the same graph for comparison). q/k/v and gate/up are
fused into one node each when they share the form. ``head_bits`` quantizes a full-precision LM head
round-to-nearest (min-max per block of ``head_group``); a head tied to the embedding then also
serves the embedding through ``com.microsoft.GatherBlockQuantized``, sharing the bytes.
Norms are ``RMSNormalization`` (opset 23) / ``com.microsoft.SkipSimplifiedLayerNormalization`` and
RoPE is ``com.microsoft.RotaryEmbedding`` with HF's own cos/sin table (any rope type it computes).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import onnx
import torch
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper

from jacquant.export.convert import PackedWeight, converted_copy
from jacquant.export.lower import (
    ACCURACY_LEVELS,
    MAX_PROTO_BYTES,
    ONNX_INT_TYPES,
    _int_tensor,
)
from jacquant.export.validate import check_onnx
from jacquant.primitives.grid import init_minmax, quantize
from jacquant.primitives.packing import pack_codes, pack_zero_points, unpack_codes
from jacquant.qat.quantizer import WeightQuantizer

MS = "com.microsoft"
OPSET = 23
NEG = float(np.finfo(np.float32).min)
SUPPORTED = ("llama", "mistral", "qwen2")  # RMSNorm + RoPE + GQA + SiLU-gated MLP, no q/k norms
META_FILE = "jacquant_decoder.json"
ATTENTION = ("gqa", "standard")


@dataclass
class Linear:
    """One projection's weight: ``fp`` W [N, K] float32, or packed (MatMulNBits B, scales, zero points)."""

    n: int
    k: int
    fp: Optional[np.ndarray] = None
    packed: Optional[np.ndarray] = None  # uint8 [N, K/G, G·bits/8]
    scale: Optional[np.ndarray] = None  # float32 [N, K/G]
    zero_point: Optional[np.ndarray] = None  # uint8 [N, K/G]
    bits: int = 0
    group: int = 0
    bias: Optional[np.ndarray] = None

    @property
    def kind(self) -> tuple:
        return ("fp",) if self.fp is not None else ("nbits", self.bits, self.group)


def _linear(module: nn.Module, name: str) -> Linear:
    """The weight of an ``nn.Linear`` of a full-precision or converted model."""
    bias = None if getattr(module, "bias", None) is None else module.bias.detach().float().numpy()
    packed = getattr(module, "weight_packed", None)
    if packed is not None and not isinstance(packed, PackedWeight):
        raise ValueError(f"layer `{name}`: GGUF's {packed.format} grid (scale and min) has no MatMulNBits form; export "
                         "it with jacquant.export.export_gguf, or train with format='q4_0', which exports to both")
    if isinstance(packed, PackedWeight):
        if packed.bits != packed.storage_bits:
            raise ValueError(f"layer `{name}`: {packed.bits}-bit codes have no MatMulNBits kernel; quantize with 2 or 4 "
                             "bits, or export with jacquant.export_onnx(widen_bits=True) without the KV cache")
        return Linear(packed.out_features, packed.in_features, packed=packed.packed.numpy(),
                      scale=packed.scale.float().numpy(), zero_point=packed.zero_point.numpy(), bits=packed.bits,
                      group=packed.group, bias=bias)
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor):
        raise ValueError(f"layer `{name}` has neither a weight nor a jacquant packed weight")
    w = w.detach().float().numpy()
    return Linear(w.shape[0], w.shape[1], fp=w, bias=bias)


def rtn_linear(w: np.ndarray, bits: int, group: int) -> Linear:
    """Round-to-nearest b-bit codes of W [N, K] per group of G along K with min-max scales.

    s = (hi - lo)/(2^b - 1), z = round(-lo/s) with lo/hi the group's min/max widened to contain 0;
    c = clamp(round(W/s + z), 0, 2^b - 1) (:func:`jacquant.primitives.grid.init_minmax`, ``quantize``).
    """
    wt = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))
    s, z = init_minmax(wt, bits, group)
    codes = quantize(wt, s, z, bits, group)
    return Linear(w.shape[0], w.shape[1], packed=pack_codes(codes, bits, group).numpy(), scale=s.numpy(),
                  zero_point=z.numpy(), bits=bits, group=group)


def _concat(parts: list[Linear]) -> list[Linear]:
    """Fuse projections reading the same input into one along N where they share the form."""
    if len({p.kind for p in parts}) != 1 or len({p.k for p in parts}) != 1 or \
            len({p.bias is None for p in parts}) != 1:
        return parts
    p0 = parts[0]
    cat = (lambda xs: None if xs[0] is None else np.concatenate(xs, 0))
    return [Linear(sum(p.n for p in parts), p0.k, fp=cat([p.fp for p in parts]), packed=cat([p.packed for p in parts]),
                   scale=cat([p.scale for p in parts]), zero_point=cat([p.zero_point for p in parts]), bits=p0.bits,
                   group=p0.group, bias=cat([p.bias for p in parts]))]


class _Graph:
    """Accumulates nodes, initializers and unique names."""

    def __init__(self, accuracy_level: int, standard: bool = False, fold_zero_points: bool = False):
        self.fold_zero_points = fold_zero_points
        self.standard = standard  # standard ops only: DequantizeLinear + MatMul, RMSNormalization, RotaryEmbedding
        self.opset = OPSET
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.accuracy_level = accuracy_level
        self._consts: dict = {}

    def node(self, op: str, inputs: list[str], name: str, n_out: int = 1, domain: str = "", **attrs) -> list[str]:
        outs = [f"{name}/out{j}" if n_out > 1 else f"{name}/out" for j in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, domain=domain, **attrs))
        return outs

    def one(self, op: str, inputs: list[str], name: str, domain: str = "", **attrs) -> str:
        return self.node(op, inputs, name, 1, domain, **attrs)[0]

    def init(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def const(self, values, dtype=np.int64) -> str:
        arr = np.asarray(values, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.init(f"const/{len(self._consts)}", arr)
        return self._consts[key]

    def dequantized_t(self, w: Linear, name: str) -> str:
        """W^T [K, N] = DequantizeLinear(codes^T, s^T, z^T, axis 0, block G): UINT2 (opset 25) or UINT4 codes;
        2-bit layers with N % 4 != 0 as UINT4 (onnxruntime 1.32 fuses those wrongly, see ``lower``)."""
        codes = unpack_codes(torch.from_numpy(w.packed.copy()), w.bits, w.group)  # [N, K]
        width = 4 if w.bits == 2 and w.n % 4 else w.bits
        if width == 2:
            self.opset = max(self.opset, 25)
        qtype = ONNX_INT_TYPES[width]
        wq = _int_tensor(codes.t().contiguous(), width, qtype, name + ".codes")
        zq = _int_tensor(torch.from_numpy(w.zero_point.copy()).t().contiguous(), width, qtype, name + ".zero_points")
        self.inits += [wq, zq]
        sc = self.init(name + ".scales", np.ascontiguousarray(w.scale.astype(np.float32).T))
        return self.one("DequantizeLinear", [wq.name, sc, zq.name], name + ".weight_t", axis=0, block_size=w.group)

    def rms_norm(self, x: str, gamma: str, name: str, eps: float, skip: Optional[str] = None) -> tuple[str, str]:
        """(RMSNorm(x + skip)·gamma, x + skip): SkipSimplifiedLayerNormalization, or Add + RMSNormalization."""
        if skip is None:
            return self.one("RMSNormalization", [x, gamma], name, axis=-1, epsilon=eps), x
        if self.standard:
            total = self.one("Add", [x, skip], name + "_residual")
            return self.one("RMSNormalization", [total, gamma], name, axis=-1, epsilon=eps), total
        y, _, _, total = self.node("SkipSimplifiedLayerNormalization", [x, skip, gamma], name, 4, domain=MS, epsilon=eps)
        return y, total

    def rope(self, x: str, cos: str, sin: str, heads: int, name: str) -> str:
        """RotaryEmbedding of x [B, S, heads·d] at position_ids (non-interleaved halves, as HF Llama)."""
        inputs = [x, cos, sin, "position_ids"] if self.standard else [x, "position_ids", cos, sin]
        return self.one("RotaryEmbedding", inputs, name, domain="" if self.standard else MS, num_heads=heads,
                        interleaved=0)

    def matmul(self, x: str, w: Linear, name: str, shared: Optional[dict] = None) -> str:
        """x [..., K] -> [..., N]; ``shared`` names already-written initializers to reuse."""
        if w.fp is not None:
            wt = shared["weight_t"] if shared else self.init(name + ".weight_t", w.fp.T)
            y = self.one("MatMul", [x, wt], name)
        elif self.standard:
            wt = shared["weight_t"] if shared else self.dequantized_t(w, name)
            y = self.one("MatMul", [x, wt], name)
        else:
            correction = None
            if shared:
                b, s, z = shared["packed"], shared["scales"], shared["zero_points"]
            else:
                b = self.init(name + ".packed", w.packed)
                s = self.init(name + ".scales", w.scale.astype(np.float32))
                z = ""
                mid = 1 << (w.bits - 1)
                if (w.zero_point == mid).all():
                    pass
                elif self.fold_zero_points:
                    # s(c - z) = s(c - m) + s(m - z): the kernel's default grid plus a per-block constant,
                    # x·(s(m - z))^T = blocksum(x) · C^T with C = s(m - z) [N, K/G]
                    c_t = (w.scale.astype(np.float32) * (mid - w.zero_point.astype(np.float32))).T
                    xs = self.one("ReduceSum", [self.one("Reshape", [x, self.const([0, 0, w.k // w.group, w.group])],
                                                         name + ".x_blocks"), self.const([-1])],
                                  name + ".x_block_sums", keepdims=0)
                    correction = self.one("MatMul", [xs, self.init(name + ".zero_point_term", c_t)],
                                          name + ".zero_point_correction")
                else:
                    z = self.init(name + ".zero_points",
                                  pack_zero_points(torch.from_numpy(w.zero_point.copy()), w.bits).numpy())
            y = self.one("MatMulNBits", [x, b, s] + ([z] if z else []), name, domain=MS, K=w.k, N=w.n, bits=w.bits,
                         block_size=w.group, accuracy_level=self.accuracy_level)
            if correction is not None:
                y = self.one("Add", [y, correction], name + "_zero_points")
        if w.bias is not None:
            y = self.one("Add", [y, self.init(name + ".bias", w.bias)], name + "_bias")
        return y


def _check_model(model: nn.Module) -> nn.Module:
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) not in SUPPORTED:
        raise ValueError(f"export_onnx(kv_cache=True) supports Hugging Face {', '.join(SUPPORTED)} causal LMs, got "
                         f"{type(model).__name__} (model_type {getattr(cfg, 'model_type', None)!r}); export other "
                         "models without the cache")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise ValueError(f"export_onnx(kv_cache=True): hidden_act={cfg.hidden_act!r}, only silu is supported")
    if any(isinstance(m, WeightQuantizer) for m in model.modules()):
        return converted_copy(model)
    return model


def _rope_tables(model: nn.Module, head_dim: int, max_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [max_positions, d/2] from the model's own rotary module (HF repeats the half: cos = [c, c])."""
    rotary = model.model.rotary_emb
    pos = torch.arange(max_positions).unsqueeze(0)
    with torch.no_grad():
        cos, sin = rotary(torch.zeros(1, dtype=torch.float32), pos)
    cos, sin = cos[0].float().numpy(), sin[0].float().numpy()
    half = head_dim // 2
    if not (np.array_equal(cos[:, :half], cos[:, half:]) and np.array_equal(sin[:, :half], sin[:, half:])):
        raise ValueError("export_onnx(kv_cache=True): the rotary table is not half-repeated (partial rotary); "
                         "not supported")
    return cos[:, :half], sin[:, :half]


def _standard_attention(g: "_Graph", p: str, q: str, k: str, v: str, past: list[str], present: list[str], heads: int,
                        kv_heads: int, head_dim: int, cos_name: str, sin_name: str, bias: str) -> str:
    """RoPE + softmax(q K^T / sqrt(d) + M) V in standard ops (plus RotaryEmbedding); context [B, S, H·d]."""
    q = g.rope(q, cos_name, sin_name, heads, p + ".self_attn.rope_q")
    k = g.rope(k, cos_name, sin_name, kv_heads, p + ".self_attn.rope_k")
    q = g.one("Transpose", [g.one("Reshape", [q, g.const([0, 0, heads, head_dim])], p + ".q_4d")], p + ".q_bhsd",
              perm=[0, 2, 1, 3])
    q = g.one("Reshape", [q, g.const([0, kv_heads, -1, head_dim])], p + ".q_groups")  # [B, Hk, g·S, d]
    kvs = []
    for name, t, pa, pr in (("key", k, past[0], present[0]), ("value", v, past[1], present[1])):
        t = g.one("Transpose", [g.one("Reshape", [t, g.const([0, 0, kv_heads, head_dim])], f"{p}.{name}_4d")],
                  f"{p}.{name}_bhsd", perm=[0, 2, 1, 3])
        g.nodes.append(helper.make_node("Concat", [pa, t], [pr], name=f"{p}.{name}_concat", axis=2))
        kvs.append(pr)
    kt = g.one("Transpose", [kvs[0]], p + ".key_t", perm=[0, 1, 3, 2])
    scores = g.one("MatMul", [q, kt], p + ".scores")
    scores = g.one("Mul", [scores, g.const(1.0 / np.sqrt(head_dim), np.float32)], p + ".scores_scaled")
    scores = g.one("Add", [scores, bias], p + ".scores_masked")
    probs = g.one("Softmax", [scores], p + ".probs", axis=-1)
    o = g.one("MatMul", [probs, kvs[1]], p + ".context")  # [B, Hk, g·S, d]
    o = g.one("Reshape", [o, g.const([0, heads, -1, head_dim])], p + ".context_heads")
    o = g.one("Reshape", [g.one("Transpose", [o], p + ".context_bshd", perm=[0, 2, 1, 3]),
                          g.const([0, 0, heads * head_dim])], p + ".context_flat")
    return o


def build_decoder(model: nn.Module, *, accuracy_level: int = 4, head_bits: Optional[int] = None,
                  head_group: int = 32, max_positions: Optional[int] = None,
                  attention: str = "gqa", target: str = "ort",
                  fold_zero_points: bool = False) -> onnx.ModelProto:
    """The KV-cache decoder graph (module docstring) of a full-precision, transformed or converted HF model;
    ``target`` "onnx" uses standard ops only (opset 23, or 25 with 2-bit codes) and standard attention.
    ``fold_zero_points`` writes MatMulNBits without zero points (the kernel's symmetric grid m = 2^(b-1))
    plus the exact correction blocksum(x)·(s(m - z))^T (a [.., K/G] x [K/G, N] MatMul)."""
    if target not in ("ort", "onnx"):
        raise ValueError(f"export_onnx: target={target!r} is not 'ort' or 'onnx'")
    if target == "onnx":
        attention = "standard"
    if attention not in ATTENTION:
        raise ValueError(f"export_onnx: attention={attention!r} is not one of {ATTENTION}")
    if accuracy_level not in ACCURACY_LEVELS:
        raise ValueError(f"export_onnx: accuracy_level={accuracy_level} is not one of {ACCURACY_LEVELS}")
    if head_bits not in (None, 2, 4, 8):
        raise ValueError(f"export_onnx: head_bits={head_bits} must be None (as the model has it), 2, 4 or 8")
    model = _check_model(model)
    cfg = model.config
    hidden = cfg.hidden_size
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    groups = heads // kv_heads
    eps = float(cfg.rms_norm_eps)
    max_positions = max_positions or int(cfg.max_position_embeddings)
    g = _Graph(accuracy_level, standard=target == "onnx", fold_zero_points=fold_zero_points)
    dyn = {"B": "batch", "S": "sequence", "T": "total_sequence", "P": "past_sequence"}

    # masks and shapes, built once
    s_len = g.one("Squeeze", [g.one("Shape", ["input_ids"], "shape_S", start=1, end=2)], "S")
    t_len = g.one("Squeeze", [g.one("Shape", ["attention_mask"], "shape_T", start=1, end=2)], "T")
    p_len = g.one("Sub", [t_len, s_len], "P")
    kpos = g.one("Range", [g.const(0), t_len, g.const(1)], "key_positions")
    qpos = g.one("Unsqueeze", [g.one("Range", [p_len, t_len, g.const(1)], "query_positions"), g.const([1])],
                 "query_positions_col")
    causal = g.one("LessOrEqual", [kpos, qpos], "causal")  # [S, T]
    pad = g.one("Unsqueeze", [g.one("Cast", ["attention_mask"], "mask_bool", to=TensorProto.BOOL), g.const([1, 2])],
                "mask_b11t")
    allowed = g.one("And", [causal, pad], "allowed")  # [B, 1, S, T]
    bias = g.one("Where", [allowed, g.const(0.0, np.float32), g.const(NEG, np.float32)], "mask_bias")
    mask4 = bias
    if attention == "standard":
        bias = g.one("Tile", [bias, g.const([1, 1, groups, 1])], "mask_bias_groups")  # [B, 1, groups·S, T]
    else:  # GroupQueryAttention: every row's keys span the whole cache (padding is masked by mask4)
        batch = g.one("Shape", ["input_ids"], "shape_B", start=0, end=1)
        seqlens_k = g.one("Expand", [g.one("Cast", [g.one("Sub", [t_len, g.const(1)], "T_minus_1")], "T_minus_1_i32",
                                           to=TensorProto.INT32), batch], "seqlens_k")
        total_len = g.one("Cast", [t_len], "total_sequence_length", to=TensorProto.INT32)
    cos, sin = _rope_tables(model, head_dim, max_positions)
    cos_name, sin_name = g.init("rope.cos", cos), g.init("rope.sin", sin)

    # embedding and head
    emb = model.get_input_embeddings().weight.detach().float().numpy()
    head_mod = model.get_output_embeddings()
    tied = head_mod.weight is not None and head_mod.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    head = _linear(head_mod, "lm_head")
    if head_bits is not None and head.fp is not None:
        head = rtn_linear(head.fp, head_bits, head_group)
    if g.standard:  # the embedding keeps its own fp32 table: a dequantized one would be recomputed every run
        shared_head = None
        h = g.one("Gather", [g.init("embed.weight", emb), "input_ids"], "embed")
    elif tied and head.fp is None and head.bias is None and head_bits is not None:
        b = g.init("lm_head.packed", head.packed)
        s = g.init("lm_head.scales", head.scale.astype(np.float32))
        z = g.init("lm_head.zero_points", pack_zero_points(torch.from_numpy(head.zero_point.copy()), head.bits).numpy())
        shared_head = {"packed": b, "scales": s, "zero_points": z}
        flat = g.one("Reshape", [b, g.const([head.n, -1])], "embed.packed_2d")
        zp_rows = g.one("Reshape", [z, g.const([head.n, -1])], "embed.zero_points_2d")
        h = g.one("GatherBlockQuantized", [flat, "input_ids", s, zp_rows], "embed", domain=MS, bits=head.bits,
                  block_size=head.group, gather_axis=0, quantize_axis=1)
    else:
        emb_name = g.init("embed.weight", emb)
        shared_head = None
        if tied and head.fp is not None and head.bias is None:  # W_head^T = E^T: folded by onnxruntime, not stored
            shared_head = {"weight_t": g.one("Transpose", [emb_name], "lm_head.weight_t", perm=[1, 0])}
        h = g.one("Gather", [emb_name, "input_ids"], "embed")

    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [dyn["B"], dyn["S"]]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [dyn["B"], dyn["T"]]),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64, [dyn["B"], dyn["S"]])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [dyn["B"], dyn["S"], cfg.vocab_size])]
    residual = None
    mlp_out = None
    layers = model.model.layers
    for i, layer in enumerate(layers):
        p = f"layers.{i}"
        attn, mlp = layer.self_attn, layer.mlp
        ln1 = layer.input_layernorm.weight.detach().float().numpy()
        ln2 = layer.post_attention_layernorm.weight.detach().float().numpy()
        if residual is None:
            a, residual = g.rms_norm(h, g.init(p + ".input_layernorm", ln1), p + ".input_layernorm", eps)
        else:
            a, residual = g.rms_norm(mlp_out, g.init(p + ".input_layernorm", ln1), p + ".input_layernorm", eps, residual)
        projections = [_linear(getattr(attn, n), f"{p}.self_attn.{n}") for n in ("q_proj", "k_proj", "v_proj")]
        fused = _concat(projections)
        qkv = None
        if len(fused) == 1:
            qkv = g.matmul(a, fused[0], p + ".self_attn.qkv_proj")
            if attention == "standard":
                q, k, v = g.node("Split", [qkv, g.const([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim])],
                                 p + ".self_attn.split", 3, axis=-1)
        else:
            q, k, v = (g.matmul(a, w, f"{p}.self_attn.{n}") for w, n in zip(projections, ("q_proj", "k_proj", "v_proj")))
        past = [f"past_key_values.{i}.{n}" for n in ("key", "value")]
        present = [f"present.{i}.{n}" for n in ("key", "value")]
        for pa, pr in zip(past, present):
            inputs.append(helper.make_tensor_value_info(pa, TensorProto.FLOAT, [dyn["B"], kv_heads, dyn["P"], head_dim]))
            outputs.append(helper.make_tensor_value_info(pr, TensorProto.FLOAT, [dyn["B"], kv_heads, dyn["T"], head_dim]))
        if attention == "gqa":
            if qkv is not None:
                q, k, v = g.node("Split", [qkv, g.const([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim])],
                                 p + ".self_attn.split", 3, axis=-1)
            q = g.rope(q, cos_name, sin_name, heads, p + ".self_attn.rope_q")
            k = g.rope(k, cos_name, sin_name, kv_heads, p + ".self_attn.rope_k")
            out = [p + ".self_attn.context"] + present
            g.nodes.append(helper.make_node(
                "GroupQueryAttention", [q, k, v] + past + [seqlens_k, total_len, "", "", "", mask4],
                out, name=p + ".self_attn.gqa", domain=MS, num_heads=heads, kv_num_heads=kv_heads, do_rotary=0,
                scale=float(1.0 / np.sqrt(head_dim))))
            o = out[0]
        else:
            o = _standard_attention(g, p, q, k, v, past, present, heads, kv_heads, head_dim, cos_name, sin_name, bias)
        o = g.matmul(o, _linear(attn.o_proj, p + ".self_attn.o_proj"), p + ".self_attn.o_proj")
        m, residual = g.rms_norm(o, g.init(p + ".post_attention_layernorm", ln2), p + ".post_attention_layernorm", eps,
                                 residual)
        gate_up = [_linear(mlp.gate_proj, p + ".mlp.gate_proj"), _linear(mlp.up_proj, p + ".mlp.up_proj")]
        fused = _concat(gate_up)
        if len(fused) == 1:
            gu = g.matmul(m, fused[0], p + ".mlp.gate_up_proj")
            gate, up = g.node("Split", [gu, g.const([gate_up[0].n, gate_up[1].n])], p + ".mlp.split", 2, axis=-1)
        else:
            gate, up = g.matmul(m, gate_up[0], p + ".mlp.gate_proj"), g.matmul(m, gate_up[1], p + ".mlp.up_proj")
        act = g.one("Mul", [gate, g.one("Sigmoid", [gate], p + ".mlp.sigmoid")], p + ".mlp.silu")
        act = g.one("Mul", [act, up], p + ".mlp.gated")
        mlp_out = g.matmul(act, _linear(mlp.down_proj, p + ".mlp.down_proj"), p + ".mlp.down_proj")
    final = model.model.norm.weight.detach().float().numpy()
    hn = g.rms_norm(mlp_out, g.init("norm", final), "norm", eps, residual)[0]
    logits = g.matmul(hn, head, "lm_head", shared_head)
    g.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="logits"))
    graph = helper.make_graph(g.nodes, "jacquant_decoder", inputs, outputs, g.inits)
    opsets = [helper.make_opsetid("", g.opset)] + ([] if g.standard else [helper.make_opsetid(MS, 1)])
    proto = helper.make_model(graph, opset_imports=opsets, producer_name="jacquant")
    proto.ir_version = 11 if g.opset >= 25 else 10
    meta = decoder_metadata(model, head, accuracy_level)
    helper.set_model_props(proto, {"jacquant.decoder": json.dumps(meta)})
    if proto.ByteSize() > MAX_PROTO_BYTES:
        raise ValueError(f"export_onnx: the decoder is {proto.ByteSize() / 2**30:.1f} GiB, over protobuf's 2 GiB; "
                         "external-data export is not supported yet")
    return proto


def decoder_metadata(model: nn.Module, head: Linear, accuracy_level: int) -> dict:
    """What the generation loop needs to know about the graph: cache shapes, stop tokens, weights."""
    cfg = model.config
    heads = cfg.num_attention_heads
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    eos = eos if eos is not None else cfg.eos_token_id
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    bits = sorted({p.bits for p in model.modules() if isinstance(p, PackedWeight)})
    return {"num_layers": cfg.num_hidden_layers, "kv_heads": getattr(cfg, "num_key_value_heads", None) or heads,
            "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // heads, "vocab_size": cfg.vocab_size,
            "eos_token_ids": eos, "weight_bits": bits or [32], "head": "fp32" if head.fp is not None else
            f"{head.bits}-bit g{head.group}", "accuracy_level": accuracy_level}


def export_decoder(model: nn.Module, path: Optional[str] = None, *, tokenizer=None, accuracy_level: int = 4,
                   head_bits: Optional[int] = None, head_group: int = 32,
                   max_positions: Optional[int] = None, attention: str = "gqa",
                   target: str = "ort", fold_zero_points: bool = False) -> onnx.ModelProto:
    """Build the KV-cache decoder (module docstring), check it, write it to ``path`` with ``tokenizer``
    (and a ``jacquant_decoder.json``) saved in the same directory, and return it."""

    proto = build_decoder(model, accuracy_level=accuracy_level, head_bits=head_bits, head_group=head_group,
                          max_positions=max_positions, attention=attention, target=target,
                          fold_zero_points=fold_zero_points)
    check_onnx(proto, "export_onnx(kv_cache=True)")
    if path is not None:
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        onnx.save(proto, path)
        meta = json.loads(proto.metadata_props[0].value)
        with open(os.path.join(folder, META_FILE), "w") as f:
            json.dump(meta, f, indent=1)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
    return proto


def load_metadata(source: Union[str, "onnx.ModelProto"]) -> dict:
    """The ``jacquant.decoder`` metadata of a decoder file or proto."""
    if isinstance(source, str):
        proto = onnx.load(source, load_external_data=False)
    else:
        proto = source
    for p in proto.metadata_props:
        if p.key == "jacquant.decoder":
            return json.loads(p.value)
    raise ValueError(f"{source if isinstance(source, str) else '<model>'}: not a jacquant KV-cache decoder (no "
                     "jacquant.decoder metadata); export it with jacquant.export_onnx(model, kv_cache=True)")
