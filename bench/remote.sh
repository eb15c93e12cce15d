#!/usr/bin/env bash
# The loader on a shard set in an S3 store against the same set on local disk, in one run. The store is
# moto's S3 server on loopback (scripts/moto-venv.sh): the network then costs nothing, so what the rows
# differ by is the client and the protocol, which are ours to answer for.
#
#   bench/remote.sh [INPUT] [SECONDS]   (defaults: ../shared/data/imagenet-sample/train, 12 s per row)
#
# Rows, each the loader's full pipeline (decode, views, points) with the default workers:
#   local            the packed folder
#   store, streamed  the S3 set with no cache: every epoch downloads every shard (every read is cold)
#   store, cached    the S3 set through a cache filled by one epoch before (every read is warm)
# and the first epoch of each (`loader soak --epochs 1`: local, and the store through an empty cache), and
# `shard verify` (every byte downloaded and hashed, no decode) on both, in MB/s.
set -euo pipefail
cd "$(dirname "$0")/.."
INPUT=${1:-../shared/data/imagenet-sample/train}
SECS=${2:-12}
cargo build --release -q -p loader -p shard
MOTO=$(scripts/moto-venv.sh)
WORK=$(mktemp -d)
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$MOTO" -H 127.0.0.1 -p "$PORT" >"$WORK/moto.log" 2>&1 &
MOTO_PID=$!
trap 'kill $MOTO_PID 2>/dev/null || true; rm -rf "$WORK"' EXIT
export AWS_ENDPOINT_URL=http://127.0.0.1:$PORT AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench \
  AWS_REGION=us-east-1
python3 - "$PORT" <<'PY'
import http.client, sys, time
for _ in range(300):
    try:
        c = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1])); c.request("PUT", "/bench")
        assert c.getresponse().status == 200
        break
    except OSError:
        time.sleep(0.2)
else:
    sys.exit("moto_server did not start")
PY
LOCAL=$WORK/set
URL=s3://bench/set
target/release/shard pack --input "$INPUT" --out "$URL" --stage "$LOCAL" --per-shard 64 --quiet >/dev/null
BENCH=(--preset paper-main --seconds "$SECS" --rounds 3)
pipeline() { target/release/loader bench --shards "$@" "${BENCH[@]}" | sed -n 's/^full pipeline: *\([0-9.]*\).*/\1/p'; }
first_epoch() { target/release/loader soak --epochs 1 --shards "$@" | sed -n 's/.*resident, [0-9]* images, \([0-9.]*\) images\/s/\1/p'; }
verify_mbs() {
  local t0 t1
  t0=$(date +%s.%N); target/release/shard verify "$1" >/dev/null; t1=$(date +%s.%N)
  python3 -c "import json,sys; print(round(json.load(open(sys.argv[1]))['total_bytes'] / 1e6 / ($t1 - $t0), 1))" \
    "$LOCAL/index.json"
}
echo "set: $(python3 -c "import json,sys; i=json.load(open(sys.argv[1])); print(i['total_samples'], 'images,', len(i['shards']), 'shards,', round(i['total_bytes']/1e6, 1), 'MB')" "$LOCAL/index.json")"
L1=$(first_epoch "$LOCAL")
S1=$(first_epoch "$URL" --cache-dir "$WORK/cache")
L=$(pipeline "$LOCAL")
S=$(pipeline "$URL")
C=$(pipeline "$URL" --cache-dir "$WORK/cache")
VL=$(verify_mbs "$LOCAL")
VS=$(verify_mbs "$URL")
ratio() { python3 -c "print(f'{$1 / $2:.2f}x')"; }
printf '%-38s %12s %8s\n' "row" "images/s" "vs local"
printf '%-38s %12s %8s\n' "first epoch, local" "$L1" "1.00x"
printf '%-38s %12s %8s\n' "first epoch, store, empty cache" "$S1" "$(ratio "$S1" "$L1")"
printf '%-38s %12s %8s\n' "pipeline, local" "$L" "1.00x"
printf '%-38s %12s %8s\n' "pipeline, store, streamed (cold)" "$S" "$(ratio "$S" "$L")"
printf '%-38s %12s %8s\n' "pipeline, store, cached (warm)" "$C" "$(ratio "$C" "$L")"
printf '%-38s %12s %8s\n' "shard verify MB/s, local" "$VL" "1.00x"
printf '%-38s %12s %8s\n' "shard verify MB/s, store" "$VS" "$(ratio "$VS" "$VL")"
