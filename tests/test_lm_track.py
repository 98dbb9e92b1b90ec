"""The LM track's pieces against hand references: the distillation loss, the recovery fraction, freezing."""
import math

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from jacquant.app import lm_track
from jacquant.app.pipeline import freeze_embedding


def _llama(seed):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)).eval()


def test_kd_loss_is_the_mean_per_token_kl_from_teacher_to_student():
    teacher, student = _llama(0), _llama(1)
    batch = torch.randint(0, 50, (3, 9))
    got = float(lm_track.kd_loss(teacher)(student, batch))
    with torch.no_grad():
        t = teacher(input_ids=batch[:, :-1]).logits.double().numpy().reshape(-1, 50)
        s = student(input_ids=batch[:, :-1]).logits.double().numpy().reshape(-1, 50)
    lt = t - np.log(np.exp(t - t.max(1, keepdims=True)).sum(1, keepdims=True)) - t.max(1, keepdims=True)
    ls = s - np.log(np.exp(s - s.max(1, keepdims=True)).sum(1, keepdims=True)) - s.max(1, keepdims=True)
    want = float((np.exp(lt) * (lt - ls)).sum(1).mean())
    assert math.isclose(got, want, rel_tol=1e-5)
    assert float(lm_track.kd_loss(teacher)(teacher, batch)) < 1e-6  # a model distilled into itself: zero


def test_one_pass_perplexity_and_kl_equal_numpy_on_the_same_windows():
    """perplexity_and_kl against the fp reference's cached log-probabilities: exp of the mean next-token NLL and the
    mean KL(p_ref ‖ p), both computed here in float64 numpy from the two models' logits."""
    ref, model = _llama(0), _llama(1)
    windows = torch.randint(0, 50, (5, 11))
    ppl, kl = lm_track.perplexity_and_kl(model, windows, lm_track.reference_log_probs(ref, windows, batch=2), batch=2)
    with torch.no_grad():
        r = ref(input_ids=windows[:, :-1]).logits.double().numpy()
        m = model(input_ids=windows[:, :-1]).logits.double().numpy()

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lr, lm = log_softmax(r), log_softmax(m)
    nll = -np.take_along_axis(lm, windows[:, 1:, None].numpy(), -1).mean()
    assert math.isclose(ppl, math.exp(nll), rel_tol=1e-5)
    assert math.isclose(kl, float((np.exp(lr) * (lr - lm)).sum(-1).mean()), rel_tol=1e-5)
    assert math.isclose(ppl, lm_track.perplexity(model, windows), rel_tol=1e-5)  # the functions it replaces
    assert math.isclose(kl, lm_track.mean_kl(model, ref, windows), rel_tol=1e-5)


def test_recovery_fraction_in_log_perplexity():
    assert lm_track.recovery(100.0, 10_000.0, 10.0) == (math.log(1e4) - math.log(100)) / (math.log(1e4) - math.log(10))
    assert lm_track.recovery(10.0, 10_000.0, 10.0) == 1.0 and lm_track.recovery(1e4, 1e4, 10.0) == 0.0


def test_freeze_embedding_freezes_the_tied_head_too():
    m = _llama(0)
    freeze_embedding(m)
    assert not m.get_input_embeddings().weight.requires_grad and not m.get_output_embeddings().weight.requires_grad
    assert all(p.requires_grad for n, p in m.named_parameters() if "embed" not in n and "lm_head" not in n)
