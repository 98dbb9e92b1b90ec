import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

import jacquant
from jacquant.primitives.grid import fake_quantize
from jacquant.testing.tiny_gpt import GPTConfig, TinyGPT, lm_loss

from conftest import mlp, tiny_gpt2, tiny_llama


def names(model):
    return [s.name for s in jacquant.sites(model)]


def test_mlp_output_equals_fake_quant_reference():
    m = mlp()
    ref = copy.deepcopy(m)
    jacquant.transform(m, bits=2, group=32)
    assert names(m) == ["0", "2"]
    x = torch.randn(5, 64)
    q = {s.name: fake_quantize(s.weight, s.quantizer.scale, s.quantizer.zero_point, 2, 32) for s in jacquant.sites(m)}
    y_ref = F.linear(torch.relu(F.linear(x, q["0"], ref[0].bias)), q["2"], ref[2].bias)
    torch.testing.assert_close(m(x), y_ref)
    assert type(m) is nn.Sequential


def test_training_with_an_ordinary_loop_moves_weights_and_scales():
    m = jacquant.transform(mlp(), bits=2, group=32, method="stableqat")
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    w0 = m[0].weight.detach().clone()
    s0 = m[0].weight_quantizer.scale.detach().clone()
    x, t = torch.randn(16, 64), torch.randn(16, 32)
    for _ in range(3):
        opt.zero_grad()
        F.mse_loss(m(x), t).backward()
        opt.step()
    assert not torch.equal(m[0].weight, w0) and not torch.equal(m[0].weight_quantizer.scale, s0)


def test_tiny_gpt_tied_head_is_full_precision_by_default_and_quantized_on_request():
    m = jacquant.transform(TinyGPT(GPTConfig(vocab_size=64, dim=64)), bits=2, group=32)
    assert "tok_emb.weight" not in names(m) and len(names(m)) == 8
    assert "full precision: tok_emb.weight" in jacquant.summary(m)
    h = jacquant.transform(TinyGPT(GPTConfig(vocab_size=64, dim=64)), bits=2, group=32, include_head=True)
    assert names(h)[-1] == "tok_emb.weight"
    # the embedding lookup keeps the full-precision table; only the head matmul is quantized
    idx = torch.randint(0, 64, (2, 8))
    x = h.tok_emb(idx)
    torch.testing.assert_close(x, F.embedding(idx, h.tok_emb.weight))
    site = [s for s in jacquant.sites(h) if s.name == "tok_emb.weight"][0]
    q = fake_quantize(h.tok_emb.weight, site.quantizer.scale, site.quantizer.zero_point, 2, 32)
    hidden = h.ln_f(torch.randn(2, 8, 64))
    torch.testing.assert_close(site.quantizer(hidden, h.tok_emb.weight), F.linear(hidden, q))
    loss = lm_loss(h(idx), idx)
    loss.backward()
    assert h.tok_emb.weight.grad is not None


def test_llama_sites_generate_and_save_pretrained(tmp_path):
    m = tiny_llama()
    jacquant.transform(m, bits=2, group=32)
    expected = [f"model.layers.{i}.{p}" for i in range(2) for p in
                ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    assert names(m) == expected
    assert "full precision: lm_head (LM head" in jacquant.summary(m)
    ids = torch.randint(0, 96, (2, 8))
    out = m(input_ids=ids, labels=ids)
    out.loss.backward()
    assert m.model.layers[0].self_attn.q_proj.weight_quantizer.scale.grad is not None
    assert m.generate(ids[:1, :4], max_new_tokens=3, do_sample=False).shape == (1, 7)
    m.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").exists()


def test_llama_with_head_counts_the_tied_weight_once():
    m = jacquant.transform(tiny_llama(tie=True), bits=4, group=32, include_head=True)
    assert names(m)[-1] == "lm_head" and len(names(m)) == 15
    assert m.lm_head.weight is m.model.embed_tokens.weight


def test_gpt2_conv1d_is_quantized_along_its_input_dimension():
    m = tiny_gpt2()
    jacquant.transform(m, bits=2, group=32)
    site = [s for s in jacquant.sites(m) if s.name == "transformer.h.0.mlp.c_proj"][0]
    conv = site.owner
    assert site.quantizer.transposed and tuple(site.quantizer.scale.shape) == (64, 256 // 32)
    x = torch.randn(2, 3, 256)
    q = fake_quantize(conv.weight.t(), site.quantizer.scale, site.quantizer.zero_point, 2, 32)  # [N, K]
    torch.testing.assert_close(conv(x), F.linear(x, q, conv.bias))
    ids = torch.randint(0, 96, (2, 8))
    m(input_ids=ids, labels=ids).loss.backward()
    assert conv.weight.grad.shape == conv.weight.shape


class FunctionalMatmuls(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(64, 32) * 0.1)  # used as x @ w1: stored [K, N]
        self.b = nn.Parameter(torch.zeros(32))
        self.w2 = nn.Parameter(torch.randn(16, 32) * 0.1)  # used as x @ w2.t(): stored [N, K]

    def forward(self, x):
        h = torch.relu(torch.addmm(self.b, x, self.w1))
        return torch.matmul(h, self.w2.t())


def test_functional_matmul_and_addmm_on_parameters():
    m = FunctionalMatmuls()
    jacquant.transform(m, bits=4, group=32)
    assert names(m) == ["w1", "w2"]
    q1, q2 = [s.quantizer for s in jacquant.sites(m)]
    assert q1.transposed and not q2.transposed
    x = torch.randn(4, 64)
    w1q = fake_quantize(m.w1.t(), q1.scale, q1.zero_point, 4, 32)
    w2q = fake_quantize(m.w2, q2.scale, q2.zero_point, 4, 32)
    torch.testing.assert_close(m(x), F.linear(torch.relu(F.linear(x, w1q, m.b)), w2q))


def test_filter_excludes_sites_and_summary_says_so():
    m = jacquant.transform(mlp(), bits=2, group=32, filter=lambda name, mod: name != "2")
    assert names(m) == ["0"]
    assert "full precision: 2 (excluded by filter)" in jacquant.summary(m)


def test_state_dict_round_trip_restores_outputs():
    torch.manual_seed(1)
    a = jacquant.transform(TinyGPT(GPTConfig(vocab_size=64, dim=64)), bits=2, group=32)
    with torch.no_grad():
        for s in jacquant.sites(a):
            s.quantizer.scale.mul_(1.1)
            s.quantizer.jac.uniform_(0.5, 1.5)
    torch.manual_seed(2)
    b = jacquant.transform(TinyGPT(GPTConfig(vocab_size=64, dim=64)), bits=2, group=32)
    idx = torch.randint(0, 64, (2, 8))
    assert not torch.allclose(a(idx), b(idx))
    b.load_state_dict(a.state_dict())
    assert any(k.endswith("weight_quantizer.jac") for k in a.state_dict())
    torch.testing.assert_close(a(idx), b(idx), rtol=0, atol=0)
    for sa, sb in zip(jacquant.sites(a), jacquant.sites(b)):
        assert torch.equal(sa.quantizer.jac, sb.quantizer.jac)


def test_rewritten_forward_follows_a_swapped_parameter():
    """The owner's new forward reads the owner's current weight (FSDP2 and assign=True swap it)."""
    m = jacquant.transform(mlp(), bits=2, group=32)
    x = torch.randn(3, 64)
    m[0].weight = nn.Parameter(torch.zeros(128, 64))
    q = m[0].weight_quantizer
    torch.testing.assert_close(m[0](x), F.linear(x, q.quantized_weight(m[0].weight), m[0].bias))
    torch.testing.assert_close(m[0](x), m[0].bias.expand(3, 128))
