#!/usr/bin/env bash
# The CUDA SSD kernels on a GPU machine: correctness against the CPU implementation, then the benchmark
# beside mamba_ssm's Triton kernels. Runs a CUDA build of ouro (scripts/build-cuda.sh) and the CUDA test
# binary of ouro-kernels; needs python3 with torch + triton and the mamba_ssm source for the peer.
#
#   OURO=target-cuda/release/ouro TESTS=target-cuda/ssd-test PEER_SRC=peers/mamba bash scripts/bench/ssd_gpu.sh
#
# Build the test binary with
#   source scripts/cuda-env.sh && CARGO_TARGET_DIR=target-cuda cargo test --release --no-run \
#     -p ouro-kernels --features cuda --test cuda_ssd     # then copy target-cuda/release/deps/cuda_ssd-* to $TESTS
# and bring the peer source (never committed) with e.g.
#   git clone https://github.com/state-spaces/mamba peers/mamba-src && cp -r peers/mamba-src/mamba_ssm peers/mamba/
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
OURO="${OURO:-target-cuda/release/ouro}"
TESTS="${TESTS:-}"
PEER_SRC="${PEER_SRC:-peers/mamba}"
OUT="${OUT:-runs/ssd-gpu}"
mkdir -p "$OUT"
if [[ -n "$TESTS" ]]; then
  OURO_CUDA_POISON=1 bash scripts/gpu-run.sh "$TESTS" --test-threads 1 --nocapture 2>&1 | tee "$OUT/test.log" | grep -E "^test |result"
fi
OURO_CUDA_PROFILE=1 bash scripts/gpu-run.sh "$OURO" bench ssd-gpu --shapes 8x2048x32x64x128 --iters 3 2>&1 | grep -E "^  " | tee "$OUT/profile.log"
peer=()
[[ -d "$PEER_SRC/mamba_ssm" ]] && peer=(--peer python3 --peer-src "$PEER_SRC")
bash scripts/gpu-run.sh "$OURO" bench ssd-gpu --check "${peer[@]}" 2>&1 | tee "$OUT/bench.log" | grep -v LD_LIBRARY
