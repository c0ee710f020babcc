#!/usr/bin/env bash
# A LiveKit SFU and a MatrixRTC JWT service for mxrec's MatrixRTC tests, both on loopback only.
#
#   deploy/dev/livekit.sh build   # build the pinned livekit-server into the cache if it is missing
#   deploy/dev/livekit.sh start   # build if missing, configure, start livekit-server and the JWT
#                                 # stand-in, wait until both answer (idempotent)
#   deploy/dev/livekit.sh stop    # stop both (pid files); nothing else is kept between runs
#   deploy/dev/livekit.sh env     # print `export MXREC_TEST_LIVEKIT_URL=... MXREC_TEST_LIVEKIT_KEY=...
#                                 #   MXREC_TEST_LIVEKIT_SECRET=... MXREC_TEST_RTC_SERVICE_URL=...`
#
# livekit-server is built from source with `go install` (Go >= 1.26: `go` on PATH, else
# /usr/local/go/bin/go) into $MXREC_LIVEKIT_ROOT (default ~/.cache/mxrec/livekit) as
# livekit-server-v1.13.5; GOPATH, module and build caches live in $MXREC_GO_DIR (default
# ~/.cache/mxrec/go). It runs from a YAML config that keeps it on 127.0.0.1: loopback ICE candidates
# only, no public STUN in its JoinResponse (stun_servers points at a dead loopback port), rooms
# created on join. Ports: HTTP/WebSocket/Twirp $MXREC_LIVEKIT_PORT (17880), ICE/TCP
# $MXREC_LIVEKIT_TCP_PORT (17881; livekit binds it on every interface), ICE/UDP mux
# $MXREC_LIVEKIT_UDP_PORT (17882).
#
# The JWT service is tests/peers/lk_jwt_standin.py, a stand-in for Element's lk-jwt-service (which
# cannot be installed here), on http://127.0.0.1:$MXREC_RTC_SERVICE_PORT (18090); synapse.sh
# advertises the same URL ($MXREC_RTC_SERVICE_URL) as the homeserver's MatrixRTC transport. It
# checks OpenID tokens against the homeservers in $MXREC_RTC_HOMESERVERS (space-separated
# NAME=URL; default localhost=$MXREC_TEST_HOMESERVER, else http://127.0.0.1:$MXREC_SYNAPSE_PORT:
# synapse.sh's Synapse) and creates LiveKit rooms for users of $MXREC_RTC_FULL_ACCESS_HOMESERVERS
# (default `*`). It runs on the interop venv's python ($MXREC_TEST_PYTHON, else what
# deploy/dev/pyenv.sh prints).
#
# State (config, generated API secret, pids, logs) lives in $MXREC_LIVEKIT_DIR (default
# ~/.cache/mxrec/livekit-state). The API key is $MXREC_LIVEKIT_KEY (default devkey); its secret is
# generated once per state dir. Every command is quiet on success; failures say what went wrong on
# stderr and exit non-zero.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

VERSION=1.13.5
MODULE=github.com/livekit/livekit-server
ROOT=${MXREC_LIVEKIT_ROOT:-$HOME/.cache/mxrec/livekit}
BIN=$ROOT/livekit-server-v$VERSION
BUILD_LOG=$ROOT/build.log
GO_DIR=${MXREC_GO_DIR:-$HOME/.cache/mxrec/go}
STATE=${MXREC_LIVEKIT_DIR:-$HOME/.cache/mxrec/livekit-state}
PORT=${MXREC_LIVEKIT_PORT:-17880}
TCP_PORT=${MXREC_LIVEKIT_TCP_PORT:-17881}
UDP_PORT=${MXREC_LIVEKIT_UDP_PORT:-17882}
KEY=${MXREC_LIVEKIT_KEY:-devkey}
RTC_PORT=${MXREC_RTC_SERVICE_PORT:-18090}
RTC_URL=http://127.0.0.1:$RTC_PORT
HOMESERVERS=${MXREC_RTC_HOMESERVERS:-localhost=${MXREC_TEST_HOMESERVER:-http://127.0.0.1:${MXREC_SYNAPSE_PORT:-18008}}}
FULL_ACCESS=${MXREC_RTC_FULL_ACCESS_HOMESERVERS:-*}
CONFIG=$STATE/livekit.yaml
SECRET_FILE=$STATE/api-secret
LK_PID=$STATE/livekit.pid
LK_LOG=$STATE/livekit.log
JWT_PID=$STATE/jwt-standin.pid
JWT_LOG=$STATE/jwt-standin.log
STANDIN=$here/../../tests/peers/lk_jwt_standin.py

die() { echo "livekit.sh: $*" >&2; exit 1; }

# synapse.sh advertises $MXREC_RTC_SERVICE_URL; refuse to serve somewhere else.
if [[ -n ${MXREC_RTC_SERVICE_URL:-} && ${MXREC_RTC_SERVICE_URL%/} != "$RTC_URL" ]]; then
    die "MXREC_RTC_SERVICE_URL=$MXREC_RTC_SERVICE_URL but the JWT service would listen on $RTC_URL; set MXREC_RTC_SERVICE_PORT to match"
fi

find_go() {
    local go
    go=$(command -v go || true)
    [[ -n $go ]] || go=/usr/local/go/bin/go
    [[ -x $go ]] || die "Go not found (neither on PATH nor at /usr/local/go/bin/go); livekit-server $VERSION needs Go >= 1.26 (https://go.dev/dl/)"
    local v
    v=$("$go" env GOVERSION 2>/dev/null) || die "$go does not run"
    # go1.26.8 -> 1 26; livekit-server's go.mod says `go 1.26`, and GOTOOLCHAIN=local forbids
    # fetching another toolchain.
    if [[ ! $v =~ ^go([0-9]+)\.([0-9]+) ]] || ((BASH_REMATCH[1] == 1 && BASH_REMATCH[2] < 26)); then
        die "$go is $v; livekit-server $VERSION needs Go >= 1.26"
    fi
    echo "$go"
}

build() {
    [[ -x $BIN ]] && return
    local go tmp
    go=$(find_go)
    mkdir -p "$ROOT" "$GO_DIR"
    echo "livekit.sh: building livekit-server $VERSION into $BIN (first run only; several minutes)" >&2
    # Into a private GOBIN first, then renamed: whoever waits for $BIN never sees half a file.
    tmp=$(mktemp -d "$ROOT/.gobin.XXXXXX")
    if ! env GOPATH="$GO_DIR" GOMODCACHE="$GO_DIR/pkg/mod" GOCACHE="$GO_DIR/cache" GOBIN="$tmp" \
        GOFLAGS=-modcacherw GOTOOLCHAIN=local \
        "$go" install "$MODULE/cmd/server@v$VERSION" >"$BUILD_LOG" 2>&1; then
        rm -rf "$tmp"
        die "go install $MODULE/cmd/server@v$VERSION failed; see $BUILD_LOG"
    fi
    mv "$tmp/server" "$BIN"
    rmdir "$tmp"
}

secret() {
    if [[ ! -s $SECRET_FILE ]]; then
        mkdir -p "$STATE"
        # 64 hex digits: livekit-server logs an error for secrets shorter than 32 characters.
        (umask 077; od -An -N32 -tx1 /dev/urandom | tr -d ' \n' >"$SECRET_FILE")
    fi
    cat "$SECRET_FILE"
}

configure() {
    mkdir -p "$STATE"
    local s
    s=$(secret)
    (umask 077; cat >"$CONFIG" <<YAML
port: $PORT
bind_addresses: ["127.0.0.1"]
keys:
  $KEY: $s
rtc:
  udp_port: $UDP_PORT
  tcp_port: $TCP_PORT
  use_external_ip: false
  node_ip: 127.0.0.1
  enable_loopback_candidate: true
  ips:
    includes: ["127.0.0.1/32"]
  # Nothing listens there: keeps the public default STUN servers out of JoinResponse.ice_servers.
  stun_servers: ["127.0.0.1:3478"]
room:
  auto_create: true
YAML
    )
}

pid_of() { [[ -s $1 ]] && cat "$1"; }

alive() {
    local p
    p=$(pid_of "$1") || return 1
    kill -0 "$p" 2>/dev/null
}

tcp_in_use() { ss -Htln "sport = :$1" | grep -q .; }
udp_in_use() { ss -Huln "sport = :$1" | grep -q .; }

lk_healthy() { [[ $(curl -fsS --max-time 2 "http://127.0.0.1:$PORT/" 2>/dev/null) == OK ]]; }
jwt_healthy() { curl -fsS --max-time 2 -o /dev/null "$RTC_URL/healthz" 2>/dev/null; }

wait_healthy() { # name pidfile log check
    local name=$1 pidfile=$2 log=$3 check=$4
    for _ in $(seq 1 120); do
        "$check" && return
        alive "$pidfile" || die "$name exited during startup; last lines of $log:
$(tail -n 20 "$log" 2>/dev/null)"
        sleep 0.25
    done
    die "$name (pid $(pid_of "$pidfile")) not ready after 30 s; see $log"
}

start_livekit() {
    if alive "$LK_PID"; then
        lk_healthy && return
    else
        rm -f "$LK_PID"
        (cd "$STATE" && exec setsid "$BIN" --config "$CONFIG" >>"$LK_LOG" 2>&1 </dev/null) &
        echo $! >"$LK_PID"
    fi
    wait_healthy livekit-server "$LK_PID" "$LK_LOG" lk_healthy
}

start_jwt() {
    if alive "$JWT_PID"; then
        jwt_healthy && return
    else
        rm -f "$JWT_PID"
        local py s hs args=()
        py=${MXREC_TEST_PYTHON:-$("$here/pyenv.sh")} || die "no python for the JWT stand-in (deploy/dev/pyenv.sh failed)"
        for hs in $HOMESERVERS; do args+=(--homeserver "$hs"); done
        s=$(secret)
        # Key and secret go through the environment so they do not show in `ps`.
        (cd "$STATE" && LIVEKIT_KEY=$KEY LIVEKIT_SECRET=$s exec setsid "$py" "$STANDIN" \
            --port "$RTC_PORT" --livekit-url "ws://127.0.0.1:$PORT" \
            --full-access-homeservers "$FULL_ACCESS" "${args[@]}" \
            >>"$JWT_LOG" 2>&1 </dev/null) &
        echo $! >"$JWT_PID"
    fi
    wait_healthy "JWT stand-in" "$JWT_PID" "$JWT_LOG" jwt_healthy
}

# Before starting anything, so a taken port does not leave half of the pair running.
check_ports() {
    if ! alive "$LK_PID"; then
        tcp_in_use "$PORT" && die "TCP port $PORT is taken by another process; set MXREC_LIVEKIT_PORT"
        tcp_in_use "$TCP_PORT" && die "TCP port $TCP_PORT is taken by another process; set MXREC_LIVEKIT_TCP_PORT"
        udp_in_use "$UDP_PORT" && die "UDP port $UDP_PORT is taken by another process; set MXREC_LIVEKIT_UDP_PORT"
    fi
    if ! alive "$JWT_PID"; then
        tcp_in_use "$RTC_PORT" && die "TCP port $RTC_PORT is taken by another process; set MXREC_RTC_SERVICE_PORT (and MXREC_RTC_SERVICE_URL for synapse.sh)"
    fi
    return 0
}

start() {
    build
    configure
    check_ports
    start_livekit
    start_jwt
}

stop_one() { # pidfile name
    if alive "$1"; then
        local p
        p=$(pid_of "$1")
        kill "$p"
        for _ in $(seq 1 80); do
            kill -0 "$p" 2>/dev/null || break
            sleep 0.25
        done
        if kill -0 "$p" 2>/dev/null; then
            echo "livekit.sh: $2 (pid $p) ignored SIGTERM for 20 s; sending SIGKILL" >&2
            kill -9 "$p" 2>/dev/null || true
        fi
    fi
    rm -f "$1"
}

stop() {
    stop_one "$JWT_PID" "JWT stand-in"
    stop_one "$LK_PID" livekit-server
}

case ${1:-} in
build) build ;;
start) start ;;
stop) stop ;;
env) echo "export MXREC_TEST_LIVEKIT_URL=ws://127.0.0.1:$PORT MXREC_TEST_LIVEKIT_KEY=$KEY MXREC_TEST_LIVEKIT_SECRET=$(secret) MXREC_TEST_RTC_SERVICE_URL=$RTC_URL" ;;
*) echo "usage: $0 build|start|stop|env" >&2; exit 2 ;;
esac
