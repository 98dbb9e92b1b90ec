"""A small end-to-end demo: pretrain a tiny GPT on real text, then 2-bit QAT by each method.

Corpus: the reStructuredText-free prose of CPython's own standard library (the docstrings and
comments of a fixed list of modules, read from this interpreter's installation), byte-level tokens.
Split: the first 90% of the bytes train, the last 10% validate. This runs offline everywhere Python
runs; the full causal-LM / MiniLM job of ``jacquant run`` (issue 6) builds on the same functions.
"""
from __future__ import annotations

import copy
import importlib
import inspect
import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm import tqdm

from .api import transform
from .optim import scale_updates_by_b
from .refresh import step
from .tiny_gpt import GPTConfig, TinyGPT, lm_loss

MODULES = ("argparse", "collections", "csv", "dataclasses", "email.message", "functools", "json",
           "logging", "pathlib", "subprocess", "textwrap", "threading", "unittest.case", "zipfile")


def stdlib_text(modules: tuple[str, ...] = MODULES) -> bytes:
    """Docstrings of the listed stdlib modules and their members, joined: English prose, offline."""
    parts: list[str] = []
    for name in modules:
        mod = importlib.import_module(name)
        for obj in [mod, *[v for _, v in sorted(vars(mod).items()) if inspect.isclass(v) or inspect.isfunction(v)]]:
            doc = inspect.getdoc(obj)
            if doc and getattr(obj, "__module__", name) == name:
                parts.append(doc)
    return "\n\n".join(parts).encode("utf-8", "replace")


def batches(data: Tensor, batch: int, seq: int, steps: int, seed: int):
    """``steps`` random windows [batch, seq] from a 1-D byte tensor."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        i = torch.randint(0, len(data) - seq, (batch,), generator=g)
        yield torch.stack([data[j:j + seq] for j in i.tolist()])


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: Tensor, seq: int) -> float:
    """Mean next-byte cross entropy over consecutive windows of the validation bytes (nats)."""
    model.eval()
    n = (len(data) - 1) // seq
    x = data[: n * seq].reshape(n, seq)
    loss = sum(float(lm_loss(model(x[i:i + 32]), x[i:i + 32])) * len(x[i:i + 32]) for i in range(0, n, 32)) / n
    model.train()
    return loss


def train(model: torch.nn.Module, data: Tensor, steps: int, lr: float, seq: int, seed: int, desc: str,
          jacquant_refresh: bool = False) -> list[float]:
    """AdamW with cosine decay on random windows; returns the loss curve.

    With ``jacquant_refresh``, B is refreshed by ``jacquant.step`` (closed-form Dither, defaults of
    :class:`~jacquant.refresh.RefreshConfig`) and applied to the update (``scale_updates_by_b``),
    the placement that measured best with AdamW (benchmarks/width_sweep.py).
    """
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    if jacquant_refresh:
        scale_updates_by_b(opt, model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / max(steps, 1))))
    curve = []
    for x in tqdm(batches(data, 16, seq, steps, seed), total=steps, desc=desc, leave=False):
        loss = lm_loss(model(x), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if jacquant_refresh:
            step(model)
        curve.append(loss.item())
    return curve


@dataclass
class DemoResult:
    method: str
    val_loss: float
    perplexity: float
    seconds: float


def run_demo(bits: int = 2, group: int = 32, pretrain_steps: int = 1500, qat_steps: int = 400, seq: int = 64,
             seed: int = 0, methods: tuple[str, ...] = ("ste", "stableqat", "jacquant")) -> list[DemoResult]:
    """Pretrain TinyGPT in full precision, then compare RTN and QAT methods at ``bits``."""
    torch.manual_seed(seed)
    data = torch.tensor(list(stdlib_text()), dtype=torch.long)
    split = int(0.9 * len(data))
    tr, va = data[:split], data[split:]
    fp = TinyGPT(GPTConfig(vocab_size=256, dim=128, n_layer=2, n_head=4, max_seq=seq))
    t0 = time.perf_counter()
    train(fp, tr, pretrain_steps, 3e-3, seq, seed, "pretrain fp32")
    results = [DemoResult("fp32", evaluate(fp, va, seq), 0.0, time.perf_counter() - t0)]
    rtn = transform(copy.deepcopy(fp), bits=bits, group=group, method="ste")
    results.append(DemoResult(f"RTN W{bits}", evaluate(rtn, va, seq), 0.0, 0.0))
    for method in methods:
        t0 = time.perf_counter()
        model = transform(copy.deepcopy(fp), bits=bits, group=group, method=method)
        train(model, tr, qat_steps, 1e-3, seq, seed + 1, f"QAT {method}", jacquant_refresh=method == "jacquant")
        results.append(DemoResult(f"QAT W{bits} {method}", evaluate(model, va, seq), 0.0, time.perf_counter() - t0))
    for r in results:
        r.perplexity = math.exp(r.val_loss)
    return results


def format_table(results: list[DemoResult]) -> str:
    rows = ["| model | val loss (nats/byte) | perplexity | time (s) |", "|---|---|---|---|"]
    rows += [f"| {r.method} | {r.val_loss:.4f} | {r.perplexity:.3f} | {r.seconds:.1f} |" for r in results]
    return "\n".join(rows)
