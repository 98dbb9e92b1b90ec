"""How much of a per-element gradient factor f survives AdamW on SmolLM2-135M W2 g64 (issue 14's diagnostic).

Adam's update is m̂/(sqrt(v̂) + ε). For a factor f that stays the same over the steps, g → f·g scales m̂
and sqrt(v̂) alike, so the update is unchanged *except* through ε: per element, the first step's update
magnitude is u(g) = |g|/(|g| + ε), and the factor leaves

    r = u(f·g) / u(g) = f (|g| + ε) / (f|g| + ε)          (1 where ε ≪ f|g|, f where |g| ≪ ε)

of it. This script takes one batch of training tokens (the main job's data, cross entropy), the clipped-STE
gradient of every quantized weight, and prints the quantiles of |g| and the distribution of r for
StableQAT's Fourier factor (A = 0.21) and the Gaussian-dithered slope (σ = 0.3, ``jq-gauss``), with
AdamW's default ε = 1e-8:

    python benchmarks/adam_eps.py [--batch 4] [--seq 128] [--eps 1e-8]
"""
from __future__ import annotations

import argparse

import torch

import jacquant
from jacquant.app import data, lm_track, models
from jacquant.research.elementwise import gaussian_slope
from jacquant.primitives.grid import scaled
from jacquant.qat.quantizer import sites
from jacquant.primitives.surrogates import stableqat_factor


def survival(f: torch.Tensor, g: torch.Tensor, eps: float) -> torch.Tensor:
    """r = u(f·g)/u(g), u(x) = |x|/(|x| + ε), for the elements with g ≠ 0."""
    a = g.abs()
    return f * (a + eps) / (f * a + eps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--eps", type=float, default=1e-8)
    a = ap.parse_args()
    model, tok, _ = models.load_fp()
    toks = lm_track.tokens(data.load_corpus(), tok)
    batch = toks.train[: a.batch * a.seq].reshape(a.batch, a.seq).long()
    jacquant.transform(model, bits=2, group=64, method="ste")
    lm_track.lm_loss(model, batch).backward()
    g_all, rows = [], {"stableqat (A = 0.21)": [], "gauss (σ = 0.3)": []}
    factors = {"stableqat (A = 0.21)": [], "gauss (σ = 0.3)": []}
    with torch.no_grad():
        for st in sites(model):
            q = st.quantizer
            w, g = q.as_nk(st.weight), q.as_nk(st.weight.grad)
            keep = g != 0
            fs = {"stableqat (A = 0.21)": stableqat_factor(w, q.scale, 0.21, q.group),
                  "gauss (σ = 0.3)": gaussian_slope(scaled(w, q.scale, q.zero_point, q.group).reshape(w.shape),
                                                    q.bits, 0.3)}
            g_all.append(g[keep].abs())
            for name, f in fs.items():
                rows[name].append(survival(f[keep], g[keep], a.eps))
                factors[name].append(f[keep])
    g = torch.cat(g_all)
    qs = torch.tensor([0.1, 0.5, 0.9])
    gq = torch.quantile(g[torch.randperm(len(g))[:1_000_000]].double(), qs.double())
    print(f"SmolLM2-135M W2 g64, one batch of {a.batch}x{a.seq} training tokens, clipped-STE gradient of the "
          f"{len(g) / 1e6:.1f} M weights with g ≠ 0; AdamW ε = {a.eps:g}")
    print(f"|g| quantiles 10/50/90%: {gq[0]:.2e} / {gq[1]:.2e} / {gq[2]:.2e}; "
          f"|g| < ε: {(g < a.eps).double().mean():.3f} of the weights")
    print("| factor | mean f | mean r (what Adam's first step keeps of f's effect) | r < 0.5 | f < 0.5 |")
    print("|---|---|---|---|---|")
    for name in rows:
        r, f = torch.cat(rows[name]), torch.cat(factors[name])
        print(f"| {name} | {f.mean():.3f} | {r.mean():.3f} | {(r < 0.5).double().mean():.3f} | "
              f"{(f < 0.5).double().mean():.3f} |")


if __name__ == "__main__":
    main()
