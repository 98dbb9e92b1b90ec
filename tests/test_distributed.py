"""DDP and FSDP2 on two gloo processes equal one process over the same global batch; DCP resumes on 1.

The reference is the same training loop in this process (world size 1, the whole global batch).
The workers refresh B with the sampled Probe estimator seeded by their rank, so B differs across
ranks unless :func:`jacquant.qat.distributed.sync_jac` makes it rank 0's (the reference uses seed 0).
DDP runs with ``broadcast_buffers=False`` so that nothing but ``sync_jac`` keeps B equal.
"""
from __future__ import annotations

import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

from torch.distributed.tensor import Shard

import jacquant
from jacquant.qat import distributed as jd
from jacquant.qat import refresh as rf
from jacquant.testing.tiny_gpt import GPTConfig, TinyGPT, lm_loss

WORLD, STEPS, BATCH, SEQ, TOL = 2, 4, 8, 16, 1e-5
CFG = GPTConfig(vocab_size=128, dim=64, n_layer=2, n_head=4, max_seq=SEQ)


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = jacquant.transform(TinyGPT(CFG), bits=2, group=32, method="jacquant")
    return jd.prepare(model)


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    return [torch.randint(0, CFG.vocab_size, (BATCH, SEQ), generator=g) for _ in range(STEPS)]


def _train(model: nn.Module, rank: int, world: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """SGD with momentum on rank's slice of each global batch; B refreshed (Probe) at steps 0 and 2."""
    rf.attach(jd.unwrap(model), rf.RefreshConfig(estimator="probe", width=1.0, refresh_every=2, beta=0.0,
                                                 b_min=0.0, b_max=3.0, seed=rank))
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    per = BATCH // world
    for idx in _batches():
        jd.step(model)  # refresh due at t = 0, 2: before the step's forward
        local = idx[rank * per:(rank + 1) * per]
        lm_loss(model(local), local).backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _full_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    full = StateDictOptions(full_state_dict=True)
    msd = {k: v.detach().clone() for k, v in get_model_state_dict(model, options=full).items()}
    osd = get_optimizer_state_dict(model, opt, options=full)
    return {"model": msd, "momentum": {k: v["momentum_buffer"].clone() for k, v in osd["state"].items()}}


class Conv1DNet(nn.Module):
    """Weights stored [K, N] and used as ``x @ W`` (GPT-2's Conv1D): transposed sites."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(64, 96) * 0.2)  # [K, N]
        self.w2 = nn.Parameter(torch.randn(96, 24) * 0.2)  # K = 96 on 2 ranks: rows 48|48 would cut group 32..63

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ self.w1) @ self.w2


def _conv1d_model() -> nn.Module:
    torch.manual_seed(1)
    return jacquant.transform(Conv1DNet(), bits=2, group=32, method="ste")


def _train_conv1d(model: nn.Module, rank: int, world: int) -> dict:
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(8, 64, generator=g), torch.randn(8, 24, generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    per = 8 // world
    for _ in range(3):
        xs, ys = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
        ((model(xs) - ys) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
    full = StateDictOptions(full_state_dict=True)
    return {k: v.detach().clone() for k, v in get_model_state_dict(model, options=full).items()}


def _worker(rank: int, port: int, out: str) -> None:
    """One rank: DDP, FSDP2 and the Conv1D sharding, results saved by rank 0; then a hard exit.

    The ranks run the plain torch fake-quant path (``JACQUANT_FUSED_CPU=0``): no inductor compile, no compile
    worker pool and no OpenMP pool in the children, so the only threads a rank owns are gloo's. After the
    process group is destroyed and every file is written, ``os._exit(0)`` skips interpreter finalization:
    there, C++ threads still joinable (gloo's, the TCP store's) are destroyed and abort the rank with
    "terminate called without an active exception" (seen in both ranks of fresh-clone CI runs, pytorch#190489),
    which fails the fixture although every result is on disk.
    """
    os.environ["JACQUANT_FUSED_CPU"] = "0"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        for mode in ("ddp", "fsdp"):
            model = _model()
            if mode == "ddp":
                model = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
            else:
                jd.shard(model)
            model, opt = _train(model, rank, WORLD)
            state = _full_state(model, opt)
            jacs = torch.cat([b.reshape(-1) for b in jd._jac_buffers(model)])
            gathered = [torch.empty_like(jacs) for _ in range(WORLD)]
            dist.all_gather(gathered, jacs)
            spread = jd.jac_max_spread(model)
            jd.save(f"{out}/ckpt_{mode}", model, opt, step=STEPS)
            if rank == 0:
                torch.save({**state, "jac_per_rank": gathered, "spread": spread}, f"{out}/{mode}.pt")
        default = jd.prepare(_conv1d_model())
        fully_shard(default)  # FSDP2's default Shard(0) cuts [K, N] weights along K
        try:
            jd.check_shards(default)
            refused = ""
        except ValueError as err:
            refused = str(err)
        conv = jd.shard(_conv1d_model())
        placements = [(tuple(s.weight.placements), tuple(s.weight.to_local().shape)) for s in jacquant.sites(conv)]
        state = _train_conv1d(conv, rank, WORLD)
        if rank == 0:
            torch.save({"model": state, "refused": refused, "placements": placements}, f"{out}/conv1d.pt")
        dist.barrier()  # rank 0's files are written before either rank leaves
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # reached only without an exception (which mp.spawn reports with its traceback)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run both two-rank trainings once; yields (output dir, single-process reference state)."""
    out = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    ref_model, ref_opt = _train(_model(), rank=0, world=1)
    return out, _full_state(ref_model, ref_opt)


def test_fsdp_transposed_weights_shard_along_n(runs):
    """Conv1D-style [K, N] weights: refused under FSDP2's default Shard(0), Shard(1) with shard()."""
    out, _ = runs
    got = torch.load(out / "conv1d.pt")
    assert got["refused"].startswith("layer `w1`: weight [K, N] is sharded") and "shard_placement_fn" in got["refused"]
    assert got["placements"] == [((Shard(1),), (64, 48)), ((Shard(1),), (96, 12))]
    want = _train_conv1d(_conv1d_model(), rank=0, world=1)
    assert any(not torch.equal(want[k], v) for k, v in _conv1d_model().state_dict().items())
    _assert_close(got["model"], want, "fsdp conv1d state")


def _assert_close(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys(), f"{what}: keys differ: {set(got) ^ set(want)}"
    for k in want:
        a, b = got[k].to(torch.float64), want[k].to(torch.float64)
        assert a.shape == b.shape, f"{what} {k}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        err = (a - b).abs().max().item() if a.numel() else 0.0
        assert err <= TOL, f"{what} {k}: max |diff| {err:.3g} > {TOL}"


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_equal_one_process(runs, mode):
    out, ref = runs
    got = torch.load(out / f"{mode}.pt")
    params = [k for k in ref["model"] if k.endswith(("weight", "bias", "scale"))]
    assert any(k.endswith("_quantizer.scale") for k in params)
    init = _model().state_dict()
    changed = max((got["model"][k] - init[k]).abs().max().item() for k in params)
    assert changed > 1e-3, "training did not move the parameters; the comparison would be empty"
    _assert_close(got["model"], ref["model"], f"{mode} state")  # W, bias, s, z, B, refresh clock
    _assert_close(got["momentum"], ref["momentum"], f"{mode} momentum")


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_jac_synced_across_ranks(runs, mode):
    out, ref = runs
    got = torch.load(out / f"{mode}.pt")
    per_rank = got["jac_per_rank"]
    assert torch.equal(per_rank[0], per_rank[1]) and got["spread"] == 0.0
    ref_jac = torch.cat([v.reshape(-1) for k, v in ref["model"].items() if k.endswith(".jac")])
    assert (ref_jac - 1).abs().max() > 0.05, "B was never refreshed away from 1; the sync test would be empty"
    torch.testing.assert_close(per_rank[0], ref_jac, rtol=0, atol=TOL)


def test_rank_seeded_probe_differs_without_sync():
    """The premise of the sync test: the two ranks' Probe draws give different B."""
    b = []
    for seed in range(WORLD):
        m = _model()
        rf.attach(m, rf.RefreshConfig(estimator="probe", width=1.0, beta=0.0, b_min=0.0, b_max=3.0, seed=seed))
        rf.refresh(m)
        b.append(torch.cat([x.reshape(-1) for x in jd._jac_buffers(m)]))
    assert (b[0] - b[1]).abs().max() > 0.05


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_dcp_saved_on_two_ranks_loads_on_one(runs, mode):
    out, _ = runs
    saved = torch.load(out / f"{mode}.pt")
    model = _model(seed=7)  # different init: every value must come from the checkpoint
    rf.attach(model, rf.RefreshConfig(seed=99))
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    model(torch.zeros(1, SEQ, dtype=torch.long)).sum().backward()
    opt.step()  # creates momentum buffers to be overwritten
    step = jd.load(str(out / f"ckpt_{mode}"), model, opt)
    assert step == STEPS
    loaded = _full_state(model, opt)
    for k, v in saved["model"].items():
        assert torch.equal(loaded["model"][k], v), f"{k} differs after DCP load"
    assert loaded["model"].keys() == saved["model"].keys()
    for k, v in saved["momentum"].items():
        assert torch.equal(loaded["momentum"][k], v), f"momentum of {k} differs after DCP load"


def test_prepare_follows_swapped_parameters():
    """transform binds the rewritten forward to its owner, so it reads the owner's current W (what
    FSDP2 swaps in); prepare/check_prepared accept it and change nothing."""
    torch.manual_seed(0)
    raw = jacquant.transform(TinyGPT(CFG), bits=2, group=32)
    jd.check_prepared(raw)
    x = torch.randint(0, CFG.vocab_size, (2, SEQ))
    before = raw(x)
    jd.prepare(raw)
    jd.check_prepared(raw)
    assert torch.equal(raw(x), before)  # same function
    lin = raw.blocks[0].fc
    new_w = nn.Parameter(torch.randn_like(lin.weight) * 0.02)
    lin.weight = new_w  # a parameter swap, as FSDP2's unshard does
    y = lin(torch.ones(3, CFG.dim))
    q = lin.weight_quantizer
    want = torch.ones(3, CFG.dim) @ jacquant.primitives.grid.fake_quantize(new_w, q.scale, q.zero_point, 2, 32).t() + lin.bias
    torch.testing.assert_close(y, want)
