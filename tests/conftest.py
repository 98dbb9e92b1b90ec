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


def assert_step_matches_eager(eager: nn.Module, other: nn.Module, run, idx: torch.Tensor,
                              loss_tol: tuple = (1e-5, 1e-6), grad_tol: tuple = (1e-5, 1e-6)) -> None:
    """One TinyGPT training step of ``eager`` and of ``other`` (called through ``run``, e.g. its compiled
    form): the loss and every parameter's gradient agree, the scales' gradients included. Clears the grads."""
    from jacquant.testing.tiny_gpt import lm_loss

    def grads(model):
        out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return out

    loss_e = lm_loss(eager(idx), idx)
    loss_e.backward()
    loss_o = lm_loss(run(idx), idx)
    loss_o.backward()
    torch.testing.assert_close(loss_o, loss_e, rtol=loss_tol[0], atol=loss_tol[1])
    ge, go = grads(eager), grads(other)
    assert ge.keys() == go.keys() and any("scale" in k for k in ge)
    for k in ge:
        torch.testing.assert_close(go[k], ge[k], rtol=grad_tol[0], atol=grad_tol[1], msg=k)
