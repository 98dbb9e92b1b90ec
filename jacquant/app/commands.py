"""``jacquant train | eval | export`` on the user's own Hugging Face causal LM and text files.

The model is a local directory (``save_pretrained`` layout) or a name already in the local Hugging
Face cache; nothing is downloaded (``local_files_only=True``). Text files are tokenized with the
model's tokenizer, or byte by byte (UTF-8, ids 0-255) when the directory has none. Split: the last
10% of the token stream validates, the rest trains.

``train`` writes to its output directory: ``model.safetensors`` (the converted integer model,
:func:`jacquant.save_converted`), ``jacquant.json`` (settings and perplexities), ``stats.jsonl`` and
``stats.png`` (diagnostics over the run). ``eval`` and ``export`` read that directory back.

With ``--format q4_0 | q4_1 | q2_k`` (GGUF's formats, :mod:`jacquant.primitives.formats`) the integer model is that format's,
and ``jacquant export MODEL --out DIR --gguf FILE`` writes it for llama.cpp (:func:`jacquant.export.export_gguf`),
the tokenizer and metadata carried over from MODEL's GGUF file.

``jacquant export MODEL --out DIR --hf HF_DIR`` writes a Hugging Face directory in compressed-tensors' pack-quantized
format (:func:`jacquant.export.export_hf`); ``jacquant train HF_DIR`` on such a directory (or any compressed-tensors
pack-quantized checkpoint) starts QAT from its codes and scales, with no GPTQ start.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from jacquant.app import lm_track
from jacquant.app.blockwise import BlockwiseConfig
from jacquant.app.models import (
    checkpoint_config,
    find_gguf,
    load_model,
    quantized_checkpoint,
)
from jacquant.app.pipeline import (
    BLOCK_SHARE,
    Budget,
    Pipeline,
    Seeds,
    calibrated_start,
    calibration_set,
    e2e_lr,
    gptq_start,
    run_phases,
    timed_budget,
)
from jacquant.app.recipes import DEFAULT_METHOD, RESEARCH, TRAINED
from jacquant.app.recipes import recipe as named_recipe
from jacquant.config import QuantConfig
from jacquant.export.convert import convert, load_converted, save_converted
from jacquant.export.hf import apply_hf_quantized
from jacquant.qat.plot import plot

VALID_FRACTION = 0.1
TRAINED_FILES = ("model.safetensors", "jacquant.json")
"""What ``jacquant train`` writes to --out when it finishes, and ``eval --out`` and ``export`` read back."""

DEFAULT_BUDGET = 20 * 60.0
"""``jacquant train`` without --steps, --tokens or --budget runs for this wall time (seconds)."""

DEFAULT_PIPELINE = Pipeline(block=BlockwiseConfig(steps=0, lr=0.02, scale_lr=0.02, batch=8))
"""``jacquant train``'s pipeline: GPTQ start, then (with a wall-time budget, the default) half the time left to the
block-wise rounding search (0.02 bins per step) and half to end-to-end KD, the configuration that beat AutoRound at
its own wall time at 2 bits (docs/pipeline.md). With --steps or --tokens the block-wise phase runs only when
--block-steps is given; ``--block-steps 0`` turns it off in either case."""

EVAL_RESERVE = 3.0
"""With --budget: the wall time kept back for the evaluations after training, in units of the fp model's
evaluation (the trained model's validation perplexity, its last tuning-slice score, conversion and saving)."""

CHECKPOINT_FILE = "checkpoint.pt"
"""What an unfinished ``jacquant train`` leaves in --out; the same command resumes from it."""


@dataclass
class TrainArgs:
    """Settings of ``jacquant train`` (see ``jacquant train --help``)."""

    model: str
    text: list[str]
    out: str
    bits: int = 2
    group: int = 64
    method: str = DEFAULT_METHOD
    steps: Optional[int] = None
    tokens: Optional[int] = None
    budget: Optional[float] = None  # wall seconds for the whole run (start, block-wise, end to end)
    seq: int = 256  # the windows of calibration, evaluation and the end-to-end batches
    batch: int = 2  # 512 tokens a step, as the equal-time table's 4 × 128 (8 × 256 made 20 steps in 20 min: worse)
    lr: Optional[float] = None  # None: e2e_lr(bits)
    seed: int = 0
    device: str = "cpu"
    eval_windows: int = 64
    loss: str = "kd"
    freeze_embedding: bool = True
    checkpoint_every: int = 50
    pipeline: Pipeline = field(default_factory=lambda: DEFAULT_PIPELINE)  # the start and the block-wise phase
    format: Optional[str] = None
    fallback: Optional[str] = None
    init: str = "mse"
    block_off: bool = False  # --block-steps 0: no block-wise phase, also under a wall-time budget
    teacher: Optional[str] = None  # the full-precision reference when MODEL is a quantized checkpoint

    def config(self) -> QuantConfig:
        """The QuantConfig of the run (a GGUF ``format`` sets bits and group)."""
        return QuantConfig(bits=self.bits, group=self.group, format=self.format, fallback=self.fallback,
                           init=self.init)


def check_text_file(path: str) -> None:
    """Raise unless ``path`` is a file that holds text (not only whitespace)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"text file {path} does not exist: pass existing text files to --text")
    if os.path.isdir(path):
        raise IsADirectoryError(f"text file {path} is a directory: pass the files in it, e.g. --text {path}/*.txt")
    if not has_text(path):
        raise ValueError(f"text file {path} is empty: pass files that hold text to --text")


def has_text(path: str, chunk: int = 1 << 16) -> bool:
    """Whether the file holds anything but whitespace (reads only up to the first chunk that does)."""
    with open(path, "rb") as f:
        while block := f.read(chunk):
            if block.strip():
                return True
    return False


def tokenize(paths: list[str], tokenizer, vocab_size: int) -> Tensor:
    """Token ids of the files' text joined by blank lines: the tokenizer's, or UTF-8 bytes without one."""
    for p in paths:
        check_text_file(p)
    text = "\n\n".join(open(p, encoding="utf-8", errors="replace").read() for p in paths)
    if tokenizer is None:
        if vocab_size < 256:
            raise ValueError(f"the model has no tokenizer and a vocabulary of {vocab_size} < 256, so bytes cannot be "
                             "its tokens; save a tokenizer beside the model")
        return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


TUNE_WINDOWS = 16


def tune_split(train_ids: Tensor, seq: int) -> tuple[Tensor, Tensor]:
    """(train, tune): the last 5% of the training tokens are the tuning slice that scores each phase (never
    trained on, never the validation text); when it would hold less than one window of ``seq + 1``, it is empty."""
    cut = int(len(train_ids) * (1 - lm_track.TUNE_FRACTION))
    if len(train_ids) - cut < seq + 1:
        return train_ids, train_ids[:0]
    return train_ids[:cut], train_ids[cut:]


def split_tokens(ids: Tensor, seq: int) -> tuple[Tensor, Tensor]:
    """(train, valid): the last 10% of the stream validates; both must hold a window of ``seq + 1``."""
    cut = int(len(ids) * (1 - VALID_FRACTION))
    train_ids, valid_ids = ids[:cut], ids[cut:]
    if len(valid_ids) < seq + 1 or len(train_ids) < seq + 1:
        raise ValueError(f"{len(ids)} tokens are too few for windows of {seq + 1} tokens with a 10% validation split; "
                         "pass more text or a smaller --seq")
    return train_ids, valid_ids


def perplexity(model: nn.Module, ids: Tensor, seq: int, windows: int) -> float:
    """:func:`jacquant.app.lm_track.perplexity` over ``windows`` windows evenly spaced through ``ids``."""
    device = next(model.parameters()).device
    return lm_track.perplexity(model, lm_track.eval_windows(ids, windows, seq).to(device))


def train_model(a: TrainArgs, log=print) -> dict:
    """QAT of the user's model on the user's text; writes the output directory; returns the summary."""
    if a.method not in TRAINED and a.method not in RESEARCH:
        raise ValueError(f"--method {a.method!r}: choose a trained method from {list(TRAINED)} "
                         f"(research rules: {list(RESEARCH)})")
    if sum(x is not None for x in (a.steps, a.tokens, a.budget)) > 1:
        raise ValueError("give one of --steps, --tokens and --budget")
    if a.budget is not None and not a.budget > 0:
        raise ValueError(f"--budget {a.budget:g} s must be positive, e.g. --budget 20m")
    t_run = time.perf_counter()
    if a.steps is None and a.tokens is None and a.budget is None:
        a = replace(a, budget=DEFAULT_BUDGET)
    steps = a.steps if a.steps is not None else max(1, a.tokens // (a.batch * a.seq)) if a.tokens else 0
    if steps < 1 and a.budget is None:
        raise ValueError(f"--steps {steps} must be at least 1")
    torch.manual_seed(a.seed)
    fp, tok = load_model(a.model, a.device)
    if a.teacher is not None:  # the reference (KD teacher, block-wise targets, the fp row) is another model
        fp_start, fp = fp, load_model(a.teacher, a.device)[0]
    else:
        fp_start = fp
    ids = tokenize(a.text, tok, fp.config.vocab_size)
    train_ids, valid_ids = split_tokens(ids, a.seq)
    train_ids, tune_ids = tune_split(train_ids, a.seq)
    log(f"{a.model}: {sum(p.numel() for p in fp.parameters()) / 1e6:.1f} M parameters; {len(train_ids):,} training "
        f"and {len(valid_ids):,} validation tokens ({'bytes' if tok is None else type(tok).__name__})")
    t = time.perf_counter()
    fp_ppl = perplexity(fp, valid_ids, a.seq, a.eval_windows)
    fp_eval_s = time.perf_counter() - t
    recipe = named_recipe(a.method)
    config = a.config()
    pipe = a.pipeline
    peer = quantized_checkpoint(a.model)  # a compressed-tensors checkpoint: its codes and scales are the start
    if peer is not None:
        config, pipe = checkpoint_config(peer, config, a.model), replace(pipe, start="rtn")  # no GPTQ refit
        log(f"{a.model}: a W{config.bits} g{config.group} quantized checkpoint; QAT starts from its codes and scales"
            + ("" if a.teacher else "; without --teacher it is also its own KD teacher (pass the fp model, or --loss ce)"))
    os.makedirs(a.out, exist_ok=True)
    ckpt, start_ckpt, block_dir = (os.path.join(a.out, n) for n in (CHECKPOINT_FILE, "start.pt", "blockwise"))
    lr = a.lr if a.lr is not None else e2e_lr(config.bits)
    budget = Budget(steps=steps, lr=lr, batch=a.batch, seq=a.seq, loss=a.loss, freeze_embedding=a.freeze_embedding,
                    pipeline=pipe)
    # the RTN start first (scored), then GPTQ in place below: resumable through start.pt
    model = calibrated_start(fp_start, replace(config, method=recipe.rule), replace(pipe, start="rtn"), None,
                             frozen_embedding=a.freeze_embedding)
    if peer is not None:
        apply_hf_quantized(model, peer)
    rtn_ppl = perplexity(model, valid_ids, a.seq, a.eval_windows)
    t0 = time.perf_counter()
    calib = calibration_set(pipe, train_ids, a.seed, a.device)
    resuming = os.path.exists(ckpt)  # the end-to-end checkpoint holds the whole model: the phases before are done
    if resuming:
        log(f"resuming end-to-end QAT from {ckpt}")
    elif os.path.exists(os.path.join(block_dir, "blockwise.pt")):
        log(f"resuming the block-wise phase from {block_dir}")
    elif pipe.start == "gptq":
        if os.path.exists(start_ckpt):
            model.load_state_dict(torch.load(start_ckpt, map_location=a.device, weights_only=True))
        else:
            gptq_start(model, calib)
            torch.save(model.state_dict(), start_ckpt)
    start_s = time.perf_counter() - t0
    start_ppl = perplexity(model, valid_ids, a.seq, a.eval_windows) if pipe.start == "gptq" and not resuming else None
    if a.budget is not None:  # what is left of the wall time after the start, split between the phases
        share = 0.0 if a.block_off else BLOCK_SHARE
        budget = timed_budget(budget, a.budget - (time.perf_counter() - t_run) - EVAL_RESERVE * fp_eval_s, share)
        log(f"--budget {a.budget:.0f} s: block-wise {budget.pipeline.block.seconds:.0f} s, end to end "
            f"{budget.seconds:.0f} s")
    if budget.pipeline.block.active and not resuming:
        os.makedirs(block_dir, exist_ok=True)
    score = (lambda m: perplexity(m, tune_ids, a.seq, TUNE_WINDOWS)) if len(tune_ids) else None
    objective = lm_track.loss_fn(a.loss, fp)
    teacher = fp if budget.pipeline.block.active and not resuming else None  # the block-wise phase's targets
    del fp_start
    if a.loss == "ce":
        del fp  # CE needs no fp model end to end (the block-wise phase holds it through ``teacher`` while it runs)
    stats_path = os.path.join(a.out, "stats.jsonl")
    phases = run_phases(model, teacher, recipe, budget, objective, train_ids, calib, Seeds.train_command(a.seed),
                        device=a.device, block_dir=block_dir, skip_block=resuming, log_path=stats_path,
                        log_every=max(1, steps // 50) if steps else 10, desc=f"QAT {a.method} W{a.bits}",
                        checkpoint=ckpt if a.checkpoint_every > 0 else None,
                        checkpoint_every=a.checkpoint_every, score=score)
    curve = phases.curve
    for name, r in phases.record.items():
        if r["before"] is not None:
            log(f"{name}: tuning-slice perplexity {r['before']:.3f} → {r['after']:.3f} in {r['seconds']:.0f} s: "
                + ("kept" if r["kept"] else "worse, so the model before it is kept"))
    seconds = time.perf_counter() - t0
    qat_ppl = perplexity(model, valid_ids, a.seq, a.eval_windows)
    plot(stats_path, os.path.join(a.out, "stats.png"))
    convert(model)  # also drops the refresh clock and RNG: training state, not part of the integer model
    save_converted(model.cpu(), os.path.join(a.out, "model.safetensors"))
    summary = {"model": a.model, "bits": config.bits, "group": config.group, "format": a.format,
               "fallback": a.fallback, "init": a.init, "method": a.method, "steps": len(curve),
               "tokens": len(curve) * a.batch * a.seq, "seq": a.seq, "lr": lr, "seed": a.seed, "seconds": seconds,
               "loss": a.loss, "freeze_embedding": a.freeze_embedding,
               "tokenizer": "bytes" if tok is None else "model",
               "ppl": {"fp32": fp_ppl, "rtn": rtn_ppl, "start": start_ppl, "qat": qat_ppl},
               "pipeline": {"start": pipe.start, "calib_tokens": pipe.calib_tokens, "block_steps": pipe.block.steps,
                            "block_lr": pipe.block.lr, "block_scale_lr": pipe.block.scale_lr,
                            "block_batch": pipe.block.batch,
                            "block_inputs": pipe.block.inputs, "block_seconds": budget.pipeline.block.seconds,
                            "e2e_params": pipe.e2e_params, "e2e_seconds": budget.seconds},
               "budget_seconds": a.budget, "total_seconds": time.perf_counter() - t_run,
               "phases": {"start": {"seconds": start_s}, **phases.record},
               "final_loss": curve[-1] if curve else None}
    with open(os.path.join(a.out, "jacquant.json"), "w") as f:
        json.dump(summary, f, indent=1)
    for done in (ckpt, start_ckpt):  # finished: the integer model above is the result
        if os.path.exists(done):
            os.remove(done)
    shutil.rmtree(block_dir, ignore_errors=True)
    return summary


def check_trained_dir(model: str, out: str) -> None:
    """Raise unless ``out`` holds what a finished ``jacquant train`` wrote there (:data:`TRAINED_FILES`)."""
    train = f"`jacquant train {model} --text FILE --out {out}`"
    if not os.path.exists(out):
        raise FileNotFoundError(f"--out {out} does not exist: pass the directory that {train} wrote")
    if not os.path.isdir(out):
        raise NotADirectoryError(f"--out {out} is a file: pass the directory that {train} wrote")
    missing = [name for name in TRAINED_FILES if not os.path.isfile(os.path.join(out, name))]
    if missing and os.path.exists(os.path.join(out, CHECKPOINT_FILE)):
        raise FileNotFoundError(f"--out {out} holds an unfinished training ({CHECKPOINT_FILE}, no {missing[0]}): "
                                f"run the same `jacquant train {model} ... --out {out}` command again to resume it")
    if missing:
        raise FileNotFoundError(f"--out {out} holds no trained model (no {missing[0]}): run {train} first")


def load_trained(model: str, out: str, device: str = "cpu") -> tuple[nn.Module, Optional[object], dict]:
    """The converted integer model that ``train`` wrote to ``out``, its tokenizer and its summary."""
    check_trained_dir(model, out)
    path = os.path.join(out, "model.safetensors")
    with open(os.path.join(out, "jacquant.json")) as f:
        summary = json.load(f)
    skeleton, tok = load_model(model, "cpu")
    return load_converted(skeleton, path).to(device), tok, summary


def eval_model(model: str, text: list[str], out: Optional[str] = None, seq: int = 256, windows: int = 64,
               device: str = "cpu") -> dict:
    """Validation perplexity of the full-precision model, or of the trained model in ``out``."""
    if out:
        m, tok, summary = load_trained(model, out, device)
    else:
        (m, tok), summary = load_model(model, device), {}
    ids = tokenize(text, tok, m.config.vocab_size)
    _, valid_ids = split_tokens(ids, seq)
    return {"model": model, "checkpoint": out, "bits": summary.get("bits"), "ppl": perplexity(m, valid_ids, seq, windows)}


def export_model(model: str, out: str, onnx_path: str, target: str = "ort", accuracy_level: int = 4,
                 kv_cache: bool = False, head_bits: Optional[int] = None) -> dict:
    """Export the trained model in ``out`` to ONNX (MatMulNBits for ``ort``, DequantizeLinear for ``onnx``);
    ``kv_cache``: a decoder for ``jacquant generate`` with the tokenizer beside it."""
    from jacquant.export import export_onnx

    m, tok, summary = load_trained(model, out)
    if kv_cache:
        export_onnx(m, None, onnx_path, target=target, accuracy_level=accuracy_level, kv_cache=True, tokenizer=tok,
                    head_bits=head_bits)
        return {"path": onnx_path, "mib": os.path.getsize(onnx_path) / 2**20, "target": target,
                "bits": summary["bits"], "kv_cache": True}
    example = torch.randint(0, m.config.vocab_size, (2, 16))
    export_onnx(m, (example,), onnx_path, target=target, accuracy_level=accuracy_level, widen_bits=summary["bits"] == 3)
    return {"path": onnx_path, "mib": os.path.getsize(onnx_path) / 2**20, "target": target, "bits": summary["bits"]}


def export_hf_model(model: str, out: str, hf_dir: str, scales: str = "fp32") -> dict:
    """Write the trained model in ``out`` as a Hugging Face directory in compressed-tensors' pack-quantized format,
    with ``model``'s tokenizer and a model card from jacquant.json (:func:`jacquant.export.export_hf`); ``scales``
    ``fp32`` or ``fp16``, the stored scales' dtype."""
    from jacquant.export import export_hf

    m, tok, summary = load_trained(model, out)
    dtype = {"fp32": torch.float32, "fp16": torch.float16}[scales]
    return export_hf(m, hf_dir, tokenizer=tok, card=summary, scale_dtype=dtype)


def export_gguf_model(model: str, out: str, gguf_path: str, head: Optional[str] = None) -> dict:
    """Write the trained model in ``out`` (trained with ``--format``) as a GGUF file for llama.cpp, carrying the
    tokenizer and metadata over from ``model``'s GGUF file (:func:`jacquant.export.export_gguf`)."""
    from jacquant.export import export_gguf

    source = find_gguf(model)
    if source is None:
        raise ValueError(f"{model!r} is not a GGUF file (or a directory holding one): `export --gguf` carries the "
                         "tokenizer over from the GGUF file the model was trained from; pass that file as MODEL")
    m, _, summary = load_trained(model, out)
    if not summary.get("format"):
        raise ValueError(f"{out} was trained on a plain {summary.get('bits')}-bit grid, not a GGUF format; train with "
                         "`jacquant train ... --format q4_0` (or q4_1, q2_k [--fallback q4_0]) to ship to llama.cpp")
    return export_gguf(m, gguf_path, source_gguf=source, head=head)
