#!/usr/bin/env bash
# Compiles our CUDA kernels (crates/kernels/cuda/*.cu) to PTX and runs ptxas over the result,
# without cargo, without a GPU and without the rest of the CUDA build: it catches kernel compile
# errors and resource problems (too many registers, spills) where there is no GPU, e.g. in CI.
# First it runs crates/kernels/cuda/host_check.cpp: the kernels (f32, and bf16 through a
# bit-exact stand-in) compiled as plain C++ with the CUDA built-ins emulated, against
# double-precision references (index math, coverage, reductions, the alignment of vector
# accesses; g++ only, about a minute on 2 cores).
#
#   bash scripts/check-cuda-ptx.sh
#
# The toolkit pieces it needs come from PyPI (nvcc, its crt headers, nvvm/cicc, the cuda_fp16 /
# cuda_bf16 / runtime headers and the CCCL headers they include): about 0.3 GB installed, pinned
# to the same 13.0 releases as scripts/build-cuda.sh. It reuses .cuda/pkgs when build-cuda.sh has
# installed them there, and otherwise installs into $CUDA_PTX_DIR (default .cache/cuda-ptx).
# The nvcc and ptxas flags are those of crates/kernels/build.rs; keep the two in step.
#
# Environment: CUDA_COMPUTE_CAP (default 90), PYTHON (default python3), CUDA_PTX_DIR.
set -euo pipefail
START=$(date +%s)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

WHEELS=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-cccl==13.0.85
)
PYTHON=${PYTHON:-python3}
ARCH="sm_${CUDA_COMPUTE_CAP:-90}"

OUT=$(mktemp -d "${TMPDIR:-/tmp}/convmae-ptx.XXXXXX")
trap 'rm -rf "$OUT"' EXIT
g++ -std=c++20 -O1 -pthread -Wall -Wno-unknown-pragmas -o "$OUT/host_check" crates/kernels/cuda/host_check.cpp
if "$OUT/host_check" > "$OUT/host_check.txt"; then
  echo "check-cuda-ptx: host emulation of the kernels: $(grep -c ' ok$' "$OUT/host_check.txt") checks passed"
else
  grep -v ' ok$' "$OUT/host_check.txt" >&2
  echo "check-cuda-ptx: host emulation of the kernels FAILED" >&2
  exit 1
fi

if [[ -x "$ROOT/.cuda/pkgs/nvidia/cu13/bin/nvcc" ]]; then
  CU="$ROOT/.cuda/pkgs/nvidia/cu13"
  echo "check-cuda-ptx: using the toolkit of build-cuda.sh ($CU)"
else
  PKGS="${CUDA_PTX_DIR:-$ROOT/.cache/cuda-ptx}"
  CU="$PKGS/nvidia/cu13"
  WANT=$(printf '%s\n' "${WHEELS[@]}")
  if [[ -x "$CU/bin/nvcc" && -f "$PKGS/.wheels" && "$(cat "$PKGS/.wheels")" == "$WANT" ]]; then
    echo "check-cuda-ptx: toolkit already in $PKGS"
  else
    rm -rf "$PKGS"
    mkdir -p "$PKGS"
    "$PYTHON" -m pip install --disable-pip-version-check --no-deps --no-compile --quiet \
        --target "$PKGS" "${WHEELS[@]}"
    echo "$WANT" > "$PKGS/.wheels"
    echo "check-cuda-ptx: installed ${WHEELS[*]} in $(( $(date +%s) - START )) s"
  fi
fi
export PATH="$CU/bin:$PATH"
nvcc --version | grep -q 'release 13.0,' || { echo "check-cuda-ptx: expected nvcc 13.0" >&2; exit 1; }

status=0
for cu in crates/kernels/cuda/*.cu; do
  name=$(basename "$cu" .cu)
  t0=$(date +%s)
  if ! nvcc --ptx -O3 -std=c++17 "-arch=$ARCH" -I crates/kernels/cuda -o "$OUT/$name.ptx" "$cu"; then
    echo "check-cuda-ptx: nvcc failed on $cu" >&2
    status=1
    continue
  fi
  if ! ptxas "-arch=$ARCH" -v -o /dev/null "$OUT/$name.ptx" > "$OUT/$name.txt" 2>&1; then
    cat "$OUT/$name.txt" >&2
    echo "check-cuda-ptx: ptxas -arch=$ARCH rejected $name.ptx" >&2
    status=1
    continue
  fi
  kernels=$(grep -c 'Compiling entry function' "$OUT/$name.txt" || true)
  spills=$(grep 'spill' "$OUT/$name.txt" | grep -vc ' 0 bytes spill stores' || true)
  maxreg=$(grep -o 'Used [0-9]* registers' "$OUT/$name.txt" | awk '{print $2}' | sort -n | tail -1)
  echo "check-cuda-ptx: $cu -> $kernels kernels for $ARCH, max $maxreg registers, $spills spilling ($(( $(date +%s) - t0 )) s)"
  if (( spills > 0 )); then grep 'spill' "$OUT/$name.txt" | grep -v ' 0 bytes spill stores' | sed 's/^/  /'; fi
done
echo "check-cuda-ptx: $([[ $status == 0 ]] && echo OK || echo FAILED) in $(( $(date +%s) - START )) s"
exit $status
