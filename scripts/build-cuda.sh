#!/usr/bin/env bash
# Builds `dist/trainer-cuda`: the trainer with burn-tch linked against the PyPI torch==2.11.0 wheel (CUDA 13),
# for a GPU machine that has PyTorch 2.11 in a Python environment but no LibTorch and no Rust toolchain.
# tch 0.22 expects LibTorch 2.9; the 2.11 headers compile with the version check bypassed, and the wheel's
# libraries link with --allow-shlib-undefined (their CUDA dependencies resolve on the GPU machine).
# At run time that machine needs its `torch/lib` and `nvidia/cu13/lib` folders on LD_LIBRARY_PATH
# (scripts/run-cuda.sh finds them).
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${DENSEDINO_CACHE:-$HOME/.cache/densedino}
DIR=$CACHE/libtorch-2.11.0-cu13
if [ ! -f "$DIR/.complete" ]; then
  mkdir -p "$CACHE/wheels"
  python3 -m pip download -q --no-deps -d "$CACHE/wheels" torch==2.11.0 >&2
  rm -rf "$DIR.tmp" && mkdir -p "$DIR.tmp/lib"
  python3 - "$CACHE/wheels" "$DIR.tmp" <<'PY'
import glob, os, shutil, sys, zipfile
wheels, out = sys.argv[1], sys.argv[2]
(path,) = glob.glob(os.path.join(wheels, "torch-2.11.0-*.whl"))
libs = {"libtorch_cpu.so", "libtorch_cuda.so", "libc10.so", "libc10_cuda.so", "libtorch.so"}
with zipfile.ZipFile(path) as z:
    for name in z.namelist():
        if name.endswith("/"):
            continue
        if name.startswith("torch/include/"):
            target = os.path.join(out, "include", name[len("torch/include/"):])
        elif name.startswith("torch/lib/") and os.path.basename(name) in libs:
            target = os.path.join(out, "lib", os.path.basename(name))
        else:
            continue
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with z.open(name) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
PY
  rm -rf "$DIR" && mv "$DIR.tmp" "$DIR" && touch "$DIR/.complete"
fi
export LIBTORCH=$DIR LIBTORCH_BYPASS_VERSION_CHECK=1
unset LIBTORCH_USE_PYTORCH
# Only the final link needs the flag; RUSTFLAGS would rebuild every crate.
# A target folder of its own, so that the CPU LibTorch build in target/ is not rebuilt back and forth.
TARGET=${CUDA_TARGET_DIR:-target/cuda}
cargo rustc --release --target-dir "$TARGET" -p trainer --bin trainer --features tch -- -C link-arg=-Wl,--allow-shlib-undefined
mkdir -p dist && cp "$TARGET/release/trainer" dist/trainer-cuda
strip dist/trainer-cuda  # travels to the GPU machine: line tables are dead weight there
echo "dist/trainer-cuda: $(du -h dist/trainer-cuda | cut -f1)"
