"""The ``jacquant`` command line: thin argument parsing over library calls."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="jacquant",
        description="Ultra-low-bit quantization-aware training with learned Jacobian surrogates.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="the bundled demo: pretrain a tiny GPT on real text, then compare "
                                     "RTN, STE, StableQAT and JacQuant QAT at 2 bits")
    run.add_argument("--bits", type=int, default=2, help="weight bits (2, 3, 4, 8); default 2")
    run.add_argument("--group", type=int, default=32, help="quantization group size along in_features; default 32")
    run.add_argument("--pretrain-steps", type=int, default=1500, help="full-precision pretraining steps")
    run.add_argument("--steps", type=int, default=400, help="QAT steps per method")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--quick", action="store_true", help="a tiny run (seconds), for smoke tests")
    args = parser.parse_args(argv)
    if args.command == "run":
        from .demo import format_table, run_demo

        pre, steps = (40, 20) if args.quick else (args.pretrain_steps, args.steps)
        results = run_demo(bits=args.bits, group=args.group, pretrain_steps=pre, qat_steps=steps, seed=args.seed)
        print(format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
