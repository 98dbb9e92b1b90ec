"""Peak memory of one QAT training step (ste, jacquant) vs the unquantized step on the same model.

Each variant runs in a fresh subprocess (no allocator state, no tensors of another variant):
build TinyGPT (dim 512: weights dominate), transform it, AdamW, one warm-up step (Adam's state
exists from then on), then one measured step: forward, backward, ``optimizer.step()``,
``zero_grad(set_to_none=True)`` and ``jacquant.step(model)`` where the variant refreshes B.

CPU: the torch profiler records every tensor allocation and free (``profile_memory=True``) from
before the model is built; live bytes at time t are the running sum of those events, and the peak
is its maximum inside the measured step (``record_function("measured_step")``). So the number
counts exactly the bytes of live tensors, and nothing of Python, the allocator's caches or the
libraries. CUDA (``--device cuda``): ``torch.cuda.max_memory_allocated`` over the measured step.

    python benchmarks/memory.py [--dim 512] [--layers 4] [--device cpu|cuda] [--model tinygpt|llama]

Variants: ``fp`` (no transform), ``ste``, ``jacquant`` (B on the gradient; the measured step is not
a refresh step), ``jacquant+refresh`` (the measured step refreshes B), ``jacquant+update``
(``scale_updates_by_b``: B on the update, which keeps a copy of the quantized weights through
``optimizer.step()``), ``jacquant+guard`` (``jacquant.guard``: the finite check before each step).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

VARIANTS = ("fp", "ste", "jacquant", "jacquant+refresh", "jacquant+update", "jacquant+guard")


def build(a: argparse.Namespace, variant: str, device: str):
    import torch

    import jacquant
    from jacquant.qat.optim import scale_updates_by_b

    torch.manual_seed(0)
    if a.model == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.dim, intermediate_size=int(a.dim * 8 / 3) // 64 * 64,
                          num_hidden_layers=a.layers, num_attention_heads=8, num_key_value_heads=8,
                          tie_word_embeddings=True)
        model = LlamaForCausalLM(cfg).to(device)

        def loss_fn(idx):
            return model(input_ids=idx, labels=idx, use_cache=False).loss
    else:
        from jacquant.testing.tiny_gpt import GPTConfig, TinyGPT, lm_loss

        model = TinyGPT(GPTConfig(vocab_size=a.vocab, dim=a.dim, n_layer=a.layers, n_head=8, max_seq=a.seq)).to(device)

        def loss_fn(idx):
            return lm_loss(model(idx), idx)
    method = None if variant == "fp" else variant.split("+")[0]
    if method is not None:
        jacquant.transform(model, bits=a.bits, group=a.group, method=method, init="minmax")
        jacquant.qat.refresh.attach(model, jacquant.RefreshConfig(refresh_every=1 if variant.endswith("refresh") else 100))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    if variant.endswith("update"):
        scale_updates_by_b(opt, model)
    if variant.endswith("guard"):
        opt = jacquant.guard(opt, model, on_nonfinite="skip_step")

    def step(idx):
        loss_fn(idx).backward()
        stepped = opt.step() is not False  # a guard returns False on a skipped step
        opt.zero_grad(set_to_none=True)
        if method is not None and stepped:
            jacquant.step(model)

    return model, step


def worker(a: argparse.Namespace, variant: str) -> dict:
    """Run one variant in this process; return its peak and its state bytes."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    torch.set_num_threads(a.threads)
    idx = torch.randint(0, a.vocab, (a.batch, a.seq), generator=torch.Generator().manual_seed(0)).to(a.device)
    if a.device == "cuda":
        model, step = build(a, variant, "cuda")
        step(idx)
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(idx)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            model, step = build(a, variant, "cpu")
            step(idx)
            with record_function("measured_step"):
                step(idx)
        events = prof.profiler.kineto_results.events()
        window = next(e for e in events if e.name() == "measured_step")
        lo, hi = window.start_ns(), window.start_ns() + window.duration_ns()
        live, start, peak = 0, None, 0
        for e in sorted((e for e in events if e.name() == "[memory]" and e.device_type().name == "CPU"),
                        key=lambda e: e.start_ns()):
            if e.start_ns() >= lo and start is None:
                start = peak = live
            live += e.nbytes()
            if lo <= e.start_ns() <= hi:
                peak = max(peak, live)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"variant": variant, "peak": peak, "start": start, "params": params}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("tinygpt", "llama"), default="tinygpt")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a, a.worker)))
        return
    rows = []
    for v in a.variants.split(","):
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}; choose from {VARIANTS}")
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--worker", v], capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"variant {v} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = next((r for r in rows if r["variant"] == "fp"), rows[0])
    mib = 2 ** 20
    print(f"{a.model} dim {a.dim}, {a.layers} layers, vocab {a.vocab}, batch {a.batch}x{a.seq}, W{a.bits} g{a.group}, "
          f"AdamW, {a.device}; parameters {base['params'] / mib:.1f} MiB (fp32)")
    print(f"{'variant':<18} {'peak MiB':>9} {'vs fp':>6} {'at step start MiB':>18} {'step transient MiB':>19}")
    for r in rows:
        print(f"{r['variant']:<18} {r['peak'] / mib:>9.1f} {r['peak'] / base['peak']:>5.2f}x {r['start'] / mib:>18.1f} "
              f"{(r['peak'] - r['start']) / mib:>19.1f}")


if __name__ == "__main__":
    main()
