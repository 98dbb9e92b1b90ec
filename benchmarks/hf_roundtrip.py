"""A peer's quantized checkpoint trained further by jacquant: SmolLM2-135M quantized by compressed-tensors' own tools
(min/max asymmetric INT weights, group 64, round to nearest: what a PTQ tool without calibration writes), saved in
its pack-quantized format, loaded back into jacquant as a QAT start (:func:`jacquant.export.hf.load_hf_quantized`:
the checkpoint's codes and scales), trained for ``--budget`` seconds with the pipeline of ``jacquant train`` (the
checkpoint is the start, so no GPTQ; then the block-wise rounding search and end-to-end KD from the fp model,
half the time each, every phase kept only if it lowers the tuning-slice perplexity), then scored on the main job's
held-out windows, beside the checkpoint as transformers loads it.

    python benchmarks/hf_roundtrip.py --bits 4 --budget 300
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
from jacquant.app.blockwise import BlockwiseConfig
from jacquant.app.pipeline import (
    Seeds,
    calibration_set,
    e2e_lr,
    freeze_embedding,
    run_phases,
    timed_budget,
)
from jacquant.app.recipes import recipe as named_recipe
from jacquant.export.hf import load_dense, load_hf_quantized


def peer_checkpoint(fp: torch.nn.Module, tok, bits: int, group: int, path: str) -> None:
    """``fp`` quantized and packed by compressed-tensors alone (its calculate_qparams on each group's min and max),
    written to ``path`` with the tokenizer."""
    import copy

    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils import calculate_qparams

    dense = copy.deepcopy(fp)
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=False, strategy="group", group_size=group)
    apply_quantization_config(dense, QuantizationConfig(
        config_groups={"g": QuantizationScheme(targets=["Linear"], weights=args)}, ignore=["lm_head"]))
    for m in dense.modules():
        if getattr(m, "quantization_scheme", None) is None:
            continue
        w = m.weight.detach()
        wg = w.reshape(w.shape[0], -1, group)
        scale, zp = calculate_qparams(wg.amin(-1), wg.amax(-1), args)
        with torch.no_grad():
            m.weight_scale.copy_(scale)
            m.weight_zero_point.copy_(zp)
    compressor = ModelCompressor.from_pretrained_model(dense, quantization_format="pack-quantized")
    compressor.compress_model(dense)
    dense.save_pretrained(path)
    compressor.update_config(path)
    tok.save_pretrained(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--budget", type=float, default=300.0, help="wall seconds of training")
    ap.add_argument("--method", default="ste")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/hf_roundtrip.jsonl")
    a = ap.parse_args()
    fp, tok, _ = models.load_fp()
    toks = lm_track.tokens(data.load_corpus(), tok)
    base = lm_track.DEFAULT
    main_w = lm_track.eval_windows(toks.valid, base.eval_windows, base.eval_seq)
    tune_w = lm_track.eval_windows(toks.tune, base.tune_windows, base.eval_seq)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "peer")
        t0 = time.perf_counter()
        peer_checkpoint(fp, tok, a.bits, a.group, path)
        ppl_peer = lm_track.perplexity(load_dense(path), main_w)  # as transformers loads it
        recipe = named_recipe(a.method)
        model = load_hf_quantized(path, method=recipe.rule)
        ppl_start = lm_track.perplexity(model, main_w)
        calib = calibration_set(base.pipeline, toks.train, a.seed, force=True)
        budget = replace(base, steps=0, lr=e2e_lr(a.bits), pipeline=replace(base.pipeline, block=BlockwiseConfig(
            steps=0, lr=0.02, scale_lr=0.02, batch=8)))
        budget = timed_budget(budget, a.budget)
        freeze_embedding(model)
        t1 = time.perf_counter()
        phases = run_phases(model, fp, recipe, budget, lm_track.loss_fn("kd", fp), toks.train, calib,
                            Seeds.main_job(a.seed), progress=False, score=lambda m: lm_track.perplexity(m, tune_w))
        row = {"bits": a.bits, "group": a.group, "peer": "compressed-tensors min/max RTN, pack-quantized",
               "ppl_peer_transformers": ppl_peer, "ppl_start_jacquant": ppl_start,
               "ppl_trained": lm_track.perplexity(model, main_w), "train_seconds": time.perf_counter() - t1,
               "budget": a.budget, "phases": {k: {kk: vv for kk, vv in v.items() if kk != "blocks"}
                                              for k, v in phases.record.items()},
               "total_seconds": time.perf_counter() - t0, "method": a.method, "seed": a.seed}
    print(json.dumps(row))
    with open(a.out, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
