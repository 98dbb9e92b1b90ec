"""GPTQ on jacquant's grid against an independent reference: on one group (one grid for the whole row) and no
damping, GPTQ's column-by-column rounding with Cholesky error feedback equals rounding each column and then
re-solving the columns not yet rounded by exact least squares (numpy's lstsq) on the calibration inputs."""
import numpy as np
import pytest
import torch

from jacquant.primitives.gptq import gptq_quantize, output_error
from jacquant.primitives.grid import fake_quantize, init_scale, qmax


def _sequential_least_squares(w, x, scale, zero, bits):
    """Round column j, then choose columns j+1.. to minimise ||X w0^T - X w^T||^2 with 0..j fixed (per row)."""
    w0 = w.astype(np.float64)
    n, k = w0.shape
    cur = w0.copy()
    latent = np.zeros_like(w0)
    s, z = scale[:, :1].astype(np.float64), zero[:, :1].astype(np.float64)
    target = x @ w0.T  # [M, N]
    for j in range(k):
        latent[:, j] = cur[:, j]
        c = np.clip(np.round(cur[:, j:j + 1] / s + z), 0, qmax(bits))
        cur[:, j] = (s * (c - z))[:, 0]
        if j + 1 < k:
            resid = target - x[:, :j + 1] @ cur[:, :j + 1].T
            sol, *_ = np.linalg.lstsq(x[:, j + 1:], resid, rcond=None)
            cur[:, j + 1:] = sol.T
    return latent, cur


@pytest.mark.parametrize("bits", [2, 3])
def test_gptq_equals_sequential_exact_least_squares_on_one_group(bits):
    g = torch.Generator().manual_seed(bits)
    n, k, m = 5, 12, 200
    mix = torch.randn(k, k, generator=g, dtype=torch.float64)
    x = (torch.randn(m, k, generator=g, dtype=torch.float64) @ mix)  # correlated inputs
    w = torch.randn(n, k, generator=g, dtype=torch.float64)
    h = x.t() @ x
    latent, scale, zero = gptq_quantize(w, h, bits, -1, init="minmax", damp=0.0, block=4)
    s0, z0 = init_scale(w.float(), bits, -1, "minmax")
    torch.testing.assert_close(scale, s0)  # one group: its grid from the untouched row
    ref_latent, ref_q = _sequential_least_squares(w.numpy(), x.numpy(), scale.numpy(), zero.numpy(), bits)
    np.testing.assert_allclose(latent.numpy(), ref_latent, rtol=1e-6, atol=1e-9)
    q = fake_quantize(latent.float(), scale, zero, bits, -1)
    np.testing.assert_allclose(q.numpy(), ref_q, rtol=1e-6, atol=1e-7)


def test_gptq_output_error_never_above_rtn_and_block_width_does_not_change_codes():
    g = torch.Generator().manual_seed(0)
    for trial in range(6):
        n, k, m = 48, 128, 512
        x = torch.randn(m, k, generator=g) @ torch.randn(k, k, generator=g) * 0.3 + torch.randn(k, generator=g)
        w = torch.randn(n, k, generator=g) * 0.05
        h = (x.t() @ x).double()
        for bits, group in ((2, 32), (3, 64), (4, -1)):
            s, z = init_scale(w, bits, group, "mse")
            rtn = fake_quantize(w, s, z, bits, group)
            latent, scale, zero = gptq_quantize(w, h, bits, group)
            q = fake_quantize(latent, scale, zero, bits, group)
            assert output_error(w, q, h) < output_error(w, rtn, h), (trial, bits, group)
            latent2, scale2, zero2 = gptq_quantize(w, h, bits, group, block=group if group > 0 else 16)
            torch.testing.assert_close(fake_quantize(latent2, scale2, zero2, bits, group), q, rtol=1e-5, atol=1e-6)


def test_gptq_rejects_a_hessian_of_the_wrong_size():
    with pytest.raises(ValueError, match=r"must be \[8, 8\]"):
        gptq_quantize(torch.randn(4, 8), torch.eye(6), 2, 4)
