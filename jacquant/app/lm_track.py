"""The causal-LM track: a small LLaMA pretrained on real English, then 2-bit QAT by each method.

No pretrained causal LM that a package registry ships fits 2 CPU cores, so the track pretrains
``transformers.LlamaForCausalLM`` (:data:`LLAMA`: 4 layers, hidden 256, MLP 768, 3.5 M parameters,
tied embedding/head, byte-level vocabulary of 256) on the training split of :mod:`jacquant.app.data`'s
corpus, caches that full-precision checkpoint under ``~/.cache/jacquant`` (``save_pretrained``
with safetensors, keyed by config, corpus and budget) and reuses it.

Metric: held-out perplexity per byte, exp(mean next-byte cross entropy) over :data:`EVAL_WINDOWS`
windows of ``seq + 1`` bytes evenly spaced through the validation split (the same windows for every
model). The LM head stays in full precision (it is tied to the embedding); every linear layer of
the decoder is quantized.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import data
from ..config import QuantConfig
from .qat import Recipe, quantize_copy, train

LLAMA = dict(vocab_size=256, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=True, rms_norm_eps=1e-5)
EVAL_WINDOWS = 96


@dataclass
class Budget:
    """Steps and shapes of one run of the track (``DEFAULT`` and ``QUICK`` below)."""

    pretrain_steps: int = 1500
    pretrain_lr: float = 3e-3
    steps: int = 200
    lr: float = 1e-3
    batch: int = 8
    seq: int = 128
    eval_windows: int = EVAL_WINDOWS


DEFAULT = Budget()
QUICK = Budget(pretrain_steps=30, steps=8, batch=4, seq=64, eval_windows=8)


def cache_root() -> str:
    """``$JACQUANT_CACHE`` or ``~/.cache/jacquant``."""
    return os.environ.get("JACQUANT_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "jacquant"))


def next_token_ce(logits: Tensor, batch: Tensor) -> Tensor:
    """Mean cross entropy of logits [B, T, V] for tokens 0..T-1 of ``batch`` [B, T + 1] against tokens 1..T."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))


def lm_loss(model: nn.Module, batch: Tensor) -> Tensor:
    """Mean next-token cross entropy of a Hugging Face causal LM on a window batch [B, T + 1]."""
    return next_token_ce(model(input_ids=batch[:, :-1], use_cache=False).logits, batch)


def eval_windows(valid: Tensor, n: int, seq: int) -> Tensor:
    """``n`` windows of ``seq + 1`` tokens evenly spaced through the validation tokens, int64 [n, seq + 1]."""
    if len(valid) < seq + 1:
        raise ValueError(f"validation text of {len(valid)} tokens is shorter than one window of {seq + 1}")
    starts = torch.linspace(0, len(valid) - seq - 1, n).long()
    return torch.stack([valid[s:s + seq + 1] for s in starts.tolist()]).long()


@torch.no_grad()
def perplexity(model: nn.Module, windows: Tensor, batch: int = 16) -> float:
    """exp(mean next-byte cross entropy) of ``model`` over ``windows`` [n, T + 1]."""
    was = model.training
    model.eval()
    total = sum(float(lm_loss(model, windows[i:i + batch])) * len(windows[i:i + batch])
                for i in range(0, len(windows), batch))
    model.train(was)
    return math.exp(total / len(windows))


def new_model(seed: int = 0) -> nn.Module:
    """A randomly initialised :data:`LLAMA` ``LlamaForCausalLM``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**LLAMA))


def pretrained(corpus: data.Corpus, budget: Budget, seed: int = 0, cache: Optional[str] = None,
               log=print, device: str = "cpu") -> tuple[nn.Module, dict]:
    """The full-precision model, from the cache or pretrained now (and cached); returns (model, info).

    Pretraining: AdamW, lr ``budget.pretrain_lr`` with 5% warm-up and cosine decay, random windows
    of the training split. The cache key hashes the config, corpus name, budget and seed.
    """
    from transformers import LlamaForCausalLM

    key = json.dumps([LLAMA, corpus.name, budget.pretrain_steps, budget.pretrain_lr, budget.batch, budget.seq, seed])
    path = os.path.join(cache or cache_root(), "llama-bytes-" + hashlib.sha256(key.encode()).hexdigest()[:12])
    if os.path.exists(os.path.join(path, "jacquant_pretrain.json")):
        with open(os.path.join(path, "jacquant_pretrain.json")) as f:
            info = json.load(f)
        log(f"full-precision model: cached at {path}")
        model = LlamaForCausalLM.from_pretrained(path).float().to(device)
        return model, {**info, "cached": True, "path": path}
    model = new_model(seed).to(device)
    log(f"pretraining the full-precision LLaMA ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M "
        f"parameters) for {budget.pretrain_steps} steps; cached at {path} for later runs")
    t0 = time.perf_counter()
    batches = data.windows(corpus.train_bytes, budget.batch, budget.seq, budget.pretrain_steps, seed, device)
    curve = train(model, Recipe("fp32"), batches, lm_loss, budget.pretrain_steps, budget.pretrain_lr,
                  warmup=max(1, budget.pretrain_steps // 20), desc="pretrain fp32")
    info = {"steps": budget.pretrain_steps, "seconds": time.perf_counter() - t0, "final_loss": curve[-1],
            "corpus": corpus.name, "config": LLAMA}
    model.cpu().save_pretrained(path)
    model.to(device)
    with open(os.path.join(path, "jacquant_pretrain.json"), "w") as f:
        json.dump(info, f)
    return model, {**info, "cached": False, "path": path, "curve": curve}


def run(fp_model: nn.Module, corpus: data.Corpus, methods: list[Recipe], seeds: list[int], bits: int, group: int,
        budget: Budget, out_dir: Optional[str] = None) -> tuple[list[dict], dict[str, nn.Module]]:
    """QAT of ``fp_model`` by each method and seed; returns (rows, {method: model of seed ``seeds[0]``}).

    Every method sees the same batches for a given seed (windows drawn with that seed) and the
    same steps and learning rate. Rows: ``{"track": "lm", "method", "seed", "metrics": {"ppl",
    "val_loss"}, "seconds", "curve", "log"}``, with a first row for the full-precision model.
    """
    device = next(fp_model.parameters()).device
    windows = eval_windows(corpus.valid_bytes, budget.eval_windows, budget.seq).to(device)
    calib = next(data.windows(corpus.train_bytes, budget.batch, budget.seq, 1, 10_000, device))
    fp_ppl = perplexity(fp_model, windows)
    rows = [_row("fp32", 0, fp_ppl, 0.0, [], None)]
    kept: dict[str, nn.Module] = {}
    config = QuantConfig(bits=bits, group=group)
    for recipe in methods:
        for seed in (seeds if recipe.train else seeds[:1]):
            t0 = time.perf_counter()
            torch.manual_seed(seed)
            model = quantize_copy(fp_model, recipe, config)
            curve: list[float] = []
            log = None
            if recipe.train:
                log = os.path.join(out_dir, f"lm-{recipe.name}-s{seed}.jsonl") if out_dir else None
                batches = data.windows(corpus.train_bytes, budget.batch, budget.seq, budget.steps, seed + 1, device)
                curve = train(model, recipe, batches, lm_loss, budget.steps, budget.lr, seed=seed,
                              warmup=max(1, budget.steps // 20), calib_batch=calib, log_path=log,
                              desc=f"lm {recipe.name} seed {seed}")
            rows.append(_row(recipe.name, seed, perplexity(model, windows), time.perf_counter() - t0, curve, log))
            if seed == seeds[0]:
                kept[recipe.name] = model
    return rows, kept


def _row(method: str, seed: int, ppl: float, seconds: float, curve: list[float], log: Optional[str]) -> dict:
    return {"track": "lm", "method": method, "seed": seed, "metrics": {"ppl": ppl, "val_loss": math.log(ppl)},
            "seconds": seconds, "curve": curve, "log": log}


def onnx_perplexity(path: str, windows: Tensor, batch: int = 16) -> float:
    """exp(mean next-byte cross entropy) of an exported model run by onnxruntime over ``windows``."""
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, torch.get_num_threads())
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    total = 0.0
    for i in range(0, len(windows), batch):
        w = windows[i:i + batch]
        w = w.cpu()
        logits = torch.from_numpy(np.asarray(sess.run(None, {name: w[:, :-1].numpy()})[0]))
        total += float(next_token_ce(logits, w)) * len(w)
    return math.exp(total / len(windows))

