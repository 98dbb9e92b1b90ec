"""Learning-rate sweep of the LM track's QAT, judged on a tuning slice of the *training* text.

Every method of ``jacquant run`` uses one learning rate; this picks it without looking at the
validation split that the report's perplexities use: seed 0, the track's default budget, perplexity
on windows from the last 1 MB of the training bytes (QAT samples 0.2 MB of the 10 MB at random).

    python benchmarks/lr_sweep.py [--lrs 3e-4,1e-3,3e-3] [--methods ste,jacquant] [--steps 200]
"""
from __future__ import annotations

import argparse
from dataclasses import replace

import torch

from jacquant.app import data, lm_track
from jacquant.config import QuantConfig
from jacquant.app.qat import recipes, quantize_copy, train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lrs", default="3e-4,1e-3,3e-3")
    ap.add_argument("--methods", default="ste,jacquant")
    ap.add_argument("--steps", type=int, default=lm_track.DEFAULT.steps)
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--group", type=int, default=64)
    a = ap.parse_args()
    text = data.load_corpus()
    budget = replace(lm_track.DEFAULT, steps=a.steps)
    fp, _ = lm_track.pretrained(text, budget)
    train_bytes = text.train_bytes
    tune = lm_track.eval_windows(train_bytes[-1_000_000:], budget.eval_windows, budget.seq)
    print(f"fp32 tuning-slice perplexity {lm_track.perplexity(fp, tune):.4f}")
    lrs = [float(x) for x in a.lrs.split(",")]
    table = {}
    for recipe in recipes(a.methods.split(",")):
        for lr in lrs:
            torch.manual_seed(0)
            model = quantize_copy(fp, recipe, QuantConfig(bits=a.bits, group=a.group))
            batches = data.windows(train_bytes, budget.batch, budget.seq, budget.steps, 1)
            train(model, recipe, batches, lm_track.lm_loss, budget.steps, lr, warmup=max(1, budget.steps // 20),
                  desc=f"{recipe.name} lr {lr:g}")
            table[recipe.name, lr] = lm_track.perplexity(model, tune)
    print(f"\nW{a.bits} g{a.group}, {budget.steps} steps, seed 0: tuning-slice perplexity per byte")
    print("| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |")
    print("|---" * (len(lrs) + 1) + "|")
    for name in a.methods.split(","):
        print(f"| {name} | " + " | ".join(f"{table[name, lr]:.4f}" for lr in lrs) + " |")


if __name__ == "__main__":
    main()
