"""convert / save_converted / load_converted: packed integer model equals the fake-quant model."""
import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import mlp, tiny_gpt2, tiny_llama, numpy_unpack

import jacquant
from jacquant.export.convert import PackedWeight, convert, load_converted, packed_sites, read_metadata, save_converted
from jacquant.testing.tiny_gpt import GPTConfig, TinyGPT


def _logits(model, x):
    out = model(x)
    return out if torch.is_tensor(out) else out.logits



MODELS = {
    "mlp": (mlp, lambda: torch.randn(5, 64), {}),
    "tinygpt_head": (lambda: TinyGPT(GPTConfig(vocab_size=64, dim=64)), lambda: torch.randint(0, 64, (2, 9)),
                     {"include_head": True}),
    "llama": (lambda: tiny_llama(tie=False), lambda: torch.randint(0, 96, (2, 7)), {}),
    "gpt2": (tiny_gpt2, lambda: torch.randint(0, 96, (2, 7)), {}),
}


@pytest.mark.parametrize("name,bits", [(name, 2) for name in MODELS] + [("mlp", 4), ("gpt2", 4)])
def test_converted_outputs_equal_fake_quant_and_codes_match(name, bits):
    make, inp, opts = MODELS[name]
    model = jacquant.transform(make().eval(), bits=bits, group=16, method="ste", **opts)
    codes = {s.name: s.quantizer.codes(s.weight).numpy() for s in jacquant.sites(model)}
    x = inp()
    with torch.no_grad():
        ref = _logits(model, x)
        conv = convert(copy.deepcopy(model))
        y = _logits(conv, x)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-6)
    found = {s.name: s.packed for s in packed_sites(conv)}
    assert found.keys() == codes.keys()
    for site_name, p in found.items():
        np.testing.assert_array_equal(numpy_unpack(p.packed.numpy(), bits), codes[site_name])
    assert not any(isinstance(m, jacquant.WeightQuantizer) for m in conv.modules())


def test_fp_weights_are_dropped_and_tied_embedding_kept():
    model = jacquant.transform(TinyGPT(GPTConfig(vocab_size=64, dim=64)).eval(), bits=2, group=16, include_head=True)
    conv = convert(model)
    state = conv.state_dict()
    assert not any(k.endswith(("qkv.weight", "proj.weight", "fc.weight", "out.weight")) for k in state)
    assert conv.blocks[0].qkv.weight is None and conv.blocks[0].qkv.bias is not None
    assert "tok_emb.weight" in state  # the embedding still needs the table the quantized head was tied to
    # 8 block linears of TinyGPT(dim 64): packed at 2 bits = numel/4 bytes
    packed_bytes = sum(s.packed.packed.numel() for s in packed_sites(conv))
    assert packed_bytes == (2 * (64 * 192 + 64 * 64 + 64 * 256 + 256 * 64) + 64 * 64) // 4


def test_three_bit_codes_use_a_four_bit_container():
    model = jacquant.transform(mlp().eval(), bits=3, group=16)
    x = torch.randn(4, 64)
    with torch.no_grad():
        ref = model(x)
        conv = convert(model)
        y = conv(x)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-6)
    p = next(packed_sites(conv)).packed
    assert (p.bits, p.storage_bits) == (3, 4) and int(p.codes().max()) <= 7


def test_convert_refuses_untransformed_and_converted_models():
    with pytest.raises(ValueError, match="transform"):
        convert(mlp())
    conv = convert(jacquant.transform(mlp(), bits=2, group=16))
    with pytest.raises(ValueError, match="already converted"):
        convert(conv)


def test_convert_refuses_group_that_does_not_fill_bytes():
    model = jacquant.transform(nn.Sequential(nn.Linear(6, 4)), bits=2, group=2)
    with pytest.raises(ValueError, match="whole bytes"):
        convert(model)


@pytest.mark.parametrize("skeleton", ["fp_llama", "transformed_tinygpt"])
def test_save_load_roundtrip(tmp_path, skeleton):
    make = (lambda: tiny_llama(tie=True)) if skeleton == "fp_llama" else (lambda: TinyGPT(GPTConfig(64, 64)))
    model = jacquant.transform(make().eval(), bits=2, group=32, include_head=True)
    x = torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        ref = _logits(model, x)
    path = str(tmp_path / "m.safetensors")
    save_converted(convert(model), path)
    meta = read_metadata(path)
    assert {v["bits"] for v in meta["layers"].values()} == {2}
    assert len(meta["layers"]) == (15 if skeleton == "fp_llama" else 9)  # 7 per layer + head; 4 per block + head
    sk = make().eval()
    if skeleton.startswith("transformed"):
        jacquant.transform(sk, bits=2, group=32, include_head=True)
    load_converted(sk, path)
    with torch.no_grad():
        torch.testing.assert_close(_logits(sk, x), ref, rtol=0, atol=1e-6)
    assert with_no_safetensors_pickle(path)


def with_no_safetensors_pickle(path: str) -> bool:
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = f.read(header_len)
    return header.startswith(b"{") and b"jacquant.converted" in header


def test_load_refuses_mismatched_checkpoints(tmp_path):
    path = str(tmp_path / "m.safetensors")
    save_converted(convert(jacquant.transform(mlp(), bits=2, group=16)), path)
    with pytest.raises(ValueError, match="does not match"):
        load_converted(jacquant.transform(mlp(), bits=4, group=16), path)
    with pytest.raises(ValueError, match="does not match"):
        load_converted(jacquant.transform(mlp(), bits=2, group=32), path)
    with pytest.raises(ValueError, match=r"missing \['3.bias', '3.weight'\]"):  # a layer the checkpoint lacks
        load_converted(nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32), nn.Linear(32, 32)), path)
    with pytest.raises(ValueError, match="packed layers differ"):
        load_converted(convert(jacquant.transform(nn.Sequential(nn.Linear(64, 128)), bits=2, group=16)), path)
    from safetensors.torch import save_file

    other = str(tmp_path / "other.safetensors")
    save_file({"w": torch.zeros(2)}, other)
    with pytest.raises(ValueError, match="not a jacquant converted checkpoint"):
        load_converted(mlp(), other)
    with pytest.raises(ValueError, match="convert"):
        save_converted(mlp(), str(tmp_path / "x.safetensors"))


def test_load_refuses_wrong_tensor_shape(tmp_path):
    path = str(tmp_path / "m.safetensors")
    save_converted(convert(jacquant.transform(mlp(), bits=2, group=16)), path)
    sk = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))
    sk[0].bias = nn.Parameter(torch.zeros(128, dtype=torch.float64))
    with pytest.raises(ValueError, match="0.bias"):
        load_converted(sk, path)


def test_packed_weight_dequantizes_to_quantized_weight():
    model = jacquant.transform(mlp(), bits=4, group=32)
    q = {s.name: s.quantizer.quantized_weight(s.weight) for s in jacquant.sites(model)}
    for s in packed_sites(convert(model)):
        assert isinstance(s.packed, PackedWeight)
        torch.testing.assert_close(s.packed.dequantized(), q[s.name], rtol=0, atol=0)
