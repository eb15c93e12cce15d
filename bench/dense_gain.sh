#!/usr/bin/env bash
# DenseDINO's claim, checked: DINO (`loss.use_ref_loss=false`), DenseDINO, and the reference loss alone
# (`loss.use_global_loss=false`, the paper's Table 3 middle row) trained on the same data, views, steps
# and seeds from one config, then each teacher evaluated three ways:
# - k-NN top-1 (k = 20) on Caltech-101's test split, its CLS token;
# - the CamVid linear probe (`eval seg`) at the model's own view size (the grid it learned) and at twice it
#   (its grid interpolated 2x: CamVid's poles and signs are a pixel wide at 64 px), mean over 3 probe seeds;
# - point correspondence (`eval match`) on 1000 held-out images: the patch that finds its own point.
# A randomly initialised backbone of the config is evaluated too (the floor). One table at the end: the
# mean and the spread (sample sd) over seeds of each variant.
#
#   bench/dense_gain.sh CONFIG [SEED ...]              (seeds default: 0 1)
#   VARIANTS="dino densedino" bench/dense_gain.sh ...  (default: dino densedino refonly)
#   REFONLY_SEEDS="0" ...                              (the reference-loss-only arm's seeds; default: all)
#   EVAL_ONLY=1 ...                                    (no training: evaluate what has finished)
#
# Runs go to runs/dense-gain/<config name>/<variant>-s<seed>; a run that stopped is resumed, a finished one
# is not trained again (`<run>.trained` beside it), and evaluations are kept as JSON under
# runs/dense-gain/<config name>/eval/, so the script can be stopped and rerun at any point. Needs the shard
# sets of the README (data/caltech-train, data/caltech-test) and ../shared/data/camvid.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:?usage: bench/dense_gain.sh CONFIG [SEED ...]}
shift
SEEDS=${*:-0 1}
VARIANTS=${VARIANTS:-dino densedino refonly}
REFONLY_SEEDS=${REFONLY_SEEDS:-$SEEDS}
TRAINER=${TRAINER:-target/release/trainer}
CAMVID=${CAMVID:-../shared/data/camvid}
name=$(basename "$CONFIG" .toml)
# The global view size (the presets' 224 unless the file sets it): the probe's second size is twice it.
SIZE=$(sed -n 's/^global_size *= *\([0-9][0-9]*\).*/\1/p' "$CONFIG")
SIZE=${SIZE:-224}
out=runs/dense-gain/$name
mkdir -p "$out/eval"
[ -x "$TRAINER" ] || { echo "$TRAINER: not built (cargo build --release -p trainer)" >&2; exit 1; }
for set in data/caltech-train data/caltech-test; do
  [ -f "$set/index.json" ] || { echo "$set: missing (the README's shard pack commands make it)" >&2; exit 1; }
done

sets_of() {
  case $1 in
    dino) echo "--set loss.use_ref_loss=false" ;;
    densedino) echo "" ;;
    refonly) echo "--set loss.use_global_loss=false" ;;
    *) echo "unknown variant $1 (dino, densedino, refonly)" >&2; exit 1 ;;
  esac
}

runs=()
for seed in $SEEDS; do
  for v in $VARIANTS; do
    if [ "$v" = refonly ] && ! [[ " $REFONLY_SEEDS " == *" $seed "* ]]; then continue; fi
    runs+=("$v-s$seed")
  done
done

if [ -z "${EVAL_ONLY:-}" ]; then
  for r in "${runs[@]}"; do
    [ -f "$out/$r.trained" ] && continue
    v=${r%-s*}; seed=${r##*-s}
    echo "== train $r ($(date +%H:%M:%S))"
    if [ -d "$out/$r" ]; then
      "$TRAINER" train --resume "$out/$r" --quiet
    else
      # shellcheck disable=SC2046
      "$TRAINER" train --config "$CONFIG" --set "run.out_dir=$out" --set "run.name=$r" --set "run.seed=$seed" \
        $(sets_of "$v") --quiet
    fi
    touch "$out/$r.trained"
  done
fi

evaluate() { # evaluate LABEL MODEL-ARGS...
  local label=$1; shift
  local e=$out/eval/$label
  [ -f "$e.knn.json" ] || "$TRAINER" eval knn "$@" --train data/caltech-train --val data/caltech-test --k 20 \
    --cache data/features --json "$e.knn.json" >/dev/null
  [ -f "$e.seg.json" ] || "$TRAINER" eval seg "$@" --data "$CAMVID" --dataset camvid --json "$e.seg.json" >/dev/null
  [ -f "$e.seg2x.json" ] || "$TRAINER" eval seg "$@" --data "$CAMVID" --dataset camvid --size "$((2 * SIZE))" \
    --json "$e.seg2x.json" >/dev/null
  [ -f "$e.match.json" ] || "$TRAINER" eval match "$@" --data data/caltech-test --json "$e.match.json" >/dev/null
}

echo "== evaluate ($(date +%H:%M:%S))"
evaluate random --random-init --config "$CONFIG"
for r in "${runs[@]}"; do
  if [ -f "$out/$r.trained" ]; then evaluate "$r" --checkpoint "$out/$r"; fi
done
python3 bench/dense_gain_table.py "$out/eval"
