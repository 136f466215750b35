#!/usr/bin/env bash
# Variants of one property-prediction task fitted at once, spread over every visible GPU (round robin), each
# fitted and scored on the test split by `lyra.sh run`; then one line per variant.
#
#   scripts/experiments/lyra-sweep.sh TASK EPOCHS 'TAG:SEED:FLAGS' ...
#   DEVICE=cuda OURO=target-cuda/bin/o scripts/experiments/lyra-sweep.sh gfp 45 \
#     'w128:0:--d-model 128' 'w128-do01:0:--d-model 128 --dropout 0.1'
#
# TAG names the run folder ($OUT/TASK-MODEL-TAG), SEED is --seed, FLAGS are more `ouro fit` flags.
# Env as lyra.sh (OURO, OUT, DATA, DEVICE, TARGET), and MODEL (lyra).
set -uo pipefail
[ $# -ge 3 ] || { echo "usage: $0 TASK EPOCHS 'TAG:SEED:FLAGS' ..." >&2; exit 1; }
task=$1 epochs=$2
shift 2
here=$(dirname "$0")
gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
[ "$gpus" -gt 0 ] || gpus=1
pids=() tags=() i=0
for v in "$@"; do
  IFS=: read -r tag seed flags <<< "$v"
  [ -n "$tag" ] && [ -n "$seed" ] || { echo "variant '$v': expected TAG:SEED:FLAGS" >&2; exit 1; }
  CUDA_VISIBLE_DEVICES=$((i % gpus)) TAG=$tag SEED=$seed EXTRA="$flags" bash "$here/lyra.sh" run "$task" "${MODEL:-lyra}" "$epochs" > /dev/null 2>&1 &
  pids+=($!) tags+=("$tag")
  i=$((i + 1))
done
failed=0
for k in "${!pids[@]}"; do
  wait "${pids[$k]}" || { echo "variant ${tags[$k]} failed: see ${OUT:-runs/lyra}/$task-${MODEL:-lyra}-${tags[$k]}/fit.log" >&2; failed=1; }
done
for t in "${tags[@]}"; do
  r=${OUT:-runs/lyra}/$task-${MODEL:-lyra}-$t
  [ -f "$r/test.json" ] || continue
  best=$(grep -o 'best epoch [0-9]* (spearman [0-9.-]*' "$r/fit.log" | tail -1)
  python3 -c "import json; d=json.load(open('$r/test.json')); print(f\"$t: test spearman {d['spearman']:.4f}, pearson {d['pearson']:.4f}; {d['seconds']:.0f} s; $best)\")"
done
exit $failed
