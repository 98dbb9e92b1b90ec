"""The one assembly of a run: a calibrated start, a block-wise phase, then end-to-end QAT.

    start        "rtn": the transform's round-to-nearest grid (MSE clipping search per group);
                 "gptq": :func:`jacquant.calibrate` on ``calib_windows`` windows of ``calib_seq`` tokens
    block-wise   each decoder block trained against the fp block's outputs on the same windows
                 (:mod:`jacquant.app.blockwise`, the method's own backward rule); skipped at 0 steps
    end to end   :func:`jacquant.app.train.train` with KD or CE on the training stream, all parameters
                 or the scales only (``e2e_params``)

Every caller (the main job's LM track, ``jacquant train``, the benchmarks) assembles a run from the same
three calls, in order:

    calib = calibration_set(budget.pipeline, train_ids, seed)          the seed's calibration windows
    start = calibrated_start(fp, config, budget.pipeline, calib, ...)  the start, shared by every method
    model, phases = train_phases(start, fp, recipe, budget, objective, train_ids, calib, seeds)

The start does not depend on the method (the backward rule is not used by it), so one calibrated start per
seed serves every method: :func:`train_phases` trains a copy of it with the method's rule (:func:`with_rule`).
"""
from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import torch
import torch.nn as nn
from torch import Tensor

from jacquant.api import transform
from jacquant.app import data
from jacquant.app.blockwise import BlockwiseConfig, train_blocks
from jacquant.app.recipes import Recipe
from jacquant.app.train import train
from jacquant.calibration.gptq import calibrate
from jacquant.config import QuantConfig
from jacquant.qat.quantizer import sites

STARTS = ("rtn", "gptq")
E2E_PARAMS = ("all", "scales")
E2E_DATA = ("stream", "calib")


@dataclass(frozen=True)
class Pipeline:
    """What happens before and around end-to-end QAT.

    Attributes:
        start: "rtn" or "gptq".
        calib_windows, calib_seq: the calibration set (GPTQ and the block-wise phase): windows of
            ``calib_seq`` tokens drawn from the training stream (never the tuning slice or validation).
        block: the block-wise phase (``steps=0`` skips it).
        e2e_params: "all" (weights, scales, norms) or "scales" (the quantizers' scales only) in the
            end-to-end phase.
        e2e_data: "stream" (fresh windows of the training stream each step) or "calib" (pieces of the
            calibration windows only: the whole pipeline then sees no text beyond the calibration set).
    """

    start: str = "gptq"
    calib_windows: int = 64
    calib_seq: int = 256
    block: BlockwiseConfig = field(default_factory=BlockwiseConfig)
    e2e_params: str = "all"
    e2e_data: str = "stream"

    def __post_init__(self) -> None:
        if self.start not in STARTS:
            raise ValueError(f"Pipeline.start={self.start!r} is not one of {STARTS}")
        if self.e2e_params not in E2E_PARAMS:
            raise ValueError(f"Pipeline.e2e_params={self.e2e_params!r} is not one of {E2E_PARAMS}")
        if self.e2e_data not in E2E_DATA:
            raise ValueError(f"Pipeline.e2e_data={self.e2e_data!r} is not one of {E2E_DATA}")
        if self.calib_windows < 1 or self.calib_seq < 2:
            raise ValueError(f"Pipeline: calib_windows {self.calib_windows} must be >= 1, calib_seq {self.calib_seq} >= 2")

    @property
    def calib_tokens(self) -> int:
        """Tokens of the calibration set (0 when nothing uses it)."""
        used = self.start == "gptq" or self.block.active or self.e2e_data == "calib"
        return self.calib_windows * self.calib_seq if used else 0


@dataclass(frozen=True)
class Budget:
    """What a run trains from its start: the phases before end-to-end QAT (``pipeline``), then ``steps`` AdamW steps
    of ``batch`` windows of ``seq`` + 1 tokens at peak ``lr`` (the quantizers' scales at ``scale_lr``; None: ``lr``)
    (cosine, warm-up steps/20) on ``loss`` ("kd": KL to the fp model; "ce": next-token cross entropy), with the input
    embedding / tied head frozen or not. ``seconds``: the end-to-end phase runs for that wall time instead, its
    cosine on the fraction of the time spent (``steps`` then caps it)."""

    steps: int = 60
    lr: float = 1e-3
    batch: int = 4
    seq: int = 128
    loss: str = "kd"
    freeze_embedding: bool = True
    pipeline: Pipeline = field(default_factory=Pipeline)
    scale_lr: Optional[float] = None
    seconds: Optional[float] = None

    @property
    def e2e_tokens(self) -> int:
        return self.steps * self.batch * self.seq


@dataclass(frozen=True)
class Seeds:
    """The seeds of one run's random draws: ``run`` (torch's global RNG before training, the estimators, the
    block-wise phase), ``batches`` (the end-to-end batches), ``probe`` (the estimators' probe batch)."""

    run: int
    batches: int
    probe: int

    @classmethod
    def main_job(cls, seed: int) -> "Seeds":
        """The main job's and the benchmarks' draws for ``seed``."""
        return cls(seed, seed + 1, 10_000)

    @classmethod
    def train_command(cls, seed: int) -> "Seeds":
        """``jacquant train --seed``'s draws."""
        return cls(seed, seed, seed + 10_000)


def e2e_lr(bits: int) -> float:
    """The end-to-end peak learning rate at ``bits``: 1e-3 at 2 bits (chosen on the tuning slice, docs/pipeline.md),
    halved with each further bit, as the grid's step halves: lr_b = 1e-3 · 2^(2 − b). AdamW moves a weight by about
    lr per step whatever its gradient's size, so this keeps a step the same fraction of a bin at every width."""
    return 1e-3 * 2.0 ** (2 - bits)


BLOCK_SHARE = 0.5
"""The share of a wall-time budget (after the start) that the block-wise phase gets; the rest goes end to end."""


def timed_budget(budget: Budget, seconds: float, block_share: float = BLOCK_SHARE) -> Budget:
    """``budget`` run for ``seconds`` of wall time from here: the block-wise phase gets ``block_share`` of it
    (``BlockwiseConfig.seconds``, its ``steps`` then only a cap, 0 for none), end to end the rest (``Budget.seconds``;
    ``steps`` 0 lifts the step cap). ``block_share=0`` gives it all to end-to-end QAT. Raises when no time is left."""
    if seconds <= 0:
        raise ValueError(f"the wall-time budget is spent before training starts ({seconds:.0f} s left after the start "
                         "and the evaluations): give a larger --budget")
    if not 0.0 <= block_share <= 1.0:
        raise ValueError(f"block_share={block_share} must lie in [0, 1]")
    block = replace(budget.pipeline.block, seconds=block_share * seconds)
    return replace(budget, seconds=(1 - block_share) * seconds, pipeline=replace(budget.pipeline, block=block))


def calibration_set(pipeline: Pipeline, train_ids: Tensor, seed: int, device="cpu", force: bool = False
                    ) -> Optional[Tensor]:
    """The calibration windows of ``seed`` (drawn with seed + 1000 from the training stream, never the tuning slice
    or validation), or None when no phase of ``pipeline`` uses them (``force``: draw them anyway, e.g. for a GPTQ
    row beside an RTN-started pipeline)."""
    if not (pipeline.calib_tokens or force):
        return None
    return calibration_windows(train_ids, pipeline.calib_windows, pipeline.calib_seq, seed + 1000).to(device)


def calibration_windows(ids: Tensor, n: int, seq: int, seed: int) -> Tensor:
    """``n`` windows of ``seq`` token ids at random starts in ``ids`` (seeded), int64 [n, seq]."""
    if len(ids) < seq + 1:
        raise ValueError(f"{len(ids)} training tokens are fewer than one calibration window of {seq}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq, (n,), generator=g)
    return torch.stack([ids[s:s + seq] for s in starts.tolist()]).long()


def e2e_batches(pipeline: "Pipeline", stream: Tensor, calib: Optional[Tensor], batch: int, seq: int, steps: int,
                seed: int, device="cpu"):
    """The end-to-end phase's ``steps`` batches [batch, seq + 1]: random windows of the training ``stream``, or
    (``e2e_data="calib"``) the calibration windows cut into pieces of seq + 1 tokens, drawn with replacement."""
    if pipeline.e2e_data == "stream":
        yield from data.windows(stream, batch, seq, steps, seed, device)
        return
    if calib is None or calib.shape[1] < seq + 1:
        raise ValueError(f"e2e_data='calib' needs calibration windows of at least {seq + 1} tokens")
    per = calib.shape[1] // (seq + 1)
    pieces = calib[:, :per * (seq + 1)].reshape(-1, seq + 1)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield pieces[torch.randint(0, len(pieces), (batch,), generator=g)].to(device)


def calibrated_start(fp: nn.Module, config: QuantConfig, pipeline: Pipeline, calib: Optional[Tensor],
                     progress: bool = True, frozen_embedding: bool = False) -> nn.Module:
    """A transformed copy of ``fp`` (``config``'s grid and rule) at the pipeline's start: RTN, or GPTQ on ``calib``;
    with ``frozen_embedding``, its input embedding and tied head frozen (:func:`freeze_embedding`)."""
    model = transform(copy.deepcopy(fp), config=config)
    if pipeline.start == "gptq":
        gptq_start(model, calib, progress)
    if frozen_embedding:
        freeze_embedding(model)
    return model


def freeze_embedding(model: nn.Module) -> None:
    """Keep the (tied) input embedding and LM head fixed: no gradient, no optimizer state."""
    model.get_input_embeddings().weight.requires_grad_(False)
    head = model.get_output_embeddings()
    if head is not None:
        head.weight.requires_grad_(False)


def gptq_start(model: nn.Module, calib: Optional[Tensor], progress: bool = True) -> None:
    """:func:`jacquant.calibrate` on the calibration windows (8 per batch), in place; a model whose every site has a
    GGUF scale-and-min format (which GPTQ does not cover) keeps its round-to-nearest start, with a warning."""
    if calib is None:
        raise ValueError("a GPTQ start needs calibration windows")
    if all(getattr(s.quantizer, "format", None) not in (None, "q4_0") for s in sites(model)):
        warnings.warn("every site has a GGUF scale-and-min format (Q4_1, Q2_K), which GPTQ does not cover: the pipeline "
                      "starts from their round-to-nearest grid", stacklevel=2)
        return
    calibrate(model, list(calib.split(8)), progress=progress)


def with_rule(start: nn.Module, rule: str, amplitude: Optional[float] = None) -> nn.Module:
    """A copy of a transformed model whose every site uses the backward ``rule`` (the forward is unchanged)."""
    model = copy.deepcopy(start)
    for s in sites(model):
        s.quantizer.rule = rule
        if amplitude is not None:
            s.quantizer.amplitude = float(amplitude)
    return model


def train_only_scales(model: nn.Module) -> int:
    """Freeze every parameter but the quantizers' scales; returns how many scale tensors train."""
    n = 0
    for name, p in model.named_parameters():
        keep = name.endswith("_quantizer.scale")
        p.requires_grad_(keep and p.requires_grad)
        n += keep
    return n


@dataclass
class Phases:
    """What :func:`run_phases` returns: the end-to-end loss curve, per block the block-wise loss curve, and per
    phase that ran its record (``{"block" | "e2e": {"seconds", "before", "after", "kept", ...}}``: the tuning-slice
    score before and after it, and whether its result was kept)."""

    curve: list
    block_curves: list
    record: dict = field(default_factory=dict)


def keep_better(model: nn.Module, phase: Callable[[], object], score: Optional[Callable[[nn.Module], float]],
                before: Optional[float] = None) -> tuple[object, dict]:
    """Run ``phase()`` (which trains ``model`` in place) and keep the better model by ``score`` (lower is better):
    when the score after is worse than before, ``model`` is restored to its state before the phase.

    Returns (what the phase returned, ``{"seconds", "before", "after", "kept"}``); without ``score`` the phase's
    model is kept unscored. ``before``: the score of the model as it is now, if already measured.
    """
    if score is not None and before is None:
        before = score(model)
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()} if score is not None else None
    t = time.perf_counter()
    out = phase()
    seconds = time.perf_counter() - t
    after = score(model) if score is not None else None
    kept = after is None or after <= before
    if not kept:
        model.load_state_dict(saved)
    return out, {"seconds": seconds, "before": before, "after": after, "kept": kept}


def train_phases(start: nn.Module, fp: Optional[nn.Module], recipe: Recipe, budget: Budget, objective: Callable,
                 stream: Tensor, calib: Optional[Tensor], seeds: Seeds, *, device="cpu", **phase_kwargs
                 ) -> tuple[nn.Module, "Phases"]:
    """One method's run from a shared ``start``: a copy of it with ``recipe``'s backward rule, torch's RNG seeded
    with ``seeds.run``, then :func:`run_phases`. Returns (the trained copy, the phases' result)."""
    model = with_rule(start, recipe.rule)
    torch.manual_seed(seeds.run)
    return model, run_phases(model, fp, recipe, budget, objective, stream, calib, seeds, device=device, **phase_kwargs)


def run_phases(model: nn.Module, fp: Optional[nn.Module], recipe: Recipe, budget: Budget, objective: Callable,
               stream: Tensor, calib: Optional[Tensor], seeds: Seeds, *, device="cpu", block_dir: Optional[str] = None,
               skip_block: bool = False, after_block: Optional[Callable[[], None]] = None, progress: bool = True,
               score: Optional[Callable[[nn.Module], float]] = None, start_score: Optional[float] = None,
               **train_kwargs) -> Phases:
    """The trained phases of ``budget`` on ``model`` (a transformed start with ``recipe``'s rule), in place:

        block-wise   :func:`jacquant.app.blockwise.train_blocks` on ``calib`` (when ``budget.pipeline.block`` is
                     active, and not ``skip_block``: a resumed run whose end-to-end checkpoint already holds it);
                     resumable in ``block_dir``; then ``after_block()`` if given
        scales only  every parameter but the quantizers' scales frozen (``pipeline.e2e_params == "scales"``)
        end to end   :func:`jacquant.app.train.train` on ``budget.steps`` batches [batch, seq + 1] of
                     :func:`e2e_batches` (seeded ``seeds.batches``) with ``objective``, peak ``budget.lr`` (scales
                     ``budget.scale_lr``), warm-up steps/20, or for ``budget.seconds``; the estimators' probe batch
                     is one more batch of the training stream (seeded ``seeds.probe``, from the same data)

    With ``score`` (the tuning slice's perplexity), each phase is scored before and after and the better model
    kept (:func:`keep_better`): no phase ends worse than it started on the tuning slice; ``start_score``, the score of
    ``model`` as given where the caller has it already (one pass fewer). ``fp`` (the full-precision
    model) is needed by the block-wise phase only. ``train_kwargs`` go to :func:`jacquant.app.train.train`
    (log_path, checkpoint, desc, ...).
    """
    pipeline = budget.pipeline
    block_curves: list = []
    record: dict = {}
    last = start_score  # the tuning score of the model as it stands
    if pipeline.block.active and not skip_block:
        if fp is None:
            raise ValueError("the block-wise phase trains each block against the fp model's: pass fp")
        out, record["block"] = keep_better(model, lambda: train_blocks(
            model, fp, recipe, calib, pipeline.block, seed=seeds.run, checkpoint_dir=block_dir, progress=progress),
            score, last)
        block_curves = out["curves"]
        record["block"]["blocks"] = out["blocks"]
        last = record["block"]["after"] if record["block"]["kept"] else record["block"]["before"]
        if after_block is not None:
            after_block()
    if pipeline.e2e_params == "scales":
        train_only_scales(model)
    if budget.steps == 0 and not budget.seconds:
        return Phases([], block_curves, record)
    steps = budget.steps if budget.seconds is None else (budget.steps or 10**9)
    probe = next(e2e_batches(pipeline, stream, calib, budget.batch, budget.seq, 1, seeds.probe, device))
    batches = e2e_batches(pipeline, stream, calib, budget.batch, budget.seq, steps, seeds.batches, device)
    curve, record["e2e"] = keep_better(model, lambda: train(
        model, recipe, batches, objective, steps, budget.lr, seed=seeds.run, warmup=max(1, budget.steps // 20),
        calib_batch=probe, scale_lr=budget.scale_lr, seconds=budget.seconds, **train_kwargs), score, last)
    record["e2e"]["steps"] = len(curve)
    return Phases(curve, block_curves, record)
