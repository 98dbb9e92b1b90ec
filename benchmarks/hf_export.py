"""SmolLM2-135M back in transformers: the compressed-tensors export against the converted jacquant model, beside
the ONNX and GGUF exports of the same model.

Per grid (W2, W3, W4 g64, and GGUF's Q4_0 grid), from a quick GPTQ start (``--calib-windows`` windows of 256
tokens of the training text, no QAT: the export is what is measured, not the training):

  transformers    jacquant.export_hf, then AutoModelForCausalLM.from_pretrained(dir) (compressed-tensors
                  pack-quantized, dequantized at load): max |Δlogit| against the converted jacquant model over the
                  held-out windows, greedy tokens on lm_track.PROMPTS (24 tokens, no cache in both), held-out
                  perplexity both ways, bytes on disk, load seconds, prefill (128-token prompt) and decode (64
                  one-token steps with the KV cache) tokens/s, best of ``--reps``
  onnxruntime     jacquant.export_onnx(kv_cache=True), MatMulNBits accuracy_level 4, fp32 head (W2, W4, Q4_0;
                  3-bit codes have no MatMulNBits kernel), timed as benchmarks/export.py does
  llama.cpp       jacquant.export_gguf (Q4_0 grid only), llama-cpp-python

Held-out perplexity: the main job's windows (lm_track.DEFAULT: 32 x 257 tokens of the Python docs validation).
Every runtime runs on ``--threads`` threads.

    nice -n 19 env OMP_NUM_THREADS=1 python benchmarks/hf_export.py --threads 1
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from jacquant.app import data, lm_track, models
from jacquant.app.pipeline import calibrated_start, calibration_set
from jacquant.config import QuantConfig
from jacquant.export import export_gguf, export_hf, export_onnx
from jacquant.export.convert import convert

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from export import Runner, file_size, make_session  # noqa: E402  (benchmarks/export.py)


@torch.no_grad()
def compare(ours, theirs, windows: torch.Tensor, batch: int = 4) -> dict:
    """Held-out perplexity of both models over ``windows`` [n, T + 1] and the largest |logit difference|."""
    nll_a = nll_b = 0.0
    diff, top = 0.0, 0.0
    for i in range(0, len(windows), batch):
        w = windows[i:i + batch]
        a = ours(input_ids=w[:, :-1], use_cache=False).logits
        b = theirs(input_ids=w[:, :-1], use_cache=False).logits
        diff = max(diff, float((a - b).abs().max()))
        top = max(top, float(a.abs().max()))
        target = w[:, 1:].reshape(-1)
        nll_a += float(F.cross_entropy(a.reshape(-1, a.shape[-1]), target)) * len(w)
        nll_b += float(F.cross_entropy(b.reshape(-1, b.shape[-1]), target)) * len(w)
    return {"ppl_jacquant": math.exp(nll_a / len(windows)), "ppl_hf": math.exp(nll_b / len(windows)),
            "max_abs_dlogit": diff, "max_abs_logit": top}


@torch.no_grad()
def greedy(model, ids: list[int], steps: int) -> list[int]:
    """Greedy continuation recomputing the whole sequence each step (no cache)."""
    ids = list(ids)
    for _ in range(steps):
        ids.append(int(model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
    return ids[-steps:]


@torch.no_grad()
def hf_speed(model, prompt: torch.Tensor, new_tokens: int, reps: int) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s) in transformers with its KV cache: best of ``reps`` after a warm-up."""
    best_p = best_d = 0.0
    for r in range(reps + 1):
        t = time.perf_counter()
        out = model(input_ids=prompt, use_cache=True)
        p = time.perf_counter() - t
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t = time.perf_counter()
        for _ in range(new_tokens):
            out = model(input_ids=tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        d = time.perf_counter() - t
        if r:
            best_p, best_d = max(best_p, prompt.shape[1] / p), max(best_d, new_tokens / d)
    return best_p, best_d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grids", default="2,3,4,q4_0", help="bit widths (group 64) and/or q4_0")
    ap.add_argument("--calib-windows", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--greedy-tokens", type=int, default=24)
    ap.add_argument("--no-onnx", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/hf_export.jsonl")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from transformers import AutoModelForCausalLM

    fp, tok, _ = models.load_fp()
    fp.eval()
    toks = lm_track.tokens(data.load_corpus(), tok)
    windows = lm_track.eval_windows(toks.valid, lm_track.DEFAULT.eval_windows, lm_track.DEFAULT.eval_seq)
    pipe = replace(lm_track.DEFAULT.pipeline, calib_windows=a.calib_windows)
    calib = calibration_set(pipe, toks.train, 0, force=True)
    prompt = windows[:1, :128]
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in lm_track.PROMPTS]
    tmp = tempfile.mkdtemp(prefix="jq-hf-bench-")
    rows = []

    def emit(row: dict) -> None:
        rows.append(row)
        with open(a.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    for grid in a.grids.split(","):
        label = grid if grid == "q4_0" else f"W{grid} g64"
        config = QuantConfig(format="q4_0") if grid == "q4_0" else QuantConfig(bits=int(grid), group=64)
        t0 = time.perf_counter()
        ours = convert(calibrated_start(fp, config, replace(pipe, start="gptq"), calib, progress=False)).eval()
        start_s = time.perf_counter() - t0
        hf_dir = os.path.join(tmp, f"hf-{grid}")
        t0 = time.perf_counter()
        info = export_hf(ours, hf_dir, tokenizer=tok)
        export_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        hf = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
        load_s = time.perf_counter() - t0
        scores = compare(ours, hf, windows)
        same = [greedy(ours, p, a.greedy_tokens) == greedy(hf, p, a.greedy_tokens) for p in prompts]
        pre, dec = hf_speed(hf, prompt, a.new_tokens, a.reps)
        emit({"grid": label, "runtime": f"transformers (compressed-tensors, {a.threads} threads)", **scores,
              "greedy_match": f"{sum(same)}/{len(same)}", "bytes": info["bytes"],
              "safetensors_bytes": os.path.getsize(os.path.join(hf_dir, "model.safetensors")), "load_s": load_s,
              "export_s": export_s, "start_s": start_s, "prefill_tok_s": pre, "decode_tok_s": dec})
        del hf
        if not a.no_onnx and grid != "3":
            path = os.path.join(tmp, f"onnx-{grid}", "model.onnx")
            export_onnx(ours, path=path, kv_cache=True, tokenizer=tok, accuracy_level=4)
            cfg = fp.config
            run = Runner(make_session(path, a.threads), cfg.num_hidden_layers, cfg.num_key_value_heads,
                         cfg.hidden_size // cfg.num_attention_heads)
            p_s, d = run.timings(prompt.numpy(), a.new_tokens, a.reps)
            emit({"grid": label, "runtime": f"onnxruntime (MatMulNBits level 4, {a.threads} threads)",
                  "ppl": run.perplexity(windows.numpy()), "bytes": file_size(path),
                  "prefill_tok_s": prompt.shape[1] / p_s, "decode_tok_s": d})
            del run
        if grid == "q4_0":
            from jacquant.export import llamacpp

            path = os.path.join(tmp, "q4_0.gguf")
            export_gguf(ours, path, source_gguf=models.smollm2_path())
            sp = llamacpp.speed(path, prompt[0].tolist(), a.new_tokens, threads=a.threads, repeats=a.reps)
            emit({"grid": label, "runtime": f"llama.cpp ({a.threads} threads)",
                  "ppl": llamacpp.perplexity(path, windows, threads=a.threads)["ppl"],
                  "bytes": os.path.getsize(path), "prefill_tok_s": sp["prefill_tokens_per_s"],
                  "decode_tok_s": sp["decode_tokens_per_s"]})
        del ours
    print(table(rows))


def table(rows: list[dict]) -> str:
    head = ["grid", "runtime", "max abs Δlogit vs jacquant", "greedy tokens equal (3 prompts)", "ppl (jacquant)",
            "ppl (runtime)", "MiB on disk", "load s", "prefill tok/s", "decode tok/s"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ppl = r.get("ppl_hf", r.get("ppl"))
        out.append(f"| {r['grid']} | {r['runtime']} | {r['max_abs_dlogit']:.2e} | " if "max_abs_dlogit" in r else
                   f"| {r['grid']} | {r['runtime']} | – | ")
        out[-1] += (f"{r.get('greedy_match', '–')} | {r['ppl_jacquant']:.2f} | " if "ppl_jacquant" in r else "– | – | ")
        pre, dec = r.get("prefill_tok_s"), r.get("decode_tok_s")
        out[-1] += (f"{ppl:.2f} | {r['bytes'] / 2**20:.1f} | {r['load_s']:.1f} | " if "load_s" in r else
                    f"{ppl:.2f} | {r['bytes'] / 2**20:.1f} | – | ")
        out[-1] += f"{pre:.0f} | {dec:.1f} |" if pre and dec else "– | – |"
    return "\n".join(out)


if __name__ == "__main__":
    main()
