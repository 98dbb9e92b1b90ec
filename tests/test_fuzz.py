"""Property tests (hypothesis): packing round trips, quantizer invariants, export-then-run parity.

References are independent of the code under test: packing against a per-element bit loop in
numpy, codes against numpy's IEEE float32 arithmetic, Q against the exact product s·(c - z)
(exact in float64: a 24-bit s times an integer |c - z| < 2^8), ONNX against onnxruntime.

Idempotence, Q(Q(w)) = Q(w), holds bit for bit in every dtype. Q(w) is the value of w's dtype
nearest to s·k (k = c - z, in range). The second pass picks the in-range integer k' nearest to
Q(w)/s (fp32's error on w/s + z is ~2^-23·|v|, far below 1/2), so |s·k' - Q(w)| <= |s·k - Q(w)|
<= ulp/2 and s·k' rounds back to Q(w). The codes, c(Q(w)) = c(w), also survive for w inside the
range: either ulp <= s, so |Q(w) - s·k| <= s/2, or ulp > s, and then w itself (representable,
within s/2 < ulp/2 of s·k) is the nearest value, Q(w) = w. A clamped w has no such bound: its
codes survive where Q(w) resolves one grid step, |k|·u < 1/2 (u the unit roundoff of w's dtype,
2^-24 fp32, 2^-11 fp16, 2^-8 bf16) -- so not for bf16 at 8 bits (|k| up to 255).
"""
import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import jacquant
from jacquant.primitives.packing import pack_codes, pack_rows, pack_zero_points, unpack_codes, unpack_rows, unpack_zero_points
from jacquant.primitives.grid import SCALE_FLOOR, dequantize, fake_quantize, group_size, init_scale, qmax, quantize

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


# ------------------------------------------------------------------------------------ packing
def _numpy_pack(values: np.ndarray, bits: int) -> np.ndarray:
    """Reference: element j of each byte's 8/b at bits [j·b, (j+1)·b), one element at a time."""
    per = 8 // bits
    *lead, length = values.shape
    out = np.zeros((*lead, -(-length // per)), np.uint8)
    for i in range(length):
        out[..., i // per] |= (values[..., i].astype(np.uint8) << ((i % per) * bits)).astype(np.uint8)
    return out


@st.composite
def _rows(draw):
    bits = draw(st.sampled_from([2, 4, 8]))
    shape = draw(st.lists(st.integers(0, 4), min_size=0, max_size=3)) + [draw(st.integers(0, 37))]
    values = draw(hnp.arrays(np.uint8, shape, elements=st.integers(0, (1 << bits) - 1)))
    return bits, values


@FAST
@given(_rows())
def test_pack_rows_round_trip_and_layout(case):
    bits, values = case
    v = torch.from_numpy(values)
    packed = pack_rows(v, bits)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == -(-values.shape[-1] * bits // 8)
    np.testing.assert_array_equal(packed.numpy(), _numpy_pack(values, bits))
    assert torch.equal(unpack_rows(packed, bits, values.shape[-1]), v)


@st.composite
def _codes(draw):
    bits = draw(st.sampled_from([2, 4, 8]))
    group = draw(st.integers(1, 12)) * (8 // bits)  # G·b a whole number of bytes
    n, blocks = draw(st.integers(1, 6)), draw(st.integers(1, 5))
    codes = draw(hnp.arrays(np.uint8, (n, blocks * group), elements=st.integers(0, (1 << bits) - 1)))
    zp = draw(hnp.arrays(np.uint8, (n, blocks), elements=st.integers(0, (1 << bits) - 1)))
    return bits, group, codes, zp


@FAST
@given(_codes())
def test_pack_codes_and_zero_points_round_trip(case):
    bits, group, codes, zp = case
    c, z = torch.from_numpy(codes), torch.from_numpy(zp)
    packed = pack_codes(c, bits, group)
    n, k = codes.shape
    assert packed.shape == (n, k // group, group * bits // 8)
    np.testing.assert_array_equal(packed.numpy(), _numpy_pack(codes.reshape(n, k // group, group), bits))
    assert torch.equal(unpack_codes(packed, bits, group), c)
    assert torch.equal(unpack_zero_points(pack_zero_points(z, bits), bits, z.shape[1]), z)


@FAST
@given(st.sampled_from([2, 4]), st.integers(1, 40), st.data())
def test_pack_refuses_values_that_do_not_fit(bits, length, data):
    values = data.draw(hnp.arrays(np.uint8, (length,), elements=st.integers(0, 255)))
    assume(values.max() >= 1 << bits)
    with pytest.raises(ValueError, match=f"do not fit {bits} bits"):
        pack_rows(torch.from_numpy(values), bits)


def test_pack_refuses_bad_bits_and_groups():
    with pytest.raises(ValueError, match="bits=3"):
        pack_rows(torch.zeros(4, dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="multiple of group"):
        pack_codes(torch.zeros(2, 12, dtype=torch.uint8), 4, 5)
    with pytest.raises(ValueError, match="group·bits a multiple of 8"):
        pack_codes(torch.zeros(2, 12, dtype=torch.uint8), 2, 3)


# ------------------------------------------------------------------------------------ quantizer
@st.composite
def _quant_case(draw):
    bits = draw(st.sampled_from([2, 3, 4, 8]))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    n, blocks, g = draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.integers(1, 24))
    group = -1 if blocks == 1 and draw(st.booleans()) else g
    k = blocks * g
    mag = draw(st.sampled_from([2.0 ** -10, 1.0, 32.0]))
    w = draw(hnp.arrays(np.float32, (n, k), elements=st.floats(-mag, mag, width=32)))
    w = torch.from_numpy(w).to(dtype)
    if draw(st.booleans()):  # the initialisers' grid
        scale, zp = init_scale(w.float(), bits, group, draw(st.sampled_from(["minmax", "mse"])), draw(st.booleans()))
    else:  # any grid: scales below the floor, zero and negative ones included (the forward clamps them)
        scale = torch.from_numpy(draw(hnp.arrays(np.float32, (n, blocks), elements=st.one_of(
            st.floats(2.0 ** -20, 16.0, width=32), st.sampled_from([0.0, -1.0, 1e-9, SCALE_FLOOR])))))
        zp = torch.from_numpy(draw(hnp.arrays(np.uint8, (n, blocks), elements=st.integers(0, qmax(bits)))))
    return w, scale, zp, bits, group


def _numpy_codes(w, scale, zp, bits, group):
    """round-half-even(w/s + z) clipped to [0, 2^b - 1], in numpy float32 (IEEE division)."""
    n, k = w.shape
    g = group_size(k, group)
    wf = w.float().numpy().reshape(n, k // g, g)
    s = np.maximum(scale.numpy().astype(np.float32), np.float32(SCALE_FLOOR))[..., None]
    v = wf / s + zp.numpy().astype(np.float32)[..., None]
    return np.clip(np.rint(v), 0, qmax(bits)).astype(np.uint8).reshape(n, k)


def _exact_grid_value(codes, scale, zp, group, dtype):
    """s·(c - z) computed exactly in float64, then rounded once to fp32 and to ``dtype``."""
    n, k = codes.shape
    g = group_size(k, group)
    s = scale.to(torch.float32).clamp_min(SCALE_FLOOR).double().repeat_interleave(g, dim=1)
    kk = codes.double() - zp.double().repeat_interleave(g, dim=1)
    return (s * kk).to(torch.float32).to(dtype)


@FAST
@given(_quant_case())
def test_codes_in_range_and_equal_the_numpy_reference(case):
    w, scale, zp, bits, group = case
    c = quantize(w, scale, zp, bits, group)
    assert c.dtype == torch.uint8 and c.shape == w.shape and int(c.max()) <= qmax(bits)
    np.testing.assert_array_equal(c.numpy(), _numpy_codes(w, scale, zp, bits, group))


@FAST
@given(_quant_case())
def test_q_lies_on_the_grid_s_times_c_minus_z(case):
    w, scale, zp, bits, group = case
    q = fake_quantize(w, scale, zp, bits, group)
    c = quantize(w, scale, zp, bits, group)
    assert q.dtype == w.dtype
    assert torch.equal(q, _exact_grid_value(c, scale, zp, group, w.dtype))
    assert torch.equal(q, dequantize(c, scale, zp, group, dtype=w.dtype))


@FAST
@given(_quant_case())
def test_q_is_the_nearest_grid_point_inside_the_range(case):
    """|Q(w) - w| <= s/2 for w in [s·(0 - z), s·(2^b - 1 - z)], up to fp32's error on w/s + z."""
    w, scale, zp, bits, group = case
    n, k = w.shape
    g = group_size(k, group)
    wd = w.double()
    s = scale.double().clamp_min(SCALE_FLOOR).repeat_interleave(g, dim=1)
    z = zp.double().repeat_interleave(g, dim=1)
    inside = (wd >= -z * s) & (wd <= (qmax(bits) - z) * s)
    err = (fake_quantize(w, scale, zp, bits, group).double() - wd).abs()
    # v = w/s + z carries <= 2 roundings of relative 2^-24 (|v| <= 2·255); Q one of w's dtype
    tol = s * (0.5 + 2 * 2.0 ** -24 * 512) + w.double().abs() * UNIT_ROUNDOFF[w.dtype] * 2
    assert bool((err[inside] <= tol[inside]).all())


@FAST
@given(_quant_case())
def test_quantizer_is_idempotent(case):
    w, scale, zp, bits, group = case
    q = fake_quantize(w, scale, zp, bits, group)
    assert torch.equal(fake_quantize(q, scale, zp, bits, group), q)
    # the codes survive inside the range, and where Q(w) resolves one grid step (module docstring)
    c = quantize(w, scale, zp, bits, group)
    n, k = w.shape
    g = group_size(k, group)
    s = scale.double().clamp_min(SCALE_FLOOR).repeat_interleave(g, dim=1)
    z = zp.double().repeat_interleave(g, dim=1)
    v = w.double() / s + z
    kk = c.double() - z
    inside = (v >= 0) & (v <= qmax(bits))
    resolved = (kk.abs() * UNIT_ROUNDOFF[w.dtype] < 0.5) & ((kk == 0) | ((s * kk).abs() >= torch.finfo(w.dtype).tiny))
    keep = inside | resolved
    assert torch.equal(quantize(q, scale, zp, bits, group)[keep], c[keep])


def test_bf16_weight_clamped_at_8_bits_keeps_q_but_not_its_code():
    """The case the docstring excludes happens: s·255 = 76.70 rounds to bf16 76.5 = s·254.3."""
    scale, zp = torch.tensor([[0.30078]]), torch.zeros(1, 1, dtype=torch.uint8)
    w = torch.tensor([[100.0]], dtype=torch.bfloat16)  # beyond the range: code 255
    q = fake_quantize(w, scale, zp, 8, -1)
    assert float(q) == 76.5 and torch.equal(fake_quantize(q, scale, zp, 8, -1), q)
    assert int(quantize(w, scale, zp, 8, -1)) == 255 and int(quantize(q, scale, zp, 8, -1)) == 254


# ------------------------------------------------------------------------------------ export parity
ort = pytest.importorskip("onnxruntime")


@st.composite
def _export_case(draw):
    target = draw(st.sampled_from(["ort", "onnx"]))
    bits = draw(st.sampled_from([2, 4, 8]))
    if target == "ort":
        group = draw(st.sampled_from([16, 32]))
    else:
        group = draw(st.sampled_from([4, 8, 12, 16, 24]))
    k = group * draw(st.integers(1, 3))
    n = draw(st.integers(1, 40))
    bias = draw(st.booleans())
    batch = draw(st.integers(1, 5))
    symmetric = draw(st.booleans())
    seed = draw(st.integers(0, 2 ** 16))
    return target, bits, group, k, n, bias, batch, symmetric, seed


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_export_case())
@example(("onnx", 2, 16, 16, 1, False, 1, False, 0))  # found here: onnxruntime mis-fused UINT2 with N % 4 != 0
def test_export_then_run_matches_the_fake_quant_model(case):
    from jacquant.export import export_onnx, load_onnx

    target, bits, group, k, n, bias, batch, symmetric, seed = case
    torch.manual_seed(seed)
    model = jacquant.transform(nn.Sequential(nn.Linear(k, n, bias=bias)).eval(), bits=bits, group=group,
                               symmetric=symmetric)
    x = torch.randn(batch, k)
    proto = export_onnx(model, (x,), None, target=target, accuracy_level=0, dynamic=False)
    proto = load_onnx(proto.SerializeToString())  # the validator accepts what the exporter writes
    so = ort.SessionOptions()
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    y = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        ref = model(x).numpy()
    # fp32 activations on both sides; only the summation order differs
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(ref).max())))
