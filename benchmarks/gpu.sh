#!/usr/bin/env bash
# jacquant on one CUDA GPU, in under 8 minutes: the CUDA tests, the training-step overhead on SmolLM2-135M
# in bf16 autocast, and the packed 2/4-bit matmul against fp16 cuBLAS with GB/s against the card's peak.
#
#   bash benchmarks/gpu.sh [outdir]          (default outdir: gpu-results/; each part's output is also saved there)
#
# Budget (estimates, not measured: no GPU was lent when this was written): tests ~1.5 min (Triton JIT of each
# kernel variant), overhead ~4 min (three SmolLM2 models, eager + regional compile), kernels ~1.5 min.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu-results}"
mkdir -p "$out"
unset TRITON_INTERPRET  # the GPU runs compiled Triton, not the interpreter
export TORCHINDUCTOR_FORCE_DISABLE_CACHES=1
status=0

python - <<'PY' || exit 1
import sys, torch
if not torch.cuda.is_available():
    sys.exit("benchmarks/gpu.sh needs a CUDA GPU; torch.cuda.is_available() is False")
import triton  # noqa: F401  (the kernels need it)
print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
PY

echo "== 1. CUDA tests: Triton kernels vs reference, compile parity (whole + regional), autocast"
timeout 240 python -m pytest -q tests/test_cuda.py 2>&1 | tee "$out/tests.txt" | tail -n 15 || status=1

echo "== 2. training-step overhead, SmolLM2-135M, batch 4x64, W2 g64, bf16 autocast, eager + regional compile"
timeout 300 python benchmarks/overhead.py --device cuda --autocast bf16 --rounds 5 --steps 3 --compile regional \
  2>&1 | grep -v '^USDT' | tee "$out/overhead.txt" | tail -n 12 || status=1

echo "== 3. packed W2/W4 matmul vs fp16 cuBLAS (GB/s vs peak), fake-quant fwd+bwd kernels"
for bits in 2 4; do
  timeout 120 python benchmarks/kernel_speed.py --bits "$bits" --group 64 2>&1 | tee "$out/kernel_speed_w$bits.txt" || status=1
done
exit $status
