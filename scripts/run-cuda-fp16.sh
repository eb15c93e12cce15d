#!/usr/bin/env bash
# fp16 as the official code trains by default (--use_fp16 true), ours beside theirs on one GPU: the
# official main_dino.py and our trainer (run.precision = "fp16") for the same few epochs of ViT-S/16 at
# batch 64 with the paper's views, on the same images, then both loss tables, both final loss scales and
# both step times. (The fp16 rows of bench/compare.sh come with scripts/run-cuda.sh.)
#
# Prepared on the Rust machine (the GPU machine has PyTorch 2.11 but no Rust, no internet and no ../shared):
#   scripts/build-cuda.sh                                    # dist/trainer-cuda
#   scripts/run-cuda-fp16.sh --prepare                       # data/cuda-fp16: shards + the official code
# then run there with the device tool, carrying dist and data/cuda-fp16:
#   scripts/run-cuda-fp16.sh [EPOCHS]                        # results in $OUT (or ./cuda-fp16)
#
# The images are the 500 of ../shared/data/imagenet-sample, their long side capped at 256 px (the set
# travels within the device tool's 64 MiB). Ours reads them as shards; the official code reads the same
# JPEGs as an ImageFolder, unpacked from those shards there. Augmentations are each side's own random
# draws, so the two loss curves are compared as curves, not step for step (official_parity.rs does that
# on the CPU).
set -uo pipefail
cd "$(dirname "$0")/.."
DATA=data/cuda-fp16
if [ "${1:-}" = --prepare ]; then
  set -e
  cargo build --release -p shard
  target/release/shard pack --input ../shared/data/imagenet-sample/train --out "$DATA/shards" --max-side 256 \
    --force --quiet
  rm -rf "$DATA/official" && cp -r ../shared/reference/official-densedino "$DATA/official"
  du -sh "$DATA" dist 2>/dev/null
  exit 0
fi
EPOCHS=${1:-5}
PY=${PYTHON:-$(command -v python3 || command -v python)}
SITE=$("$PY" -c "import torch, os; print(os.path.dirname(os.path.dirname(torch.__file__)))")
export LD_LIBRARY_PATH="$SITE/torch/lib:$SITE/nvidia/cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
DEST=${OUT:-cuda-fp16}
mkdir -p "$DEST"
[ -f "$DATA/shards/index.json" ] && [ -f "$DATA/official/main_dino.py" ] \
  || { echo "$DATA is missing: run scripts/run-cuda-fp16.sh --prepare on the Rust machine and carry it" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true

# The shards as an ImageFolder for the official code: {class}/{key}.jpg.
"$PY" - "$DATA/shards" "$DEST/images" <<'PY'
import os, sys, tarfile
shards, out = sys.argv[1], sys.argv[2]
n = 0
for name in sorted(os.listdir(shards)):
    if not name.endswith(".tar"):
        continue
    with tarfile.open(os.path.join(shards, name)) as tar:
        members = {m.name: m for m in tar.getmembers() if m.isfile()}
        for key in sorted(k[:-4] for k in members if k.endswith(".cls")):
            cls = tar.extractfile(members[key + ".cls"]).read().decode().strip()
            jpg = members.get(key + ".jpg")
            if jpg is None:
                continue
            os.makedirs(os.path.join(out, cls), exist_ok=True)
            with open(os.path.join(out, cls, os.path.basename(key) + ".jpg"), "wb") as f:
                f.write(tar.extractfile(jpg).read())
            n += 1
print(f"{n} images unpacked for the official code")
PY

# The same recipe on both sides: configs/densedino-vits16-imagenet.toml (the paper-main views: 2 global and 2
# other views, all 224 px at scale 0.4-1; 2x2 = 4 reference points per pair; the all2pos_pos2cls_eye mask;
# both losses, the reference one over every crop) in the official flags, fp16, EPOCHS epochs with one of lr
# and teacher-temperature warmup.
start=$SECONDS
"$PY" "$DATA/official/main_dino.py" --arch vit_small --patch_size 16 --data_path "$DEST/images" \
  --output_dir "$DEST/official" --use_fp16 true --batch_size_per_gpu 64 --epochs "$EPOCHS" --warmup_epochs 1 \
  --warmup_teacher_temp_epochs 1 --saveckp_freq 1000 --num_workers 8 \
  --local_crops_number 2 --global_crops_scale 0.4 1. --local_crops_scale 0.4 1. --local_crops_size 224 \
  --given_pos --num_reference 2 --mask_mode all2pos_pos2cls_eye --use_global_loss --use_ref_loss \
  --use_all_crop_ref > "$DEST/official.log" 2>&1
echo "official main_dino.py: rc $?, $((SECONDS - start)) s (log: $DEST/official.log)"
start=$SECONDS
dist/trainer-cuda train --config configs/densedino-vits16-imagenet.toml --set data.shards=\"$DATA/shards\" \
  --set run.device=\"cuda:0\" --set run.precision=\"fp16\" --set run.batch_size=64 --set run.epochs="$EPOCHS" \
  --set optim.warmup_epochs=1 --set loss.warmup_teacher_temp_epochs=1 --set run.out_dir=\"$DEST\" \
  --set run.name=\"ours\" --set run.log_every=1 > "$DEST/ours.log" 2>&1
echo "ours (trainer-cuda, fp16): rc $?, $((SECONDS - start)) s (log: $DEST/ours.log)"

"$PY" - "$DEST" <<'PY'
import json, os, re, sys
import torch
d = sys.argv[1]
theirs = [json.loads(l) for l in open(os.path.join(d, "official", "log.txt"))] \
    if os.path.exists(os.path.join(d, "official", "log.txt")) else []
steps = [json.loads(l) for l in open(os.path.join(d, "ours", "metrics.jsonl")) if '"kind":"step"' in l] \
    if os.path.exists(os.path.join(d, "ours", "metrics.jsonl")) else []
ours = {}
for s in steps:
    ours.setdefault(s["epoch"], []).append(s)
print("epoch | official loss (global, ref) | ours loss (cls, ref) | ours: final scale, skipped, s/step")
for e in range(max(len(theirs), len(ours))):
    t = theirs[e] if e < len(theirs) else {}
    o = ours.get(e, [])
    mean = lambda k: sum(s[k] for s in o if s.get(k) is not None) / max(1, len(o))
    tl = f"{t.get('train_loss', float('nan')):.4f} ({t.get('train_global_loss', float('nan')):.4f}, " \
         f"{t.get('train_ref_loss', float('nan')):.4f})" if t else "-"
    ol = f"{mean('loss'):.4f} ({mean('cls_loss'):.4f}, {mean('ref_loss'):.4f})" if o else "-"
    tail = f"{o[-1].get('loss_scale')}, {o[-1].get('skipped_steps')}, {mean('step_time'):.3f}" if o else "-"
    print(f"{e:5} | {tl:28} | {ol:22} | {tail}")
ck = os.path.join(d, "official", "checkpoint.pth")
if os.path.exists(ck):
    sc = torch.load(ck, map_location="cpu", weights_only=False).get("fp16_scaler")
    print(f"official GradScaler at the end: scale {sc and sc.get('scale')}, growth tracker {sc and sc.get('_growth_tracker')}")
m = re.findall(r"Total time: \S+ \(([0-9.]+) s / it\)", open(os.path.join(d, "official.log")).read()) \
    if os.path.exists(os.path.join(d, "official.log")) else []
if m:
    print(f"official s/it per epoch: {', '.join(m)}")
PY
