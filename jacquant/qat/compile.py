"""Regional compilation: compile the repeated block of a model (a decoder layer) once, reuse it for all.

``torch.compile(model)`` traces and compiles every layer of the model separately, so the compile
time grows with depth (SmolLM2-135M: 30 decoder layers, 210 quantized matmuls). The layers of a
transformer are copies of one module class, and torch.compile treats a module's parameters as
inputs of its graph, so one compiled layer serves every layer whose code, shapes and dtypes are the
same. :func:`compile_blocks` compiles each block of the model's repeated ``nn.ModuleList`` in place
(``block.compile(**options)``); the first block compiles, the others pass its guards and reuse it,
and the code between blocks (embedding, final norm, head, loss) stays eager.

One detail makes reuse possible on a transformed model: :func:`jacquant.transform` gives every
rewritten module its own generated ``forward`` function (one ``torch.fx`` GraphModule per owner),
and torch.compile guards on the function a module calls, so each layer would recompile (and the
eighth recompile would fall back to eager). :func:`compile_blocks` binds owners whose generated code
is identical to one shared function first; the behaviour of each module is unchanged.
"""
from __future__ import annotations

import types
import warnings
from typing import Any

import torch.nn as nn

from jacquant.passes.rewrite import installed_graph


def repeated_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, list) of the model's largest ``nn.ModuleList`` whose children (at least two) share one class:
    the decoder layers of a transformer (``model.layers`` in Llama, ``transformer.h`` in GPT-2).

    Raises ValueError when the model has no such list.
    """
    best: tuple[str, nn.ModuleList] | None = None
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) >= 2 and len({type(b) for b in m}) == 1:
            if best is None or len(m) > len(best[1]):
                best = (name, m)
    if best is None:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of two or more blocks of one class to compile "
                         "region by region; use torch.compile(model) instead")
    return best


def share_rewritten_forwards(model: nn.Module) -> int:
    """Bind every rewritten module whose generated forward has the same code and globals as an earlier one to
    that earlier function (``types.MethodType(fn, module)``). Returns how many modules were rebound.

    The generated code reads only ``self``'s attributes, so a module runs the same computation with either
    function; torch.compile then sees one function for all of them and reuses one graph.
    """
    shared: dict[tuple, Any] = {}
    rebound = 0
    for m in model.modules():
        gm = installed_graph(m)
        if gm is None:
            continue
        fn = m.forward.__func__
        code = fn.__code__
        key = (code.co_code, code.co_consts, code.co_names, code.co_varnames, fn.__defaults__,
               tuple(id(fn.__globals__.get(n)) for n in code.co_names))
        first = shared.setdefault(key, fn)
        if first is not fn:
            m.forward = types.MethodType(first, m)
            rebound += 1
    return rebound


def compile_blocks(model: nn.Module, **options: Any) -> nn.Module:
    """Regional compilation of ``model``, in place: each block of :func:`repeated_blocks` is compiled with
    ``torch.compile(**options)`` (``block.compile``), compiled once and reused by the identical blocks.

    Works on a plain or a :func:`jacquant.transform`-ed model (rewritten forwards are shared first, see
    :func:`share_rewritten_forwards`); call it after ``transform`` and before training. Forward and
    backward of the blocks run compiled; the embedding, final norm, head and loss run eagerly.
    Returns ``model``. ``torch.compiler.set_stance("force_eager")`` runs everything eagerly again.

    Hugging Face models: train with ``use_cache=False`` (a KV cache holds per-layer state that the
    compiled block guards on, so each layer would recompile); a warning says so when
    ``model.config.use_cache`` is True.

    Example::

        model = jacquant.transform(model, bits=2, group=64)
        jacquant.compile_blocks(model)        # instead of model = torch.compile(model)
    """
    share_rewritten_forwards(model)
    _, blocks = repeated_blocks(model)
    if getattr(getattr(model, "config", None), "use_cache", False):
        warnings.warn(f"{type(model).__name__}.config.use_cache is True: call the model with use_cache=False when "
                      "training (or set model.config.use_cache = False), else its KV cache differs per layer and "
                      "every block recompiles", UserWarning, stacklevel=2)
    for block in blocks:
        block.compile(**options)
    return model
