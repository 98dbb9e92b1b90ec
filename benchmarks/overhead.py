"""Training-step time of jacquant vs ste vs the unquantized model: eager, regional and whole-model compile.

One AdamW training step (forward, backward, optimizer step, and for jacquant ``jacquant.step``
with the default refresh) on SmolLM2-135M (default; ``--model tiny`` for TinyGPT), W2 g64, batch
4 x 64 tokens. Three models (fp32, ste, jacquant) are built once; each compile mode runs them side
by side in one process, interleaved round by round, and the table gives the median time per step
over rounds and the ratio to the fp32 step of the same mode. Modes run one after the other on the
same three models:

  eager     the model as it is (jacquant's CPU kernels, no compiler)
  regional  ``jacquant.compile_blocks(model)``: each decoder block compiled once, reused by the others
  whole     ``torch.compile(model)``

"compile s" is the first compiled step's time less the median eager step (tracing + inductor);
compile caches are disabled so that it is the cost a first run pays. "peak MiB" is the largest
amount of tensor memory alive during one eager step: the state (parameters, buffers, AdamW state)
plus the highest point of the step's allocations as torch.profiler records them (CPU allocator
events, not RSS); on CUDA torch.cuda.max_memory_allocated over one step. The B refresh of jacquant (dither, every K = 100 steps) is timed on its own and
shown amortised.

    python benchmarks/overhead.py [--model smollm2|tiny] [--rounds 3] [--steps 2] [--compile whole,regional]
                                  [--no-compile] [--device cuda --autocast bf16]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

# Compile afresh: a cached graph from an older jacquant (or another variant) would hide the cost of
# the code under test, since the compile caches key on the graph, not on the custom ops' bodies.
os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")

import torch  # noqa: E402

import jacquant  # noqa: E402
from jacquant.qat import refresh  # noqa: E402

METHODS = ("fp32", "ste", "jacquant")


def load(name: str):
    """(model, vocab size, loss(model_or_compiled, idx)) for ``smollm2`` or ``tiny``."""
    if name == "tiny":
        from jacquant.testing.tiny_gpt import GPTConfig, TinyGPT, lm_loss

        cfg = GPTConfig()
        torch.manual_seed(0)
        return TinyGPT(cfg), cfg.vocab_size, lambda m, idx: lm_loss(m(idx), idx)
    from jacquant.app.models import load_model, smollm2_path

    model, _ = load_model(smollm2_path())
    # use_cache=False, as in training: a KV cache object differs per layer and defeats regional reuse
    return model, model.config.vocab_size, lambda m, idx: m(input_ids=idx, labels=idx, use_cache=False).loss


class Variant:
    """One model being trained: its optimizer, and the callable a mode runs it through."""

    def __init__(self, args, method: str):
        self.model, self.vocab, self.loss = load(args.model)
        self.model.to(args.device)
        self.method, self.device = method, args.device
        self.autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.autocast)
        if method != "fp32":
            jacquant.transform(self.model, bits=args.bits, group=args.group, method=method)
        if method == "jacquant":
            refresh.attach(self.model, refresh.RefreshConfig())  # defaults: dither, K = 100
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-5)
        self.fwd = self.model

    def step(self, idx) -> None:
        with torch.autocast(self.device, dtype=self.autocast, enabled=self.autocast is not None):
            loss = self.loss(self.fwd, idx)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.method == "jacquant":
            refresh.step(self.model)
        if self.device == "cuda":
            torch.cuda.synchronize()

    def state_bytes(self) -> int:
        """Bytes of parameters, buffers and optimizer state (each storage once)."""
        seen, total = set(), 0
        tensors = list(self.model.parameters()) + list(self.model.buffers())
        tensors += [t for st in self.opt.state.values() for t in st.values() if torch.is_tensor(t)]
        for t in tensors:
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
        return total

    def peak_bytes(self, idx) -> int:
        """State + the highest point of one step's live allocations (torch.profiler memory events)."""
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self.step(idx)
            return torch.cuda.max_memory_allocated()
        base = self.state_bytes()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as p:
            self.step(idx)
        events = sorted((e for e in p.events() if e.name == "[memory]"), key=lambda e: e.time_range.start)
        live = peak = 0
        for e in events:
            live += e.cpu_memory_usage
            peak = max(peak, live)
        return base + peak


def timed_rounds(variants: dict[str, Variant], idx, rounds: int, steps: int) -> dict[str, float]:
    """Median seconds per step of each variant over ``rounds``, the variants interleaved within a round."""
    times: dict[str, list[float]] = {m: [] for m in variants}
    for r in range(rounds):
        for m, v in variants.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                v.step(idx)
            times[m].append((time.perf_counter() - t0) / steps)
        print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{m} {1e3 * t[-1]:.0f} ms" for m, t in times.items()),
              flush=True)
    return {m: statistics.median(t) for m, t in times.items()}


def first_step(variants: dict[str, Variant], idx) -> dict[str, float]:
    out = {}
    for m, v in variants.items():
        t0 = time.perf_counter()
        v.step(idx)
        out[m] = time.perf_counter() - t0
        print(f"  first step {m}: {out[m]:.1f} s", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2, help="steps per variant per round")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--autocast", choices=("none", "bf16", "fp16"), default="none", help="autocast dtype of the step")
    ap.add_argument("--compile", default="whole,regional",
                    help="compile modes after eager, comma-separated, whole before regional")
    ap.add_argument("--no-compile", action="store_true", help="eager only")
    ap.add_argument("--no-memory", action="store_true", help="skip the profiler's peak-memory step")
    ap.add_argument("--order", default=",".join(METHODS),
                    help="the order the variants run in within a round (a check that order does not bias them)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    modes = [] if a.no_compile else [m for m in a.compile.split(",") if m]
    for m in modes:
        if m not in ("regional", "whole"):
            ap.error(f"--compile: unknown mode {m!r}; use regional and/or whole")
    if modes == ["regional", "whole"]:
        ap.error("--compile: list whole before regional (regional compiles the blocks in place)")
    t0 = time.perf_counter()
    order = a.order.split(",")
    if sorted(order) != sorted(METHODS):
        ap.error(f"--order: list each of {', '.join(METHODS)} once")
    variants = {m: Variant(a, m) for m in order}
    print(f"built {', '.join(variants)} in {time.perf_counter() - t0:.0f} s", flush=True)
    vocab = variants["fp32"].vocab
    idx = torch.randint(0, vocab, (a.batch, a.seq), generator=torch.Generator().manual_seed(0)).to(a.device)

    rows: dict[str, dict[str, float]] = {}
    compile_s: dict[str, dict[str, float]] = {}
    print("eager", flush=True)
    for v in variants.values():  # warm-up: the first steps fault in the optimizer state and activations
        v.step(idx)
        v.step(idx)
    rows["eager"] = timed_rounds(variants, idx, a.rounds, a.steps)
    peak = {} if a.no_memory else {m: v.peak_bytes(idx) for m, v in variants.items()}
    for mode in modes:
        print(mode, flush=True)
        for v in variants.values():
            if mode == "regional":
                jacquant.compile_blocks(v.model)
                v.fwd = v.model
            else:
                v.fwd = torch.compile(v.model)
        first = first_step(variants, idx)
        compile_s[mode] = {m: first[m] - rows["eager"][m] for m in first}
        for v in variants.values():
            v.step(idx)
        rows[mode] = timed_rounds(variants, idx, a.rounds, a.steps)

    jq = variants["jacquant"].model
    k = jq.jacquant_refresh_config.refresh_every
    ref_t = []
    for _ in range(3):
        t0 = time.perf_counter()
        refresh.refresh(jq)
        ref_t.append(time.perf_counter() - t0)
    amort = statistics.median(ref_t) / k

    name = "SmolLM2-135M" if a.model == "smollm2" else "TinyGPT"
    where = torch.cuda.get_device_name() if a.device == "cuda" else f"CPU {torch.get_num_threads()} threads"
    amp = "" if a.autocast == "none" else f", {a.autocast} autocast"
    print(f"\n{name}, batch {a.batch}x{a.seq}, W{a.bits} g{a.group}, AdamW, {where}{amp}, "
          f"torch {torch.__version__}; {a.rounds} interleaved rounds x {a.steps} steps, median ms/step")
    print(f"{'mode':<9} {'variant':<9} {'ms/step':>9} {'vs fp32':>8} {'compile s':>10} {'peak MiB':>9} {'vs fp32':>8}")
    for mode, med in rows.items():
        fp = med["fp32"]
        for m in METHODS:
            cs = f"{compile_s[mode][m]:10.0f}" if mode in compile_s else f"{'-':>10}"
            if mode == "eager" and peak:
                mem = f"{peak[m] / 2**20:9.0f} {peak[m] / peak['fp32']:8.3f}"
            else:
                mem = f"{'':>9} {'':>8}"
            print(f"{mode:<9} {m:<9} {1e3 * med[m]:9.1f} {med[m] / fp:8.3f} {cs} {mem}".rstrip())
    print(f"B refresh (dither, all sites): {1e3 * statistics.median(ref_t):.0f} ms once every K={k} steps "
          f"= {1e3 * amort:.1f} ms/step amortised ({amort / rows['eager']['ste']:.4f} of an eager ste step)")


if __name__ == "__main__":
    main()
