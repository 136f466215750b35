#!/usr/bin/env bash
# The MemNO paper's table at small scale: FFNO vs MemNO (S4FFNO) test nRMSE on Kuramoto–Sivashinsky by
# resolution and viscosity (and FNO at the lowest resolution), plus neuraloperator's Burgers data.
#
#   bash scripts/experiments/memno.sh data               # KS train/test sets per viscosity (ouro pde generate)
#   bash scripts/experiments/memno.sh run NU R MODEL     # one training run -> $OUT/ks-NU-R-MODEL/ (JSON line in result.json)
#   bash scripts/experiments/memno.sh all [JOBS]         # every (NU, R, MODEL), JOBS at a time
#   bash scripts/experiments/memno.sh summary            # the table (markdown) and docs/memno.svg data
#
# Env: SEED (default 0; other seeds write ks-NU-R-MODEL-sSEED), OURO (binary, default target/release/ouro), OUT (default runs/pde), DEVICE (cpu|cuda), EPOCHS (default 40),
#      LENGTH (domain, default 16π), TRAIN_N (1024), TEST_N (128), NUS ("0.15 0.125 0.1 0.075"), RES ("32 48 64 96 128").
set -euo pipefail
OURO=${OURO:-target/release/ouro}
OUT=${OUT:-runs/pde}
DEVICE=${DEVICE:-cpu}
EPOCHS=${EPOCHS:-40}
LENGTH=${LENGTH:-50.26548245743669}
TRAIN_N=${TRAIN_N:-1024}
TEST_N=${TEST_N:-128}
NUS=${NUS:-0.15 0.125 0.1 0.075}
RES=${RES:-32 48 64 96 128}
MODELS=${MODELS:-ffno memno}
SEED=${SEED:-0}
SFX=$([ "$SEED" = 0 ] && echo "" || echo "-s$SEED")
mkdir -p "$OUT"

data() {
  for nu in $NUS; do
    [ -f "$OUT/ks-$nu-train.safetensors" ] || "$OURO" pde generate --equation ks --viscosity "$nu" --samples "$TRAIN_N" --resolution 32,48,64,96,128 --length "$LENGTH" --seed 1 --out "$OUT/ks-$nu-train.safetensors" &
    [ -f "$OUT/ks-$nu-test.safetensors" ] || "$OURO" pde generate --equation ks --viscosity "$nu" --samples "$TEST_N" --resolution 32,48,64,96,128 --length "$LENGTH" --seed 2 --out "$OUT/ks-$nu-test.safetensors" &
  done
  wait
}

one() {
  local nu=$1 r=$2 model=$3 dir="$OUT/ks-$1-$2-$3$SFX"
  "$OURO" pde train --train "$OUT/ks-$nu-train.safetensors" --test "$OUT/ks-$nu-test.safetensors" --resolution "$r" \
    --model "$model" --seed "$SEED" --epochs "$EPOCHS" --eval-every "$EPOCHS" --device "$DEVICE" --json --out "$dir" > "$dir.json.tmp" 2> "$dir.log" \
    && mv "$dir.json.tmp" "$dir.json"
}

case "${1:-}" in
  data) data ;;
  run) one "$2" "$3" "$4" ;;
  all)
    jobs=${2:-4}
    for nu in $NUS; do for r in $RES; do for m in $MODELS; do
      [ -f "$OUT/ks-$nu-$r-$m$SFX.json" ] || echo "$nu $r $m"
    done; done; done | xargs -P "$jobs" -L 1 bash "$0" run
    ;;
  summary)
    printf '| ν | R | %s |\n' "$(echo $MODELS | sed 's/ / | /g')"
    for nu in $NUS; do for r in $RES; do
      row="| $nu | $r |"
      for m in $MODELS; do
        f="$OUT/ks-$nu-$r-$m$SFX.json"
        if [ -f "$f" ]; then row="$row $(python3 -c "import json,sys; d=json.load(open('$f')); print(f\"{d['rollout_nrmse']:.4f} ({d['one_step_nrmse']:.4f})\")") |"; else row="$row – |"; fi
      done
      echo "$row"
    done; done
    ;;
  *) sed -n 2,12p "$0"; exit 1 ;;
esac
