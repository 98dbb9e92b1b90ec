"""Data-parallel QAT: a transformed model under DDP and FSDP2, B equal on every rank, DCP checkpoints.

The rules, and why they hold:

1. **Forwards bound to their owners** (:func:`prepare`). ``transform`` installs each owner's rewritten
   forward as an instance attribute. FSDP2 (``fully_shard``) replaces a module's parameters with
   sharded DTensors and, before each forward, swaps the all-gathered ones in; a forward that reads
   ``W`` from anywhere but the owner would multiply by the stale pre-sharding tensor and send the
   gradient there. :func:`prepare` rebinds every rewritten forward to its owner, so the quantizer
   sees exactly the all-gathered ``W`` and ``s`` that FSDP2 installed. DDP keeps the parameter
   objects and needs nothing, but :func:`prepare` is harmless there.

2. **Groups never straddle a shard, because the math never sees a shard.** The quantizer, the
   surrogate backward and the estimators work on whole tensors: in forward/backward FSDP2 has
   all-gathered ``W`` [N, K] and ``s`` [N, K/G]; around a B refresh :func:`full_weights`
   all-gathers them. FSDP2 shards dim 0 of each parameter: W's rows (N) and s's rows shard
   together (same N, same ``torch.chunk`` split), and a group along K is never cut. For a
   ``transposed`` site (GPT-2's Conv1D, W stored [K, N]) dim 0 is K, so a shard boundary may fall
   inside a group; that is harmless under rule 2, and :func:`shard_placement_fn` shards those
   weights on dim 1 (N) instead, so that local shards line up with the scale's rows as well.
   ``zero_point`` and ``jac`` (B) are buffers: FSDP2 leaves them whole on every rank.

3. **B is the same on every rank** (:func:`sync_jac`). A closed-form estimator of an identical
   whole weight gives identical B everywhere; a sampled one does not unless every rank draws the
   same numbers. Rather than trust that, every refresh ends with one broadcast of all B buffers
   from rank 0 (coalesced into one tensor of sum_sites N·K/G values, G times smaller than the
   weights). :func:`refresh_synced` wraps a refresh call in :func:`full_weights` and :func:`sync_jac`.

4. **Checkpoints are DCP** (:func:`save`, :func:`load`): ``torch.distributed.checkpoint`` writes
   each rank's shards with global metadata, so a run saved on W ranks (DDP or FSDP2) resumes on any
   other world size, a single process included. ``jac`` and ``zero_point`` travel with the model's
   state_dict.
"""
from __future__ import annotations

import contextlib
import types
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.fx as fx
import torch.nn as nn
from torch import Tensor
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, Shard

from jacquant.qat import refresh as rf
from jacquant.qat.quantizer import WeightQuantizer, sites


def prepare(model: nn.Module) -> nn.Module:
    """Bind every rewritten forward to its owner module, in place; returns ``model``.

    ``transform`` leaves ``owner.forward`` bound to an ``fx.GraphModule`` that holds its own
    references to the owner's parameters. The generated code reads only ``self.<attr>`` for the
    graph's ``get_attr``/``call_module`` targets, all of which live on the owner, so the same code
    bound to the owner computes the same function while following parameter swaps (FSDP2,
    ``load_state_dict(assign=True)``, ``to_empty``). Call after ``transform`` and before
    ``DDP``/``fully_shard``. Idempotent.
    """
    for name, owner in model.named_modules():
        fwd = owner.__dict__.get("forward")
        gm = getattr(fwd, "__self__", None)
        if not isinstance(gm, fx.GraphModule) or gm is owner:
            continue
        for node in gm.graph.nodes:
            if node.op in ("get_attr", "call_module") and not _has_attr(owner, node.target):
                raise TypeError(f"layer `{name or '<root>'}`: its rewritten forward reads `{node.target}`, which the "
                                f"module itself lacks; jacquant.qat.distributed cannot rebind it to the module")
        owner.forward = types.MethodType(fwd.__func__, owner)
    return model


def _has_attr(module: nn.Module, target: str) -> bool:
    obj: Any = module
    for part in target.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def check_prepared(model: nn.Module) -> None:
    """Raise if a rewritten forward still reads its weights from a detached GraphModule."""
    for name, owner in model.named_modules():
        gm = getattr(owner.__dict__.get("forward"), "__self__", None)
        if isinstance(gm, fx.GraphModule) and gm is not owner:
            raise RuntimeError(f"layer `{name or '<root>'}`: rewritten forward is not bound to the module; call "
                               "jacquant.qat.distributed.prepare(model) after transform and before DDP/fully_shard")


def shard_placement_fn(model: nn.Module) -> Callable[[nn.Parameter], Optional[Shard]]:
    """A ``fully_shard(shard_placement_fn=...)`` that shards every weight along its N dimension.

    For a [N, K] weight that is FSDP2's default, Shard(0). A ``transposed`` site stores W as
    [K, N]; it gets Shard(1), so its local shard holds the same output rows as the local shard of
    its scale [N, K/G] and never cuts a group along K. Other parameters get the default (None).
    """
    transposed = {id(s.weight) for s in sites(model) if s.quantizer.transposed}

    def placement(param: nn.Parameter) -> Optional[Shard]:
        return Shard(1) if id(param) in transposed else None

    return placement


def shard(model: nn.Module, blocks: Optional[Iterable[nn.Module]] = None, **fsdp_kwargs: Any) -> nn.Module:
    """:func:`prepare`, then ``fully_shard`` each block and the root (FSDP2), in place.

    ``blocks`` defaults to the members of every ``nn.ModuleList`` (a transformer's layers).
    ``fsdp_kwargs`` go to ``fully_shard`` (``mesh``, ``mp_policy``, ...); ``shard_placement_fn``
    defaults to :func:`shard_placement_fn`.
    """
    prepare(model)
    fsdp_kwargs.setdefault("shard_placement_fn", shard_placement_fn(model))
    if blocks is None:
        blocks = [m for ml in model.modules() if isinstance(ml, nn.ModuleList) for m in ml]
    for block in blocks:
        fully_shard(block, **fsdp_kwargs)
    fully_shard(model, **fsdp_kwargs)
    check_shards(model)
    return model


def check_shards(model: nn.Module) -> None:
    """Raise unless every sharded site's W and s are split along N alike (no group cut by a shard).

    W [N, K] must be Shard(0) (W stored [K, N]: Shard(1)) and s [N, K/G] Shard(0): both are then
    ``torch.chunk``\ ed over the same N, so each rank's rows of W and of s are the same output rows
    and each holds whole groups. Sites whose parameters are not DTensors (DDP, one process) pass.
    """
    for s in sites(unwrap(model)):
        w, scale = s.weight, s.quantizer.scale
        if not (isinstance(w, DTensor) and isinstance(scale, DTensor)):
            continue
        n_dim = 1 if s.quantizer.transposed else 0
        layout = "[K, N]" if s.quantizer.transposed else "[N, K]"
        if tuple(w.placements) != (Shard(n_dim),) or tuple(scale.placements) != (Shard(0),):
            raise ValueError(
                f"layer `{s.name}`: weight {layout} is sharded {tuple(w.placements)} and its scale [N, K/G] "
                f"{tuple(scale.placements)}; a shard boundary may cut a group of {s.quantizer.group} along K. "
                f"Shard both along N: fully_shard(..., shard_placement_fn=jacquant.qat.distributed.shard_placement_fn(model))")


@contextlib.contextmanager
def full_weights(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block every FSDP2 module of ``model`` holds its whole (all-gathered) parameters.

    Outside forward FSDP2 keeps only shards (DTensors); an estimator computing B from W and s
    needs whole tensors. A no-op for a model without FSDP2 (single process, DDP). Collective:
    every rank must enter it.
    """
    fsdp = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in fsdp:
        m.unshard()
    try:
        yield model
    finally:
        for m in fsdp:
            m.reshard()


def _jac_buffers(model: nn.Module) -> list[Tensor]:
    return [q.jac for q in _quantizers(unwrap(model))]


def _quantizers(model: nn.Module) -> list[WeightQuantizer]:
    seen: dict[int, WeightQuantizer] = {}
    for m in model.modules():
        if isinstance(m, WeightQuantizer):
            seen.setdefault(id(m), m)
    return list(seen.values())


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside a DDP wrapper (``ddp.module``); any other model unchanged."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@torch.no_grad()
def sync_jac(model: nn.Module, src: int = 0, group: Optional[dist.ProcessGroup] = None) -> int:
    """Make every B buffer, and the refresh clock and RNG, equal to rank ``src``'s; returns #B values sent.

    B_site ← B_site(rank src) for every site, in one coalesced broadcast of sum_sites N·K/G floats;
    the refresh clock and RNG buffers (:func:`jacquant.qat.refresh.state_of`, if attached) follow, so later sampled
    draws agree across ranks too. Call on every rank after each refresh (collective). Without an
    initialised process group it does nothing and returns 0.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return 0
    model = unwrap(model)
    src_global = dist.get_global_rank(group, src) if group is not None else src
    jacs = _jac_buffers(model)
    if not jacs:
        return 0
    flat = torch.cat([b.reshape(-1).to(torch.float32) for b in jacs])  # [sum_sites N·K/G]
    dist.broadcast(flat, src=src_global, group=group)
    offset = 0
    for b in jacs:
        b.copy_(flat[offset:offset + b.numel()].view_as(b))
        offset += b.numel()
    state = rf.state_of(model)
    if state is not None:
        for buf in (state.step, state.rng):  # the RNG state lives on the CPU; nccl needs it on the GPU
            moved = buf.to(flat.device)
            dist.broadcast(moved, src=src_global, group=group)
            buf.copy_(moved)
    return flat.numel()


def jac_max_spread(model: nn.Module, group: Optional[dist.ProcessGroup] = None) -> float:
    """max over sites and ranks of |B - B(rank 0)|: 0.0 when B is equal everywhere (a diagnostic)."""
    jacs = _jac_buffers(model)
    if not jacs or not (dist.is_available() and dist.is_initialized()):
        return 0.0
    flat = torch.cat([b.reshape(-1).to(torch.float32) for b in jacs])
    hi, lo = flat.clone(), flat.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
    return float((hi - lo).max())


def refresh_synced(model: nn.Module, refresh: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``refresh(model, *args, **kwargs)`` on whole weights, then :func:`sync_jac`; returns its result.

    ``refresh`` is any B refresh (e.g. ``jacquant.qat.refresh``'s step) that writes each site's
    ``quantizer.jac`` from ``site.weight`` and ``quantizer.scale``. Collective: call on every rank.
    """
    model = unwrap(model)
    with full_weights(model):
        out = refresh(model, *args, **kwargs)
    sync_jac(model)
    return out


def step(model: nn.Module, loss_fn: Optional[Callable[[], Tensor]] = None) -> bool:
    """``jacquant.qat.refresh.step`` for DDP/FSDP2: call on every rank after each ``optimizer.step()``.

    Counts the step and, when a refresh is due (t = 0 mod K, the clock being equal on every rank),
    re-estimates B on whole weights (:func:`full_weights`) and then :func:`sync_jac`\ s it, so every
    rank holds rank 0's B. Accepts the DDP wrapper or the model. Returns True when B was refreshed.
    """
    model = unwrap(model)
    state = rf.state_of(model) or rf.attach(model)
    due = int(state.step) % state.config.refresh_every == 0
    if due:
        refresh_synced(model, rf.refresh, loss_fn)
    state.step.add_(1)
    return due


def _optimizers(optimizer: Optional[torch.optim.Optimizer]) -> list[torch.optim.Optimizer]:
    return [] if optimizer is None else [optimizer]


def save(path: str, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None, step: int = 0) -> None:
    """Write a DCP checkpoint of model (parameters, s, z, B), optimizer state and step to ``path``.

    Works the same on one process, DDP (``module.`` prefix dropped) and FSDP2 (each rank writes its
    shards). Collective when a process group is initialised.
    """
    msd, osd = get_state_dict(model, _optimizers(optimizer))
    dcp.save({"model": msd, "optim": osd, "step": torch.tensor(step)}, checkpoint_id=path)


def load(path: str, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> int:
    """Load a :func:`save` checkpoint into ``model`` (and ``optimizer``), on any world size; returns step.

    ``model`` must be transformed with the same settings (its state_dict keys and global shapes
    match the saved ones); DCP reshards from the saved layout to the current one.
    """
    msd, osd = get_state_dict(model, _optimizers(optimizer))
    state = {"model": msd, "optim": osd, "step": torch.tensor(0)}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, _optimizers(optimizer), model_state_dict=state["model"], optim_state_dict=state["optim"])
    return int(state["step"])
