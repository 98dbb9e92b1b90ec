"""Write a model trained on GGUF's own formats as a GGUF file for llama.cpp, with gguf-py's ``GGUFWriter``.

    export_gguf(model, "model.gguf", source_gguf="SmolLM2.Q4_1.gguf")

What goes in (Hugging Face Llama-family causal LMs, llama.cpp architecture ``llama``):

* every quantized site as its format's block bytes, packed from the trained codes and fp16 values
  (:mod:`jacquant.export.gguf_blocks`; nothing is re-quantized): Q4_1 and Q2_K from their
  :class:`~jacquant.export.gguf_blocks.GGUFWeight`, Q4_0 from a PackedWeight whose grid is Q4_0's (4 bits, group 32,
  zero point 8, fp16 scales). A site on any other grid is an error naming the layer;
* the other tensors (embedding, norms, an untied head): the source GGUF's own bytes where they hold exactly
  the model's values, else ``head`` (``"q8_0"``, ``"f16"``, ``"f32"``) for the embedding and head and F32
  for the rest;
* q_proj and k_proj rows in llama.cpp's order (each head's two rotary halves interleaved, the permutation
  transformers' GGUF loader undoes);
* the architecture's hyper-parameters from the model's config, and every ``tokenizer.*`` and ``general.*``
  key of the source GGUF (a tokenizer from a Hugging Face directory alone is not built: pass the GGUF the
  model came from).

The file is written to a temporary name in the target directory and renamed: an error leaves nothing.
"""
from __future__ import annotations

import os
import tempfile
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from jacquant.export.convert import PackedWeight, converted_copy, packed_sites
from jacquant.export.gguf_blocks import GGUFWeight, pack_q4_0
from jacquant.primitives.formats import FORMATS

HEADS = ("q8_0", "f16", "f32")
ARCHS = {"llama": "llama", "mistral": "llama"}  # Hugging Face model_type -> llama.cpp architecture
FILE_TYPES = {"q4_0": 2, "q4_1": 3, "q2_k": 10}  # llama_ftype of the dominant format (general.file_type)
OWN_KEYS = ("GGUF.", "general.architecture", "general.file_type", "general.quantization_version")


def _gguf():
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - gguf is a dependency
        raise ImportError("export_gguf needs the gguf package: pip install gguf") from e
    return gguf


def llama_permute(rows: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's row order for a q or k projection [N, ...] (N = heads·head_dim): in each head, row
    (half h, index i) moves to 2i + h, interleaving the two rotary halves."""
    n = rows.shape[0]
    return rows.reshape(heads, 2, n // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def site_blocks(packed: nn.Module, name: str) -> tuple[str, np.ndarray]:
    """(format, uint8 block bytes [N, row bytes]) of one packed site; a grid that is no GGUF format is an error."""
    if isinstance(packed, GGUFWeight):
        return packed.format, packed.blocks.numpy()
    if isinstance(packed, PackedWeight):
        s = packed.scale
        q4_0 = (packed.bits == 4 and packed.group == 32 and bool((packed.zero_point == 8).all())
                and torch.equal(s.half().float(), s))
        if q4_0:
            return "q4_0", pack_q4_0(packed.codes(), s).numpy()
        raise ValueError(f"layer `{name}`: its grid (bits {packed.bits}, group {packed.group}, "
                         f"{'fp16' if torch.equal(s.half().float(), s) else 'fp32'} scales, zero points "
                         f"{sorted(set(packed.zero_point.unique().tolist()))[:4]}) is not a GGUF format; train it with "
                         f"jacquant.transform(..., format='q4_0' | 'q4_1' | 'q2_k') to ship it to llama.cpp")
    raise TypeError(f"layer `{name}`: {type(packed).__name__} is not a jacquant packed weight")


def _check_model(model: nn.Module) -> tuple[nn.Module, str]:
    cfg = getattr(model, "config", None)
    mt = getattr(cfg, "model_type", None)
    if mt not in ARCHS:
        raise ValueError(f"export_gguf writes Hugging Face {', '.join(ARCHS)} causal LMs (llama.cpp's 'llama'), got "
                         f"{type(model).__name__} (model_type {mt!r})")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise ValueError(f"export_gguf: hidden_act={cfg.hidden_act!r}; llama.cpp's llama uses silu")
    return converted_copy(model), ARCHS[mt]


def _source_tensors(source) -> dict:
    return {t.name: t for t in source.tensors} if source is not None else {}


def _same_values(t, values: np.ndarray) -> bool:
    """Whether the source tensor ``t`` dequantizes exactly to ``values`` (same shape, same bits)."""
    from gguf.quants import dequantize

    if tuple(int(d) for d in reversed(t.shape)) != values.shape:
        return False
    try:
        ref = dequantize(t.data, t.tensor_type).reshape(values.shape).astype(np.float32)
    except NotImplementedError:
        return False
    return np.array_equal(ref, values.astype(np.float32))


def _plain_tensor(gg: str, values: np.ndarray, head: Optional[str], src: dict, is_head: bool):
    """(array, raw ggml type or None) for a tensor that is not a quantized site."""
    gguf = _gguf()
    t = src.get(gg)
    if head is None and t is not None and _same_values(t, values):
        return np.asarray(t.data), t.tensor_type  # the source's own bytes (e.g. SmolLM2's Q8_0 embedding)
    if values.ndim == 1 or not is_head:
        return values.astype(np.float32), None
    choice = head or "f16"
    if choice == "f32":
        return values.astype(np.float32), None
    if choice == "f16":
        return values.astype(np.float16), None
    if values.shape[-1] % 32:
        raise ValueError(f"tensor `{gg}` has rows of {values.shape[-1]}, not a multiple of q8_0's block of 32; use "
                         "head='f16'")
    return gguf.quants.quantize(values.astype(np.float32), gguf.GGMLQuantizationType.Q8_0), \
        gguf.GGMLQuantizationType.Q8_0


def export_gguf(model: nn.Module, path: str, *, source_gguf: Optional[str] = None, head: Optional[str] = None,
                name: Optional[str] = None) -> dict:
    """Write ``model`` (transformed or converted, every quantized site on a GGUF format) as a llama.cpp GGUF file.

    ``source_gguf``: the GGUF file the model came from; its tokenizer and ``general.*`` keys are carried over,
    and its tensors reused where the model still holds their exact values. ``head``: ``"q8_0"``, ``"f16"`` or
    ``"f32"`` for the embedding and LM head instead of the source's bytes (default: the source's, else f16).
    Returns ``{"path", "bytes", "mib", "bits_per_weight", "types": {ggml type: tensor count}, "formats":
    {site: format}}``. Raises ValueError naming the layer, tensor or file for what cannot be written exactly.
    """
    gguf = _gguf()
    if head is not None and head not in HEADS:
        raise ValueError(f"export_gguf: head={head!r} is not one of {HEADS}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"export_gguf: the directory {folder} of {path} does not exist")
    if not os.access(folder, os.W_OK):
        raise PermissionError(f"export_gguf: cannot write to {folder}; choose a writable path for {os.path.basename(path)}")
    packed_model, arch = _check_model(model)
    cfg = packed_model.config
    if source_gguf is None:
        raise ValueError("export_gguf: pass source_gguf= (the GGUF file the model came from): its tokenizer goes into "
                         "the file; building one from a Hugging Face tokenizer is not supported")
    source = _reader(source_gguf)
    _check_source(source, source_gguf, cfg)
    n_layers = cfg.num_hidden_layers
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    heads, kv_heads = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    src = _source_tensors(source)
    tensors: list[tuple[str, np.ndarray, object]] = []
    formats: dict[str, str] = {}
    done: set[str] = set()
    for s in packed_sites(packed_model):
        if s.packed.transposed:
            raise ValueError(f"layer `{s.name}`: a weight stored [K, N] is not a llama projection")
        hf = s.path.rpartition(".")[0]  # the owner of <weight>_packed
        hf_weight = f"{hf}.{s.packed.weight_attr}" if hf else s.packed.weight_attr
        gg = names.get_name(hf_weight, try_suffixes=(".weight", ".bias"))
        if gg is None:
            raise ValueError(f"layer `{s.name}`: no llama.cpp tensor name for `{hf_weight}`")
        fmt, blocks = site_blocks(s.packed, s.name)
        if gg.endswith("attn_q.weight"):
            blocks = llama_permute(blocks, heads)
        elif gg.endswith("attn_k.weight"):
            blocks = llama_permute(blocks, kv_heads)
        tensors.append((gg, np.ascontiguousarray(blocks), gguf.GGMLQuantizationType[FORMATS[fmt].ggml_type]))
        formats[s.name] = fmt
        done.add(hf_weight)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    for key, value in packed_model.state_dict().items():
        if key in done or not value.is_floating_point() or key.endswith("_packed.scale") or "rotary_emb" in key:
            continue
        if tied and key == "lm_head.weight":
            continue  # llama.cpp uses token_embd as the output when output.weight is absent
        gg = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if gg is None:
            raise ValueError(f"tensor `{key}` has no llama.cpp name in architecture {arch}; it cannot be written")
        values = value.detach().float().numpy()
        if gg.endswith("attn_q.weight"):
            values = llama_permute(values, heads)
        elif gg.endswith("attn_k.weight"):
            values = llama_permute(values, kv_heads)
        arr, raw = _plain_tensor(gg, values, head, src, gg.startswith(("token_embd", "output.")))
        tensors.append((gg, arr, raw))
    return _write(path, arch, cfg, source, tensors, formats)


def _reader(path: str):
    from gguf import GGUFReader

    if not os.path.isfile(path):
        raise FileNotFoundError(f"export_gguf: source GGUF {path!r} does not exist")
    try:
        return GGUFReader(path)
    except Exception as e:
        raise ValueError(f"export_gguf: {path} is not a readable GGUF file ({type(e).__name__}: {e})") from e


def _field(reader, key: str):
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def _check_source(source, path: str, cfg) -> None:
    """The source GGUF must describe this model: the same depth, width and vocabulary."""
    arch = _field(source, "general.architecture")
    want = {"block_count": cfg.num_hidden_layers, "embedding_length": cfg.hidden_size}
    for key, value in want.items():
        have = _field(source, f"{arch}.{key}")
        if have is not None and int(have) != int(value):
            raise ValueError(f"export_gguf: {path} has {arch}.{key} = {have} but the model has {value}; pass the GGUF "
                             "file this model was converted from")
    tokens = source.fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise ValueError(f"export_gguf: {path} has no tokenizer (tokenizer.ggml.tokens); llama.cpp needs one")
    if len(tokens.data) > cfg.vocab_size:
        raise ValueError(f"export_gguf: {path}'s tokenizer has {len(tokens.data)} tokens, the model's vocabulary "
                         f"{cfg.vocab_size}")


def _hyper(writer, cfg) -> None:
    """llama.cpp's architecture keys from a Hugging Face Llama config."""
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    writer.add_context_length(int(getattr(cfg, "max_position_embeddings", 2048)))
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(cfg, "num_key_value_heads", None) or heads)
    writer.add_rope_dimension_count(head_dim)
    theta = getattr(cfg, "rope_theta", None)
    if theta is None:
        theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_vocab_size(cfg.vocab_size)
    if head_dim * heads != cfg.hidden_size:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def _write(path: str, arch: str, cfg, source, tensors: list, formats: dict) -> dict:
    gguf = _gguf()
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".partial", dir=folder)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        _hyper(writer, cfg)
        src_arch = _field(source, "general.architecture")
        for key, field in source.fields.items():
            if key.startswith(OWN_KEYS) or key.startswith(f"{src_arch}."):
                continue
            sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
        counts = {f: sum(1 for v in formats.values() if v == f) for f in set(formats.values())}
        if counts:
            writer.add_file_type(FILE_TYPES[max(counts, key=counts.get)])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for gg, arr, raw in tensors:
            writer.add_tensor(gg, arr, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp made it private; the file gets the usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    size = os.path.getsize(path)
    n = sum(_numel(arr, raw) for _, arr, raw in tensors)
    types: dict[str, int] = {}
    for _, arr, raw in tensors:
        key = raw.name if raw is not None else {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16"}[arr.dtype]
        types[key] = types.get(key, 0) + 1
    return {"path": path, "bytes": size, "mib": size / 2 ** 20, "bits_per_weight": 8 * size / n, "types": types,
            "formats": formats}


def _numel(arr: np.ndarray, raw) -> int:
    if raw is None or arr.dtype != np.uint8:
        return int(arr.size)
    from gguf.constants import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[raw]
    return int(arr.size) // size * block
