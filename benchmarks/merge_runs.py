"""Merge the rows of several ``jacquant run`` reports (e.g. seed 0, then seeds 1-2) into one table.

Runs made with the same settings and different ``--seed`` values are the same experiment split in time;
this writes their union as one report (mean ± std over all seeds, verdicts, paired differences to STE):

    jacquant run --out runs/s0                       # the default: seed 0
    jacquant run --seed 1 --seeds 2 --out runs/s12   # seeds 1 and 2
    python benchmarks/merge_runs.py runs/s0 runs/s12 --out runs/merged
"""
from __future__ import annotations

import argparse
import json
import os

from jacquant.app import lm_track, report

SEEDLESS = ("fp", "fp32", "rtn")  # the same model in every run; GPTQ's start depends on the seed's calibration windows


def key(row: dict) -> tuple:
    """fp and RTN rows are the same in every run: one of each; every other row (GPTQ's start, trained) is per seed."""
    return (row["track"], row["method"], None if row["method"] in SEEDLESS else row["seed"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run directories holding results.json")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    rows, metas = [], []
    for d in a.runs:
        with open(os.path.join(d, "results.json")) as f:
            res = json.load(f)
        metas.append(res["meta"])
        seen = {key(r) for r in rows}
        rows += [r for r in res["rows"] if key(r) not in seen]
    fp = [r["metrics"]["ppl"] for r in rows if r["track"] == "lm" and r["method"] == "fp"]
    rtn = [r["metrics"]["ppl"] for r in rows if r["track"] == "lm" and r["method"] == "rtn"]
    if fp and rtn:  # runs without an RTN row lack the recovery: computed here from the merged fp and RTN
        for r in rows:
            if r["track"] == "lm" and r["method"] != "fp":
                r["metrics"]["recovery"] = lm_track.recovery(r["metrics"]["ppl"], rtn[0], fp[0])
    meta = {**metas[0], "seeds": len({r["seed"] for r in rows if r["curve"]}), "merged_from": ", ".join(a.runs),
            "seconds": round(sum(m["seconds"] for m in metas), 1)}
    md, _ = report.write(a.out, rows, meta)
    print(open(md).read())


if __name__ == "__main__":
    main()
