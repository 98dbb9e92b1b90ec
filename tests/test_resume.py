"""Resumable QAT: a run killed after a checkpoint and started again equals an uninterrupted run bit for bit."""
import os

import pytest
import torch

import jacquant
from jacquant.app import data
from jacquant.app.recipes import recipe
from jacquant.app.train import quantize_copy, train
from jacquant.testing.tiny_gpt import GPTConfig, TinyGPT, lm_loss


class Killed(Exception):
    pass


def _setup(method):
    torch.manual_seed(0)
    fp = TinyGPT(GPTConfig(vocab_size=64, dim=64, n_layer=2, n_head=2, max_seq=32))
    model = quantize_copy(fp, recipe(method), jacquant.QuantConfig(bits=2, group=32))
    ids = torch.randint(0, 64, (4000,))
    return model, (lambda: data.windows(ids, 4, 16, 12, seed=3))


def _loss(model, batch):
    return lm_loss(model(batch), batch)


# jq-shape (a research rule): the weights at the last refresh (refreshes at steps 0 and 10), from which the shape
# is refitted
@pytest.mark.parametrize("method", ["ste", "jacquant", "jq-shape"])
def test_killed_and_resumed_run_equals_uninterrupted_run_bit_for_bit(tmp_path, method):
    ref, batches = _setup(method)
    calib = next(iter(batches()))
    ref_curve = train(ref, recipe(method), batches(), _loss, 12, 3e-3, seed=1, warmup=2, calib_batch=calib)

    model, batches = _setup(method)
    ckpt = str(tmp_path / "ckpt.pt")
    calls = {"n": 0}

    def dying_loss(m, b):
        calls["n"] += b is not calib  # training batches only (a refresh also measures the calibration batch)
        if calls["n"] == 8:  # killed during step 8, after the checkpoint of step 6
            raise Killed
        return _loss(m, b)

    with pytest.raises(Killed):
        train(model, recipe(method), batches(), dying_loss, 12, 3e-3, seed=1, warmup=2, calib_batch=calib,
              checkpoint=ckpt, checkpoint_every=3)
    assert torch.load(ckpt, weights_only=True)["extra"]["step"] == 6
    torch.manual_seed(123)  # a fresh process: the global RNG is whatever it is; the checkpoint restores it
    model, batches = _setup(method)
    curve = train(model, recipe(method), batches(), _loss, 12, 3e-3, seed=1, warmup=2, calib_batch=calib,
                  checkpoint=ckpt, checkpoint_every=3)
    assert curve == ref_curve
    for (name, a), b in zip(ref.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    assert not os.path.exists(ckpt + ".tmp")
