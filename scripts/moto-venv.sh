#!/usr/bin/env bash
# moto's S3 server (moto[server] 5.2.6 from PyPI) in a virtual environment: the S3-compatible store on
# loopback that the remote-set tests (trainer/tests/remote.rs) pack to, read from and break. It checks
# signatures only when asked (INITIAL_NO_AUTH_ACTION_COUNT=0), which the wrong-credentials test does.
#
# Cached in ~/.cache/densedino/moto-venv (DENSEDINO_CACHE overrides ~/.cache/densedino). Prints the path
# of moto_server:
#
#   DENSEDINO_MOTO=$(scripts/moto-venv.sh) cargo test --workspace --release --test remote -- --include-ignored
set -euo pipefail
CACHE=${DENSEDINO_CACHE:-$HOME/.cache/densedino}
VENV=$CACHE/moto-venv
if [ ! -f "$VENV/.complete" ] || [ ! -x "$VENV/bin/moto_server" ]; then
  rm -rf "$VENV"
  python3 -m venv "$VENV" >&2
  "$VENV/bin/pip" install -q --disable-pip-version-check "moto[server]==5.2.6" >&2
  touch "$VENV/.complete"
fi
echo "$VENV/bin/moto_server"
