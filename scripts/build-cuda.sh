#!/usr/bin/env bash
# Build the CUDA-enabled `ouro` binary on a machine without a CUDA toolkit/GPU.
#
#   bash scripts/build-cuda.sh            # -> target-cuda/release/ouro (stripped)
#
# Uses NVIDIA's PyPI wheels (see scripts/cuda-env.sh) for nvcc and the link-time
# libraries. The first build compiles candle-kernels' .cu files with nvcc; on
# 2 cores that is the bulk of the time (the GGUF/MoE kernels alone take > 1h).
# Later builds reuse target-cuda/ and only recompile what changed.
#
# Env overrides: CARGO_BUILD_JOBS (default: nproc), NICE (default: 10).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=cuda-env.sh
source scripts/cuda-env.sh

export CARGO_TARGET_DIR="$PWD/target-cuda"
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-$(nproc)}"

start=$(date +%s)
nice -n "${NICE:-10}" cargo build --release -p ouro-cli --features cuda
echo "build-cuda: cargo build took $(( $(date +%s) - start ))s"

bin="$CARGO_TARGET_DIR/release/ouro"
strip --strip-all "$bin"
size=$(stat -c %s "$bin")
echo "build-cuda: $bin  $size bytes ($(( size / 1024 / 1024 )) MiB)"
if (( size >= 64 * 1024 * 1024 )); then
  echo "build-cuda: WARNING: binary is >= 64 MiB, too large to carry to the GPU machine" >&2
fi
echo "build-cuda: NEEDED:"
readelf -d "$bin" | grep NEEDED
# Here libcuda.so.1 is missing (no driver) and the CUDA libs are not on the
# loader path; on the GPU machine scripts/gpu-run.sh provides them.
echo "build-cuda: not found on this machine (expected: only libcuda, libcublas, libcurand; plus libcudart/libnvrtc if referenced):"
ldd "$bin" | grep 'not found' || echo "  (none)"
