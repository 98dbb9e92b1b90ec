"""Rewrite one module's forward so that its weight matmuls call the quantized op.

The owner (the module whose forward runs the matmul, as the capture found it) is traced alone with
every child module kept as a leaf, so the graph holds only the owner's own code. In that graph each
matmul whose weight is a quantized parameter is replaced by a call to the parameter's
:class:`~jacquant.qat.quantizer.WeightQuantizer`, registered on the owner:

    linear(x, W, b)        ->  W_quantizer(x, W, b)
    matmul(x, W) / x @ W   ->  W_quantizer(x, W)           (W stored [K, N])
    addmm(b, x, W)         ->  W_quantizer(x, W, b)

and the recompiled graph's code becomes the owner's ``forward``, bound to the owner itself (an
instance attribute: the class, its other methods and the state_dict keys are the user's). Children run their own forwards.
"""
from __future__ import annotations

import types

import torch.fx as fx
import torch.nn as nn

from jacquant.passes.capture import MATMUL_TARGETS, _arg, _resolve_weight


class _OwnerTracer(fx.Tracer):
    """Traces one module's own code: every child module is a leaf."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def trace_owner(owner: nn.Module, name: str) -> fx.Graph:
    """The owner's forward as an FX graph; refuses a forward whose graph depends on ``self.training``."""
    was_training = owner.training
    graphs = []
    try:
        for mode in (was_training, not was_training):
            owner.train(mode)
            graphs.append(_OwnerTracer().trace(owner))
    except Exception as err:
        raise TypeError(
            f"layer `{name or '<root>'}` ({type(owner).__name__}) runs a weight matmul in its own forward, which "
            f"torch.fx cannot trace ({type(err).__name__}: {str(err).splitlines()[0]}); exclude it with "
            "filter=lambda name, module: name != ... or move the matmul into an nn.Linear") from err
    finally:
        owner.train(was_training)
    if str(graphs[0]) != str(graphs[1]):
        raise TypeError(
            f"layer `{name or '<root>'}` ({type(owner).__name__}): its forward changes with self.training "
            "(e.g. F.dropout(x, p, self.training)), which one traced graph cannot follow; use nn.Dropout "
            "there or exclude the layer with filter=")
    return graphs[0]


def rewrite_owner(owner: nn.Module, name: str, quantizers: dict[str, nn.Module]) -> fx.GraphModule:
    """Replace the matmuls on ``quantizers``' weights in ``owner``'s forward; install the result.

    ``quantizers`` maps the weight's path relative to the owner (``"weight"``, ``"wte.weight"``) to
    its WeightQuantizer, already registered on the owner under ``quantizer_attr(path)``.
    Returns the installed GraphModule.
    """
    graph = trace_owner(owner, name)
    params = dict(owner.named_parameters(remove_duplicate=False))
    param_of = {n: n.target for n in graph.nodes if n.op == "get_attr" and n.target in params}
    targets = {id(owner.get_parameter(path)): path for path in quantizers}
    done: set[str] = set()
    for node in list(graph.nodes):
        if node.op not in ("call_function", "call_method") or node.target not in MATMUL_TARGETS:
            continue
        kind, xi, wi, bi = MATMUL_TARGETS[node.target]
        w_node = _arg(node, wi, "weight" if kind == "linear" else "other")
        pname, _ = _resolve_weight(w_node, param_of)
        if pname is None or id(owner.get_parameter(pname)) not in targets:
            continue
        path = targets[id(owner.get_parameter(pname))]
        if kind == "addmm" and (node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1):
            raise TypeError(f"layer `{name or '<root>'}`: addmm with beta/alpha != 1 on `{path}` is not supported")
        raw = next(n for n, p in param_of.items() if p == pname)  # the parameter as stored
        with graph.inserting_before(node):
            w_in = graph.get_attr(pname) if raw.op != "get_attr" else raw
            args = (_arg(node, xi, "input"), w_in, _arg(node, bi, "bias") if bi is not None else None)
            new = graph.call_module(quantizer_attr(path), args)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        done.add(path)
    missing = set(quantizers) - done
    if missing:
        raise TypeError(f"layer `{name or '<root>'}`: found no matmul on {sorted(missing)} in its forward to rewrite")
    gm = fx.GraphModule(owner, graph, class_name=f"Quantized{type(owner).__name__}Forward")
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    install_forward(owner, gm)
    return gm


GRAPH_ATTR = "_jacquant_graph_module"


def install_forward(owner: nn.Module, gm: fx.GraphModule) -> None:
    """Make ``gm``'s generated code the owner's ``forward``, bound to the owner itself.

    The code reads only the owner's own attributes (its parameters, children, quantizers), so
    swapped parameters (FSDP2, ``load_state_dict(assign=True)``) are seen, and the class and its
    other methods stay the user's. ``gm`` is kept, unregistered, for its graph (:func:`installed_graph`).
    """
    object.__setattr__(owner, GRAPH_ATTR, gm)  # not a child: its tensors are the owner's own
    owner.forward = types.MethodType(type(gm).forward, owner)


def installed_graph(owner: nn.Module) -> fx.GraphModule | None:
    """The GraphModule whose code is the owner's rewritten forward, or None if it has none."""
    gm = owner.__dict__.get(GRAPH_ATTR)
    fwd = owner.__dict__.get("forward")
    if gm is None or getattr(fwd, "__self__", None) is not owner:
        return None  # never rewritten, or the forward was replaced after the rewrite
    return gm


def quantizer_attr(weight_path: str) -> str:
    """Attribute name of a weight's quantizer on its owner: ``weight`` -> ``weight_quantizer``."""
    return weight_path.replace(".", "_") + "_quantizer"
