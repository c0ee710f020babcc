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
exit "$status"
