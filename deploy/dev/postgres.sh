#!/usr/bin/env bash
# A private Postgres cluster for mxrec's tests: loopback only, trust auth, database `mxrec_test`.
#
#   deploy/dev/postgres.sh start   # initdb on first use, start, create the database (idempotent)
#   deploy/dev/postgres.sh stop    # stop; data stays on disk
#   deploy/dev/postgres.sh env     # print `export MXREC_TEST_POSTGRES_URL=...`
#
# State lives in $MXREC_POSTGRES_DIR (default ~/.cache/mxrec/postgres-state, or
# /var/tmp/mxrec-postgres when run as root, because the cluster then runs as the `postgres` user,
# which initdb requires and which cannot enter root's home). The port is chosen once (from
# $MXREC_POSTGRES_PORT, default 55432, else the next free one) and remembered in the state dir.
set -euo pipefail

PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
if [[ $(id -u) -eq 0 ]]; then
    STATE=${MXREC_POSTGRES_DIR:-/var/tmp/mxrec-postgres}
    RUN_AS=(runuser -u postgres --)
    OWNER=postgres
else
    STATE=${MXREC_POSTGRES_DIR:-$HOME/.cache/mxrec/postgres-state}
    RUN_AS=()
    OWNER=$(id -un)
fi
DATA=$STATE/data
DB=mxrec_test

as_owner() { "${RUN_AS[@]}" "$@"; }

port_in_use() { ss -Htln "sport = :$1" | grep -q .; }

port() {
    if [[ ! -f $STATE/port ]]; then
        local p=${MXREC_POSTGRES_PORT:-55432}
        while port_in_use "$p"; do p=$((p + 1)); done
        echo "$p" >"$STATE/port"
    fi
    cat "$STATE/port"
}

running() { [[ -f $DATA/postmaster.pid ]] && as_owner "$PG_BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; }

url() { echo "postgres://$OWNER@127.0.0.1:$(port)/$DB"; }

start() {
    mkdir -p "$STATE"
    [[ -n ${RUN_AS[*]} ]] && chown "$OWNER" "$STATE"
    local p
    p=$(port)
    if [[ ! -f $DATA/PG_VERSION ]]; then
        as_owner "$PG_BIN/initdb" -D "$DATA" -U "$OWNER" --auth=trust --encoding=UTF8 --no-locale >"$STATE/initdb.log"
    fi
    if ! running; then
        # Listen on loopback only; the socket goes into the state dir, not /var/run/postgresql.
        as_owner "$PG_BIN/pg_ctl" -D "$DATA" -l "$STATE/postgres.log" -w -t 60 \
            -o "-c listen_addresses=127.0.0.1 -p $p -k $STATE -c fsync=off" start >/dev/null
    fi
    for _ in $(seq 1 60); do
        as_owner "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$p" && break
        sleep 0.5
    done
    if ! as_owner "$PG_BIN/psql" -h 127.0.0.1 -p "$p" -U "$OWNER" -d postgres -tAc \
        "SELECT 1 FROM pg_database WHERE datname = '$DB'" | grep -q 1; then
        as_owner "$PG_BIN/createdb" -h 127.0.0.1 -p "$p" -U "$OWNER" "$DB"
    fi
    echo "postgres running at $(url)" >&2
}

stop() {
    if running; then
        as_owner "$PG_BIN/pg_ctl" -D "$DATA" -m fast -w stop >/dev/null
    fi
    echo "postgres stopped" >&2
}

case ${1:-} in
start) start ;;
stop) stop ;;
env) mkdir -p "$STATE"; echo "export MXREC_TEST_POSTGRES_URL=$(url)" ;;
*) echo "usage: $0 start|stop|env" >&2; exit 2 ;;
esac
