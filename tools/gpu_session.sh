#!/usr/bin/env bash
# One batch of GPU work for a session that is lent a GPU (see DEVELOPERS' guide: the device tool).
# Run on the GPU machine from the repo root:  bash tools/gpu_session.sh
# It builds slimops in place against the machine's CUDA torch, runs the whole test suite (the GPU tests
# run there), then the benchmarks, and copies logs and bench/results/* to $OUT (default: ./gpu-out).
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
{
  nvidia-smi -L; $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  time $PY -m pip install -q --no-deps --no-build-isolation -e . || exit 1
  $PY -m slimops info
} 2>&1 | tee "$OUT/build.log"
$PY -m pytest tests -q -x -rs 2>&1 | tee "$OUT/tests.log" | tail -30
for dt in float32 bfloat16; do
  $PY bench/bench_prox.py --device cuda --dtype "$dt" 2>&1 | tee -a "$OUT/bench.log"
  # Triton implicit GEMM (auto on CUDA) against cuDNN dense / gather+conv / pre-compacted, and dense x mask
  $PY bench/bench_channel_conv.py --device cuda --dtype "$dt" --rounds 30 2>&1 | tee -a "$OUT/bench.log"
  # Triton fused dense-DFT kernel and the cuFFT kernel against torch.fft (and its torch.compile)
  $PY bench/bench_spectral.py --device cuda --dtype "$dt" --compile 2>&1 | tee -a "$OUT/bench.log"
  # Triton flash-style SEMA kernels against partition + SDPA, FlexAttention (window block mask) and global SDPA
  $PY bench/bench_sema.py --device cuda --dtype "$dt" 2>&1 | tee -a "$OUT/bench.log"
done
cp bench/results/* "$OUT/" 2>/dev/null || true
