#!/usr/bin/env bash
# One DenseDINO training step (paper-main views: 4 x 224, M = 4, K = 65536) timed on burn's flex backend,
# on burn-tch, and in PyTorch eager, in one run on one machine, so that the ratios compare like with like.
#
#   bench/compare.sh [STEPS] [DEVICE] [ARCH] [BATCH]      (defaults: 5 cpu vit_tiny 8)
#
# WARMUP untimed steps come first on every f32 row (default 12 on a CPU, 2 on CUDA): on the CPU both
# allocators grow their heaps to the step's working set during the first ~10 steps (mimalloc's arenas
# fault in and zero fresh huge pages there, 10% of flex's first steps in `perf`, none after), so a shorter
# warm-up times the heap's growth, not the step a long run repeats. The half-precision rows on a CPU take
# HALF_WARMUP (default 2: without native half types a step takes about a minute there).
#
# PyTorch runs the official formulation: the literal (1+R+N)^2 masked attention of every block, where we
# run the fused attention with the reference rows; the ratios include that saving.
# DEVICE cpu: flex f32, tch-cpu f32, bf16 and fp16, PyTorch eager f32, AMP bf16 and AMP fp16 + GradScaler
# (the official --use_fp16; on a CPU without native fp16 or bf16 the half rows run ~25x slower than f32
# and take ~10 minutes each at 5 steps: ROWS picks rows; there both fp16 rows time steps from GradScaler's
# first scale on, skipped ones included). Our binary keeps freed memory
# (mimalloc, and glibc's malloc for LibTorch's tensors; trainer/src/main.rs); PyTorch runs twice in f32,
# as installed and with the same glibc policy (GLIBC_TUNABLES), so both comparisons are on the table.
# DEVICE cuda: tch on cuda:0 in f32, bf16 and fp16, PyTorch eager f32, AMP bf16 and AMP fp16 + GradScaler.
# Both fp16 rows start at GradScaler's 2^16 and skip the steps that overflow until the scale has come
# down; a skipped step saves AdamW's pass, so on CUDA they warm up for 20 steps first.
# ROWS="flex-f32 torch-f32 torch-f32-same-malloc" runs only the rows named (all by default).
# COUNT_OPS=1 adds the LibTorch ops of one step: PyTorch's from torch.profiler, ours from ltrace on the
# entry points of LibTorch's operators (`at::_ops::*::call`, nested ones included, as the profiler counts
# them), the difference of a 2-step and a 1-step run.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-5}
DEVICE=${2:-cpu}
ARCH=${3:-vit_tiny}
BATCH=${4:-8}
PY=${PYTHON:-$HOME/.cache/densedino/torch-venv/bin/python}
TRAINER=${TRAINER:-target/release/trainer}
OUT=${BENCH_OUT:-$(mktemp -d)}
mkdir -p "$OUT"
MODEL=(--config configs/densedino-vits16-imagenet.toml --set "model.arch=$ARCH" --set "run.batch_size=$BATCH"
       --synthetic-batches)
if [ "$DEVICE" = cpu ]; then WARMUP=${WARMUP:-12}; else WARMUP=${WARMUP:-2}; fi
HALF_WARMUP=${HALF_WARMUP:-2}
COMMON=("${MODEL[@]}" --steps "$STEPS" --warmup "$WARMUP")
HALF=("${MODEL[@]}" --steps "$STEPS" --warmup "$HALF_WARMUP")
TORCH=(bench/pytorch_step.py --arch "$ARCH" --batch "$BATCH" --views 4 --size 224 --points 4 --steps "$STEPS"
       --device "$DEVICE" --threads "$(nproc)" --warmup "$WARMUP")
SAME_MALLOC="glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647"

run() { # NAME COMMAND...: runs it, keeps its output in $OUT/NAME.txt, never stops the comparison
  local name=$1; shift
  # ROWS="flex-f32 torch-f32 ...": only those rows (the bf16 ones take ~10 minutes each on a CPU without
  # native bf16).
  if [ -n "${ROWS:-}" ] && [[ " $ROWS " != *" $name "* ]]; then return 0; fi
  echo "== $name" >&2
  "$@" > "$OUT/$name.txt" 2>&1 || echo "(failed: see $OUT/$name.txt)" >&2
  grep -E "s/step|error" "$OUT/$name.txt" >&2 || true
}

if [ "$DEVICE" = cpu ]; then
  run flex-f32 "$TRAINER" bench "${COMMON[@]}" --device cpu
  run tch-f32 "$TRAINER" bench "${COMMON[@]}" --device tch-cpu
  run tch-bf16 "$TRAINER" bench "${HALF[@]}" --device tch-cpu --set run.precision=bf16
  run tch-fp16 "$TRAINER" bench "${HALF[@]}" --device tch-cpu --set run.precision=fp16
  run torch-f32 "$PY" "${TORCH[@]}"
  run torch-f32-same-malloc env GLIBC_TUNABLES=$SAME_MALLOC "$PY" "${TORCH[@]}"
  run torch-amp-bf16 "$PY" "${TORCH[@]}" --amp bf16 --warmup "$HALF_WARMUP"
  run torch-amp-fp16 "$PY" "${TORCH[@]}" --amp fp16 --warmup "$HALF_WARMUP"
  TCH_DEVICE=tch-cpu
else
  run tch-f32 "$TRAINER" bench "${COMMON[@]}" --device cuda:0
  run tch-bf16 "$TRAINER" bench "${COMMON[@]}" --device cuda:0 --set run.precision=bf16
  run tch-fp16 "$TRAINER" bench "${MODEL[@]}" --steps "$STEPS" --warmup 20 --device cuda:0 --set run.precision=fp16
  run torch-f32 "$PY" "${TORCH[@]}"
  run torch-amp-bf16 "$PY" "${TORCH[@]}" --amp bf16
  # GradScaler starts at 2^16 and skips the steps that overflow until it has come down: warm it up.
  run torch-amp-fp16 "$PY" "${TORCH[@]}" --amp fp16 --warmup 20
  TCH_DEVICE=cuda:0
fi

if [ "${COUNT_OPS:-0}" = 1 ]; then
  run torch-ops "$PY" "${TORCH[@]}" --steps 1 --warmup 1 --count-ops
  if command -v ltrace >/dev/null; then
    for n in 1 2; do
      ltrace -c -L -x '_ZN2at4_ops*call*' -o "$OUT/ltrace-$n.txt" "$TRAINER" bench "${MODEL[@]}" --device "$TCH_DEVICE" \
        --steps "$n" --warmup 0 > /dev/null 2>&1 || true
    done
  else
    echo "(no ltrace: our LibTorch op count is skipped; apt-get install ltrace)" >&2
  fi
fi

OUT="$OUT" ARCH="$ARCH" BATCH="$BATCH" DEVICE="$DEVICE" python3 - <<'PY'
import os, re
out = os.environ["OUT"]
def secs(name):
    try:
        m = re.search(r"([0-9.]+) s/step", open(f"{out}/{name}.txt").read())
        return float(m.group(1)) if m else None
    except OSError:
        return None
rows = [("flex f32", "flex-f32"), ("tch f32", "tch-f32"), ("tch bf16", "tch-bf16"), ("tch fp16", "tch-fp16"),
        ("PyTorch eager f32", "torch-f32"), ("PyTorch eager f32, our malloc policy", "torch-f32-same-malloc"),
        ("PyTorch AMP bf16", "torch-amp-bf16"), ("PyTorch AMP fp16 + GradScaler", "torch-amp-fp16")]
batch = int(os.environ["BATCH"])
base, amp = secs("torch-f32"), secs("torch-amp-bf16")
print(f"\n{os.environ['ARCH']}, batch {batch}, 4 x 224 views, M = 4, K = 65536, on {os.environ['DEVICE']}")
print(f"{'run':40} {'s/step':>8} {'images/s':>9} {'vs PyTorch f32':>15} {'vs PyTorch AMP bf16':>20}")
for label, name in rows:
    s = secs(name)
    if s is None:
        continue
    r1 = f"{s / base:.2f}x" if base else "-"
    r2 = f"{s / amp:.2f}x" if amp else "-"
    print(f"{label:40} {s:8.4f} {batch / s:9.1f} {r1:>15} {r2:>20}")
print("(ratios are step times: below 1.00x is faster)")
def calls(n):
    try:
        m = re.search(r"^\s*100\.00\s+\S+\s+(\d+) total", open(f"{out}/ltrace-{n}.txt").read(), re.M)
        return int(m.group(1)) if m else None
    except OSError:
        return None
one, two = calls(1), calls(2)
if one is not None and two is not None:
    print(f"tch ops per step: {two - one} LibTorch ops (ltrace, at::_ops entry points, nested included)")
try:
    m = re.search(r"pytorch ops per step: .*", open(f"{out}/torch-ops.txt").read())
    if m:
        print(m.group(0))
except OSError:
    pass
PY
echo "(outputs in $OUT)"
