import pytest
import torch
import torch.nn as nn

import jacquant
from jacquant.qat import refresh as rf
from jacquant.primitives.estimators import dither
from jacquant.qat.refresh import RefreshConfig, attach, smooth, step
from jacquant.qat.quantizer import sites
from jacquant.testing.tiny_gpt import GPTConfig, TinyGPT, lm_loss


def _mlp(method="jacquant", seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16))
    return jacquant.transform(model, bits=2, group=32, method=method)


def test_smooth_formula_numbers():
    b = torch.tensor([1.0, 0.5, 2.0, 0.2])
    b_hat = torch.tensor([0.0, 3.0, 1.0, -1.0])
    # target = clip(0.8·B̂ + 0.2, 0.1, 2.0) = [0.2, 2.0, 1.0, 0.1]; new = 0.25·B + 0.75·target
    expect = torch.tensor([0.25 + 0.15, 0.125 + 1.5, 0.5 + 0.75, 0.05 + 0.075])
    torch.testing.assert_close(smooth(b, b_hat, beta=0.25, lam=0.8, b_min=0.1, b_max=2.0), expect)


def test_refresh_schedule_step_zero_and_every_k(monkeypatch):
    model = _mlp()
    attach(model, RefreshConfig(refresh_every=3))
    calls = []
    monkeypatch.setattr(rf, "refresh", lambda m, loss_fn=None: calls.append(int(m.jacquant_step)))
    due = [step(model) for _ in range(10)]
    assert calls == [0, 3, 6, 9]
    assert due == [t % 3 == 0 for t in range(10)]
    assert int(model.jacquant_step) == 10


def test_refresh_writes_smoothed_dither_into_every_site():
    model = _mlp()
    cfg = RefreshConfig(estimator="dither", width=1.5, beta=0.5, lam=0.9, b_min=0.2, b_max=1.5)
    attach(model, cfg)
    assert step(model) is True
    for s in sites(model):
        q = s.quantizer
        b_hat = dither(s.weight, q.scale, q.zero_point, 2, 32, 1.5)
        expect = 0.5 * 1.0 + 0.5 * (0.9 * b_hat + 0.1).clamp(0.2, 1.5)
        torch.testing.assert_close(q.jac, expect)
        assert not torch.equal(q.jac, torch.ones_like(q.jac))


def test_probe_refresh_advances_the_stored_rng():
    model = _mlp()
    attach(model, RefreshConfig(estimator="probe", width=0.5, refresh_every=1, seed=7))
    r0 = model.jacquant_rng.clone()
    step(model)
    b1 = [s.quantizer.jac.clone() for s in sites(model)]
    assert not torch.equal(r0, model.jacquant_rng)
    # the same seed from scratch gives the same B (the RNG lives in the buffer, not in globals)
    model2 = _mlp()
    attach(model2, RefreshConfig(estimator="probe", width=0.5, refresh_every=1, seed=7))
    torch.manual_seed(123)
    step(model2)
    assert all(torch.equal(a, s.quantizer.jac) for a, s in zip(b1, sites(model2)))


def test_data_probe_refresh_needs_loss_fn_and_uses_it():
    model = _mlp()
    attach(model, RefreshConfig(estimator="data_probe", width=2.0, n_probes=4, beta=0.0))
    with pytest.raises(ValueError, match="loss_fn"):
        step(model)
    x = torch.randn(64, 64)
    y = torch.randn(64, 16)
    step(model, loss_fn=lambda: ((model(x) - y) ** 2).mean())
    for s in sites(model):
        assert torch.isfinite(s.quantizer.jac).all()
        assert (s.quantizer.jac >= 0.1).all() and (s.quantizer.jac <= 2.0).all()


def test_bad_config_names_the_field():
    with pytest.raises(ValueError, match="RefreshConfig.estimator"):
        RefreshConfig(estimator="magic")
    with pytest.raises(ValueError, match="RefreshConfig.beta"):
        RefreshConfig(beta=1.0)
    with pytest.raises(ValueError, match="no quantized site"):
        attach(nn.Linear(2, 2))


def _train_gpt(method: str, steps: int = 6) -> dict:
    torch.manual_seed(0)
    model = TinyGPT(GPTConfig(vocab_size=64, dim=32, n_layer=1, n_head=2, max_seq=16))
    jacquant.transform(model, bits=2, group=32, method=method)
    attach(model, RefreshConfig(estimator="dither", width=0.5, lam=0.0, refresh_every=2))  # B stays exactly 1
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        idx = torch.randint(0, 64, (4, 16), generator=g)
        lm_loss(model(idx), idx).backward()
        opt.step()
        opt.zero_grad()
        step(model)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_b_fixed_at_one_reproduces_ste_training_bit_for_bit():
    ste, jq = _train_gpt("ste"), _train_gpt("jacquant")
    assert ste.keys() == jq.keys()
    for k in ste:
        assert torch.equal(ste[k], jq[k]), k
    assert all(torch.equal(v, torch.ones_like(v)) for k, v in jq.items() if k.endswith(".jac"))


def test_hf_callback_steps_the_model():
    pytest.importorskip("transformers")
    model = _mlp()
    cb = rf.hf_callback(RefreshConfig(refresh_every=2))
    cb.on_train_begin(None, None, None, model=model)
    for _ in range(3):
        cb.on_step_end(None, None, None, model=model)
    assert int(model.jacquant_step) == 3 and model.jacquant_refresh_config.refresh_every == 2


def test_convert_drops_the_refresh_state_so_the_integer_model_loads_into_a_fresh_skeleton(tmp_path):
    import copy

    torch.manual_seed(0)
    fp = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    model = jacquant.transform(copy.deepcopy(fp), bits=2, group=32)
    jacquant.step(model)  # attaches the refresh state (buffers on the root) and refreshes B
    assert "jacquant_step" in dict(model.named_buffers())
    jacquant.convert(model)
    assert not any(n.startswith("jacquant_") for n, _ in model.named_buffers())
    assert not hasattr(model, "jacquant_refresh_config")
    jacquant.save_converted(model, str(tmp_path / "m.safetensors"))
    loaded = jacquant.load_converted(copy.deepcopy(fp), str(tmp_path / "m.safetensors"))
    x = torch.randn(5, 64)
    assert torch.equal(loaded(x), model(x))
