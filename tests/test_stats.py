import json

import numpy as np
import torch
import torch.nn as nn

import jacquant
from jacquant.qat import refresh
from jacquant.qat.plot import plot
from jacquant.qat.quantizer import sites
from jacquant.qat.stats import StatsLogger, aggregate, stats


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 8, bias=False))
    jacquant.transform(model, bits=2, group=16, method="jacquant", init="minmax")
    return model


def _v(model):
    q = model[0].weight_quantizer
    w = model[0].weight.detach().reshape(8, 2, 16).double()
    return (w / q.scale.detach().double().unsqueeze(-1) + q.zero_point.double().unsqueeze(-1)).numpy()


def test_stats_numbers_against_numpy_reference():
    model = _model()
    q = model[0].weight_quantizer
    with torch.no_grad():
        q.scale.copy_((q.scale * 0.7).half().float())  # some weights clamp; an fp16 value, as the forward uses
        q.jac.copy_(torch.linspace(0.2, 1.8, 16).reshape(8, 2))
    v = _v(model)
    d = stats(model)["0"]
    assert d["flip_rate"] is None  # first call: nothing to compare with
    np.testing.assert_allclose(d["clamped"], ((v < 0) | (v > 3)).mean(), rtol=1e-6)
    np.testing.assert_allclose(d["thr_dist"], np.abs(v[..., None] - np.array([0.5, 1.5, 2.5])).min(-1).mean(), rtol=1e-5)
    np.testing.assert_allclose([d["b_mean"], d["b_min"], d["b_max"]], [1.0, 0.2, 1.8], rtol=1e-6)


def test_flip_rate_counts_codes_changed_since_last_call():
    model = _model()
    stats(model)
    q = model[0].weight_quantizer
    codes0 = q.codes(model[0].weight)
    with torch.no_grad():  # move 5 weights by one full scale step inward
        for i in range(5):
            n, k = i, 3 * i
            c = int(codes0[n, k])
            step = 1 if c < 3 else -1
            model[0].weight[n, k] += step * q.scale[n, k // 16]
    flips = (q.codes(model[0].weight) != codes0).sum().item()
    assert flips == 5
    assert stats(model)["0"]["flip_rate"] == 5 / 256
    assert stats(model)["0"]["flip_rate"] == 0.0
    assert "prev_codes" not in model.state_dict() and "0.weight_quantizer.prev_codes" not in model.state_dict()


def test_logger_writes_jsonl_and_plot_draws_png(tmp_path):
    model = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8))
    jacquant.transform(model, bits=2, group=16, method="jacquant")
    log = StatsLogger(tmp_path / "sub" / "qat.jsonl")
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = torch.randn(64, 32), torch.randn(64, 8)
    losses = []
    for t in range(4):
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        refresh.step(model)
        log.log(model, t, loss.item())
        losses.append(loss.item())
    rec = [json.loads(line) for line in open(tmp_path / "sub" / "qat.jsonl")]
    assert [r["step"] for r in rec] == [0, 1, 2, 3] and [r["loss"] for r in rec] == losses
    assert set(rec[0]["sites"]) == {s.name for s in sites(model)}
    assert rec[0]["all"]["flip_rate"] is None and rec[1]["all"]["flip_rate"] >= 0
    n = {k: v["numel"] for k, v in rec[2]["sites"].items()}
    expect = sum(rec[2]["sites"][k]["clamped"] * n[k] for k in n) / sum(n.values())
    np.testing.assert_allclose(rec[2]["all"]["clamped"], expect)
    assert aggregate(rec[2]["sites"])["b_min"] == min(v["b_min"] for v in rec[2]["sites"].values())
    out = plot(tmp_path / "sub" / "qat.jsonl", tmp_path / "qat.png")
    import matplotlib.image as mpimg
    img = mpimg.imread(out)
    assert img.shape[:2] == (800, 700)


def test_codes_moved_counts_the_codes_that_changed_across_sites():
    """jacquant.qat.stats.model_codes / codes_moved against a hand count: nudging 3 weights of one site across a
    threshold (by one bin) and none of the other changes exactly 3 of all codes."""
    from jacquant.qat.stats import codes_moved, model_codes

    torch.manual_seed(0)
    model = jacquant.transform(nn.Sequential(nn.Linear(64, 16), nn.Linear(16, 8)), bits=2, group=16)
    before = model_codes(model)
    assert [c.shape for c in before] == [torch.Size([16, 64]), torch.Size([8, 16])]
    st = next(iter(sites(model)))
    q = st.quantizer
    with torch.no_grad():  # move w[0, :3] to the middle of the bin next to their code (1 <-> 2 stays inside 0..3)
        s = q.scale[0, 0]
        c = before[0][0, :3].float()
        target = torch.where(c < 2, c + 1, c - 1)
        st.weight[0, :3] = (target - q.zero_point[0, 0].float()) * s
    assert codes_moved(before, model_codes(model)) == 3 / (16 * 64 + 8 * 16)
    assert codes_moved(before, before) == 0.0
