#!/usr/bin/env bash
# A single-node Garage (S3) server for mxrec's tests, bound to 127.0.0.1 only.
#
#   deploy/dev/garage.sh install # build the pinned garage into the cache if it is missing
#   deploy/dev/garage.sh start   # install if missing, configure, start, wait until ready,
#                                # lay out the node, create key + bucket `mxrec-test` (idempotent)
#   deploy/dev/garage.sh stop    # stop the server; objects and in-progress multipart uploads
#                                # stay on disk, so a later start resumes where it left off
#   deploy/dev/garage.sh env     # print the export lines tests read
#
# State (config, metadata, data, pid, log, credentials) lives in $MXREC_GARAGE_DIR, default
# ~/.cache/mxrec/garage-state. Ports: S3 $MXREC_GARAGE_S3_PORT (3900), RPC 3901, admin 3903.
set -euo pipefail

VERSION=2.5.0
ROOT=${MXREC_GARAGE_ROOT:-$HOME/.cache/mxrec/garage}
GARAGE=$ROOT/bin/garage
STATE=${MXREC_GARAGE_DIR:-$HOME/.cache/mxrec/garage-state}
S3_PORT=${MXREC_GARAGE_S3_PORT:-3900}
RPC_PORT=${MXREC_GARAGE_RPC_PORT:-3901}
ADMIN_PORT=${MXREC_GARAGE_ADMIN_PORT:-3903}
BUCKET=mxrec-test
KEY_NAME=mxrec-test-key
CONFIG=$STATE/garage.toml
PIDFILE=$STATE/garage.pid

log() { echo "garage.sh: $*" >&2; }

garage() { "$GARAGE" -c "$CONFIG" "$@"; }

hex() { od -An -N"$1" -tx1 /dev/urandom | tr -d ' \n'; }

install() {
    [[ -x $GARAGE ]] && return
    log "garage binary missing; building $VERSION into $ROOT (takes a while)"
    cargo install garage --version "$VERSION" --locked --root "$ROOT"
}

write_config() {
    mkdir -p "$STATE/meta" "$STATE/data"
    if [[ ! -f $STATE/credentials ]]; then
        # Key ids are "GK" + 24 hex digits, secrets 64 hex digits; generated once per state dir.
        umask 077
        cat >"$STATE/credentials" <<CRED
RPC_SECRET=$(hex 32)
ADMIN_TOKEN=$(hex 16)
KEY_ID=GK$(hex 12)
SECRET_KEY=$(hex 32)
CRED
    fi
    # shellcheck disable=SC1091
    source "$STATE/credentials"
    umask 077
    cat >"$CONFIG" <<CONF
metadata_dir = "$STATE/meta"
data_dir = "$STATE/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$RPC_PORT"
rpc_public_addr = "127.0.0.1:$RPC_PORT"
rpc_secret = "$RPC_SECRET"

[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$S3_PORT"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:$ADMIN_PORT"
admin_token = "$ADMIN_TOKEN"
CONF
}

running() { [[ -f $PIDFILE ]] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }

wait_for() { # seconds, command...
    local deadline=$((SECONDS + $1))
    shift
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            log "timed out waiting for: $*"
            tail -20 "$STATE/garage.log" >&2 || true
            return 1
        fi
        sleep 0.2
    done
}

healthy() { curl -fsS "http://127.0.0.1:$ADMIN_PORT/health"; }

start() {
    install
    write_config
    if ! running; then
        log "starting garage (state in $STATE)"
        RUST_LOG=${RUST_LOG:-garage=info} nohup "$GARAGE" -c "$CONFIG" server >>"$STATE/garage.log" 2>&1 &
        echo $! >"$PIDFILE"
    fi
    wait_for 60 garage status
    # Ask Garage itself whether a layout is applied (a marker file could outlive the metadata).
    if garage layout show 2>/dev/null | grep -q "Current cluster layout version: 0"; then
        local node
        node=$(garage node id -q | cut -d@ -f1)
        garage layout assign -z dc1 -c 1G "$node" >/dev/null
        garage layout apply --version 1 >/dev/null
    fi
    wait_for 60 healthy
    if ! garage key info "$KEY_NAME" >/dev/null 2>&1; then
        garage key import --yes -n "$KEY_NAME" "$KEY_ID" "$SECRET_KEY" >/dev/null
    fi
    if ! garage bucket info "$BUCKET" >/dev/null 2>&1; then
        garage bucket create "$BUCKET" >/dev/null
    fi
    garage bucket allow --read --write --owner "$BUCKET" --key "$KEY_NAME" >/dev/null
    # The S3 endpoint answers (403 without credentials) once it is serving.
    wait_for 30 curl -sS -o /dev/null "http://127.0.0.1:$S3_PORT/"
    log "ready: s3 http://127.0.0.1:$S3_PORT bucket $BUCKET"
}

stop() {
    if running; then
        local pid
        pid=$(cat "$PIDFILE")
        kill -TERM "$pid"
        for _ in $(seq 1 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
        log "stopped (pid $pid)"
    fi
    rm -f "$PIDFILE"
}

print_env() {
    write_config >/dev/null
    cat <<ENV
export MXREC_S3_ENDPOINT=http://127.0.0.1:$S3_PORT
export MXREC_S3_BUCKET=$BUCKET
export MXREC_S3_REGION=garage
export AWS_ACCESS_KEY_ID=$KEY_ID
export AWS_SECRET_ACCESS_KEY=$SECRET_KEY
ENV
}

case ${1:-} in
install) install ;;
start) start ;;
stop) stop ;;
env) print_env ;;
*) echo "usage: $0 install|start|stop|env" >&2; exit 2 ;;
esac
