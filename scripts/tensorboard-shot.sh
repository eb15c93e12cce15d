#!/usr/bin/env bash
# TensorBoard serving run folders on loopback, photographed by headless Chromium (Debian's `chromium`):
# the check by eye that our event files draw as curves, without a desktop.
#
#   scripts/tensorboard-shot.sh OUT.png LOGDIR_SPEC [TAG_REGEX]
#
# LOGDIR_SPEC is TensorBoard's --logdir_spec (`name:folder,name:folder`, or one folder such as `runs`);
# TAG_REGEX (default `train/loss$`) fills the tag filter. TensorBoard comes from the venv of
# scripts/torch-venv.sh. The legacy Scalars dashboard is the one photographed: the Time Series
# dashboard draws its lines with WebGL/OffscreenCanvas, which headless Chromium leaves blank.
set -euo pipefail
OUT=${1:?usage: scripts/tensorboard-shot.sh OUT.png LOGDIR_SPEC [TAG_REGEX]}
SPEC=${2:?usage: scripts/tensorboard-shot.sh OUT.png LOGDIR_SPEC [TAG_REGEX]}
TAG=${3:-train/loss\$}
PORT=${PORT:-6017}
PY=$("$(dirname "$0")/torch-venv.sh")
command -v chromium >/dev/null || { echo "chromium is missing (apt-get install chromium)" >&2; exit 1; }
"$(dirname "$PY")/tensorboard" --logdir_spec "$SPEC" --host 127.0.0.1 --port "$PORT" >/dev/null 2>&1 &
TB=$!
trap 'kill $TB 2>/dev/null' EXIT
for _ in $(seq 60); do
  curl -sf "http://127.0.0.1:$PORT/data/runs" >/dev/null && break
  sleep 1
done
FILTER=$(python3 -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1], safe=""))' "$TAG")
chromium --headless=new --no-sandbox --hide-scrollbars --window-size=1600,1200 --virtual-time-budget=30000 \
  --screenshot="$OUT" "http://127.0.0.1:$PORT/#scalars&tagFilter=$FILTER&_smoothingWeight=0" 2>/dev/null
echo "$OUT"
