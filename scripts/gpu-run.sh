#!/usr/bin/env bash
# Run a CUDA-enabled ouro binary ON THE GPU MACHINE (no Rust, no internet).
#
#   bash scripts/gpu-run.sh target-cuda/release/ouro doctor --device cuda
#
# The binary (built by scripts/build-cuda.sh) has DT_NEEDED entries
#   libcuda.so.1      (driver: system copy, found by ldconfig)
#   libcublas.so.13 (which itself needs libcublasLt.so.13)  libcurand.so.10
# (linked with --as-needed; libcudart.so.13 / libnvrtc.so.13 are linked too
# whenever the code references them). The non-driver libs come from the
# CUDA 13 pip wheels that torch (cu130) installed in /opt/torch/.venv; this
# script puts their lib folders on LD_LIBRARY_PATH and execs the binary.
# Diagnostics go to stderr, the binary's stdout is untouched.
# Override/extend the search with OURO_CUDA_LIB_DIRS="dir1:dir2".
set -uo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: $0 BINARY [ARGS...]" >&2
  exit 2
fi
bin="$1"; shift
if [[ ! -f "$bin" ]]; then
  echo "gpu-run: no such binary: $bin" >&2
  exit 2
fi
[[ -x "$bin" ]] || chmod +x "$bin" 2>/dev/null || true

dirs=()
add_dir() { [[ -d "$1" ]] || return 0; local d; for d in "${dirs[@]:-}"; do [[ "$d" == "$1" ]] && return 0; done; dirs+=("$1"); }

if [[ -n "${OURO_CUDA_LIB_DIRS:-}" ]]; then
  IFS=: read -r -a extra <<< "$OURO_CUDA_LIB_DIRS"
  for d in "${extra[@]}"; do add_dir "$d"; done
fi
shopt -s nullglob
for sp in /opt/torch/.venv/lib/python3*/site-packages \
          /usr/local/lib/python3*/dist-packages /usr/lib/python3/dist-packages; do
  # CUDA 13 wheels install into nvidia/cu13/lib; CUDA 12 style is nvidia/<pkg>/lib
  add_dir "$sp/nvidia/cu13/lib"
  for d in "$sp"/nvidia/*/lib; do add_dir "$d"; done
done
# Driver locations used by containers (normally ldconfig already knows them).
for d in /usr/local/nvidia/lib64 /usr/lib/wsl/lib; do add_dir "$d"; done
shopt -u nullglob

if (( ${#dirs[@]} )); then
  joined="$(IFS=:; echo "${dirs[*]}")"
  export LD_LIBRARY_PATH="$joined${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  echo "gpu-run: LD_LIBRARY_PATH += ${dirs[*]}" >&2
else
  echo "gpu-run: WARNING: found no nvidia pip lib folders" >&2
fi

missing="$(ldd "$bin" 2>&1 | grep 'not found' || true)"
if [[ -n "$missing" ]]; then
  echo "gpu-run: ERROR: unresolved libraries:" >&2
  echo "$missing" >&2
  echo "gpu-run: full ldd output:" >&2
  ldd "$bin" >&2 || true
  echo "gpu-run: candidate files on this machine:" >&2
  for lib in $(echo "$missing" | awk '{print $1}'); do
    stem="${lib%%.so*}"
    find /opt /usr /lib /lib64 -name "$stem.so*" 2>/dev/null | head -5 | sed 's/^/    /' >&2
  done
  exit 127
fi

"$bin" "$@"
rc=$?
if (( rc == 127 )); then
  echo "gpu-run: binary failed to start; ldd:" >&2
  ldd "$bin" >&2 || true
fi
exit "$rc"
