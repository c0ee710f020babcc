#!/usr/bin/env bash
# Runs every test of the workspace against real servers on loopback: Garage (S3), PostgreSQL,
# Synapse (Matrix) and LiveKit with its MatrixRTC JWT service are started here, their coordinates
# exported, and all are stopped on exit whatever happens.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/../.."

# Synapse advertises the JWT service that livekit.sh runs: one URL for both.
export MXREC_RTC_SERVICE_PORT=${MXREC_RTC_SERVICE_PORT:-18090}
export MXREC_RTC_SERVICE_URL=http://127.0.0.1:$MXREC_RTC_SERVICE_PORT

cleanup() {
  "$here/livekit.sh" stop >/dev/null 2>&1 || true
  "$here/garage.sh" stop >/dev/null 2>&1 || true
  "$here/postgres.sh" stop >/dev/null 2>&1 || true
  "$here/synapse.sh" stop >/dev/null 2>&1 || true
}
trap cleanup EXIT

"$here/garage.sh" start
eval "$("$here/garage.sh" env)"
"$here/postgres.sh" start
eval "$("$here/postgres.sh" env)"
"$here/synapse.sh" start
eval "$("$here/synapse.sh" env)"
"$here/livekit.sh" start
eval "$("$here/livekit.sh" env)"

# make test runs every test: one whose server is missing fails instead of skipping.
export MXREC_REQUIRE_TEST_SERVERS=1
# The whole output is kept; on failure its panic messages are repeated at the end, where a CI log
# that shows only its tail still says why each failing test failed.
log=$(mktemp -t mxrec-test.XXXXXX.log)
status=0
cargo test --workspace --no-fail-fast -- --test-threads=2 2>&1 | tee "$log" || status=$?
if [ "$status" -ne 0 ]; then
  echo
  echo "=== test.sh: failed (exit $status); panic messages from $log ==="
  grep -a -A6 "panicked at" "$log" | cut -c1-400 | head -n 200 || true
fi

# The fuzz targets, each for a bounded time (FUZZ_SECONDS, 60 by default), built the quick way
# (no sanitizer, dev profile with overflow checks: a from-nothing build fits CI's budget; `make
# fuzz` builds the ASan release variant). Servers are not needed: stop them first.
# MXREC_SKIP_FUZZ=1 leaves this out.
cleanup
if [[ ${MXREC_SKIP_FUZZ:-} != 1 ]]; then
  fuzz_status=0
  MXREC_FUZZ_QUICK=1 FUZZ_SECONDS=${FUZZ_SECONDS:-60} bash "$here/fuzz.sh" || fuzz_status=$?
  if [ "$fuzz_status" -ne 0 ]; then
    echo "=== test.sh: a fuzz target failed (exit $fuzz_status) ==="
    [ "$status" -ne 0 ] || status=$fuzz_status
  fi
fi
exit "$status"
