#!/usr/bin/env bash
# Installs the reference implementations some tests compare against (test/oracles/) into
# .cache/test-oracles, pinned, from PyPI wheels: pycocotools (COCO's polygon rasterization and
# COCOeval), OpenCV (the resizes of mmcv, which the official SEG pipeline uses), Pillow (the
# resizes of detectron2) and numpy. Pillow stays below 13, which reorders the two passes of a
# resize that shrinks the height much more than the width (its PR #9549); the official code ran
# on Pillow of 2022, which always resamples horizontally first.
# test/oracles.test.ts runs python3 with that folder on PYTHONPATH; without it those tests are
# skipped unless CONVMAE_REQUIRE_ORACLES=1 (as .ci/run sets).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET="$ROOT/.cache/test-oracles"
PACKAGES=(pycocotools==2.0.11 numpy==2.4.6 opencv-python-headless==5.0.0.93 pillow==12.3.0)
WANT=$(printf '%s\n' "${PACKAGES[@]}")
if [[ -f "$TARGET/.packages" && "$(cat "$TARGET/.packages")" == "$WANT" ]]; then
  echo "setup-test-oracles: already in $TARGET"
  exit 0
fi
start=$(date +%s)
rm -rf "$TARGET"
mkdir -p "$TARGET"
"${PYTHON:-python3}" -m pip install --disable-pip-version-check --root-user-action=ignore --only-binary=:all: --no-compile --quiet \
  --target "$TARGET" "${PACKAGES[@]}"
echo "$WANT" > "$TARGET/.packages"
echo "setup-test-oracles: installed ${PACKAGES[*]} in $TARGET in $(( $(date +%s) - start )) s"
