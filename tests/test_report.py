"""report: mean ± std over seeds and the verdict, against numpy."""
import json
import math

import numpy as np

from jacquant.app import report


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
    data = json.load(open(js))
    assert len(data["rows"]) == 9 and data["verdicts"][0]["verdict"] == "beats"
    assert all(math.isfinite(v[k]) for e in data["summary"]["lm"].values() for v in e.values()
               if isinstance(v, dict) for k in ("mean", "std"))
