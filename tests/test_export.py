"""export_onnx: onnxruntime parity with the fake-quant model, exact integer codes, file size, bad input."""
import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from conftest import mlp, tiny_gpt2, tiny_llama, numpy_unpack
from onnx import TensorProto, numpy_helper

import jacquant
from jacquant.export import export_onnx
from jacquant.testing.tiny_gpt import GPTConfig, TinyGPT

ort = pytest.importorskip("onnxruntime")

# max |y_ort - y_torch| / max |y_torch| with fp32 activations (level 0; and the standard-op graph with
# onnxruntime's DQ+MatMul fusion set to level 0): summation order only, on any CPU
TOL = 1e-4


def _session(path: str, dq_level: int = 0):
    so = ort.SessionOptions()
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(dq_level))
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def _torch_out(model, x):
    with torch.no_grad():
        out = model(x)
    return (out if torch.is_tensor(out) else out.logits).numpy()


def _rel_err(y, ref):
    return float(np.abs(y - ref).max() / np.abs(ref).max())


def _int8_rounded(x: torch.Tensor, block: int) -> torch.Tensor:
    """x [..., K] rounded as MatMulNBits' accuracy_level 4 rounds its input A: per block of the weight's group along
    K, x̂ = (max|x|/127)·round(x·127/max|x|)."""
    xb = x.float().reshape(*x.shape[:-1], x.shape[-1] // block, block)
    top = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(top == 0, torch.zeros_like(top), 127.0 / top)
    return ((xb * inv).round() * (top / 127)).reshape(x.shape)


def _torch_out_int8(model, x, group: int):
    """The model's output with every quantized matmul's input rounded to int8 per block (:func:`_int8_rounded`)."""
    owners = {id(s.owner): s.owner for s in jacquant.sites(model)}
    hooks = [m.register_forward_pre_hook(lambda mod, a: (_int8_rounded(a[0], group), *a[1:])) for m in owners.values()]
    try:
        return _torch_out(model, x)
    finally:
        for h in hooks:
            h.remove()



def _codes_from_onnx(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Codes [N, K] per layer, read back from the initializers with onnx's own helpers where possible."""
    inits = {t.name: t for t in proto.graph.initializer}
    out = {}
    for node in proto.graph.node:
        if node.op_type == "MatMulNBits":
            bits = next(a.i for a in node.attribute if a.name == "bits")
            out[node.input[1].removesuffix(".packed")] = numpy_unpack(
                numpy_helper.to_array(inits[node.input[1]]), bits)
        elif node.op_type == "DequantizeLinear" and node.input[0] in inits:
            out[node.input[0].removesuffix(".codes")] = numpy_helper.to_array(inits[node.input[0]]).astype(np.uint8).T
    return out


def _expected_codes(model) -> dict[str, np.ndarray]:
    """PyTorch's codes, keyed like the exported initializers: ``<owner path>.<weight>_packed``."""
    out = {}
    for owner_path, owner in model.named_modules():
        for s in jacquant.sites(model):
            if s.owner is owner:
                key = ".".join(p for p in (owner_path, s.quantizer.weight_attr.replace(".", "_") + "_packed") if p)
                out[key] = s.quantizer.codes(s.weight).numpy()
    return out


CASES = [  # model, example input, a differently shaped input, target, accuracy level, bits
    ("mlp", "ort", 0, 2), ("mlp", "ort", 4, 4), ("mlp", "onnx", 0, 2), ("mlp", "onnx", 0, 4),
    ("tinygpt", "ort", 0, 2), ("tinygpt", "onnx", 0, 2),
    ("llama", "ort", 4, 2), ("llama", "onnx", 0, 4),
    ("gpt2", "ort", 0, 2),
]


def _model(name):
    if name == "mlp":
        return mlp(), torch.randn(3, 64), torch.randn(7, 64)
    if name == "tinygpt":
        return TinyGPT(GPTConfig(vocab_size=64, dim=64)), torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (3, 13))
    make = tiny_llama if name == "llama" else tiny_gpt2
    return make(), torch.randint(0, 96, (2, 8)), torch.randint(0, 96, (1, 19))


@pytest.mark.parametrize("name,target,level,bits", CASES)
def test_onnxruntime_matches_fake_quant_with_exact_codes(tmp_path, name, target, level, bits):
    model, example, other = _model(name)
    jacquant.transform(model.eval(), bits=bits, group=16, include_head=name == "tinygpt")
    path = str(tmp_path / "m.onnx")
    proto = export_onnx(model, (example,), path, target=target, accuracy_level=level)
    onnx.checker.check_model(path, full_check=True)
    assert any(isinstance(m, jacquant.WeightQuantizer) for m in model.modules())  # exported a copy
    ops = {n.op_type for n in proto.graph.node}
    assert ("MatMulNBits" in ops) == (target == "ort") and ("DequantizeLinear" in ops) == (target == "onnx")
    assert not any(n.domain == "jacquant" for n in proto.graph.node)
    sess = _session(path)
    for x in (example, other):  # dynamic batch and sequence length
        y = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
        exact = _torch_out(model, x)
        if level == 0:
            assert _rel_err(y, exact) < TOL
        else:
            # int8 activations: which kernel runs (int8 per block, or fp32 where the CPU or the bit width has no int8
            # kernel) depends on the CPU, so the bound is the rounding's own size, measured on this input: twice
            # its effect in PyTorch (on an AVX2 CPU onnxruntime's 4-bit kernel matches it to 1e-6; its 2-bit one
            # runs fp32)
            assert _rel_err(y, exact) < 2 * _rel_err(_torch_out_int8(model, x, 16), exact) + TOL
    expected = _expected_codes(model)
    got = _codes_from_onnx(proto)
    assert got.keys() == expected.keys()
    for key, codes in expected.items():
        np.testing.assert_array_equal(got[key], codes, err_msg=key)


def test_two_bit_standard_graph_runs_in_onnx_reference_evaluator(tmp_path):
    from onnx.reference import ReferenceEvaluator

    model = jacquant.transform(mlp().eval(), bits=2, group=16)
    proto = export_onnx(model, (torch.randn(2, 64),), None, target="onnx")
    assert any(t.data_type == TensorProto.UINT2 for t in proto.graph.initializer)
    assert {(o.domain, o.version) for o in proto.opset_import} >= {("", 25)}
    x = torch.randn(4, 64)
    y = ReferenceEvaluator(proto).run(None, {proto.graph.input[0].name: x.numpy()})[0]
    assert _rel_err(y, _torch_out(model, x)) < 1e-5


def test_default_zero_point_is_omitted_for_matmulnbits():
    model = jacquant.transform(mlp().eval(), bits=4, group=32, symmetric=True)
    proto = export_onnx(model, torch.randn(2, 64), None, target="ort", accuracy_level=0)
    nodes = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == 2 and all(n.input[3] == "" for n in nodes)  # z = 8 everywhere: default grid
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 64)
    assert _rel_err(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0], _torch_out(model, x)) < 1e-5


@pytest.mark.parametrize("target", ["ort", "onnx"])
def test_file_size_close_to_theoretical(tmp_path, target):
    bits, group = 2, 64
    model = jacquant.transform(nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 512)).eval(),
                               bits=bits, group=group, init="minmax")
    path = tmp_path / "m.onnx"
    export_onnx(model, torch.randn(2, 512), str(path), target=target)
    weights = 2 * 512 * 1024
    blocks = weights // group
    zp_bits = bits * blocks  # MatMulNBits packs zero points b bits each (per row, rounded up to bytes: exact here)
    theoretical = (weights * bits + blocks * 32 + zp_bits) / 8 + 4 * (1024 + 512)  # + fp32 biases
    assert abs(path.stat().st_size / theoretical - 1) < 0.05


def test_export_refuses_untransformed_model():
    with pytest.raises(ValueError, match="jacquant.transform"):
        export_onnx(mlp(), torch.randn(2, 64), None)


def test_three_bits_refused_or_widened_exactly():
    model = jacquant.transform(mlp().eval(), bits=3, group=16)
    with pytest.raises(ValueError, match="widen_bits=True"):
        export_onnx(model, torch.randn(2, 64), None, target="ort")
    proto = export_onnx(model, torch.randn(2, 64), None, target="ort", accuracy_level=0, widen_bits=True)
    assert {next(a.i for a in n.attribute if a.name == "bits") for n in proto.graph.node if n.op_type == "MatMulNBits"} == {4}
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 64)
    assert _rel_err(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0], _torch_out(model, x)) < 1e-5


@pytest.mark.parametrize("group", [8, 48])
def test_group_matmulnbits_cannot_take_is_refused_for_ort_and_exported_for_onnx(group):
    model = jacquant.transform(nn.Sequential(nn.Linear(96, 32)).eval(), bits=4, group=group)
    with pytest.raises(ValueError, match="power of two >= 16"):
        export_onnx(model, torch.randn(2, 96), None, target="ort")
    proto = export_onnx(model, torch.randn(2, 96), None, target="onnx")
    dq = next(n for n in proto.graph.node if n.op_type == "DequantizeLinear")
    assert next(a.i for a in dq.attribute if a.name == "block_size") == group
    sess = _session(proto.SerializeToString())
    x = torch.randn(3, 96)
    assert _rel_err(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0], _torch_out(model, x)) < 1e-5


def test_bad_target_and_level():
    model = jacquant.transform(mlp(), bits=2, group=16)
    with pytest.raises(ValueError, match="target"):
        export_onnx(model, torch.randn(2, 64), None, target="tensorrt")
    with pytest.raises(ValueError, match="accuracy_level"):
        export_onnx(model, torch.randn(2, 64), None, accuracy_level=5)
