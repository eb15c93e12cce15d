#!/usr/bin/env bash
# One DenseDINO training step of ViT-Tiny with the paper-main views (4 x 224, M = 4) at batch 8, timed on
# burn's flex backend, on burn-tch (when built with `--features tch`) and in PyTorch eager, in one run on
# one machine, so the ratios compare like with like. Usage: bench/compare.sh [STEPS] [DEVICE]
# (DEVICE: cpu, the default, or cuda; tch then runs on cuda:0).
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-5}
DEVICE=${2:-cpu}
PY=${PYTHON:-$HOME/.cache/densedino/torch-venv/bin/python}
TRAINER=${TRAINER:-target/release/trainer}
COMMON=(--config configs/densedino-vits16-imagenet.toml --set model.arch=vit_tiny --set run.batch_size=8
        --steps "$STEPS" --warmup 2 --synthetic-batches)
THREADS=$(nproc)
if [ "$DEVICE" = cpu ]; then
  "$TRAINER" bench "${COMMON[@]}" --device cpu | tee /tmp/bench-flex.txt
  "$TRAINER" bench "${COMMON[@]}" --device tch-cpu 2>&1 | tee /tmp/bench-tch.txt || true
else
  : > /tmp/bench-flex.txt
  "$TRAINER" bench "${COMMON[@]}" --device cuda:0 2>&1 | tee /tmp/bench-tch.txt || true
fi
"$PY" bench/pytorch_step.py --arch vit_tiny --batch 8 --views 4 --size 224 --points 4 --steps "$STEPS" \
  --device "$DEVICE" --threads "$THREADS" | tee /tmp/bench-torch.txt
python3 - <<'PY'
import re
def secs(path):
    try:
        m = re.search(r"([0-9.]+) s/step", open(path).read())
        return float(m.group(1)) if m else None
    except OSError:
        return None
torch = secs("/tmp/bench-torch.txt")
for name, path in [("flex", "/tmp/bench-flex.txt"), ("tch", "/tmp/bench-tch.txt")]:
    s = secs(path)
    if s and torch:
        print(f"{name}: {s / torch:.2f}x the step time of PyTorch eager")
PY
