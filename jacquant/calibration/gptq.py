"""``jacquant.calibrate``: a calibrated start for QAT, GPTQ block by block on the model's own grid.

A transformed model starts at round-to-nearest (RTN): every weight rounded alone, its group's scale
from the MSE clipping search. :func:`calibrate` replaces that start, block by block, with GPTQ
(:mod:`jacquant.primitives.gptq`): for block i,

    1. run block i on the cached inputs X_i (outputs of the already calibrated blocks 0..i−1) and
       accumulate, for each quantized site, H = Σ x^T x over its own input x;
    2. GPTQ each site's weight against its H: the latent weights, scales and zero points of the site
       are replaced (the grid, bits and group are the site's own);
    3. run the calibrated block on X_i: its outputs are X_{i+1}.

Only one block's inputs live in memory at a time (:class:`jacquant.calibration.blocks.ActivationCache`, on disk
past its byte budget), so memory stays bounded by the calibration activations of one layer.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor
from tqdm import tqdm

from jacquant.calibration.blocks import capture_inputs, find_blocks
from jacquant.primitives.formats import fp16_scale
from jacquant.primitives.gptq import gptq_quantize, output_error
from jacquant.primitives.grid import fake_quantize
from jacquant.qat.quantizer import Site, sites


def default_run(model: nn.Module, x: Tensor) -> Any:
    """``model(input_ids=x, use_cache=False)`` for a Hugging Face model, else ``model(x)``."""
    if hasattr(model, "config") and hasattr(model, "get_input_embeddings"):
        return model(input_ids=x, use_cache=False)
    return model(x)


@torch.no_grad()
def calibrate(
    model: nn.Module,
    batches: Sequence[Tensor],
    *,
    damp: float = 0.01,
    run: Optional[Callable[[nn.Module, Tensor], Any]] = None,
    max_cache_bytes: int = 2 << 30,
    progress: bool = True,
) -> list[dict]:
    """GPTQ every quantized site of a transformed ``model``, block by block, on calibration ``batches``.

    ``batches``: token batches [b, T] of one length T (``run(model, batch)`` runs the model on one,
    :func:`default_run` by default). ``damp`` is GPTQ's λ. In place; returns per site
    ``{"site", "block", "rtn_error", "gptq_error"}``: the calibration output errors ‖X(W − Q)^T‖² of the
    round-to-nearest start and of GPTQ's result, on the inputs the site saw (after the blocks before it
    were calibrated). GGUF scale-and-min sites (Q4_1, Q2_K) keep their start (a warning; rows with "skipped").
    Raises ValueError for a model without quantized blocks, without batches, or with nothing to calibrate.
    """
    batches = list(batches)
    if not batches:
        raise ValueError("calibrate: no calibration batch was given")
    run = run or default_run
    _, blocks = find_blocks(model)
    affine = [s.name for s in sites(model) if _affine(s)]
    if len(affine) == sum(1 for _ in sites(model)):
        raise ValueError("calibrate: GPTQ runs on integer grids s·(c − z) (jacquant's own, GGUF's Q4_0); every site of "
                         "this model has a scale-and-min GGUF format (Q4_1, Q2_K), so there is nothing to calibrate")
    if affine:
        warnings.warn(f"calibrate: {len(affine)} scale-and-min GGUF sites (e.g. `{affine[0]}`) keep their round-to-"
                      "nearest start; GPTQ calibrates the integer-grid sites only", stacklevel=2)
    was_training = model.training
    model.eval()
    report: list[dict] = []
    inputs = None
    try:
        inputs = capture_inputs(model, blocks[0], batches, run, max_cache_bytes)
        for i, block in enumerate(tqdm(blocks, desc="calibrate (GPTQ)", disable=not progress, leave=False)):
            for shared, h in _hessians(block, list(sites(block)), inputs):
                report += [{"block": i, "site": st.name, "skipped": "scale-and-min format"} for st in shared if _affine(st)]
                shared = [st for st in shared if not _affine(st)]
                if shared:
                    report += [{"block": i, **r} for r in _gptq_sites(shared, h, damp)]
            _forward_in_place(block, inputs)
    finally:
        if inputs is not None:
            inputs.hidden.close()
        model.train(was_training)
    return report


def _hessians(block: nn.Module, found: list[Site], inputs) -> list[tuple[list[Site], Tensor]]:
    """[(sites that read one input, H = Σ x^T x)] over every cached input batch (float64, each batch's
    product in float32). Sites fed the same tensor (q, k, v; gate, up) share one H."""
    by_input: dict = {}  # input key of the first batch -> (sites, H)
    first: dict = {}

    def hook(st: Site):
        def f(module, args):
            x = args[0]
            key = (x.data_ptr(), tuple(x.shape))  # x is held in memo, so no later tensor reuses its address
            if key not in memo:
                x2 = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
                memo[key] = (x, (x2.t() @ x2).to(torch.float64))
                order.append(key)
            seen.setdefault(key, []).append(st)
        return f

    handles = [st.quantizer.register_forward_pre_hook(hook(st)) for st in found]
    try:
        for _, x in _chunks(inputs):
            memo, order, seen = {}, [], {}
            block(x, **inputs.kwargs_for(x.shape[0]))
            for j, key in enumerate(order):  # inputs in call order: the j-th distinct input of every batch
                names = tuple(st.name for st in seen[key])
                if j not in first:
                    first[j] = names
                    by_input[j] = (seen[key], memo[key][1])
                elif first[j] != names:
                    raise RuntimeError(f"block inputs changed between batches: {first[j]} then {names}")
                else:
                    by_input[j] = (by_input[j][0], by_input[j][1] + memo[key][1])
    finally:
        for h in handles:
            h.remove()
    missing = {st.name for st in found} - {st.name for sts, _ in by_input.values() for st in sts}
    if missing:
        raise RuntimeError(f"calibrate: sites {sorted(missing)} were never called by their block's forward")
    return list(by_input.values())


def _affine(st: Site) -> bool:
    """A GGUF scale-and-min site (Q4_1, Q2_K): its grid is s·c + m, which GPTQ's integer grid does not cover."""
    return getattr(st.quantizer, "format", None) not in (None, "q4_0")


def _chunks(inputs):
    n, b = len(inputs.hidden), inputs.batch
    for r in range(0, n, b):
        rows = slice(r, min(r + b, n))
        yield rows, inputs.hidden.read(rows)


def _forward_in_place(block: nn.Module, inputs) -> None:
    for rows, x in _chunks(inputs):
        out = block(x, **inputs.kwargs_for(x.shape[0]))
        inputs.hidden.write(rows.start, out[0] if isinstance(out, tuple) else out)


def _gptq_sites(shared: list[Site], h: Tensor, damp: float) -> list[dict]:
    """GPTQ of the sites that read one input, as one matrix (their rows stacked: H is theirs in common)
    when they share bits, group and grid, else one by one."""
    qs = [st.quantizer for st in shared]
    if len({(q.bits, q.group, q.init, q.symmetric, q.format) for q in qs}) > 1:
        return [r for st in shared for r in _gptq_sites([st], h, damp)]
    q0 = qs[0]
    ws = [q.as_nk(st.weight).detach() for q, st in zip(qs, shared)]
    w = torch.cat(ws)
    q4_0 = q0.format == "q4_0"  # GGUF's Q4_0: zero point 8
    latent, scale, zero = gptq_quantize(w, h, q0.bits, q0.group, init="mse" if q0.init == "llama" else q0.init,
                                        symmetric=q0.symmetric or q4_0, damp=damp,
                                        stored_scale=fp16_scale)  # every grid's forward multiplies by fp16(s)
    out, row = [], 0
    for st, q, wi in zip(shared, qs, ws):
        rows = slice(row, row + wi.shape[0])
        row += wi.shape[0]
        rtn = fake_quantize(wi, q.effective_scale().detach(), q.zero_point, q.bits, q.group)
        gptq = fake_quantize(latent[rows], scale[rows], zero[rows], q.bits, q.group)
        out.append({"site": st.name, "rtn_error": output_error(wi, rtn, h), "gptq_error": output_error(wi, gptq, h)})
        q.as_nk(st.weight).copy_(latent[rows])
        q.scale.copy_(scale[rows].to(q.scale.dtype))
        q.zero_point.copy_(zero[rows])
    return out
