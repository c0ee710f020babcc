#!/usr/bin/env bash
# `make demo`: records a sample call with the embedded defaults (SQLite catalog + local files under
# ./data) and prints where the results are. Two synthetic participants are made with FFmpeg:
# Alice (camera + a beep every second) for the whole 10 s, Bob joining 3 s in. Their media goes
# through the same path a live call's does — segment writer, spool, upload, catalog, manifest,
# composite — via `mxrec import`. Nothing is left running.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/../.."

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "demo: making two participants' media with FFmpeg (VP8 + Opus)"
ffmpeg -v error -y \
  -f lavfi -i "testsrc2=size=640x360:rate=30:duration=10" \
  -f lavfi -i "sine=frequency=880:sample_rate=48000:duration=10:beep_factor=4" \
  -c:v libvpx -b:v 800k -deadline realtime -cpu-used 8 -g 30 -c:a libopus -b:a 64k \
  "$work/alice.webm"
ffmpeg -v error -y \
  -f lavfi -i "smptebars=size=640x360:rate=30:duration=7" \
  -f lavfi -i "sine=frequency=440:sample_rate=48000:duration=7" \
  -c:v libvpx -b:v 800k -deadline realtime -cpu-used 8 -g 30 -c:a libopus -b:a 64k \
  "$work/bob.webm"

echo "demo: building mxrec"
cargo build --quiet --bin mxrec
mxrec="${CARGO_TARGET_DIR:-target}/debug/mxrec"

echo "demo: recording the call"
"$mxrec" import --room '!demo:localhost' \
  --participant "@alice:localhost#Alice=$work/alice.webm" \
  --participant "@bob:localhost#Bob=$work/bob.webm@3" | tee "$work/out.txt"

composite=$(sed -n 's/^composite: //p' "$work/out.txt" | head -n1)
echo
echo "demo: done. The composite is at: $composite"
echo "demo: list the catalog with: $mxrec recordings"
