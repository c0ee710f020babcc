#!/usr/bin/env bash
# `make demo`: records a live 1:1 Matrix call on loopback and prints where the results are.
#
# A private Synapse (deploy/dev/synapse.sh) hosts two accounts: @rec, the recording bot, and
# @alice, the caller. `mxrec run` logs in as the bot with the embedded defaults for everything but
# [matrix], [webrtc] and [http], so the catalog is SQLite and the recordings are local files under
# ./data. Alice is tests/peers/matrix_caller.py: a plain-HTTP Matrix client with aiortc media (a
# frame counter, a white flash and a 1 kHz beep every second). She opens a DM with the bot, calls it
# for 10 s and hangs up; the bot records, composes the MP4 and posts the links, which this script
# prints with the composite's path on disk. Nothing is left running.
#
# The demo's Synapse is its own (state in $MXREC_DEMO_DIR/synapse, default ~/.cache/mxrec/demo,
# port $MXREC_DEMO_SYNAPSE_PORT, default 18018), so it neither collides with the tests' users nor
# stops a Synapse someone else started. What only makes sense with that database lives next to it:
# the two accounts' random passwords, made on the first run ($MXREC_DEMO_DIR/accounts), and the
# bot's Matrix session and stores ([matrix] store_dir = $MXREC_DEMO_DIR/bot-store); remove the
# whole directory to start over.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/../.."

state=${MXREC_DEMO_DIR:-$HOME/.cache/mxrec/demo}
export MXREC_SYNAPSE_DIR=$state/synapse
export MXREC_SYNAPSE_PORT=${MXREC_DEMO_SYNAPSE_PORT:-18018}
homeserver=http://127.0.0.1:$MXREC_SYNAPSE_PORT
bot=@rec:localhost
# The local store's directory in the embedded defaults (storage.root).
store_root=./data/recordings

work=$(mktemp -d)
mxrec_pid=

# SIGTERM, then up to 60 s for the bot to hang up and finalize, then SIGKILL; returns its status.
stop_mxrec() {
  local status=0
  kill -TERM "$mxrec_pid" 2>/dev/null || true
  for _ in $(seq 1 300); do
    kill -0 "$mxrec_pid" 2>/dev/null || break
    sleep 0.2
  done
  if kill -0 "$mxrec_pid" 2>/dev/null; then
    echo "demo: mxrec (pid $mxrec_pid) still running 60 s after SIGTERM; sending SIGKILL" >&2
    kill -KILL "$mxrec_pid" 2>/dev/null || true
  fi
  wait "$mxrec_pid" || status=$?
  mxrec_pid=
  return "$status"
}

cleanup() {
  [[ -z $mxrec_pid ]] || stop_mxrec || true
  "$here/synapse.sh" stop || true
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Says what failed, shows the end of the bot's log, and exits (cleanup runs on EXIT). The caller's
# diagnostics are already on the terminal.
fail() {
  echo "demo: $*" >&2
  if [[ -s $work/mxrec.log ]]; then
    echo "demo: last lines of the bot's log:" >&2
    tail -n 40 "$work/mxrec.log" >&2
  fi
  exit 1
}

echo "demo: preparing the aiortc venv and a private Synapse (first run installs both: a few minutes)"
py=$("$here/pyenv.sh")
"$here/synapse.sh" start
mkdir -p "$state"
if [[ ! -s $state/accounts ]]; then
  rand() { od -An -N18 -tx1 /dev/urandom | tr -d ' \n'; }
  (umask 077; printf 'bot_password=%s\ncaller_password=%s\n' "$(rand)" "$(rand)" >"$state/accounts")
fi
# shellcheck source=/dev/null
source "$state/accounts"
"$here/synapse.sh" register rec "$bot_password" \
  || fail "cannot register $bot (if $state was partly removed, remove all of it and retry)"
"$here/synapse.sh" register alice "$caller_password" \
  || fail "cannot register @alice:localhost (if $state was partly removed, remove all of it and retry)"

echo "demo: building mxrec"
cargo build --quiet --bin mxrec
mxrec=${CARGO_TARGET_DIR:-target}/debug/mxrec

http_port=$("$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
config=$work/mxrec.toml
cat >"$config" <<TOML
# Everything not set here keeps the embedded defaults: SQLite catalog and local files under ./data.
[matrix]
homeserver = "$homeserver"
user = "$bot"
password = "$bot_password"
device_name = "mxrec demo"
allowed_inviters = ["@alice:localhost"]
store_dir = "$state/bot-store"

[webrtc]
bind_addrs = ["127.0.0.1:0"]

[http]
bind = "127.0.0.1:$http_port"
public_url = "http://127.0.0.1:$http_port"
TOML

echo "demo: starting the bot: $mxrec --config $config run"
"$mxrec" --config "$config" run >"$work/mxrec.out" 2>"$work/mxrec.log" &
mxrec_pid=$!
# The first run logs in and creates the bot's stores; later runs restore its session.
for _ in $(seq 1 600); do
  grep -q '^bot: ' "$work/mxrec.out" && break
  kill -0 "$mxrec_pid" 2>/dev/null || fail "mxrec exited before its bot was ready"
  sleep 0.2
done
grep -q '^bot: ' "$work/mxrec.out" || fail "mxrec printed no 'bot:' line within 120 s"
echo "demo: $(grep -m1 '^bot: ' "$work/mxrec.out")"

echo "demo: alice calls the bot for 10 s"
"$py" tests/peers/matrix_caller.py --homeserver "$homeserver" --user alice --password "$caller_password" \
  --bot "$bot" --seconds 10 --wait-links 180 >"$work/call.json" \
  || fail "the call was not recorded: $("$py" -c 'import json, sys; print(json.load(sys.stdin)["error"])' \
                                          <"$work/call.json" 2>/dev/null || echo "the caller printed no result")"

links=$("$py" -c 'import json, sys; print(json.load(open(sys.argv[1]))["links_notice"]["body"])' "$work/call.json")
echo
echo "demo: the bot posted in the room:"
sed 's/^/    /' <<<"$links"
echo

# The message's "Composite (...): URL" line, and its last line "Links expire ... Recording ID."
composite_url=$(grep -m1 '^Composite' <<<"$links" | grep -oE 'https?://[^ ]+/r/[A-Za-z0-9_-]{43}' || true)
recording_id=$(sed -nE 's/.*Recording ([^ ]+)\.$/\1/p' <<<"$links" | tail -n1)
[[ -n $composite_url ]] || fail "the links message has no Composite line with a link"
[[ -n $recording_id ]] || fail "the links message names no recording id"
fetched=$(curl -fsS -o /dev/null -w '%{http_code}, %{size_download} bytes' "$composite_url") \
  || fail "fetching the composite link $composite_url failed"
echo "demo: fetched the composite link while the bot runs: HTTP $fetched"

echo "demo: stopping the bot (SIGTERM)"
status=0
stop_mxrec || status=$?
((status == 0)) || fail "mxrec exited with status $status after SIGTERM"

row=$("$mxrec" --config "$config" recordings | awk -v id="$recording_id" '$1 == id') || fail "mxrec recordings failed"
[[ -n $row ]] || fail "recording $recording_id is not in the catalog"
echo "demo: in the catalog (mxrec recordings): $row"
manifest=$store_root/$(awk '{print $NF}' <<<"$row")
[[ -f $manifest ]] || fail "manifest $manifest not found"
composite=$("$py" -c 'import json, sys; print(next(o["key"] for o in json.load(open(sys.argv[1]))["outputs"]))' "$manifest") \
  || fail "manifest $manifest lists no composite output"
composite=$(realpath "$store_root/$composite")
[[ -f $composite ]] || fail "composite $composite not found"

echo
echo "demo: done. The composite is at: $composite"
echo "demo: its manifest (every track and segment): $(realpath "$manifest")"
echo "demo: the links above need a running server; their tokens work with any on this catalog:"
echo "demo:   $mxrec serve   (then use http://127.0.0.1:8080/r/<token>)"
