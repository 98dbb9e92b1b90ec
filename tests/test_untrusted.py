"""Untrusted files: a truncated or tampered checkpoint or ONNX model is a ValueError naming the tensor.

Every case edits a good file the way corruption or a careless tool would (bytes cut off, a dtype or
shape in the header, the layer metadata, a packed tensor of the wrong size, values no writer
produces, an ONNX initializer or attribute) and checks the error names what is wrong, and that
nothing but a ValueError escapes (no safetensors/protobuf exception, no crash, no silent load).
"""
import json

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from conftest import mlp
from onnx import TensorProto, helper
from safetensors.torch import load_file, save_file

import jacquant
from jacquant.export.convert import check_safetensors_layout, read_metadata
from jacquant.export import export_onnx, load_onnx

ort = pytest.importorskip("onnxruntime")


# ------------------------------------------------------------------------------------ checkpoints
@pytest.fixture(scope="module")
def _saved(tmp_path_factory):
    model = jacquant.convert(jacquant.transform(mlp().eval(), bits=2, group=16, init="minmax"))
    path = tmp_path_factory.mktemp("ckpt") / "m.safetensors"
    jacquant.save_converted(model, str(path))
    x = torch.randn(3, 64)
    with torch.no_grad():
        return path.read_bytes(), model(x), x


@pytest.fixture
def ckpt(_saved, tmp_path):
    """A converted 2-bit MLP saved with save_converted, a fresh copy per test: (path, reference outputs, input)."""
    raw, ref, x = _saved
    path = tmp_path / "m.safetensors"
    path.write_bytes(raw)
    return str(path), ref, x


def _header(path):
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n)), f.read()


def _rewrite(path, edit):
    """Rewrite the header with ``edit(header)``; the data bytes are kept as they are."""
    header, data = _header(path)
    edit(header)
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw + data)


def _resave(path, edit_tensors=None, edit_meta=None):
    """A well-formed safetensors file whose tensors or metadata were edited (as a tool would)."""
    header, _ = _header(path)
    meta = dict(header["__metadata__"])
    tensors = load_file(path)
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(meta)
    save_file(tensors, path, metadata=meta)


def _skeleton():
    torch.manual_seed(1)
    return mlp().eval()


def test_good_checkpoint_loads_into_a_fresh_skeleton(ckpt):
    path, ref, x = ckpt
    model = jacquant.load_converted(_skeleton(), path)
    with torch.no_grad():
        assert torch.equal(model(x), ref)


@pytest.mark.parametrize("keep", [4, 100, -1, -3000])
def test_truncated_checkpoint(ckpt, keep):
    path, _, _ = ckpt
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[:keep] if keep > 0 else raw[:len(raw) + keep])
    expected = {4: "header length", 100: "header length", -1: r"`2\.weight_packed\.zero_point` ends at byte",
                -3000: r"ends at byte .* \(truncated\)"}[keep]
    with pytest.raises(ValueError, match=expected):
        jacquant.load_converted(_skeleton(), path)


@pytest.mark.parametrize("key,dtype,expected", [
    ("0.weight_packed.zero_point", "I8",  # same element size: caught against the model's dtype
     r"tensor `0\.weight_packed\.zero_point` is torch\.int8 \[128, 4\] in the checkpoint but torch\.uint8"),
    ("2.weight_packed.scale", "F16",  # other size: caught against the header's own offsets
     r"tensor `2\.weight_packed\.scale` is F16 \[32, 8\] \(512 bytes\) but its data_offsets \[2688, 3712\] hold "
     r"1024 bytes"),
])
def test_dtype_flipped_in_the_header(ckpt, key, dtype, expected):
    path, _, _ = ckpt
    _rewrite(path, lambda h: h[key].update(dtype=dtype))
    with pytest.raises(ValueError, match=expected):
        jacquant.load_converted(_skeleton(), path)


@pytest.mark.parametrize("shape,expected", [
    ([128, 16], r"tensor `0\.weight_packed\.packed` is torch\.uint8 \[128, 16\] in the checkpoint but torch\.uint8 "
                r"\[128, 4, 4\] in the model"),
    ([128, 4, 2], r"tensor `0\.weight_packed\.packed` is U8 \[128, 4, 2\] \(1024 bytes\)"),
    ([128, -4, 4], r"tensor `0\.weight_packed\.packed` has invalid shape"),
])
def test_shape_changed_in_the_header(ckpt, shape, expected):
    path, _, _ = ckpt
    _rewrite(path, lambda h: h["0.weight_packed.packed"].update(shape=shape))
    with pytest.raises(ValueError, match=expected):
        jacquant.load_converted(_skeleton(), path)


def test_overlapping_offsets(ckpt):
    path, _, _ = ckpt

    def edit(h):
        h["2.bias"]["data_offsets"] = [2560 - 128, 2560]
    _rewrite(path, edit)
    with pytest.raises(ValueError, match=r"tensor `2\.bias` starts at byte 2432 of the data, expected 2560 \(gap or overlap\)"):
        jacquant.load_converted(_skeleton(), path)


@pytest.mark.parametrize("field,value,expected", [
    ("out_features", 64, r"layer `0` does not match the model .*'out_features': \(64, 128\)"),
    ("group", 32, r"layer `0` does not match"),
    ("bits", "2", r"metadata of layer `0\.weight_packed` has missing or mistyped fields \['bits'\]"),
])
def test_layer_metadata_edited(ckpt, field, value, expected):
    path, _, _ = ckpt

    def edit(meta):
        layers = json.loads(meta["layers"])
        layers["0.weight_packed"][field] = value
        meta["layers"] = json.dumps(layers)
    _resave(path, edit_meta=edit)
    converted = jacquant.convert(jacquant.transform(_skeleton(), bits=2, group=16))
    with pytest.raises(ValueError, match=expected):
        jacquant.load_converted(converted, path)


def test_bits_in_metadata_disagree_with_the_packed_size(ckpt):
    """Metadata says 4 bits, the codes are 2-bit sized: the fp skeleton is built for 4 bits and refuses them."""
    path, _, _ = ckpt

    def edit(meta):
        layers = json.loads(meta["layers"])
        for v in layers.values():
            v.update(bits=4, storage_bits=4)
        meta["layers"] = json.dumps(layers)
    _resave(path, edit_meta=edit)
    with pytest.raises(ValueError, match=r"tensor `\d\.weight_packed\.packed` is torch\.uint8 \[\d+, \d, 4\] in the "
                                         r"checkpoint but torch\.uint8 \[\d+, \d, 8\] in the model"):
        jacquant.load_converted(_skeleton(), path)


def test_metadata_layers_not_json(ckpt):
    path, _, _ = ckpt
    _resave(path, edit_meta=lambda m: m.update(layers="{not json"))
    with pytest.raises(ValueError, match="metadata `layers` is missing or not JSON"):
        jacquant.load_converted(_skeleton(), path)


def test_packed_tensor_of_the_wrong_size(ckpt):
    path, _, _ = ckpt
    _resave(path, edit_tensors=lambda t: t.update({"2.weight_packed.packed": t["2.weight_packed.packed"][:, :7].contiguous()}))
    with pytest.raises(ValueError, match=r"tensor `2\.weight_packed\.packed` is torch\.uint8 \[32, 7, 4\]"):
        jacquant.load_converted(_skeleton(), path)


@pytest.mark.parametrize("key,value,expected", [
    ("0.weight_packed.zero_point", 200, r"tensor `0\.weight_packed\.zero_point` of layer `0` has values above 3"),
    ("2.weight_packed.scale", float("nan"), r"tensor `2\.weight_packed\.scale` of layer `2` has non-finite values"),
    ("2.weight_packed.scale", -1.0, r"tensor `2\.weight_packed\.scale` .* below SCALE_FLOOR"),
])
def test_values_no_writer_produces(ckpt, key, value, expected):
    path, _, _ = ckpt

    def edit(t):
        t[key] = t[key].clone()
        t[key].view(-1)[5] = value
    _resave(path, edit_tensors=edit)
    model = _skeleton()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=expected):
        jacquant.load_converted(model, path)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items() if k in model.state_dict())


def test_three_bit_code_above_the_range_in_its_four_bit_container(tmp_path):
    path = str(tmp_path / "m.safetensors")
    jacquant.save_converted(jacquant.convert(jacquant.transform(mlp(), bits=3, group=16)), path)
    _resave(path, edit_tensors=lambda t: t["0.weight_packed.packed"].view(-1).__setitem__(0, 0xF0))  # a code 15
    with pytest.raises(ValueError, match=r"tensor `0\.weight_packed\.packed` of layer `0` holds codes above 7"):
        jacquant.load_converted(_skeleton(), path)


def test_not_a_safetensors_file(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ValueError, match="header is not valid JSON"):
        read_metadata(str(path))
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="header length"):
        check_safetensors_layout(str(path))


# ------------------------------------------------------------------------------------ ONNX
@pytest.fixture(scope="module")
def onnx_models(tmp_path_factory):
    torch.manual_seed(0)
    model = jacquant.transform(nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 16)).eval(), bits=2,
                               group=16)
    x = torch.randn(2, 64)
    with torch.no_grad():
        ref = model(x).numpy()
    out = {}
    for target in ("ort", "onnx"):
        path = tmp_path_factory.mktemp(target) / "m.onnx"
        export_onnx(model, (x,), str(path), target=target, accuracy_level=0, dynamic=False)
        out[target] = path.read_bytes()
    return out, x, ref


def _node(proto, op):
    return next(n for n in proto.graph.node if n.op_type == op)


def _init(proto, name):
    return next(t for t in proto.graph.initializer if t.name == name)


def _set_attr(node, name, value):
    for a in node.attribute:
        if a.name == name:
            a.CopyFrom(helper.make_attribute(name, value))


@pytest.mark.parametrize("target", ["ort", "onnx"])
def test_good_onnx_loads_and_runs(onnx_models, target, tmp_path):
    raw, x, ref = onnx_models
    path = tmp_path / "m.onnx"
    path.write_bytes(raw[target])
    proto = load_onnx(path)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    y = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("target", ["ort", "onnx"])
def test_truncated_onnx(onnx_models, target, tmp_path):
    raw = onnx_models[0][target]
    for keep in (10, len(raw) // 2, len(raw) - 7):
        path = tmp_path / "m.onnx"
        path.write_bytes(raw[:keep])
        with pytest.raises(ValueError, match=r"m\.onnx: (not a readable ONNX model|initializer|onnx\.checker|node)"):
            load_onnx(path)


def _tamper(raw, edit):
    proto = onnx.load_from_string(raw)
    edit(proto)
    return proto.SerializeToString()


def _packed_name(proto):
    return _node(proto, "MatMulNBits").input[1]


ORT_CASES = {
    # B's dims and bytes both shrunk consistently: only the node's K/N/bits/block_size can tell
    "B smaller than K, N say": (
        lambda p: (_init(p, _packed_name(p)).dims.__setitem__(1, 3),
                   setattr(_init(p, _packed_name(p)), "raw_data", _init(p, _packed_name(p)).raw_data[:48 * 3 * 4])),
        r"B `0\.weight_packed\.packed` is UINT8 \[48, 3, 4\]; K=64, N=48, bits=2, block_size=16 need UINT8 \[48, 4, 4\]"),
    "B dims edited, bytes not": (
        lambda p: _init(p, _packed_name(p)).dims.__setitem__(0, 96),
        r"initializer `0\.weight_packed\.packed` is UINT8 \[96, 4, 4\] but holds 768 bytes, 1536 needed"),
    "K attribute edited": (
        lambda p: _set_attr(_node(p, "MatMulNBits"), "K", 128),
        r"K=128, N=48, bits=2, block_size=16 need UINT8 \[48, 8, 4\]"),
    "bits attribute 3": (
        lambda p: _set_attr(_node(p, "MatMulNBits"), "bits", 3),
        r"bits=3 must be 2, 4 or 8"),
    "N attribute edited": (
        lambda p: _set_attr(_node(p, "MatMulNBits"), "N", 40),
        r"B `0\.weight_packed\.packed` is UINT8 \[48, 4, 4\]; K=64, N=40, bits=2, block_size=16 need UINT8 \[40, 4, 4\]"),
    "non-finite scale": (
        lambda p: setattr(_init(p, _node(p, "MatMulNBits").input[2]), "raw_data",
                          np.full(48 * 4, np.nan, np.float32).tobytes()),
        r"initializer `0\.weight_packed\.scales` has non-finite scales"),
    "zero points truncated": (
        lambda p: (_init(p, _node(p, "MatMulNBits").input[3]).dims.__setitem__(0, 24),
                   setattr(_init(p, _node(p, "MatMulNBits").input[3]), "raw_data",
                           _init(p, _node(p, "MatMulNBits").input[3]).raw_data[:24])),
        r"initializer `0\.weight_packed\.zero_points` is UINT8 \[24, 1\]; zero points need UINT8 with 48 bytes"),
    "external data": (
        lambda p: (setattr(_init(p, _packed_name(p)), "data_location", TensorProto.EXTERNAL),
                   _init(p, _packed_name(p)).external_data.add(key="location", value="../../etc/passwd")),
        r"initializer `0\.weight_packed\.packed` refers to external data"),
}


def _dq(proto):
    return _node(proto, "DequantizeLinear")


DQ_CASES = {
    "codes bytes cut": (
        lambda p: setattr(_init(p, _dq(p).input[0]), "raw_data", _init(p, _dq(p).input[0]).raw_data[:-1]),
        r"initializer `0\.weight_packed\.codes` is UINT2 \[64, 48\] but holds 767 bytes, 768 needed"),
    "codes dims edited": (
        lambda p: _init(p, _dq(p).input[0]).dims.__setitem__(0, 32),
        r"initializer `0\.weight_packed\.codes` is UINT2 \[32, 48\] but holds 768 bytes, 384 needed"),
    "block_size edited": (
        lambda p: _set_attr(_dq(p), "block_size", 32),
        r"scale `0\.weight_packed\.scales` must be \[2, 48\] for x \[64, 48\] with block_size=32"),
    "zero point type": (
        lambda p: setattr(_init(p, _dq(p).input[2]), "data_type", TensorProto.UINT4) or setattr(
            _init(p, _dq(p).input[2]), "raw_data", bytes(4 * 48 // 2)),
        r"initializer `0\.weight_packed\.zero_points` is UINT4 \[4, 48\]; x's type UINT2"),
}


@pytest.mark.parametrize("target,case", [("ort", c) for c in ORT_CASES] + [("onnx", c) for c in DQ_CASES])
def test_tampered_model_is_refused(onnx_models, target, case, tmp_path):
    """MatMulNBits (ort) and blocked DequantizeLinear (onnx) files, each edited one way."""
    edit, expected = (ORT_CASES if target == "ort" else DQ_CASES)[case]
    path = tmp_path / "m.onnx"
    path.write_bytes(_tamper(onnx_models[0][target], edit))
    with pytest.raises(ValueError, match=expected):
        load_onnx(path)


def test_onnx_checker_failures_become_value_errors(onnx_models):
    raw = _tamper(onnx_models[0]["ort"], lambda p: p.graph.node[-1].input.append("does_not_exist"))
    with pytest.raises(ValueError, match="onnx.checker refuses the model"):
        load_onnx(raw)
