"""The accuracy benchmark behind ``jacquant run`` and ``benchmarks/accuracy.py``.

Two tracks, every method with the same data, steps and learning rate per track, several seeds:

- ``lm``: SmolLM2-135M-Instruct from its GGUF file (:mod:`jacquant.app.lm_track`), metric held-out token
  perplexity on the Python documentation and the fraction of the RTN-to-fp gap closed;
- ``encoder``: all-MiniLM-L6-v2 distilled into its 2-bit copy (:mod:`jacquant.app.encoder_track`),
  metrics cosine to the full-precision embedding and Spearman of pairwise similarities.

Then the best trained 2-bit LM is exported to ONNX (onnxruntime's ``MatMulNBits``) and its
perplexity under onnxruntime is measured beside PyTorch's on the same windows; greedy continuations of
fixed prompts by the fp, RTN and best 2-bit models (PyTorch and onnxruntime) go into the report. Everything lands in
``out_dir``: ``results.md``, ``results.json``, PNG plots, the ONNX file and the JSONL diagnostics.
"""
from __future__ import annotations

import contextlib
import os
import platform
import time
from dataclasses import asdict, replace
from typing import Optional

import torch

from jacquant.app import data, lm_track, report
from jacquant.app.models import load_fp
from jacquant.app.pipeline import e2e_lr
from jacquant.app.recipes import DEFAULT_METHODS, recipes
from jacquant.qat import plot

TRACKS = ("lm", "encoder")


def run_accuracy(
    out_dir: str,
    *,
    tracks: tuple[str, ...] = TRACKS,
    methods: tuple[str, ...] = DEFAULT_METHODS,
    seeds: tuple[int, ...] = (0, 1, 2),
    bits: int = 2,
    group: int = 64,
    quick: bool = False,
    lm_steps: Optional[int] = None,
    lm_lr: Optional[float] = None,
    lm_loss: Optional[str] = None,
    encoder_steps: Optional[int] = None,
    encoder_lr: Optional[float] = None,
    corpus: str = "auto",
    export: bool = True,
    device: str = "cpu",
    pipeline=None,
    log=print,
) -> dict:
    """Run the benchmark and write the report; returns ``{"summary", "verdicts", "paths", "onnx"}``."""
    unknown = set(tracks) - set(TRACKS)
    if unknown:
        raise ValueError(f"unknown track(s) {sorted(unknown)}; choose from {TRACKS}")
    t_start = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    recs = recipes(methods)
    text = data.load_corpus(corpus)
    log(f"corpus: {text.name}: {len(text.train_bytes):,} training and {len(text.valid_bytes):,} validation bytes")
    meta = {"bits": bits, "group": group, "methods": ", ".join(methods), "seeds": len(seeds), "corpus": text.name,
            "torch": torch.__version__, "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
            "quick": quick}
    rows: list[dict] = []
    models: dict[str, torch.nn.Module] = {}
    onnx_info: dict = {}
    generations: dict[str, list[str]] = {}
    parts: dict[str, float] = {}

    @contextlib.contextmanager
    def timed(part: str):
        t0 = time.perf_counter()
        yield
        parts[part] = round(time.perf_counter() - t0, 1)
        log(f"[{parts[part]:.0f} s] {part}")

    if "lm" in tracks:
        budget = lm_track.QUICK if quick else lm_track.DEFAULT
        budget = replace(budget, steps=lm_steps or budget.steps, lr=lm_lr or (budget.lr if quick else e2e_lr(bits)), loss=lm_loss or budget.loss,
                         pipeline=pipeline or budget.pipeline)
        with timed("lm: load SmolLM2-135M (GGUF conversion on first use)"):
            fp, tok, info = load_fp(log=log, device=device)
        with timed("lm: tokenize the corpus (cached after first use)"):
            toks = lm_track.tokens(text, tok)
        log(f"lm tokens: {len(toks.train):,} training, {len(toks.tune):,} tuning slice, {len(toks.valid):,} held out")
        meta["lm_budget"] = asdict(budget)
        meta["lm_model"] = {k: v for k, v in info.items() if k != "hf_dir"}
        with timed("lm: evaluate fp, RTN and QAT of every method and seed"):
            lm_rows, kept = lm_track.run(fp, toks, recs, list(seeds), bits, group, budget, out_dir, log=log, tokenizer=tok)
        rows += lm_rows
        if "jacquant" in kept:
            models["lm jacquant"] = kept["jacquant"]
        best = best_trained(lm_rows, kept)
        if export and best:
            with timed(f"lm: export {best} to ONNX, its onnxruntime perplexity"):
                torch_ppl = next(r["metrics"]["ppl"] for r in lm_rows if r["method"] == best and r["seed"] == seeds[0])
                onnx_info = export_best(best, kept[best], torch_ppl, tok, toks, budget, bits, out_dir, log)
        if best:
            with timed("lm: greedy generations"):
                generations = lm_generations(fp, kept, best, tok, budget, onnx_info)
        del fp
    if "encoder" in tracks:
        from jacquant.app import encoder_track

        if device != "cpu":
            log(f"note: the encoder track runs on the CPU (--device {device} applies to the LM track only)")

        settings = encoder_track.QUICK if quick else encoder_track.DEFAULT
        settings = replace(settings, steps=encoder_steps or settings.steps, lr=encoder_lr or settings.lr)
        meta["encoder_budget"] = asdict(settings)
        with timed("encoder: all-MiniLM-L6-v2, every method and seed"):
            rows += encoder_track.run(recs, list(seeds), bits, group, settings.steps, settings.lr, settings.batch,
                                      settings.max_len, out_dir, corpus=text, n_eval=settings.n_eval,
                                      hidden_weight=settings.hidden_weight)
    paths = {"loss_curves": plot.loss_curves(rows, os.path.join(out_dir, "loss_curves.png")),
             "flip_rate": plot.flip_rates(rows, os.path.join(out_dir, "flip_rate.png"))}
    if models:
        paths["b_histogram"] = plot.b_histograms(models, os.path.join(out_dir, "b_histogram.png"))
    meta["seconds"] = round(time.perf_counter() - t_start, 1)
    meta["parts"] = parts
    extra = _parts_md(parts, meta["seconds"]) + _generations_md(generations) + _onnx_md(onnx_info) + _files_md(paths)
    md, js = report.write(out_dir, rows, meta, extra_md=extra, generations=generations)
    paths.update(results_md=md, results_json=js)
    summary = report.summarise(rows)
    return {"summary": summary, "verdicts": report.verdicts(summary), "paths": paths, "onnx": onnx_info,
            "seconds": meta["seconds"]}


def best_trained(rows: list[dict], kept: dict) -> Optional[str]:
    """The trained method with the lowest mean held-out perplexity, or None when none was trained."""
    trained = report.summarise([r for r in rows if r["method"] in kept and r["curve"]]).get("lm", {})
    return min(trained, key=lambda m: trained[m]["ppl"]["mean"]) if trained else None


def export_best(best: str, model: torch.nn.Module, torch_ppl: float, tokenizer, toks: lm_track.Tokens,
                budget: lm_track.Budget,
                bits: int, out_dir: str, log=print) -> dict:
    """Export the best trained model (its first seed) and compare onnxruntime's perplexity with PyTorch's
    on the held-out windows."""
    from jacquant.export import export_onnx

    model = model.cpu()  # onnxruntime runs on the CPU here; compare on the same device
    windows = lm_track.eval_windows(toks.valid, budget.eval_windows, budget.eval_seq)
    path = os.path.join(out_dir, f"lm-{best}-w{bits}.onnx")
    target = "ort"  # MatMulNBits
    log(f"exporting the best 2-bit LM ({best}) to {path} (KV-cache decoder, tokenizer beside it)")
    export_onnx(model, path=path, kv_cache=True, tokenizer=tokenizer, target=target, accuracy_level=4)
    # parity at accuracy_level 0 (fp32 activations: PyTorch's arithmetic up to summation order, on any CPU); the
    # shipped level 4 quantizes activations to int8 with CPU-specific kernels, so it is reported, not a parity check
    parity_ppl = lm_track.onnx_perplexity(path, windows, accuracy_level=0)
    ort_ppl = lm_track.onnx_perplexity(path, windows)
    return {"method": best, "path": path, "target": target, "accuracy_level": 4, "torch_ppl": torch_ppl,
            "onnxruntime_ppl": ort_ppl, "onnxruntime_fp32_ppl": parity_ppl, "mib": os.path.getsize(path) / 2**20}


def _onnx_md(info: dict) -> str:
    if not info:
        return ""
    return ("## Exported integer model\n\n"
            f"The best trained LM ({info['method']}) exported to `{os.path.basename(info['path'])}` "
            f"({info['mib']:.2f} MiB, a KV-cache decoder with its tokenizer beside it, MatMulNBits accuracy_level "
            f"{info['accuracy_level']}; `jacquant generate {os.path.basename(info['path'])} --prompt ...` runs it):\n\n"
            "| runtime | held-out perplexity |\n|---|---|\n"
            f"| PyTorch (fake quant) | {info['torch_ppl']:.4f} |\n"
            f"| onnxruntime, accuracy_level 0 (fp32 activations: the parity check) | {info['onnxruntime_fp32_ppl']:.4f} |\n"
            f"| onnxruntime, accuracy_level 4 (int8 activations: the shipped file) | {info['onnxruntime_ppl']:.4f} |\n\n")


def _files_md(paths: dict) -> str:
    return "## Plots\n\n" + "\n".join(f"![{k}]({os.path.basename(v)})" for k, v in paths.items()) + "\n"


def lm_generations(fp: torch.nn.Module, kept: dict, best: str, tok, budget: lm_track.Budget,
                   onnx_info: dict) -> dict[str, list[str]]:
    """Greedy continuations of :data:`lm_track.PROMPTS`: {model label: [text per prompt]}."""
    n = budget.generate_tokens
    out = {"fp": lm_track.greedy(fp, tok, lm_track.PROMPTS, n)}
    if "rtn" in kept:
        out["rtn"] = lm_track.greedy(kept["rtn"], tok, lm_track.PROMPTS, n)
    out[f"{best} (PyTorch)"] = lm_track.greedy(kept[best], tok, lm_track.PROMPTS, n)
    if onnx_info:
        out[f"{best} (onnxruntime)"] = lm_track.onnx_greedy(onnx_info["path"], lm_track.PROMPTS, n)
    return out


def _generations_md(gens: dict[str, list[str]]) -> str:
    if not gens:
        return ""
    md = ["## Greedy continuations", ""]
    for i, prompt in enumerate(lm_track.PROMPTS):
        md += [f"**{prompt}** …", "", "| model | continuation |", "|---|---|"]
        md += [f"| {label} | {texts[i].strip().replace('|', '/').replace(chr(10), ' ⏎ ')} |" for label, texts in gens.items()]
        md.append("")
    return "\n".join(md) + "\n"


def _parts_md(parts: dict[str, float], total: float) -> str:
    return ("## Wall time\n\n| part | s |\n|---|---|\n" + "".join(f"| {k} | {v:.0f} |\n" for k, v in parts.items())
            + f"| **total** | **{total:.0f}** |\n\n")
