"""report: mean ± std over seeds and the verdict, against numpy."""
import importlib.util
import json
import math
import os

import numpy as np

from jacquant.app import report


def _benchmark(name: str):
    """The script benchmarks/<name>.py as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(os.path.dirname(__file__), "..", "benchmarks",
                                                                     f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows():
    rows = []
    for method, vals in {"ste": [10.0, 10.4, 10.2], "jacquant": [9.0, 9.3, 9.1], "stableqat": [10.1, 9.0, 11.2]}.items():
        for seed, v in enumerate(vals):
            rows.append({"track": "lm", "method": method, "seed": seed, "metrics": {"ppl": v}, "seconds": 1.0,
                         "curve": [3.0, 2.0], "log": None})
    return rows


def test_summary_matches_numpy_mean_and_sample_std():
    s = report.summarise(_rows())["lm"]
    for method in ("ste", "jacquant", "stableqat"):
        vals = s[method]["ppl"]["values"]
        assert np.isclose(s[method]["ppl"]["mean"], np.mean(vals))
        assert np.isclose(s[method]["ppl"]["std"], np.std(vals, ddof=1))
        assert s[method]["n"] == 3


def test_verdict_signs_and_spread():
    s = report.summarise(_rows())["lm"]
    v = report.verdict(s, "ppl", "jacquant", "ste")  # lower perplexity is better
    assert np.isclose(v["delta"], np.mean([10.0, 10.4, 10.2]) - np.mean([9.0, 9.3, 9.1]))
    assert v["verdict"] == "beats"
    w = report.verdict(s, "ppl", "jacquant", "stableqat")  # stableqat's spread (1.1) exceeds the gap
    assert np.isclose(w["spread"], np.std([10.1, 9.0, 11.2], ddof=1))
    assert w["verdict"] == "is within the seed spread of"
    assert report.verdict(s, "ppl", "jacquant", "missing") is None


def test_write_produces_table_and_json(tmp_path):
    md, js = report.write(str(tmp_path), _rows(), {"bits": 2, "group": 64})
    text = open(md).read()
    assert "| jacquant | 9.133 ± 0.153 | 3 |" in text
    assert "| jacquant | -1.000 | -1.100 | -1.100 | -1.067 ± 0.058 |" in text  # paired to STE, per seed
    data = json.load(open(js))
    assert len(data["rows"]) == 9 and data["verdicts"][0]["verdict"] == "beats"
    assert all(math.isfinite(v[k]) for e in data["summary"]["lm"].values() for v in e.values()
               if isinstance(v, dict) for k in ("mean", "std"))


def test_one_seed_is_never_called_a_win():
    s = report.summarise([r for r in _rows() if r["seed"] == 0])["lm"]
    v = report.verdict(s, "ppl", "jacquant", "ste")
    assert v["n"] == 1 and np.isclose(v["delta"], 1.0)
    assert v["verdict"] == "is ahead of (one seed: no spread to judge by)"


def test_merge_runs_keeps_fp_and_rtn_once_and_pairs_seeds(tmp_path):
    merge = _benchmark("merge_runs")
    fixed = [{"track": "lm", "method": m, "seed": s, "metrics": {"ppl": v}, "seconds": 0.0, "curve": [], "log": None}
             for m, v, s in (("fp", 5.0, 0), ("rtn", 50.0, 0), ("rtn", 50.0, 1))]
    rows = fixed[:2] + _rows() + fixed[2:]
    assert [merge.key(r) for r in rows].count(("lm", "rtn", None)) == 2
    gptq = [{"track": "lm", "method": "gptq", "seed": s, "metrics": {"ppl": 300.0 + s}, "seconds": 0.0, "curve": [],
             "log": None} for s in (0, 1)]  # untrained, yet each seed calibrates on its own windows
    assert merge.key(gptq[0]) != merge.key(gptq[1])
    table = report.paired_differences(_rows())
    assert "| jacquant | -1.000 | -1.100 | -1.100 | -1.067 ± 0.058 |" in table


def test_every_jacquant_recipe_is_judged_and_a_run_without_one_says_so(tmp_path):
    rows = _rows() + [dict(r, method="jq-shape", metrics={"ppl": r["metrics"]["ppl"] + 5.0})
                      for r in _rows() if r["method"] == "ste"]
    vs = report.verdicts(report.summarise(rows))
    judged = {(v["method"], v["baseline"]): v for v in vs}
    assert set(judged) == {(m, b) for m in ("jacquant", "jq-shape") for b in ("ste", "stableqat")}
    assert np.isclose(judged["jq-shape", "ste"]["delta"], -5.0)
    assert judged["jq-shape", "ste"]["verdict"] == "loses to"
    md, _ = report.write(str(tmp_path), [r for r in _rows() if r["method"] == "stableqat"], {"bits": 2})
    assert "Not compared: this run does not hold a JacQuant method" in open(md).read()
