"""Capture a model as an FX graph and find every matmul whose operand is a weight.

Capture tries ``torch.fx.symbolic_trace`` first and falls back to ``torch.export`` (Hugging Face
models do not symbolically trace). Both graphs are read the same way: a matmul-like node whose
weight operand resolves, through at most a few transposes, to a Parameter of the model.

    linear(x, W[N, K], b)          ->  layout [N, K]
    matmul / mm / @ (x, W[K, N])   ->  layout [K, N]   (transposed)
    addmm(b, x, W[K, N])           ->  layout [K, N]   (GPT-2's Conv1D)

Each site records the module whose forward runs the matmul (its *owner*), which is where the
rewrite lands. Tied weights are one Parameter, counted once.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

aten = torch.ops.aten

# target -> (kind, index of the activation, index of the weight, index of the bias or None)
MATMUL_TARGETS: dict[Any, tuple[str, int, int, Optional[int]]] = {
    F.linear: ("linear", 0, 1, 2),
    torch._C._nn.linear: ("linear", 0, 1, 2),
    aten.linear.default: ("linear", 0, 1, 2),
    torch.matmul: ("matmul", 0, 1, None),
    operator.matmul: ("matmul", 0, 1, None),
    torch.mm: ("matmul", 0, 1, None),
    aten.matmul.default: ("matmul", 0, 1, None),
    aten.mm.default: ("matmul", 0, 1, None),
    torch.addmm: ("addmm", 1, 2, 0),
    aten.addmm.default: ("addmm", 1, 2, 0),
    "matmul": ("matmul", 0, 1, None),  # call_method
    "mm": ("matmul", 0, 1, None),
    "__matmul__": ("matmul", 0, 1, None),
}
EMBEDDING_TARGETS = {F.embedding: 1, aten.embedding.default: 0}  # target -> index of the weight
TRANSPOSES = {"t", "T", "mT", torch.t, aten.t.default}


@dataclass
class MatmulSite:
    """A matmul with a weight operand, as found in the captured graph."""

    owner: str  # path of the module whose forward runs the matmul ("" = the root)
    weight: str  # canonical name of the parameter (the first name under which it is registered)
    op: str  # "linear" | "matmul" | "addmm"
    transposed: bool  # the parameter is stored [K, N]
    shape: tuple[int, int]  # (N, K) = (out_features, in_features)
    tied: bool = False  # the parameter also feeds an embedding


@dataclass
class Capture:
    """A captured graph and what was found in it."""

    graph: fx.Graph
    method: str  # "fx" | "export"
    sites: list[MatmulSite] = field(default_factory=list)
    embeddings: set[str] = field(default_factory=set)  # canonical names of embedding weights
    fx_error: Optional[str] = None  # why symbolic_trace failed, when export was used


def capture(model: nn.Module, example_inputs: Any = None) -> Capture:
    """Capture ``model`` as an FX graph and list its weight matmuls.

    ``example_inputs`` (a tuple of args, or a dict of kwargs) is needed only for models that
    ``symbolic_trace`` cannot trace; Hugging Face models fall back to their ``dummy_inputs``.
    """
    try:
        gm = fx.symbolic_trace(model)
        graph, method, fx_error, param_of = gm.graph, "fx", None, _fx_param_of(gm)
    except Exception as err:  # noqa: BLE001 - any trace failure sends us to torch.export
        fx_error = f"{type(err).__name__}: {err}".splitlines()[0]
        ep = _export(model, example_inputs, fx_error)
        graph, method = ep.graph, "export"
        param_of = {n: ep.graph_signature.inputs_to_parameters[n.name] for n in graph.nodes
                    if n.op == "placeholder" and n.name in ep.graph_signature.inputs_to_parameters}
    canonical = _canonical_names(model)
    cap = Capture(graph=graph, method=method, fx_error=fx_error)
    for node in graph.nodes:
        emb = _embedding_weight(node, param_of, model)
        if emb is not None:
            cap.embeddings.add(canonical[id(model.get_parameter(emb))])
    for node in graph.nodes:
        site = _matmul_site(node, param_of, model, canonical)
        if site is not None and all((s.weight, s.owner) != (site.weight, site.owner) for s in cap.sites):
            site.tied = site.weight in cap.embeddings
            cap.sites.append(site)
    return cap


def _export(model: nn.Module, example_inputs: Any, fx_error: str) -> torch.export.ExportedProgram:
    args, kwargs = (), {}
    if isinstance(example_inputs, dict):
        kwargs = dict(example_inputs)
    elif isinstance(example_inputs, tuple):
        args = example_inputs
    elif isinstance(example_inputs, torch.Tensor):
        args = (example_inputs,)
    elif example_inputs is None and hasattr(model, "dummy_inputs"):
        kwargs = dict(model.dummy_inputs)
    else:
        raise TypeError(
            f"{type(model).__name__} does not trace with torch.fx.symbolic_trace ({fx_error}); pass "
            "example_inputs=(args...) or {kwargs...} so that torch.export can capture it")
    if getattr(getattr(model, "config", None), "use_cache", None) is not None:
        kwargs.setdefault("use_cache", False)  # a KV cache object is not an exportable output
    try:
        return torch.export.export(model, args, kwargs, strict=False)
    except Exception as err:
        raise TypeError(
            f"could not capture {type(model).__name__}: symbolic_trace failed ({fx_error}) and torch.export "
            f"failed ({type(err).__name__}: {str(err).splitlines()[0]})") from err


def _fx_param_of(gm: fx.GraphModule) -> dict[fx.Node, str]:
    params = dict(gm.named_parameters(remove_duplicate=False))
    return {n: n.target for n in gm.graph.nodes if n.op == "get_attr" and n.target in params}


def _canonical_names(model: nn.Module) -> dict[int, str]:
    names: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), name)
    return names


def _owner(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return path.split("@")[0]


def _resolve_weight(node: Any, param_of: dict[fx.Node, str]) -> tuple[Optional[str], bool]:
    """Follow transposes back to a parameter: (its name or None, whether an odd number was seen)."""
    flipped = False
    for _ in range(4):
        if not isinstance(node, fx.Node):
            return None, False
        if node in param_of:
            return param_of[node], flipped
        is_getattr_t = node.target is getattr and len(node.args) == 2 and node.args[1] in ("T", "mT")
        is_transpose = node.target in TRANSPOSES or is_getattr_t or (
            node.target in ("transpose", aten.transpose.int, torch.transpose)
            and sorted(a % 2 for a in node.args[1:3] if isinstance(a, int)) == [0, 1])
        if not is_transpose:
            return None, False
        flipped, node = not flipped, node.args[0]
    return None, False


def _arg(node: fx.Node, i: Optional[int], name: str) -> Any:
    if i is not None and i < len(node.args):
        return node.args[i]
    return node.kwargs.get(name)


def _matmul_site(node: fx.Node, param_of, model: nn.Module, canonical) -> Optional[MatmulSite]:
    if node.op == "call_module":
        mod = model.get_submodule(node.target)
        if type(mod) is nn.Linear or isinstance(mod, nn.Linear) and type(mod).forward is nn.Linear.forward:
            n, k = mod.weight.shape
            return MatmulSite(node.target, canonical[id(mod.weight)], "linear", False, (n, k))
        return None
    if node.op not in ("call_function", "call_method") or node.target not in MATMUL_TARGETS:
        return None
    kind, _, wi, _ = MATMUL_TARGETS[node.target]
    name, flipped = _resolve_weight(_arg(node, wi, "weight" if kind == "linear" else "other"), param_of)
    left, _ = _resolve_weight(_arg(node, 0 if kind != "addmm" else 1, "input"), param_of)
    owner = _owner(node)
    if name is None:
        if left is not None:
            raise TypeError(f"layer `{owner or '<root>'}`: parameter `{left}` is the left operand of a {kind} "
                            "(W @ x); jacquant quantizes weights used as x @ W or F.linear(x, W) only")
        return None
    p = model.get_parameter(name)
    if p.dim() != 2:
        raise TypeError(f"layer `{owner or '<root>'}`: {kind} with a {p.dim()}-D parameter `{name}` is not "
                        "supported (2-D weights only); exclude it with filter=")
    transposed = (kind != "linear") != flipped
    n, k = (p.shape[1], p.shape[0]) if transposed else tuple(p.shape)
    return MatmulSite(owner, canonical[id(p)], kind, transposed, (n, k))


def _embedding_weight(node: fx.Node, param_of, model: nn.Module) -> Optional[str]:
    if node.op == "call_module" and isinstance(model.get_submodule(node.target), nn.Embedding):
        return f"{node.target}.weight" if node.target else "weight"
    if node.op == "call_function" and node.target in EMBEDDING_TARGETS:
        return _resolve_weight(node.args[EMBEDDING_TARGETS[node.target]], param_of)[0]
    return None
