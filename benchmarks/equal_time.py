"""The equal-time table: at each bit width, jacquant's pipeline given AutoRound's wall time on the same machine,
beside every peer, scored the same way.

Rows, per bit width b in ``--bits`` (group 64, the same 64 x 256 calibration windows, seed ``--seed``):
  jacquant rtn, jacquant gptq         measured here
  jacquant <method> @ AutoRound's s   GPTQ start, then the block-wise phase and end-to-end KD (``--batch`` x
                                      ``--seq``, jacquant train's by default) for the wall time
                                      AutoRound took at b bits (benchmarks/results/autoround.jsonl), split by
                                      ``jacquant.app.pipeline.timed_budget`` as ``jacquant train --budget`` does;
                                      each phase kept only if it lowers the tuning-slice perplexity
  autoround (200 iters), llama.cpp    the rows benchmarks/autoround.py and benchmarks/usable2bit.py --llama measured on
                                      this machine type on the same windows (read from their files, not rerun)

Columns: held-out perplexity on the main job's windows (32 x 257 tokens of Python docs) and on the Debian FAQ
(64 x 129), KL(p_fp ‖ p) per token, bits per weight of the decoder's linear layers as stored, wall seconds of the
quantization (training and the tuning-slice scores included). Rows accumulate in ``--out``/rows.jsonl; the plot
(perplexity against wall seconds, one panel per bit width) and the markdown table are rebuilt from all of them.

    python benchmarks/equal_time.py --bits 2,3,4 --method ste
    python benchmarks/equal_time.py --table
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import replace

import torch
from usable2bit import jacquant_bpw

from jacquant.app import data, lm_track, models
from jacquant.app.blockwise import BlockwiseConfig
from jacquant.app.commands import TrainArgs
from jacquant.app.pipeline import (
    Seeds,
    calibrated_start,
    calibration_set,
    e2e_lr,
    timed_budget,
    train_phases,
)
from jacquant.app.recipes import recipe as named_recipe
from jacquant.config import QuantConfig

HERE = os.path.dirname(os.path.abspath(__file__))
AUTOROUND = os.path.join(HERE, "results", "autoround.jsonl")
USABLE = os.path.join(HERE, "results", "usable2bit", "rows.jsonl")
EVAL_RESERVE_S = 30.0  # the final tuning-slice score, which the budget must leave room for


def autoround_rows() -> list[dict]:
    """AutoRound's rows (benchmarks/autoround.py, 200 iterations, batch 8, its own venv, 2 threads)."""
    rows = []
    for line in open(AUTOROUND):
        r = json.loads(line)
        rows.append({"system": f"autoround ({r['iters']} iters)", "bits": r["bits"], "ppl": r["ppl"],
                     "ppl_other": r.get("ppl_other"), "kl": r["kl"], "bpw": r["bits_per_weight"],
                     "seconds": r["quantize_seconds"], "source": "benchmarks/results/autoround.jsonl"})
    return rows


def llama_rows() -> list[dict]:
    """llama.cpp's rows with an importance matrix (benchmarks/usable2bit.py --llama), filed under the jacquant bit
    width they stand beside: Q4_0 at 4, Q3_K_S at 3, "Q2_K" at 2 (llama.cpp writes Q3_K_S for SmolLM2's rows of 576)."""
    near = {"llama.cpp Q4_0 + imatrix": 4, "llama.cpp Q3_K_S + imatrix": 3, "llama.cpp Q2_K + imatrix": 2}
    rows = []
    for line in open(USABLE):
        r = json.loads(line)
        if r["system"] in near:
            rows.append({**r, "bits": near[r["system"]], "source": "benchmarks/results/usable2bit/rows.jsonl"})
    return rows


def start_rows() -> list[dict]:
    """jacquant's RTN and GPTQ rows of benchmarks/usable2bit.py (the same windows, calibration set and seed), for
    the runs made with ``--no-baselines``."""
    rows = []
    for line in open(USABLE):
        r = json.loads(line)
        if r["system"] in ("jacquant rtn", "jacquant gptq"):
            rows.append({**r, "source": "benchmarks/results/usable2bit/rows.jsonl"})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", default="2,3,4")
    ap.add_argument("--method", default="ste", help="the backward rule of the pipeline rows")
    ap.add_argument("--seconds", type=float, default=None, help="wall time per bit width (default AutoRound's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--block-share", type=float, default=0.5, help="the block-wise phase's share of the time")
    ap.add_argument("--block-lr", type=float, default=0.02, help="block-wise rounding search: bins per step")
    ap.add_argument("--block-cap", type=int, default=400, help="the most block-wise steps per block")
    ap.add_argument("--batch", type=int, default=TrainArgs.batch, help="end-to-end batch (default jacquant train's)")
    ap.add_argument("--seq", type=int, default=TrainArgs.seq, help="end-to-end window (default jacquant train's)")
    ap.add_argument("--no-baselines", action="store_true", help="skip the rtn and gptq rows")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "equal_time"))
    ap.add_argument("--table", action="store_true", help="print the table and redraw the plot from the rows, then exit")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    jsonl = os.path.join(a.out, "rows.jsonl")
    if a.table:
        rows = [json.loads(x) for x in open(jsonl)] + autoround_rows() + llama_rows()
        measured = {(r["system"], r["bits"]) for r in rows}
        rows += [r for r in start_rows() if (r["system"], r["bits"]) not in measured]
        print(table(rows))
        plot(os.path.join(a.out, "ppl_vs_seconds.png"), rows)
        return
    fp, tok, _ = models.load_fp()
    toks = lm_track.tokens(data.load_corpus(), tok)
    base = replace(lm_track.DEFAULT, steps=0, batch=a.batch, seq=a.seq, pipeline=replace(lm_track.DEFAULT.pipeline, block=BlockwiseConfig(
        steps=a.block_cap, lr=a.block_lr, scale_lr=a.block_lr, batch=8)))
    main_w = lm_track.eval_windows(toks.valid, base.eval_windows, base.eval_seq)
    other_w = lm_track.other_windows(tok)
    tune_w = lm_track.eval_windows(toks.tune, base.tune_windows, base.eval_seq)
    calib = calibration_set(base.pipeline, toks.train, a.seed, force=True)
    peer_s = {r["bits"]: r["seconds"] for r in autoround_rows()}

    def scored(model) -> dict:
        return {"ppl": lm_track.perplexity(model, main_w), "ppl_other": lm_track.perplexity(model, other_w),
                "kl": lm_track.mean_kl(model, fp, main_w)}

    def emit(row: dict) -> None:
        row = {**row, "seed": a.seed, "torch_threads": torch.get_num_threads()}
        with open(jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps({k: v for k, v in row.items() if k != "phases"}), flush=True)

    for bits in (int(b) for b in a.bits.split(",")):
        recipe = named_recipe(a.method)
        config = QuantConfig(bits=bits, group=64, method=recipe.rule)
        budget_s = a.seconds or peer_s[bits]
        if not a.no_baselines:
            t0 = time.perf_counter()
            rtn = calibrated_start(fp, config, replace(base.pipeline, start="rtn"), None)
            emit({"system": "jacquant rtn", "bits": bits, **scored(rtn), "bpw": jacquant_bpw(rtn),
                  "seconds": time.perf_counter() - t0})
            del rtn
        t0 = time.perf_counter()
        torch.manual_seed(a.seed)
        start = calibrated_start(fp, config, replace(base.pipeline, start="gptq"), calib, progress=False,
                                 frozen_embedding=True)
        start_s = time.perf_counter() - t0
        scoring_s = 0.0  # the GPTQ row's scores: the benchmark's, not part of the pipeline's time
        if not a.no_baselines:
            emit({"system": "jacquant gptq", "bits": bits, **scored(start), "bpw": jacquant_bpw(start),
                  "seconds": start_s})
            scoring_s = time.perf_counter() - t0 - start_s
        budget = timed_budget(replace(base, lr=e2e_lr(bits)), budget_s - start_s - EVAL_RESERVE_S, a.block_share)
        model, phases = train_phases(start, fp, recipe, budget, lm_track.loss_fn(base.loss, fp), toks.train, calib,
                                     Seeds.main_job(a.seed), progress=False, desc=f"W{bits} {a.method}",
                                     score=lambda m: lm_track.perplexity(m, tune_w))
        seconds = time.perf_counter() - t0 - scoring_s
        emit({"system": f"jacquant {a.method} @ {budget_s:.0f} s", "bits": bits, **scored(model),
              "bpw": jacquant_bpw(model), "seconds": seconds, "scoring_seconds_excluded": scoring_s,
              "budget_seconds": budget_s, "block_share": a.block_share,
              "block_lr": a.block_lr, "e2e_lr": e2e_lr(bits), "e2e_batch": [a.batch, a.seq],
              "phases": {k: {kk: vv for kk, vv in v.items() if kk != "blocks"} for k, v in phases.record.items()},
              "block_steps": [b["steps"] for b in phases.record.get("block", {}).get("blocks", [])],
              "e2e_steps": len(phases.curve)})
        del model, start


def table(rows: list[dict]) -> str:
    """Markdown: per bit width, every system's perplexities, KL, bits per weight and wall seconds."""
    out = ["| bits | system | ppl, Python docs ↓ | ppl, Debian FAQ ↓ | KL to fp ↓ | bits/weight | wall s |",
           "|---|---|---|---|---|---|---|"]

    def f(x, spec):
        return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)

    for r in sorted(rows, key=lambda r: (r.get("bits", 0), r["seconds"])):
        seed = f", seed {r['seed']}" if r.get("seed") else ""  # seed 0 unmarked, as in the earlier tables
        out.append(f"| {r.get('bits', '')} | {r['system']}{seed} | {f(r['ppl'], '.2f')} | {f(r.get('ppl_other'), '.2f')} | "
                   f"{f(r.get('kl'), '.3f')} | {f(r.get('bpw'), '.2f')} | {f(r['seconds'], '.0f')} |")
    return "\n".join(out)


def plot(path: str, rows: list[dict]) -> None:
    """Held-out perplexity (log) against wall seconds, one panel per bit width."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widths = sorted({r["bits"] for r in rows if r.get("bits") in (2, 3, 4)})
    fig, axes = plt.subplots(1, len(widths), figsize=(5 * len(widths), 4.5), squeeze=False)
    for ax, bits in zip(axes[0], widths):
        for r in (r for r in rows if r.get("bits") == bits and r["ppl"] < 1000):
            color = "tab:red" if r["system"].startswith("llama.cpp") else "tab:green" if "autoround" in r["system"] \
                else "tab:blue"
            ax.scatter(max(r["seconds"], 1.0), r["ppl"], color=color, s=22)
            label = f"{r['system'].replace('jacquant ', '')}, {r['bpw']:.2f} bpw"
            ax.annotate(label, (max(r["seconds"], 1.0), r["ppl"]), fontsize=6,
                        xytext=(3, 2), textcoords="offset points")
        ax.axhline(18.15, color="grey", ls="--", lw=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"W{bits} g64 (fp 18.15, dashed)")
        ax.set_xlabel("wall seconds on 2 CPU cores (log)")
        ax.set_ylabel("held-out perplexity, Python docs (log)")
    fig.suptitle("SmolLM2-135M: quality against time (blue jacquant, green AutoRound, red llama.cpp + imatrix)")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


if __name__ == "__main__":
    main()
