#!/usr/bin/env bash
# Compile-only check of every CUDA source under csrc/cuda, without a GPU and
# without torch: nvcc, sm_80 + sm_90, C++17, every warning an error.
#
#   scripts/check_cuda_compile.sh            # all .cu files, 2 at a time
#   JOBS=4 NVCC=/path/to/nvcc scripts/check_cuda_compile.sh
#   scripts/check_cuda_compile.sh --binding  # also: g++ -fsyntax-only on the
#                                            # torch bindings (csrc/cuda/**/*.cpp)
#
# The .cu files need no torch. --binding uses the torch headers of
# ${PYTHON:-python3} (a CPU wheel ships c10/cuda headers too) plus nvcc's
# include directory. Prints one line per file and a summary; exits 1 if any
# file fails (its compiler output is printed), 2 if a tool is missing.
set -euo pipefail

CHECK_BINDING=0
for arg in "$@"; do
  case "$arg" in
    --binding) CHECK_BINDING=1 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "check_cuda_compile: unknown argument $arg" >&2; exit 2 ;;
  esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NVCC="${NVCC:-nvcc}"
JOBS="${JOBS:-2}"

if ! command -v "$NVCC" >/dev/null 2>&1; then
  echo "check_cuda_compile: nvcc not found (set NVCC=/path/to/nvcc)" >&2
  exit 2
fi

mapfile -t SOURCES < <(cd "$ROOT" && find csrc/cuda -name '*.cu' -type f | sort)
if [ "${#SOURCES[@]}" -eq 0 ]; then
  echo "check_cuda_compile: no .cu files under csrc/cuda" >&2
  exit 1
fi

LOGDIR="$(mktemp -d)"
trap 'rm -rf "$LOGDIR"' EXIT

compile_one() {
  local src="$1" log
  log="$LOGDIR/$(echo "$src" | tr '/' '_').log"
  local start=$SECONDS
  if "$NVCC" -c -o /dev/null "$ROOT/$src" \
      -std=c++17 \
      -gencode arch=compute_80,code=sm_80 \
      -gencode arch=compute_90,code=sm_90 \
      -Werror all-warnings \
      -Xcompiler -Wall,-Wextra,-Werror \
      -I "$ROOT/csrc/cuda" >"$log" 2>&1; then
    echo "ok    $src ($((SECONDS - start))s)"
  else
    echo "FAIL  $src ($((SECONDS - start))s)"
    sed 's/^/      /' "$log"
    touch "$log.failed"
  fi
}
export -f compile_one
export ROOT NVCC LOGDIR

echo "nvcc: $("$NVCC" --version | tail -n 1)"
printf '%s\n' "${SOURCES[@]}" | xargs -P "$JOBS" -I{} bash -c 'compile_one "$1"' _ {}

TOTAL=${#SOURCES[@]}

if [ "$CHECK_BINDING" -eq 1 ]; then
  PYTHON="${PYTHON:-python3}"
  CXX="${CXX:-g++}"
  TORCH_INC="$("$PYTHON" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "include"))')" || {
    echo "check_cuda_compile: --binding needs torch importable by $PYTHON" >&2
    exit 2
  }
  PY_INC="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
  # nvcc may be a wrapper script: ask it where its toolkit is (TOP) unless CUDA_HOME says.
  CUDA_TOP="${CUDA_HOME:-$("$NVCC" --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)}"
  CUDA_INC="$CUDA_TOP/include"
  EXTRA=()
  # A CPU wheel lacks this generated header; its only content is export macros.
  [ -f "$TORCH_INC/c10/cuda/impl/cuda_cmake_macros.h" ] || EXTRA+=(-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE)
  mapfile -t BINDINGS < <(cd "$ROOT" && find csrc/cuda -name '*.cpp' -type f | sort)
  for src in "${BINDINGS[@]}"; do
    TOTAL=$((TOTAL + 1))
    log="$LOGDIR/$(echo "$src" | tr '/' '_').log"
    start=$SECONDS
    if "$CXX" -fsyntax-only -std=c++17 -Wall -Wextra -Werror "${EXTRA[@]}" \
        -isystem "$TORCH_INC" -isystem "$TORCH_INC/torch/csrc/api/include" \
        -isystem "$CUDA_INC" -isystem "$PY_INC" -I "$ROOT/csrc/cuda" "$ROOT/$src" >"$log" 2>&1; then
      echo "ok    $src (g++ -fsyntax-only, torch headers, $((SECONDS - start))s)"
    else
      echo "FAIL  $src (g++ -fsyntax-only, torch headers, $((SECONDS - start))s)"
      sed 's/^/      /' "$log"
      touch "$log.failed"
    fi
  done
fi

FAILED=$(find "$LOGDIR" -name '*.failed' | wc -l)
echo "summary: $((TOTAL - FAILED))/$TOTAL compiled, $FAILED failed (nvcc sm_80 + sm_90, -Werror)"
[ "$FAILED" -eq 0 ]
