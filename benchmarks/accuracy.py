"""Accuracy benchmark: does JacQuant beat STE and StableQAT by more than the seed spread?

The same code as ``jacquant run`` (:func:`jacquant.accuracy.run_accuracy`), with the full method
matrix by default: RTN, STE, StableQAT, and JacQuant with Dither / Probe / data-driven Probe, B on
the update vs on the gradient, and the MARS-AdamW pair. Equal data, steps and learning rate per
track; mean ± std over seeds; the report goes to --out (default runs/accuracy-<timestamp>).

    python benchmarks/accuracy.py [--bits 2] [--group 64] [--seeds 3] [--tracks lm,encoder]
                                  [--methods rtn,ste,...] [--steps N] [--lr X] [--quick]
"""
from __future__ import annotations

import argparse
import datetime
import os

from jacquant.app.main_job import run_accuracy
from jacquant.app.recipes import RECIPES


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, default=2, choices=(2, 3, 4))
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--tracks", default="lm,encoder")
    ap.add_argument("--methods", default=",".join(RECIPES))
    ap.add_argument("--steps", type=int, default=None, help="QAT steps per LM run (default: the track budget)")
    ap.add_argument("--encoder-steps", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None, help="LM QAT learning rate (default: the track budget)")
    ap.add_argument("--encoder-lr", type=float, default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    out = a.out or os.path.join("runs", "accuracy-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    res = run_accuracy(out, tracks=tuple(a.tracks.split(",")), methods=tuple(a.methods.split(",")),
                       seeds=tuple(range(a.seeds)), bits=a.bits, group=a.group, quick=a.quick, lm_steps=a.steps,
                       lm_lr=a.lr, encoder_steps=a.encoder_steps, encoder_lr=a.encoder_lr, device=a.device)
    print(open(res["paths"]["results_md"]).read())


if __name__ == "__main__":
    main()
