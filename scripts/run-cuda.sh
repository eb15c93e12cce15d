#!/usr/bin/env bash
# On the GPU machine (no Rust, no internet, PyTorch 2.11 in a Python environment): finds that
# environment's torch/lib and nvidia/cu13/lib, then runs the CUDA bench of dist/trainer-cuda and the same
# step in PyTorch eager on cuda (bench/compare.sh). Usage: scripts/run-cuda.sh [STEPS]
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3 || command -v python)}
SITE=$("$PY" -c "import torch, os; print(os.path.dirname(os.path.dirname(torch.__file__)))")
export LD_LIBRARY_PATH="$SITE/torch/lib:$SITE/nvidia/cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
ldd dist/trainer-cuda | grep -E "torch|c10|not found" || true
PYTHON="$PY" TRAINER=dist/trainer-cuda bench/compare.sh "${1:-10}" cuda
