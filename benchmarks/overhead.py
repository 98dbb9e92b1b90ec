"""Training-step time of jacquant vs ste vs the unquantized model, eager and torch.compile'd (CPU).

One AdamW training step (forward, backward, optimizer step, and for jacquant ``jacquant.step``
with the default refresh period) on TinyGPT. Variants run side by side in one process, interleaved
round by round; the table gives the median time per step over rounds and the ratios. The B
refresh runs once every K steps, so its cost is reported separately, amortised over K.

    python benchmarks/overhead.py [--rounds 7] [--steps 4] [--no-compile]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

# Compile afresh: a cached graph from an older jacquant (or another variant) would hide the cost of
# the code under test, since the compile caches key on the graph, not on the custom ops' bodies.
os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")

import torch
from tqdm import tqdm

import jacquant
from jacquant import refresh
from jacquant.tiny_gpt import GPTConfig, TinyGPT, lm_loss


def make(method: str | None, compiled: bool, cfg: GPTConfig):
    torch.manual_seed(0)
    model = TinyGPT(cfg)
    if method is not None:
        jacquant.transform(model, bits=2, group=64, method=method)
    if method == "jacquant":
        refresh.attach(model, refresh.RefreshConfig())  # defaults: dither, K = 100
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    fwd = torch.compile(model) if compiled else model

    def train_step(idx):
        lm_loss(fwd(idx), idx).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if method == "jacquant":
            refresh.step(model)

    return model, train_step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=4, help="steps per variant per round")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--no-compile", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(2)
    cfg = GPTConfig()
    idx = torch.randint(0, cfg.vocab_size, (a.batch, a.seq), generator=torch.Generator().manual_seed(0))
    modes = [False] if a.no_compile else [False, True]
    variants = {}
    for compiled in modes:
        for method in (None, "ste", "jacquant"):
            name = f"{method or 'fp32'}{' compiled' if compiled else ' eager'}"
            model, fn = make(method, compiled, cfg)
            for _ in tqdm(range(3), desc=f"warm-up {name}", leave=False):  # compiles here
                fn(idx)
            variants[name] = (model, fn)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in tqdm(range(a.rounds), desc="rounds"):
        for name, (_, fn) in variants.items():
            t0 = time.perf_counter()
            for _ in range(a.steps):
                fn(idx)
            times[name].append((time.perf_counter() - t0) / a.steps)
    jq_model = variants["jacquant eager"][0]
    refresh_times = []
    for _ in range(5):
        t0 = time.perf_counter()
        refresh.refresh(jq_model)
        refresh_times.append(time.perf_counter() - t0)
    k = jq_model.jacquant_refresh_config.refresh_every
    amort = statistics.median(refresh_times) / k
    med = {n: statistics.median(v) for n, v in times.items()}
    print(f"\nTinyGPT {cfg}, batch {a.batch}x{a.seq}, W2 g64, AdamW, CPU {torch.get_num_threads()} threads, "
          f"{a.rounds} interleaved rounds x {a.steps} steps (median ms/step)")
    print(f"{'variant':<22} {'ms/step':>9} {'vs fp32':>8} {'vs ste':>8}")
    for compiled in modes:
        tag = " compiled" if compiled else " eager"
        fp, ste = med["fp32" + tag], med["ste" + tag]
        for m in ("fp32", "ste", "jacquant"):
            t = med[m + tag]
            print(f"{m + tag:<22} {1e3 * t:9.2f} {t / fp:8.3f} {t / ste:8.3f}")
    print(f"B refresh (dither, all sites): {1e3 * statistics.median(refresh_times):.2f} ms once every K={k} steps "
          f"= {1e3 * amort:.3f} ms/step amortised "
          f"({amort / med['ste eager']:.4f} of an eager ste step)")


if __name__ == "__main__":
    main()
