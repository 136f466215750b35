#!/usr/bin/env bash
# The primate splice-junction benchmark (3,186 x 60 nt, classes EI/IE/N; Debian r-cran-mlbench):
# accuracy on a 10% held-out test split, for each backbone of configs/dna/, trained from scratch and
# fine-tuned from its masked-LM (causal for Mamba) pretraining on C. elegans chrX, over several seeds.
#
#   for m in caduceus-ps caduceus-ph hydra mamba transformer; do ouro train --config configs/dna/$m.toml; done
#   SEEDS="1 2 3 4 5" scripts/experiments/splice.sh
#   scripts/experiments/splice.sh summary        # the table, from the runs so far
#
# A backbone without a pretrained checkpoint (runs/dna-MODEL/checkpoint) is run from scratch only.
# Caduceus-PS is RC-equivariant (its pooled features RC-invariant) and needs no augmentation; the others
# train with reverse-complement augmentation, and Caduceus-Ph predicts with post-hoc conjoining.
set -euo pipefail
OURO=${OURO:-target/release/ouro}
SEEDS=${SEEDS:-"1 2 3 4 5"}
MODELS=${MODELS:-"caduceus-ps caduceus-ph hydra mamba transformer"}
EPOCHS=${EPOCHS:-16}
LR=${LR:-4e-3}
OUT=${OUT:-runs/splice}
POOLING=${POOLING:-mean}   # the head's pooling: mean, or center (the junction sits mid-window)
INITS=${INITS:-"scratch pretrained"}

summary() {
  python3 - "$OUT" <<'PY'
import json, sys, glob, os, statistics as st
out = sys.argv[1]
rows = {}
for f in sorted(glob.glob(f"{out}/*/test.json")):
    model, init, seed = os.path.basename(os.path.dirname(f)).rsplit("-", 2)
    rows.setdefault((model, init), []).append(json.load(open(f))["accuracy"])
print(f"| backbone | init | seeds | test accuracy (mean ± sd) | min | max |")
print(f"|---|---|---|---|---|---|")
for (model, init), a in sorted(rows.items()):
    sd = st.stdev(a) if len(a) > 1 else 0.0
    print(f"| {model} | {init} | {len(a)} | {100*st.mean(a):.2f} ± {100*sd:.2f} | {100*min(a):.2f} | {100*max(a):.2f} |")
PY
}
if [ "${1:-}" = summary ]; then summary; exit 0; fi

[ -f data/splice/splice.tsv ] || "$OURO" data fetch splice
for seed in $SEEDS; do
  split=$OUT/split-$seed
  [ -f "$split/test.csv" ] || "$OURO" data split data/splice/splice.tsv --test-fraction 0.1 --valid-fraction 0.1 --seed "$seed" --out "$split"
  for m in $MODELS; do
    case $m in
      caduceus-ps) extra=() ;;
      caduceus-ph) extra=(--rc-augment --conjoin) ;;
      *) extra=(--rc-augment) ;;
    esac
    for init in $INITS; do
      if [ $init = pretrained ]; then
        ck=runs/dna-$m/checkpoint
        [ -f "$ck/config.json" ] || continue
        src=(--init "$ck")
      else
        src=(--backbone "configs/dna/$m.toml")
      fi
      d=$OUT/$m-$init-$seed
      [ -f "$d/test.json" ] && continue
      echo "== $m $init seed $seed"
      "$OURO" fit --train "$split/train.csv" --valid "$split/valid.csv" --sequence-column sequence --label-column label \
        --task classification --alphabet dna --model backbone "${src[@]}" "${extra[@]}" \
        --epochs "$EPOCHS" --batch-size 32 --lr "$LR" --seed "$seed" --pooling "$POOLING" --out "$d" --quiet
      "$OURO" evaluate --model "$d" --input "$split/test.csv" --sequence-column sequence --label-column label --json > "$d/test.json.tmp"
      mv "$d/test.json.tmp" "$d/test.json"
      cat "$d/test.json"; echo
    done
  done
done
summary
