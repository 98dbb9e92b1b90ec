import numpy as np
import pytest
import torch
import torch.nn as nn

import jacquant
from jacquant.qat.optim import MarsAdamW, expand_b, scale_updates_by_b
from jacquant.qat.quantizer import sites


def _mlp(method="jacquant", seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    return jacquant.transform(model, bits=2, group=32, method=method)


def _loss(model, seed):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(32, 64, generator=g), torch.randn(32, 8, generator=g)
    return ((model(x) - y) ** 2).mean()


def test_expand_b_repeats_per_group_and_transposes():
    jac = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert expand_b(jac, 2, False).tolist() == [[1, 1, 2, 2], [3, 3, 4, 4]]
    assert expand_b(jac, 2, True).tolist() == [[1, 3], [1, 3], [2, 4], [2, 4]]


def test_update_scaling_multiplies_the_sgd_step_by_b_and_uses_ste_gradient():
    model = _mlp()
    ref = _mlp(method="ste")
    b_vals = torch.tensor([0.0, 0.5, 1.0, 1.7])
    for s in sites(model):
        s.quantizer.jac.copy_(b_vals[torch.arange(s.quantizer.jac.numel()) % 4].reshape(s.quantizer.jac.shape))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = scale_updates_by_b(opt, model)
    assert all(s.quantizer.rule == "ste" for s in sites(model))
    _loss(model, 0).backward()
    _loss(ref, 0).backward()
    w_old = [s.weight.detach().clone() for s in sites(model)]
    opt.step()
    for s, r, w0 in zip(sites(model), sites(ref), w_old):
        b = expand_b(s.quantizer.jac, 32, False)
        torch.testing.assert_close(s.weight.detach(), w0 - 0.1 * b * r.weight.grad, rtol=1e-6, atol=1e-7)
    handle.remove()
    assert all(s.quantizer.rule == "jacquant" for s in sites(model))


def _adamw_run(update_scaling: bool, steps=5):
    model = _mlp(method="jacquant" if update_scaling else "ste")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    if update_scaling:
        scale_updates_by_b(opt, model)  # B = 1 everywhere
    for t in range(steps):
        _loss(model, t).backward()
        opt.step()
        opt.zero_grad()
    return model.state_dict()


def test_update_scaling_with_b_one_is_plain_ste_adamw_bit_for_bit():
    a, b = _adamw_run(False), _adamw_run(True)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_update_scaling_refuses_an_optimizer_without_the_weights():
    model = _mlp()
    opt = torch.optim.SGD([model[0].bias], lr=0.1)
    with pytest.raises(ValueError, match="does not update the quantized weights"):
        scale_updates_by_b(opt, model)


def _mars_reference(grads, lr, b1, b2, eps, wd, gamma, max_norm, w0):
    """Independent float64 numpy MARS-AdamW on a fixed gradient sequence."""
    w, m, v, prev = w0.astype(np.float64).copy(), 0.0, 0.0, None
    for t, g in enumerate(grads, start=1):
        g = g.astype(np.float64)
        c = g if prev is None else g + gamma * b1 / (1 - b1) * (g - prev)
        n = np.linalg.norm(c)
        if n > max_norm:
            c = c * max_norm / n
        prev = g
        m = b1 * m + (1 - b1) * c
        v = b2 * v + (1 - b2) * c * c
        w = w * (1 - lr * wd) - lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
    return w


@pytest.mark.parametrize("gamma,scale", [(0.025, 1.0), (0.5, 0.01), (0.1, 0.3)])
def test_mars_adamw_matches_independent_reference(gamma, scale):
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal(50).astype(np.float32)
    grads = [rng.standard_normal(50).astype(np.float32) * scale for _ in range(8)]  # norm ~7·scale: clips at 1.0
    p = nn.Parameter(torch.tensor(w0))
    opt = MarsAdamW([p], lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, gamma=gamma)
    for g in grads:
        p.grad = torch.tensor(g)
        opt.step()
    ref = _mars_reference(grads, 0.01, 0.9, 0.99, 1e-8, 0.1, gamma, 1.0, w0)
    np.testing.assert_allclose(p.detach().numpy(), ref, rtol=1e-5, atol=1e-6)


def test_mars_gamma_zero_unclipped_equals_adamw():
    torch.manual_seed(0)
    w0 = torch.randn(40)
    grads = [torch.randn(40) * 0.05 for _ in range(6)]  # norm < 1: no clipping
    p1, p2 = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    o1 = MarsAdamW([p1], lr=1e-2, betas=(0.9, 0.999), weight_decay=0.01, gamma=0.0)
    o2 = torch.optim.AdamW([p2], lr=1e-2, betas=(0.9, 0.999), weight_decay=0.01)
    for g in grads:
        p1.grad, p2.grad = g.clone(), g.clone()
        o1.step()
        o2.step()
    torch.testing.assert_close(p1, p2, rtol=1e-6, atol=1e-6)


def test_mars_bad_args_name_the_field():
    with pytest.raises(ValueError, match="betas"):
        MarsAdamW([nn.Parameter(torch.zeros(1))], betas=(1.0, 0.9))
