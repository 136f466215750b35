#!/usr/bin/env bash
# Test-time compute on the CPU ("Thinking Slow, Fast"): an SSM (Mamba-2) and a Transformer (Llama) of the
# same parameter count, trained on the same tokens of worked multi-step arithmetic, then sampled under
# fixed time budgets over the same held-out prompts: samples completed, pass@1, coverage (pass@n) and
# majority-vote accuracy against wall-clock (issue #11).
#
#   scripts/experiments/test_time_compute.sh                       # target/release/ouro
#   OURO=/tmp/ouro STEPS=1500 BUDGETS=5,10,20,40 scripts/experiments/test_time_compute.sh
#
# Env: OURO, OUT (runs/ttc), DATA (the corpus and prompts, written by `ouro data arithmetic` if missing:
# data/arithmetic-99), MAX_OPERAND (99) and OPS (2-4) of the problems, STEPS of training per model (1500 × 16 × 128 bytes, ≈ 4 minutes each on 2 cores), LLAMA_STEPS (STEPS: the
# Llama's, to train it longer towards the Mamba-2's accuracy), BUDGETS in seconds (5,10,20,40), BATCH rows
# (128), TEMP (0.8), MAX_NEW (64 tokens; a worked solution of 4 steps with 3-digit sums is ~55 bytes), PROMPTS (100 held-out),
# DEVICE (cpu; cuda with a CUDA build: the models are trained first where they are missing, so bring them along).
# Writes OUT/{model}-{budget}.jsonl (ouro sample's output), OUT/table.md and OUT/coverage.svg.
set -euo pipefail
OURO=${OURO:-target/release/ouro}
OUT=${OUT:-runs/ttc}; DATA=${DATA:-data/arithmetic-99}; MAX_OPERAND=${MAX_OPERAND:-99}; OPS=${OPS:-2-4}; STEPS=${STEPS:-1500}; LLAMA_STEPS=${LLAMA_STEPS:-$STEPS}; BUDGETS=${BUDGETS:-5,10,20,40}
BATCH=${BATCH:-128}; TEMP=${TEMP:-0.8}; MAX_NEW=${MAX_NEW:-64}; PROMPTS=${PROMPTS:-100}; DEVICE=${DEVICE:-cpu}
mkdir -p "$OUT"
# The corpus (seed 0) and its held-out prompts, whose questions never occur in the corpus; configs/arithmetic.toml
# with its corpus replaced (MAX_OPERAND=20 OPS=2-4 is the config's own data/arithmetic).
[ -f "$DATA/test.jsonl" ] || "$OURO" data arithmetic --out "$DATA" --max-operand "$MAX_OPERAND" --ops "$OPS"
head -n "$PROMPTS" "$DATA/test.jsonl" > "$OUT/prompts.jsonl"
sed "s#^corpus = .*#corpus = \"$DATA/train\"#" configs/arithmetic.toml > "$OUT/config.toml"

for m in mamba2 llama; do
  if [ ! -d "$OUT/$m/checkpoint" ]; then
    "$OURO" train --config "$OUT/config.toml" --model "$m" --out "$OUT/$m" --steps "$([ $m = llama ] && echo "$LLAMA_STEPS" || echo "$STEPS")" --time-limit 0 --quiet 2>&1 | grep -E 'parameters|^step|stopped' | tail -4
  fi
done
lscpu | grep 'Model name' || true; date -u
# Greedy accuracy (one completion per prompt at temperature 0).
for m in mamba2 llama; do
  "$OURO" sample --model "$OUT/$m/checkpoint" --prompts "$OUT/prompts.jsonl" --num-samples 1 --temperature 0 --device "$DEVICE" \
      --max-new-tokens "$MAX_NEW" --stop $'\n' --batch-size "$BATCH" --out "$OUT/$m-greedy.jsonl" 2>/dev/null \
    | python3 -c "import json,sys; s=json.load(sys.stdin); print('$m greedy accuracy', s['majority_accuracy'])"
done
# Sampling under each time budget (the models one after the other, never concurrently).
for b in ${BUDGETS//,/ }; do
  for m in mamba2 llama; do
    "$OURO" sample --model "$OUT/$m/checkpoint" --prompts "$OUT/prompts.jsonl" --time-budget "$b" --temperature "$TEMP" --device "$DEVICE" \
        --seed 1 --max-new-tokens "$MAX_NEW" --stop $'\n' --batch-size "$BATCH" --out "$OUT/$m-$b.jsonl" \
        > "$OUT/$m-$b.summary.json" 2>/dev/null
  done
done
python3 scripts/experiments/ttc_table.py "$OUT" mamba2,llama "$BUDGETS" --svg "$OUT/coverage.svg" | tee "$OUT/table.md"
