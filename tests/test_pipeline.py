"""The pipeline's rules around the phases: a phase that makes the tuning score worse is undone exactly, a run
given in wall seconds follows its schedule on the clock and stops in time, a wall-time budget is split between
the phases, the end-to-end learning rate follows the grid's step, and the optimizer's two parameter kinds get
their own learning rates."""
import copy
import math

import pytest
import torch
from conftest import tiny_llama

import jacquant
from jacquant.app.blockwise import BlockwiseConfig
from jacquant.app.pipeline import Budget, Pipeline, e2e_lr, keep_better, timed_budget
from jacquant.app.recipes import RECIPES
from jacquant.app.train import TimedSchedule, make_optimizer, train
from jacquant.qat.quantizer import sites


def _model():
    torch.manual_seed(0)
    return jacquant.transform(tiny_llama().eval(), bits=2, group=32, method="ste")


def test_a_phase_that_worsens_the_score_is_undone_exactly_and_a_better_one_kept():
    model = _model()
    before = copy.deepcopy(model.state_dict())
    score = lambda m: float(sum(p.detach().abs().sum() for p in m.parameters()))  # noqa: E731

    def grow():
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.5)
        return "grew"

    out, rec = keep_better(model, grow, score)
    assert out == "grew" and not rec["kept"] and rec["after"] > rec["before"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k

    def shrink():
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.5)

    _, rec = keep_better(model, shrink, score)
    assert rec["kept"] and rec["after"] == pytest.approx(0.5 * rec["before"], rel=1e-5)

    calls = []  # a score the caller already has is not measured again: the phase is scored after it only
    _, rec = keep_better(model, shrink, lambda m: calls.append(m) or score(m), before=rec["after"])
    assert len(calls) == 1 and rec["kept"] and rec["after"] == pytest.approx(0.5 * rec["before"], rel=1e-5)


def test_a_timed_schedule_warms_up_decays_by_cosine_and_ends_on_the_clock(monkeypatch):
    clock = {"t": 0.0}
    monkeypatch.setattr(TimedSchedule, "clock", staticmethod(lambda: clock["t"]))
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    sched = TimedSchedule(opt, seconds=100.0)
    for t, want in ((0.0, 0.0), (2.5, 1.0), (5.0, 2.0), (52.5, 1.0), (99.0, 2.0 * 0.5 * (1 + math.cos(math.pi * 94 / 95)))):
        clock["t"] = t
        assert sched.set_lr()
        assert opt.param_groups[0]["lr"] == pytest.approx(want, abs=1e-9), t
    clock["t"] = 100.0
    assert not sched.set_lr()


def test_train_for_a_wall_time_stops_when_it_is_spent(monkeypatch):
    model = _model()
    clock = {"t": 0.0}

    def tick():  # each reading advances the clock by 1 s: 10 s of budget is 9 steps on any machine
        clock["t"] += 1.0
        return clock["t"]

    monkeypatch.setattr(TimedSchedule, "clock", staticmethod(tick))
    x = torch.randint(0, 96, (2, 9))
    loss = lambda m, b: m(input_ids=b[:, :-1]).logits.float().pow(2).mean()  # noqa: E731
    curve = train(model, RECIPES["ste"], (x for _ in range(1000)), loss, 1000, 1e-3, seconds=10.0)
    assert len(curve) == 9  # the clock read at the start, then once before each step: steps at t = 2..10 s


def test_a_wall_time_budget_is_split_between_the_phases():
    budget = Budget(steps=0, pipeline=Pipeline(block=BlockwiseConfig(steps=200)))
    split = timed_budget(budget, 600.0, block_share=0.25)
    assert split.pipeline.block.seconds == pytest.approx(150.0) and split.seconds == pytest.approx(450.0)
    assert timed_budget(Budget(), 600.0).pipeline.block.active  # under a wall time the phase runs by default
    no_block = timed_budget(Budget(), 600.0, block_share=0.0)  # --block-steps 0: all of it end to end
    assert no_block.pipeline.block.seconds == 0.0 and no_block.seconds == 600.0
    assert not no_block.pipeline.block.active
    with pytest.raises(ValueError, match="larger --budget"):
        timed_budget(budget, -5.0)


def test_the_end_to_end_lr_halves_with_each_bit():
    assert [e2e_lr(b) for b in (2, 3, 4)] == [1e-3, 5e-4, 2.5e-4]


def test_scales_get_their_own_learning_rate():
    model = _model()
    opt = make_optimizer(model, RECIPES["ste"], 1e-3, scale_lr=1e-4)
    scales = {id(s.quantizer.scale) for s in sites(model)}
    lrs = {g["lr"]: {id(p) for p in g["params"]} for g in opt.param_groups}
    assert lrs[1e-4] == scales and not (lrs[1e-3] & scales)
    assert sum(len(g["params"]) for g in opt.param_groups) == sum(p.requires_grad for p in model.parameters())
