import pytest
import torch

import jacquant
from jacquant.qat.checkpoint import load_checkpoint, save_checkpoint
from jacquant.qat.refresh import RefreshConfig, attach, step
from jacquant.testing.tiny_gpt import GPTConfig, TinyGPT, lm_loss


def _fresh():
    torch.manual_seed(0)
    model = TinyGPT(GPTConfig(vocab_size=64, dim=32, n_layer=1, n_head=2, max_seq=16))
    jacquant.transform(model, bits=2, group=16, method="jacquant")
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _train(model, opt, steps, start):
    for t in range(start, start + steps):
        idx = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(t))
        lm_loss(model(idx), idx).backward()
        opt.step()
        opt.zero_grad()
        step(model)


CFG = RefreshConfig(estimator="probe", width=0.75, refresh_every=3, beta=0.5, seed=3)


def test_ten_save_load_ten_equals_twenty_bit_for_bit(tmp_path):
    model, opt = _fresh()
    attach(model, CFG)
    _train(model, opt, 20, 0)
    straight = model.state_dict()

    model, opt = _fresh()
    attach(model, CFG)
    _train(model, opt, 10, 0)
    save_checkpoint(tmp_path / "ckpt.pt", model, opt, extra={"step": 10})
    del model, opt

    resumed, opt = _fresh()  # no refresh state attached: the checkpoint brings it
    torch.manual_seed(999)  # the global RNG is restored too
    assert load_checkpoint(tmp_path / "ckpt.pt", resumed, opt) == {"step": 10}
    assert int(resumed.jacquant_step) == 10 and resumed.jacquant_refresh_config == CFG
    _train(resumed, opt, 10, 10)
    after = resumed.state_dict()
    assert straight.keys() == after.keys()
    for k in straight:
        assert torch.equal(straight[k], after[k]), k
    jac = [v for k, v in after.items() if k.endswith(".jac")]
    assert jac and not all(torch.equal(j, torch.ones_like(j)) for j in jac)  # B was really refreshed


def test_load_into_a_differently_transformed_model_raises(tmp_path):
    model, opt = _fresh()
    attach(model, CFG)
    save_checkpoint(tmp_path / "c.pt", model)
    other = TinyGPT(GPTConfig(vocab_size=64, dim=32, n_layer=1, n_head=2, max_seq=16))
    with pytest.raises(ValueError, match="no quantized site"):  # an untransformed model
        load_checkpoint(tmp_path / "c.pt", other)
    jacquant.transform(other, bits=2, group=32, method="jacquant")  # another group size
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_checkpoint(tmp_path / "c.pt", other)
    with pytest.raises(ValueError, match="no optimizer state"):
        load_checkpoint(tmp_path / "c.pt", _fresh()[0], opt)
