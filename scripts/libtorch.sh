#!/usr/bin/env bash
# A CPU LibTorch 2.9.0 (what burn-tch 0.22.1 / tch 0.22 link against) assembled from PyPI wheels, because
# the only registry here is PyPI: the torch==2.9.0 wheel gives the headers, libtorch_cpu.so, libc10.so and
# libgomp; two small NVIDIA wheels give libcudart.so.12 and libcupti.so.12, which libtorch_cpu.so needs at
# load time (the profiler links them) even on the CPU. The wheel's libtorch.so would pull in the 1 GB CUDA
# library that the CPU path never uses, so an empty stub stands in for it.
#
# Cached in ~/.cache/densedino/libtorch-2.9.0-cpu (DENSEDINO_CACHE overrides ~/.cache/densedino). Prints
# the two export lines to eval:
#
#   eval "$(scripts/libtorch.sh)"
#   cargo test --release -p trainer --features tch
set -euo pipefail
CACHE=${DENSEDINO_CACHE:-$HOME/.cache/densedino}
DIR=$CACHE/libtorch-2.9.0-cpu
if [ ! -f "$DIR/.complete" ]; then
  mkdir -p "$CACHE/wheels"
  python3 -m pip download -q --no-deps -d "$CACHE/wheels" \
    torch==2.9.0 nvidia-cuda-runtime-cu12==12.8.90 nvidia-cuda-cupti-cu12==12.8.90 >&2
  rm -rf "$DIR.tmp" && mkdir -p "$DIR.tmp/lib"
  python3 - "$CACHE/wheels" "$DIR.tmp" <<'PY'
import glob, os, shutil, sys, zipfile
wheels, out = sys.argv[1], sys.argv[2]
def pick(pattern, wanted):
    (path,) = glob.glob(os.path.join(wheels, pattern))
    with zipfile.ZipFile(path) as z:
        for name in z.namelist():
            for prefix, dest in wanted:
                if name.startswith(prefix) and not name.endswith("/"):
                    target = os.path.join(out, dest + name[len(prefix):])
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                    with z.open(name) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst)
pick("torch-2.9.0-*.whl", [("torch/include/", "include/"), ("torch/lib/libtorch_cpu.so", "lib/libtorch_cpu.so"),
                           ("torch/lib/libc10.so", "lib/libc10.so"), ("torch/lib/libgomp", "lib/libgomp")])
pick("nvidia_cuda_runtime_cu12-*.whl", [("nvidia/cuda_runtime/lib/libcudart.so.12", "lib/libcudart.so.12")])
pick("nvidia_cuda_cupti_cu12-*.whl", [("nvidia/cuda_cupti/lib/libcupti.so.12", "lib/libcupti.so.12")])
PY
  # The stub for -ltorch; every symbol we use lives in libtorch_cpu.so.
  echo "" | gcc -shared -x c -o "$DIR.tmp/lib/libtorch.so" -
  echo "2.9.0" > "$DIR.tmp/build-version"
  rm -rf "$DIR" && mv "$DIR.tmp" "$DIR" && touch "$DIR/.complete"
fi
echo "export LIBTORCH=$DIR"
echo "export LD_LIBRARY_PATH=$DIR/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "unset LIBTORCH_USE_PYTORCH"
