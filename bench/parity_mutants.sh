#!/usr/bin/env bash
# The mutant check of the parity test against the official loop (trainer/tests/official_parity.rs): each
# mutant injects one bug, on the official side (DENSEDINO_PARITY_OFFICIAL_MUTANT: a wrapper in
# fixtures/official_steps.py, the official files untouched) or on ours (DENSEDINO_PARITY_MUTANT: a --set
# of our config only), and runs the scenario that must catch it. A mutant is "caught" when that scenario
# fails on a comparison (drift, AdamW state), not on a crash, and only after the same scenario passed
# without it. Prints one line per scenario and mutant and exits non-zero if any mutant got through. About
# two to five minutes a run on two cores. The fp16 scenario runs our side on LibTorch (the `tch` feature,
# LibTorch from scripts/libtorch.sh).
#
#   bench/parity_mutants.sh            # every mutant
#   bench/parity_mutants.sh noclip     # the ones named
set -uo pipefail
cd "$(dirname "$0")/.."
PY=$(scripts/torch-venv.sh)
# name | scenario (test name) | variable=value
MUTANTS=(
  "noclip|a_gradient_clip_that_cuts_every_step_matches_the_official_clip|DENSEDINO_PARITY_OFFICIAL_MUTANT=noclip"
  "our-clip-removed|a_gradient_clip_that_cuts_every_step_matches_the_official_clip|DENSEDINO_PARITY_MUTANT=optim.clip_grad=0"
  "nodecay_pos|every_switch_the_first_scenario_leaves_off_matches_the_official_loop|DENSEDINO_PARITY_OFFICIAL_MUTANT=nodecay_pos"
  "ref_token_nodecay|every_switch_the_first_scenario_leaves_off_matches_the_official_loop|DENSEDINO_PARITY_OFFICIAL_MUTANT=ref_token_nodecay"
  "drop_noscale|every_switch_the_first_scenario_leaves_off_matches_the_official_loop|DENSEDINO_PARITY_OFFICIAL_MUTANT=drop_noscale"
  "freeze_one_more|every_switch_the_first_scenario_leaves_off_matches_the_official_loop|DENSEDINO_PARITY_OFFICIAL_MUTANT=freeze_one_more"
  "our-norm-last-layer|every_switch_the_first_scenario_leaves_off_matches_the_official_loop|DENSEDINO_PARITY_MUTANT=head.norm_last_layer=true"
  "our-all-crop-ref-off|every_switch_the_first_scenario_leaves_off_matches_the_official_loop|DENSEDINO_PARITY_MUTANT=loss.use_all_crop_ref=false"
  "our-mask-eye|every_switch_the_first_scenario_leaves_off_matches_the_official_loop|DENSEDINO_PARITY_MUTANT=model.mask_mode=\"all2pos_pos2cls_eye\""
  "scaler_noskip|fp16_with_overflows_matches_the_official_gradscaler|DENSEDINO_PARITY_OFFICIAL_MUTANT=scaler_noskip"
  "scaler_count|fp16_with_overflows_matches_the_official_gradscaler|DENSEDINO_PARITY_OFFICIAL_MUTANT=scaler_count"
)
CAUGHT="drifted|AdamW step counts differ|tensors with AdamW state|loss scales or the skipped steps differ|clip norms differ"
eval "$(scripts/libtorch.sh)"
# The f32 scenarios in the workspace's feature set (what `cargo test --workspace --release` built: nothing is
# compiled again), the half-precision ones with LibTorch.
features() { case $1 in fp16_*|bf16_*) echo "-p trainer --features tch" ;; *) echo "--workspace" ;; esac; }
cargo build --release --workspace --tests >/dev/null 2>&1 || { echo "build failed" >&2; exit 1; }
selected=()
for m in "${MUTANTS[@]}"; do
  IFS='|' read -r name _ _ <<<"$m"
  if [ $# -eq 0 ] || [[ " $* " == *" $name "* ]]; then selected+=("$m"); fi
done
# Each scenario once without a mutant first: one that already fails here would make every mutant look caught.
for test in $(printf '%s\n' "${selected[@]}" | cut -d'|' -f2 | sort -u); do
  start=$(date +%s)
  # shellcheck disable=SC2046
  if ! DENSEDINO_PYTHON="$PY" cargo test --release $(features "$test") --test official_parity -- \
      --ignored --nocapture --test-threads=1 --exact "$test" >/dev/null 2>&1; then
    echo "baseline $test fails without a mutant: the mutants would prove nothing" >&2
    exit 2
  fi
  printf '%-22s %-14s %4ss  %s\n' "(no mutant)" passes "$(($(date +%s) - start))" "$test"
done
escaped=0
for m in "${selected[@]}"; do
  IFS='|' read -r name test var <<<"$m"
  log=$(mktemp)
  start=$(date +%s)
  # shellcheck disable=SC2046
  env "$var" DENSEDINO_PYTHON="$PY" cargo test --release $(features "$test") --test official_parity \
    -- --ignored --nocapture --test-threads=1 --exact "$test" >"$log" 2>&1
  rc=$?
  why=$(grep -m1 -E "$CAUGHT" "$log" | sed 's/^.*panicked at [^:]*:[0-9]*:[0-9]*: *//')
  [ -n "$why" ] || why=$(grep -m1 -A1 "panicked at" "$log" | tail -1)
  if [ $rc -ne 0 ] && grep -qE "$CAUGHT" "$log"; then
    verdict=caught
  else
    verdict="NOT CAUGHT (rc $rc)"; escaped=1
  fi
  printf '%-22s %-14s %4ss  %s\n' "$name" "$verdict" "$(($(date +%s) - start))" "${why:0:160}"
  rm -f "$log"
done
exit $escaped
