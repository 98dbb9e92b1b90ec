"""Recipe sweep of the LM track (SmolLM2-135M W2 g64), judged on the tuning slice of the *training* text.

Picks the learning rate, the QAT loss (cross entropy or distillation from the fp model) and whether the
tied embedding trains, without looking at the validation documents that the report's perplexities use:
seed 0, perplexity on windows of the tuning slice (the last 5% of the training token stream, which QAT
never samples; :func:`jacquant.app.lm_track.tokens`). Each configuration is ``method:loss:lr[:train-emb]``.
The same rule for every method: the lowest tuning-slice perplexity wins.

    python benchmarks/lr_sweep.py --configs ste:kd:1e-3,ste:ce:1e-3,jacquant:kd:1e-3 [--steps 30]
"""
from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

from jacquant.app import data, lm_track, models
from jacquant.app.pipeline import freeze_embedding
from jacquant.app.recipes import recipe
from jacquant.app.train import quantize_copy, train
from jacquant.config import QuantConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="ste:kd:1e-3,ste:ce:1e-3,ste:kd:3e-3,ste:kd:3e-4,ste:kd:1e-3:train-emb")
    ap.add_argument("--steps", type=int, default=lm_track.DEFAULT.steps)
    ap.add_argument("--windows", type=int, default=16, help="tuning-slice windows of the track's eval_seq tokens")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    budget = replace(lm_track.DEFAULT, steps=a.steps)
    fp, tok, _ = models.load_fp()
    toks = lm_track.tokens(data.load_corpus(), tok)
    tune = lm_track.eval_windows(toks.tune, a.windows, budget.eval_seq)
    fp_ppl = lm_track.perplexity(fp, tune)
    rtn = quantize_copy(fp, recipe("rtn"), QuantConfig(bits=2, group=64))
    rtn_ppl = lm_track.perplexity(rtn, tune)
    del rtn
    print(f"tuning slice: fp {fp_ppl:.3f}, rtn {rtn_ppl:.1f}; {a.steps} steps x {budget.batch} x {budget.seq} tokens")
    print("| method | loss | lr | embedding | tuning-slice ppl | recovery | s |\n|---|---|---|---|---|---|---|")
    for cfg in a.configs.split(","):
        method, loss, lr, *rest = cfg.split(":")
        t0 = time.perf_counter()
        torch.manual_seed(a.seed)
        model = quantize_copy(fp, recipe(method), QuantConfig(bits=2, group=64))
        if "train-emb" not in rest:
            freeze_embedding(model)
        batches = data.windows(toks.train, budget.batch, budget.seq, a.steps, a.seed + 1)
        calib = next(data.windows(toks.train, budget.batch, budget.seq, 1, 10_000))
        train(model, recipe(method), batches, lm_track.loss_fn(loss, fp), a.steps, float(lr), seed=a.seed,
              warmup=max(1, a.steps // 20), calib_batch=calib, desc=cfg)
        ppl = lm_track.perplexity(model, tune)
        emb = "trained" if "train-emb" in rest else "frozen"
        print(f"| {method} | {loss} | {lr} | {emb} | {ppl:.3f} | {lm_track.recovery(ppl, rtn_ppl, fp_ppl):.3f} | "
              f"{time.perf_counter() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
