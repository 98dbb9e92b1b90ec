"""What storing the scales in fp16 costs: the GPTQ start of SmolLM2-135M at W4/W3/W2 g64 (seed 0, the main job's
windows and calibration set) with the forward's fp16(s), and the same start with fp32 scales (fp16 rounding switched
off for this script only: the quantizer's forward and init, and GPTQ's stored scale), on the same code and windows.

    python benchmarks/fp16_scales.py [--bits 4,3,2]   # prints the table, appends rows to results/fp16_scales.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import time
from contextlib import contextmanager
from dataclasses import replace

from usable2bit import jacquant_bpw

import jacquant.calibration.gptq as calibration_gptq
import jacquant.qat.quantizer as quantizer
from jacquant.app import data, lm_track, models
from jacquant.app.pipeline import calibrated_start, calibration_set
from jacquant.config import QuantConfig

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "results", "fp16_scales.jsonl")


@contextmanager
def fp32_scales():
    """The forward, the init and GPTQ use the fp32 scale itself (what jacquant did before fp16 scales)."""
    saved = quantizer.WeightQuantizer.effective_scale, quantizer.formats.fp16_scale, calibration_gptq.fp16_scale
    quantizer.WeightQuantizer.effective_scale = lambda self: self.scale
    quantizer.formats.fp16_scale = calibration_gptq.fp16_scale = lambda s: s.detach().float()
    try:
        yield
    finally:
        quantizer.WeightQuantizer.effective_scale, quantizer.formats.fp16_scale, calibration_gptq.fp16_scale = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", default="4,3,2")
    a = ap.parse_args()
    fp, tok, _ = models.load_fp()
    toks = lm_track.tokens(data.load_corpus(), tok)
    base = lm_track.DEFAULT
    main_w = lm_track.eval_windows(toks.valid, base.eval_windows, base.eval_seq)
    other_w = lm_track.other_windows(tok)
    calib = calibration_set(base.pipeline, toks.train, 0, force=True)

    def measured(bits: int, scales: str) -> dict:
        t0 = time.perf_counter()
        start = calibrated_start(fp, QuantConfig(bits=bits, group=64, method="ste"),
                                 replace(base.pipeline, start="gptq"), calib, progress=False, frozen_embedding=True)
        row = {"bits": bits, "scales": scales, "ppl": lm_track.perplexity(start, main_w),
               "ppl_other": lm_track.perplexity(start, other_w), "kl": lm_track.mean_kl(start, fp, main_w),
               "bpw": jacquant_bpw(start) + (16 / 64 if scales == "fp32" else 0),  # 16 more bits a group of 64
               "seconds": time.perf_counter() - t0}
        with open(OUT, "a") as f:
            f.write(json.dumps(row) + "\n")
        return row

    print("| bits | scales | GPTQ start, Python docs ↓ | Debian FAQ ↓ | KL to fp ↓ | bits/weight |")
    print("|---|---|---|---|---|---|")
    for bits in (int(b) for b in a.bits.split(",")):
        with fp32_scales():
            a = measured(bits, "fp32")
        b = measured(bits, "fp16")
        for r in (a, b):
            print(f"| {bits} | {r['scales']} | {r['ppl']:.2f} | {r['ppl_other']:.2f} | {r['kl']:.3f} | {r['bpw']:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
