"""The learned-shape hook's cost per training step (the target: within 1.05x STE's step), on its own.

Every step the hook multiplies each weight's gradient by B(r) = 1 + sum_k a_k cos(2 pi k r) at the weight's
position r in its bin. On SmolLM2-135M's 210 quantized matrices (30 decoder layers of q, k, v, o, gate, up,
down: 106 M weights, G = 64, three harmonics) this times, per full-model step:

  unfused   bin offset r = v - round v, then the cosine series by the forward recurrence (the hook before this round)
  eager     :func:`jacquant.research.shape.scale_by_shape_`: B on v = w/s + z itself (1-periodic), Clenshaw in place
  fused     the eager function compiled alone by :func:`jacquant.kernels.fused_cpu.run` (one loop)

interleaved over ``--rounds`` rounds (median), against the STE training step of the cost table
(``benchmarks/screen.py smol --no-eval``; about 4.7 s on 2 CPU threads, batch 4 x 128).

    python benchmarks/shape_hook.py [--rounds 3] [--per layer|group] [--threads 2]
"""
from __future__ import annotations

import argparse
import functools
import math
import statistics
import time

import torch

from jacquant.kernels import fused_cpu
from jacquant.research.shape import bin_offset, scale_by_shape_

SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]  # one layer
GROUP = 64


def unfused_(grad, w, scale, zero_point, group, coeffs):
    """The hook as it was: r, then 1 + sum_k a_k T_k(cos 2 pi r) with a new tensor per term."""
    r = bin_offset(w, scale, zero_point, group).reshape(w.shape[0], -1, group)
    a = coeffs if coeffs.ndim == 1 else coeffs.unsqueeze(-2)
    c = torch.cos((2 * math.pi) * r)
    out = torch.addcmul(torch.ones_like(c), c, a[..., 0])
    t_prev, t = torch.ones_like(c), c
    for k in range(1, a.shape[-1]):
        t_prev, t = t, torch.addcmul(-t_prev, c, t, value=2.0)
        out.addcmul_(t, a[..., k])
    return grad.mul_(out.reshape(grad.shape))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--per", choices=("layer", "group"), default="layer")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ste-step", type=float, default=4.7, help="seconds of the STE step to divide by")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    gen = torch.Generator().manual_seed(0)
    mats = []
    for n, k in SHAPES * a.layers:
        w = torch.randn(n, k, generator=gen) * 0.02
        s = w.reshape(n, -1, GROUP).abs().amax(-1) / 1.5
        z = torch.full(s.shape, 2, dtype=torch.uint8)
        coeffs = torch.tensor([0.3, -0.2, 0.1]) if a.per == "layer" else torch.randn(n, k // GROUP, 3, generator=gen) * 0.2
        mats.append((torch.randn(n, k, generator=gen), w, s, z, coeffs))
    ways = {"unfused": unfused_, "eager": scale_by_shape_, "fused": functools.partial(fused_cpu.run, "scale_by_shape", scale_by_shape_)}
    t0 = time.perf_counter()
    fused_cpu.run("scale_by_shape", scale_by_shape_, *mats[0][:4], GROUP, mats[0][4])
    print(f"{sum(m[1].numel() for m in mats) / 1e6:.0f} M weights; the fused kernel compiled in "
          f"{time.perf_counter() - t0:.1f} s{' (FAILED: torch path)' if fused_cpu._state['failed'] else ''}")
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(a.rounds):
        for name, fn in ways.items():
            t0 = time.perf_counter()
            for g, w, s, z, coeffs in mats:
                fn(g, w, s, z, GROUP, coeffs)
            times[name].append(time.perf_counter() - t0)
    print(f"\n| hook ({a.per}) | s per full-model step | x STE step ({a.ste_step:.1f} s) |\n|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med:.3f} | {1 + med / a.ste_step:.3f} |")


if __name__ == "__main__":
    main()
