import pytest
import torch

from jacquant.primitives.grid import dequantize, fake_quantize, init_minmax, init_mse, init_scale, quantize


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [32, 64, -1])
@pytest.mark.parametrize("init", ["minmax", "mse"])
def test_codes_in_range_and_at_most_2_pow_bits_values_per_group(bits, group, init):
    w = torch.randn(6, 128) * torch.rand(6, 1) * 3
    s, z = init_scale(w, bits, group, init)
    c = quantize(w, s, z, bits, group)
    assert c.dtype == torch.uint8 and int(c.max()) <= 2**bits - 1
    g = 128 if group == -1 else group
    for row in c.reshape(-1, g):
        assert row.unique().numel() <= 2**bits
    # Q(w) lies on the grid s·(k - z) of its group, and equals dequantize(codes)
    q = fake_quantize(w, s, z, bits, group)
    torch.testing.assert_close(q, dequantize(c, s, z, group), rtol=0, atol=0)
    k = q.reshape(6, -1, g) / s.unsqueeze(-1) + z.unsqueeze(-1).float()
    torch.testing.assert_close(k, k.round(), atol=1e-4, rtol=0)


def test_fake_quantize_matches_an_elementwise_reference():
    w = torch.randn(3, 8)
    s, z = init_minmax(w, 2, 4)
    q = fake_quantize(w, s, z, 2, 4)
    for i in range(3):
        for j in range(8):
            sg, zg = float(s[i, j // 4]), int(z[i, j // 4])
            c = min(max(round(float(w[i, j]) / sg + zg), 0), 3)  # Python round is half-even, like torch
            assert abs(float(q[i, j]) - sg * (c - zg)) < 1e-6


def test_minmax_grid_covers_the_group_and_zero():
    w = torch.randn(4, 64)
    s, z = init_minmax(w, 4, 32)
    q = fake_quantize(w, s, z, 4, 32)
    # every weight is within half a step of its group's grid (no clipping with min/max)
    err = (q - w).abs().reshape(4, 2, 32)
    assert bool((err <= s.unsqueeze(-1) / 2 + 1e-6).all())


def test_constant_and_zero_groups_are_exact():
    w = torch.zeros(2, 64)
    w[1, :32] = 0.75  # a constant group
    for init in ("minmax", "mse"):
        s, z = init_scale(w, 2, 32, init)
        torch.testing.assert_close(fake_quantize(w, s, z, 2, 32), w)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_mse_init_is_never_worse_than_minmax(bits):
    w = torch.randn(16, 128)
    e = {}
    for name, fn in (("minmax", init_minmax), ("mse", init_mse)):
        s, z = fn(w, bits, 64)
        e[name] = ((fake_quantize(w, s, z, bits, 64) - w) ** 2).reshape(16, 2, 64).sum(-1)
    assert bool((e["mse"] <= e["minmax"] + 1e-6).all())
    assert float(e["mse"].sum()) < float(e["minmax"].sum())


def test_symmetric_grid_uses_the_default_zero_point():
    w = torch.randn(4, 64)
    s, z = init_scale(w, 4, 32, "minmax", symmetric=True)
    assert bool((z == 8).all())


def test_non_finite_weights_are_refused():
    w = torch.randn(2, 32)
    w[1, 3] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        init_minmax(w, 2, 32)
