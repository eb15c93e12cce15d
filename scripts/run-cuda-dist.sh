#!/usr/bin/env bash
# On the GPU machine (as scripts/run-cuda.sh: PyTorch 2.11 in a Python environment, dist/trainer-cuda built
# here by scripts/build-cuda.sh): the checks of the data-parallel path on CUDA.
# 1. The same short ViT-S run (batch 64, synthetic set) twice without a launcher and twice as a world of one
#    under torchrun-style variables, alternating: there every collective (gradients, centers, the reported
#    numbers) goes through NCCL; the median step time of each shows the wrapper's overhead.
# 2. With more than one GPU: torchrun over all of them (2 steps' worth of checks: the run ends, rank 0 wrote
#    one history). With one GPU this part says so and stops.
# Usage: scripts/run-cuda-dist.sh [STEPS]     Results in $OUT (the device tool's output folder) or ./cuda-dist.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3 || command -v python)}
SITE=$("$PY" -c "import torch, os; print(os.path.dirname(os.path.dirname(torch.__file__)))")
NCCL_LIB=$(ls -d "$SITE"/nvidia/nccl/lib 2>/dev/null || true)
export LD_LIBRARY_PATH="$SITE/torch/lib:$SITE/nvidia/cu13/lib${NCCL_LIB:+:$NCCL_LIB}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
DEST=${OUT:-cuda-dist}
STEPS=${1:-40}
mkdir -p "$DEST"
T=dist/trainer-cuda
# The paper's ViT-S/16 recipe on a synthetic set instead of ImageNet.
SETS=(--config configs/densedino-vits16-imagenet.toml --set 'data.shards=""' --set run.batch_size=64
      --set run.max_steps="$STEPS" --set run.checkpoint_every=0 --set data.synth_count=2048 --set data.synth_size=256
      --set data.synth_dir=\"$DEST/synth\" --set run.out_dir=\"$DEST/runs\")
median() { "$PY" - "$1" <<'PY'
import json, statistics, sys
t = [json.loads(l)["step_time"] for l in open(sys.argv[1]) if '"kind":"step"' in l][10:]
print(f"{statistics.median(t) * 1e3:.1f} ms/step over {len(t)} steps" if t else "no steps")
PY
}
one() {  # name, then env assignments
  local name=$1; shift
  env "$@" "$T" train --device cuda --set run.name="$name" "${SETS[@]}" > "$DEST/$name.log" 2>&1
  echo "$name: exit $? ($(grep -m1 '^run ' "$DEST/$name.log")): $(median "$DEST/runs/$name/metrics.jsonl")"
}
WS1=(RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29611)
for round in 1 2; do
  one "plain-$round"
  one "nccl-ws1-$round" "${WS1[@]}"
done 2>&1 | tee "$DEST/summary.txt"
NGPU=$(nvidia-smi -L | wc -l)
if [ "$NGPU" -gt 1 ]; then
  torchrun --standalone --nproc-per-node "$NGPU" --no-python "$T" train --device cuda --set run.name=torchrun \
    "${SETS[@]}" > "$DEST/torchrun.log" 2>&1
  echo "torchrun x $NGPU: exit $? ($(grep -m1 '^run ' "$DEST/torchrun.log")): $(median "$DEST/runs/torchrun/metrics.jsonl")" | tee -a "$DEST/summary.txt"
else
  echo "one GPU here: the multi-GPU check (torchrun over every GPU) needs a machine with more; this script runs it there" | tee -a "$DEST/summary.txt"
fi
