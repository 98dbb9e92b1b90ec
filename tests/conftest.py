import numpy as np
import pytest
import torch
import torch.nn as nn


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_llama(tie: bool = True):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(cfg)


def tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def mlp():
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))


def numpy_unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """Independent MatMulNBits unpacking of [N, blocks, blob] bytes to codes [N, K]: element j of a
    byte sits in bits [j·b, (j+1)·b)."""
    n, blocks, blob = packed.shape
    per = 8 // bits
    out = np.zeros((n, blocks, blob * per), np.uint8)
    for j in range(per):
        out[..., j::per] = (packed >> (j * bits)) & ((1 << bits) - 1)
    return out.reshape(n, -1)
