# shellcheck shell=bash
# Source this file:   source scripts/cuda-env.sh
#
# Sets up a CUDA 13.0 build environment for `cargo build --features cuda` on a
# machine WITHOUT a CUDA toolkit, a GPU or a driver, using only NVIDIA's PyPI
# wheels. Idempotent: the wheels are installed once into .cuda/ (git-ignored);
# later calls only re-export the environment.
#
# What it provides:
#   .cuda/site/nvidia/cu13/           a toolkit-shaped tree from the wheels
#       bin/nvcc, nvvm/bin/cicc       the compiler (candle-kernels' build.rs, via cudaforge)
#       include/, include/cccl/       CUDA + CCCL (thrust/cub) headers
#       lib/lib*.so.N                 real runtime libs (link targets only)
#       lib/lib*.so -> lib*.so.N      unversioned names, so `-lcudart` etc. resolve
#       lib/stubs/libcuda.so          generated driver stub (soname libcuda.so.1)
#
# Env vars read by the crates involved (checked in their build.rs, versions
# locked in Cargo.lock):
#   cudaforge 0.1.6 (candle-kernels 0.11.1): NVCC, else `nvcc` in PATH, else
#       CUDA_HOME/bin/nvcc; CUDA_COMPUTE_CAP (else runs nvidia-smi -> fails
#       here); CUDAFORGE_THREADS (parallel nvcc jobs; default = 50% of cores);
#       NVCC_CCBIN (host compiler, default gcc/c++ from PATH).
#   cudarc 0.19.10 (feature dynamic-linking): CUDARC_CUDA_VERSION (else needs
#       a cuda-XXXXX feature); link search dirs from CUDA_HOME / CUDA_PATH /
#       CUDA_ROOT / CUDA_TOOLKIT_ROOT_DIR: <root>/lib and <root>/lib/stubs,
#       then emits -lcuda -lnvrtc -lcurand -lcublas -lcublasLt -lcudart.

_ouro_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OURO_CUDA_DIR="${OURO_CUDA_DIR:-$_ouro_root/.cuda}"

# ---------------------------------------------------------------------------
# Pins. EVERY nvidia wheel is pinned to the CUDA 13.0 release line:
#  * The GPU machine's driver accepts PTX only up to ISA 9.0 (= CUDA 13.0).
#    candle embeds PTX compiled here; PTX from a newer nvcc (an unpinned
#    nvidia-nvvm resolves to 13.5 -> PTX ISA 9.x>0) fails there with
#    CUDA_ERROR_UNSUPPORTED_PTX_VERSION. nvcc, crt (headers used by nvcc),
#    nvvm (cicc, the PTX generator) must therefore all be 13.0.x.
#  * cudart/nvrtc/cublas/curand are only linked against (sonames
#    libcudart.so.13, libnvrtc.so.13, libcublas.so.13, libcublasLt.so.13,
#    libcurand.so.10); at run time the GPU machine's own copies are used.
#    Versions are those of the CUDA 13.0 Update 1 release (cudart 13.0.88).
#  * --no-deps everywhere: the dependency metadata would pull newer wheels.
# ---------------------------------------------------------------------------
OURO_CUDA_WHEELS=(
  nvidia-cuda-nvcc==13.0.88     # nvcc, ptxas, fatbinary, nvlink
  nvidia-cuda-crt==13.0.88      # include/crt/* needed by nvcc
  nvidia-nvvm==13.0.88          # nvvm/bin/cicc + libdevice (PTX ISA <= 9.0)
  nvidia-cuda-runtime==13.0.88  # cuda.h, cuda_runtime.h, libcudart.so.13
  nvidia-cuda-cccl==13.0.85     # thrust/cub/libcu++ headers (moe kernels, reduce.cu)
  nvidia-cuda-nvrtc==13.0.88    # libnvrtc.so.13 (link only)
  nvidia-cublas==13.0.2.14      # libcublas.so.13, libcublasLt.so.13 (link only)
  nvidia-curand==10.4.0.35      # libcurand.so.10 (link only)
)

OURO_CUDA_SITE="$OURO_CUDA_DIR/site"
OURO_CUDA_ROOT="$OURO_CUDA_SITE/nvidia/cu13"

_ouro_cuda_setup() {
  local stamp="$OURO_CUDA_DIR/.installed"
  local want
  want="$(printf '%s\n' "${OURO_CUDA_WHEELS[@]}" v2)"
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" && -x "$OURO_CUDA_ROOT/bin/nvcc" ]]; then
    return 0
  fi
  echo "cuda-env: installing CUDA 13.0 wheels into $OURO_CUDA_SITE" >&2
  rm -rf "$OURO_CUDA_SITE"
  mkdir -p "$OURO_CUDA_DIR/wheels"
  # download (cached in .cuda/wheels) then install from the local files
  python3 -m pip download --quiet --no-deps --only-binary=:all: \
      -d "$OURO_CUDA_DIR/wheels" "${OURO_CUDA_WHEELS[@]}" || return 1
  python3 -m pip install --quiet --no-deps --no-index --find-links "$OURO_CUDA_DIR/wheels" \
      --target "$OURO_CUDA_SITE" "${OURO_CUDA_WHEELS[@]}" || return 1

  local lib="$OURO_CUDA_ROOT/lib"
  # Unversioned names for the linker (wheels ship only lib*.so.N).
  local f
  for f in "$lib"/lib*.so.*; do
    local base="${f##*/}"; base="${base%%.so.*}.so"
    [[ "$base" == *builtins* || "$base" == *.alt.so ]] && continue
    [[ -e "$lib/$base" ]] || ln -s "${f##*/}" "$lib/$base"
  done

  # libcuda (the driver) is in no wheel. Generate a stub exporting every
  # driver function cudarc can reference (taken from cudarc's own bindings),
  # each returning CUDA_ERROR_STUB_LIBRARY (34). Soname libcuda.so.1 so the
  # binary's DT_NEEDED is the real driver's name; at run time the GPU
  # machine's /usr/lib/.../libcuda.so.1 is loaded instead.
  local cudarc
  cudarc="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.10 2>/dev/null | head -n1)"
  if [[ -z "$cudarc" ]]; then
    (cd "$_ouro_root" && cargo fetch --quiet) || return 1
    cudarc="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.10 | head -n1)"
  fi
  mkdir -p "$lib/stubs"
  grep -ohE '^pub unsafe fn cu[A-Za-z0-9_]+' "$cudarc/src/driver/sys/mod.rs" \
    | awk '{print $4}' | sort -u \
    | awk '{printf "int %s(void) { return 34; }\n", $1}' > "$lib/stubs/libcuda_stub.c"
  gcc -shared -fPIC -O0 -Wl,-soname,libcuda.so.1 -o "$lib/stubs/libcuda.so.1" \
      "$lib/stubs/libcuda_stub.c" || return 1
  ln -sf libcuda.so.1 "$lib/stubs/libcuda.so"

  echo "$want" > "$stamp"
}

if _ouro_cuda_setup; then
  export CUDA_HOME="$OURO_CUDA_ROOT"
  export CUDA_PATH="$OURO_CUDA_ROOT"
  export CUDA_ROOT="$OURO_CUDA_ROOT"
  export NVCC="$OURO_CUDA_ROOT/bin/nvcc"
  case ":$PATH:" in *":$OURO_CUDA_ROOT/bin:"*) ;; *) export PATH="$OURO_CUDA_ROOT/bin:$PATH" ;; esac
  # cudarc: select the CUDA 13.0 API surface (no nvcc version sniffing)
  export CUDARC_CUDA_VERSION=13000
  # cudaforge: H100/H200 = compute capability 9.0 (compiled as sm_90a);
  # there is no nvidia-smi here to detect it.
  export CUDA_COMPUTE_CAP=90
  # cudaforge: use all cores for nvcc (default is half of them)
  export CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-$(nproc)}"
  # Belt and braces for the final link: gcc (rustc's linker driver) also
  # searches LIBRARY_PATH for -lcuda / -lcublas / ...
  export LIBRARY_PATH="$OURO_CUDA_ROOT/lib:$OURO_CUDA_ROOT/lib/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"
else
  echo "cuda-env: setup FAILED" >&2
  return 1 2>/dev/null || exit 1
fi
unset _ouro_root
