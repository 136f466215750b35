#!/usr/bin/env bash
# The Hydra paper's matrix-mixer comparison (Hwang et al. 2024, Table 2) at CPU scale: the same
# pre-norm encoder (width 32, 2 layers, gated MLP) with each matrix mixer, data-independent (DI: learned
# parameters define the L×L matrix) and sequence-aligned (SA/DD: the matrix is built from the input),
# trained with the masked-LM objective on the same token budget, on text (Shakespeare, bytes) and on DNA
# (C. elegans chrX). Validation masked-LM loss per run; the table is printed at the end.
#
#   scripts/experiments/mixers.sh            # all runs (skips finished ones); STEPS=600 CORPORA=text OUT=... to vary
#   scripts/experiments/mixers.sh summary    # the table from the runs so far
set -euo pipefail
OURO=${OURO:-target/release/ouro}
OUT=${OUT:-runs/mixers}
STEPS=${STEPS:-150}
MIXERS=${MIXERS:-"dense toeplitz vandermonde cauchy low_rank attention semiseparable quasiseparable"}
CORPORA=${CORPORA:-"text dna"}

summary() {
  python3 - "$OUT" <<'PY'
import json, sys, glob, os
out = sys.argv[1]
res = {}
for f in glob.glob(f"{out}/*/metrics.jsonl"):
    corpus, mixer, form = os.path.basename(os.path.dirname(f)).split("--")
    rows = [json.loads(l) for l in open(f)]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    if val:
        res[(mixer, form, corpus)] = val[-1]
mixers = sorted({m for m, _, _ in res}, key=lambda m: "dense toeplitz vandermonde cauchy low_rank attention semiseparable quasiseparable".split().index(m))
print("| mixer | text DI | text SA | DNA DI | DNA SA |")
print("|---|---|---|---|---|")
for m in mixers:
    cell = lambda f, c: f"{res[(m, f, c)]:.4f}" if (m, f, c) in res else "—"
    print(f"| {m} | {cell('di', 'text')} | {cell('sa', 'text')} | {cell('di', 'dna')} | {cell('sa', 'dna')} |")
PY
}
if [ "${1:-}" = summary ]; then summary; exit 0; fi

mkdir -p "$OUT"
for corpus in $CORPORA; do
  if [ $corpus = text ]; then data='corpus = "shakespeare"
tokenizer = "bytes"'; else data='corpus = "celegans-chrx"
tokenizer = "dna"'; fi
  for mixer in $MIXERS; do
    for form in di sa; do
      [ "$mixer/$form" = dense/sa ] && continue   # a dense matrix has no sequence-aligned form
      [ "$mixer/$form" = attention/di ] && continue   # softmax attention is sequence-aligned by definition
      run=$OUT/$corpus--$mixer--$form
      [ -f "$run/checkpoint/config.json" ] && continue
      rm -rf "$run"
      mkdir -p "$OUT/configs"
      cfg=$OUT/configs/$corpus--$mixer--$form.toml
      cat > "$cfg" <<TOML
[model]
arch = "mixer"
mixer = "$mixer"
data_dependent = $([ $form = sa ] && echo true || echo false)
d_model = 32
n_layer = 2
d_state = 16
headdim = 8

[data]
$data
seq_len = 128
valid_fraction = 0.1

[train]
objective = "masked"
batch_size = 8
steps = $STEPS
lr = 3e-3
min_lr = 3e-4
warmup = 15
weight_decay = 0.1
seed = 0
eval_every = $STEPS
eval_tokens = 32768
save_every = $STEPS
samples = 0
out = "$run"
TOML
      echo "== $corpus $mixer $form"
      "$OURO" train --config "$cfg" --quiet 2>&1 | grep -E "validation loss|parameters" || true
    done
  done
done
summary
