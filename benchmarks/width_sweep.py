"""Estimator width and B placement at 2 bits on a small distillation task (CPU, ~2 min).

A 3-layer MLP teacher (Gaussian weights) is copied, quantized to W2 g64 and trained to match the
teacher's outputs on fresh Gaussian inputs; the score is the held-out MSE to the teacher
(mean ± spread over seeds, lower is better). Tables:

  width      B on the gradient (AdamW), Dither h and Probe δ_max swept, against clipped STE
  placement  STE vs B on the gradient vs B on the update (AdamW and MARS-AdamW), data-driven Probe,
             and the refresh period

    python benchmarks/width_sweep.py [--steps 300] [--seeds 2] [--table all]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn
from tqdm import tqdm

import jacquant
from jacquant.qat import refresh
from jacquant.qat.optim import MarsAdamW, scale_updates_by_b

DIMS = (128, 256, 256, 64)


def teacher(seed: int) -> nn.Sequential:
    g = torch.Generator().manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(DIMS[:-1], DIMS[1:])):
        lin = nn.Linear(a, b)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(b, a, generator=g) / a ** 0.5)
            lin.bias.zero_()
        layers += [lin] + ([nn.GELU()] if i < len(DIMS) - 2 else [])
    return nn.Sequential(*layers)


def run(seed: int, steps: int, method: str, estimator: str | None = None, width: float = 1.0,
        placement: str = "grad", opt_name: str = "adamw", refresh_every: int = 100, lr: float = 2e-3) -> float:
    t = teacher(seed)
    s = teacher(seed)
    jacquant.transform(s, bits=2, group=64, method=method)
    if estimator is not None:
        refresh.attach(s, refresh.RefreshConfig(estimator=estimator, width=width, refresh_every=refresh_every,
                                                seed=seed, n_probes=16))
    params = s.parameters()
    opt = (torch.optim.AdamW(params, lr=lr, weight_decay=0.0) if opt_name == "adamw"
           else MarsAdamW(params, lr=lr, weight_decay=0.0))
    if placement == "update":
        scale_updates_by_b(opt, s)
    g = torch.Generator().manual_seed(1000 + seed)
    x_cal = torch.randn(512, DIMS[0], generator=g)
    with torch.no_grad():
        y_cal = t(x_cal)
    loss_fn = lambda: ((s(x_cal) - y_cal) ** 2).mean()  # noqa: E731  calibration batch for data_probe
    for _ in range(steps):
        x = torch.randn(256, DIMS[0], generator=g)
        with torch.no_grad():
            y = t(x)
        loss = ((s(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if estimator is not None:
            refresh.step(s, loss_fn if estimator == "data_probe" else None)
    x_test = torch.randn(4096, DIMS[0], generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        return float(((s(x_test) - t(x_test)) ** 2).mean())


def table(title: str, rows: list[tuple[str, dict]], seeds: int, steps: int) -> None:
    print(f"\n## {title}  (W2 g64 MLP {DIMS} distillation, {steps} steps, {seeds} seeds; held-out MSE x1e3)")
    print(f"{'config':<44} {'mean':>8} {'min':>8} {'max':>8} {'s/run':>6}")
    for name, kw in tqdm(rows, desc=title, leave=False):
        t0 = time.perf_counter()
        vals = [1e3 * run(seed, steps, **kw) for seed in range(seeds)]
        dt = (time.perf_counter() - t0) / seeds
        print(f"{name:<44} {statistics.mean(vals):8.3f} {min(vals):8.3f} {max(vals):8.3f} {dt:6.1f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--table", choices=("width", "placement", "all"), default="all")
    a = ap.parse_args()
    torch.set_num_threads(1)  # the CI box is shared: one thread is steadier
    if a.table in ("width", "all"):
        rows = [("ste (clipped STE)", dict(method="ste"))]
        rows += [(f"dither h={h} (B on grad, K=10)", dict(method="jacquant", estimator="dither", width=h,
                                                       refresh_every=10)) for h in (0.5, 1.0, 2.0, 4.0)]
        rows += [(f"probe d_max={d} (B on grad, K=10)", dict(method="jacquant", estimator="probe", width=d,
                                                          refresh_every=10)) for d in (0.25, 0.5, 1.0, 2.0)]
        table("width", rows, a.seeds, a.steps)
    if a.table in ("placement", "all"):
        rows = [
            ("ste + AdamW", dict(method="ste")),
            ("dither h=1 on grad + AdamW, K=10", dict(method="jacquant", estimator="dither", width=1.0, refresh_every=10)),
            ("dither h=1 on update + AdamW, K=10", dict(method="jacquant", estimator="dither", width=1.0,
                                                        refresh_every=10, placement="update")),
            ("dither h=1 on update + AdamW, K=100", dict(method="jacquant", estimator="dither", width=1.0,
                                                         refresh_every=100, placement="update")),
            ("dither h=2 on update + AdamW, K=10", dict(method="jacquant", estimator="dither", width=2.0,
                                                        refresh_every=10, placement="update")),
            ("data_probe d=1 on grad + AdamW, K=10", dict(method="jacquant", estimator="data_probe", width=1.0,
                                                         refresh_every=10)),
            ("data_probe d=1 on update + AdamW, K=10", dict(method="jacquant", estimator="data_probe", width=1.0,
                                                           refresh_every=10, placement="update")),
            ("ste + MARS-AdamW", dict(method="ste", opt_name="mars")),
            ("dither h=1 on update + MARS-AdamW, K=10", dict(method="jacquant", estimator="dither", width=1.0,
                                                             refresh_every=10, placement="update", opt_name="mars")),
        ]
        table("placement", rows, a.seeds, a.steps)


if __name__ == "__main__":
    main()
