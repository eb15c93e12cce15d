#!/usr/bin/env bash
# On the GPU machine (no Rust, no internet, PyTorch 2.11 in a Python environment): finds that
# environment's torch/lib and nvidia/cu13/lib, then runs every GPU check of the speed work in one go:
# bench/compare.sh on cuda for ViT-Tiny and ViT-Small at batch 64 (ours in f32 and bf16; PyTorch eager f32,
# AMP bf16 and AMP fp16 + GradScaler), with the op and kernel counts of one step.
# Usage: scripts/run-cuda.sh [STEPS]        (built beforehand by scripts/build-cuda.sh on a Rust machine)
# Everything lands in $OUT (the device tool's output folder) or ./cuda-bench.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3 || command -v python)}
SITE=$("$PY" -c "import torch, os; print(os.path.dirname(os.path.dirname(torch.__file__)))")
export LD_LIBRARY_PATH="$SITE/torch/lib:$SITE/nvidia/cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
DEST=${OUT:-cuda-bench}
mkdir -p "$DEST"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
ldd dist/trainer-cuda | grep -E "torch|c10|not found" || true
for arch in vit_tiny vit_small; do
  COUNT_OPS=1 BENCH_OUT="$DEST/$arch-b64" PYTHON="$PY" TRAINER=dist/trainer-cuda \
    bench/compare.sh "${1:-10}" cuda "$arch" 64 2>&1 | tee "$DEST/$arch-b64.txt"
done
