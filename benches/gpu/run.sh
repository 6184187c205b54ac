#!/usr/bin/env bash
# The one-shot GPU check, on the GPU machine (no Node, no Rust, no network; PyTorch present):
# unpacks the payload of benches/gpu/prepare.sh, points the loader at PyTorch's CUDA 13
# libraries, and runs dist/benches/gpu/check.js. Results go to $OUT (the device tool's output
# folder): gpu-<date>.{jsonl,md}, check.json, check.log, env.txt (LD_LIBRARY_PATH, Node, the
# commit, nvidia-smi, ldd of the addon, ncu's version), and with --profile profile.json and
# ncu-raw.csv.gz. The device tool brings back at most 8 files, hence one env.txt.
# Extra arguments go to check.js (--deadline S: end within S seconds, skipping what no longer fits;
# --profile-only: the profile alone; --quick: every row at batch 64, then at 128 the comparison (ours sparse bf16, eager, torch.compile) and the rest of the issue's matrix (ours sparse / dense x fp32 / bf16, eager fp32), then the A/B rows of changes runs 1-7 measured; --kernels-only: parity and kernel
# agreement, no throughput, a minute or two; --throughput-only: throughput and memory without
# parity and agreement, for a second call after a --kernels-only one).
# --profile: after the batch-64 comparison (ours sparse bf16, eager, compile), the per-kernel profile of one sparse bf16 step of convmae-base at
# batch 64: ours under Nsight Compute (`ncu --metrics gpu__time_duration.sum`, every launch
# timed on its own: the second step only, via cuProfilerStart/Stop in the addon, capped at 150 s, --profile-timeout S to change) and
# PyTorch eager bf16 under torch.profiler (1 step after 1 warmup, capped at 120 s). Costs up to
# about 4.5 minutes of device time on top; ncu is looked up on PATH, /usr/local/cuda*/bin and
# /opt/nvidia/nsight-compute/*/ (or --ncu PATH); without it that half is recorded as skipped.
set -euo pipefail
cd "$(dirname "$0")/../.."
PAYLOAD=benches/gpu/payload
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
WORK=$(mktemp -d)

# xz may be missing there; Python's lzma is not.
python3 - "$PAYLOAD" "$WORK" <<'PY'
import lzma, shutil, sys, os
payload, work = sys.argv[1], sys.argv[2]
for src, dst in [("node.xz", "node"), ("convmae.cuda.node.xz", "convmae.cuda.node")]:
    with lzma.open(os.path.join(payload, src)) as f, open(os.path.join(work, dst), "wb") as g:
        shutil.copyfileobj(f, g)
os.chmod(os.path.join(work, "node"), 0o755)
PY

# cuBLAS, cuRAND, cudart and NVRTC 13: from the PyTorch wheels (site-packages/nvidia/...), else
# from the machine's CUDA toolkit (it has nvcc 13.0).
LIBDIRS=$(python3 - <<'PY'
import glob, os, site, sys
need = ["libcublas.so.13", "libcublasLt.so.13", "libcurand.so.10", "libcudart.so.13", "libnvrtc.so.13"]
toolkits = ["/usr/local/cuda/lib64", "/usr/local/cuda/targets/x86_64-linux/lib", "/usr/lib/x86_64-linux-gnu"]
toolkits += sorted(glob.glob("/usr/local/cuda-*/lib64")) + sorted(glob.glob("/usr/local/cuda-*/targets/x86_64-linux/lib"))
roots = [p for p in site.getsitepackages() + [site.getusersitepackages()] + toolkits if os.path.isdir(p)]
dirs = []
for name in need:
    hits = [h for r in roots for h in glob.glob(os.path.join(r, "**", name), recursive=r not in toolkits)]
    if not hits:
        print(f"run.sh: {name} not found under {roots}", file=sys.stderr)
        continue
    d = os.path.dirname(hits[0])
    if d not in dirs:
        dirs.append(d)
print(":".join(dirs))
PY
)
# ncu (run under --profile) inherits this too: the addon it profiles needs these libraries.
export LD_LIBRARY_PATH="$LIBDIRS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
{
  echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
  echo "node $("$WORK/node" --version)"
  echo "commit $(cat "$PAYLOAD/COMMIT" 2>/dev/null || echo unknown)"
  echo "## nvidia-smi"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || true
  if [[ " $* " == *" --profile "* ]]; then
    echo "## ncu"
    for n in $(command -v ncu) /usr/local/cuda/bin/ncu /usr/local/cuda-*/bin/ncu /opt/nvidia/nsight-compute/*/ncu; do
      [[ -x "$n" ]] && { echo "$n: $("$n" --version 2>&1 | tail -1)"; break; }
    done
  fi
  echo "## ldd convmae.cuda.node"
  ldd "$WORK/convmae.cuda.node" 2>&1 || true
} > "$OUT/env.txt"

CONVMAE_NATIVE="$WORK/convmae.cuda.node" "$WORK/node" dist/benches/gpu/check.js --out "$OUT" --golden "$PAYLOAD/golden" "$@" 2>&1 | tee "$OUT/check.log"
