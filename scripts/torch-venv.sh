#!/usr/bin/env bash
# A Python virtual environment with PyTorch 2.9.0 (from PyPI, the only registry here; it brings the CUDA
# wheels, several GB, though only the CPU is used), safetensors and numpy: the PyTorch side of the export
# test (trainer/tests/export_pytorch.rs) and of the parity fixture (trainer/tests/fixtures/make_reference.py).
#
# Cached in ~/.cache/densedino/torch-venv (DENSEDINO_CACHE overrides ~/.cache/densedino). Prints the
# venv's python:
#
#   DENSEDINO_PYTHON=$(scripts/torch-venv.sh) cargo test --release -p trainer --test export_pytorch -- --ignored
set -euo pipefail
CACHE=${DENSEDINO_CACHE:-$HOME/.cache/densedino}
VENV=$CACHE/torch-venv
if [ ! -f "$VENV/.complete" ] || ! "$VENV/bin/python" -c "import torch, safetensors" >/dev/null 2>&1; then
  rm -rf "$VENV"
  python3 -m venv "$VENV" >&2
  "$VENV/bin/pip" install -q --disable-pip-version-check torch==2.9.0 safetensors numpy >&2
  touch "$VENV/.complete"
fi
echo "$VENV/bin/python"
