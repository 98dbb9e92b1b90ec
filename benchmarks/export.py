"""onnxruntime latency and file size: 2-bit export (ort and onnx layouts) vs the fp32 ONNX export.

Model: a stack of ``--layers`` square ``--dim`` x ``--dim`` linears (no bias). For M = 1 (decode) and
M = 128 (prefill) rows, prints median latency over ``--reps`` runs and ratios against fp32, one run.

    python benchmarks/export.py --dim 4096 --layers 3 --bits 2 --group 64
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn

import jacquant
from jacquant.export import export_onnx


def file_size(path: str) -> int:
    """Bytes of an ONNX file plus any external-data files next to it (torch writes large fp32 weights there)."""
    model = onnx.load(path, load_external_data=False)
    external = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    return os.path.getsize(path) + sum(os.path.getsize(os.path.join(os.path.dirname(path), f)) for f in external)


def latency(path: str, m: int, dim: int, reps: int, threads: int) -> float:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((m, dim), dtype=np.float32)
    name = sess.get_inputs()[0].name
    for _ in range(2):
        sess.run(None, {name: x})
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        sess.run(None, {name: x})
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(a.dim, a.dim, bias=False) for _ in range(a.layers)]).eval()
    example = torch.randn(2, a.dim)
    tmp = tempfile.mkdtemp()
    paths = {"fp32": os.path.join(tmp, "fp32.onnx")}
    torch.onnx.export(model, (example,), paths["fp32"], dynamo=True, opset_version=21, verbose=False,
                      dynamic_shapes=({0: torch.export.Dim.AUTO},))
    jacquant.transform(model, bits=a.bits, group=a.group, method="ste", init="minmax")
    variants = [("fp32", None, None), (f"W{a.bits} ort acc4", "ort", 4), (f"W{a.bits} ort acc0", "ort", 0),
                (f"W{a.bits} onnx (DQ+MatMul)", "onnx", 0)]
    for label, target, level in variants[1:]:
        paths[label] = os.path.join(tmp, f"{target}{level}.onnx")
        export_onnx(model, (example,), paths[label], target=target, accuracy_level=level)
    rows = []
    base = {}
    for label, _, _ in variants:
        size = file_size(paths[label])
        lat = {m: latency(paths[label], m, a.dim, a.reps, a.threads) for m in (1, 128)}
        if label == "fp32":
            base = {"size": size, **lat}
        rows.append((label, size / 2**20, base["size"] / size, lat[1], base[1] / lat[1], lat[128], base[128] / lat[128]))
    print(f"{a.layers} x Linear({a.dim}, {a.dim}), W{a.bits} g{a.group}, onnxruntime {ort.__version__} CPU, "
          f"{a.threads} threads, median of {a.reps}")
    head = ("model", "size MiB", "fp32/size", "M=1 ms", "speedup", "M=128 ms", "speedup")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print(f"| {r[0]} | {r[1]:.2f} | {r[2]:.1f}x | {r[3]:.3f} | {r[4]:.2f}x | {r[5]:.2f} | {r[6]:.2f}x |")


if __name__ == "__main__":
    main()
