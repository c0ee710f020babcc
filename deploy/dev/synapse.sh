#!/usr/bin/env bash
# A private Synapse homeserver for mxrec's Matrix tests: SQLite, loopback only, no federation key
# servers, no stats, rate limits lifted, registration only through the shared-secret admin API.
#
#   deploy/dev/synapse.sh start                  # install if missing, configure, start, wait on /health
#   deploy/dev/synapse.sh stop                   # stop it (pid file); state stays on disk
#   deploy/dev/synapse.sh env                    # print `export MXREC_TEST_HOMESERVER=... MXREC_TEST_SYNAPSE_SECRET=...`
#   deploy/dev/synapse.sh register USER PASSWORD # create @USER:localhost (idempotent; an existing
#                                                # user must have that password)
#
# Synapse comes from PyPI (pinned below) into a venv at $MXREC_SYNAPSE_VENV (default
# ~/.cache/mxrec/synapse-venv), installed when missing or at another version. State (generated
# config, signing key, SQLite database, media, log, pid, shared secret) lives in $MXREC_SYNAPSE_DIR
# (default ~/.cache/mxrec/synapse-state). The client port is $MXREC_SYNAPSE_PORT (default 18008).
# MatrixRTC is on: MSC4143 (`/_matrix/client/unstable/org.matrix.msc4143/rtc/transports` and
# `org.matrix.msc4143.rtc_foci` in /.well-known/matrix/client, both naming one LiveKit JWT service
# at $MXREC_RTC_SERVICE_URL, default http://127.0.0.1:$MXREC_RTC_SERVICE_PORT = 18090, which
# deploy/dev/livekit.sh runs), MSC4140 delayed events (up to 24 h), MSC4354 sticky events; the
# listener also serves the `openid` resource (/_matrix/federation/v1/openid/userinfo) so that JWT
# service can check OpenID tokens.
# Every command is quiet on success; failures say what went wrong on stderr and exit non-zero.
set -euo pipefail

VERSION=1.163.2
VENV=${MXREC_SYNAPSE_VENV:-$HOME/.cache/mxrec/synapse-venv}
STATE=${MXREC_SYNAPSE_DIR:-$HOME/.cache/mxrec/synapse-state}
PORT=${MXREC_SYNAPSE_PORT:-18008}
SERVER_NAME=localhost
CONFIG=$STATE/homeserver.yaml
OVERRIDES=$STATE/test-overrides.yaml
PIDFILE=$STATE/synapse.pid
LOG=$STATE/synapse.out
SECRET_FILE=$STATE/registration-shared-secret
PY=$VENV/bin/python
URL=http://127.0.0.1:$PORT
RTC_SERVICE_URL=${MXREC_RTC_SERVICE_URL:-http://127.0.0.1:${MXREC_RTC_SERVICE_PORT:-18090}}

die() { echo "synapse.sh: $*" >&2; exit 1; }

install() {
    if [[ -x $PY ]] && "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('matrix-synapse') != '$VERSION')" 2>/dev/null; then
        return
    fi
    echo "synapse.sh: installing matrix-synapse $VERSION into $VENV (first run only)" >&2
    mkdir -p "$(dirname "$VENV")"
    [[ -x $PY ]] || python3 -m venv "$VENV" || die "python3 -m venv $VENV failed (need python3 >= 3.10 with venv)"
    "$PY" -m pip install --quiet --disable-pip-version-check "matrix-synapse==$VERSION" >"$STATE/pip.log" 2>&1 \
        || die "pip install matrix-synapse==$VERSION failed; see $STATE/pip.log"
}

secret() {
    if [[ ! -s $SECRET_FILE ]]; then
        mkdir -p "$STATE"
        (umask 077; od -An -N24 -tx1 /dev/urandom | tr -d ' \n' >"$SECRET_FILE")
    fi
    cat "$SECRET_FILE"
}

configure() {
    mkdir -p "$STATE"
    if [[ ! -f $CONFIG ]]; then
        # Generates SQLite config, signing key and log config with secrets of its own.
        (cd "$STATE" && "$PY" -m synapse.app.homeserver --server-name "$SERVER_NAME" \
            --config-path "$CONFIG" --data-directory "$STATE" --generate-config --report-stats=no) \
            >"$STATE/generate.log" 2>&1 || die "config generation failed; see $STATE/generate.log"
    fi
    # Rewritten on every start so a changed port or secret takes effect. Synapse merges -c files
    # with a top-level dict update, so each key below replaces the generated one whole.
    local s lim
    s=$(secret)
    lim='{per_second: 10000, burst_count: 100000}'
    (umask 077; cat >"$OVERRIDES" <<YAML
listeners:
  - port: $PORT
    type: http
    tls: false
    x_forwarded: false
    bind_addresses: ['127.0.0.1']
    resources: [{names: [client, openid], compress: false}]
registration_shared_secret: "$s"
public_baseurl: $URL/
serve_client_wellknown: true
experimental_features: {msc4143_enabled: true, msc4354_enabled: true}
max_event_delay_duration: 24h
matrix_rtc:
  transports: [{type: livekit, livekit_service_url: "$RTC_SERVICE_URL"}]
extra_well_known_client_content:
  org.matrix.msc4143.rtc_foci: [{type: livekit, livekit_service_url: "$RTC_SERVICE_URL"}]
enable_registration: false
trusted_key_servers: []
suppress_key_server_warning: true
report_stats: false
enable_metrics: false
presence: {enabled: false}
rc_message: $lim
rc_registration: $lim
rc_login: {address: $lim, account: $lim, failed_attempts: $lim}
rc_joins: {local: $lim, remote: $lim}
rc_joins_per_room: $lim
rc_invites: {per_room: $lim, per_user: $lim, per_issuer: $lim}
rc_room_creation: $lim
rc_3pid_validation: $lim
rc_admin_redaction: $lim
rc_presence: {per_user: $lim}
rc_delayed_event_mgmt: $lim
rc_reports: $lim
YAML
    )
}

pid() { [[ -s $PIDFILE ]] && cat "$PIDFILE"; }

running() {
    local p
    p=$(pid) || return 1
    kill -0 "$p" 2>/dev/null
}

healthy() { [[ $(curl -fsS --max-time 2 "$URL/health" 2>/dev/null) == OK ]]; }

port_in_use() { ss -Htln "sport = :$1" | grep -q .; }

start() {
    mkdir -p "$STATE"
    install
    configure
    if running; then
        healthy && return
    else
        rm -f "$PIDFILE"
        port_in_use "$PORT" && die "port $PORT on 127.0.0.1 is taken by another process; set MXREC_SYNAPSE_PORT"
        (cd "$STATE" && exec setsid "$PY" -m synapse.app.homeserver -c "$CONFIG" -c "$OVERRIDES" \
            >>"$LOG" 2>&1 </dev/null) &
        echo $! >"$PIDFILE"
    fi
    # First start creates the database schema: ~5-10 s on two cores.
    for _ in $(seq 1 240); do
        healthy && return
        running || die "synapse exited during startup; last lines of $LOG and $STATE/homeserver.log:
$(tail -n 20 "$LOG" 2>/dev/null)
$(tail -n 20 "$STATE/homeserver.log" 2>/dev/null)"
        sleep 0.25
    done
    die "synapse (pid $(pid)) not healthy at $URL/health after 60 s; see $LOG and $STATE/homeserver.log"
}

stop() {
    if running; then
        local p
        p=$(pid)
        kill "$p"
        for _ in $(seq 1 80); do
            kill -0 "$p" 2>/dev/null || break
            sleep 0.25
        done
        if kill -0 "$p" 2>/dev/null; then
            echo "synapse.sh: pid $p ignored SIGTERM for 20 s; sending SIGKILL" >&2
            kill -9 "$p" 2>/dev/null || true
        fi
    fi
    rm -f "$PIDFILE"
}

register() {
    local user=$1 password=$2
    healthy || die "synapse is not running at $URL (run: $0 start)"
    # Shared-secret registration (GET nonce, POST with HMAC-SHA1 over nonce\0user\0password\0notadmin);
    # M_USER_IN_USE counts as success when the password logs in.
    SECRET=$(secret) URL=$URL U=$user P=$password python3 - <<'PY'
import hashlib, hmac, json, os, sys, urllib.error, urllib.request

url, user, pw, secret = os.environ["URL"], os.environ["U"], os.environ["P"], os.environ["SECRET"]
reg = url + "/_synapse/admin/v1/register"

def call(method, u, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(u, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        try:
            return e.code, json.load(e)
        except ValueError:
            return e.code, {}

_, n = call("GET", reg)
mac = hmac.new(secret.encode(), b"\0".join([n["nonce"].encode(), user.encode(), pw.encode(), b"notadmin"]),
               hashlib.sha1).hexdigest()
code, body = call("POST", reg, {"nonce": n["nonce"], "username": user, "password": pw, "mac": mac, "admin": False})
if code == 200:
    sys.exit(0)
if body.get("errcode") != "M_USER_IN_USE":
    sys.exit(f"synapse.sh: registering {user} failed: HTTP {code} {body}")
code, body = call("POST", url + "/_matrix/client/v3/login",
                  {"type": "m.login.password", "identifier": {"type": "m.id.user", "user": user}, "password": pw})
if code != 200:
    sys.exit(f"synapse.sh: user {user} already exists but the given password does not log in: HTTP {code} {body}")
req = urllib.request.Request(url + "/_matrix/client/v3/logout", data=b"{}", method="POST",
                             headers={"Authorization": "Bearer " + body["access_token"], "Content-Type": "application/json"})
urllib.request.urlopen(req, timeout=30).close()  # don't leave a device behind per re-run
PY
}

case ${1:-} in
start) start ;;
stop) stop ;;
env) echo "export MXREC_TEST_HOMESERVER=$URL MXREC_TEST_SYNAPSE_SECRET=$(secret)" ;;
register)
    [[ $# -eq 3 ]] || die "usage: $0 register USER PASSWORD"
    register "$2" "$3"
    ;;
*) echo "usage: $0 start|stop|env|register USER PASSWORD" >&2; exit 2 ;;
esac
