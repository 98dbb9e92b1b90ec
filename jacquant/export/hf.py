"""A converted model as a Hugging Face checkpoint in compressed-tensors' ``pack-quantized`` format, and back.

jacquant's grid, per group of G weights along K (:mod:`jacquant.primitives.grid`):

    c = clamp(round(w/s + z), 0, 2^b - 1)        Q(w) = s·(c - z)        z integer in [0, 2^b - 1], s an fp16 value

compressed-tensors' INT grid (asymmetric, ``strategy: group``) is signed:

    q = clamp(round(w/s + zp), -2^(b-1), 2^(b-1) - 1)        Q(w) = (q - zp)·s

so with the offset o = 2^(b-1), q = c - o and zp = z - o hold the same grid exactly: q - zp = c - z, an integer
that fp32 holds exactly, times the same s (an fp16 value: jacquant's forward multiplies by fp16(s)). The codes are
packed by compressed-tensors' own compressor
(``ModelCompressor``: 32 consecutive b-bit values in b int32 words; the zero points packed the same way along the
output dimension) from the weight s·(c - z), which it rounds back to c exactly (|s·k / s - k| is a few ulp of k).
:func:`export_hf` checks every packed layer's codes and zero points against the model's after packing.

``transformers.AutoModelForCausalLM.from_pretrained(dir)`` loads the directory on CPU through the compressed-tensors
package (``pip install compressed-tensors``): ``quantization_config`` carries ``"dequantize": true``, so every
layer is unpacked once at load time into the dense weight s·(c - z). transformers computes that product in the dtype
the checkpoint stores the scales in: ``scale_dtype=torch.float32`` (the default) gives the converted model's weights
bit for bit; ``torch.float16`` stores 16 bits per scale instead of 32 (2.28 rather than 2.53 bits per weight at
W2 g64, as AutoRound and GPTQ checkpoints count them) and the load rounds each weight to fp16, fp16(s·(c - z)),
within 2^-11 of it relative (what any fp16 model of these weights computes).
(Without it, transformers 5.25 with compressed-tensors 0.20.1 refuses asymmetric pack-quantized checkpoints: its
default path prepares an unpacked zero point [N, K/G] and finds the packed one.) vLLM's compressed-tensors support
reads this format on GPU (not tested here).

:func:`read_hf_quantized` reads such a checkpoint back (ours, or one written by compressed-tensors from a model
quantized by its own tools: asymmetric or symmetric, group or channel strategy) as codes, scales and zero points
on jacquant's grid; :func:`load_hf_quantized` gives the transformed model whose codes and scales are the
checkpoint's, a QAT start.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from jacquant.export.convert import converted_copy, packed_sites
from jacquant.export.gguf_blocks import GGUFWeight
from jacquant.primitives.grid import SCALE_FLOOR, dequantize

FORMAT = "pack-quantized"
INSTALL_HINT = "pip install compressed-tensors (or pip install -e \".[hf]\")"


@dataclass
class QuantizedLayer:
    """One quantized nn.Linear weight W [N, K] on jacquant's grid, groups of G along K.

    codes       uint8 [N, K]      c in [0, 2^b - 1]
    scale       float32 [N, K/G]  s
    zero_point  uint8 [N, K/G]    z in [0, 2^b - 1]
    """

    codes: Tensor
    scale: Tensor
    zero_point: Tensor
    bits: int
    group: int

    def dequantized(self) -> Tensor:
        """s·(c - z), float32 [N, K]."""
        return dequantize(self.codes, self.scale, self.zero_point, self.group)


def to_signed(codes: Tensor, bits: int) -> Tensor:
    """compressed-tensors' signed value of an unsigned code or zero point: q = c - 2^(b-1), int8."""
    return (codes.to(torch.int16) - (1 << (bits - 1))).to(torch.int8)


def from_signed(q: Tensor, bits: int) -> Tensor:
    """jacquant's unsigned code of a signed value: c = q + 2^(b-1), uint8."""
    return (q.to(torch.int16) + (1 << (bits - 1))).to(torch.uint8)


def _import_ct():
    try:
        import compressed_tensors  # noqa: F401
    except ImportError as e:
        raise ImportError(f"the Hugging Face checkpoint is written in compressed-tensors' format: {INSTALL_HINT}") from e


# ------------------------------------------------------------------------------------------------ export
def hf_layers(model: nn.Module) -> dict[str, QuantizedLayer]:
    """The packed layers of a converted model by module name, refusing what pack-quantized cannot hold.

    Refused with a ValueError naming the layer: a GGUF scale-and-min grid (Q4_1, Q2_K: a float minimum per group,
    not an integer zero point), a weight that is not an nn.Linear's own ``weight`` (GPT-2's transposed Conv1D, a
    functional matmul). Q4_0 (z = 8, G = 32, fp16-valued s) is an integer grid and is kept.
    """
    layers = {}
    for site in packed_sites(model):
        p, owner_path = site.packed, site.path.rpartition(".")[0]
        if isinstance(p, GGUFWeight):
            raise ValueError(f"layer `{p.name}` is trained on GGUF's {p.format} grid (a float minimum per group), which "
                             "compressed-tensors' pack-quantized format cannot hold: export it with --gguf "
                             "(jacquant.export_gguf), or train on a plain --bits/--group grid or --format q4_0")
        if not isinstance(model.get_submodule(owner_path), nn.Linear) or p.weight_attr != "weight" or p.transposed:
            raise ValueError(f"layer `{p.name}` is not an nn.Linear weight ([out, in], module `{owner_path}`): "
                             "compressed-tensors packs nn.Linear weights only; exclude it with transform(..., "
                             "filter=...) or export to ONNX instead")
        layers[owner_path] = QuantizedLayer(p.codes(), p.scale.float(), p.zero_point, p.bits, p.group)
    return layers


def quantization_config(layers: dict[str, QuantizedLayer], linear_names: list[str]):
    """compressed-tensors' QuantizationConfig for ``layers``: one config group per (bits, group), asymmetric INT
    weights, group strategy, pack-quantized. With one grid the group targets ``Linear`` and ignores the unquantized
    Linear modules (llm-compressor's own spelling, which vLLM matches); with several, the module names."""
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
    )

    grids = sorted({(q.bits, q.group) for q in layers.values()})
    groups = {}
    for i, (bits, group) in enumerate(grids):
        names = [n for n, q in layers.items() if (q.bits, q.group) == (bits, group)]
        args = QuantizationArgs(num_bits=bits, type="int", symmetric=False, strategy="group", group_size=group)
        groups[f"group_{i}"] = QuantizationScheme(targets=["Linear"] if len(grids) == 1 else names, weights=args,
                                                  format=FORMAT)
    ignore = [n for n in linear_names if n not in layers] if len(grids) == 1 else []
    return QuantizationConfig(config_groups=groups, ignore=ignore, format=FORMAT)


def export_hf(model: nn.Module, out_dir: str, *, tokenizer=None, card: Optional[dict] = None,
              base_model: Optional[str] = None, scale_dtype: torch.dtype = torch.float32) -> dict:
    """Write a trained or converted Hugging Face causal LM as a compressed-tensors ``pack-quantized`` directory.

    The directory holds ``config.json`` (with ``quantization_config``), ``model.safetensors`` (per quantized
    layer ``weight_packed`` int32, ``weight_scale`` [N, K/G] in ``scale_dtype``, ``weight_zero_point`` int32
    packed, ``weight_shape``; every other tensor as the model holds it), ``generation_config.json``, the tokenizer
    if given, and ``README.md``, a model card built from ``card`` (a ``jacquant train`` summary, jacquant.json).
    ``from_pretrained(out_dir)`` then computes the converted model's weights s·(c - z) bit for bit with fp32
    scales, or fp16(s·(c - z)) with fp16 scales (the module docstring). The scales are fp16 values either way.

    Written into a temporary directory beside ``out_dir`` and renamed when complete. Raises FileExistsError for an
    ``out_dir`` that exists and is not empty, FileNotFoundError for a missing parent, ValueError for a model that
    is not quantized by jacquant, not a transformers model, or trained on a grid pack-quantized cannot hold
    (:func:`hf_layers`). Returns the path, bytes on disk and the grid.
    """
    _import_ct()
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise FileExistsError(f"{out_dir} already exists and is not an empty directory: pass a new directory, or "
                              "remove it first")
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"{parent} does not exist: create it first (mkdir -p {parent})")
    if not hasattr(model, "save_pretrained") or not hasattr(model, "config"):
        raise ValueError(f"{type(model).__name__} is not a transformers model (no config / save_pretrained): the "
                         "Hugging Face checkpoint needs a transformers causal LM")
    if scale_dtype not in (torch.float32, torch.float16):
        raise ValueError(f"scale_dtype {scale_dtype}: the scales are stored as torch.float32 (exact weights in "
                         "transformers) or torch.float16 (half the scale bytes)")
    conv = converted_copy(model)  # ValueError for a model jacquant never quantized
    layers = hf_layers(conv)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.partial-", dir=parent)
    try:
        os.chmod(tmp, 0o755)
        _write(conv, layers, tmp, tokenizer, card, base_model, scale_dtype)
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # empty (checked above)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    grids = sorted({(q.bits, q.group) for q in layers.values()})
    return {"path": out_dir, "bytes": dir_bytes(out_dir), "layers": len(layers),
            "bits": grids[0][0] if len(grids) == 1 else None, "group": grids[0][1] if len(grids) == 1 else None,
            "format": f"compressed-tensors {FORMAT}"}


def _write(conv: nn.Module, layers: dict[str, QuantizedLayer], out: str, tokenizer, card, base_model,
           scale_dtype: torch.dtype) -> None:
    """The dense skeleton with W = s·(c - z), compressed and saved by compressed-tensors, then config, card."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import apply_quantization_config

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4
        from transformers.modeling_utils import no_init_weights

    config = copy.deepcopy(conv.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    head = conv.get_output_embeddings() if hasattr(conv, "get_output_embeddings") else None
    head_name = next((n for n, m in conv.named_modules() if head is not None and m is head), None)
    if head_name in layers and getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False  # the head is packed, the input embedding stays full precision
    sites = {site.path for site in packed_sites(conv)}
    state = {k: v for k, v in conv.state_dict().items() if not any(k.startswith(p + ".") for p in sites)}
    state.update({f"{name}.weight": q.dequantized() for name, q in layers.items()})
    with no_init_weights():
        skeleton = type(conv)(config)
    missing, unexpected = skeleton.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{type(conv).__name__}: the converted model's state does not fit a fresh model of its "
                         f"class (missing {sorted(missing)}, unexpected {sorted(unexpected)}); was its forward or "
                         "structure changed after transform?")
    skeleton.eval()
    if getattr(conv, "generation_config", None) is not None:
        skeleton.generation_config = copy.deepcopy(conv.generation_config)
    linear = [n for n, m in skeleton.named_modules() if isinstance(m, nn.Linear)]
    qconfig = quantization_config(layers, linear)
    apply_quantization_config(skeleton, qconfig, show_progress=False)
    for name, q in layers.items():
        m = skeleton.get_submodule(name)
        if getattr(m, "quantization_scheme", None) is None:
            raise ValueError(f"layer `{name}`: compressed-tensors did not match it to a config group; report this")
        with torch.no_grad():
            m.weight_scale.copy_(q.scale.to(m.weight_scale.dtype))
            m.weight_zero_point.copy_(to_signed(q.zero_point, q.bits).to(m.weight_zero_point.dtype))
    compressor = ModelCompressor.from_pretrained_model(skeleton, quantization_format=FORMAT)
    compressor.compress_model(skeleton)
    for name in layers:  # fp16 values: either dtype holds them exactly
        m = skeleton.get_submodule(name)
        m.weight_scale.data = m.weight_scale.data.to(scale_dtype)
    _check_packed(skeleton, layers)
    if getattr(skeleton.config, "tie_word_embeddings", False):
        skeleton.tie_weights()  # one tensor for the tied embedding and head, so it is stored once
    skeleton.save_pretrained(out)
    compressor.update_config(out)
    path = os.path.join(out, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg["quantization_config"]["dequantize"] = True  # the CPU load path of transformers (module docstring)
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(model_card(type(conv).__name__, layers, card, base_model, dir_bytes(out), scale_dtype))


def _check_packed(skeleton: nn.Module, layers: dict[str, QuantizedLayer]) -> None:
    """Unpack every compressed layer with compressed-tensors' own unpacker and compare with the codes and zero
    points it was given: the mapping c - 2^(b-1), z - 2^(b-1) must be exact."""
    from compressed_tensors.compressors.pack_quantized import unpack_from_int32

    for name, q in layers.items():
        m = skeleton.get_submodule(name)
        shape = torch.Size(m.weight_shape.tolist())
        codes = unpack_from_int32(m.weight_packed.data, q.bits, shape)
        zp = unpack_from_int32(m.weight_zero_point.data, q.bits, q.scale.shape, packed_dim=0)
        if not (torch.equal(codes, to_signed(q.codes, q.bits)) and torch.equal(zp, to_signed(q.zero_point, q.bits))
                and torch.equal(m.weight_scale.data.float(), q.scale)):
            raise RuntimeError(f"layer `{name}`: compressed-tensors packed codes, zero points or scales that differ "
                               "from the model's; this is a bug in jacquant's export")


def dir_bytes(path: str) -> int:
    """Total size of the files in a directory (not following links)."""
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def model_card(model_class: str, layers: dict[str, QuantizedLayer], card: Optional[dict] = None,
               base_model: Optional[str] = None, nbytes: Optional[int] = None,
               scale_dtype: torch.dtype = torch.float32) -> str:
    """README.md of the exported directory: what was trained, on what, how, and the perplexities of ``card``."""
    card = card or {}
    grids = sorted({(q.bits, q.group) for q in layers.values()})
    grid = ", ".join(f"W{b} g{g}" for b, g in grids)
    weights = sum(q.codes.numel() for q in layers.values())
    scales = sum(q.scale.numel() for q in layers.values())
    bits = sum(q.codes.numel() * q.bits for q in layers.values())
    scale_bits = 16 if scale_dtype == torch.float16 else 32
    bpw = (bits + scale_bits * scales + sum(q.zero_point.numel() * q.bits for q in layers.values())) / max(weights, 1)
    source = base_model or card.get("model")
    lines = ["---", "library_name: transformers", "tags: [jacquant, compressed-tensors, quantized, qat]"]
    lines += ([f"base_model: {base_model}"] if base_model else []) + ["---", ""]
    lines += [f"# {model_class}, {grid}, quantization-aware trained by jacquant", ""]
    lines += [f"{len(layers)} nn.Linear weights ({weights:,} weights) on an integer grid per group along the input: "
              f"Q(w) = s·(c − z), codes c and zero points z of {'/'.join(str(b) for b, _ in grids)} bits, "
              f"{'fp16' if scale_bits == 16 else 'fp32'} scales s ({bpw:.2f} bits per quantized weight with scales and zero points); embeddings, norms and "
              "other layers full precision. Stored in compressed-tensors' `pack-quantized` format (asymmetric INT, "
              "group strategy); " + ("the weights are the trained model's, bit for bit." if scale_bits == 32 else
              "transformers computes each weight in fp16, within 2^-11 of the trained model's relative.") +
              (f" Source model: `{source}`." if source else ""), ""]
    if card:
        how = [f"method `{card.get('method')}`", f"{card.get('steps')} steps", f"{card.get('tokens'):,} tokens"
               if isinstance(card.get("tokens"), int) else None, f"lr {card.get('lr')}", f"loss `{card.get('loss')}`",
               f"seed {card.get('seed')}", f"start `{(card.get('pipeline') or {}).get('start')}`",
               f"format `{card['format']}`" if card.get("format") else None]
        lines += ["## Training", "", "`jacquant train` (" + ", ".join(h for h in how if h) + ") on the user's text; "
                  "held-out perplexity on the last 10% of that text:", ""]
        ppl = card.get("ppl") or {}
        rows = [("full precision", ppl.get("fp32")), ("round to nearest", ppl.get("rtn")),
                ("start (GPTQ)", ppl.get("start")), ("after QAT (this model)", ppl.get("qat"))]
        lines += ["| model | perplexity |", "|---|---|"]
        lines += [f"| {r} | {v:.2f} |" for r, v in rows if isinstance(v, (int, float))]
        if isinstance(card.get("seconds"), (int, float)):
            lines += ["", f"Training time: {card['seconds']:.0f} s."]
        lines += [""]
    lines += ["## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              "model = AutoModelForCausalLM.from_pretrained(\"DIR\")   # needs: pip install compressed-tensors",
              "tok = AutoTokenizer.from_pretrained(\"DIR\")", "```", "",
              "`quantization_config.dequantize` is true: transformers unpacks each layer once at load time into "
              "fp32 weights (CPU or GPU). vLLM's compressed-tensors support reads the packed format (not tested by jacquant). "
              "`jacquant train DIR --text ...` continues QAT from these codes and scales.", ""]
    if nbytes:
        lines += [f"Files: {nbytes / 2**20:.1f} MiB.", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ import
def hf_quantization_config(path: str) -> Optional[dict]:
    """The ``quantization_config`` of a model directory's config.json if it is compressed-tensors', else None."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        return None
    with open(cfg_path) as f:
        q = json.load(f).get("quantization_config")
    return q if isinstance(q, dict) and q.get("quant_method") == "compressed-tensors" else None


def read_hf_quantized(path: str) -> dict[str, QuantizedLayer]:
    """The quantized layers of a compressed-tensors pack-quantized checkpoint on jacquant's grid, by module name.

    Per layer, from ``weight_packed`` (b-bit signed values q, unpacked by compressed-tensors), ``weight_scale`` s
    and ``weight_zero_point`` zp (asymmetric; absent, 0, for symmetric): c = q + 2^(b-1), z = zp + 2^(b-1), so
    that s·(c - z) = s·(q - zp). Bits and group come from the config group whose weights match the tensors'
    shapes (group strategy: G = group_size; channel strategy: one group per row, group -1).
    Refused with a ValueError naming the file or layer: another format than pack-quantized, float or activation
    quantization, tensor or block strategy, activation ordering (``weight_g_idx``), a scale that is not finite
    or below SCALE_FLOOR.
    """
    _import_ct()
    from compressed_tensors.compressors.pack_quantized import unpack_from_int32
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors import safe_open

    raw = hf_quantization_config(path)
    if raw is None:
        raise ValueError(f"{path}/config.json has no compressed-tensors quantization_config: pass a directory written "
                         "by `jacquant export --hf` or by llm-compressor / compressed-tensors")
    qc = QuantizationConfig.model_validate(raw)
    schemes = []
    for gname, scheme in qc.config_groups.items():
        fmt = scheme.format or qc.format
        w = scheme.weights
        if fmt != FORMAT:
            raise ValueError(f"{path}: config group `{gname}` is stored as {fmt!r}; jacquant reads {FORMAT!r} only")
        if scheme.input_activations is not None or scheme.output_activations is not None:
            raise ValueError(f"{path}: config group `{gname}` quantizes activations, which jacquant does not train; "
                             "use a weight-only (W*A16) checkpoint")
        if w is None or w.type != "int" or w.strategy not in ("group", "channel") or w.actorder:
            raise ValueError(f"{path}: config group `{gname}` quantizes weights as {w}; jacquant reads INT weights with "
                             "group or channel strategy and no activation ordering")
        schemes.append(w)
    files = _safetensors_files(path)
    layers = {}
    for file in files:
        with safe_open(file, "pt") as f:
            keys = set(f.keys())
            for key in sorted(k for k in keys if k.endswith(".weight_packed")):
                name = key[: -len(".weight_packed")]
                if f"{name}.weight_g_idx" in keys:
                    raise ValueError(f"{file}: layer `{name}` has activation ordering (weight_g_idx); jacquant's grid "
                                     "groups consecutive inputs")
                packed, scale = f.get_tensor(key), f.get_tensor(f"{name}.weight_scale").float()
                shape = torch.Size(f.get_tensor(f"{name}.weight_shape").tolist())
                asym = f"{name}.weight_zero_point" in keys
                w = _matching_scheme(schemes, packed, scale, shape, asym, name, file)
                bits = w.num_bits
                codes = from_signed(unpack_from_int32(packed, bits, shape), bits)
                if asym:
                    zp = unpack_from_int32(f.get_tensor(f"{name}.weight_zero_point"), bits, scale.shape, packed_dim=0)
                    z = from_signed(zp, bits)
                else:
                    z = torch.full(scale.shape, 1 << (bits - 1), dtype=torch.uint8)
                if not bool((torch.isfinite(scale) & (scale >= SCALE_FLOOR)).all()):
                    raise ValueError(f"{file}: layer `{name}` has scales that are not finite or below {SCALE_FLOOR}")
                group = shape[1] // scale.shape[1]
                layers[name] = QuantizedLayer(codes, scale, z, bits, -1 if w.strategy == "channel" else group)
    if not layers:
        raise ValueError(f"{path}: no `*.weight_packed` tensor in {', '.join(files)}: not a pack-quantized checkpoint")
    return layers


def _matching_scheme(schemes: list, packed: Tensor, scale: Tensor, shape: torch.Size, asym: bool, name: str,
                     file: str):
    """The config group's weight args that fit a layer's tensors: packed width ceil(K·b/32), K/G scale columns."""
    n, k = shape
    for w in schemes:
        groups = 1 if w.strategy == "channel" else k // (w.group_size or k)
        if (packed.shape[-1] == -(-k * w.num_bits // 32) and tuple(scale.shape) == (n, groups)
                and asym == (not w.symmetric)):
            return w
    raise ValueError(f"{file}: layer `{name}` (weight_packed {list(packed.shape)}, weight_scale {list(scale.shape)}) "
                     "fits none of the config groups' bits and group sizes; the checkpoint is damaged or edited")


def _safetensors_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return [os.path.join(path, p) for p in sorted(set(json.load(f)["weight_map"].values()))]
    single = os.path.join(path, "model.safetensors")
    if not os.path.isfile(single):
        raise FileNotFoundError(f"{path} has no model.safetensors (or index): not a Hugging Face checkpoint directory")
    return [single]


@torch.no_grad()
def apply_hf_quantized(model: nn.Module, layers: dict[str, QuantizedLayer]) -> nn.Module:
    """Set a transformed model's sites to the checkpoint's grid, in place: s, z, and the weight W = s·(c - z),
    so that the site's codes round(W/s + z) are the checkpoint's c (checked). The model's sites must be exactly
    ``layers`` (by name), with their bits and group; else ValueError naming the layer. Scales that are not fp16
    values (an fp32 checkpoint's) are kept, and the forward multiplies by fp16(s): a warning says by how much that
    changes them."""
    import warnings

    from jacquant.qat.quantizer import sites

    found = {s.name: s for s in sites(model)}
    if set(found) != set(layers):
        raise ValueError(f"the model's quantized layers differ from the checkpoint's: only in the checkpoint "
                         f"{sorted(set(layers) - set(found))}, only in the model {sorted(set(found) - set(layers))}")
    for name, q in layers.items():
        s = found[name]
        qz = s.quantizer
        group = q.codes.shape[1] if q.group == -1 else q.group
        if (qz.bits, qz.group) != (q.bits, group) or qz.format or qz.transposed:
            raise ValueError(f"layer `{name}`: the model's grid (bits {qz.bits}, group {qz.group}, format {qz.format}) "
                             f"is not the checkpoint's (bits {q.bits}, group {q.group}); transform with its grid")
        device = qz.scale.device
        qz.scale.copy_(q.scale.to(device))
        qz.zero_point.copy_(q.zero_point.to(device))
        s.weight.copy_(q.dequantized().to(device, s.weight.dtype))
        if not torch.equal(qz.codes(s.weight).cpu(), q.codes):
            raise RuntimeError(f"layer `{name}`: the codes of s·(c - z) do not round back to c; report this")
    rounded = {name: (q.scale.half().float() - q.scale).abs().div(q.scale.abs().clamp_min(SCALE_FLOOR)).max().item()
               for name, q in layers.items()}
    off = {name: r for name, r in rounded.items() if r > 0}
    if off:
        warnings.warn(f"{len(off)} of {len(layers)} layers store scales that are not fp16 values (e.g. "
                      f"`{next(iter(off))}`); jacquant's forward multiplies by fp16(s), which moves them by at most "
                      f"{max(off.values()):.1e} relative; the codes are the checkpoint's", stacklevel=2)
    return model


def load_dense(path: str, **kwargs) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` of a compressed-tensors checkpoint in fp32 with every layer
    dequantized at load (s·(c - z)), whatever its config says; ``kwargs`` go to from_pretrained."""
    import warnings

    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    _import_ct()
    with warnings.catch_warnings():  # "loading attributes (dequantize) will be overwritten": what is asked for
        warnings.filterwarnings("ignore", message="You passed `quantization_config`")
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs,
                                                    quantization_config=CompressedTensorsConfig(dequantize=True))


def load_hf_quantized(path: str, method: str = "ste", device: str = "cpu") -> nn.Module:
    """The transformed model of a compressed-tensors pack-quantized checkpoint: the dense model (transformers,
    dequantized at load), transformed on the checkpoint's quantized layers with its bits and group and backward
    ``method``, then :func:`apply_hf_quantized`: its codes, scales and zero points are the checkpoint's."""
    from jacquant.api import transform

    layers = read_hf_quantized(path)
    grids = {(q.bits, q.group) for q in layers.values()}
    if len(grids) != 1:
        raise ValueError(f"{path} mixes (bits, group) settings {sorted(grids)}; jacquant trains one grid per model")
    (bits, group), = grids
    model = load_dense(path, local_files_only=True)
    transform(model, bits=bits, group=group, method=method, init="minmax", include_head=True,
              filter=lambda name, module: name in layers)
    return apply_hf_quantized(model, layers).to(device)
