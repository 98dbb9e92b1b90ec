"""Shipping SmolLM2-135M to onnxruntime: size, prefill, decode and perplexity of each export, one table.

Rows (all KV-cache decoders on onnxruntime's CPU provider, ``--threads`` intra-op threads):

  fp32            jacquant.export_onnx(fp model, kv_cache=True): fp32 MatMul weights
  jacquant W4/W2  the model RTN-converted (jacquant.transform(..., init="minmax") + convert), or with
                  ``--model DIR`` the W2 row is a ``jacquant train --out DIR`` output; MatMulNBits,
                  LM head (tied to the embedding) RTN to ``--head-bits`` and shared with the embedding
  ... std ops     the same W2 model as ``target="onnx"``: DequantizeLinear + MatMul and standard ops
                  only, which onnxruntime fuses back to MatMulNBits (session.qdq_matmulnbits_accuracy_level 4)
  ... zp folded   the same W2 model with fold_zero_points=True (symmetric MatMulNBits + exact correction)
  ort-genai int4  onnxruntime-genai's model builder (``-p int4 -e cpu``) on the same fp checkpoint,
                  timed with the same loop (and with onnxruntime-genai's own runtime, last row)

Prefill: seconds of the run over a 128-token prompt (cache empty, all logits). Decode: one-token
runs per second over ``--new-tokens`` steps after it. Median of ``--reps``. Perplexity: exp of the
mean next-token cross-entropy over ``--windows`` fixed windows of ``--seq`` tokens of the corpus'
validation text (``jacquant.app.data.load_corpus``, python3.11-doc when installed). Every row's
weights are larger than this CPU's 32 MiB last-level cache, so the figures are cold-cache ones.

    flock /tmp/jacquant-cpu.lock python benchmarks/export.py                  # the table
    flock /tmp/jacquant-cpu.lock python benchmarks/export.py --sweep          # W2 configurations
    flock /tmp/jacquant-cpu.lock python benchmarks/export.py --micro          # one linear stack

``--sweep`` times W2 and W4 block sizes 32/64/128, zero points or none (symmetric), accuracy levels 0/4.
``--micro`` is the old 3 x 4096 x 4096 linear stack, rotating among copies of the weights so that
every figure reads at least ``--cold-mib`` MiB per pass (what a model larger than the cache sees).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnx
import onnxruntime as ort
import torch

import jacquant
from jacquant.export import export_onnx
from jacquant.export.generation import Decoder, session

LLAMA_CPP = "llama.cpp Q4_1 (llama-cpp-python, 2 threads): 154 tokens/s prefill (128), 88 tokens/s decode"


def file_size(path: str) -> int:
    """Bytes of an ONNX file plus its external-data files (onnxruntime-genai writes ``model.onnx.data``)."""
    model = onnx.load(path, load_external_data=False)
    external = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    return os.path.getsize(path) + sum(os.path.getsize(os.path.join(os.path.dirname(path), f)) for f in external)


def make_session(path: str, threads: int, options: dict | None = None) -> ort.InferenceSession:
    return session(path, threads, options)


class Runner:
    """Prefill / decode runs of any decoder whose inputs are input_ids, attention_mask, [position_ids],
    past_key_values.{i}.key/value and outputs logits, present.{i}.key/value (jacquant and genai), batch 1."""

    def __init__(self, sess: ort.InferenceSession, layers: int, kv_heads: int, head_dim: int):
        self.decoder = Decoder(sess, layout=(layers, kv_heads, head_dim))

    def run(self, ids: np.ndarray, start: int, cache) -> tuple[np.ndarray, list]:
        total = start + ids.shape[1]
        return self.decoder.step(ids, np.ones((1, total), np.int64), np.arange(start, total, dtype=np.int64)[None],
                                 cache or self.decoder.empty_cache(1))

    def timings(self, prompt: np.ndarray, new_tokens: int, reps: int) -> tuple[float, float]:
        """(prefill seconds, decode tokens/s), medians of ``reps`` after one warm-up; greedy tokens."""
        pre, dec = [], []
        for r in range(reps + 1):
            t = time.perf_counter()
            logits, cache = self.run(prompt, 0, None)
            p = time.perf_counter() - t
            tok = int(logits[0, -1].argmax())
            t = time.perf_counter()
            for i in range(new_tokens):
                logits, cache = self.run(np.array([[tok]]), prompt.shape[1] + i, cache)
                tok = int(logits[0, -1].argmax())
            d = time.perf_counter() - t
            if r:
                pre.append(p)
                dec.append(new_tokens / d)
        return statistics.median(pre), statistics.median(dec)

    def perplexity(self, windows: np.ndarray) -> float:
        """exp(mean over windows and positions of -log softmax(logits_t)[x_{t+1}])."""
        nll, n = 0.0, 0
        for w in windows:
            logits, _ = self.run(w[None], 0, None)
            z = logits[0, :-1].astype(np.float64)
            z -= z.max(-1, keepdims=True)
            logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
            nll -= logp[np.arange(len(w) - 1), w[1:]].sum()
            n += len(w) - 1
        return math.exp(nll / n)


def eval_windows(tok, seq: int, count: int) -> tuple[np.ndarray, str]:
    """``count`` consecutive windows of ``seq`` tokens from the start of the corpus' validation text."""
    from jacquant.app.data import load_corpus

    corpus = load_corpus("auto")
    ids: list[int] = []
    for doc in corpus.valid:
        ids += tok(doc)["input_ids"]
        if len(ids) >= seq * count:
            break
    if len(ids) < seq * count:
        raise SystemExit(f"the validation text has {len(ids)} tokens, {seq * count} needed")
    return np.array(ids[:seq * count], np.int64).reshape(count, seq), corpus.name


def rtn(model, bits: int, group: int, symmetric: bool = False):
    """A converted round-to-nearest copy: min-max scales (jacquant.transform init="minmax"), no training."""
    import copy

    m = copy.deepcopy(model)
    jacquant.transform(m, bits=bits, group=group, method="ste", init="minmax", symmetric=symmetric)
    return jacquant.convert(m)


def build_genai(hf_dir: str, out: str) -> str | None:
    """onnxruntime-genai's int4 CPU model of ``hf_dir`` (offline), or None with the reason printed."""
    if os.path.exists(os.path.join(out, "model.onnx")):
        return os.path.join(out, "model.onnx")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", hf_dir, "-o", out, "-p", "int4", "-e",
           "cpu", "-c", out + "_cache"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode or not os.path.exists(os.path.join(out, "model.onnx")):
        print(f"onnxruntime-genai builder failed ({r.returncode}): {r.stderr[-400:]}", file=sys.stderr)
        return None
    return os.path.join(out, "model.onnx")


def genai_runtime(folder: str, prompt: np.ndarray, new_tokens: int, reps: int, threads: int) -> tuple[float, float]:
    """(prefill s, decode tokens/s) with onnxruntime-genai's own Generator, greedy, ``threads`` threads."""
    import onnxruntime_genai as og

    cfg_path = os.path.join(folder, "genai_config.json")
    cfg = json.load(open(cfg_path))
    cfg["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads
    json.dump(cfg, open(cfg_path, "w"), indent=1)
    model = og.Model(folder)
    pre, dec = [], []
    for r in range(reps + 1):
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=prompt.shape[1] + new_tokens + 1)
        gen = og.Generator(model, params)
        t = time.perf_counter()
        gen.append_tokens(prompt[0].tolist())
        p = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(new_tokens):
            gen.generate_next_token()
        d = time.perf_counter() - t
        if r:
            pre.append(p)
            dec.append(new_tokens / d)
    return statistics.median(pre), statistics.median(dec)


def profile_ops(path: str, shape: tuple, prompt: np.ndarray, new_tokens: int, threads: int) -> dict:
    """Share of kernel time per op type, prefill and decode separately (onnxruntime's profiler)."""
    out = {}
    for phase in ("prefill", "decode"):
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(tempfile.mkdtemp(), phase)
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        run = Runner(sess, *shape)
        logits, cache = run.run(prompt, 0, None)  # warm-up, not separable from the profile: counted per phase below
        runs = 1
        if phase == "decode":
            for i in range(new_tokens):
                logits, cache = run.run(np.array([[int(logits[0, -1].argmax())]]), prompt.shape[1] + i, cache)
            runs = new_tokens
        events = json.load(open(sess.end_profiling()))
        per_run: dict = {}
        kernel = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
        if phase == "decode":  # drop the prefill run's nodes: the first len(kernel)/(runs+1)·1 events
            kernel = kernel[len(kernel) // (runs + 1):]
        for e in kernel:
            op = e.get("args", {}).get("op_name", "?")
            per_run[op] = per_run.get(op, 0.0) + e["dur"] / 1e3 / runs
        out[phase] = dict(sorted(per_run.items(), key=lambda kv: -kv[1]))
    return out


def table(rows: list[tuple], base: dict, title: str) -> None:
    print(title)
    head = ("model", "weights", "size MiB", "prefill 128 s", "prefill tok/s", "vs fp32", "decode tok/s", "vs fp32",
            "perplexity")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for label, what, size, pre, dec, ppl in rows:
        print(f"| {label} | {what} | {size / 2**20:.1f} | {pre:.3f} | {128 / pre:.0f} | {base['pre'] / pre:.2f}x | "
              f"{dec:.1f} | {dec / base['dec']:.2f}x | {'-' if ppl is None else f'{ppl:.2f}'} |")


def llm(a) -> None:
    from jacquant.app.commands import load_trained
    from jacquant.app.models import load_model, resolve_model, smollm2_path

    torch.set_num_threads(a.threads)
    hf_dir = resolve_model(smollm2_path())
    model, tok = load_model(hf_dir)
    model.eval()
    cfg = model.config
    shape = (cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads)
    windows, corpus = eval_windows(tok, a.seq, a.windows)
    prompt = windows[0:1, :128]
    tmp = a.workdir or tempfile.mkdtemp(prefix="jq-bench-")
    os.makedirs(tmp, exist_ok=True)
    hb = f"head int{a.head_bits} g32" if a.head_bits else "head fp32"
    variants = []  # (label, weights, build() -> path, session options)

    def exported(name, m, level=a.accuracy_level, head_bits=a.head_bits, target="ort", fold=False):
        def build():
            path = os.path.join(tmp, name, "model.onnx")
            export_onnx(m(), path=path, kv_cache=True, tokenizer=tok, accuracy_level=level, head_bits=head_bits,
                        target=target, fold_zero_points=fold)
            return path
        return build

    if a.sweep:
        variants.append(("fp32", "fp32", exported("fp32", lambda: model, 0, None)))
        for bits in (2, 4):
            for group in (32, 64, 128):
                if cfg.hidden_size % group:
                    print(f"  W{bits} g{group}: skipped, {group} does not divide hidden size {cfg.hidden_size}",
                          file=sys.stderr)
                    continue
                for sym in (False, True):
                    variants.append((f"W{bits} g{group} {'sym' if sym else 'zp'} acc{a.accuracy_level}", f"RTN, {hb}",
                                     exported(f"w{bits}g{group}{sym}", lambda b=bits, g=group, s=sym: rtn(model, b, g, s))))
            variants.append((f"W{bits} g{a.group} zp acc0", f"RTN, {hb}",
                             exported(f"w{bits}acc0", lambda b=bits: rtn(model, b, a.group), 0)))
    else:
        variants.append(("fp32", "fp32", exported("fp32", lambda: model, 0, None)))
        variants.append((f"jacquant W4 g{a.group}", f"RTN, {hb}", exported("w4", lambda: rtn(model, 4, a.group))))
        if a.model:
            variants.append(("jacquant W2", f"trained ({a.model}), {hb}",
                             exported("w2", lambda: load_trained(hf_dir, a.model)[0])))
        else:
            variants.append((f"jacquant W2 g{a.group}", f"RTN, {hb}", exported("w2", lambda: rtn(model, 2, a.group))))
            variants.append((f"jacquant W2 g{a.group} zp folded", f"RTN, {hb}, fold_zero_points",
                             exported("w2fold", lambda: rtn(model, 2, a.group), fold=True)))
            variants.append((f"jacquant W2 g{a.group} standard ops", f"RTN, {hb}, DQ+MatMul",
                             exported("w2std", lambda: rtn(model, 2, a.group), target="onnx")))
        if not a.no_genai:
            variants.append(("ort-genai int4", "builder -p int4 (g32 sym, head int4)",
                             lambda: build_genai(hf_dir, os.path.join(tmp, "genai_int4"))))
    rows, base = [], {}
    for label, what, build in variants:
        try:
            path = build()
            if path is None:
                continue
            sess = make_session(path, a.threads)
            run = Runner(sess, *shape)
            pre, dec = run.timings(prompt, a.new_tokens, a.reps)
            ppl = run.perplexity(windows)
            del sess, run
        except Exception as e:  # one failing row must not lose the others' locked minutes
            print(f"  {label}: FAILED {type(e).__name__}: {str(e)[:300]}", file=sys.stderr, flush=True)
            continue
        if label == "fp32":
            base = {"pre": pre, "dec": dec}
        rows.append((label, what, file_size(path), pre, dec, ppl))
        print(f"  {label}: prefill {pre:.3f} s, decode {dec:.1f} tok/s, ppl {ppl:.2f}", file=sys.stderr, flush=True)
        if a.profile:
            prof = profile_ops(path, shape, prompt, a.new_tokens, a.threads)
            for phase, ops in prof.items():
                total = sum(ops.values())
                print(f"  profile {label} {phase}: {total:.2f} ms of kernels per run; " + ", ".join(
                    f"{k} {v / total:.0%}" for k, v in list(ops.items())[:6]))
        if label == "ort-genai int4":
            gp, gd = genai_runtime(os.path.dirname(path), prompt, a.new_tokens, a.reps, a.threads)
            rows.append(("ort-genai int4", "its own runtime (og.Generator)", file_size(path), gp, gd, None))
    table(rows, base, f"SmolLM2-135M-Instruct, onnxruntime {ort.__version__} CPU, {a.threads} threads, "
                      f"MatMulNBits accuracy_level {a.accuracy_level} (fp32 row: plain MatMul); prefill = 128-token "
                      f"prompt, decode = {a.new_tokens} tokens, median of {a.reps}; perplexity on {a.windows} x "
                      f"{a.seq} tokens of {corpus.split(' (')[0]} validation text")
    print(f"reference, not measured here: {LLAMA_CPP}")
    if not a.workdir:
        shutil.rmtree(tmp, ignore_errors=True)


def micro(a) -> None:
    """The 3 x dim x dim linear stack: fp32 vs W2 (ort acc4/acc0, onnx DQ+MatMul), rotating weight copies."""
    import torch.nn as nn

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(a.dim, a.dim, bias=False) for _ in range(a.layers)]).eval()
    example = torch.randn(2, a.dim)
    tmp = tempfile.mkdtemp()
    paths = {"fp32": os.path.join(tmp, "fp32.onnx")}
    torch.onnx.export(model, (example,), paths["fp32"], dynamo=True, opset_version=21, verbose=False,
                      dynamic_shapes=({0: torch.export.Dim.AUTO},))
    jacquant.transform(model, bits=a.bits, group=a.group, method="ste", init="minmax")
    variants = [("fp32", None, None), (f"W{a.bits} ort acc4", "ort", 4), (f"W{a.bits} ort acc0", "ort", 0),
                (f"W{a.bits} onnx (DQ+MatMul)", "onnx", 0)]
    for label, target, level in variants[1:]:
        paths[label] = os.path.join(tmp, f"{target}{level}.onnx")
        export_onnx(model, (example,), paths[label], target=target, accuracy_level=level)
    rows, base = [], {}
    for label, _, _ in variants:
        size = os.path.getsize(paths[label]) if label != "fp32" else _fp32_size(paths[label])
        copies = max(1, math.ceil(a.cold_mib * 2**20 / size))
        sessions = [make_session(paths[label], a.threads) for _ in range(copies)]  # each holds its own weights
        lat = {m: _rotating_latency(sessions, m, a.dim, a.reps) for m in (1, 128)}
        del sessions
        if label == "fp32":
            base = {"size": size, **lat}
        rows.append((label, size / 2**20, copies, base["size"] / size, lat[1], base[1] / lat[1], lat[128],
                     base[128] / lat[128]))
    print(f"{a.layers} x Linear({a.dim}, {a.dim}), W{a.bits} g{a.group}, onnxruntime {ort.__version__} CPU, "
          f"{a.threads} threads, median of {a.reps} passes over copies of the weights totalling >= {a.cold_mib} MiB")
    head = ("model", "size MiB", "copies", "fp32/size", "M=1 ms", "speedup", "M=128 ms", "speedup")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print(f"| {r[0]} | {r[1]:.2f} | {r[2]} | {r[3]:.1f}x | {r[4]:.3f} | {r[5]:.2f}x | {r[6]:.2f} | {r[7]:.2f}x |")


def _fp32_size(path: str) -> int:
    return file_size(path)


def _rotating_latency(sessions: list, m: int, dim: int, reps: int) -> float:
    """Median ms per call, each call on the next session in turn (so its weights were evicted meanwhile)."""
    x = np.random.default_rng(0).standard_normal((m, dim), dtype=np.float32)
    name = sessions[0].get_inputs()[0].name
    for s in sessions:
        s.run(None, {name: x})
    times = []
    for r in range(reps * len(sessions)):
        s = sessions[r % len(sessions)]
        t = time.perf_counter()
        s.run(None, {name: x})
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--group", type=int, default=64, help="jacquant rows' group (default 64)")
    ap.add_argument("--head-bits", type=int, default=8, choices=(0, 4, 8),
                    help="RTN width of the tied LM head / embedding in jacquant rows (0 = fp32; default 8)")
    ap.add_argument("--accuracy-level", type=int, default=4, choices=(0, 4))
    ap.add_argument("--model", default=None, help="a `jacquant train --out DIR` output for the W2 row")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--no-genai", action="store_true")
    ap.add_argument("--workdir", default=None, help="keep the exports here (default: a temporary directory)")
    ap.add_argument("--sweep", action="store_true", help="W2 block size / zero point / accuracy level configurations")
    ap.add_argument("--micro", action="store_true", help="the linear-stack micro benchmark instead")
    ap.add_argument("--profile", action="store_true", help="print each row's kernel time per op type")
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--cold-mib", type=int, default=128, help="--micro: MiB of weight copies to rotate through")
    a = ap.parse_args()
    a.head_bits = a.head_bits or None
    if a.micro:
        a.reps = max(a.reps, 10)
        micro(a)
    else:
        llm(a)


if __name__ == "__main__":
    main()
