"""A user's mistake on the `jacquant` command line ends with one line on stderr, `jacquant: error: ...`, naming the
file or layer and the fix, and exit status 2; `jacquant --debug ...` raises the exception with its traceback."""
import os
import subprocess
import sys

import pytest
import torch

from jacquant.app.cli import main

TEXT = " ".join(f"The value {i} is stored in slot {i % 7} of the table." for i in range(200))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    """A tiny Llama directory with no tokenizer (text is read byte by byte)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128)
    path = tmp_path_factory.mktemp("models") / "tiny"
    LlamaForCausalLM(cfg).save_pretrained(path)
    return str(path)


def error_line(capsys) -> str:
    """The one `jacquant: error:` line on stderr (other stderr lines, such as a library's progress bar, may come
    before it); fails if there is no such line, several, or a traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("jacquant: error:")]
    assert len(lines) == 1, err
    assert err.rstrip().splitlines()[-1] == lines[0], err
    return lines[0]


def only_line(capsys) -> str:
    """The whole of stderr, which must be one `jacquant: error:` line (errors caught before a model is loaded)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1 and err.startswith("jacquant: error: "), err
    return err.strip()


def text_file(folder, name: str = "a.txt", text: str = TEXT) -> str:
    path = folder / name
    path.write_text(text)
    return str(path)


# Each case: (name, argv from (tmp_path, model), the exception --debug raises, what the line must name).
CASES = [
    ("missing text file", lambda t, m: ["train", str(t / "x.gguf"), "--text", str(t / "nope.txt"), "--out", str(t / "o")],
     FileNotFoundError, ["nope.txt", "does not exist", "--text"]),
    ("empty text file", lambda t, m: ["train", m, "--text", text_file(t, "empty.txt", ""), "--out", str(t / "o")],
     ValueError, ["empty.txt", "is empty"]),
    ("blank text file", lambda t, m: ["eval", m, "--text", text_file(t, "blank.txt", " \n\n\t\n")],
     ValueError, ["blank.txt", "is empty"]),
    ("text file is a directory", lambda t, m: ["train", m, "--text", str(t), "--out", str(t / "o")],
     IsADirectoryError, ["is a directory", "--text"]),
    ("missing .gguf model", lambda t, m: ["train", str(t / "x.gguf"), "--text", text_file(t), "--out", str(t / "o")],
     FileNotFoundError, ["x.gguf", "does not exist"]),
    ("eval --out without a trained model",
     lambda t, m: ["eval", m, "--text", text_file(t), "--out", str(t)],
     FileNotFoundError, ["holds no trained model", "model.safetensors", "jacquant train"]),
    ("eval --out that does not exist", lambda t, m: ["eval", m, "--text", text_file(t), "--out", str(t / "nodir")],
     FileNotFoundError, ["nodir", "does not exist", "jacquant train"]),
    ("export --out without a trained model", lambda t, m: ["export", m, "--out", str(t), "--onnx", str(t / "f.onnx")],
     FileNotFoundError, ["holds no trained model", "model.safetensors", "jacquant train"]),
    ("generate a missing ONNX file", lambda t, m: ["generate", str(t / "nothere.onnx"), "--prompt", "hi"],
     FileNotFoundError, ["nothere.onnx", "does not exist", "jacquant export MODEL --out DIR --onnx FILE --kv-cache"]),
    ("generate a missing GGUF file", lambda t, m: ["generate", str(t / "missing.gguf"), "--prompt", "hi"],
     FileNotFoundError, ["missing.gguf", "does not exist", "--gguf FILE"]),
    ("--threads 0", lambda t, m: ["eval", m, "--text", text_file(t), "--threads", "0"],
     ValueError, ["--threads 0 must be at least 1"]),
    ("--hf-scales without --hf", lambda t, m: ["export", m, "--out", str(t), "--onnx", str(t / "f.onnx"),
                                               "--hf-scales", "fp16"],
     ValueError, ["--hf-scales", "with --hf"]),
]


@pytest.mark.parametrize("argv, raised, names", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_mistake_caught_before_loading_a_model_is_one_line(tmp_path, capsys, argv, raised, names):
    args = argv(tmp_path, "no-model-needed")
    assert main(args) == 2
    line = only_line(capsys)
    for name in names:
        assert name in line, line
    with pytest.raises(raised):
        main(["--debug", *args])


def test_unfinished_training_says_to_resume(tmp_path, capsys):
    out = tmp_path / "trained"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"")
    assert main(["eval", "m", "--text", text_file(tmp_path), "--out", str(out)]) == 2
    line = only_line(capsys)
    assert "unfinished" in line and "checkpoint.pt" in line and "resume" in line


def test_export_into_a_missing_folder(tmp_path, capsys):
    out = tmp_path / "trained"
    out.mkdir()
    for name in ("model.safetensors", "jacquant.json"):
        (out / name).write_text("{}")
    target = tmp_path / "nofolder" / "m.onnx"
    assert main(["export", "m", "--out", str(out), "--onnx", str(target)]) == 2
    assert f"the folder {tmp_path / 'nofolder'} does not exist" in only_line(capsys)


def test_generate_a_file_that_is_not_onnx(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_text("not a model")
    assert main(["generate", str(bad), "--prompt", "hi"]) == 2
    line = error_line(capsys)
    assert "bad.onnx is not an ONNX model" in line and "--kv-cache" in line
    with pytest.raises(ValueError, match="is not an ONNX model"):
        main(["--debug", "generate", str(bad), "--prompt", "hi"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_device_without_a_gpu(tmp_path, capsys):
    assert main(["eval", "m", "--text", text_file(tmp_path), "--device", "cuda"]) == 2
    assert "--device cuda" in only_line(capsys)


def test_group_that_does_not_divide_a_layer_names_the_layer(tmp_path, capsys, tiny_model):
    """Raised by the library once the model is loaded: the CLI prints the library's message as it is."""
    args = ["train", tiny_model, "--text", text_file(tmp_path), "--out", str(tmp_path / "o"), "--group", "100",
            "--seq", "16", "--steps", "1"]
    assert main(args) == 2
    line = error_line(capsys)
    assert line.startswith("jacquant: error: layer `model.layers.0.self_attn.q_proj`: in_features 64 is not "
                           "divisible by group 100"), line
    with pytest.raises(ValueError, match="not divisible by group 100"):
        main(["--debug", *args])


def test_model_that_is_not_found_locally(tmp_path, capsys):
    """The library's message may run over several lines; the CLI prints the first."""
    assert main(["eval", str(tmp_path / "no-such-model"), "--text", text_file(tmp_path)]) == 2
    line = error_line(capsys)
    assert "no-such-model" in line and "local" in line


def test_os_error_of_python_names_the_file(tmp_path, capsys, monkeypatch):
    """An OSError raised by Python itself (open, os.makedirs) prints as `FILE: reason`."""
    import jacquant.app.cli as cli

    def fail(args):
        open(tmp_path / "gone" / "jacquant.json")

    monkeypatch.setattr(cli, "run_command", fail)
    assert main(["eval", "m", "--text", text_file(tmp_path)]) == 2
    assert only_line(capsys) == f"jacquant: error: {tmp_path / 'gone' / 'jacquant.json'}: No such file or directory"


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    """Exceptions that are not a user's mistake (here a RuntimeError) are not turned into one line."""
    import jacquant.app.cli as cli

    def bug(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "run_command", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["eval", "m", "--text", text_file(tmp_path)])


def test_console_script_prints_one_line_and_exits_2(tmp_path):
    """The installed `jacquant` script, as a new user runs it."""
    script = os.path.join(os.path.dirname(sys.executable), "jacquant")
    if not os.path.exists(script):
        pytest.skip("the jacquant console script is not installed next to this Python")
    r = subprocess.run([script, "train", "x.gguf", "--text", "nope.txt", "--out", "o"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.splitlines() == ["jacquant: error: text file nope.txt does not exist: pass existing text files "
                                     "to --text"]
