"""The accuracy table and the run report: mean ± std over seeds, the verdict, plots, results files.

Each track returns rows ``{"track", "method", "seed", "metrics": {name: value}, "seconds", "curve",
"log"}``. :func:`summarise` groups them per (track, method) into mean and sample standard deviation
over seeds; :func:`verdict` answers the benchmark's question for one metric:

    Δ = mean_JacQuant − mean_baseline (signed so that > 0 means JacQuant is better)
    spread = max(std_JacQuant, std_baseline)
    "beats" when Δ > spread, "loses" when −Δ > spread, else "within the seed spread"; with one seed
    only "ahead" or "behind", since there is no spread to judge by.
"""
from __future__ import annotations

import json
import os
import statistics
from typing import Optional

# metric -> (label, higher is better, format)
METRICS = {
    "ppl": ("held-out perplexity", False, "{:.3f}"),
    "recovery": ("RTN-to-fp gap closed (log ppl)", True, "{:.3f}"),
    "ppl_other": ("perplexity on another English text (Debian FAQ)", False, "{:.3f}"),
    "kl": ("KL(fp ‖ model) per token", False, "{:.4f}"),
    "cosine": ("cosine to fp32 embedding", True, "{:.4f}"),
    "spearman": ("Spearman of pairwise similarities", True, "{:.4f}"),
}
VERDICT_METRICS = ("ppl", "cosine", "spearman")  # recovery restates ppl
TRACK_TITLES = {"lm": "Causal LM (SmolLM2-135M-Instruct, held-out Python docs, token perplexity)", "encoder": "Encoder (all-MiniLM-L6-v2, distillation)"}


def summarise(rows: list[dict]) -> dict[str, dict[str, dict]]:
    """{track: {method: {"n", "seconds", metric: {"mean", "std", "values"}}}} in first-seen order."""
    out: dict[str, dict[str, dict]] = {}
    for r in rows:
        entry = out.setdefault(r["track"], {}).setdefault(r["method"], {"n": 0, "seconds": 0.0})
        entry["n"] += 1
        entry["seconds"] += r["seconds"]
        if r.get("tokens_per_s"):
            entry.setdefault("tokens_per_s", []).append(r["tokens_per_s"])
            entry["tokens"] = r["tokens"]
        if r.get("calib_tokens"):
            entry["calib_tokens"] = r["calib_tokens"]
        for k, v in r["metrics"].items():
            entry.setdefault(k, {"values": []})["values"].append(float(v))
    for methods in out.values():
        for entry in methods.values():
            for k, v in entry.items():
                if isinstance(v, dict):
                    vals = v["values"]
                    v["mean"] = statistics.fmean(vals)
                    v["std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return out


def verdict(summary: dict[str, dict], metric: str, method: str = "jacquant", baseline: str = "ste") -> Optional[dict]:
    """Δ, spread and the verdict of ``method`` against ``baseline`` on ``metric`` (None if either is absent)."""
    if method not in summary or baseline not in summary or metric not in summary[method]:
        return None
    higher = METRICS[metric][1]
    a, b = summary[method][metric], summary[baseline][metric]
    delta = (a["mean"] - b["mean"]) * (1 if higher else -1)
    spread = max(a["std"], b["std"])
    n = min(summary[method]["n"], summary[baseline]["n"])
    word = "beats" if delta > spread else "loses to" if -delta > spread else "is within the seed spread of"
    if n < 2:
        word = ("is ahead of" if delta > 0 else "is behind") + " (one seed: no spread to judge by)"
    return {"method": method, "baseline": baseline, "metric": metric, "delta": delta, "spread": spread,
            "verdict": word, "n": n}


def is_jacquant(method: str) -> bool:
    """The JacQuant family: the default ``jacquant`` and the ``jq-*`` recipes."""
    return method == "jacquant" or method.startswith("jq-")


def verdicts(summary: dict[str, dict[str, dict]]) -> list[dict]:
    """:func:`verdict` of every JacQuant method in the run against STE and StableQAT, every metric, every track."""
    out = []
    for track, methods in summary.items():
        for method in filter(is_jacquant, methods):
            for metric in VERDICT_METRICS:
                for base in ("ste", "stableqat"):
                    v = verdict(methods, metric, method, base)
                    if v is not None:
                        out.append({"track": track, **v})
    return out


def markdown_table(track: str, methods: dict[str, dict]) -> str:
    """One track's table: a column per metric (mean ± std over n seeds), seconds per run."""
    metrics = [m for m in METRICS if any(m in e for e in methods.values())]
    speed = any("tokens_per_s" in e for e in methods.values())
    calib = any("calib_tokens" in e for e in methods.values())
    head = "| method | " + " | ".join(METRICS[m][0] + (" ↓" if not METRICS[m][1] else " ↑") for m in metrics) + \
        " | seeds | s / run |" + (" training tokens / run | tokens / s |" if speed else "") + \
        (" calibration tokens |" if calib else "")
    lines = [f"### {TRACK_TITLES.get(track, track)}", "", head, "|---" * (len(metrics) + 3 + 2 * speed + calib) + "|"]
    for name, e in methods.items():
        cells = []
        for m in metrics:
            fmt = METRICS[m][2]
            if m not in e:
                cells.append("")
                continue
            cells.append(fmt.format(e[m]["mean"]) + (" ± " + fmt.format(e[m]["std"]) if e["n"] > 1 else ""))
        tail = ""
        if speed:
            tail = (f" {e['tokens']:,} | {statistics.fmean(e['tokens_per_s']):.0f} |" if "tokens_per_s" in e
                    else " | |")
        if calib:
            tail += f" {e['calib_tokens']:,} |" if "calib_tokens" in e else " |"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {e['n']} | {e['seconds'] / e['n']:.1f} |" + tail)
    return "\n".join(lines)


def paired_differences(rows: list[dict], metric: str = "ppl", baseline: str = "ste") -> str:
    """Per seed, method − baseline on ``metric`` of the LM track (negative = lower perplexity than the baseline),
    and their mean ± sample std over the seeds both have: the same seed shares the data order and the
    initial scales, so the paired differences vary less than either method's results."""
    lm = [r for r in rows if r["track"] == "lm" and r["curve"]]
    base = {r["seed"]: r["metrics"][metric] for r in lm if r["method"] == baseline}
    methods = [m for m in dict.fromkeys(r["method"] for r in lm) if m != baseline]
    seeds = sorted(base)
    lines = [f"| method − {baseline} ({metric}) | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std |",
             "|---" * (len(seeds) + 2) + "|"]
    for m in methods:
        vals = {r["seed"]: r["metrics"][metric] - base[r["seed"]] for r in lm if r["method"] == m and r["seed"] in base}
        d = list(vals.values())
        summary = f"{statistics.fmean(d):+.3f} ± {statistics.stdev(d):.3f}" if len(d) > 1 else ""
        lines.append(f"| {m} | " + " | ".join(f"{vals[s]:+.3f}" if s in vals else "" for s in seeds) + f" | {summary} |")
    return "\n".join(lines)


def phases_table(rows: list[dict]) -> str:
    """Per trained LM row and phase: the tuning-slice perplexity before and after it, its seconds, and whether the
    pipeline kept its result (a phase that made the model worse on the tuning slice is undone)."""
    lines = ["| method | seed | phase | tuning ppl before | after | s | kept |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        for name, p in (r.get("phases") or {}).items():
            if p.get("before") is None:
                continue
            lines.append(f"| {r['method']} | {r['seed']} | {name} | {p['before']:.3f} | {p['after']:.3f} | "
                         f"{p['seconds']:.0f} | {'yes' if p['kept'] else '**no**: the model before it is kept'} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def verdict_lines(vs: list[dict]) -> list[str]:
    """Sentences like 'lm, ppl: jacquant beats ste by 0.12 (seed spread 0.05, 3 seeds)'."""
    return [f"- {v['track']}, {METRICS[v['metric']][0]}: **{v['method']} {v['verdict']} {v['baseline']}** "
            f"(Δ = {v['delta']:+.4f} in its favour, seed spread {v['spread']:.4f}, {v['n']} seeds)" for v in vs]


def write(out_dir: str, rows: list[dict], meta: dict, extra_md: str = "",
          generations: Optional[dict] = None) -> tuple[str, str]:
    """Write ``results.json`` (meta, rows, summary, verdicts, generations) and ``results.md``; return their paths."""
    os.makedirs(out_dir, exist_ok=True)
    summary = summarise(rows)
    vs = verdicts(summary)
    json_path = os.path.join(out_dir, "results.json")
    with open(json_path, "w") as f:
        json.dump({"meta": meta, "summary": summary, "verdicts": vs, "rows": rows, "generations": generations or {}}, f, indent=1, default=str)
    md = [f"# jacquant run: W{meta.get('bits')} group {meta.get('group')}", ""]
    md += [f"- {k}: {v}" for k, v in meta.items() if not isinstance(v, (dict, list))]
    md.append("")
    for track, methods in summary.items():
        md += [markdown_table(track, methods), ""]
    md += ["## Does JacQuant beat STE and StableQAT by more than the seed spread?", ""]
    md += verdict_lines(vs) or ["Not compared: this run does not hold a JacQuant method beside ste or stableqat "
                                "(merge runs with benchmarks/merge_runs.py)."]
    md.append("")
    for base, label in (("ste", "STE"), ("stableqat", "StableQAT")):
        if len({r["seed"] for r in rows if r["track"] == "lm" and r["method"] == base and r["curve"]}) > 1:
            md += [f"## Paired differences to {label} per seed (LM track)", "", paired_differences(rows, baseline=base), ""]
    phases = phases_table([r for r in rows if r["track"] == "lm"])
    if phases:
        md += ["## Each phase scored on the tuning slice, the better model kept", "", phases, ""]
    md.append(extra_md)
    md_path = os.path.join(out_dir, "results.md")
    with open(md_path, "w") as f:
        f.write("\n".join(md) + "\n")
    return md_path, json_path

