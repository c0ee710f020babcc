#!/usr/bin/env bash
# Builds the cargo-fuzz targets in fuzz/ and runs each for FUZZ_SECONDS (docs/dev/fuzzing.md).
# Installs cargo-fuzz (nightly) into ~/.cargo/bin when it is missing. Exits non-zero when a target
# finds a crash (the input is then in fuzz/artifacts/<target>/) or does not build.
#
#   FUZZ_SECONDS=60               run time per target
#   FUZZ_TARGETS="sdp rtcp"       only these targets (default: all of `cargo fuzz list`)
#   MXREC_FUZZ_TARGET_DIR=...     the fuzz build's target dir (default ~/.cache/mxrec/fuzz-target)
#   MXREC_FUZZ_WORK_DIR=...       grown corpora and logs (default ~/.cache/mxrec/fuzz-work)
#   MXREC_FUZZ_QUICK=1            no sanitizer, dev profile (overflow checks on): the build
#                                 `make test` runs in CI, much cheaper than the ASan release build
#
# The seed corpus in fuzz/corpus/<target> is only read; what libFuzzer adds goes to the work dir,
# so runs build on each other without touching the clone.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/../.."

seconds=${FUZZ_SECONDS:-60}
target_dir=${MXREC_FUZZ_TARGET_DIR:-$HOME/.cache/mxrec/fuzz-target}
work=${MXREC_FUZZ_WORK_DIR:-$HOME/.cache/mxrec/fuzz-work}

if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "fuzz.sh: installing cargo-fuzz"
  cargo +nightly install cargo-fuzz --locked
fi

build_flags=()
if [[ ${MXREC_FUZZ_QUICK:-} == 1 ]]; then
  build_flags=(--sanitizer none --dev)
fi
start=$(date +%s)
cargo +nightly fuzz build "${build_flags[@]}" --target-dir "$target_dir"
echo "fuzz.sh: build took $(($(date +%s) - start)) s; $target_dir holds $(du -sh "$target_dir" | cut -f1)"

targets=${FUZZ_TARGETS:-$(cargo +nightly fuzz list)}
mkdir -p "$work/logs"
failed=()
summary=()
for t in $targets; do
  mkdir -p "$work/corpus/$t" "fuzz/artifacts/$t"
  dict=()
  [[ -f "fuzz/dicts/$t.dict" ]] && dict=("-dict=fuzz/dicts/$t.dict")
  log="$work/logs/$t.log"
  echo "fuzz.sh: $t for $seconds s (log: $log)"
  status=0
  cargo +nightly fuzz run "${build_flags[@]}" --target-dir "$target_dir" "$t" "$work/corpus/$t" "fuzz/corpus/$t" -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 "${dict[@]}" \
    >"$log" 2>&1 || status=$?
  # libFuzzer's last status line ("#N DONE cov: .. ft: .. corp: ..") and its final stats.
  last=$(grep -aE '^#[0-9]+[[:space:]]' "$log" | tail -n 1 || true)
  runs=$(grep -aoE 'stat::number_of_executed_units: +[0-9]+' "$log" | grep -oE '[0-9]+$' || true)
  rate=$(grep -aoE 'stat::average_exec_per_sec: +[0-9]+' "$log" | grep -oE '[0-9]+$' || true)
  rss=$(grep -aoE 'stat::peak_rss_mb: +[0-9]+' "$log" | grep -oE '[0-9]+$' || true)
  cov=$(grep -oE 'cov: [0-9]+' <<<"$last" | grep -oE '[0-9]+' || true)
  ft=$(grep -oE 'ft: [0-9]+' <<<"$last" | grep -oE '[0-9]+' || true)
  corp=$(grep -oE 'corp: [0-9]+/[0-9]+[a-zA-Z]*' <<<"$last" | cut -d' ' -f2 || true)
  line=$(printf '%-12s runs %-10s exec/s %-7s cov %-6s ft %-7s corpus %-10s peak RSS %s MB' \
    "$t" "${runs:-?}" "${rate:-?}" "${cov:-?}" "${ft:-?}" "${corp:-?}" "${rss:-?}")
  if [[ $status -ne 0 ]]; then
    line+="  FAILED (exit $status)"
    failed+=("$t")
    grep -aE 'panicked at|ERROR: |SUMMARY: |Test unit written to' "$log" | head -n 8 | sed 's/^/    /' || true
  fi
  echo "$line"
  summary+=("$line")
done

echo
echo "=== fuzz.sh: $seconds s per target ==="
printf '%s\n' "${summary[@]}"
if ((${#failed[@]})); then
  echo "fuzz.sh: crashes or failures in: ${failed[*]} (inputs in fuzz/artifacts/, logs in $work/logs/)" >&2
  exit 1
fi
