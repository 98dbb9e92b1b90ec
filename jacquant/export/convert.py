"""Convert a transformed (fake-quant) model to its packed integer form, and save / load it.

Each quantized site's :class:`~jacquant.qat.quantizer.WeightQuantizer` and full-precision weight are replaced
by a :class:`PackedWeight` holding, for W [N, K] in groups of G along K:

    packed      uint8 [N, K/G, G·c/8]   codes c = clamp(round(W/s + z), 0, 2^b - 1), MatMulNBits layout
    scale       float32 [N, K/G]        s (clamped to SCALE_FLOOR, as the fake-quant forward uses it)
    zero_point  uint8 [N, K/G]          z

so that ``y = x · (s·(c - z))^T + bias`` is bit-for-bit the fake-quant model's Q(W). The container
width c is b for b in {2, 4, 8}; 3-bit codes live in a 4-bit container (``storage_bits``). The call
goes through the custom op ``jacquant::packed_linear`` (one node in an exported graph, translated by
:mod:`jacquant.export.onnx`). The fp weight is dropped from its owner unless another module still
uses it (a head tied to an embedding keeps the embedding table, which stays full precision).

A site trained on a GGUF format (:mod:`jacquant.primitives.formats`) converts to what that format stores: Q4_0 to a
PackedWeight as above (z = 8, G = 32, s the fp16 value the forward used), Q4_1 and Q2_K to a
:class:`~jacquant.export.gguf_blocks.GGUFWeight` holding the format's block bytes.

Checkpoints are safetensors (no pickle) with metadata naming every packed layer, its bits, group,
shape and storage width; :func:`load_converted` refuses a file whose metadata does not match.
"""
from __future__ import annotations

import json
import math
from typing import Iterator, NamedTuple, Optional

import torch
import torch.fx as fx
import torch.nn as nn
from torch import Tensor

from jacquant.export.gguf_blocks import GGUFWeight
from jacquant.kernels.packed_matmul import packed_linear as _packed_linear_kernel
from jacquant.passes.rewrite import install_forward, installed_graph, quantizer_attr
from jacquant.primitives.grid import SCALE_FLOOR, dequantize, qmax
from jacquant.primitives.packing import pack_codes, unpack_codes
from jacquant.qat.quantizer import WeightQuantizer, sites

FORMAT = "jacquant.converted"
FORMAT_VERSION = "1"


@torch.library.custom_op("jacquant::packed_linear", mutates_args=())
def packed_linear(
    x: Tensor, packed: Tensor, scale: Tensor, zero_point: Tensor, bias: Optional[Tensor], bits: int, group: int
) -> Tensor:
    """y = x · (s·(c - z))^T + bias, codes c unpacked from ``packed`` [N, K/G, G·bits/8]; x [..., K] -> [..., N]."""
    return _packed_linear_kernel(x, packed, scale, zero_point, bias, bits, group)


@packed_linear.register_fake
def _(x, packed, scale, zero_point, bias, bits, group):
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


def storage_bits(bits: int) -> int:
    """Width of the packing container for b-bit codes: the smallest of 2, 4, 8 that holds them."""
    for c in (2, 4, 8):
        if bits <= c:
            return c
    raise ValueError(f"bits={bits} does not fit an 8-bit container; jacquant packs 2 to 8 bits")


class PackedWeight(nn.Module):
    """The integer form of one quantized weight, registered on the owner as ``<weight>_packed``.

    Calling it computes ``x · (s·(c - z))^T + bias`` through ``torch.ops.jacquant.packed_linear``.
    ``bits`` is the code width b (codes < 2^b), ``storage_bits`` the container width (2, 4 or 8).
    """

    format: Optional[str] = None  # "q4_0" for a site trained on GGUF's Q4_0 grid

    def __init__(self, packed: Tensor, scale: Tensor, zero_point: Tensor, *, bits: int, group: int, name: str,
                 weight_attr: str, transposed: bool, format: Optional[str] = None):
        super().__init__()
        self.bits, self.group, self.storage_bits = bits, group, storage_bits(bits)
        self.format = format
        self.name, self.weight_attr, self.transposed = name, weight_attr, transposed
        self.register_buffer("packed", packed)  # uint8 [N, K/G, G·storage_bits/8]
        self.register_buffer("scale", scale)  # float32 [N, K/G]
        self.register_buffer("zero_point", zero_point)  # uint8 [N, K/G]

    @classmethod
    @torch.no_grad()
    def from_quantizer(cls, q: WeightQuantizer, weight: Tensor) -> "PackedWeight":
        """Pack ``q.codes(weight)`` with the scale the forward used (for Q4_0 its fp16 value); refuses a group
        whose G·container bits is not a whole byte count."""
        width = storage_bits(q.bits)
        if (q.group * width) % 8:
            raise ValueError(f"layer `{q.name}`: group {q.group} with {q.bits}-bit codes ({width}-bit container) does "
                             f"not pack into whole bytes; use a group that is a multiple of {8 // width}")
        packed = pack_codes(q.codes(weight), width, q.group)
        scale = q.effective_scale().detach().to(torch.float32).clamp_min(SCALE_FLOOR).clone()
        return cls(packed, scale, q.zero_point.detach().clone(), bits=q.bits, group=q.group, name=q.name,
                   weight_attr=q.weight_attr, transposed=q.transposed, format=q.format)

    @property
    def out_features(self) -> int:
        return self.packed.shape[0]

    @property
    def in_features(self) -> int:
        return self.packed.shape[1] * self.group

    def forward(self, x: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        return torch.ops.jacquant.packed_linear(x, self.packed, self.scale, self.zero_point, bias,
                                                self.storage_bits, self.group)

    def codes(self) -> Tensor:
        """Integer codes c, uint8 [N, K]."""
        return unpack_codes(self.packed, self.storage_bits, self.group)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """s·(c - z), [N, K]."""
        return dequantize(self.codes(), self.scale, self.zero_point, self.group, dtype)

    def layer_info(self) -> dict:
        """What a checkpoint's metadata records for this layer."""
        info = {"bits": self.bits, "group": self.group, "storage_bits": self.storage_bits, "out_features":
                self.out_features, "in_features": self.in_features, "weight_attr": self.weight_attr,
                "transposed": self.transposed}
        return {**info, "format": self.format} if self.format else info

    def extra_repr(self) -> str:
        return (f"{self.weight_attr}: [{self.out_features}, {self.in_features}], bits={self.bits}, group={self.group}"
                f"{f', format={self.format}' if self.format else ''}"
                f"{'' if self.storage_bits == self.bits else f', {self.storage_bits}-bit container'}")


class PackedSite(NamedTuple):
    """A packed site of a converted model: its name, the module path that holds it, and the module."""

    name: str
    path: str
    packed: "PackedWeight | GGUFWeight"


PACKED_TYPES = (PackedWeight, GGUFWeight)


def packed_sites(model: nn.Module) -> Iterator[PackedSite]:
    """Every :class:`PackedWeight` (and :class:`~jacquant.export.gguf_blocks.GGUFWeight`) of a converted model, in
    module order."""
    for path, m in model.named_modules():
        if isinstance(m, PACKED_TYPES):
            yield PackedSite(m.name, path, m)


def packed_attr(weight_path: str) -> str:
    """Attribute name of a weight's packed form on its owner: ``weight`` -> ``weight_packed``."""
    return weight_path.replace(".", "_") + "_packed"


def convert(model: nn.Module) -> nn.Module:
    """Replace every quantized site of a transformed model by its packed integer form, in place.

    The refresh state (``jacquant_step``, ``jacquant_rng``, the config) is removed too.
    For each owner the installed forward graph (see :mod:`jacquant.passes.rewrite`) is copied with
    ``<w>_quantizer(x, W, b)`` replaced by ``<w>_packed(x, b)``; the quantizer is removed and the fp
    weight dropped (``owner.<w>`` becomes None) where nothing else uses it. Outputs equal the
    fake-quant model's: both multiply by s·(c - z) computed the same way in float32.

    Raises ValueError for a model that was never transformed, or one already converted.
    """
    if any(isinstance(m, PACKED_TYPES) for m in model.modules()) and not any(True for _ in sites(model)):
        raise ValueError(f"{type(model).__name__} is already converted by jacquant; convert a transformed model once")
    found = list(sites(model))
    if not found:
        raise ValueError(f"{type(model).__name__} has no jacquant quantizer; call jacquant.transform(model, ...) "
                         "(and train it) before convert")
    by_owner: dict[int, list] = {}
    for s in found:
        by_owner.setdefault(id(s.owner), []).append(s)
    for owner_sites in by_owner.values():
        _convert_owner(model, owner_sites)
    from jacquant.qat.refresh import detach

    detach(model)  # the refresh clock and RNG are training state: an integer model no longer trains
    return model


def converted_copy(model: nn.Module) -> nn.Module:
    """A converted model to export: ``model`` itself if converted, else a converted deep copy."""
    import copy

    if any(isinstance(m, WeightQuantizer) for m in model.modules()):
        return convert(copy.deepcopy(model))
    if any(isinstance(m, PACKED_TYPES) for m in model.modules()):
        return model
    raise ValueError(f"{type(model).__name__} is not quantized by jacquant: call jacquant.transform(model, bits, "
                     "group) (and train it) before exporting it")


def _convert_owner(model: nn.Module, owner_sites: list) -> None:
    owner = owner_sites[0].owner
    gm = installed_graph(owner)
    if gm is None:
        raise TypeError(f"layer `{owner_sites[0].name}`: its owner {type(owner).__name__} has no jacquant-rewritten "
                        "forward (was the model's forward replaced after transform?); transform the model again")
    graph = fx.Graph(owning_module=owner)
    graph.output(graph.graph_copy(gm.graph, {}))
    by_target = {quantizer_attr(s.quantizer.weight_attr): s for s in owner_sites}
    for s in owner_sites:
        form = GGUFWeight if hasattr(s.quantizer, "gguf_params") else PackedWeight
        owner.register_module(packed_attr(s.quantizer.weight_attr), form.from_quantizer(s.quantizer, s.weight))
    for node in list(graph.nodes):
        if node.op != "call_module" or node.target not in by_target:
            continue
        s = by_target[node.target]
        x, _, bias = (list(node.args) + [None] * 3)[:3]
        with graph.inserting_before(node):
            new = graph.call_module(packed_attr(s.quantizer.weight_attr), (x, bias))
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    graph.eliminate_dead_code()
    graph.lint()
    still_read = {n.target for n in graph.nodes if n.op == "get_attr"}
    for s in owner_sites:
        delattr(owner, quantizer_attr(s.quantizer.weight_attr))
    install_forward(owner, fx.GraphModule(owner, graph, class_name=type(gm).__name__.replace("Quantized", "Packed")))
    for s in owner_sites:
        path = s.quantizer.weight_attr
        if "." not in path and path not in still_read and not _shared(model, owner, s.weight):
            owner.register_parameter(path, None)  # the fp weight is gone; owner.<path> is None


def _shared(model: nn.Module, owner: nn.Module, weight: Tensor) -> bool:
    """Whether a module other than ``owner`` holds ``weight`` (a tied embedding)."""
    for m in model.modules():
        if m is not owner and any(p is weight for p in m._parameters.values()):
            return True
    return False


# ----------------------------------------------------------------------------------- save / load
def _metadata(model: nn.Module) -> dict[str, str]:
    layers = {s.path: {"name": s.name, **s.packed.layer_info()} for s in packed_sites(model)}
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "model": type(model).__name__,
            "layers": json.dumps(layers, sort_keys=True)}


def save_converted(model: nn.Module, path: str) -> None:
    """Write a converted model's state (packed codes, scales, zero points, fp params) as safetensors.

    Metadata records the format, the model class and, per packed layer, its name, bits, group,
    storage width and shape. Tied parameters are stored once (``safetensors.torch.save_model``).
    """
    from safetensors.torch import save_model

    if not any(True for _ in packed_sites(model)):
        raise ValueError(f"{type(model).__name__} has no packed layer; call jacquant.convert(model) before "
                         "save_converted (a fake-quant model saves with torch's state_dict)")
    save_model(model, path, metadata=_metadata(model))


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8,
                "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit


def check_safetensors_layout(path: str) -> dict[str, dict]:
    """Read a safetensors header and check every tensor's bytes against its dtype and shape.

    The file is ``[u64 little-endian n][n bytes of JSON header][data]``; each header entry
    ``{"dtype", "shape", "data_offsets": [b, e]}`` must have a known dtype, non-negative integer
    dims, ``e - b = prod(shape) · itemsize``, and the entries must tile the data exactly (no gap, no
    overlap, nothing past the end of the file). Returns the entries (``__metadata__`` excluded);
    raises ValueError naming the first tensor that breaks a rule (a truncated or edited file).
    """
    import os

    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or n > min(MAX_HEADER_BYTES, size - 8):
            raise ValueError(f"{path}: not a safetensors file: header length {n} does not fit the file's {size} bytes "
                             "(truncated?)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    data = size - 8 - n
    spans = []
    for key, entry in header.items():
        dtype, shape, offsets = (entry.get(k) if isinstance(entry, dict) else None
                                 for k in ("dtype", "shape", "data_offsets"))
        if dtype not in _DTYPE_BYTES:
            raise ValueError(f"{path}: tensor `{key}` has unknown dtype {dtype!r}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise ValueError(f"{path}: tensor `{key}` has invalid shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise ValueError(f"{path}: tensor `{key}` has invalid data_offsets {offsets!r}")
        need = math.prod(shape) * _DTYPE_BYTES[dtype]
        if offsets[1] - offsets[0] != need:
            raise ValueError(f"{path}: tensor `{key}` is {dtype} {shape} ({need} bytes) but its data_offsets "
                             f"{offsets} hold {offsets[1] - offsets[0]} bytes")
        if offsets[1] > data:
            raise ValueError(f"{path}: tensor `{key}` ends at byte {offsets[1]} of the data but the file holds "
                             f"{data} (truncated)")
        spans.append((offsets[0], offsets[1], key))
    end = 0
    for b, e, key in sorted(spans):
        if b != end:
            raise ValueError(f"{path}: tensor `{key}` starts at byte {b} of the data, expected {end} (gap or overlap)")
        end = e
    if end != data:
        raise ValueError(f"{path}: the tensors cover {end} bytes of data but the file holds {data}")
    return header


LAYER_FIELDS = {"name": str, "bits": int, "group": int, "storage_bits": int, "out_features": int,
                "in_features": int, "weight_attr": str, "transposed": bool}


def read_metadata(path: str) -> dict:
    """The jacquant metadata of a converted checkpoint, with ``layers`` decoded; refuses other files.

    The file's layout is checked first (:func:`check_safetensors_layout`), and every layer entry must
    carry the fields of :meth:`PackedWeight.layer_info` with their types.
    """
    from safetensors import SafetensorError, safe_open

    check_safetensors_layout(path)
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
    except SafetensorError as e:
        raise ValueError(f"{path}: safetensors refuses the file ({e})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a jacquant converted checkpoint (metadata format={meta.get('format')!r}); "
                         "write one with jacquant.save_converted")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} has jacquant format version {meta.get('format_version')!r}; this jacquant reads "
                         f"version {FORMAT_VERSION}")
    try:
        layers = json.loads(meta["layers"])
    except (KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: metadata `layers` is missing or not JSON ({e})") from None
    if not isinstance(layers, dict):
        raise ValueError(f"{path}: metadata `layers` is not a JSON object")
    for p, info in layers.items():
        bad = sorted(k for k, t in LAYER_FIELDS.items() if not isinstance(info, dict) or type(info.get(k)) is not t)
        if bad:
            raise ValueError(f"{path}: metadata of layer `{p}` has missing or mistyped fields {bad}")
    return {**meta, "layers": layers}


def load_converted(model: nn.Module, path: str) -> nn.Module:
    """Load a :func:`save_converted` checkpoint into ``model``, in place, and return it.

    ``model`` is a skeleton of the same architecture: the original full-precision model (it is
    transformed with the checkpoint's bits and group, restricted to the checkpoint's layers, then
    converted), a transformed model (converted), or a converted model. Every packed layer's name,
    bits, group and shape must match the checkpoint's metadata, and every tensor's shape and dtype
    the model's state; the file's layout is checked before anything is read
    (:func:`check_safetensors_layout`: a truncated or edited file), and the packed layers' values
    before anything is loaded (:func:`check_packed_tensors`). Anything else raises ValueError naming
    the layer or tensor.
    """
    from safetensors import safe_open
    from safetensors.torch import load_model

    meta = read_metadata(path)
    layers: dict = meta["layers"]
    if not any(isinstance(m, (WeightQuantizer,) + PACKED_TYPES) for m in model.modules()):
        _transform_like(model, layers, path)
    if any(True for _ in sites(model)):
        convert(model)
    have = {s.path: {"name": s.name, **s.packed.layer_info()} for s in packed_sites(model)}
    if set(have) != set(layers):
        raise ValueError(f"{path}: packed layers differ from the model's; only in the checkpoint: "
                         f"{sorted(set(layers) - set(have))}, only in the model: {sorted(set(have) - set(layers))}")
    for p, info in layers.items():
        if have[p] != info:
            diff = {k: (info.get(k), have[p].get(k)) for k in set(info) | set(have[p]) if info.get(k) != have[p].get(k)}
            raise ValueError(f"{path}: layer `{info['name']}` does not match the model (checkpoint, model): {diff}")
    state = model.state_dict()
    with safe_open(path, "pt") as f:
        keys = set(f.keys())
        for key in keys:
            sl = f.get_slice(key)
            if key not in state:
                continue  # a tied duplicate or an unexpected key: load_model(strict=True) decides below
            dtype = _SAFETENSORS_DTYPES.get(sl.get_dtype(), sl.get_dtype())
            if list(sl.get_shape()) != list(state[key].shape) or dtype != state[key].dtype:
                raise ValueError(f"{path}: tensor `{key}` is {dtype} {list(sl.get_shape())} in the checkpoint but "
                                 f"{state[key].dtype} {list(state[key].shape)} in the model")
        for s in packed_sites(model):  # values, before anything is written into the model
            if isinstance(s.packed, GGUFWeight):
                key = (f"{s.path}." if s.path else "") + "blocks"
                if key in keys:
                    check_gguf_blocks(s.name, s.packed.format, s.packed.in_features, f.get_tensor(key), path)
                continue
            prefix = f"{s.path}." if s.path else ""
            names = [prefix + t for t in ("packed", "scale", "zero_point")]
            if all(n in keys for n in names):
                check_packed_tensors(s.name, s.packed.bits, s.packed.group, *(f.get_tensor(n) for n in names),
                                     names=names, path=path)
    missing, unexpected = load_model(model, path, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: state does not match the model; missing {sorted(missing)}, "
                         f"unexpected {sorted(unexpected)}")
    return model


def check_packed_tensors(name: str, bits: int, group: int, packed: Tensor, scale: Tensor, zero_point: Tensor, *,
                         names: tuple[str, ...] | list[str] = ("packed", "scale", "zero_point"),
                         path: str = "checkpoint") -> None:
    """Refuse values :func:`save_converted` never writes for a ``bits``-bit layer: a scale that is not
    finite or is below SCALE_FLOOR, a zero point above 2^b - 1, or (codes in a wider container, 3 bits)
    a code above 2^b - 1. ``names`` are the three tensors' keys, used in the error."""
    top = qmax(bits)
    if not bool((torch.isfinite(scale) & (scale >= SCALE_FLOOR)).all()):
        raise ValueError(f"{path}: tensor `{names[1]}` of layer `{name}` has non-finite values or values below "
                         f"SCALE_FLOOR={SCALE_FLOOR}")
    if zero_point.numel() and int(zero_point.max()) > top:
        raise ValueError(f"{path}: tensor `{names[2]}` of layer `{name}` has values above {top}, the largest "
                         f"{bits}-bit code")
    width = storage_bits(bits)
    if width != bits and packed.numel() and int(unpack_codes(packed, width, group).max()) > top:
        raise ValueError(f"{path}: tensor `{names[0]}` of layer `{name}` holds codes above {top}, the largest "
                         f"{bits}-bit code")


def check_gguf_blocks(name: str, fmt: str, k: int, blocks: Tensor, path: str = "checkpoint") -> None:
    """Refuse GGUF block bytes whose fp16 scales or mins are not finite (a tampered or damaged file)."""
    from jacquant.export.gguf_blocks import dequantize

    if not bool(torch.isfinite(dequantize(blocks, fmt, k)).all()):
        raise ValueError(f"{path}: the {fmt} blocks of layer `{name}` hold non-finite scales or mins")


_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                       "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
                       "I64": torch.int64, "BOOL": torch.bool}


def _transform_like(model: nn.Module, layers: dict, path: str) -> None:
    """Transform a full-precision skeleton with the checkpoint's bits and group, on its layers only."""
    from jacquant.api import transform

    names = {v["name"]: v.get("format") for v in layers.values()}
    if any(names.values()):  # GGUF formats, possibly mixed (Q2_K where rows allow, Q4_0 elsewhere)
        if not all(names.values()):
            raise ValueError(f"{path} mixes GGUF-format and plain layers; pass a model already transformed or "
                             "converted with the same layers to load_converted")
        transform(model, method="ste", init="minmax", include_head=True, filter=lambda name, module: name in names,
                  format=lambda name, module: names[name])
        return
    configs = {(v["bits"], v["group"]) for v in layers.values()}
    if len(configs) != 1:
        raise ValueError(f"{path} mixes (bits, group) settings {sorted(configs)}; pass a model already transformed "
                         "or converted with the same layers to load_converted")
    (bits, group), = configs
    transform(model, bits=bits, group=group, method="ste", init="minmax", include_head=True,
              filter=lambda name, module: name in names)
