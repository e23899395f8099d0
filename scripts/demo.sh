#!/usr/bin/env bash
# The main job end to end, in one process, on the embedded default (the `tiny` test model):
#   scripts/demo.sh [VIDEO] [PROMPT]
# Without VIDEO it generates a clip (moving shapes with a sine-tone audio track).
# Writes (overwrites: -y) out/demo-edit.mp4 and prints the edit summary and its warp error / PSNR.
# Environment: MODEL (tiny or a local diffusers folder), STEPS, FRAMES, AREA (pixels), DEVICE.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="$(bash scripts/setup.sh | tail -n 1)"
TF="$VENV/bin/tokenflow"
mkdir -p out
SOURCE="${1:-}"
PROMPT="${2:-a marble sculpture of a wolf running in the snow}"
if [ -z "$SOURCE" ]; then
  SOURCE=out/demo-source.mp4
  "$TF" make-clip "$SOURCE" --frames 24 --size 128x128 --fps 12 -y
fi
DEVICE_ARGS=()
if [ -n "${DEVICE:-}" ]; then DEVICE_ARGS=(--device "$DEVICE"); fi
"$TF" edit "$SOURCE" --prompt "$PROMPT" --output out/demo-edit.mp4 -y --model "${MODEL:-tiny}" \
  --steps "${STEPS:-20}" --frames "${FRAMES:-24}" --area "${AREA:-16384}" --reconstruct "${DEVICE_ARGS[@]}"
"$TF" eval --source "$SOURCE" --edited out/demo-edit.mp4 --frames "${FRAMES:-24}"
