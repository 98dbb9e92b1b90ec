"""The user-facing steps: ``transform`` a model for QAT, and ``summary`` of what was rewritten."""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Optional

import torch
import torch.nn as nn

from jacquant.config import QuantConfig
from jacquant.passes.capture import MatmulSite, capture
from jacquant.passes.rewrite import quantizer_attr, rewrite_owner
from jacquant.primitives.formats import FORMATS, site_format
from jacquant.qat.quantizer import AffineQuantizer, WeightQuantizer, sites


def transform(
    model: nn.Module,
    bits: int = 2,
    group: int = 64,
    method: str = "jacquant",
    *,
    config: Optional[QuantConfig] = None,
    example_inputs: Any = None,
    **options: Any,
) -> nn.Module:
    """Prepare ``model`` for quantization-aware training, in place, and return it.

    The model is captured as an FX graph (``torch.fx.symbolic_trace``, else ``torch.export`` with
    ``example_inputs`` or a Hugging Face model's ``dummy_inputs``); every matmul whose operand is a
    2-D weight (``nn.Linear``, ``F.linear``, ``matmul``/``mm``/``@``/``addmm`` on a Parameter, tied
    heads) becomes ``torch.ops.jacquant.qlinear``: forward ``y = x · Q(W)^T + b`` with
    ``Q(w) = s·(clamp(round(w/s + z), 0, 2^b-1) - z)`` per group of ``group`` inputs, backward by
    ``method`` ("ste", "stableqat", "jacquant"). Embeddings and the LM head stay in full precision
    unless ``include_head=True``. ``options`` are further :class:`QuantConfig` fields (``init``,
    ``symmetric``, ``amplitude``, ``include_head``, ``filter``, ``format``, ``fallback``). With ``format``
    (``"q4_0"``, ``"q4_1"``, ``"q2_k"``) the grid is that GGUF format's, bit for bit (:mod:`jacquant.primitives.formats`).

    Raises ValueError/TypeError naming the layer for unsupported input (bad bits or group, a group
    that does not divide in_features, non-finite weights, no matmul to rewrite, a model already
    transformed, a matmul the pass cannot rewrite).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"transform expects an nn.Module, got {type(model).__name__}")
    cfg = config if config is not None else QuantConfig(bits=bits, group=group, method=method, **options)
    if any(isinstance(m, WeightQuantizer) for m in model.modules()):
        raise ValueError(f"{type(model).__name__} is already transformed by jacquant; transform the original model once")
    cap = capture(model, example_inputs)
    if not cap.sites:
        raise ValueError(f"{type(model).__name__} has no matmul with a weight operand to quantize (captured with "
                         f"{cap.method}); jacquant rewrites nn.Linear, F.linear, matmul and addmm on Parameters")
    head = _head_weights(model, cap.sites, cap.embeddings)
    keep, skipped = [], []
    for s in cap.sites:
        name = site_name(s, model)
        owner = model.get_submodule(s.owner)
        if s.weight in head and not cfg.include_head:
            skipped.append((name, "LM head (include_head=True quantizes it)"))
        elif cfg.filter is not None and not cfg.filter(name, owner):
            skipped.append((name, "excluded by filter"))
        else:
            keep.append(s)
    if not keep:
        raise ValueError(f"every weight matmul of {type(model).__name__} was excluded: {skipped}")
    by_owner: dict[str, dict[str, WeightQuantizer]] = defaultdict(dict)
    owners_of: dict[str, str] = {}
    for s in keep:
        fmt = _validate(model, s, cfg)
        if owners_of.setdefault(s.weight, s.owner) != s.owner:
            raise TypeError(f"weight `{s.weight}` feeds matmuls in two modules (`{owners_of[s.weight]}`, `{s.owner}`); "
                            "exclude one with filter=")
        owner = model.get_submodule(s.owner)
        path = _relative(s.weight, s.owner, model)
        cls = AffineQuantizer if fmt is not None and FORMATS[fmt].affine else WeightQuantizer
        q = cls(owner.get_parameter(path), cfg, name=site_name(s, model), weight_attr=path, op=s.op,
                transposed=s.transposed, format=fmt)
        owner.register_module(quantizer_attr(path), q)
        by_owner[s.owner][path] = q
    for owner_name, quantizers in by_owner.items():
        rewrite_owner(model.get_submodule(owner_name), owner_name, quantizers)
    model.jacquant_skipped = skipped  # shown by summary(): nothing excluded silently
    return model


def site_name(s: MatmulSite, model: nn.Module) -> str:
    """``owner`` for a module's own ``weight`` (an nn.Linear, a tied head), else ``owner:weight_path``."""
    path = _relative(s.weight, s.owner, model)
    if path == "weight":
        return s.owner or "<root>"
    return path if s.owner == "" else f"{s.owner}:{path}"


def _relative(weight: str, owner: str, model: nn.Module) -> str:
    """The weight's path from its owner; a weight outside the owner's subtree is refused."""
    if owner == "":
        return weight
    if weight.startswith(owner + "."):
        return weight[len(owner) + 1:]
    p = model.get_parameter(weight)
    for name, q in model.get_submodule(owner).named_parameters(remove_duplicate=False):
        if q is p:
            return name
    raise TypeError(f"layer `{owner}` multiplies by `{weight}`, which is not one of its own parameters; "
                    "jacquant rewrites matmuls in the module that owns the weight; exclude it with filter=")


def _head_weights(model: nn.Module, found: list[MatmulSite], embeddings: set[str]) -> set[str]:
    """Weights of LM heads: tied to an embedding, the model's output embeddings, or [vocab, d] like one."""
    heads = {s.weight for s in found if s.tied}
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    emb_shapes = {tuple(model.get_parameter(e).shape) for e in embeddings}
    for s in found:
        if out is not None and getattr(out, "weight", None) is model.get_parameter(s.weight):
            heads.add(s.weight)
    if found and found[-1].shape in emb_shapes:  # the last matmul maps onto an embedding's vocabulary
        heads.add(found[-1].weight)
    return heads


def _validate(model: nn.Module, s: MatmulSite, cfg: QuantConfig) -> Optional[str]:
    """Checks one site; returns its GGUF format (None without ``cfg.format``)."""
    name = site_name(s, model)
    n, k = s.shape
    fmt = site_format(cfg.format, cfg.fallback, name, model.get_submodule(s.owner), k)
    if fmt is None and cfg.group != -1 and k % cfg.group != 0:
        divisors = [d for d in (256, 128, 64, 32, 16, 8) if k % d == 0]
        hint = f"a divisor such as {divisors[0]}" if divisors else "a divisor of it"
        raise ValueError(f"layer `{name}`: in_features {k} is not divisible by group {cfg.group}; use group=-1 or {hint}")
    w = model.get_parameter(s.weight)
    if not torch.isfinite(w).all():
        raise ValueError(f"layer `{name}`: weight `{s.weight}` has {int((~torch.isfinite(w)).sum())} non-finite values "
                         "(NaN/Inf); fix or re-initialise it before transform")
    if not w.is_floating_point():
        raise TypeError(f"layer `{name}`: weight `{s.weight}` has dtype {w.dtype}; jacquant quantizes float weights")
    return fmt


def summary(model: nn.Module) -> str:
    """A table of every quantized site (name, weight shape, bits, group, method, op) and what stayed fp."""
    rows = [("site", "shape [N, K]", "bits", "group", "method", "op")]
    if any(s.quantizer.format for s in sites(model)):
        rows = [rows[0][:4] + ("format",) + rows[0][4:]]
    total = 0
    for s in sites(model):
        q = s.quantizer
        n, groups = q.scale.shape
        total += n * groups * q.group
        row = (s.name, f"[{n}, {groups * q.group}]", str(q.bits), str(q.group), q.rule,
               q.op + (" (W stored [K, N])" if q.transposed else ""))
        rows.append(row[:4] + (q.format or "-",) + row[4:] if len(rows[0]) == 7 else row)
    if len(rows) == 1:
        return f"{type(model).__name__}: not transformed by jacquant"
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*rows[0]).rstrip(), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*r).rstrip() for r in rows[1:]]
    lines.append(f"{len(rows) - 1} quantized sites, {total:,} weights")
    for name, why in getattr(model, "jacquant_skipped", []):
        lines.append(f"full precision: {name} ({why})")
    return "\n".join(lines)
