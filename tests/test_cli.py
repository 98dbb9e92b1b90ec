import re

from jacquant.cli import main


def test_quick_demo_prints_a_table_with_finite_losses(capsys):
    assert main(["run", "--quick"]) == 0
    out = capsys.readouterr().out
    rows = {m.group(1): float(m.group(2)) for m in re.finditer(r"^\| (.+?) \| ([0-9.]+) \|", out, re.M)}
    assert set(rows) == {"fp32", "RTN W2", "QAT W2 ste", "QAT W2 stableqat", "QAT W2 jacquant"}
    # byte-level cross entropy is finite and below a uniform guess over 256 bytes (ln 256 = 5.55)
    assert all(0 < v < 5.55 for v in rows.values())
    # two seeds of training would differ; QAT from the same start must beat doing nothing (RTN)
    assert rows["QAT W2 ste"] < rows["RTN W2"]
