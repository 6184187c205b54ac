#!/usr/bin/env bash
# Reproducible CUDA build of the native addon on a machine WITHOUT a GPU or a system CUDA toolkit.
#
#   bash scripts/build-cuda.sh        (or: npm run build:cuda)
#
# 1. Installs the CUDA 13.0 toolkit pieces from PyPI wheels into .cuda/pkgs (skipped when present).
#    CUDA 13 wheels unpack into one merged tree: .cuda/pkgs/nvidia/cu13/{bin,include,lib,nvvm}.
# 2. Adds what the wheels lack for linking: unversioned .so symlinks (libcudart.so, libcublas.so, ...)
#    and a libcuda.so driver stub (soname libcuda.so.1) in lib/stubs, generated from the wheel's cuda.h.
# 3. Builds with candle's CUDA backend (`--features node,cuda`) for sm_90a (H100/H200) and places the
#    result beside the CPU addon as convmae.linux-x64-gnu.cuda.node. The CPU addon, native.cjs and
#    index.d.ts are never touched.
# 4. Prints the NEEDED entries of the result and the time taken.
#
# The result needs, on the GPU machine: the NVIDIA driver (libcuda.so.1, driver >= 580 for CUDA 13.0)
# and the CUDA 13 runtime libraries libcudart.so.13, libcublas.so.13, libcublasLt.so.13,
# libnvrtc.so.13, libcurand.so.10 (e.g. .cuda/pkgs/nvidia/cu13/lib via LD_LIBRARY_PATH).
# It cannot be loaded on a machine without libcuda.so.1.
#
# Environment overrides:
#   CARGO_TARGET_DIR   cargo target dir (default /work/target-cuda when /work exists, else <repo>/target/cuda;
#                      kept apart from the CPU build's target dir so the two never invalidate each other)
#   CUDA_COMPUTE_CAP   default 90 (cudaforge turns it into sm_90a)
#   PYTHON             python interpreter used for pip (default python3)
set -euo pipefail

START=$(date +%s)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

STEP="(setup)"
die() { echo "build-cuda: FAILED at step: $STEP${1:+ -- $1}" >&2; exit 1; }
trap 'rc=$?; echo "build-cuda: FAILED at step: $STEP (exit $rc, line $LINENO)" >&2; exit $rc' ERR
step() { STEP="$1"; echo; echo "==> [$(( $(date +%s) - START ))s] $STEP"; }

# ---- pinned CUDA 13.0 wheels (CUDA 13.0 Update 2 component versions) -------------------------------
# Keep these at 13.0.x: the GPU box runs driver 580 (CUDA 13.0); a newer nvcc emits PTX it cannot JIT,
# and cudarc's version detection only knows some nvcc releases (we also force CUDARC_CUDA_VERSION).
WHEELS=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cublas==13.1.0.3
  nvidia-cuda-nvrtc==13.0.88
  nvidia-curand==10.4.0.35
  # cuda_fp16.h includes <nv/target>, which lives in the CCCL headers (include/cccl, on nvcc's
  # system include path via nvcc.profile); candle-kernels does not compile without it.
  nvidia-cuda-cccl==13.0.85
)
PYTHON=${PYTHON:-python3}
CUDA_DIR="$ROOT/.cuda"
PKGS="$CUDA_DIR/pkgs"
CU="$PKGS/nvidia/cu13"
STAMP="$PKGS/.wheels"

if [[ -z "${CARGO_TARGET_DIR:-}" ]]; then
  if [[ -d /work ]]; then CARGO_TARGET_DIR=/work/target-cuda; else CARGO_TARGET_DIR="$ROOT/target/cuda"; fi
fi
export CARGO_TARGET_DIR
TRIPLE_SUFFIX=linux-x64-gnu
OUT_NODE="$ROOT/convmae.$TRIPLE_SUFFIX.cuda.node"

# ---- 0. prerequisites ----------------------------------------------------------------------------------
step "check prerequisites"
[[ "$(uname -s)-$(uname -m)" == "Linux-x86_64" ]] || die "only linux x86_64 is supported (got $(uname -s)-$(uname -m))"
for tool in "$PYTHON" gcc g++ cargo npx readelf; do
  command -v "$tool" >/dev/null || die "'$tool' not found on PATH"
done
"$PYTHON" -m pip --version >/dev/null || die "pip is not available for $PYTHON"

# ---- 1. toolkit from PyPI wheels -----------------------------------------------------------------------
step "install CUDA 13.0 wheels into .cuda/pkgs"
WANT=$(printf '%s\n' "${WHEELS[@]}")
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" && -x "$CU/bin/nvcc" ]]; then
  echo "already installed ($(echo "$WANT" | tr '\n' ' '))"
else
  rm -rf "$PKGS"
  mkdir -p "$PKGS"
  # --no-deps: every piece we need is listed above; keeps the tree exactly what is pinned.
  "$PYTHON" -m pip install --disable-pip-version-check --no-deps --no-compile \
      --target "$PKGS" "${WHEELS[@]}" || die "pip install of the CUDA wheels failed"
  echo "$WANT" > "$STAMP"
fi
[[ -x "$CU/bin/nvcc" ]] || die "nvcc not found at $CU/bin/nvcc after install"
[[ -x "$CU/nvvm/bin/cicc" ]] || die "cicc not found at $CU/nvvm/bin/cicc (nvidia-nvvm)"
[[ -f "$CU/include/cuda.h" ]] || die "cuda.h not found in $CU/include"
[[ -f "$CU/include/crt/host_config.h" ]] || die "crt headers not found (nvidia-cuda-crt)"
[[ -f "$CU/include/cccl/nv/target" ]] || die "CCCL headers (nv/target) not found (nvidia-cuda-cccl)"
NVCC_VER=$("$CU/bin/nvcc" --version | grep -o 'release [0-9.]*, V[0-9.]*') || die "nvcc does not run"
echo "nvcc: $NVCC_VER"
[[ "$NVCC_VER" == "release 13.0,"* ]] || die "expected nvcc release 13.0, got '$NVCC_VER'"

# ---- 2. unversioned symlinks + libcuda driver stub -----------------------------------------------------
step "create unversioned .so symlinks and the libcuda.so stub"
for lib in libcudart libcublas libcublasLt libnvrtc libcurand; do
  # the versioned file with the shortest name is the soname (libfoo.so.13), not libfoo.so.13.1.0.3
  target=$(cd "$CU/lib" && ls -1 "$lib".so.[0-9]* 2>/dev/null | awk '{print length, $0}' | sort -n | head -1 | cut -d' ' -f2-) || true
  [[ -n "$target" ]] || die "no $lib.so.* in $CU/lib (missing wheel?)"
  ln -sfn "$target" "$CU/lib/$lib.so"
  echo "$lib.so -> $target"
done
mkdir -p "$CU/lib/stubs"
STUB_SO="$CU/lib/stubs/libcuda.so"
if [[ ! -f "$STUB_SO" || "$CU/include/cuda.h" -nt "$STUB_SO" ]]; then
  STUB_C="$CUDA_DIR/libcuda-stub.c"
  # The preprocessor maps API names to their versioned symbols (cuMemAlloc -> cuMemAlloc_v2, ...).
  # Each becomes an empty function: only symbol names matter for linking; the real driver is used at run time.
  gcc -E -P -I"$CU/include" "$CU/include/cuda.h" \
    | grep -oE '\bcu[A-Z][A-Za-z0-9_]*[[:space:]]*\(' | sed 's/[[:space:](]//g' | sort -u \
    | awk '{print "void "$1"(void){}"}' > "$STUB_C"
  nsym=$(wc -l < "$STUB_C")
  (( nsym > 100 )) || die "libcuda stub: only $nsym symbols extracted from cuda.h"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$STUB_SO" "$STUB_C" || die "compiling the libcuda stub failed"
  echo "libcuda stub: $nsym symbols -> $STUB_SO"
else
  echo "libcuda stub present: $STUB_SO"
fi
readelf -d "$STUB_SO" | grep -q 'SONAME.*libcuda.so.1' || die "libcuda stub has the wrong soname"

# ---- 3. build ------------------------------------------------------------------------------------------
step "napi build --features node,cuda (CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
export PATH="$CU/bin:$PATH"
export CUDA_HOME="$CU" CUDA_PATH="$CU"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export CUDARC_CUDA_VERSION=13000
# nvcc must use the wheel's nvvm; nvcc.profile in the wheel resolves it relative to bin/.
echo "PATH+=$CU/bin  CUDA_HOME=$CUDA_HOME  CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP  CUDARC_CUDA_VERSION=$CUDARC_CUDA_VERSION"
TMP_OUT=$(mktemp -d "${TMPDIR:-/tmp}/convmae-cuda-out.XXXXXX")
trap 'rm -rf "$TMP_OUT"' EXIT
BUILD_START=$(date +%s)
npx napi build --platform --release \
    --manifest-path crates/convmae-core/Cargo.toml \
    --features node,cuda \
    --target-dir "$CARGO_TARGET_DIR" \
    --output-dir "$TMP_OUT" --no-js --dts index.d.ts \
  || die "napi build failed (see cargo output above)"
BUILD_SECS=$(( $(date +%s) - BUILD_START ))
BUILT="$TMP_OUT/convmae.$TRIPLE_SUFFIX.node"
[[ -f "$BUILT" ]] || die "napi build produced no $BUILT (got: $(ls "$TMP_OUT"))"
mv -f "$BUILT" "$OUT_NODE"

# ---- 4. report -----------------------------------------------------------------------------------------
step "result"
ls -l "$OUT_NODE"
echo "-- readelf -d NEEDED:"
readelf -d "$OUT_NODE" | grep NEEDED
NEEDED=$(readelf -d "$OUT_NODE" | grep NEEDED)
# rustc links with --as-needed, so only libraries whose symbols are referenced stay NEEDED
# (libnvrtc is dropped; libcublasLt stays, for the linear layers' bias epilogues, gemm_epilogue.rs).
# libcuda.so.1 must be there: without it this is not a CUDA build.
grep -q '\[libcuda.so.1\]' <<<"$NEEDED" || die "result does not link libcuda.so.1: the cuda feature did not take effect"
echo "-- ldd (with LD_LIBRARY_PATH=$CU/lib; libcuda.so.1 is 'not found' on a machine without a driver):"
LD_LIBRARY_PATH="$CU/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ldd "$OUT_NODE" || true
echo
echo "build-cuda: OK -> $OUT_NODE"
echo "build-cuda: cargo/napi build ${BUILD_SECS}s, total $(( $(date +%s) - START ))s"
