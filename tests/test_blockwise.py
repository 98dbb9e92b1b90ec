"""The block-wise phase on a tiny Llama: the loss it trains is the MSE to the fp model's own hidden states
(HF's output_hidden_states, an independent path), training lowers the whole model's error to fp, the fp-input
variant feeds block i the fp activations, and a run stopped after a block resumes to the same result bit for bit."""
import copy

import pytest
import torch
import torch.nn.functional as F

import jacquant
from jacquant.app import blockwise
from jacquant.app.blockwise import BlockwiseConfig, train_blocks
from jacquant.app.recipes import RECIPES

from conftest import tiny_llama


def _setup(seed=0):
    torch.manual_seed(seed)
    fp = tiny_llama().eval()
    q = jacquant.transform(copy.deepcopy(fp), bits=2, group=32, method="ste")
    x = torch.randint(0, 96, (8, 16), generator=torch.Generator().manual_seed(1))
    return fp, q, x


def _logit_error(model, fp, x):
    with torch.no_grad():
        return float((model(input_ids=x).logits - fp(input_ids=x).logits).pow(2).mean())


@pytest.mark.parametrize("inputs", ["quantized", "fp"])
def test_block_loss_is_the_mse_to_fp_hidden_states_and_training_lowers_the_model_error(inputs):
    fp, q, x = _setup()
    start = copy.deepcopy(q)
    cfg = BlockwiseConfig(steps=12, lr=3e-3, batch=4, inputs=inputs)
    idx0, idx1 = (next(blockwise._index_batches(len(x), cfg.batch, cfg.steps, i)) for i in (0, 1))  # seed·1000 + block
    with torch.no_grad():
        hs_fp = fp(input_ids=x, output_hidden_states=True).hidden_states
    curves = train_blocks(q, fp, RECIPES["ste"], x, cfg, seed=0, progress=False)["curves"]
    assert len(curves) == 2 and all(len(c) == cfg.steps for c in curves)
    # block 0's first loss: the embeddings through the start's block 0 against fp's hidden state after block 0;
    # block 1's: its input is block 0's output (the trained quantized block, or fp's), its target fp's block 1 on fp's
    with torch.no_grad():
        pos = torch.arange(x.shape[1]).unsqueeze(0)
        rope = fp.model.rotary_emb(hs_fp[0], position_ids=pos)
        kw = dict(position_embeddings=rope, position_ids=pos, attention_mask=None)
        want0 = F.mse_loss(copy.deepcopy(start.model.layers[0])(hs_fp[0][idx0], **kw), hs_fp[1][idx0])
        inp = q.model.layers[0](hs_fp[0][idx1], **kw) if inputs == "quantized" else hs_fp[1][idx1]
        target = fp.model.layers[1](hs_fp[1][idx1], **kw)
        want1 = F.mse_loss(copy.deepcopy(start.model.layers[1])(inp, **kw), target)
    assert curves[0][0] == pytest.approx(float(want0), rel=1e-4)
    assert curves[1][0] == pytest.approx(float(want1), rel=1e-4)
    assert _logit_error(q, fp, x) < 0.8 * _logit_error(start, fp, x)


def test_a_run_stopped_after_a_block_resumes_bit_for_bit(tmp_path, monkeypatch):
    fp, q, x = _setup()
    whole = copy.deepcopy(q)
    cfg = BlockwiseConfig(steps=6, lr=3e-3, batch=4)
    train_blocks(whole, fp, RECIPES["jacquant"], x, cfg, seed=0, progress=False)
    calls = {"n": 0}
    real = blockwise.train

    def stop_at_block_1(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(blockwise, "train", stop_at_block_1)
    with pytest.raises(KeyboardInterrupt):
        train_blocks(q, fp, RECIPES["jacquant"], x, cfg, seed=0, checkpoint_dir=str(tmp_path), progress=False)
    monkeypatch.setattr(blockwise, "train", real)
    resumed = jacquant.transform(copy.deepcopy(fp), bits=2, group=32, method="jacquant")  # a fresh process's model
    train_blocks(resumed, fp, RECIPES["jacquant"], x, cfg, seed=0, checkpoint_dir=str(tmp_path), progress=False)
    for (k, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def test_bad_settings_are_clear_errors():
    fp, q, x = _setup()
    with pytest.raises(ValueError, match="inputs='teacher' is not one of"):
        BlockwiseConfig(inputs="teacher")
    with pytest.raises(ValueError, match="more than the 8 calibration windows"):
        train_blocks(q, fp, RECIPES["ste"], x, BlockwiseConfig(steps=1, batch=9), progress=False)
