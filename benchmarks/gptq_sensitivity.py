"""How much does the main job's W2 GPTQ start depend on float rounding? (Why its seed-0 start moved 297.5 -> 348.3.)

The main job's seed-0 start (SmolLM2-135M, W2 g64, GPTQ on its 64 x 256 calibration windows) is computed once as
is, then from copies of the fp model whose every weight is multiplied by (1 + 2^-23 ε), ε ~ N(0, 1) seeded per
case: a change of about one float32 unit in the last place, below what any fp metric resolves. Printed per case:
the start's held-out perplexity (the main job's 32 x 256 windows), the perturbed fp model's, and the fraction of
the start's integer codes that differ from the unperturbed start's. GPTQ rounds column by column and feeds each
column's rounding error into the columns after it, so one flipped rounding changes every later decision in its
row: if the start were stable, the fractions would be ~0.

If the starts differ, can a run pick the better one without validation text, and does it stay better once trained?
Each start is also scored on the tuning slice (32 x 256 tokens, the text every choice of the main job is made on),
and ``--train ste,jacquant`` trains those methods from every start exactly as the main job does (its batches,
steps and learning rate for the seed; the unperturbed case reproduces the main job's row bit for bit on the machine
that ran it), scoring the trained model on both.

    python benchmarks/gptq_sensitivity.py [--cases 1 2] [--train ste,jacquant]
        [--results benchmarks/results/gptq_sensitivity.jsonl]
"""
from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from jacquant.app import data, lm_track, models
from jacquant.app.pipeline import calibrated_start, calibration_set
from jacquant.app.recipes import recipes
from jacquant.config import QuantConfig
from jacquant.qat.stats import codes_moved, model_codes


def perturbed(model: torch.nn.Module, seed: int, rel: float = 2.0 ** -23) -> torch.nn.Module:
    """A copy of ``model`` with every parameter p ← p · (1 + rel · ε), ε ~ N(0, 1) from a generator seeded ``seed``."""
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.mul_(1 + rel * torch.randn(p.shape, generator=g))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, nargs="+", default=[1, 2], help="perturbation seeds")
    ap.add_argument("--seed", type=int, default=0, help="the main job's seed (its calibration windows)")
    ap.add_argument("--train", default="", help="comma-separated methods to train from every start (e.g. ste,jacquant)")
    ap.add_argument("--results", default="benchmarks/results/gptq_sensitivity.jsonl")
    a = ap.parse_args()
    fp, tok, _ = models.load_fp(log=lambda *x: None)
    toks = lm_track.tokens(data.load_corpus("auto"), tok)
    budget, pipe = lm_track.DEFAULT, lm_track.DEFAULT.pipeline
    windows = lm_track.eval_windows(toks.valid, budget.eval_windows, budget.eval_seq)
    tune = lm_track.eval_windows(toks.tune, budget.eval_windows, budget.eval_seq)
    calib = calibration_set(pipe, toks.train, a.seed, force=True)
    trained = recipes([m for m in a.train.split(",") if m])
    objective = lm_track.loss_fn(budget.loss, fp)
    config = QuantConfig(bits=2, group=64)
    codes0, starts = None, []
    print("| fp weights | model | ppl, tuning slice | ppl, held out | fp ppl | codes differing from the unperturbed "
          "start | s |")
    print("|---|---|---|---|---|---|---|")

    def report(label: str, name: str, model: torch.nn.Module, ppl_fp: float, moved, seconds: float) -> None:
        row = {"case": label, "seed": a.seed, "model": name, "ppl_tune": lm_track.perplexity(model, tune),
               "ppl_start" if name == "gptq start" else "ppl": lm_track.perplexity(model, windows),
               "ppl_fp": ppl_fp, "codes_moved": moved, "seconds": seconds}
        held = row.get("ppl_start", row.get("ppl"))
        print(f"| {label} | {name} | {row['ppl_tune']:.2f} | {held:.2f} | {ppl_fp:.5f} | "
              + (f"{moved:.1%}" if moved is not None else "") + f" | {seconds:.0f} |", flush=True)
        with open(a.results, "a") as f:
            f.write(json.dumps(row) + "\n")

    for case in [None] + a.cases:  # every start first: which one the tuning slice would pick is known early
        model_fp = fp if case is None else perturbed(fp, case)
        t = time.perf_counter()
        torch.manual_seed(a.seed)
        start = calibrated_start(model_fp, config, pipe, calib, progress=False,
                                 frozen_embedding=budget.freeze_embedding)
        seconds = time.perf_counter() - t
        codes = model_codes(start)
        codes0 = codes0 or codes
        label = "as loaded" if case is None else f"× (1 + 2^-23 ε), seed {case}"
        ppl_fp = lm_track.perplexity(model_fp, windows)
        report(label, "gptq start", start, ppl_fp, codes_moved(codes0, codes), seconds)
        starts.append((label, start, ppl_fp))
    for label, start, ppl_fp in starts[1:] + starts[:1]:  # the unperturbed case (the main job's row) last
        for recipe in trained:  # the teacher is the fp model as loaded, as in the main job
            t = time.perf_counter()
            model, _ = lm_track.train_from(start, fp, recipe, budget, objective, toks.train, calib, a.seed, "cpu")
            report(label, recipe.name, model, ppl_fp, None, time.perf_counter() - t)


if __name__ == "__main__":
    main()
