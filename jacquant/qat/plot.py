"""Plots: a :class:`jacquant.qat.stats.StatsLogger` JSONL file (loss, code-flip rate, B over steps), and the
run report's loss curves, flip rates and B histograms."""
from __future__ import annotations

import json
import os

import matplotlib
import torch
import torch.nn as nn

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    if not records:
        raise ValueError(f"{path}: no records; log with StatsLogger(path).log(model, step, loss) first")
    return records


def plot(jsonl: str | os.PathLike, out_png: str | os.PathLike) -> str:
    """Three panels over steps: loss; flip rate per site; B mean per site with the overall min/max band."""
    rec = read_jsonl(jsonl)
    steps = [r["step"] for r in rec]
    fig, ax = plt.subplots(3, 1, figsize=(7, 8), sharex=True)
    ax[0].plot([s for s, r in zip(steps, rec) if r["loss"] is not None],
               [r["loss"] for r in rec if r["loss"] is not None])
    ax[0].set_ylabel("loss")
    names = list(rec[-1]["sites"])
    for name in names:
        pts = [(s, r["sites"][name]["flip_rate"]) for s, r in zip(steps, rec)
               if name in r["sites"] and r["sites"][name]["flip_rate"] is not None]
        if pts:
            ax[1].plot(*zip(*pts), label=name)
        ax[2].plot(steps, [r["sites"].get(name, {}).get("b_mean", float("nan")) for r in rec], label=name)
    ax[2].fill_between(steps, [r["all"]["b_min"] for r in rec], [r["all"]["b_max"] for r in rec], alpha=0.15,
                       color="gray", label="min..max")
    ax[1].set_ylabel("code-flip rate")
    ax[2].set_ylabel("B")
    ax[2].set_xlabel("step")
    if len(names) <= 12:
        ax[2].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return os.fspath(out_png)


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing mean over ``window`` values (the first ones average what exists)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v - (values[i - window] if i >= window else 0.0)
        out.append(acc / min(i + 1, window))
    return out


def loss_curves(rows: list[dict], out_png: str | os.PathLike, window: int = 10) -> str:
    """Training loss per method (mean over seeds, trailing mean over ``window`` steps), a panel per track."""
    tracks = list(dict.fromkeys(r["track"] for r in rows if r["curve"]))
    fig, axes = plt.subplots(len(tracks), 1, figsize=(7, 3.2 * max(len(tracks), 1)), squeeze=False)
    for ax, track in zip(axes[:, 0], tracks):
        by_method: dict[str, list[list[float]]] = {}
        for r in rows:
            if r["track"] == track and r["curve"]:
                by_method.setdefault(r["method"], []).append(r["curve"])
        for method, curves in by_method.items():
            n = min(len(c) for c in curves)
            mean = [sum(c[i] for c in curves) / len(curves) for i in range(n)]
            ax.plot(_smooth(mean, window), label=f"{method} ({len(curves)} seeds)")
        ax.set_title(track)
        ax.set_xlabel("QAT step")
        ax.set_ylabel("training loss")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return os.fspath(out_png)


def flip_rates(rows: list[dict], out_png: str | os.PathLike) -> str:
    """Code-flip rate (all sites, weighted by size) over steps, per track and method, from the rows' JSONL logs."""
    logged = [r for r in rows if r.get("log") and os.path.exists(r["log"])]
    tracks = list(dict.fromkeys(r["track"] for r in logged)) or ["(no logs)"]
    fig, axes = plt.subplots(len(tracks), 1, figsize=(7, 3.2 * len(tracks)), squeeze=False)
    for ax, track in zip(axes[:, 0], tracks):
        for r in logged:
            if r["track"] != track:
                continue
            rec = [x for x in read_jsonl(r["log"]) if x["all"]["flip_rate"] is not None]
            ax.plot([x["step"] for x in rec], [x["all"]["flip_rate"] for x in rec],
                    label=f"{r['method']} s{r['seed']}", alpha=0.8)
        ax.set_title(track)
        ax.set_xlabel("QAT step")
        ax.set_ylabel("code-flip rate per logged interval")
        ax.set_yscale("symlog", linthresh=1e-4)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return os.fspath(out_png)


def b_histograms(models: dict[str, nn.Module], out_png: str | os.PathLike, bins: int = 40) -> str:
    """Histogram of B over every group of every site, one panel per model (e.g. per track)."""
    from jacquant.qat.quantizer import sites

    fig, axes = plt.subplots(1, max(len(models), 1), figsize=(4.5 * max(len(models), 1), 3.2), squeeze=False)
    for ax, (label, model) in zip(axes[0], models.items()):
        values = torch.cat([s.quantizer.jac.flatten() for s in sites(model)]).float().cpu().numpy()
        ax.hist(values, bins=bins)
        ax.set_title(f"B at the end of QAT: {label}", fontsize=9)
        ax.set_xlabel("B (per group)")
        ax.set_ylabel("groups")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return os.fspath(out_png)
