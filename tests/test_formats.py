"""GGUF formats as grids: the fake-quant forward equals gguf-py's dequantization of the block bytes bit for bit,
the scale-and-min op's backward matches hand formulas and finite differences, B ≡ 1 is STE exactly."""
import numpy as np
import pytest
import torch
import torch.nn as nn

import jacquant
from jacquant.primitives import formats
from jacquant.export.gguf_blocks import GGUFWeight, dequantize, pack_q4_0, row_bytes
from jacquant.primitives.grid import fake_quantize_affine
from jacquant.qat.quantizer import AffineQuantizer, WeightQuantizer, sites
from jacquant.primitives.surrogates import backward_affine

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize as gguf_dequantize  # noqa: E402

from conftest import tiny_llama  # noqa: E402

GT = gguf.GGMLQuantizationType


def awkward_weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Gaussian rows with the fp16 corner cases: an all-zero block, a constant block, an all-positive and an
    all-negative block, tiny values (fp16 subnormal scales) and one huge outlier."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[0, :32] = 0
    w[1, :32] = 0.125
    w[2, 32:64] = w[2, 32:64].abs() + 0.01
    w[3, :64] = -w[3, :64].abs()
    w[4, :] *= 1e-6
    w[5, 7] = 40.0
    return w


def linear(w: torch.Tensor) -> nn.Module:
    m = nn.Sequential(nn.Linear(w.shape[1], w.shape[0], bias=False))
    with torch.no_grad():
        m[0].weight.copy_(w)
    return m


def quantizer_of(model: nn.Module):
    (site,) = list(sites(model))
    return site.quantizer, site.weight


@pytest.mark.parametrize("fmt,shape", [("q4_0", (7, 96)), ("q4_1", (9, 160)), ("q2_k", (6, 512)), ("q2_k", (11, 256))])
@pytest.mark.parametrize("init", ["mse", "llama"])
def test_fake_quant_equals_gguf_dequantize_of_the_packed_bytes(fmt, shape, init):
    w = awkward_weight(*shape)
    model = jacquant.transform(linear(w), format=fmt, init=init, method="ste")
    q, weight = quantizer_of(model)
    assert q.format == fmt and isinstance(q, AffineQuantizer) == (fmt != "q4_0")
    fq = q.quantized_weight(weight)
    converted = jacquant.convert(model)
    packed = converted[0].weight_packed
    if fmt == "q4_0":
        blocks = pack_q4_0(packed.codes(), packed.scale)
        assert packed.format == "q4_0" and torch.equal(packed.zero_point, torch.full_like(packed.zero_point, 8))
    else:
        assert isinstance(packed, GGUFWeight)
        blocks = packed.blocks
    assert blocks.shape == (shape[0], row_bytes(fmt, shape[1]))
    ref = gguf_dequantize(blocks.numpy(), GT[fmt.upper()])
    assert np.array_equal(ref.view(np.uint32), fq.numpy().view(np.uint32))  # bit for bit, signed zeros aside
    assert torch.equal(dequantize(blocks, fmt, shape[1]), torch.from_numpy(ref))  # our reader is gguf-py's too
    x = torch.randn(3, shape[1])
    assert torch.equal(converted(x), x @ torch.from_numpy(ref).t())


def test_forward_of_the_transformed_model_multiplies_by_the_gguf_values():
    w = awkward_weight(8, 256)
    model = jacquant.transform(linear(w), format="q2_k", method="stableqat")
    q, weight = quantizer_of(model)
    x = torch.randn(4, 256)
    assert torch.equal(model(x), torch.nn.functional.linear(x, q.quantized_weight(weight)))


def test_fp16_rounding_of_the_q4_0_scale_is_exact_and_straight_through():
    w = awkward_weight(6, 64)
    model = jacquant.transform(linear(w), format="q4_0", method="ste")
    q, weight = quantizer_of(model)
    s = q.effective_scale()
    assert torch.equal(s, s.half().float()) and bool((s >= formats.FP16_TINY).all())
    model(torch.randn(2, 64)).square().sum().backward()
    assert q.scale.grad is not None and q.scale.grad.abs().sum() > 0


def test_q2_k_indices_are_4_bit_and_sub_block_scales_positive():
    w = awkward_weight(6, 512)
    q, _ = quantizer_of(jacquant.transform(linear(w), format="q2_k"))
    p = q.gguf_params()
    assert p["sc"].min() >= 1 and p["sc"].max() <= 15 and p["mn"].max() <= 15
    assert torch.equal(p["d"], p["d"].half().float()) and torch.equal(p["dmin"], p["dmin"].half().float())


def test_affine_backward_matches_hand_formulas_and_b_one_is_ste():
    torch.manual_seed(1)
    w = torch.randn(4, 32)
    s = torch.rand(4, 2) * 0.2 + 0.1
    m = -torch.rand(4, 2) * 0.3
    gq = torch.randn(4, 32)
    ones = torch.ones(4, 2)
    gw, gs, gm = backward_affine(gq, w, s, m, ones, 2, 16, "ste", 0.0)
    v = (w.reshape(4, 2, 16) - m[..., None]) / s[..., None]
    inside = (v >= 0) & (v <= 3)
    c = v.round().clamp(0, 3)
    gamma = 1 / (16 * 3) ** 0.5
    torch.testing.assert_close(gw, (gq.reshape(4, 2, 16) * inside).reshape(4, 32), rtol=0, atol=0)
    torch.testing.assert_close(gs, gamma * (gq.reshape(4, 2, 16) * torch.where(inside, c - v, c)).sum(-1))
    torch.testing.assert_close(gm, gamma * (gq.reshape(4, 2, 16) * ~inside).sum(-1))
    gw_j, gs_j, gm_j = backward_affine(gq, w, s, m, ones, 2, 16, "jacquant", 0.0)
    assert torch.equal(gw_j, gw) and torch.equal(gs_j, gs) and torch.equal(gm_j, gm)
    gw_a, _, _ = backward_affine(gq, w, s, m, ones, 2, 16, "stableqat", 0.0)  # A = 0 is STE
    assert torch.equal(gw_a, gw)


def test_affine_scale_and_min_gradients_are_exact_derivatives_where_codes_are_clamped():
    # for clamped elements c is constant, so Q = s·c + m and LSQ's terms c and 1 are the true derivatives:
    # check them against central differences of L = <g, Q> (no element near a threshold)
    torch.manual_seed(2)
    s = torch.tensor([[0.1]], dtype=torch.float64)
    m = torch.tensor([[-0.05]], dtype=torch.float64)
    w = torch.tensor([[-0.5, -0.3, 0.6, 0.9] * 4], dtype=torch.float64)  # v = -4.5, -2.5, 6.5, 9.5: all clamped
    gq = torch.randn(1, 16, dtype=torch.float64)
    _, gs, gm = backward_affine(gq, w, s, m, torch.ones(1, 1, dtype=torch.float64), 2, 16, "ste", 0.0)
    gamma = 1 / (16 * 3) ** 0.5
    L = lambda s_, m_: float((gq * fake_quantize_affine(w, s_, m_, 2, 16)).sum())  # noqa: E731
    h = 1e-6
    assert abs(float(gs) / gamma - (L(s + h, m) - L(s - h, m)) / (2 * h)) < 1e-6
    assert abs(float(gm) / gamma - (L(s, m + h) - L(s, m - h)) / (2 * h)) < 1e-6


@pytest.mark.parametrize("fmt", ["q4_1", "q2_k"])
def test_fused_cpu_affine_path_equals_the_reference(fmt):
    from jacquant.kernels import fake_quant_torch, fused_cpu

    torch.manual_seed(3)
    w = torch.randn(16, 256) * 0.05
    g = formats.FORMATS[fmt].group
    s = torch.rand(16, 256 // g) * 0.02 + 0.005
    m = -torch.rand(16, 256 // g) * 0.05
    gq = torch.randn(16, 256)
    jac = torch.rand(16, 256 // g) + 0.5
    bits = formats.FORMATS[fmt].bits
    assert torch.equal(fused_cpu.affine_forward(w, s, m, bits, g), fake_quantize_affine(w, s, m, bits, g))
    assert torch.equal(fake_quant_torch.affine_forward(w, s, m, bits, g), fake_quantize_affine(w, s, m, bits, g))
    for rule in ("ste", "jacquant", "stableqat"):
        ref = backward_affine(gq, w, s, m, jac, bits, g, rule, 0.21)
        for got in (fake_quant_torch.affine_backward(gq, w, s, m, jac, bits, g, rule, 0.21),
                    fused_cpu.affine_backward(gq, w, s, m, jac, bits, g, rule, 0.21)):
            # StableQAT's cos: inductor's vectorised cos may differ from libm's by an ulp (as for the integer grid)
            torch.testing.assert_close(got[0], ref[0], rtol=5e-6 if rule == "stableqat" else 0, atol=0)
            torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(got[2], ref[2], rtol=1e-5, atol=1e-7)


def test_q2_k_super_scale_gets_lsq_gradient_of_the_index_rounding():
    # s_j = d·round(σ_j/d) with STE: ds_j/dσ_j = 1, ds_j/dd = sc_j - σ_j/d (inside 1..15)
    d = torch.tensor([[0.15]], requires_grad=True)  # stored as 15·d
    sigma = torch.tensor([[0.0337] * 16], requires_grad=True)
    mu = torch.zeros(1, 16, requires_grad=True)
    dmin = torch.tensor([[0.15]], requires_grad=True)
    spec = formats.FORMATS["q2_k"]
    s, m = formats.affine_grid(spec, sigma, mu, d, dmin)
    dq = float((torch.tensor(0.15) / 15).half().float())
    assert torch.equal(s, torch.full((1, 16), dq * 3))
    s.sum().backward()
    torch.testing.assert_close(sigma.grad, torch.ones(1, 16))
    torch.testing.assert_close(d.grad, torch.tensor([[16 * (3 - 0.0337 / dq) / 15]]))  # d/d(15·d)


def test_rows_the_format_cannot_hold_are_an_error_or_fall_back():
    model = tiny_llama()  # hidden 64, intermediate 160: no row is a multiple of 256
    with pytest.raises(ValueError, match=r"layer `model\.layers\.0\.self_attn\.q_proj`: in_features 64 is not a "
                                         r"multiple of q2_k's block of 256; pass fallback='q4_0'"):
        jacquant.transform(model, format="q2_k")
    with pytest.raises(ValueError, match="in_features 48 is not a multiple of q4_0's block of 32"):
        jacquant.transform(linear(torch.randn(4, 48)), format="q4_0")
    w = torch.randn(8, 256 + 32)  # not a multiple of 256: falls back to q4_0
    q, _ = quantizer_of(jacquant.transform(linear(w), format="q2_k", fallback="q4_0"))
    assert q.format == "q4_0" and type(q) is WeightQuantizer
    with pytest.raises(ValueError, match="not a GGUF format"):
        jacquant.QuantConfig(format="q3_k")


def test_mixed_model_saves_and_loads_back(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=256, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    fp = LlamaForCausalLM(cfg)
    model = jacquant.transform(_copy(fp), format="q2_k", fallback="q4_0")
    formats_used = {s.name: s.quantizer.format for s in sites(model)}
    assert formats_used["model.layers.0.mlp.down_proj"] == "q2_k"
    assert formats_used["model.layers.0.mlp.up_proj"] == "q4_0"
    x = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        before = model(input_ids=x).logits
    jacquant.convert(model)
    path = str(tmp_path / "m.safetensors")
    jacquant.save_converted(model, path)
    loaded = jacquant.load_converted(_copy(fp), path)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x).logits, before)


def _copy(m):
    import copy

    return copy.deepcopy(m)
