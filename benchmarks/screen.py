"""Screening of issue 14's candidate surrogates against STE and StableQAT on two cheap real tracks.

Nothing here reads validation text: every metric is on a *tuning* slice of the training split.

  encoder   all-MiniLM-L6-v2 W2 g64 distillation (jacquant.app.encoder_track), 32 steps x 16 sentences,
            seed 0, metrics (cosine, Spearman to fp32) on the 256 tune sentences; one run per (method, lr).
  smol      SmolLM2-135M-Instruct W2 g64 causal-LM QAT, ``--steps`` (30) x 4 x 128 tokens, seed 0, on the
            corpus's training split (python docs, SmolLM2's tokenizer); perplexity on 32 windows of 128
            tokens from the last training documents (the tuning slice, never trained on).
            Also: seconds per training step (refresh and hooks included) and the fraction of codes
            that moved away from the RTN initialisation.

Rows are appended to ``--out`` (JSON lines) so that runs can be split into short locked jobs; ``--table``
prints the tables of a results file. Learning rate: the same rule for every method, the best tune
metric over ``--lrs``.

    flock /tmp/jacquant-cpu.lock python benchmarks/screen.py encoder --methods ste,jq-ewgs --lrs 3e-4,1e-3
    flock /tmp/jacquant-cpu.lock python benchmarks/screen.py smol --methods ste,jq-ewgs --lrs 1e-3
    flock /tmp/jacquant-cpu.lock python benchmarks/screen.py smol --steps 5 --no-eval --out benchmarks/results/cost.jsonl
    python benchmarks/screen.py table [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections import defaultdict

import torch

from jacquant.app import data
from jacquant.app.qat import Recipe, quantize_copy, train
from jacquant.app.qat import recipes as named_recipes
from jacquant.research.elementwise import ElementwiseConfig
from jacquant.config import QuantConfig
from jacquant.qat.stats import codes_moved, model_codes

# benchmark-only controls: the update hook with B ≡ 1 changes the STE run by fp32 rounding only
# (w_old + (w_new − w_old) ≠ w_new bit for bit), which measures how chaotic a short run is
CONTROLS = {"ste-upd-noop": Recipe("ste-upd-noop", elementwise=ElementwiseConfig(rule="ewgs", delta=0.0,
                                                                                placement="update"))}


def recipes(names: list[str]) -> list[Recipe]:
    """:func:`jacquant.app.qat.recipes` plus :data:`CONTROLS`."""
    return [CONTROLS[n] if n in CONTROLS else named_recipes([n])[0] for n in names]


OUT = os.path.join(os.path.dirname(__file__), "results", "screen.jsonl")
TUNE_DOCS = 20  # SmolLM2's tuning slice: the last 20 documents of the training split


def _append(path: str, row: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def encoder(methods: list[str], lrs: list[float], out: str, bits: int, group: int) -> None:
    from jacquant.app import encoder_track as et

    enc = et.load_minilm()
    corpus = data.load_corpus()
    b = et.DEFAULTS
    for lr in lrs:
        for r in recipes(methods):
            rows = et.run([r], [0], bits, group, b.steps, lr, b.batch, b.max_len, None, corpus,
                          n_eval=et.TUNE_SENTENCES, eval_split="tune", encoder=enc)
            row = rows[-1]
            _append(out, {"track": "encoder", "method": r.name, "lr": lr, "seed": 0, **row["metrics"],
                          "seconds": row["seconds"], "final_loss": row["curve"][-1] if row["curve"] else None})


def _smol_data(tok, n_train_chars: int = 3_000_000) -> tuple[torch.Tensor, torch.Tensor]:
    """(training token ids from the first documents of the train split, tuning token ids of its last
    :data:`TUNE_DOCS` documents), cached under /tmp."""
    cache = "/tmp/jacquant-screen-smol-tokens.pt"
    if os.path.exists(cache):
        d = torch.load(cache)
        return d["train"], d["tune"]
    corpus = data.load_corpus()
    docs, tune_docs = corpus.train[:-TUNE_DOCS], corpus.train[-TUNE_DOCS:]
    text, n = [], 0
    for d in docs:
        text.append(d)
        n += len(d)
        if n >= n_train_chars:
            break
    enc = lambda t: torch.tensor(tok("\n\n".join(t), add_special_tokens=False)["input_ids"], dtype=torch.long)  # noqa: E731
    train_ids, tune_ids = enc(text), enc(tune_docs)
    torch.save({"train": train_ids, "tune": tune_ids}, cache)
    return train_ids, tune_ids


def smol(methods: list[str], lrs: list[float], out: str, bits: int, group: int, steps: int, batch: int, seq: int,
         seed: int, evaluate: bool = True) -> None:
    from jacquant.app import lm_track
    from jacquant.app.models import smollm2_path
    from jacquant.app.models import load_model

    from jacquant.app import qat

    hooks: list = []  # the per-element hooks of the current run, for the fitted δ
    attach = qat.attach_elementwise
    qat.attach_elementwise = lambda *args, **kw: hooks.append(attach(*args, **kw)) or hooks[-1]
    torch.manual_seed(seed)
    fp, tok = load_model(smollm2_path())
    train_ids, tune_ids = _smol_data(tok)
    tune = lm_track.eval_windows(tune_ids, 32, seq)
    if evaluate:
        print(f"SmolLM2: {len(train_ids):,} training tokens, tuning slice {len(tune_ids):,} tokens; "
              f"fp32 tune perplexity {lm_track.perplexity(fp, tune, batch=8):.2f}", flush=True)
    for lr in lrs:
        for r in recipes(methods):
            torch.manual_seed(seed)
            model = quantize_copy(fp, r, QuantConfig(bits=bits, group=group))
            codes0 = model_codes(model)
            calib = next(data.windows(train_ids, batch, seq, 1, seed + 10_000))
            stamps: list[float] = []
            hooks.clear()

            def timed(batches):
                for b in batches:
                    stamps.append(time.perf_counter())
                    yield b

            t0 = time.perf_counter()
            curve = train(model, r, timed(data.windows(train_ids, batch, seq, steps, seed)), lm_track.lm_loss, steps,
                          lr, seed=seed, warmup=max(1, steps // 20), calib_batch=calib, desc=f"smol {r.name} lr {lr:g}")
            sec = time.perf_counter() - t0
            stamps.append(time.perf_counter())
            durations = [b - a for a, b in zip(stamps, stamps[1:])]  # step t: yield t -> yield t + 1
            moved = codes_moved(codes0, model_codes(model))
            ok = evaluate and all(math.isfinite(c) for c in curve)
            ppl = lm_track.perplexity(model, tune, batch=8) if ok else float("nan")
            _append(out, {"track": "smol", "method": r.name, "lr": lr, "seed": seed, "steps": steps, "ppl": ppl,
                          "sec_per_step": sec / steps,
                          "step0_s": durations[0], "median_step_s": sorted(durations[1:])[len(durations[1:]) // 2],
                          "codes_moved": moved, "final_loss": curve[-1],
                          "delta": _delta_stats(hooks), "step_s": durations,
                          "hook_s": list(hooks[-1].seconds) if hooks else None})
            del model


def _delta_stats(hooks: list) -> dict | None:
    """mean, min, max of the per-layer δ of the run's per-element hook (None without one)."""
    if not hooks:
        return None
    d = torch.tensor(list(hooks[-1].deltas.values()), dtype=torch.float64)
    return {"mean": float(d.mean()), "min": float(d.min()), "max": float(d.max())}


def _ratio(r: dict, ste: dict | None, k: int = 100) -> float:
    """Step time relative to STE: (median step + (step-0 time − STE's step-0 time)/K) / STE's median step,
    i.e. the refresh done at step 0 amortised over K steps; the run means where medians were not recorded."""
    if not ste:
        return float("nan")
    if "median_step_s" in r and "median_step_s" in ste:
        extra = max(r["step0_s"] - ste["step0_s"], 0.0)
        return (r["median_step_s"] + extra / k) / ste["median_step_s"]
    return r["sec_per_step"] / ste["sec_per_step"]


def paired_hook_ratio(step_s: list[float], hook_s: list[float]) -> float:
    """A per-element rule's step over the same step without it, paired within one run (immune to the machine's drift
    between runs): 1 + mean_t h_t / median_t (d_t − h_t) over steps t ≥ 1 (step 0 compiles), d_t the step's wall time
    and h_t the time inside the rule's optimizer hooks (refits included, so a run past K steps amortises them)."""
    d, h = step_s[1:], hook_s[1:len(step_s)]
    rest = sorted(a - b for a, b in zip(d, h))
    return 1.0 + (sum(h) / len(h)) / rest[len(rest) // 2]


def _cost_table(by: dict, lrs: list[float], steps: int) -> None:
    print(f"\nSmolLM2-135M W2 g64 step time, {steps} steps x 4 x 128 tokens (2 CPU threads, under the lock): median of "
          "steps 1.., step 0 (the refresh's step), ratio to ste with the step-0 excess amortised over K = 100 and over "
          f"the {steps} steps of the run")
    print("(paired: the per-element rule's hooks timed inside each step, 1 + mean hook s / median of the rest, "
          "refits at their period included; the column to trust on a noisy machine)")
    print("| method | median s/step | step 0 s | ratio (K = 100) | ratio (every step's share of step 0) | "
          "paired in-step ratio |")
    print("|---|---|---|---|---|---|")
    for i, lr in enumerate(lrs):  # the lr does not change the step time: each lr is a replicate pass
        ste = by.get("ste", {}).get(lr)
        for m, runs in by.items():
            r = runs.get(lr)
            if r is None or "median_step_s" not in r:
                continue
            burst = (r["median_step_s"] * (steps - 1) + r["step0_s"]) / (ste["median_step_s"] * (steps - 1) + ste["step0_s"])
            paired = paired_hook_ratio(r["step_s"], r["hook_s"]) if r.get("hook_s") else None
            print(f"| {m} (pass {i + 1}) | {r['median_step_s']:.2f} | {r['step0_s']:.2f} | {_ratio(r, ste):.3f} | "
                  f"{burst:.3f} | {'' if paired is None else f'{paired:.3f}'} |")


def table(path: str) -> None:
    rows = [json.loads(line) for line in open(path)]
    for track, metric, better in (("encoder", "cosine", max), ("smol", "ppl", min)):
        sel = [r for r in rows if r["track"] == track]
        if not sel:
            continue
        lrs = sorted({r["lr"] for r in sel})
        by = defaultdict(dict)
        for r in sel:
            by[r["method"]][r["lr"]] = r  # the last run of a (method, lr) wins
        if track == "smol" and all(math.isnan(r["ppl"]) for r in sel):
            fastest = defaultdict(dict)  # a method timed twice (ste first and last): its least-disturbed run
            for r in sel:
                old = fastest[r["method"]].get(r["lr"])
                if old is None or r["median_step_s"] < old["median_step_s"]:
                    fastest[r["method"]][r["lr"]] = r
            _cost_table(fastest, lrs, sel[0]["steps"])
            continue
        if track == "encoder":
            print("\nMiniLM W2 g64, 32 steps x 16, seed 0: cosine / Spearman to fp32 on the tune slice (256 sentences)")
            print("| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | best cosine | Δ vs ste |")
        else:
            steps = sel[0]["steps"]
            print(f"\nSmolLM2-135M W2 g64, {steps} steps x 4 x 128 tokens, seed 0: perplexity on the tuning slice "
                  "(fraction of codes moved from RTN; mean fitted δ); step times: the cost table")
            print("| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | best ppl | Δ vs ste |")
        print("|---" * (len(lrs) + 3) + "|")
        best_ste = None
        if "ste" in by:
            best_ste = better(r[metric] for r in by["ste"].values())
        for m, runs in by.items():
            cells = []
            for lr in lrs:
                r = runs.get(lr)
                if r is None:
                    cells.append("")
                elif track == "encoder":
                    cells.append(f"{r['cosine']:.4f} / {r['spearman']:.4f}")
                else:
                    d = f", δ {r['delta']['mean']:.2f}" if r.get("delta") and "ewgs" in m else ""
                    cells.append(f"{r['ppl']:.1f} ({r['codes_moved']:.4f}{d})")
            best = better(r[metric] for r in runs.values())
            delta = f"{best - best_ste:+.4f}" if best_ste is not None else ""
            fmt = ".4f" if track == "encoder" else ".1f"
            delta = f"{best - best_ste:+{fmt}}" if best_ste is not None else ""
            print(f"| {m} | " + " | ".join(cells) + f" | {best:{fmt}} | {delta} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("track", choices=["encoder", "smol", "table"])
    ap.add_argument("--methods", default="ste,stableqat,jacquant,jq-ewgs,jq-ewgs-upd,jq-gauss-upd,jq-cage,jq-codes,"
                                         "jq-data-dither,ste-vrm,jq-ewgs-vrm")
    ap.add_argument("--lrs", default="3e-4,1e-3")
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--no-eval", action="store_true", help="skip the perplexity (step-time runs)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    methods, lrs = a.methods.split(","), [float(x) for x in a.lrs.split(",")]
    if a.track == "encoder":
        encoder(methods, lrs, a.out, a.bits, a.group)
    elif a.track == "smol":
        smol(methods, lrs, a.out, a.bits, a.group, a.steps, a.batch, a.seq, a.seed, evaluate=not a.no_eval)
    else:
        table(a.out)


if __name__ == "__main__":
    main()
