#!/usr/bin/env bash
# Sampling throughput of an SSM (Mamba-2), a hybrid (M-M*-M-) and a Transformer (Llama) of equal parameter
# count: tokens/s vs batch size and generation length, and cache bytes per sequence (issue #11).
#
#   scripts/bench/throughput.sh                     # release build at target/release/ouro
#   OURO=/tmp/ouro CELL_SECONDS=30 BUDGET_MIB=2048 scripts/bench/throughput.sh
#
# The three models are trained for STEPS steps on the arithmetic corpus (throughput does not depend on the
# weights); every completion runs to exactly its length (no EOS or stop string). Env: OURO, STEPS (20),
# BATCHES (1,4,16,64,256,512), LENS (256,1024,4096), CELL_SECONDS (30), BUDGET_MIB (2048), THREADS (all),
# OUT (runs/bench/throughput: checkpoints, cells.jsonl, table.md), NO_ENGINE (set: Mamba-2 on the generic model
# code instead of the CPU inference engine, as in the first CPU table of docs/performance.md).
set -euo pipefail
OURO=${OURO:-target/release/ouro}
STEPS=${STEPS:-20}; OUT=${OUT:-runs/bench/throughput}
BATCHES=${BATCHES:-1,4,16,64,256,512}; LENS=${LENS:-256,1024,4096}
CELL_SECONDS=${CELL_SECONDS:-30}; BUDGET_MIB=${BUDGET_MIB:-2048}
T=(); [ -n "${THREADS:-}" ] && T=(--threads "$THREADS")
NE=(); [ -n "${NO_ENGINE:-}" ] && NE=(--no-engine)
mkdir -p "$OUT"
train() { # name, config, extra args
  local name=$1 cfg=$2; shift 2
  [ -d "$OUT/$name/checkpoint" ] || "$OURO" "${T[@]}" train --config "$cfg" --steps "$STEPS" --out "$OUT/$name" --quiet "$@" >/dev/null
}
train mamba2 configs/arithmetic.toml
train hybrid configs/arithmetic-hybrid.toml
train llama configs/arithmetic.toml --model llama
for m in mamba2 hybrid llama; do "$OURO" info --model "$OUT/$m/checkpoint" | grep -E 'parameters|state|kv cache'; done
lscpu | grep 'Model name' || true; date -u
"$OURO" "${T[@]}" bench sample --model "$OUT/mamba2/checkpoint" --model "$OUT/hybrid/checkpoint" --model "$OUT/llama/checkpoint" \
    --batches "$BATCHES" --lens "$LENS" --cell-seconds "$CELL_SECONDS" --memory-budget-mib "$BUDGET_MIB" \
    "${NE[@]}" --json "$OUT/cells.jsonl" | tee "$OUT/table.md"
