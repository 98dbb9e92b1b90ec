"""A small GPT-style causal LM with a tied head through ``F.linear``: for tests, demos, benchmarks."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


@dataclass
class GPTConfig:
    vocab_size: int = 256
    dim: int = 128
    n_layer: int = 2
    n_head: int = 4
    max_seq: int = 128
    hidden_mult: int = 4


class Block(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.n_head = c.n_head
        self.ln1, self.ln2 = nn.LayerNorm(c.dim), nn.LayerNorm(c.dim)
        self.qkv = nn.Linear(c.dim, 3 * c.dim)
        self.proj = nn.Linear(c.dim, c.dim)
        self.fc = nn.Linear(c.dim, c.hidden_mult * c.dim)
        self.out = nn.Linear(c.hidden_mult * c.dim, c.dim)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.reshape(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))  # [B, H, T, D/H]
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    """Token + position embeddings, pre-norm blocks, and logits = F.linear(h, tok_emb.weight)."""

    def __init__(self, c: GPTConfig = GPTConfig()):
        super().__init__()
        self.config = c
        self.tok_emb = nn.Embedding(c.vocab_size, c.dim)
        self.pos_emb = nn.Embedding(c.max_seq, c.dim)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.ln_f = nn.LayerNorm(c.dim)

    def forward(self, idx: Tensor) -> Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(pos)  # [B, T, D]
        for blk in self.blocks:
            x = blk(x)
        return F.linear(self.ln_f(x), self.tok_emb.weight)  # [B, T, V], tied head


def lm_loss(logits: Tensor, idx: Tensor) -> Tensor:
    """Next-token cross entropy of logits [B, T, V] against idx [B, T]."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1))
