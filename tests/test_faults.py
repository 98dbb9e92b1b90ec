"""jacquant.guard / faults: non-finite tensors are found and named; a skipped step changes nothing."""
import copy
import math
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import jacquant
from jacquant.qat.guard import NonFiniteWarning, first_nonfinite, nonfinite_flags, step_tensors
from jacquant.qat.optim import MarsAdamW, scale_updates_by_b
from jacquant.primitives.grid import SCALE_FLOOR
from jacquant.qat.quantizer import sites


def _model(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, 64), nn.LayerNorm(64), nn.ReLU(), nn.Linear(64, 8))
    return jacquant.transform(model, bits=2, group=16, method="jacquant")


def _batch(t, bad=False):
    g = torch.Generator().manual_seed(t)
    x, y = torch.randn(16, 32, generator=g), torch.randn(16, 8, generator=g)
    if bad:
        x[3, 5] = float("nan")  # one poisoned input: every gradient it reaches turns NaN
    return x, y


def _loss(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def _snapshot(model, opt):
    return copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())


def _assert_same(a, b):
    """Bit-for-bit equality of nested state dicts (tensors, numbers, lists)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b


# ------------------------------------------------------------------------------------ the check
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["weight", "scale", "B", "weight.grad", "scale.grad", "grad"])
def test_first_nonfinite_names_the_site_and_tensor(where, value):
    model = _model()
    _loss(model, _batch(0)).backward()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    second = list(sites(model))[1]
    target = {"weight": second.weight, "scale": second.quantizer.scale, "B": second.quantizer.jac,
              "weight.grad": second.weight.grad, "scale.grad": second.quantizer.scale.grad,
              "grad": model[1].weight.grad}[where]
    with torch.no_grad():
        target.view(-1)[[2, 7]] = value
    named = step_tensors(model, opt)
    # independent reference: a per-tensor isfinite scan, in order
    ref = next((s, t, int((~torch.isfinite(x)).sum())) for s, t, x in named if not torch.isfinite(x).all())
    fault = first_nonfinite(named)
    assert (fault.site, fault.tensor, fault.count) == ref
    assert (fault.site, fault.tensor) == (("1.weight", "grad") if where == "grad" else (second.name, where))
    assert fault.count == 2
    with pytest.raises(jacquant.NonFiniteError, match=rf"`{fault.site}`: {fault.tensor} has 2 non-finite"):
        jacquant.check_finite(model, opt)


def test_finite_model_passes_and_huge_finite_values_are_not_flagged():
    model = _model()
    _loss(model, _batch(0)).backward()
    assert first_nonfinite(step_tensors(model, torch.optim.SGD(model.parameters(), lr=0.1))) is None
    # a 2-norm would overflow on these; the ∞-norm does not
    big = [torch.full((4,), 3e38), torch.full((3,), 6e4, dtype=torch.float16), torch.zeros(0),
           torch.tensor([1.0, float("nan")], dtype=torch.bfloat16)]
    assert nonfinite_flags(big).tolist() == [False, False, False, True]


# ------------------------------------------------------------------------------------ the guard
def _run(opt_factory, bad_at=None, guarded=True, update_scaling=False, steps=5):
    """Train ``steps`` good batches; with ``bad_at`` a poisoned batch is inserted before good batch ``bad_at``."""
    model = _model()
    jacquant.qat.refresh.attach(model, jacquant.RefreshConfig(refresh_every=2))
    inner = opt_factory(model.parameters())
    opt = jacquant.guard(inner, model, on_nonfinite="skip_step") if guarded else inner
    if update_scaling:
        scale_updates_by_b(opt, model)
    batches = [_batch(t) for t in range(steps)]
    if bad_at is not None:
        batches.insert(bad_at, _batch(99, bad=True))
    taken = []
    for b in batches:
        _loss(model, b).backward()
        stepped = opt.step() if guarded else (opt.step() or True)
        if stepped:
            jacquant.step(model)
        taken.append(bool(stepped))
        opt.zero_grad()
    return model, opt, taken


OPTIMIZERS = {
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2),
    "adamw_foreach_off": lambda p: torch.optim.AdamW(p, lr=1e-2, foreach=False),
    "mars": lambda p: MarsAdamW(p, lr=1e-2),
}


@pytest.mark.parametrize("update_scaling", [False, True])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_skipped_step_leaves_training_exactly_as_without_the_bad_batch(name, update_scaling):
    ref, ref_opt, _ = _run(OPTIMIZERS[name], guarded=False, update_scaling=update_scaling)
    with pytest.warns(NonFiniteWarning, match=r"skipped step 2: `0`: weight\.grad has \d+ non-finite"):
        model, opt, taken = _run(OPTIMIZERS[name], bad_at=2, update_scaling=update_scaling)
    assert taken == [True, True, False, True, True, True]
    assert (opt.steps, opt.skipped) == (5, 1) and opt.last_fault.site == "0"
    assert int(model.jacquant_step) == 5  # the refresh clock counts taken steps only
    _assert_same(model.state_dict(), ref.state_dict())
    _assert_same(opt.state_dict(), ref_opt.state_dict())


def test_skipped_step_changes_nothing_and_drops_the_gradients():
    model = _model()
    opt = jacquant.guard(torch.optim.AdamW(model.parameters(), lr=1e-2), model)
    for t in range(2):
        _loss(model, _batch(t)).backward()
        assert opt.step()
        opt.zero_grad()
    before = _snapshot(model, opt)
    _loss(model, _batch(5, bad=True)).backward()
    with pytest.warns(NonFiniteWarning):
        assert opt.step() is False
    assert all(p.grad is None for p in model.parameters())
    _assert_same(_snapshot(model, opt), before)
    assert all(float(st["step"]) == 2 for st in opt.state.values())  # Adam's step count did not advance


def test_raise_names_site_and_tensor_and_changes_nothing():
    model = _model()
    opt = jacquant.guard(torch.optim.SGD(model.parameters(), lr=0.1), model, on_nonfinite="raise")
    with torch.no_grad():
        list(sites(model))[1].quantizer.jac[0, 0] = float("inf")
    _loss(model, _batch(0)).backward()
    before = _snapshot(model, opt)
    with pytest.raises(jacquant.NonFiniteError, match=r"step 0: `3`: B has 1 non-finite values") as err:
        opt.step()
    assert isinstance(err.value, FloatingPointError) and (err.value.site, err.value.tensor) == ("3", "B")
    _assert_same(_snapshot(model, opt), before)
    assert all(p.grad is not None for p in model.parameters())  # kept for inspection


def test_non_quantized_parameter_is_named():
    model = _model()
    opt = jacquant.guard(torch.optim.SGD(model.parameters(), lr=0.1), model, on_nonfinite="raise")
    _loss(model, _batch(0)).backward()
    with torch.no_grad():
        model[1].bias.grad[4] = float("nan")
    with pytest.raises(jacquant.NonFiniteError, match=r"`1\.bias`: grad has 1 non-finite"):
        opt.step()


def test_too_many_skips_in_a_row_raise():
    model = _model()
    opt = jacquant.guard(torch.optim.SGD(model.parameters(), lr=0.1), model, max_consecutive_skips=3)
    with torch.no_grad():
        list(sites(model))[0].weight[0, 0] = float("nan")  # corrupt state: skipping cannot recover
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonFiniteWarning)
        for _ in range(2):
            _loss(model, _batch(0)).backward()
            assert not opt.step()
        _loss(model, _batch(0)).backward()
        with pytest.raises(jacquant.NonFiniteError, match=r"3 steps in a row skipped.*resume from a checkpoint"):
            opt.step()


def test_collapsed_scale_is_clamped_to_the_floor_after_the_step():
    model = _model()
    opt = jacquant.guard(torch.optim.SGD(model.parameters(), lr=1.0), model)
    q = list(sites(model))[0].quantizer
    _loss(model, _batch(0)).backward()
    s0 = q.scale.detach().clone()
    with torch.no_grad():
        q.scale.grad.zero_()
        q.scale.grad[0, 0] = s0[0, 0] + 1.0  # s - lr·g = -1: negative
        q.scale.grad[1, 1] = s0[1, 1]        # s - lr·g = 0: collapsed
    assert opt.step()
    expected = s0 - q.scale.grad
    expected[0, 0] = expected[1, 1] = SCALE_FLOOR
    assert torch.equal(q.scale.detach(), expected)


def test_forward_already_uses_the_floor_for_zero_and_negative_scales():
    model = _model()
    s = list(sites(model))[0]
    w = s.weight.detach()
    with torch.no_grad():
        s.quantizer.scale[0, 0] = -0.5
        s.quantizer.scale[2, 1] = 0.0
        neg = s.quantizer.quantized_weight(w)
        s.quantizer.scale[0, 0] = SCALE_FLOOR
        s.quantizer.scale[2, 1] = SCALE_FLOOR
        floor = s.quantizer.quantized_weight(w)
    assert torch.isfinite(neg).all() and torch.equal(neg, floor)


def test_bad_arguments():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="on_nonfinite='ignore'"):
        jacquant.guard(opt, model, on_nonfinite="ignore")
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        jacquant.guard(object(), model)
    with pytest.raises(ValueError, match="max_consecutive_skips"):
        jacquant.guard(opt, model, max_consecutive_skips=0)
    with pytest.raises(ValueError, match="no quantized site"):
        jacquant.guard(opt, nn.Linear(4, 4))


def test_guard_forwards_the_optimizer_interface():
    model = _model()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt = jacquant.guard(inner, model)
    assert opt.param_groups is inner.param_groups and opt.state is inner.state
    sched = torch.optim.lr_scheduler.StepLR(opt.optimizer, step_size=1, gamma=0.5)
    _loss(model, _batch(0)).backward()
    assert opt.step()
    sched.step()
    assert math.isclose(opt.param_groups[0]["lr"], 5e-4)
    assert copy.deepcopy(opt).steps == 1


# ------------------------------------------------------------------------------------ two ranks
def _worker(rank, world, port, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = _model()
        opt = jacquant.guard(torch.optim.SGD(model.parameters(), lr=0.1), model)
        taken = []
        for t in range(3):
            _loss(model, _batch(t, bad=(t == 1 and rank == 1))).backward()  # rank 1 alone sees a bad batch
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NonFiniteWarning)
                taken.append(opt.step())
            opt.zero_grad()
        torch.save((taken, opt.last_fault.site if opt.last_fault else None), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ranks_agree_to_skip_when_one_sees_a_fault(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    assert torch.load(tmp_path / "rank0.pt") == ([True, False, True], "another rank")
    assert torch.load(tmp_path / "rank1.pt") == ([True, False, True], "0")
