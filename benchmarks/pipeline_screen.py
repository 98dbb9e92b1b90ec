"""Screen the pipeline's phases on the tuning slice: start → block-wise → end to end, one configuration
per call, one JSON row appended to ``--results``. The held-out windows are never read: choices made from these
rows (docs/pipeline.md, "Choosing the pipeline on the tuning slice") cannot have been tuned on them.

    flock /tmp/jacquant-cpu.lock python benchmarks/pipeline_screen.py --method ste --esteps 60 --elr 1e-3
    flock /tmp/jacquant-cpu.lock python benchmarks/pipeline_screen.py --bsteps 20 --blr 1e-3 --binputs fp
    python benchmarks/pipeline_screen.py --table i21-block

Scored: perplexity on 32 windows of 256 tokens of the tuning slice after each phase, wall seconds per phase, the
fraction of integer codes moved from the start's, each block's loss over its first and last 5 steps, and for a fitted
shape its schedule (amplitude, contrast per refit).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace

import torch

from jacquant.app import data, lm_track, models
from jacquant.app.blockwise import BlockwiseConfig
from jacquant.app.pipeline import (
    Pipeline,
    Seeds,
    calibrated_start,
    calibration_set,
    freeze_embedding,
    run_phases,
)
from jacquant.app.recipes import recipe as named_recipe
from jacquant.config import QuantConfig
from jacquant.qat.stats import codes_moved, model_codes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="ste", help="a product method or a research rule (jacquant.app.recipes)")
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--start", default="gptq", choices=("rtn", "gptq"))
    ap.add_argument("--calib", type=int, default=64, help="calibration windows")
    ap.add_argument("--calib-seq", type=int, default=256)
    ap.add_argument("--bsteps", type=int, default=0, help="block-wise steps per block (0: no block-wise phase)")
    ap.add_argument("--blr", type=float, default=1e-4)
    ap.add_argument("--bbatch", type=int, default=8)
    ap.add_argument("--bscale-lr", type=float, default=5e-3)
    ap.add_argument("--bseconds", type=float, default=None, help="wall seconds of the whole block-wise phase")
    ap.add_argument("--binputs", default="quantized", choices=("quantized", "fp"))
    ap.add_argument("--bloss", default="mse", choices=("mse", "channel"))
    ap.add_argument("--esteps", type=int, default=0, help="end-to-end steps (0: none)")
    ap.add_argument("--elr", type=float, default=1e-3)
    ap.add_argument("--escale-lr", type=float, default=None, help="end to end: the scales' lr (default --elr)")
    ap.add_argument("--eseconds", type=float, default=None, help="wall seconds of the end-to-end phase")
    ap.add_argument("--escales", action="store_true", help="end to end: the quantizers' scales only")
    ap.add_argument("--edata", default="stream", choices=("stream", "calib"))
    ap.add_argument("--loss", default="kd", choices=("kd", "ce"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default="")
    ap.add_argument("--heldout", action="store_true", help="also score the held-out windows at the end (for the "
                    "report; never for a choice)")
    ap.add_argument("--start-cache", default="", help="folder: the start's weights are saved there on first use and "
                    "loaded after (keyed by start, bits, calibration windows and seed; saves GPTQ's 90 s per row)")
    ap.add_argument("--results", default="benchmarks/results/pipeline_screen.jsonl")
    ap.add_argument("--table", metavar="TAG", help="print the table of the rows tagged TAG (method × seed, paired "
                    "differences against ste and stableqat) and exit")
    a = ap.parse_args()
    if a.table:
        print(table(a.results, a.table))
        return

    fp, tok, _ = models.load_fp(log=lambda *x: None)
    toks = lm_track.tokens(data.load_corpus("auto"), tok)
    windows = lm_track.eval_windows(toks.tune, 32, 256)
    recipe = named_recipe(a.method)
    budget = lm_track.DEFAULT
    pipe = Pipeline(start=a.start, calib_windows=a.calib, calib_seq=a.calib_seq, e2e_data=a.edata,
                    e2e_params="scales" if a.escales else "all",
                    block=BlockwiseConfig(steps=a.bsteps, lr=a.blr, batch=a.bbatch, inputs=a.binputs, loss=a.bloss,
                                          scale_lr=a.bscale_lr, seconds=a.bseconds))
    res: dict = dict(vars(a))
    torch.manual_seed(a.seed)
    calib = calibration_set(pipe, toks.train, a.seed, force=True)
    t0 = time.perf_counter()
    config = QuantConfig(bits=a.bits, group=64, method=recipe.rule)
    cached = os.path.join(a.start_cache, f"{a.start}-w{a.bits}-c{a.calib}x{a.calib_seq}-s{a.seed}.pt") if a.start_cache else ""
    if cached and os.path.exists(cached):
        model = calibrated_start(fp, config, replace(pipe, start="rtn"), calib, progress=False)
        model.load_state_dict(torch.load(cached, weights_only=True))
    else:
        model = calibrated_start(fp, config, pipe, calib, progress=False)
        if cached:
            os.makedirs(a.start_cache, exist_ok=True)
            torch.save(model.state_dict(), cached)
    freeze_embedding(model)
    res["t_start"], res["ppl_start"] = time.perf_counter() - t0, lm_track.perplexity(model, windows)
    codes0 = model_codes(model)

    def moved() -> float:
        """The fraction of integer codes that differ from the start's (how far training travelled)."""
        return codes_moved(codes0, model_codes(model))

    t0 = time.perf_counter()
    torch.manual_seed(a.seed)

    def after_block() -> None:
        res["t_block"], res["ppl_block"] = time.perf_counter() - t0, lm_track.perplexity(model, windows)
        res["moved_block"] = moved()

    budget = replace(budget, steps=a.esteps, lr=a.elr, scale_lr=a.escale_lr, seconds=a.eseconds, pipeline=pipe)
    phases = run_phases(model, fp, recipe, budget, lm_track.loss_fn(a.loss, fp), toks.train, calib,
                        Seeds.main_job(a.seed), after_block=after_block, progress=False, desc=f"{a.method} end to end")
    # per block: its loss over the first and the last 5 of its steps (how much each block's training achieved)
    res["block_loss"] = [[sum(c[:5]) / len(c[:5]), sum(c[-5:]) / len(c[-5:])] for c in phases.block_curves if c]
    res["blocks"] = phases.record.get("block", {}).get("blocks")
    if a.esteps or a.eseconds:
        res["e2e_steps"] = len(phases.curve)
        res["t_e2e"] = time.perf_counter() - t0 - res.get("t_block", 0.0)
        res["ppl_e2e"] = lm_track.perplexity(model, windows)
        res["moved_e2e"] = moved()
        res["schedule"] = _schedule(getattr(model, "jacquant_hook_history", []))
    if a.heldout:
        res["ppl_heldout"] = lm_track.perplexity(model, lm_track.eval_windows(toks.valid, 32, 256))
    print(json.dumps(res))
    with open(a.results, "a") as f:
        f.write(json.dumps(res) + "\n")


def table(path: str, tag: str) -> str:
    """Markdown: per method, the tuning-slice perplexity after the last phase for each seed, mean ± std, the paired
    differences against ste and stableqat (seeds both have), the codes moved and the wall seconds (seed 0)."""
    rows: dict[str, dict[int, dict]] = {}
    for line in open(path):
        r = json.loads(line)
        if r.get("tag") == tag:
            rows.setdefault(r["method"], {})[r["seed"]] = r  # a rerun replaces the earlier row

    def ppl(r: dict) -> float:
        return r.get("ppl_e2e", r.get("ppl_block"))

    seeds = sorted({sd for by in rows.values() for sd in by})
    out = ["| method | " + " | ".join(f"seed {sd}" for sd in seeds) + " | mean ± std | Δ vs ste | Δ vs stableqat "
           "| codes moved | s (seed 0) |", "|---" * (len(seeds) + 6) + "|"]

    def stats(values: list[float]) -> str:
        if not values:
            return ""
        t = torch.tensor(values, dtype=torch.float64)
        return f"{float(t.mean()):+.2f}" if len(values) == 1 else f"{float(t.mean()):+.2f} ± {float(t.std()):.2f}"

    for m, by in rows.items():
        vals = [ppl(by[sd]) for sd in seeds if sd in by]
        mean = stats(vals).lstrip("+") if len(vals) > 1 else f"{vals[0]:.2f}"
        deltas = [stats([ppl(by[sd]) - ppl(rows[ref][sd]) for sd in seeds if sd in by and sd in rows.get(ref, {})])
                  if m != ref else "" for ref in ("ste", "stableqat")]
        r0 = by.get(0, next(iter(by.values())))
        mv = r0.get("moved_e2e", r0.get("moved_block"))
        secs = r0.get("t_e2e", 0.0) + r0.get("t_block", 0.0)
        out.append(f"| {m} | " + " | ".join(f"{ppl(by[sd]):.2f}" if sd in by else "" for sd in seeds)
                   + f" | {mean} | {deltas[0]} | {deltas[1]} | {'' if mv is None else f'{mv:.4f}'} | {secs:.0f} |")
    return "\n".join(out)


def _schedule(history: list[dict]) -> list[dict]:
    """Per refit of a research rule's learned shape: the step and the mean contrast B(0)/B(½) over the sites."""
    return [{"t": h["t"], "contrast": sum(h["contrast"].values()) / len(h["contrast"])} for h in history]


if __name__ == "__main__":
    main()
