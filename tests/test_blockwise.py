"""The block-wise phase on a tiny Llama: the loss it trains is the MSE to the fp model's own hidden states
(HF's output_hidden_states, an independent path), training lowers the whole model's error to fp, the rounding
search keeps every weight within half a bin of its start, the best state is kept (no block ends worse than it
started on the calibration windows), and a run stopped after a block resumes to the same result bit for bit."""
import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_llama

import jacquant
from jacquant.app import blockwise
from jacquant.app.blockwise import BlockwiseConfig, train_blocks
from jacquant.app.recipes import RECIPES
from jacquant.qat.quantizer import sites


def _setup(seed=0, method="ste"):
    torch.manual_seed(seed)
    fp = tiny_llama().eval()
    q = jacquant.transform(copy.deepcopy(fp), bits=2, group=32, method=method)
    x = torch.randint(0, 96, (8, 16), generator=torch.Generator().manual_seed(1))
    return fp, q, x


def _logit_error(model, fp, x):
    with torch.no_grad():
        return float((model(input_ids=x).logits - fp(input_ids=x).logits).pow(2).mean())


def _hidden(fp, x):
    with torch.no_grad():
        hs = fp(input_ids=x, output_hidden_states=True).hidden_states
        pos = torch.arange(x.shape[1]).unsqueeze(0)
        kw = dict(position_embeddings=fp.model.rotary_emb(hs[0], position_ids=pos), position_ids=pos,
                  attention_mask=None)
    return hs, kw


@pytest.mark.parametrize("inputs", ["quantized", "fp"])
def test_block_loss_is_the_mse_to_fp_hidden_states_and_training_lowers_the_model_error(inputs):
    fp, q, x = _setup()
    start = copy.deepcopy(q)
    cfg = BlockwiseConfig(steps=12, lr=0.05, batch=4, inputs=inputs)
    idx0, idx1 = (next(blockwise._index_batches(len(x), cfg.batch, i)) for i in (0, 1))  # seed·1000 + block
    hs_fp, kw = _hidden(fp, x)
    out = train_blocks(q, fp, RECIPES["ste"], x, cfg, seed=0, progress=False)
    curves = out["curves"]
    assert len(curves) == 2 and all(len(c) == cfg.steps for c in curves)
    # block 0's first loss: the embeddings through the start's block 0 against fp's hidden state after block 0;
    # block 1's: its input is block 0's output (the trained quantized block, or fp's), its target fp's block 1 on fp's
    with torch.no_grad():
        want0 = F.mse_loss(copy.deepcopy(start.model.layers[0])(hs_fp[0][idx0], **kw), hs_fp[1][idx0])
        inp = q.model.layers[0](hs_fp[0], **kw) if inputs == "quantized" else hs_fp[1]
        target = fp.model.layers[1](hs_fp[1], **kw)
        want1 = F.mse_loss(copy.deepcopy(start.model.layers[1])(inp[idx1], **kw), target[idx1])
        # the kept state's loss over all 8 windows, recomputed here
        kept1 = F.mse_loss(q.model.layers[1](inp, **kw), target)
        start1 = F.mse_loss(start.model.layers[1](inp, **kw), target)
    assert curves[0][0] == pytest.approx(float(want0), rel=1e-4)
    assert curves[1][0] == pytest.approx(float(want1), rel=1e-4)
    assert out["blocks"][1]["best_loss"] == pytest.approx(float(kept1), rel=1e-4)
    assert out["blocks"][1]["start_loss"] == pytest.approx(float(start1), rel=1e-4)
    assert _logit_error(q, fp, x) < 0.8 * _logit_error(start, fp, x)


@pytest.mark.parametrize("method", ["ste", "jacquant"])
def test_the_rounding_search_keeps_each_weight_within_half_a_bin_of_its_start(method):
    fp, q, x = _setup(method=method)
    start = {s.name: (s.weight.detach().clone(), s.quantizer.scale.detach().clone(), s.quantizer.codes(s.weight))
             for s in sites(q)}
    norms = {k: v.clone() for k, v in q.state_dict().items() if "norm" in k}
    train_blocks(q, fp, RECIPES[method], x, BlockwiseConfig(steps=30, lr=0.2, batch=4), progress=False)
    moved = 0
    for s in sites(q):
        w0, s0, c0 = start[s.name]
        bin_ = s0.repeat_interleave(s.quantizer.group, dim=1)
        assert float(((s.weight.detach() - w0).abs() / bin_).max()) <= 0.5 + 1e-6, s.name
        moved += int((s.weight != w0).sum())
    assert moved > 0
    for k, v in norms.items():  # "rounding" trains weights and scales only
        assert torch.equal(q.state_dict()[k], v), k


def test_under_sign_descent_stableqat_is_ste_step_for_step_and_jacquant_is_not():
    """StableQAT's surrogate scales each element's gradient by a positive factor, which sign descent does not see;
    JacQuant's B scales each group's step, which it does."""
    runs = {}
    for method in ("ste", "stableqat", "jacquant"):
        fp, q, x = _setup(method=method)
        train_blocks(q, fp, RECIPES[method], x, BlockwiseConfig(steps=10, lr=0.1, batch=4), progress=False)
        runs[method] = {s.name: s.weight.detach().clone() for s in sites(q)}
    assert all(torch.equal(runs["ste"][k], runs["stableqat"][k]) for k in runs["ste"])
    assert not all(torch.equal(runs["ste"][k], runs["jacquant"][k]) for k in runs["ste"])


def test_the_best_state_is_kept_so_no_block_ends_worse_than_it_started():
    fp, q, x = _setup()
    out = train_blocks(q, fp, RECIPES["ste"], x, BlockwiseConfig(steps=8, lr=0.5, scale_lr=5.0, batch=4),
                       progress=False)  # scales moved by 5× their size per step: the start must be what is kept
    for b in out["blocks"]:
        assert b["best_loss"] <= b["start_loss"]
    assert out["blocks"][0]["best_loss"] == out["blocks"][0]["start_loss"]


def test_sign_sgd_moves_each_element_by_lr_times_its_unit_against_the_gradient_sign():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0, 0.5]))
    p.grad = torch.tensor([0.3, -1e-6, 0.0, -5.0])
    units = torch.tensor([1.0, 2.0, 3.0, 0.5])
    jacquant.qat.optim.SignSGD([{"params": [p], "units": [units]}], lr=0.1).step()
    assert torch.allclose(p.detach(), torch.tensor([1.0 - 0.1, -2.0 + 0.2, 3.0, 0.5 + 0.05]))


def test_a_time_budget_splits_over_the_blocks_and_ends_in_time(monkeypatch):
    fp, q, x = _setup()
    clock = {"t": 0.0}

    def tick():  # a clock that advances 1 ms per reading: the run's length no longer depends on the machine
        clock["t"] += 1e-3
        return clock["t"]

    monkeypatch.setattr(blockwise.time, "perf_counter", tick)
    out = train_blocks(q, fp, RECIPES["ste"], x, BlockwiseConfig(seconds=0.2, lr=0.05, batch=4), progress=False)
    assert all(b["steps"] > 10 for b in out["blocks"])
    assert out["blocks"][0]["seconds"] == pytest.approx(0.1, abs=0.02)  # half the time each
    assert out["seconds"] == pytest.approx(0.2, abs=0.03)


def test_a_block_left_no_time_keeps_its_start_and_the_forwards_count_against_the_budget(monkeypatch):
    fp, q, x = _setup()
    start = copy.deepcopy(q)
    clock = {"t": 0.0}

    def tick():
        clock["t"] += 1e-3
        return clock["t"]

    real = blockwise._forward

    def slow_forward(*args, **kwargs):  # each forward that fills a cache costs 50 ms of the budget
        clock["t"] += 0.05
        return real(*args, **kwargs)

    monkeypatch.setattr(blockwise.time, "perf_counter", tick)
    monkeypatch.setattr(blockwise, "_forward", slow_forward)
    out = train_blocks(q, fp, RECIPES["ste"], x, BlockwiseConfig(seconds=0.2, lr=0.05, batch=4), progress=False)
    # block 0 gets half of what is left after its target forward, then its own forward: nothing is left for block 1
    assert out["blocks"][0]["steps"] > 10 and out["blocks"][1]["steps"] == 0
    for k, v in start.model.layers[1].state_dict().items():
        assert torch.equal(q.model.layers[1].state_dict()[k], v), k


def test_a_run_stopped_after_a_block_resumes_bit_for_bit(tmp_path, monkeypatch):
    fp, q, x = _setup()
    whole = copy.deepcopy(q)
    cfg = BlockwiseConfig(steps=6, lr=0.05, batch=4)
    train_blocks(whole, fp, RECIPES["jacquant"], x, cfg, seed=0, progress=False)
    calls = {"n": 0}
    real = blockwise.train_block

    def stop_at_block_1(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(blockwise, "train_block", stop_at_block_1)
    with pytest.raises(KeyboardInterrupt):
        train_blocks(q, fp, RECIPES["jacquant"], x, cfg, seed=0, checkpoint_dir=str(tmp_path), progress=False)
    monkeypatch.setattr(blockwise, "train_block", real)
    resumed = jacquant.transform(copy.deepcopy(fp), bits=2, group=32, method="jacquant")  # a fresh process's model
    train_blocks(resumed, fp, RECIPES["jacquant"], x, cfg, seed=0, checkpoint_dir=str(tmp_path), progress=False)
    for (k, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def test_bad_settings_are_clear_errors():
    fp, q, x = _setup()
    with pytest.raises(ValueError, match="inputs='teacher' is not one of"):
        BlockwiseConfig(inputs="teacher")
    with pytest.raises(ValueError, match="more than the 8 calibration windows"):
        train_blocks(q, fp, RECIPES["ste"], x, BlockwiseConfig(steps=1, batch=9), progress=False)
