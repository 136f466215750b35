#!/usr/bin/env bash
# ouro's CPU engine side by side with llama.cpp on the same random-weight Mamba-2, interleaved rounds.
#
#   python scripts/bench/random_mamba2.py --shape 130m --out runs/bench/mamba2-130m
#   # llama.cpp: build it yourself (git-ignored folder), then convert the same folder once per format:
#   #   python convert_hf_to_gguf.py runs/bench/mamba2-130m --outtype f32 --outfile runs/bench/mamba2-130m-f32.gguf
#   LLAMA_BIN=peers/llama.cpp/build/bin OURO=target/release/ouro scripts/bench/cpu_engine.sh runs/bench/mamba2-130m
#
# Env: ROUNDS (3), THREADS (2), FORMATS ("f32 f16 q8_0"), BATCH (16), OUT (runs/bench/cpu_engine.jsonl).
# Every line of OUT is one measurement (JSON); the summary prints medians and ouro/llama.cpp ratios.
set -euo pipefail
MODEL=${1:?usage: cpu_engine.sh MODEL_DIR   (GGUFs expected at MODEL_DIR-<format>.gguf)}
OURO=${OURO:-target/release/ouro}
LLAMA_BIN=${LLAMA_BIN:?set LLAMA_BIN to the folder with llama-bench and llama-batched-bench}
ROUNDS=${ROUNDS:-3}; THREADS=${THREADS:-2}; FORMATS=${FORMATS:-"f32 f16 q8_0"}; BATCH=${BATCH:-16}
OUT=${OUT:-runs/bench/cpu_engine.jsonl}
mkdir -p "$(dirname "$OUT")"; : > "$OUT"
NICE="nice -n -5"; $NICE true 2>/dev/null || NICE=""
rec() { python3 -c 'import json,sys; d=json.loads(sys.argv[1]); d.update(json.loads(sys.argv[2])); print(json.dumps(d))' "$1" "$2" >> "$OUT"; }
for r in $(seq "$ROUNDS"); do
  for f in $FORMATS; do
    g="$MODEL-$f.gguf"
    j=$($NICE "$OURO" --threads "$THREADS" bench --model "$MODEL" --weights "$f" --prompt-len 512 --gen-len 128 --repeats 1 --json)
    rec "$j" "{\"runtime\": \"ouro\", \"test\": \"pp512+tg128\", \"format\": \"$f\", \"round\": $r}"
    l=$($NICE "$LLAMA_BIN/llama-bench" -m "$g" -p 512 -n 128 -t "$THREADS" -r 1 -o json 2>/dev/null)
    python3 - "$l" "$f" "$r" >> "$OUT" <<'PY'
import json, sys
for row in json.loads(sys.argv[1]):
    test = f"pp{row['n_prompt']}" if row["n_prompt"] else f"tg{row['n_gen']}"
    print(json.dumps({"runtime": "llama.cpp", "test": test, "format": sys.argv[2], "round": int(sys.argv[3]), "tokens_per_s": row["avg_ts"]}))
PY
    for state in f32 bf16; do
      flag=""; name="tg128x$BATCH"
      if [ "$state" = bf16 ]; then flag="--state-bf16"; name="tg128x$BATCH-bf16-state"; fi
      j=$($NICE "$OURO" --threads "$THREADS" bench --model "$MODEL" --weights "$f" --prompt-len 0 --gen-len 128 --batch "$BATCH" --repeats 1 $flag --json)
      rec "$j" "{\"runtime\": \"ouro\", \"test\": \"$name\", \"format\": \"$f\", \"round\": $r}"
    done
    l=$($NICE "$LLAMA_BIN/llama-batched-bench" -m "$g" -c 4096 -b 2048 -ub 512 -npp 1 -ntg 128 -npl "$BATCH" -t "$THREADS" 2>/dev/null | grep -E '^\|\s+1 \|' || true)
    ts=$(echo "$l" | awk -F'|' '{gsub(/ /,"",$9); print $9}')
    echo "{\"runtime\": \"llama.cpp\", \"test\": \"tg128x$BATCH\", \"format\": \"$f\", \"round\": $r, \"tokens_per_s\": ${ts:-null}}" >> "$OUT"
  done
  j=$($NICE "$OURO" --threads "$THREADS" bench --model "$MODEL" --prompt-len 2048 --gen-len 1 --repeats 1 --no-bandwidth --json)
  rec "$j" "{\"runtime\": \"ouro\", \"test\": \"pp2048\", \"format\": \"f32\", \"round\": $r}"
  l=$($NICE "$LLAMA_BIN/llama-bench" -m "$MODEL-f32.gguf" -p 2048 -n 0 -t "$THREADS" -r 1 -o json 2>/dev/null)
  python3 -c 'import json,sys; [print(json.dumps({"runtime": "llama.cpp", "test": "pp2048", "format": "f32", "round": int(sys.argv[2]), "tokens_per_s": r["avg_ts"]})) for r in json.loads(sys.argv[1])]' "$l" "$r" >> "$OUT"
done
python3 - "$OUT" <<'PY'
import json, sys, statistics as st
rows = [json.loads(l) for l in open(sys.argv[1])]
def med(xs): xs = [x for x in xs if x is not None]; return st.median(xs) if xs else float("nan")
def ours(test, f, key):
    return med([r.get(key) for r in rows if r["runtime"] == "ouro" and r["format"] == f and r["test"] == test])
def peer(test, f):
    return med([r["tokens_per_s"] for r in rows if r["runtime"] == "llama.cpp" and r["format"] == f and r["test"] == test])
print("| format | test | ouro tok/s | llama.cpp tok/s | ratio | ouro % of bandwidth limit |")
print("|---|---|---:|---:|---:|---:|")
for f in sorted({r["format"] for r in rows}):
    batched = sorted({r["test"] for r in rows if r["test"].startswith("tg128x") and r["runtime"] == "ouro"})
    for test, src, key in [("pp512", "pp512+tg128", "prefill_tokens_per_s"), ("tg128", "pp512+tg128", "decode_tokens_per_s")] + \
            [(b.removesuffix("-bf16-state"), b, "decode_tokens_per_s") for b in batched] + [("pp2048", "pp2048", "prefill_tokens_per_s")]:
        o, p = ours(src, f, key), peer(test, f)
        test = src if src.startswith("tg128x") else test
        if o != o: continue
        frac = ours(src, f, "fraction_of_limit") if key == "decode_tokens_per_s" else float("nan")
        print(f"| {f} | {test} | {o:.1f} | {p:.1f} | {o / p:.2f}× | {'' if frac != frac else f'{100 * frac:.0f}%'} |")
bw = med([r.get("read_bandwidth_gb_s") for r in rows if r["runtime"] == "ouro"])
print(f"\nread bandwidth (median of ouro's runs): {bw:.1f} GB/s")
PY
