"""How much does the main job's W2 GPTQ start depend on float rounding? (Why its seed-0 start moved 297.5 -> 348.3.)

The main job's seed-0 start (SmolLM2-135M, W2 g64, GPTQ on its 64 x 256 calibration windows) is computed once as
is, then from copies of the fp model whose every weight is multiplied by (1 + 2^-23 ε), ε ~ N(0, 1) seeded per
case: a change of about one float32 unit in the last place, below what any fp metric resolves. Printed per case:
the start's held-out perplexity (the main job's 32 x 256 windows), the perturbed fp model's, and the fraction of
the start's integer codes that differ from the unperturbed start's. GPTQ rounds column by column and feeds each
column's rounding error into the columns after it, so one flipped rounding changes every later decision in its
row: if the start were stable, the fractions would be ~0.

    python benchmarks/gptq_sensitivity.py [--cases 1 2] [--results benchmarks/results/gptq_sensitivity.jsonl]
"""
from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from jacquant.app import data, lm_track
from jacquant.app.pipeline import calibrated_start, calibration_windows
from jacquant.config import QuantConfig
from jacquant.stats import codes_moved, model_codes


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
    ap.add_argument("--results", default="benchmarks/results/gptq_sensitivity.jsonl")
    a = ap.parse_args()
    fp, tok, _ = lm_track.load_fp(log=lambda *x: None)
    toks = lm_track.tokens(data.load_corpus("auto"), tok)
    budget, pipe = lm_track.DEFAULT, lm_track.DEFAULT.pipeline
    windows = lm_track.eval_windows(toks.valid, budget.eval_windows, budget.eval_seq)
    calib = calibration_windows(toks.train, pipe.calib_windows, pipe.calib_seq, a.seed + 1000)
    config = QuantConfig(bits=2, group=64)
    codes0 = None
    print("| fp weights | start ppl (held out) | fp ppl | codes differing from the unperturbed start | s |")
    print("|---|---|---|---|---|")
    for case in [None] + a.cases:
        model_fp = fp if case is None else perturbed(fp, case)
        t = time.perf_counter()
        torch.manual_seed(a.seed)
        start = calibrated_start(model_fp, config, pipe, calib, progress=False)
        seconds = time.perf_counter() - t
        codes = model_codes(start)
        codes0 = codes0 or codes
        moved = codes_moved(codes0, codes)
        row = {"case": "as loaded" if case is None else f"× (1 + 2^-23 ε), seed {case}", "seed": a.seed,
               "ppl_start": lm_track.perplexity(start, windows), "ppl_fp": lm_track.perplexity(model_fp, windows),
               "codes_moved": moved, "seconds": seconds}
        print(f"| {row['case']} | {row['ppl_start']:.2f} | {row['ppl_fp']:.5f} | {moved:.1%} | {seconds:.0f} |",
              flush=True)
        with open(a.results, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
