"""Triton kernels vs torch on a CUDA GPU: time, achieved bandwidth and its fraction of peak.

1. Fake quantization, forward + backward (jacquant rule, LSQ scale gradient) on a weight W [N, K]:
   the fused Triton kernels vs the eager torch reference vs the reference under torch.compile.
2. Packed W{2,4,8}A16 matmul y = x · dequant(W)^T for M in {1, 16, 128, 2048} vs fp16 torch.matmul
   against the dense fp16 weight.

Shapes (N, K): 4096x4096, 11008x4096 (in 4096 -> out 11008 and back), 8192x8192. Bytes counted are
the minimum each kernel must move (reads + writes once); GB/s = bytes / median time (do_bench).
Peak is the device's nominal HBM bandwidth where known (--peak overrides), else a measured copy.

    python benchmarks/kernel_speed.py [--bits 2] [--group 64] [--only fq|matmul] [--peak 3350]
"""
from __future__ import annotations

import argparse
import sys

import torch

SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008), (8192, 8192))  # (N, K)
MS = (1, 16, 128, 2048)
NOMINAL_GBPS = {"H100 SXM": 3350, "H100 PCIe": 2000, "H100 NVL": 3900, "H100": 3350, "H200": 4800,
                "A100-SXM4-80GB": 2039, "A100-PCIE-80GB": 1935, "A100": 1555, "L40S": 864, "4090": 1008}


def peak_gbps(override: float | None) -> tuple[float, str]:
    """Nominal bandwidth by device name, else a measured 1 GiB device copy (reads + writes)."""
    if override:
        return override, "given"
    name = torch.cuda.get_device_name()
    for key, gbps in NOMINAL_GBPS.items():
        if key in name:
            return float(gbps), f"nominal for {name}"
    from triton.testing import do_bench
    a = torch.empty(1 << 28, dtype=torch.float32, device="cuda")
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a))
    return 2 * a.numel() * 4 / ms / 1e6, f"measured copy on {name}"


def bench_fake_quant(bits: int, group: int, peak: float) -> None:
    from triton.testing import do_bench

    from jacquant.kernels import fake_quant as fq
    from jacquant.primitives.grid import init_minmax

    print(f"\n## fake quant fwd + bwd, W fp32, b={bits}, G={group}, rule jacquant  (peak {peak:.0f} GB/s)")
    print(f"{'N x K':>12} {'triton ms':>10} {'GB/s':>7} {'%peak':>6} {'eager ms':>9} {'compile ms':>11} "
          f"{'vs eager':>9} {'vs compile':>11}")
    ref_fwd = torch.compile(fq.fake_quant_forward_reference, fullgraph=True)
    ref_bwd = torch.compile(fq.fake_quant_backward_reference, fullgraph=True)
    for n, k in SHAPES:
        w = torch.randn(n, k, device="cuda")
        s, z = init_minmax(w, bits, group)
        jac = torch.rand_like(s) + 0.5
        gq = torch.randn_like(w)

        def run(fwd, bwd):
            return lambda: (fwd(w, s, z, bits, group), bwd(gq, w, s, z, jac, bits, group, "jacquant", 0.0))

        t_tri = do_bench(run(lambda *a: fq.fake_quant_forward_triton(*a)[0], fq.fake_quant_backward_triton))
        t_eager = do_bench(run(fq.fake_quant_forward_reference, fq.fake_quant_backward_reference))
        t_comp = do_bench(run(ref_fwd, ref_bwd))
        groups = n * k // group
        # fwd: read W, write Q; bwd: read grad_q and W, write grad_W; per group s, z (and B, grad_s)
        nbytes = 5 * n * k * 4 + groups * (4 + 1) * 2 + groups * (4 + 4)
        gbps = nbytes / t_tri / 1e6
        print(f"{n:>5} x {k:<5} {t_tri:>10.3f} {gbps:>7.0f} {100 * gbps / peak:>5.0f}% {t_eager:>9.3f} "
              f"{t_comp:>11.3f} {t_eager / t_tri:>8.2f}x {t_comp / t_tri:>10.2f}x")


def bench_packed_matmul(bits: int, group: int, peak: float) -> None:
    from triton.testing import do_bench

    from jacquant.kernels.packed_matmul import packed_linear_triton
    from jacquant.primitives.grid import init_minmax, quantize
    from jacquant.primitives.packing import pack_codes

    print(f"\n## packed W{bits}A16 matmul, G={group}, x fp16  (peak {peak:.0f} GB/s)")
    print(f"{'N x K':>12} {'M':>5} {'triton ms':>10} {'GB/s':>7} {'%peak':>6} {'fp16 ms':>8} {'fp16 GB/s':>10} "
          f"{'speedup':>8} {'max err':>8}")
    for n, k in SHAPES:
        w = torch.randn(n, k, device="cuda")
        s, z = init_minmax(w, bits, group)
        codes = quantize(w, s, z, bits, group)
        packed = pack_codes(codes, bits, group)
        dense = (s.repeat_interleave(group, 1) * (codes.float() - z.float().repeat_interleave(group, 1))).half()
        for m in MS:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            t_tri = do_bench(lambda: packed_linear_triton(x, packed, s, z, None, bits, group))
            t_ref = do_bench(lambda: x @ dense.t())
            err = (packed_linear_triton(x, packed, s, z, None, bits, group).float() - (x @ dense.t()).float()).abs().max()
            act = (m * k + m * n) * 2
            nbytes = n * k * bits // 8 + (n * k // group) * (4 + 1) + act
            gbps = nbytes / t_tri / 1e6
            ref_gbps = (n * k * 2 + act) / t_ref / 1e6
            print(f"{n:>5} x {k:<5} {m:>5} {t_tri:>10.4f} {gbps:>7.0f} {100 * gbps / peak:>5.0f}% {t_ref:>8.4f} "
                  f"{ref_gbps:>10.0f} {t_ref / t_tri:>7.2f}x {err.item():>8.3g}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bits", type=int, default=2, choices=(2, 4, 8))
    p.add_argument("--group", type=int, default=64)
    p.add_argument("--only", choices=("fq", "matmul"))
    p.add_argument("--peak", type=float, help="peak memory bandwidth in GB/s (default: by device name)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/kernel_speed.py needs a CUDA GPU and none is visible (torch.cuda.is_available() is False). "
                 "The kernels' correctness runs on CPU in tests/test_kernels.py under TRITON_INTERPRET=1.")
    from jacquant.kernels.triton_util import HAS_TRITON, interpreting
    if not HAS_TRITON or interpreting():
        sys.exit("benchmarks/kernel_speed.py needs triton installed and TRITON_INTERPRET unset")
    peak, source = peak_gbps(args.peak)
    print(f"device: {torch.cuda.get_device_name()}, peak {peak:.0f} GB/s ({source}), torch {torch.__version__}")
    if args.only in (None, "fq"):
        bench_fake_quant(args.bits, args.group, peak)
    if args.only in (None, "matmul"):
        bench_packed_matmul(args.bits, args.group, peak)


if __name__ == "__main__":
    main()
