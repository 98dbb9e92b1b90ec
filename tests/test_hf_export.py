"""export_hf / load_hf_quantized: the compressed-tensors pack-quantized directory holds the converted model's grid
exactly (codes, zero points and scales unpacked here with numpy), transformers' from_pretrained computes its
weights bit for bit and its logits and greedy tokens; bad input is a clear error that leaves nothing behind; a
checkpoint (ours, or compressed-tensors' own) reads back as a transformed model with the checkpoint's codes."""
import json
import os

import numpy as np
import pytest
import torch
from conftest import tiny_llama

import jacquant

pytest.importorskip("compressed_tensors")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file  # noqa: E402

from jacquant.export import export_hf, load_hf_quantized  # noqa: E402
from jacquant.export.convert import packed_sites  # noqa: E402
from jacquant.qat.quantizer import sites  # noqa: E402

PROMPT = [5, 17, 42, 8, 63, 2, 90]
STEPS = 16
# The loaded weights are the converted model's bit for bit (fp32 scales, (q - zp)·s = s·(c - z) exactly), so the
# logits differ only by the two matmuls' float summation order: bounded by 1e-5 of the largest logit (observed 0).
LOGIT_TOL = 1e-5
CARD = {"model": "tiny-llama", "method": "jacquant", "steps": 60, "tokens": 30720, "lr": 1e-3, "loss": "kd",
        "seed": 0, "seconds": 12.0, "pipeline": {"start": "gptq"},
        "ppl": {"fp32": 18.15, "rtn": 62339.0, "start": 391.5, "qat": 50.46}}


def numpy_unpack_int32(words: np.ndarray, bits: int, cols: int) -> np.ndarray:
    """Independent unpacking of compressed-tensors' dense int32 packing: value i of a row sits at bits
    [i·b, (i+1)·b) of the row's words read as one little-endian bit string; stored as value + 2^(b-1)."""
    rows = words.shape[0]
    bitstr = np.unpackbits(np.ascontiguousarray(words, "<i4").view(np.uint8).reshape(rows, -1), axis=1,
                           bitorder="little")
    vals = bitstr[:, : cols * bits].reshape(rows, cols, bits).astype(np.int64) @ (1 << np.arange(bits))
    return vals - (1 << (bits - 1))  # signed q


def _converted(bits=None, fmt=None, include_head=False):
    m = tiny_llama(tie=True).eval()
    if fmt:
        jacquant.transform(m, format=fmt, method="ste")
    else:
        jacquant.transform(m, bits=bits, group=32, method="ste", include_head=include_head)
    return jacquant.convert(m)


def _greedy(model, prompt, steps):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
    return ids[len(prompt):]


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({f"w{i}": i for i in range(95)} | {"[UNK]": 95}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]")


@pytest.mark.parametrize("bits,fmt,include_head", [(2, None, False), (3, None, False), (4, None, True),
                                                   (None, "q4_0", False)])
def test_checkpoint_holds_the_converted_grid_and_transformers_computes_it(tmp_path, bits, fmt, include_head):
    conv = _converted(bits, fmt, include_head)
    out = tmp_path / "hf"
    info = export_hf(conv, str(out), tokenizer=_word_tokenizer() if bits == 2 else None, card=CARD)
    files = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "generation_config.json", "README.md"} <= files
    assert info["bytes"] == sum((out / f).stat().st_size for f in files)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    (group,) = qc["config_groups"].values()
    b = bits or 4
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized" and qc["dequantize"]
    assert group["weights"]["num_bits"] == b and group["weights"]["group_size"] == 32
    assert group["weights"]["symmetric"] is False and group["weights"]["strategy"] == "group"
    assert qc["ignore"] == ([] if include_head else ["lm_head"])
    tensors = load_file(str(out / "model.safetensors"))
    ref = {}
    for s in packed_sites(conv):
        name = s.path.rpartition(".")[0]
        n, k = s.packed.out_features, s.packed.in_features
        q = numpy_unpack_int32(tensors[f"{name}.weight_packed"], b, k)
        zp = numpy_unpack_int32(tensors[f"{name}.weight_zero_point"].T, b, n).T
        scale = tensors[f"{name}.weight_scale"]
        assert scale.dtype == np.float32 and list(tensors[f"{name}.weight_shape"]) == [n, k]
        # the codes and zero points are the trained model's, offset by 2^(b-1); the scales are its scales
        np.testing.assert_array_equal(q + (1 << (b - 1)), s.packed.codes().numpy())
        np.testing.assert_array_equal(zp + (1 << (b - 1)), s.packed.zero_point.numpy())
        np.testing.assert_array_equal(scale, s.packed.scale.numpy())
        ref[name] = ((q - np.repeat(zp, 32, axis=1)).astype(np.float32) * np.repeat(scale, 32, axis=1))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert hf.dtype == torch.float32
    for name, w in ref.items():  # what transformers multiplies by: the hand-dequantized weight, bit for bit
        np.testing.assert_array_equal(hf.get_submodule(name).weight.detach().numpy(), w)
        np.testing.assert_array_equal(w, dict((s.path.rpartition(".")[0], s.packed) for s in packed_sites(conv))[name]
                                      .dequantized().numpy())
    x = torch.randint(0, 96, (3, 20))
    with torch.no_grad():
        got, want = hf(input_ids=x).logits, conv(input_ids=x, use_cache=False).logits
    assert (got - want).abs().max() <= LOGIT_TOL * want.abs().max()
    assert _greedy(hf, PROMPT, STEPS) == _greedy(conv, PROMPT, STEPS)
    card = (out / "README.md").read_text()
    assert "50.46" in card and "391.50" in card and f"W{b} g32" in card and "pack-quantized" in card
    if bits == 2:
        tok = transformers.AutoTokenizer.from_pretrained(str(out))
        assert tok("w5 w17").input_ids == [5, 17]


def test_fp16_scales_halve_the_scale_bytes_and_transformers_rounds_each_weight_to_fp16(tmp_path):
    """scale_dtype=float16 stores the same scales (fp16 values) in 2 bytes; transformers multiplies in the stored
    dtype, so each loaded weight is fp16((q - zp)·s): computed here with numpy in fp16, and within 2^-11 of the
    converted model's weight relative."""
    conv = _converted(4)
    wide, narrow = tmp_path / "fp32", tmp_path / "fp16"
    a = export_hf(conv, str(wide))
    b = export_hf(conv, str(narrow), scale_dtype=torch.float16)
    tensors = load_file(str(narrow / "model.safetensors"))
    scales = [k for k in tensors if k.endswith("weight_scale")]
    assert len(scales) == 14 and a["bytes"] - b["bytes"] >= 2 * sum(tensors[k].size for k in scales) - 4096
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(narrow)).eval()
    packed = {s.path.rpartition(".")[0]: s.packed for s in packed_sites(conv)}
    for key in scales:
        name = key.rpartition(".")[0]
        scale = tensors[key]
        assert scale.dtype == np.float16
        np.testing.assert_array_equal(scale.astype(np.float32), packed[name].scale.numpy())
        n, k = packed[name].out_features, packed[name].in_features
        q = numpy_unpack_int32(tensors[f"{name}.weight_packed"], 4, k)
        zp = numpy_unpack_int32(tensors[f"{name}.weight_zero_point"].T, 4, n).T
        want = (q - np.repeat(zp, 32, axis=1)).astype(np.float16) * np.repeat(scale, 32, axis=1)  # fp16 product
        got = hf.get_submodule(name).weight.detach().numpy()
        np.testing.assert_array_equal(got, want.astype(np.float32))
        exact = packed[name].dequantized().numpy()
        assert np.all(np.abs(got - exact) <= 2.0 ** -11 * np.abs(exact))
    assert "fp16 scales" in (narrow / "README.md").read_text()
    with pytest.raises(ValueError, match="scale_dtype"):
        export_hf(conv, str(tmp_path / "bf16"), scale_dtype=torch.bfloat16)


def test_refuses_grids_directories_and_models_it_cannot_export_and_leaves_nothing(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"layer `model\.layers\.0\.self_attn\.q_proj`.*q4_1.*--gguf"):
        export_hf(_converted(fmt="q4_1"), str(tmp_path / "a"))
    with pytest.raises(ValueError, match="not quantized by jacquant.*transform"):
        export_hf(tiny_llama(), str(tmp_path / "b"))
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    conv = _converted(2)
    with pytest.raises(FileExistsError, match="taken already exists and is not an empty directory"):
        export_hf(conv, str(taken))
    assert os.listdir(taken) == ["keep.txt"]
    with pytest.raises(FileNotFoundError, match="mkdir -p"):
        export_hf(conv, str(tmp_path / "no" / "such"))

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("jacquant.export.hf.model_card", fail)  # fails after the weights are written
    with pytest.raises(OSError, match="disk full"):
        export_hf(conv, str(tmp_path / "c"))
    assert sorted(os.listdir(tmp_path)) == ["taken"]  # no target, no temporary directory


def test_our_checkpoint_reads_back_as_the_trained_grid(tmp_path):
    conv = _converted(3)
    export_hf(conv, str(tmp_path / "hf"))
    model = load_hf_quantized(str(tmp_path / "hf"))
    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    got = {s.name: s for s in sites(model)}
    assert set(got) == {s.path.rpartition(".")[0] for s in packed_sites(conv)}
    for name, s in got.items():
        k = s.weight.shape[1]
        q = numpy_unpack_int32(tensors[f"{name}.weight_packed"], 3, k)
        np.testing.assert_array_equal(s.quantizer.codes(s.weight).numpy(), q + 4)
        np.testing.assert_array_equal(s.quantizer.scale.detach().numpy(), tensors[f"{name}.weight_scale"])
    x = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x, use_cache=False).logits, conv(input_ids=x, use_cache=False).logits,
                                   rtol=0, atol=1e-5)


@pytest.mark.parametrize("bits,symmetric,strategy", [(4, False, "group"), (2, True, "channel")])
def test_compressed_tensors_own_checkpoint_is_a_qat_start(tmp_path, bits, symmetric, strategy):
    """A checkpoint quantized and packed by compressed-tensors alone (min/max scales from its own
    calculate_qparams): the transformed model's codes are compressed-tensors' own quantize() of the weights."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
        quantize,
    )
    from compressed_tensors.quantization.utils import calculate_qparams

    dense = tiny_llama(tie=True).eval()
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy=strategy,
                            group_size=32 if strategy == "group" else None)
    qc = QuantizationConfig(config_groups={"g": QuantizationScheme(targets=["Linear"], weights=args)},
                            ignore=["lm_head"])
    apply_quantization_config(dense, qc)
    want = {}
    for name, m in dense.named_modules():
        if getattr(m, "quantization_scheme", None) is None:
            continue
        w = m.weight.detach()
        wg = w.reshape(w.shape[0], -1, 32) if strategy == "group" else w.unsqueeze(1)
        scale, zp = calculate_qparams(wg.amin(-1), wg.amax(-1), args)
        with torch.no_grad():
            m.weight_scale.copy_(scale)
            if not symmetric:
                m.weight_zero_point.copy_(zp)
        want[name] = (quantize(w, m.weight_scale, getattr(m, "weight_zero_point", None), args).to(torch.int64)
                      + (1 << (bits - 1)), scale.clone())
    compressor = ModelCompressor.from_pretrained_model(dense, quantization_format="pack-quantized")
    compressor.compress_model(dense)
    dense.save_pretrained(str(tmp_path / "ct"))
    compressor.update_config(str(tmp_path / "ct"))
    with pytest.warns(UserWarning, match=r"14 of 14 layers store scales that are not fp16 values.*at most \d"):
        model = load_hf_quantized(str(tmp_path / "ct"))  # compressed-tensors' own min/max scales are fp32
    got = {s.name: s for s in sites(model)}
    assert set(got) == set(want) and len(want) == 14
    for name, (codes, scale) in want.items():
        s = got[name]
        assert (s.quantizer.bits, s.quantizer.group) == (bits, 32 if strategy == "group" else s.weight.shape[1])
        torch.testing.assert_close(s.quantizer.codes(s.weight).to(torch.int64), codes, rtol=0, atol=0)
        torch.testing.assert_close(s.quantizer.scale.detach(), scale.float(), rtol=0, atol=0)


def test_cli_exports_a_trained_model_and_trains_from_the_checkpoint(tmp_path, capsys):
    """`jacquant export --hf` of a `jacquant train` directory loads in transformers with the trained model's
    logits; `jacquant train` on the exported directory starts from its grid (the start is the checkpoint: its
    perplexity is the dequantized checkpoint's, and no GPTQ start is scored)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from jacquant.app.cli import main
    from jacquant.app.commands import load_trained

    torch.manual_seed(0)
    model = tmp_path / "tiny"
    LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(model)
    text = tmp_path / "a.txt"
    text.write_text(" ".join(f"The value {i} is stored in slot {i % 7} of the table." for i in range(300)))
    common = ["--text", str(text), "--steps", "2", "--seq", "16", "--batch", "2", "--group", "32", "--loss", "ce",
              "--calib-windows", "2", "--block-steps", "0"]
    assert main(["train", str(model), "--out", str(tmp_path / "t1"), "--bits", "3", *common]) == 0
    assert main(["export", str(model), "--out", str(tmp_path / "t1"), "--hf", str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    assert main(["export", str(model), "--out", str(tmp_path / "t1"), "--hf", str(tmp_path / "hf")]) == 2
    assert "already exists" in capsys.readouterr().err
    trained, _, _ = load_trained(str(model), str(tmp_path / "t1"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        want = trained(input_ids=x, use_cache=False).logits
        assert (hf(input_ids=x).logits - want).abs().max() <= LOGIT_TOL * want.abs().max()
    assert main(["train", str(tmp_path / "hf"), "--out", str(tmp_path / "t2"), "--bits", "2", *common]) == 0
    summary = json.loads((tmp_path / "t2" / "jacquant.json").read_text())
    assert (summary["bits"], summary["group"]) == (3, 32)  # the checkpoint's grid, not --bits
    assert summary["ppl"]["start"] is None and summary["ppl"]["rtn"] == pytest.approx(summary["ppl"]["fp32"], rel=1e-5)
