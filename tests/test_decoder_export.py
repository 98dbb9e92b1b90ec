"""export_onnx(kv_cache=True) and generate: onnxruntime greedy tokens and logits against PyTorch on a tiny Llama."""
import numpy as np
import pytest
import torch
from conftest import tiny_gpt2, tiny_llama

import jacquant
from jacquant.export import Decoder, export_onnx, generate
from jacquant.export.generation import next_token

ort = pytest.importorskip("onnxruntime")

PROMPTS = ([5, 17, 42, 8, 63, 2, 90], [33, 1])
STEPS = 32
TOL = 1e-4  # max |logits_ort - logits_torch| / max |logits_torch| per step, fp32 activations (accuracy_level 0)


def _w2_model():
    m = tiny_llama().eval()
    jacquant.transform(m, bits=2, group=32, method="ste", init="minmax")
    return jacquant.convert(m)


def _torch_greedy(model, prompt: list[int], steps: int) -> tuple[list[int], list[np.ndarray]]:
    """Greedy decoding by recomputing the whole sequence each step (no cache): the independent reference."""
    ids, logits = list(prompt), []
    with torch.no_grad():
        for _ in range(steps):
            last = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].numpy()
            logits.append(last)
            ids.append(int(last.argmax()))
    return ids[len(prompt):], logits


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def w2_reference():
    """The converted W2 tiny Llama and its PyTorch greedy tokens/logits per prompt (computed once)."""
    torch.manual_seed(0)
    model = _w2_model()
    return model, {tuple(p): _torch_greedy(model, p, STEPS) for p in PROMPTS}


@pytest.mark.parametrize("target,fold", [("ort", False), ("ort", True), ("onnx", False)])
def test_greedy_32_tokens_match_converted_pytorch(tmp_path, target, fold, w2_reference):
    """MatMulNBits + contrib ops (ort; zero points in the kernel or folded into a per-block correction), or
    standard ops only (onnx: DequantizeLinear UINT2 + MatMul, opset 25)."""
    model, reference = w2_reference
    path = str(tmp_path / "w2.onnx")
    proto = export_onnx(model, path=path, kv_cache=True, accuracy_level=0, target=target, fold_zero_points=fold)
    if fold:
        assert all(len(n.input) == 3 for n in proto.graph.node if n.op_type == "MatMulNBits")
    if target == "onnx":
        assert {o.domain for o in proto.opset_import} == {""} and {n.domain for n in proto.graph.node} == {""}
    dec = Decoder(path, threads=1, options={"session.qdq_matmulnbits_accuracy_level": 0})
    for prompt in PROMPTS:
        ref_ids, ref_logits = reference[tuple(prompt)]
        r = generate(dec, prompt, STEPS, stop_at_eos=False, keep_logits=True)
        assert r.token_ids == ref_ids
        errs = [_rel(a, b) for a, b in zip(r.logits, ref_logits)]
        assert len(errs) == STEPS and max(errs) < TOL, max(errs)
        assert r.prompt_tokens == len(prompt) and r.decode_tokens_per_second > 0


@pytest.mark.parametrize("attention", ["gqa", "standard"])
def test_fp_model_batch_left_padding_and_cache_step(attention):
    """fp32 weights, batch 2 with a left-padded row: prefill then one cached step equal HF with the same mask."""
    from jacquant.export.decoder import export_decoder

    model = tiny_llama().eval()
    proto = export_decoder(model, accuracy_level=0, attention=attention)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = torch.randint(0, 96, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    empty = np.zeros((2, 2, 0, 16), np.float32)
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": pos.numpy()}
    feed.update({f"past_key_values.{i}.{n}": empty for i in range(2) for n in ("key", "value")})
    names = [o.name for o in sess.get_outputs()]
    out = dict(zip(names, sess.run(None, feed)))
    nxt = torch.randint(0, 96, (2, 1))
    mask2 = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
    pos2 = pos[:, -1:] + 1
    feed2 = {"input_ids": nxt.numpy(), "attention_mask": mask2.numpy(), "position_ids": pos2.numpy()}
    feed2.update({f"past_key_values.{i}.{n}": out[f"present.{i}.{n}"] for i in range(2) for n in ("key", "value")})
    step = sess.run(["logits"], feed2)[0]
    with torch.no_grad():
        ref = model(input_ids=torch.cat([ids, nxt], 1), attention_mask=mask2, position_ids=torch.cat([pos, pos2], 1),
                    use_cache=False).logits.numpy()
    keep = mask.numpy().astype(bool)
    assert _rel(out["logits"][keep], ref[:, :6][keep]) < 1e-5
    assert _rel(step, ref[:, 6:]) < 1e-5
    assert out["present.0.key"].shape == (2, 2, 6, 16)


def test_head_bits_8_shares_tied_embedding():
    """head_bits=8 quantizes the tied head once; embedding (GatherBlockQuantized) and head read the same
    codes: logits equal an fp model whose tied table is the min-max 8-bit dequantized table (numpy)."""
    model = tiny_llama().eval()
    proto = export_onnx(model, kv_cache=True, accuracy_level=0, head_bits=8, head_group=32)
    ops = {n.op_type for n in proto.graph.node}
    assert "GatherBlockQuantized" in ops and "Gather" not in ops
    w = model.model.embed_tokens.weight.detach().numpy().reshape(96, 2, 32)
    lo, hi = np.minimum(w.min(-1, keepdims=True), 0), np.maximum(w.max(-1, keepdims=True), 0)
    s = (hi - lo) / 255
    z = np.clip(np.round(-lo / s), 0, 255)
    w_hat = (s * (np.clip(np.round(w / s + z), 0, 255) - z)).reshape(96, 64)
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.from_numpy(w_hat))
    ids = torch.randint(0, 96, (1, 9))
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits.numpy()
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {"input_ids": ids.numpy(), "attention_mask": np.ones((1, 9), np.int64), "position_ids": np.arange(9)[None]}
    feed.update({f"past_key_values.{i}.{n}": np.zeros((1, 2, 0, 16), np.float32) for i in range(2)
                 for n in ("key", "value")})
    assert _rel(sess.run(["logits"], feed)[0], ref) < 1e-4


def test_sampling_is_seeded_and_top_k_1_is_greedy(tmp_path):
    path = str(tmp_path / "w2.onnx")
    export_onnx(_w2_model(), path=path, kv_cache=True, accuracy_level=0)
    dec = Decoder(path, threads=1)
    greedy = generate(dec, PROMPTS[0], 8, stop_at_eos=False).token_ids
    assert generate(dec, PROMPTS[0], 8, temperature=0.7, top_k=1, stop_at_eos=False).token_ids == greedy
    a = generate(dec, PROMPTS[0], 8, temperature=1.5, seed=3, stop_at_eos=False).token_ids
    assert a == generate(dec, PROMPTS[0], 8, temperature=1.5, seed=3, stop_at_eos=False).token_ids


def test_next_token_top_p_keeps_the_nucleus():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    rng = np.random.default_rng(0)
    draws = {next_token(logits, rng, 1.0, top_p=0.75) for _ in range(200)}
    assert draws == {0, 1}  # 0.5 < 0.75 <= 0.5 + 0.3: the nucleus is the two most likely
    assert next_token(logits, None) == 0


def test_refuses_unsupported_models():
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        export_onnx(tiny_gpt2(), kv_cache=True)
    with pytest.raises(ValueError, match="target='tflite'"):
        export_onnx(tiny_llama(), kv_cache=True, target="tflite")


def _word_tokenizer():
    """A 96-word whitespace tokenizer (w0 ... w94, [UNK]) for the tiny Llama."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(95)} | {"[UNK]": 95}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]")


def test_cli_generate_streams_the_greedy_text(tmp_path, capsys):
    """The tokenizer travels with the export; `jacquant generate` prints what PyTorch's greedy tokens decode to."""
    from jacquant.app.cli import main

    model, tok = _w2_model(), _word_tokenizer()
    path = str(tmp_path / "w2.onnx")
    export_onnx(model, path=path, kv_cache=True, tokenizer=tok, accuracy_level=0)
    ref_ids, _ = _torch_greedy(model, [5, 17, 42], 8)
    assert main(["generate", path, "--prompt", "w5 w17 w42", "--max-new-tokens", "8", "--threads", "1"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == tok.decode(ref_ids).strip()
    assert "prefill" in out.err and "8 new tokens" in out.err


def test_cli_export_kv_cache_of_a_trained_directory(tmp_path, capsys):
    """`jacquant export MODEL --out DIR --kv-cache` on a `train`-style output, then `jacquant generate`."""
    import json

    from jacquant.app.cli import main

    model_dir, out = tmp_path / "tiny", tmp_path / "trained"
    fp, tok = tiny_llama().eval(), _word_tokenizer()
    fp.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    model = tiny_llama().eval()
    model.load_state_dict(fp.state_dict())
    jacquant.transform(model, bits=2, group=32, method="ste", init="minmax")
    jacquant.convert(model)
    out.mkdir()
    jacquant.save_converted(model, str(out / "model.safetensors"))
    (out / "jacquant.json").write_text(json.dumps({"bits": 2}))
    onnx_file = str(tmp_path / "dec" / "model.onnx")
    assert main(["export", str(model_dir), "--out", str(out), "--onnx", onnx_file, "--kv-cache",
                 "--accuracy-level", "0"]) == 0
    capsys.readouterr()
    ref_ids, _ = _torch_greedy(model, [7, 3, 11], 6)
    assert main(["generate", onnx_file, "--prompt", "w7 w3 w11", "--max-new-tokens", "6", "--threads", "1"]) == 0
    assert capsys.readouterr().out.strip() == tok.decode(ref_ids).strip()
