#!/usr/bin/env bash
# Everything ouro checks and measures on a GPU machine, in one go (results under $OUT):
#   1. the CUDA test binaries (kernels vs the CPU implementation, outputs poisoned with NaN)
#   2. per-kernel SSD profile, then `ouro bench ssd-gpu` beside the Triton peer (scan and decode step)
#   3. end to end: `ouro train --device cuda` on Mamba-2 (Shakespeare, from data/) and Mamba (selective
#      copying), then `ouro generate --device cuda` from the Mamba-2 checkpoint.
#
#   OUT=runs/gpu OURO=bin/ouro TESTS="bin/ssd-test bin/ops-test" PEER_SRC=peers/mamba bash scripts/bench/gpu_checks.sh
#
# Build: scripts/build-cuda.sh (the binary) and, for the tests,
#   source scripts/cuda-env.sh && CARGO_TARGET_DIR=target-cuda cargo test --release --no-run \
#     -p ouro-kernels --features cuda --test cuda_ssd --test cuda_ops
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
OURO="${OURO:-target-cuda/release/ouro}"
TESTS="${TESTS:-}"
PEER_SRC="${PEER_SRC:-peers/mamba}"
OUT="${OUT:-runs/gpu}"
STEPS="${STEPS:-300}"
mkdir -p "$OUT"
run() { bash scripts/gpu-run.sh "$@"; }
for t in $TESTS; do
  echo "== $t"
  OURO_CUDA_POISON=1 run "$t" --test-threads 1 --nocapture 2>&1 | tee "$OUT/$(basename "$t").log" | grep -E "^test |result|panicked"
done
echo "== profile"
OURO_CUDA_PROFILE=1 run "$OURO" bench ssd-gpu --shapes 8x2048x32x64x128 --iters 3 --decode-batches 1 2>&1 | grep -E "^  " | tee "$OUT/profile.log"
echo "== bench"
peer=()
[[ -d "$PEER_SRC/mamba_ssm" ]] && peer=(--peer python3 --peer-src "$PEER_SRC")
run "$OURO" bench ssd-gpu --check "${peer[@]}" 2>&1 | tee "$OUT/bench.log" | grep -v LD_LIBRARY
echo "== train mamba2 (shakespeare) on cuda"
( time run "$OURO" train --config configs/shakespeare.toml --steps "$STEPS" --device cuda --quiet --out "$OUT/shakespeare" ) 2>&1 | tail -12 | tee "$OUT/train-mamba2.log"
echo "== generate on cuda"
run "$OURO" generate --model "$OUT/shakespeare/checkpoint" --device cuda --prompt "ROMEO:" --max-new-tokens 200 --seed 1 2>&1 | tail -8 | tee "$OUT/generate.log"
echo "== train mamba (selective copying) on cuda"
( time run "$OURO" train --task selective-copying --steps "$STEPS" --device cuda --quiet --out "$OUT/sc-mamba" ) 2>&1 | grep -v "^  *[0-9]*: \|^  *at " | tail -20 | tee "$OUT/train-mamba.log"
rm -rf "$OUT"/shakespeare/checkpoint "$OUT"/sc-mamba/checkpoint 2>/dev/null
