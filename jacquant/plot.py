"""Plot a :class:`jacquant.stats.StatsLogger` JSONL file: loss, code-flip rate and B over steps."""
from __future__ import annotations

import json
import os

import matplotlib

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
