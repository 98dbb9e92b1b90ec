"""The table a user needs: SmolLM2-135M at 2, 3 and 4 bits by every system, scored the same way.

Rows, per bit width b in ``--bits``:
  rtn                      jacquant's round-to-nearest grid (W_b g64, MSE clipping search), no data
  gptq                     jacquant.calibrate (GPTQ) on the calibration windows, no training
  pipeline <method>        the main job's pipeline (lm_track.DEFAULT: GPTQ start, block-wise phase if any,
                           end-to-end KD) with each method's backward rule; ``--ce`` adds CE rows
and once:
  fp                       SmolLM2 as shipped (the Q4_1 file dequantized to fp32, in PyTorch)
  llama.cpp <ftype>        llama.cpp's own PTQ of the shipped Q4_1 file (``llama_model_quantize``), with and
                           without an importance matrix from the same calibration windows, run by llama.cpp
  llama.cpp Q4_1           the shipped file itself, run by llama.cpp
  autoround                rows of benchmarks/results/autoround.jsonl (benchmarks/autoround.py, its own venv)

Columns: held-out perplexity on the main job's windows (Python docs validation, 32 x 257 tokens) and on a
second English text nothing is tuned on (the Debian FAQ, 64 x 129 tokens), each from the system's own
logits; the mean KL(p_fp ‖ p) per token on the main windows; bits per weight of the decoder's linear layers
with scales and zero points counted; calibration and training tokens; wall time of the quantization.

    flock /tmp/jacquant-cpu.lock python benchmarks/usable2bit.py --bits 2,3,4 --out benchmarks/results/usable2bit

Rows accumulate in ``--out``/rows.jsonl over calls (the plot shows them all), so a table can be built in parts,
e.g. ``--bits 2 --methods '' --ce ste --llama`` then ``--bits 3,4 --methods stableqat --ce ''``.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import replace

import torch

from jacquant.app import data, lm_track, models
from jacquant.app.pipeline import Seeds, calibrated_start, calibration_set, train_phases
from jacquant.app.recipes import recipe as named_recipe
from jacquant.config import QuantConfig
from jacquant.qat.quantizer import sites


def jacquant_bpw(model: torch.nn.Module) -> float:
    """Bits per weight of the quantized linear layers as the transformers checkpoint stores them (and as AutoRound
    counts its own): b-bit codes, one fp16 scale and one b-bit zero point per group of G."""
    bits = total = 0
    for s in sites(model):
        q = s.quantizer
        n = s.weight.numel()
        bits += n * q.bits + (n // q.group) * (16 + q.bits)
        total += n
    return bits / total


def gguf_bpw(path: str) -> float:
    """Bits per weight of a GGUF file's decoder matmul weights (blk.*.attn_{q,k,v,output}, ffn_{gate,up,down}),
    from each tensor's stored bytes."""
    from gguf import GGUFReader

    bits = total = 0
    for t in GGUFReader(path).tensors:
        if t.name.startswith("blk.") and t.name.endswith(".weight") and len(t.shape) == 2:
            bits += int(t.n_bytes) * 8
            total += int(t.n_elements)
    return bits / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", default="2,3,4")
    ap.add_argument("--methods", default="ste,stableqat,jacquant")
    ap.add_argument("--ce", default="ste", help="methods that also get a CE row at the first bit width ('' for none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--llama", action="store_true", help="llama.cpp rows (needs llama-cpp-python)")
    ap.add_argument("--out", default="benchmarks/results/usable2bit")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    jsonl = os.path.join(a.out, "rows.jsonl")
    fp, tok, info = models.load_fp()
    toks = lm_track.tokens(data.load_corpus(), tok)
    main_w = lm_track.eval_windows(toks.valid, lm_track.DEFAULT.eval_windows, lm_track.DEFAULT.eval_seq)
    other_w = lm_track.other_windows(tok)
    budget = lm_track.DEFAULT
    pipe = budget.pipeline
    calib = calibration_set(pipe, toks.train, a.seed, force=True)
    rows = []

    def emit(row: dict) -> None:
        rows.append(row)
        with open(jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"| {row['system']} | {row.get('bits', '')} | {row['ppl']:.2f} | {row['ppl_other']:.2f} | "
              f"{row['kl']:.4f} | {row['bpw']:.2f} | {row['calib_tokens']:,} | {row['train_tokens']:,} | "
              f"{row['seconds']:.0f} |", flush=True)

    def scored(model) -> dict:
        return {"ppl": lm_track.perplexity(model, main_w), "ppl_other": lm_track.perplexity(model, other_w),
                "kl": lm_track.mean_kl(model, fp, main_w)}

    print("| system | bits | ppl (Python docs) | ppl (Debian FAQ) | KL to fp | bpw | calib tokens | train tokens | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    emit({"system": "fp (Q4_1 as shipped, dequantized)", "bits": 32, **scored(fp), "bpw": 32.0, "calib_tokens": 0,
          "train_tokens": 0, "seconds": 0.0})
    for i, bits in enumerate(int(b) for b in a.bits.split(",")):
        config = QuantConfig(bits=bits, group=64)
        t0 = time.perf_counter()
        rtn = calibrated_start(fp, config, replace(pipe, start="rtn"), None)
        emit({"system": "jacquant rtn", "bits": bits, **scored(rtn), "bpw": jacquant_bpw(rtn), "calib_tokens": 0,
              "train_tokens": 0, "seconds": time.perf_counter() - t0})
        del rtn
        t0 = time.perf_counter()
        start = calibrated_start(fp, config, replace(pipe, start="gptq"), calib, frozen_embedding=True)
        start_s = time.perf_counter() - t0
        calib_tokens = pipe.calib_windows * pipe.calib_seq
        emit({"system": "jacquant gptq", "bits": bits, **scored(start), "bpw": jacquant_bpw(start),
              "calib_tokens": calib_tokens, "train_tokens": 0, "seconds": start_s})
        runs = [(m, budget.loss) for m in a.methods.split(",") if m]
        runs += [(m, "ce") for m in a.ce.split(",") if m and i == 0]
        for method, loss in runs:
            recipe = named_recipe(method)
            t0 = time.perf_counter()
            model, _ = train_phases(start, fp, recipe, budget, lm_track.loss_fn(loss, fp), toks.train, calib,
                                    Seeds.main_job(a.seed), progress=False, desc=f"W{bits} {method} {loss}")
            seconds = time.perf_counter() - t0 + start_s
            emit({"system": f"jacquant pipeline {method}" + (" (CE)" if loss == "ce" else ""), "bits": bits,
                  **scored(model), "bpw": jacquant_bpw(model), "calib_tokens": calib_tokens,
                  "train_tokens": budget.e2e_tokens, "seconds": seconds, "loss": loss})
            del model
        del start
    if a.llama:
        llama_rows(fp, calib, main_w, other_w, emit)
    autoround = os.path.join(os.path.dirname(__file__), "results", "autoround.jsonl")
    extra = []
    if os.path.exists(autoround):  # benchmarks/autoround.py ran in its own venv: its rows, same windows
        for line in open(autoround):
            r = json.loads(line)
            row = {"system": "autoround", "bits": r["bits"], "ppl": r["ppl"], "ppl_other": float("nan"),
                   "kl": r["kl"], "bpw": r["bits_per_weight"], "calib_tokens": r["calibration_tokens"],
                   "train_tokens": 0, "seconds": r["quantize_seconds"]}
            extra.append(row)
            print(f"| {row['system']} | {row['bits']} | {row['ppl']:.2f} | – | {row['kl']:.4f} | {row['bpw']:.2f} | "
                  f"{row['calib_tokens']:,} | 0 | {row['seconds']:.0f} |", flush=True)
    plot(os.path.join(a.out, "bpw_vs_ppl.png"), [json.loads(x) for x in open(jsonl)] + extra)  # every call's rows


def llama_rows(fp, calib, main_w, other_w, emit) -> None:
    """llama.cpp's own files, scored by llama.cpp's logits (KL against the fp PyTorch model's)."""
    import torch.nn.functional as F

    from jacquant.app.models import smollm2_path
    from jacquant.export import llamacpp

    src = smollm2_path()

    @torch.no_grad()
    def reference(i: int) -> torch.Tensor:
        return F.log_softmax(fp(input_ids=main_w[i:i + 1, :-1], use_cache=False).logits[0].float(), -1)

    def scored(path: str) -> dict:
        main = llamacpp.perplexity(path, main_w, reference=reference)
        return {"ppl": main["ppl"], "kl": main["kl"], "ppl_other": llamacpp.perplexity(path, other_w)["ppl"],
                "bpw": gguf_bpw(path), "mib": os.path.getsize(path) / 2 ** 20}

    emit({"system": "llama.cpp Q4_1 (as shipped)", **scored(src), "calib_tokens": 0, "train_tokens": 0, "seconds": 0.0})
    t0 = time.perf_counter()
    imatrix = llamacpp.importance_matrix(fp, calib)
    imatrix_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        for ftype in ("Q4_0", "Q3_K_S", "Q2_K"):
            for im in (None, imatrix):
                t0 = time.perf_counter()
                path = os.path.join(tmp, f"{ftype}{'-imat' if im else ''}.gguf")
                llamacpp.quantize(src, path, ftype, imatrix=im)
                seconds = time.perf_counter() - t0 + (imatrix_s if im else 0.0)
                emit({"system": f"llama.cpp {ftype}" + (" + imatrix" if im else ""), **scored(path),
                      "calib_tokens": calib.numel() if im else 0, "train_tokens": 0, "seconds": seconds})


def plot(path: str, rows: list[dict]) -> None:
    """Bits per weight against held-out perplexity (log scale), one point per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for r in rows:
        if r["bpw"] > 16:
            ax.axhline(r["ppl"], color="grey", ls="--", lw=1)
            ax.text(2.05, r["ppl"] * 1.03, "fp (as shipped)", color="grey", fontsize=8)
            continue
        color = "tab:red" if r["system"].startswith("llama.cpp") else "tab:green" if "autoround" in r["system"] \
            else "tab:blue"
        ax.scatter(r["bpw"], r["ppl"], color=color, s=18)
        ax.annotate(r["system"].replace("jacquant ", "").replace("pipeline ", "") + (f" W{r['bits']}" if r.get("bits") else ""),
                    (r["bpw"], r["ppl"]), fontsize=6, xytext=(3, 2), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight of the decoder's linear layers (scales and zero points counted)")
    ax.set_ylabel("held-out perplexity, Python docs (log)")
    ax.set_title("SmolLM2-135M: size against quality (blue jacquant, red llama.cpp, green AutoRound)")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


if __name__ == "__main__":
    main()
