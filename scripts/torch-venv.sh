#!/usr/bin/env bash
# A Python virtual environment with PyTorch 2.9.0 (from PyPI, the only registry here; it brings the CUDA
# wheels, several GB, though only the CPU is used), torchvision 0.24.0 (its match), Pillow, safetensors,
# numpy, timm 1.0.31 (the export loaded into timm's ViTs) and tensorboard 2.21.0 (our event files read by
# its EventAccumulator): the PyTorch side of the export test (trainer/tests/export_pytorch.rs), of the parity fixture
# (trainer/tests/fixtures/make_reference.py) and of the multi-step test against the official code
# (trainer/tests/official_parity.rs: the official main_dino.py imports torchvision and PIL).
#
# Cached in ~/.cache/densedino/torch-venv (DENSEDINO_CACHE overrides ~/.cache/densedino). Prints the
# venv's python:
#
#   DENSEDINO_PYTHON=$(scripts/torch-venv.sh) cargo test --workspace --release --test export_pytorch -- --ignored
set -euo pipefail
CACHE=${DENSEDINO_CACHE:-$HOME/.cache/densedino}
VENV=$CACHE/torch-venv
PACKAGES=(torch==2.9.0 torchvision==0.24.0 pillow safetensors numpy timm==1.0.31 tensorboard==2.21.0)
if [ ! -f "$VENV/.complete" ] || ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  rm -rf "$VENV"
  python3 -m venv "$VENV" >&2
  "$VENV/bin/pip" install -q --disable-pip-version-check "${PACKAGES[@]}" >&2
  touch "$VENV/.complete"
elif ! "$VENV/bin/python" -c "import torch, torchvision, PIL, safetensors, numpy, timm, tensorboard" >/dev/null 2>&1; then
  # A venv from before a package was added: add it rather than download torch again.
  "$VENV/bin/pip" install -q --disable-pip-version-check "${PACKAGES[@]}" >&2
fi
echo "$VENV/bin/python"
