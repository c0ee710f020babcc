"""Stand-in for Element's lk-jwt-service (the MatrixRTC Authorization Service), for mxrec's tests.

The real service (github.com/element-hq/lk-jwt-service, module path `lk-jwt-service`) cannot be
installed here: its Go module path is not fetchable. This speaks the same HTTP contract, read from
its source (tag v0.5.0 and HEAD a375b13, 2026-07; where they differ HEAD is followed):

  POST /get_token  {room_id, slot_id, openid_token{access_token, token_type, matrix_server_name,
                    expires_in}, member{id, claimed_user_id, claimed_device_id}
                    [, delay_id, delay_timeout, delay_cs_api_url]}
  POST /sfu/get    {room, openid_token{...}, device_id [, delay_id, delay_timeout,
                    delay_cs_api_url]}                       (deprecated "legacy" endpoint)
  GET|HEAD /healthz
  -> 200 {"url": <--livekit-url as configured>, "jwt": <LiveKit access token>}
  -> errors {"errcode", "error"}, statuses as the real handler.go / requests.go:
     body that does not decode (not JSON, wrong type, unknown field at any level, empty)
                                         400 M_NOT_JSON "Error reading request"
     (the real decoder runs with DisallowUnknownFields and maps *every* decode error, unknown
     fields included, to M_NOT_JSON; v0.5.0's /sfu/get answered M_BAD_JSON instead)
     missing required field / half of delay_id+delay_timeout / delegation for a restricted user
                                         400 M_BAD_JSON
     OpenID token not accepted by the homeserver, `sub` on another server, /get_token
     claimed_user_id != sub              401 M_UNAUTHORIZED "The request could not be authorised."
     LiveKit CreateRoom failed (full-access users)
                                         500 M_UNKNOWN "Unable to create room on SFU"
     other method than POST (OPTIONS answers 200 for CORS preflight)
                                         405, empty body
  CORS: Access-Control-Allow-Origin `*` on /get_token and /sfu/get.

Derivations (helper.go): LiveKit room = unpadded std base64(SHA-256(json.Marshal([room_id,
slot_id]))), /sfu/get using slot "m.call#ROOM"; identity for /get_token = unpadded std
base64(SHA-256(json.Marshal([sub, claimed_device_id, member.id]))), for /sfu/get
"<sub>:<device_id>". json.Marshal is Go's: compact, non-ASCII kept as UTF-8, and <, >, &, U+2028,
U+2029 escaped as \\u003c \\u003e \\u0026 \\u2028 \\u2029. The JWT is HS256 with the LiveKit secret:
iss = key, sub = identity, nbf = now, exp = now + 1 h, video {roomJoin, room, canPublish,
canSubscribe, canPublishData, canUpdateOwnMetadata: true} (HEAD adds canUpdateOwnMetadata; the real
service leaves canPublishData unset, which LiveKit reads as true).

Full-access homeservers (--full-access-homeservers: comma/space list, or `*` alone): for a user of
one of those the room is also created through LiveKit's Twirp API (POST
<livekit url with ws->http>/twirp/livekit.RoomService/CreateRoom, {"name", "empty_timeout": 300,
"departure_timeout": 20}, bearer token with video.roomCreate) before the answer.

Deviations from the real service, all deliberate:
- The OpenID token is checked at GET <base>/_matrix/federation/v1/openid/userinfo?access_token=…
  where <base> comes from `--homeserver NAME=URL` (matrix_server_name -> base URL, repeatable);
  the real service resolves matrix_server_name over https (well-known, SRV, :8448), which a
  loopback Synapse on http cannot satisfy. An unmapped server name fails like an unreachable one
  (401).
- Delayed-leave delegation (delay_id/delay_timeout from a full-access user) is validated and
  accepted but not carried out: no delayed-event job, no /delegate_delayed_leave, no
  /sfu_webhook, no Redis.
- Binds 127.0.0.1 only.

Flags (env fallbacks as the real service's names): --port (LIVEKIT_JWT_PORT, 8080), --livekit-url
(LIVEKIT_URL), --livekit-key (LIVEKIT_KEY), --livekit-secret (LIVEKIT_SECRET; prefer the env var,
flags show in `ps`), --homeserver NAME=URL, --full-access-homeservers
(LIVEKIT_FULL_ACCESS_HOMESERVERS, required like the real one). One log line per request on stderr;
tokens are never logged. Standard library only.
"""

import argparse
import base64
import hashlib
import hmac
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PROG = "lk_jwt_standin"
UNAUTHORIZED = (401, "M_UNAUTHORIZED", "The request could not be authorised.")
NOT_JSON = (400, "M_NOT_JSON", "Error reading request")
MAX_BODY = 1 << 20


def log(msg):
    sys.stderr.write(f"{PROG}: {time.strftime('%H:%M:%S')} {msg}\n")
    sys.stderr.flush()


class MatrixError(Exception):
    def __init__(self, status, errcode, error):
        super().__init__(error)
        self.status, self.errcode, self.error = status, errcode, error


class DecodeError(Exception):
    pass


# --- Go encoding/json, as far as these requests need it ----------------------------------------

def go_json(value):
    """encoding/json.Marshal of strings/lists/dicts: compact, HTML-safe escapes, raw UTF-8."""
    s = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    # These characters only occur inside string literals here, so a plain replace is exact.
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                    ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        s = s.replace(ch, esc)
    return s.encode("utf-8")


def _go_string(s):
    # Go decodes a lone surrogate escape (\ud800) to U+FFFD; Python keeps it as is.
    if any(0xD800 <= ord(c) <= 0xDFFF for c in s):
        s = "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in s)
    return s


def _reject_constant(name):
    raise DecodeError(f"invalid JSON literal {name}")


# Request shapes: field -> "str" | "int" | nested shape (dict). Missing or null fields are zero
# values, as in Go.
OPENID = {"access_token": "str", "token_type": "str", "matrix_server_name": "str",
          "expires_in": "int"}
MEMBER = {"id": "str", "claimed_user_id": "str", "claimed_device_id": "str"}
DELAY = {"delay_id": "str", "delay_timeout": "int", "delay_cs_api_url": "str"}
GET_TOKEN = {"room_id": "str", "slot_id": "str", "openid_token": OPENID, "member": MEMBER, **DELAY}
SFU_GET = {"room": "str", "openid_token": OPENID, "device_id": "str", **DELAY}


def _zero(shape):
    return {k: (_zero(t) if isinstance(t, dict) else ("" if t == "str" else 0))
            for k, t in shape.items()}


def _fill(shape, obj, path):
    out = _zero(shape)
    if obj is None:
        return out
    if not isinstance(obj, dict):
        raise DecodeError(f"cannot unmarshal {type(obj).__name__} into object at {path or '.'}")
    for key, val in obj.items():
        # Go matches field names exactly first, then case-insensitively.
        name = key if key in shape else next((k for k in shape if k.lower() == key.lower()), None)
        if name is None:
            raise DecodeError(f'unknown field "{key}"')
        kind, where = shape[name], f"{path}.{name}" if path else name
        if val is None:
            continue
        if isinstance(kind, dict):
            out[name] = _fill(kind, val, where)
        elif kind == "str":
            if not isinstance(val, str):
                raise DecodeError(f"{where}: want string")
            out[name] = _go_string(val)
        else:
            # Go's int: an integer literal in int64 range (1.0, 1e3, true are type errors).
            if isinstance(val, bool) or not isinstance(val, int) or not -(1 << 63) <= val < 1 << 63:
                raise DecodeError(f"{where}: want integer")
            out[name] = val
    return out


def decode_request(body, shape):
    """json.NewDecoder(body) + DisallowUnknownFields + Decode(&req): first value only."""
    text = body.decode("utf-8", errors="replace")
    stripped = text.lstrip(" \t\r\n")
    if not stripped:
        raise DecodeError("EOF")
    try:
        value, _ = json.JSONDecoder(parse_constant=_reject_constant).raw_decode(stripped)
    except ValueError as e:
        raise DecodeError(str(e)) from None
    return _fill(shape, value, "")


# --- LiveKit tokens and derivations ----------------------------------------------------------

def b64u(raw):
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def hash_b64(parts):
    return base64.b64encode(hashlib.sha256(go_json(parts)).digest()).rstrip(b"=").decode()


def livekit_jwt(key, secret, grants, identity=None, valid_for=3600):
    now = int(time.time())
    claims = {"iss": key, "nbf": now, "exp": now + valid_for, "video": grants}
    if identity is not None:
        claims["sub"] = identity
    header = b64u(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    payload = b64u(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
    signing_input = f"{header}.{payload}".encode()
    sig = hmac.new(secret.encode(), signing_input, hashlib.sha256).digest()
    return f"{header}.{payload}.{b64u(sig)}"


def join_token(cfg, room, identity):
    grants = {"roomJoin": True, "room": room, "canPublish": True, "canSubscribe": True,
              "canPublishData": True, "canUpdateOwnMetadata": True}
    return livekit_jwt(cfg.livekit_key, cfg.livekit_secret, grants, identity)


def livekit_http_url(ws_url):
    # server-sdk-go's ToHttpURL: ws -> http, wss -> https.
    u = urllib.parse.urlsplit(ws_url)
    scheme = {"ws": "http", "wss": "https"}.get(u.scheme, u.scheme)
    return urllib.parse.urlunsplit((scheme, u.netloc, u.path.rstrip("/"), "", ""))


def create_room(cfg, room):
    url = livekit_http_url(cfg.livekit_url) + "/twirp/livekit.RoomService/CreateRoom"
    token = livekit_jwt(cfg.livekit_key, cfg.livekit_secret, {"roomCreate": True}, valid_for=600)
    body = json.dumps({"name": room, "empty_timeout": 300, "departure_timeout": 20}).encode()
    req = urllib.request.Request(url, data=body, method="POST", headers={
        "Authorization": "Bearer " + token, "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            sid = json.load(r).get("sid", "")
    except (urllib.error.URLError, OSError, ValueError) as e:
        detail = e
        if isinstance(e, urllib.error.HTTPError):
            detail = f"HTTP {e.code} {e.read()[:200]!r}"
        log(f"CreateRoom {room} failed: {detail}")
        raise MatrixError(500, "M_UNKNOWN", "Unable to create room on SFU") from None
    return sid


# --- OpenID ----------------------------------------------------------------------------------

def lookup_userinfo(cfg, token):
    """fclient.LookupUserInfo against the mapped base URL; any failure -> 401."""
    server = token["matrix_server_name"]
    base = cfg.homeservers.get(server)
    if base is None:
        log(f"openid: no --homeserver mapping for {server!r}")
        raise MatrixError(*UNAUTHORIZED)
    url = (base.rstrip("/") + "/_matrix/federation/v1/openid/userinfo?"
           + urllib.parse.urlencode({"access_token": token["access_token"]}))
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            info = json.load(r)
    except urllib.error.HTTPError as e:
        log(f"openid: {server} answered HTTP {e.code}")
        raise MatrixError(*UNAUTHORIZED) from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        log(f"openid: lookup at {base} failed: {e}")
        raise MatrixError(*UNAUTHORIZED) from None
    sub = info.get("sub") if isinstance(info, dict) else None
    if not isinstance(sub, str) or sub.split(":", 1)[1:] != [server]:
        log(f"openid: userID {sub!r} does not match server name {server!r}")
        raise MatrixError(*UNAUTHORIZED)
    return sub


# --- request processing (requests.go Validate + handler.go process*) -------------------------

def validate_delay(req):
    both = req["delay_id"] != "" and req["delay_timeout"] > 0
    either = req["delay_id"] != "" or req["delay_timeout"] > 0
    if either and not both:
        raise MatrixError(400, "M_BAD_JSON",
                          "The request body is missing `delay_id` or `delay_timeout`")


def validate_get_token(req):
    if not req["room_id"] or not req["slot_id"]:
        raise MatrixError(400, "M_BAD_JSON", "The request body is missing `room_id` or `slot_id`")
    m = req["member"]
    if not m["id"] or not m["claimed_user_id"] or not m["claimed_device_id"]:
        raise MatrixError(400, "M_BAD_JSON", "The request body `member` is missing a `id`, "
                          "`claimed_user_id` or `claimed_device_id`")
    t = req["openid_token"]
    if not t["access_token"] or not t["matrix_server_name"]:
        raise MatrixError(400, "M_BAD_JSON", "The request body `openid_token` is missing a "
                          "`access_token` or `matrix_server_name`")
    validate_delay(req)


def validate_sfu_get(req):
    if not req["room"]:
        raise MatrixError(400, "M_BAD_JSON", "Missing room parameter")
    t = req["openid_token"]
    if not t["access_token"] or not t["matrix_server_name"]:
        raise MatrixError(400, "M_BAD_JSON", "Missing OpenID token parameters")
    validate_delay(req)


def is_full_access(cfg, server):
    if cfg.full_access == ["*"]:
        return True
    return server in cfg.full_access


def grant(cfg, req, sub, room, identity):
    """The common tail of processSFURequest / processLegacySFURequest."""
    server = req["openid_token"]["matrix_server_name"]
    full = is_full_access(cfg, server)
    if req["delay_id"] and not full:
        raise MatrixError(400, "M_BAD_JSON",
                          "Delegation of delayed events is only supported for full access users")
    jwt = join_token(cfg, room, identity)
    note = "restricted"
    if full:
        if req["delay_id"] and server not in cfg.homeservers:
            raise MatrixError(400, "M_BAD_JSON", "Unable to resolve client-server API")
        sid = create_room(cfg, room)
        note = f"full, room sid {sid}"
        if req["delay_id"]:
            note += ", delayed-leave delegation NOT carried out by the stand-in"
    return {"url": cfg.livekit_url, "jwt": jwt}, f"{sub} ({note}) lk_room={room} lk_id={identity}"


def process_get_token(cfg, req):
    validate_get_token(req)
    sub = lookup_userinfo(cfg, req["openid_token"])
    if req["member"]["claimed_user_id"] != sub:
        log(f"claimed_user_id {req['member']['claimed_user_id']!r} != token subject {sub!r}")
        raise MatrixError(*UNAUTHORIZED)
    identity = hash_b64([sub, req["member"]["claimed_device_id"], req["member"]["id"]])
    room = hash_b64([req["room_id"], req["slot_id"]])
    return grant(cfg, req, sub, room, identity)


def process_sfu_get(cfg, req):
    validate_sfu_get(req)
    sub = lookup_userinfo(cfg, req["openid_token"])
    identity = sub + ":" + req["device_id"]
    room = hash_b64([req["room"], "m.call#ROOM"])
    return grant(cfg, req, sub, room, identity)


ROUTES = {"/get_token": (GET_TOKEN, process_get_token), "/sfu/get": (SFU_GET, process_sfu_get)}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = PROG
    sys_version = ""
    cfg = None

    def log_message(self, fmt, *args):  # the one line per request is written in _done
        pass

    def _send(self, status, body=b"", ctype=None, cors=False):
        self.send_response(status)
        if cors:
            self.send_header("Access-Control-Allow-Origin", "*")
            self.send_header("Access-Control-Allow-Methods", "POST")
            self.send_header("Access-Control-Allow-Headers",
                             "Accept, Content-Type, Content-Length, Accept-Encoding, X-CSRF-Token")
        if ctype:
            self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)
        self._status = status

    def _done(self, what=""):
        path = urllib.parse.urlsplit(self.path).path
        log(f"{self.client_address[0]} {self.command} {path} {self._status or '-'}"
            + (f" {what}" if what else ""))

    def _read_body(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
                if sum(map(len, chunks)) > MAX_BODY:
                    raise DecodeError("body too large")
            return b"".join(chunks)
        n = int(self.headers.get("Content-Length") or 0)
        if n > MAX_BODY:
            raise DecodeError("body too large")
        return self.rfile.read(n) if n > 0 else b""

    def _handle(self):
        path = urllib.parse.urlsplit(self.path).path
        if path == "/healthz":
            self._send(200 if self.command in ("GET", "HEAD") else 405)
            return ""
        if path not in ROUTES:
            self._send(404, b"404 page not found\n", "text/plain; charset=utf-8")
            return ""
        if self.command == "OPTIONS":
            self._send(200, ctype="application/json", cors=True)
            return "preflight"
        if self.command != "POST":
            self._send(405, ctype="application/json", cors=True)
            return ""
        shape, process = ROUTES[path]
        try:
            try:
                req = decode_request(self._read_body(), shape)
            except (DecodeError, ValueError) as e:
                log(f"error reading body: {e}")
                raise MatrixError(*NOT_JSON) from None
            answer, what = process(self.cfg, req)
        except MatrixError as e:
            body = go_json({"errcode": e.errcode, "error": e.error}) + b"\n"
            self._send(e.status, body, "application/json", cors=True)
            return e.errcode
        self._send(200, go_json(answer) + b"\n", "application/json", cors=True)
        return what

    def _dispatch(self):
        self._status = None  # one handler object serves every request of a keep-alive connection
        what = ""
        try:
            what = self._handle()
        except Exception as e:  # keep serving; the client sees 500 M_UNKNOWN
            log(f"internal error: {e!r}")
            if self._status is None:
                self._send(500, go_json({"errcode": "M_UNKNOWN", "error": "Internal Server Error"})
                           + b"\n", "application/json", cors=True)
            what = "M_UNKNOWN"
        self._done(what)

    do_GET = do_HEAD = do_POST = do_OPTIONS = do_PUT = do_DELETE = do_PATCH = _dispatch


def parse_args(argv):
    env = os.environ.get
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=int(env("LIVEKIT_JWT_PORT") or 8080))
    p.add_argument("--livekit-url", default=env("LIVEKIT_URL"),
                   help="ws(s):// URL of the SFU, returned verbatim as `url`")
    p.add_argument("--livekit-key", default=env("LIVEKIT_KEY"))
    p.add_argument("--livekit-secret", default=env("LIVEKIT_SECRET"))
    p.add_argument("--homeserver", action="append", default=[], metavar="NAME=URL",
                   help="matrix_server_name -> homeserver base URL for the OpenID check")
    p.add_argument("--full-access-homeservers", default=env("LIVEKIT_FULL_ACCESS_HOMESERVERS"),
                   help="comma list of server names, or *")
    a = p.parse_args(argv)
    if not (a.livekit_url and a.livekit_key and a.livekit_secret):
        p.error("--livekit-url, --livekit-key and --livekit-secret (or LIVEKIT_URL, LIVEKIT_KEY, "
                "LIVEKIT_SECRET) must be set")
    if not a.full_access_homeservers:
        p.error("--full-access-homeservers (or LIVEKIT_FULL_ACCESS_HOMESERVERS) must be set")
    a.full_access = a.full_access_homeservers.replace(",", " ").split()
    a.homeservers = {}
    for m in a.homeserver:
        name, sep, url = m.partition("=")
        if not sep or not name or not url.startswith(("http://", "https://")):
            p.error(f"--homeserver wants NAME=http(s)://HOST[:PORT], got {m!r}")
        a.homeservers[name] = url
    return a


def main(argv=None):
    cfg = parse_args(sys.argv[1:] if argv is None else argv)
    Handler.cfg = cfg
    server = ThreadingHTTPServer(("127.0.0.1", cfg.port), Handler)
    server.daemon_threads = True
    log(f"listening on http://127.0.0.1:{cfg.port}; livekit {cfg.livekit_url}; homeservers "
        f"{cfg.homeservers}; full access {cfg.full_access}")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
