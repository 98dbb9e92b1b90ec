"""QAT of a small TinyGPT with DDP or FSDP2 under torchrun (gloo on CPU, nccl on CUDA).

    torchrun --nproc_per_node 2 examples/train_distributed.py --mode fsdp --steps 200
    torchrun --nproc_per_node 2 examples/train_distributed.py --mode ddp --ckpt /tmp/run --steps 100
    torchrun --nproc_per_node 1 examples/train_distributed.py --ckpt /tmp/run --resume --steps 200

Every rank builds the same model (same seed), takes its slice of each global batch, refreshes B
with ``jacquant.qat.distributed.step`` (B equal on every rank) and saves DCP checkpoints that resume
on any world size. The corpus is this file's own bytes (vocabulary 256).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

import jacquant
from jacquant.qat import distributed as jd
from jacquant.qat import refresh as rf
from jacquant.testing.tiny_gpt import GPTConfig, TinyGPT, lm_loss


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("ddp", "fsdp"), default="fsdp")
    p.add_argument("--steps", type=int, default=100, help="total optimizer steps (a resumed run continues to it)")
    p.add_argument("--batch", type=int, default=16, help="global batch (sequences), split over ranks")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--group", type=int, default=64)
    p.add_argument("--method", default="jacquant")
    p.add_argument("--estimator", default="dither", choices=rf.ESTIMATORS[:2])
    p.add_argument("--refresh-every", type=int, default=50)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--ckpt", default=None, help="DCP checkpoint directory, written at the end")
    p.add_argument("--resume", action="store_true", help="load --ckpt first (any world size)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def setup() -> torch.device:
    """init_process_group from torchrun's environment: nccl with one GPU per rank, else gloo."""
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return device


def corpus(device: torch.device) -> torch.Tensor:
    return torch.tensor(list(Path(__file__).read_bytes()), dtype=torch.long, device=device)


def batch(data: torch.Tensor, step: int, size: int, seq: int, seed: int) -> torch.Tensor:
    """The global batch of ``step``: the same on every rank (seeded by step), [size, seq]."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    start = torch.randint(0, data.numel() - seq, (size,), generator=g)
    return torch.stack([data[s:s + seq] for s in start.tolist()])


def main() -> None:
    a = parse()
    device = setup()
    rank, world = dist.get_rank(), dist.get_world_size()
    if a.batch % world:
        raise SystemExit(f"--batch {a.batch} must be divisible by the world size {world}")
    torch.manual_seed(a.seed)  # identical init on every rank
    model = jacquant.transform(TinyGPT(GPTConfig(vocab_size=256, dim=a.dim, n_layer=a.layers, max_seq=a.seq)),
                               bits=a.bits, group=a.group, method=a.method).to(device)
    rf.attach(model, rf.RefreshConfig(estimator=a.estimator, refresh_every=a.refresh_every, seed=a.seed))
    if rank == 0:
        print(jacquant.summary(model), f"\n{a.mode.upper()} over {world} ranks, {device}")
    if a.mode == "ddp":
        model = nn.parallel.DistributedDataParallel(jd.prepare(model))
    else:
        jd.shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0)
    start = jd.load(a.ckpt, model, opt) if a.resume else 0
    data, per = corpus(device), a.batch // world
    for step in range(start, a.steps):
        jd.step(model)  # refreshes B when due, equal on every rank
        idx = batch(data, step, a.batch, a.seq, a.seed)[rank * per:(rank + 1) * per]
        loss = lm_loss(model(idx), idx)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 10 == 0 or step == a.steps - 1:
            total = loss.detach().clone()
            dist.all_reduce(total)  # SUM (gloo has no AVG)
            if rank == 0:
                print(f"step {step:5d}  loss {total.item() / world:.4f}", flush=True)
    if a.ckpt:
        jd.save(a.ckpt, model, opt, step=a.steps)
        if rank == 0:
            print(f"saved DCP checkpoint at step {a.steps} to {a.ckpt}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
