"""An MSC3401 mesh group call participant for mxrec's end-to-end tests: plain HTTP + aiortc.

It speaks the group call protocol the way matrix-js-sdk 43's GroupCall / MatrixCall /
CallEventHandler do (src/webrtc/groupCall.ts, call.ts, callEventHandler.ts), independently of the
bot under test: the Matrix side is client-server API calls made with urllib (matrix_caller.py's
`Matrix` class), the media side is aiortc. One process is one participant (one device):

    python mesh_peer.py --homeserver URL --user @u:server --password PW --room ROOM_ID
        --group-call ID [--create-call] [--grey N] [--size WxH] [--fps F]
        [--only-user @bot:server] [--seconds S] [--join-timeout S]

1. logs in (m.login.password; the device id is the VoIP party_id), syncs once with timeout 0 for
   the room's current state, then long-polls /sync (5 s) in the background;
2. with --create-call puts the group call state event `org.matrix.msc3401.call` (state key = the
   group call id, {"m.intent": "m.room", "m.type": "m.video"}), else waits (--join-timeout, 60 s)
   until it exists and is not terminated;
3. publishes its member state event `org.matrix.msc3401.call.member` (state key = own user id,
   {"m.calls": [{"m.call_id", "m.devices": [{device_id, session_id (random per process),
   expires_ts (now + 1 h), feeds [{"purpose": "m.usermedia"} (+ "m.screenshare" while sharing)]}]}]})
   and refreshes it every 45 min and whenever its feeds change;
4. places a call to every member device (user U, device D) with U > own user id, or U == own user
   id and D > own device id (the bot included, it is just another member), and answers the invites
   of the others. Peer calls are `m.call.*` to-device messages (unencrypted) with call_id, party_id,
   version "1", conf_id, device_id, sender_session_id, dest_session_id, seq, org.matrix.msgid.
   Received ones are dropped unless dest_session_id is our session and conf_id our group call,
   and are reordered per call_id by seq;
5. a failed outgoing call (no answer within 15 s, ICE failed, or not connected 15 s after the
   answer; also a hangup from a member still in the call) is placed again with a new call_id,
   3 s later, up to 3 times (the count resets when a call connects); a call whose member device
   left or expired is hung up; a member whose session changed is called anew.

Media (every peer call has its own tracks, so each is paced and counted on its own, like the js-sdk
clones its feeds per call):
- camera: --size (320x180) at --fps (15), background (N,N,N) for --grey N (128) with the frame
  number n as 16 black/white blocks along the top row (bit 15 first, block = 32 * width / 640 px
  square), every frame with n % fps == 0 all white (the flash, once a second);
- microphone: 48 kHz mono, a 1 kHz sine for the first 100 ms of each second (aiortc_sender.py's
  BeepAudio), counted from the same start as the camera, so flash k*fps and beep k coincide;
- screen share: the same counter video on a blue background (40, 70, 170), counting its own frames
  from 0 from the first frame actually sent; its own msid stream id, purpose m.screenshare;
- muted camera: black frames, muted microphone: silence, both paced as before (the js-sdk disables
  the tracks); `m.call.sdp_stream_metadata_changed` tells every peer.

stdin, JSON lines (EOF is not a leave):
    {"cmd": "mute", "audio": bool, "video": bool}   (a missing key keeps that state)
    {"cmd": "screen_share", "on": bool}
    {"cmd": "leave"}      hang up every call, withdraw the membership, log out, exit 0
    {"cmd": "end_call"}   the same, and put "m.terminated": "call_ended" into the call state
stdout, one JSON line per event (flushed):
    {"event": "joined", "user", "device", "session_id", "group_call", "room"}
    {"event": "call", "peer_user", "peer_device", "call_id", "role": "caller"|"callee"}
    {"event": "connected", "peer_user", "peer_device", "call_id", "ts_ms"}
    {"event": "negotiated", "peer_user", "peer_device", "call_id", "offerer": "us"|"them",
     "answer_recvonly": bool}                 a renegotiation (m.call.negotiate) completed
    {"event": "screen_share", "on": bool, "ts_ms", "calls": [{"peer_user", "peer_device",
     "call_id", "ts_ms"}]}
    {"event": "muted", "audio": bool, "video": bool, "ts_ms", "calls": [...as above]}
    {"event": "hangup", "peer_user", "peer_device", "call_id", "by": "us"|"them", "reason"}
    {"event": "error", "message"}             a bad command, a call given up, ... (still running)
    {"event": "call_terminated", "by"}        someone ended the group call (we then leave)
    {"event": "left", "ts_ms"}
ts_ms is this machine's wall clock (ms since the epoch) when the change reached the media: the
first muted/unmuted frame, the first screen-share frame sent, the moment the screen track was
detached; per peer call in "calls", the earliest as "ts_ms" (now when no call was up).
--only-user U: calls are placed to and answered from U only; everyone else is ignored.
--seconds S (default: until a command) ends like a leave, so do SIGTERM and SIGINT, and a closed
stdout (the controller is gone).
Exit status: 0 after a clean leave, 1 on a failure, 2 for bad arguments. Diagnostics go to
stderr, prefixed "mesh_peer:" and the time.

The room must let members send `org.matrix.msc3401.call.member` (and, with --create-call,
`org.matrix.msc3401.call`) state events: power level 0 for them, as Element sets up call rooms.
Of a state key, the event with the newest origin_server_ts wins: Synapse's incremental /sync can
hand out an older value in its `state` section after concurrent state events (see on_state).

aiortc notes: incoming media is counted, not decoded (counting_worker); offer collisions are
resolved by perfect negotiation with an emulated rollback (rollback_local_offer), and a track not
yet offered is kept out of a remote offer's way (unnegotiated_hidden), both on aiortc internals
(aiortc 1.16, pinned by deploy/dev/pyenv.sh).
"""

import argparse
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import fractions
import itertools
import json
import os
import secrets
import signal
import string
import sys
import threading
import time
import traceback
import uuid
from collections import Counter, defaultdict

import aiortc.rtcrtpreceiver
import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from aiortc.rtcconfiguration import RTCBundlePolicy
from aiortc.sdp import SessionDescription, candidate_from_sdp
from av import AudioFrame, VideoFrame

from aiortc_sender import SAMPLES_PER_FRAME, BeepAudio, CounterVideo, SharedStart
from matrix_caller import Matrix, MatrixError, all_recvonly, now_ms, quote

GROUP_CALL_EVENT = "org.matrix.msc3401.call"
MEMBER_EVENT = "org.matrix.msc3401.call.member"
USERMEDIA, SCREENSHARE = "m.usermedia", "m.screenshare"
TO_DEVICE_MESSAGE_ID = "org.matrix.msgid"

DEVICE_TIMEOUT_MS = 3_600_000  # expires_ts = now + 1 h, as the js-sdk
MEMBER_REFRESH_S = 45 * 60  # the js-sdk resends at 3/4 of the timeout
CALL_LIFETIME_MS = 60_000  # lifetime of invites and negotiate offers (CALL_TIMEOUT_MS)
CAPABILITIES = {"m.call.transferee": False, "m.call.dtmf": False}

INVITE_TIMEOUT = 15.0  # no m.call.answer: hang up (invite_timeout) and retry
CONNECT_TIMEOUT = 15.0  # caller: answered but not connected
CALLEE_CONNECT_TIMEOUT = 30.0  # callee: answered but not connected (the caller retries)
RETRY_DELAY = 3.0
MAX_RETRIES = 3
NEGOTIATE_TIMEOUT = 15.0  # only reported: an m.call.negotiate offer nobody answered
UNKNOWN_DEVICE_GRACE = 30.0  # a call with a device never seen in the member state is hung up
SYNC_TIMEOUT_MS = 5_000
MUTE_WATCH_S = 2.0  # how long to wait for the first (un)muted frame of every call
SCREEN_WATCH_S = 20.0  # ... for the first screen frame (after a renegotiation) of every call
EARLY_CANDIDATES_MAX = 50  # m.call.candidates kept per unknown call_id
SEQ_BUFFER_MAX = 200  # out-of-order events kept per call_id

SCREEN_BACKGROUND = (40, 70, 170)
BASE_WIDTH, BASE_BLOCK = 640, 32  # aiortc_sender.py's geometry, scaled to --size
VIDEO_CLOCK = 90_000


def log(*args):
    stamp = time.strftime("%H:%M:%S", time.localtime()) + f".{int(time.time() * 1000) % 1000:03d}"
    print("mesh_peer:", stamp, *args, file=sys.stderr, flush=True)


class Stdout:
    """The JSON-lines channel to the controller. When writing fails, the controller is gone:
    nobody is left to report to or to send a leave, so the `on_close` callbacks (a leave) run."""

    open = True
    on_close = []


def emit(event: str, **fields):
    if not Stdout.open:
        return
    try:
        print(json.dumps({"event": event, **fields}), flush=True)
    except (BrokenPipeError, ValueError):
        Stdout.open = False
        log(f"stdout is closed (lost the {event} event): leaving")
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        for callback in Stdout.on_close:
            callback()


def new_call_id() -> str:
    """Like the js-sdk's genCallID: the time in ms and 16 random letters."""
    alphabet = string.ascii_letters + string.digits
    return str(now_ms()) + "".join(secrets.choice(alphabet) for _ in range(16))


def wants_outgoing(own_user: str, own_device: str, user: str, device: str) -> bool:
    """GroupCall.wantsOutgoingCall: we call users sorting after us, and our own later devices."""
    return user >= own_user and (user != own_user or device > own_device)


def valid_device(d) -> bool:
    """The device entries the js-sdk counts (expiry is checked separately)."""
    return (
        isinstance(d, dict)
        and isinstance(d.get("device_id"), str)
        and isinstance(d.get("session_id"), str)
        and isinstance(d.get("expires_ts"), (int, float))
        and not isinstance(d.get("expires_ts"), bool)
        and isinstance(d.get("feeds"), list)
    )


class Failed(Exception):
    """The participant cannot go on."""


class Client(Matrix):
    """matrix_caller's Matrix plus state events and to-device messages."""

    async def login(self, user: str, password: str):
        resp = await self.request("POST", "/login", {
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": user},
            "password": password,
            "initial_device_display_name": "mxrec mesh peer",
        })
        self.token, self.user_id = resp["access_token"], resp["user_id"]
        self.device_id = resp["device_id"]

    async def put_state(self, room_id: str, event_type: str, state_key: str, content: dict) -> str:
        path = f"/rooms/{quote(room_id)}/state/{quote(event_type)}/{quote(state_key)}"
        return (await self.request("PUT", path, content, retry=True)).get("event_id")

    async def join(self, room_id: str):
        await self.request("POST", f"/join/{quote(room_id)}", {})

    async def send_to_device(self, event_type: str, user: str, device: str, content: dict):
        txn = f"{self._txn_prefix}-{next(self._txn_counter)}"
        path = f"/sendToDevice/{quote(event_type)}/{txn}"
        await self.request("PUT", path, {"messages": {user: {device: content}}}, retry=True)


# --- media ---------------------------------------------------------------------------------------


class Watch:
    """Collects, per peer call, the wall-clock time (ms) of the first frame showing a change."""

    def __init__(self, wants: dict, call_ids):
        self.wants = wants  # track kind ("audio", "video", "screen") -> the value to look for
        self.call_ids = set(call_ids)
        self.first = {}
        self.all = asyncio.Event()
        if not self.call_ids:
            self.all.set()

    def offer(self, kind, value, call_id, ts):
        if kind in self.wants and self.wants[kind] == value and call_id in self.call_ids \
                and call_id not in self.first:
            self.first[call_id] = ts
            if len(self.first) == len(self.call_ids):
                self.all.set()


class MediaState:
    """The process-wide mute flags every call's tracks read, and the watches they report to."""

    def __init__(self):
        self.audio_muted = False
        self.video_muted = False
        self.watches = []

    def seen(self, kind: str, value, call_id: str):
        ts = now_ms()
        for w in self.watches:
            w.offer(kind, value, call_id, ts)

    def watch(self, wants: dict, call_ids) -> Watch:
        w = Watch(wants, call_ids)
        self.watches.append(w)
        return w

    async def wait(self, w: Watch, timeout: float) -> dict:
        try:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(w.all.wait(), timeout)
        finally:
            self.watches.remove(w)
        return w.first


class Camera(CounterVideo):
    """aiortc_sender.py's counter video at any size and frame rate, black while muted.

    As a screen share (`screen=True`) it is never muted, produces nothing until `gate()` says its
    transceiver sends (so frame 0 is the first frame on the wire), and takes its RTP time from
    `pts_origin()` so that a share restarted on the same transceiver keeps the timestamps rising.
    """

    def __init__(self, start: SharedStart, media: MediaState, call_id: str, size, fps: int,
                 background, screen=False, gate=None, pts_origin=None):
        super().__init__(start, background=background)
        width, height = size
        self.media, self.call_id, self.fps, self.screen = media, call_id, fps, screen
        self.gate, self.pts_origin = gate, pts_origin
        self.block = max(1, BASE_BLOCK * width // BASE_WIDTH)
        self.grey = np.full((height, width, 3), background, dtype=np.uint8)
        self.white = np.full((height, width, 3), 255, dtype=np.uint8)
        self.black = np.zeros((height, width, 3), dtype=np.uint8)
        self.applied = False if screen else media.video_muted
        self.retired = False  # detached from its sender (screen share off)

    async def recv(self):
        if self.readyState != "live":
            raise MediaStreamError
        if self.gate is not None and self.start.t0 is None:
            # Not negotiated yet: the sender drops what it reads, so read nothing. A retired track
            # hands its sender one frame (which it drops) instead of an error, since an error would
            # end the sender's RTP loop for good and the transceiver is reused by the next share.
            while not self.gate():
                if self.retired or self.readyState != "live":
                    return self._frame(self.black, 0)
                await asyncio.sleep(0.02)
        n = self.n
        self.n += 1
        slot = self.start.get() + n / self.fps
        wait = slot - time.time()
        if wait > 0:
            await asyncio.sleep(wait)
        if self.screen:
            if n == 0:
                self.media.seen("screen", True, self.call_id)
            muted = False
        else:
            muted = self.media.video_muted
            if muted != self.applied:
                self.applied = muted
                self.media.seen("video", muted, self.call_id)
        if muted:
            arr = self.black
        elif n % self.fps == 0:
            arr = self.white
        else:
            arr = self.grey.copy()
            b = self.block
            for bit in range(16):
                arr[0:b, bit * b:(bit + 1) * b, :] = 255 if (n >> (15 - bit)) & 1 else 0
        origin = self.pts_origin() if self.pts_origin else self.start.get()
        return self._frame(arr, round((slot - origin) * VIDEO_CLOCK))

    @staticmethod
    def _frame(arr, pts):
        frame = VideoFrame.from_ndarray(arr, format="rgb24")
        frame.pts = pts
        frame.time_base = fractions.Fraction(1, VIDEO_CLOCK)
        return frame


class Mic(BeepAudio):
    """aiortc_sender.py's beep, silent (same pacing and timestamps) while muted."""

    def __init__(self, start: SharedStart, media: MediaState, call_id: str):
        super().__init__(start)
        self.media, self.call_id = media, call_id
        self.applied = media.audio_muted
        self.silence = np.zeros((1, SAMPLES_PER_FRAME), dtype=np.int16)

    async def recv(self):
        frame = await super().recv()
        muted = self.media.audio_muted
        if muted != self.applied:
            self.applied = muted
            self.media.seen("audio", muted, self.call_id)
        if not muted:
            return frame
        silent = AudioFrame.from_ndarray(self.silence, format="s16", layout="mono")
        silent.sample_rate, silent.pts, silent.time_base = frame.sample_rate, frame.pts, frame.time_base
        return silent


# --- aiortc helpers ------------------------------------------------------------------------------


def _transceiver_list(pc: RTCPeerConnection) -> list:
    return pc._RTCPeerConnection__transceivers  # private: aiortc has no API for what follows


@contextlib.contextmanager
def unnegotiated_hidden(pc: RTCPeerConnection):
    """Keeps transceivers that have no mid yet out of a remote offer's way.

    aiortc's setRemoteDescription pairs a new remote m-line with any local transceiver of that
    kind whose mid is None, so our screen share, added but not offered yet, would be taken for the
    remote's new screen m-line (and end up inactive both ways). Browsers may pair them too, but
    then send both ways on it; aiortc does not. Hidden, ours keeps waiting for our own offer.
    """
    lst = _transceiver_list(pc)
    hidden = [t for t in lst if t.mid is None]
    for t in hidden:
        lst.remove(t)
    try:
        yield
    finally:
        lst.extend(hidden)


def stable_snapshot(pc: RTCPeerConnection):
    """What rollback_local_offer restores: taken in the stable state, just before an offer."""
    return pc._RTCPeerConnection__pendingLocalDescription, {t.mid for t in pc.getTransceivers() if t.mid is not None}


def rollback_local_offer(pc: RTCPeerConnection, snapshot):
    """What setRemoteDescription does implicitly in a browser (perfect negotiation, polite side),
    which aiortc cannot: drop our pending offer and go back to stable. Transceivers that got their
    mid from that offer get none again, to be offered anew. (aiortc keeps an accepted offer of
    ours as its pending local description, which createOffer reads: that one comes back.)"""
    previous, mids = snapshot
    for t in pc.getTransceivers():
        if t.mid is not None and t.mid not in mids:
            t._set_mid(None)
            t._set_mline_index(None)
    pc._RTCPeerConnection__pendingLocalDescription = previous
    pc._RTCPeerConnection__setSignalingState("stable")


def directions(sdp: str) -> str:
    """The m-lines of an SDP as kind:mid:direction, for the logs."""
    return " ".join(f"{m.kind}:{m.rtp.muxId}:{m.direction}" for m in SessionDescription.parse(sdp).media)


RECEIVED = Counter()  # id(remote track's queue) -> encoded frames that arrived for it


def counting_worker(loop, input_q, output_q, decode_error):
    """Stands in for aiortc's decoder thread (rtcrtpreceiver.decoder_worker): counts the frames
    that arrive and decodes none. A test peer has no use for the pictures, and decoding every
    other participant's audio and video cost about a sixth of a full-mesh peer's CPU. RTCP
    (receiver reports, NACKs) is made before this point and goes on as before."""
    key = id(output_q)
    while True:
        task = input_q.get()
        if task is None:
            asyncio.run_coroutine_threadsafe(output_q.put(None), loop)  # ends the track
            return
        RECEIVED[key] += 1


def parse_candidate(c: dict):
    line = c.get("candidate")
    if not isinstance(line, str) or not line:
        return None
    candidate = candidate_from_sdp(line.removeprefix("candidate:"))
    candidate.sdpMid = c.get("sdpMid")
    candidate.sdpMLineIndex = c.get("sdpMLineIndex")
    return candidate


# --- one peer call -------------------------------------------------------------------------------


class PeerCall:
    """One MatrixCall of the group call: to one device of one member, as caller or callee.

    Incoming events go through `queue` to a worker; they and every local change (screen share)
    run under `lock`, one at a time, which is what the js-sdk's promise chains give it.
    `phase`: "new" -> "invited" (caller, invite out) -> "up" (answer applied or sent) -> "ended".
    """

    def __init__(self, peer, user: str, device: str, opponent_session: str, role: str, call_id: str):
        self.peer, self.user, self.device = peer, user, device
        self.key = (user, device)
        self.opponent_session = opponent_session
        self.role, self.call_id = role, call_id
        self.polite = role == "callee"
        self.created = time.monotonic()
        self.member_seen = False
        self.phase = "new"
        self.opponent_party = None
        self.seq = itertools.count()
        self.send_lock = asyncio.Lock()
        self.lock = asyncio.Lock()
        self.queue = asyncio.Queue()
        self.pending_candidates = []  # before a remote description
        self.remote_metadata = {}
        self.making_offer = False
        self.need_negotiation = False
        self.pre_offer = None  # stable_snapshot before our last negotiate offer
        self.negotiations = 0
        self.connected_ts = None
        self.received = {}  # remote track name -> key in RECEIVED
        self.tasks = set()
        self.hangup_task = None

        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[], bundlePolicy=RTCBundlePolicy.MAX_BUNDLE))
        self.pc.on("connectionstatechange", self._on_connection_state)
        self.pc.on("track", self._on_track)
        args = peer.args
        self.start = SharedStart()
        self.camera = Camera(self.start, peer.media, call_id, args.size, args.fps, (args.grey,) * 3)
        self.mic = Mic(self.start, peer.media, call_id)
        self.usermedia_stream = str(uuid.uuid4())
        self.screen = None
        self.screen_tx = None
        self.screen_stream = None
        self.screen_origin = None  # time origin of the screen transceiver's RTP timestamps
        self.worker = self.spawn(self._work())

    def __repr__(self):
        return f"call {self.call_id} ({self.role}) with {self.user}/{self.device}"

    def spawn(self, coro):
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    @property
    def ended(self) -> bool:
        return self.phase == "ended"

    def ident(self) -> dict:
        return {"peer_user": self.user, "peer_device": self.device, "call_id": self.call_id}

    # --- signalling out ---

    async def send(self, event_type: str, **fields):
        """CallEventHandler-compatible to-device content; seq counts per call, in sending order."""
        me = self.peer.client
        async with self.send_lock:
            content = {
                **fields,
                "version": "1",
                "call_id": self.call_id,
                "party_id": me.device_id,
                "conf_id": self.peer.args.group_call,
                "device_id": me.device_id,
                "sender_session_id": self.peer.session_id,
                "dest_session_id": self.opponent_session,
                "seq": next(self.seq),
                TO_DEVICE_MESSAGE_ID: str(uuid.uuid4()),
            }
            await me.send_to_device(event_type, self.user, self.device, content)
        log(f"sent {event_type} (seq {content['seq']}) in {self}")

    def local_metadata(self) -> dict:
        media = self.peer.media
        meta = {self.usermedia_stream: {"purpose": USERMEDIA, "audio_muted": media.audio_muted,
                                        "video_muted": media.video_muted}}
        if self.screen is not None:
            # A screen stream without an audio track counts as audio-muted in the js-sdk's CallFeed.
            meta[self.screen_stream] = {"purpose": SCREENSHARE, "audio_muted": True, "video_muted": False}
        return meta

    async def send_end_of_candidates(self):
        # Our SDP carries every candidate (aiortc gathers inside setLocalDescription); what is
        # left of the js-sdk's candidate queue is the end-of-candidates marker.
        await self.send("m.call.candidates", candidates=[{"candidate": ""}])

    # --- local tracks ---

    def _set_stream(self, sender, stream_id: str):
        sender._stream_id = stream_id  # private aiortc attribute, read by createOffer/createAnswer

    def _add_usermedia(self):
        # The js-sdk adds the feed's tracks with addTrack, audio first: in an answer they take the
        # offered transceivers of their kind (sendonly where the offer is recvonly).
        self._set_stream(self.pc.addTrack(self.mic), self.usermedia_stream)
        self._set_stream(self.pc.addTrack(self.camera), self.usermedia_stream)

    def _screen_sends(self) -> bool:
        return self.screen_tx is not None and self.screen_tx.currentDirection in ("sendonly", "sendrecv")

    def _screen_origin(self) -> float:
        if self.screen_origin is None:
            self.screen_origin = self.screen.start.get()
        return self.screen_origin

    def _add_screen(self):
        """Adds (or re-attaches) the screen track the way call.ts pushLocalFeed does."""
        args = self.peer.args
        self.screen = Camera(SharedStart(), self.peer.media, self.call_id, args.size, args.fps,
                             SCREEN_BACKGROUND, screen=True, gate=self._screen_sends,
                             pts_origin=self._screen_origin)
        self.screen_stream = str(uuid.uuid4())
        if self.screen_tx is not None:
            # Transceivers cannot be removed: the js-sdk reuses the one of the last share.
            self.screen_tx.sender.replaceTrack(self.screen)
            self.screen_tx.direction = "sendonly" if self.screen_tx.direction == "inactive" else "sendrecv"
        else:
            sender = self.pc.addTrack(self.screen)
            self.screen_tx = next(t for t in self.pc.getTransceivers() if t.sender is sender)
        self._set_stream(self.screen_tx.sender, self.screen_stream)

    def _remove_screen(self):
        """call.ts removeLocalFeed: removeTrack, i.e. no track and no sending on the transceiver."""
        track = self.screen
        self.screen = None
        track.retired = True
        self.screen_tx.sender.replaceTrack(None)
        self.screen_tx.direction = {"sendrecv": "recvonly", "sendonly": "inactive"}.get(
            self.screen_tx.direction, self.screen_tx.direction)

    # --- the outgoing call ---

    async def place(self, request_screenshare: bool):
        async with self.lock:
            if self.ended:
                return
            self._add_usermedia()
            if self.peer.sharing:
                self._add_screen()
            if request_screenshare:
                # placeCallWithCallFeeds(..., requestScreenshareFeed): a recvonly video transceiver
                # for the screen share the member's feeds announce.
                self.pc.addTransceiver("video", direction="recvonly")
            await self.pc.setLocalDescription(await self.pc.createOffer())
            offer = self.pc.localDescription
            await self.send("m.call.invite", lifetime=CALL_LIFETIME_MS, invitee=self.user,
                            offer={"type": offer.type, "sdp": offer.sdp},
                            capabilities=CAPABILITIES, sdp_stream_metadata=self.local_metadata())
            self.phase = "invited"
            await self.send_end_of_candidates()
        self.spawn(self._timeout(INVITE_TIMEOUT, lambda: self.phase == "invited", "invite_timeout",
                                 "no m.call.answer"))

    async def _timeout(self, seconds: float, still, reason: str, what: str):
        await asyncio.sleep(seconds)
        if not self.ended and still():
            log(f"{what} within {seconds:g} s in {self}; hanging up ({reason})")
            self.request_hangup(reason)

    # --- incoming events ---

    async def _work(self):
        while True:
            item = await self.queue.get()
            if item is None or self.ended:
                return
            sender, event_type, content = item
            try:
                async with self.lock:
                    if self.ended:
                        return
                    await self._handle(event_type, content)
            except Exception as e:  # a bad event must not end the participant
                if self.ended:
                    return
                log(f"handling {event_type} in {self} failed: {type(e).__name__}: {e}")
                if not isinstance(e, ValueError):
                    traceback.print_exc(file=sys.stderr)
                emit("error", message=f"{event_type} in call {self.call_id} from {self.user}: "
                                      f"{type(e).__name__}: {e}")
                if event_type in ("m.call.invite", "m.call.answer"):
                    # The call cannot be set up: end it (the caller's retry may do better).
                    await self.end("unknown_error", by="us", send=True)

    def _party_matches(self, event_type: str, content: dict) -> bool:
        party = content.get("party_id")
        if self.opponent_party is not None and party != self.opponent_party:
            log(f"ignoring {event_type} from party {party!r} in {self}: we chose {self.opponent_party!r}")
            return False
        return True

    async def _handle(self, event_type: str, content: dict):
        if event_type == "m.call.invite":
            await self._on_invite(content)
        elif event_type == "m.call.answer":
            await self._on_answer(content)
        elif event_type == "m.call.select_answer":
            selected = content.get("selected_party_id")
            if self.role == "callee" and selected is not None and selected != self.peer.client.device_id:
                log(f"{self}: the caller selected party {selected!r}, not us")
                await self.end("answered_elsewhere", by="them", send=False)
        elif event_type == "m.call.candidates":
            if self._party_matches(event_type, content):
                await self._on_candidates(content)
        elif event_type == "m.call.negotiate":
            if self._party_matches(event_type, content):
                await self._on_negotiate(content)
        elif event_type == "m.call.sdp_stream_metadata_changed":
            if self._party_matches(event_type, content):
                self._update_remote_metadata(content)
        elif event_type in ("m.call.hangup", "m.call.reject"):
            if not self._party_matches(event_type, content):
                return
            reason = content.get("reason") or ("user_hangup" if event_type == "m.call.hangup" else "reject")
            log(f"{self}: got {event_type} ({reason})")
            await self.end(str(reason), by="them", send=False)
        else:
            log(f"ignoring {event_type} in {self}")

    @staticmethod
    def _check_sdp(sdp: str, what: str):
        """setRemoteDescription would take SDP without media (aiortc parses leniently)."""
        try:
            media = SessionDescription.parse(sdp).media
        except Exception as e:
            raise ValueError(f"{what} SDP does not parse: {type(e).__name__}: {e}") from None
        if not media:
            raise ValueError(f"{what} SDP has no media section: {sdp[:100]!r}")

    def _update_remote_metadata(self, content: dict):
        meta = content.get("sdp_stream_metadata") or content.get("org.matrix.msc3077.sdp_stream_metadata")
        if isinstance(meta, dict):
            for stream, m in meta.items():
                if isinstance(m, dict):
                    self.remote_metadata.setdefault(stream, {}).update(m)
            log(f"{self}: remote streams {json.dumps(meta)}")

    async def _on_invite(self, content: dict):
        offer = content.get("offer")
        if not isinstance(offer, dict) or offer.get("type") != "offer" or not isinstance(offer.get("sdp"), str):
            raise ValueError(f"invite without an offer SDP: {str(offer)[:200]}")
        self._check_sdp(offer["sdp"], "the offer")
        self.opponent_party = content.get("party_id")
        self._update_remote_metadata(content)
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=offer["sdp"], type="offer"))
        self._add_usermedia()
        if self.peer.sharing:
            self._add_screen()
        # A track the offer has no m-line for gets a transceiver of its own, which aiortc's
        # setLocalDescription(answer) cannot handle (no offered direction): it waits for our offer.
        with unnegotiated_hidden(self.pc):
            await self.pc.setLocalDescription(await self.pc.createAnswer())
        answer = self.pc.localDescription
        await self.send("m.call.answer", answer={"type": answer.type, "sdp": answer.sdp},
                        capabilities=CAPABILITIES, sdp_stream_metadata=self.local_metadata())
        self.phase = "up"
        log(f"answered {self}: offer {directions(offer['sdp'])}, answer {directions(answer.sdp)}")
        await self.send_end_of_candidates()
        await self._apply_pending_candidates()
        self.spawn(self._timeout(CALLEE_CONNECT_TIMEOUT, lambda: self.connected_ts is None,
                                 "ice_failed", "not connected after the answer"))
        # A track the offer had no place for (a screen share to the bot) needs an offer of ours.
        if any(t.mid is None for t in self.pc.getTransceivers()):
            self.need_negotiation = True
        await self.maybe_negotiate()

    async def _on_answer(self, content: dict):
        if self.role != "caller" or self.phase != "invited":
            log(f"ignoring an m.call.answer in {self} (phase {self.phase})")
            return
        answer = content.get("answer")
        if not isinstance(answer, dict) or not isinstance(answer.get("sdp"), str):
            raise ValueError(f"answer without SDP: {str(answer)[:200]}")
        self._check_sdp(answer["sdp"], "the answer")
        self.opponent_party = content.get("party_id")
        self._update_remote_metadata(content)
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type="answer"))
        self.phase = "up"
        log(f"{self}: answer applied: offer {directions(self.pc.localDescription.sdp)}, "
            f"answer {directions(answer['sdp'])}")
        if self.opponent_party is not None:
            await self.send("m.call.select_answer", selected_party_id=self.opponent_party)
        await self._apply_pending_candidates()
        self.spawn(self._timeout(CONNECT_TIMEOUT, lambda: self.connected_ts is None,
                                 "ice_failed", "not connected after the answer"))
        await self.maybe_negotiate()

    async def _on_candidates(self, content: dict):
        candidates = content.get("candidates")
        if not isinstance(candidates, list):
            raise ValueError("m.call.candidates without a candidates list")
        if self.pc.remoteDescription is None:
            self.pending_candidates.extend(candidates)
            return
        await self._add_candidates(candidates)

    async def _apply_pending_candidates(self):
        pending, self.pending_candidates = self.pending_candidates, []
        await self._add_candidates(pending)

    async def _add_candidates(self, candidates):
        for c in candidates:
            if not isinstance(c, dict):
                log(f"{self}: skipping a candidate that is no object: {c!r}")
                continue
            try:
                candidate = parse_candidate(c)
            except (AssertionError, ValueError, IndexError) as e:
                log(f"{self}: skipping a malformed candidate {c!r}: {type(e).__name__} {e}")
                continue
            if candidate is None:
                continue  # end of candidates
            await self.pc.addIceCandidate(candidate)

    async def _on_negotiate(self, content: dict):
        description = content.get("description")
        if not isinstance(description, dict) or description.get("type") not in ("offer", "answer") \
                or not isinstance(description.get("sdp"), str):
            log(f"ignoring an invalid m.call.negotiate in {self}")
            return
        if self.phase != "up":
            log(f"ignoring an m.call.negotiate in {self} before the call is up")
            return
        kind = description["type"]
        self._check_sdp(description["sdp"], f"the negotiate {kind}")
        state = self.pc.signalingState
        if kind == "answer":
            if state != "have-local-offer":
                log(f"ignoring an m.call.negotiate answer in {self}: no offer of ours waits ({state})")
                return
            self._update_remote_metadata(content)
            await self.pc.setRemoteDescription(RTCSessionDescription(sdp=description["sdp"], type="answer"))
            recvonly = all_recvonly(description["sdp"])
            log(f"{self}: negotiate answer applied: offer {directions(self.pc.localDescription.sdp)}, "
                f"answer {directions(description['sdp'])}")
            emit("negotiated", **self.ident(), offerer="us", answer_recvonly=recvonly)
            await self.maybe_negotiate()
            return
        # Perfect negotiation: the callee is polite.
        collision = self.making_offer or state != "stable"
        if collision and not self.polite:
            log(f"ignoring a colliding m.call.negotiate offer in {self}: we are impolite")
            return
        if collision:
            log(f"{self}: offer collision; rolling back ours (we are polite) and offering again later")
            rollback_local_offer(self.pc, self.pre_offer)
            self.need_negotiation = True
        self._update_remote_metadata(content)
        with unnegotiated_hidden(self.pc):
            await self.pc.setRemoteDescription(RTCSessionDescription(sdp=description["sdp"], type="offer"))
            await self.pc.setLocalDescription(await self.pc.createAnswer())
        answer = self.pc.localDescription
        await self.send("m.call.negotiate", lifetime=CALL_LIFETIME_MS,
                        description={"type": answer.type, "sdp": answer.sdp},
                        sdp_stream_metadata=self.local_metadata())
        recvonly = all_recvonly(answer.sdp)
        log(f"{self}: answered a negotiate offer {directions(description['sdp'])} with {directions(answer.sdp)}")
        emit("negotiated", **self.ident(), offerer="them", answer_recvonly=recvonly)
        await self.maybe_negotiate()

    # --- renegotiation ---

    async def maybe_negotiate(self):
        """The negotiationneeded handler (lock held): offers once the call is up and stable."""
        if not self.need_negotiation or self.ended or self.phase != "up" or self.pc.signalingState != "stable":
            return
        self.need_negotiation = False
        self.making_offer = True
        self.pre_offer = stable_snapshot(self.pc)
        try:
            await self.pc.setLocalDescription(await self.pc.createOffer())
            offer = self.pc.localDescription
            await self.send("m.call.negotiate", lifetime=CALL_LIFETIME_MS,
                            description={"type": offer.type, "sdp": offer.sdp},
                            capabilities=CAPABILITIES, sdp_stream_metadata=self.local_metadata())
        finally:
            self.making_offer = False
        self.negotiations += 1
        number = self.negotiations
        self.spawn(self._negotiate_timeout(number))

    async def _negotiate_timeout(self, number: int):
        await asyncio.sleep(NEGOTIATE_TIMEOUT)
        if not self.ended and self.negotiations == number and self.pc.signalingState == "have-local-offer":
            emit("error", message=f"no m.call.negotiate answer from {self.user} within "
                                  f"{NEGOTIATE_TIMEOUT:g} s in call {self.call_id}")

    async def screen_share(self, on: bool):
        """Adds or removes the screen track and renegotiates; returns when the track was detached
        (off), in ms."""
        async with self.lock:
            if self.ended or self.phase == "new":
                return None  # the invite or the answer still to come will carry the current state
            detached = None
            if on and self.screen is None:
                self._add_screen()
            elif not on and self.screen is not None:
                self._remove_screen()
                detached = now_ms()
            else:
                return None
            self.need_negotiation = True
            await self.maybe_negotiate()
            return detached

    async def send_metadata(self):
        if self.ended or self.phase == "new":
            return
        try:
            await self.send("m.call.sdp_stream_metadata_changed", sdp_stream_metadata=self.local_metadata())
        except MatrixError as e:
            log(f"{self}: sending the stream metadata failed: {e}")

    # --- connection ---

    def _on_connection_state(self):
        state = self.pc.connectionState
        log(f"{self}: connection {state}")
        if state == "connected" and self.connected_ts is None and not self.ended:
            self.connected_ts = now_ms()
            emit("connected", **self.ident(), ts_ms=self.connected_ts)
            self.peer.call_connected(self)
        elif state == "failed" and not self.ended:
            self.request_hangup("ice_failed")

    def _on_track(self, track):
        name = f"{track.kind}{sum(1 for k in self.received if k.startswith(track.kind))}"
        self.received[name] = id(track._queue)  # nothing lands there: see counting_worker

    # --- ending ---

    def request_hangup(self, reason: str):
        """A hangup from a callback or timer; runs beside the worker, not under its lock."""
        if self.hangup_task is None and not self.ended:
            self.hangup_task = asyncio.create_task(self.end(reason, by="us", send=True))

    async def end(self, reason: str, by: str, send: bool):
        if self.ended:
            return
        phase, self.phase = self.phase, "ended"
        if send and (phase != "new" or self.role == "callee"):
            try:
                # The js-sdk sends a hangup from the state it is in, also before an answer.
                await self.send("m.call.hangup", reason=reason)
            except Exception as e:
                log(f"{self}: sending m.call.hangup failed: {e}")
        await self.close()
        sent = {"video": self.camera.n, "audio": self.mic.sample // SAMPLES_PER_FRAME}
        if self.screen is not None:
            sent["screen"] = self.screen.n  # of the share still on
        received = {name: RECEIVED.pop(key, 0) for name, key in self.received.items()}
        log(f"{self} ended ({reason}, by {by}); sent {sent}, received {received}")
        emit("hangup", **self.ident(), by=by, reason=reason)
        self.peer.call_ended(self, reason, by)

    async def close(self):
        self.queue.put_nowait(None)
        current = asyncio.current_task()
        for task in list(self.tasks):
            if task is not current and task is not self.worker:
                task.cancel()
        with contextlib.suppress(Exception):
            await self.pc.close()
        for track in (self.camera, self.mic, self.screen):
            if track is not None:
                track.stop()


# --- the participant -----------------------------------------------------------------------------


@dataclasses.dataclass
class Member:
    session_id: str
    expires_ts: float
    screensharing: bool


@dataclasses.dataclass
class Retry:
    session_id: str
    count: int = 0
    not_before: float = 0.0  # loop time
    exhausted: bool = False


class Participant:
    def __init__(self, args):
        self.args = args
        self.client = Client(args.homeserver)
        self.media = MediaState()
        self.session_id = secrets.token_hex(8)
        self.loop = None
        self.since = None
        self.incremental_sync = False
        self.joined_room = False
        self.joined_users = set()
        self.member_events = {}  # user id -> content of its member event
        self.state_ts = {}  # (type, state_key) -> origin_server_ts of the state event applied
        self.call_state = None  # content of our group call's state event
        self.call_ready = asyncio.Event()
        self.joined = False
        self.members = {}  # (user, device) -> Member, without us
        self.calls = {}  # (user, device) -> PeerCall
        self.by_id = {}  # call_id -> PeerCall
        self.ended_ids = set()
        self.retries = {}  # (user, device) -> Retry
        self.next_seq = {}  # call_id -> the seq expected next
        self.seq_buffers = defaultdict(dict)  # call_id -> seq -> (sender, type, content)
        self.early_candidates = defaultdict(list)  # call_id -> [(sender, type, content)]
        self.sharing = False
        self.leaving = False
        self.end_call = False
        self.stop = asyncio.Event()
        self.commands = asyncio.Lock()
        self.member_lock = asyncio.Lock()
        self.expiry_timer = None
        self.background = set()

    def spawn(self, coro):
        task = asyncio.create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)
        return task

    @property
    def me(self):
        return self.client.user_id, self.client.device_id

    def wanted(self, user: str) -> bool:
        return self.args.only_user is None or user == self.args.only_user

    # --- sync ---

    def sync_filter(self) -> str:
        return json.dumps({
            "presence": {"not_types": ["*"]},
            "account_data": {"not_types": ["*"]},
            "room": {
                "rooms": [self.args.room],
                "timeline": {"limit": 50},
                "ephemeral": {"not_types": ["*"]},
                "account_data": {"not_types": ["*"]},
            },
        })

    async def sync_once(self, timeout_ms: int):
        resp = await self.client.sync(self.since, self.sync_filter(), timeout_ms)
        self.incremental_sync = self.since is not None  # quiet about history in the first sync
        self.since = resp["next_batch"]
        rooms = resp.get("rooms") or {}
        room = (rooms.get("join") or {}).get(self.args.room)
        if room is not None:
            self.joined_room = True
            timeline = room.get("timeline") or {}
            sections = [("state", (room.get("state") or {}).get("events") or []),
                        ("timeline", timeline.get("events") or [])]
            for section, events in sections:
                for event in events:
                    if isinstance(event, dict) and "state_key" in event:
                        try:
                            self.on_state(event, section)
                        except Exception as e:
                            log(f"skipping a state event that would not parse: {type(e).__name__}: {e}")
        elif self.args.room in (rooms.get("leave") or {}):
            self.joined_room = False
            if self.joined and not self.leaving:
                emit("error", message=f"we are no longer in {self.args.room}")
                self.stop.set()
        for event in (resp.get("to_device") or {}).get("events") or []:
            try:
                self.on_to_device(event)
            except Exception as e:
                log(f"skipping a malformed to-device event ({type(e).__name__}: {e}): {str(event)[:300]}")
        self.reconcile()

    async def pump(self):
        while True:
            await self.sync_once(SYNC_TIMEOUT_MS)

    # --- room state ---

    def on_state(self, event: dict, section: str):
        kind, key = event.get("type"), event.get("state_key")
        content = event.get("content")
        if not isinstance(content, dict):
            content = {}
        # Synapse's incremental /sync can hand out stale state: when two state events were sent at
        # the same moment (a fork in the room DAG), the `state` section of the sync that brings
        # the second one may carry the first one's key at its value *before* the first one (seen:
        # a member device gone for a few seconds, until another state event fixed the view). The
        # newer event of a key wins here (one homeserver, one clock).
        ts = event.get("origin_server_ts")
        ts = ts if isinstance(ts, int) else 0
        held = self.state_ts.get((kind, key))
        if held is not None and ts < held:
            if self.incremental_sync:
                log(f"ignoring stale {kind} state of {key!r} from the sync's {section} section "
                    f"(origin_server_ts {ts} < {held})")
            return
        self.state_ts[(kind, key)] = ts
        if kind == "m.room.member":
            if content.get("membership") == "join":
                self.joined_users.add(key)
            else:
                self.joined_users.discard(key)
        elif kind == GROUP_CALL_EVENT and key == self.args.group_call:
            self.call_state = content
            terminated = "m.terminated" in content
            if terminated:
                self.call_ready.clear()
                if self.joined and not self.leaving:
                    log(f"the group call was terminated by {event.get('sender')}: {content['m.terminated']}")
                    emit("call_terminated", by=event.get("sender"))
                    self.stop.set()
            else:
                self.call_ready.set()
        elif kind == MEMBER_EVENT and isinstance(key, str):
            if self.member_events.get(key) != content and key != self.client.user_id:
                log(f"member event of {key}: {json.dumps(content)}")
            self.member_events[key] = content

    def current_members(self) -> dict:
        now = now_ms()
        out = {}
        own_user, own_device = self.me
        for user, content in self.member_events.items():
            if user not in self.joined_users:
                continue
            calls = content.get("m.calls")
            calls = calls if isinstance(calls, list) else []
            call = next((c for c in calls if isinstance(c, dict) and c.get("m.call_id") == self.args.group_call), None)
            devices = call.get("m.devices") if call else None
            for d in devices if isinstance(devices, list) else []:
                if not valid_device(d) or d["expires_ts"] <= now:
                    continue
                if user == own_user and d["device_id"] == own_device:
                    continue
                screensharing = any(isinstance(f, dict) and f.get("purpose") == SCREENSHARE for f in d["feeds"])
                out[(user, d["device_id"])] = Member(d["session_id"], d["expires_ts"], screensharing)
        return out

    def member_content(self, include_us: bool) -> dict:
        """GroupCall.updateDevices: our devices in this call, others' calls kept, ours replaced."""
        content = self.member_events.get(self.client.user_id) or {}
        calls = content.get("m.calls")
        calls = [c for c in calls if isinstance(c, dict)] if isinstance(calls, list) else []
        ours = next((c for c in calls if c.get("m.call_id") == self.args.group_call), {})
        others = [c for c in calls if c is not ours]
        now = now_ms()
        devices = ours.get("m.devices") if isinstance(ours.get("m.devices"), list) else []
        devices = [d for d in devices if valid_device(d) and d["expires_ts"] > now
                   and d["device_id"] != self.client.device_id]
        if include_us:
            feeds = [{"purpose": USERMEDIA}] + ([{"purpose": SCREENSHARE}] if self.sharing else [])
            devices.append({"device_id": self.client.device_id, "session_id": self.session_id,
                            "expires_ts": now + DEVICE_TIMEOUT_MS, "feeds": feeds})
        if devices:
            others.append({**ours, "m.call_id": self.args.group_call, "m.devices": devices})
        return {"m.calls": others}

    async def put_member(self, include_us: bool):
        async with self.member_lock:  # in order: a feeds update never lands after the leave
            if include_us and self.leaving:
                return
            content = self.member_content(include_us)
            await self.client.put_state(self.args.room, MEMBER_EVENT, self.client.user_id, content)
            self.member_events[self.client.user_id] = content
        log(f"member state now {json.dumps(content)}")

    async def refresh_member(self):
        while True:
            await asyncio.sleep(MEMBER_REFRESH_S)
            if self.leaving:
                return
            try:
                await self.put_member(True)
            except MatrixError as e:
                log(f"refreshing the member state failed: {e}")

    # --- who calls whom ---

    def reconcile(self):
        """placeOutgoingCalls + the retry loop + hanging up on members that went away."""
        if not self.joined or self.leaving:
            return
        members = self.current_members()
        if members.keys() != self.members.keys():
            log("member devices now: " + (", ".join(f"{u}/{d}" for u, d in sorted(members)) or "none"))
        self.members = members
        now = self.loop.time()
        own_user, own_device = self.me
        for key, member in self.members.items():
            user, device = key
            if not self.wanted(user):
                continue
            call = self.calls.get(key)
            if call is not None:
                call.member_seen = True
            if not wants_outgoing(own_user, own_device, user, device):
                continue
            if call is not None and call.opponent_session == member.session_id:
                continue
            retry = self.retries.get(key)
            if retry is not None and retry.session_id != member.session_id:
                del self.retries[key]  # a new session of that device: a new participant
                retry = None
            if retry is not None and (retry.exhausted or now < retry.not_before):
                continue
            if call is not None:
                log(f"{user}/{device} has a new session {member.session_id}; replacing {call}")
                call.request_hangup("new_session")
                self.forget(call)
            self.place_call(key, member)
        for key, call in list(self.calls.items()):
            if key in self.members:
                continue
            if call.member_seen or time.monotonic() - call.created > UNKNOWN_DEVICE_GRACE:
                log(f"{key[0]}/{key[1]} is no longer in the group call; hanging up {call}")
                call.request_hangup("user_hangup")
                self.forget(call)
        self.schedule_expiry()

    def schedule_expiry(self):
        if self.expiry_timer is not None:
            self.expiry_timer.cancel()
            self.expiry_timer = None
        if self.members:
            soonest = min(m.expires_ts for m in self.members.values())
            delay = max(0.0, (soonest - now_ms()) / 1000) + 0.05
            self.expiry_timer = self.loop.call_later(delay, self.reconcile)

    def place_call(self, key, member: Member):
        user, device = key
        call = PeerCall(self, user, device, member.session_id, "caller", new_call_id())
        call.member_seen = True
        self.calls[key] = call
        self.by_id[call.call_id] = call
        emit("call", **call.ident(), role="caller")
        log(f"placing {call} (session {member.session_id}, screensharing {member.screensharing})")

        async def run():
            try:
                await call.place(member.screensharing)
            except Exception as e:
                log(f"placing {call} failed: {type(e).__name__}: {e}")
                if not call.ended:
                    emit("error", message=f"placing the call to {user}/{device} failed: {e}")
                    await call.end("signalling_timeout", by="us", send=False)

        call.spawn(run())

    def forget(self, call: PeerCall):
        if self.calls.get(call.key) is call:
            del self.calls[call.key]
        self.by_id.pop(call.call_id, None)
        self.ended_ids.add(call.call_id)

    def call_connected(self, call: PeerCall):
        self.retries.pop(call.key, None)

    def call_ended(self, call: PeerCall, reason: str, by: str):
        was_current = self.calls.get(call.key) is call
        self.forget(call)
        if call.role != "caller" or self.leaving or not was_current:
            return
        if reason in ("new_session", "replaced", "answered_elsewhere") or (by == "us" and reason == "user_hangup"):
            return
        member = self.members.get(call.key)
        if member is None or member.session_id != call.opponent_session:
            return
        retry = self.retries.setdefault(call.key, Retry(member.session_id))
        if retry.count >= MAX_RETRIES:
            retry.exhausted = True
            emit("error", message=f"giving up on {call.user}/{call.device} after {MAX_RETRIES} retries "
                                  f"(last: {reason}, by {by})")
            return
        retry.count += 1
        retry.not_before = self.loop.time() + RETRY_DELAY
        log(f"calling {call.user}/{call.device} again in {RETRY_DELAY:g} s (retry {retry.count}/{MAX_RETRIES})")
        self.loop.call_later(RETRY_DELAY + 0.01, self.reconcile)

    # --- to-device ---

    def on_to_device(self, event: dict):
        event_type, sender, content = event.get("type"), event.get("sender"), event.get("content")
        if not isinstance(event_type, str):
            raise ValueError("no type")
        if event_type == "m.room.encrypted":
            log(f"ignoring an encrypted to-device event from {sender} (this peer has no crypto)")
            return
        if not event_type.startswith("m.call."):
            return
        if not isinstance(content, dict) or not isinstance(sender, str):
            raise ValueError("no content object or sender")
        call_id = content.get("call_id")
        if not isinstance(call_id, str) or not call_id:
            raise ValueError("no call_id")
        seq = content.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool):
            self.deliver(sender, event_type, content)
            return
        # CallEventHandler.onToDeviceEvent: in seq order per call_id, later ones wait.
        expected = self.next_seq.get(call_id, 0)
        if seq != expected:
            buffer = self.seq_buffers[call_id]
            if seq > expected and len(buffer) < SEQ_BUFFER_MAX:
                buffer[seq] = (sender, event_type, content)
                log(f"holding {event_type} seq {seq} of call {call_id} until seq {expected} arrives")
            else:
                log(f"dropping {event_type} seq {seq} of call {call_id} (expected {expected})")
            return
        self.deliver(sender, event_type, content)
        expected = seq + 1
        buffer = self.seq_buffers.get(call_id, {})
        while expected in buffer:
            self.deliver(*buffer.pop(expected))
            expected += 1
        self.next_seq[call_id] = expected
        if not buffer:
            self.seq_buffers.pop(call_id, None)

    def deliver(self, sender: str, event_type: str, content: dict):
        call_id = content["call_id"]
        device = content.get("device_id")
        if content.get("conf_id") != self.args.group_call:
            log(f"ignoring {event_type} of call {call_id}: conf_id {content.get('conf_id')!r} is not ours")
            return
        if content.get("dest_session_id") != self.session_id:
            log(f"ignoring {event_type} of call {call_id}: dest_session_id "
                f"{content.get('dest_session_id')!r} is not our session")
            return
        if not isinstance(device, str):
            log(f"ignoring {event_type} of call {call_id} from {sender}: no device_id")
            return
        if self.leaving or not self.joined:
            log(f"ignoring {event_type} from {sender}/{device}: not in the call")
            return
        call = self.by_id.get(call_id)
        if event_type == "m.call.invite":
            if call is not None:
                log(f"ignoring a repeated invite for {call}")
            else:
                self.on_invite(sender, device, content)
            return
        if call is not None:
            if call.key != (sender, device):
                log(f"ignoring {event_type} for {call} from {sender}/{device}")
                return
            call.queue.put_nowait((sender, event_type, content))
        elif event_type == "m.call.candidates" and call_id not in self.ended_ids:
            stash = self.early_candidates[call_id]
            if len(stash) < EARLY_CANDIDATES_MAX:
                stash.append((sender, event_type, content))
        elif event_type in ("m.call.hangup", "m.call.reject"):
            self.ended_ids.add(call_id)
            self.early_candidates.pop(call_id, None)
        else:
            log(f"ignoring {event_type} for unknown or ended call {call_id} from {sender}/{device}")

    def on_invite(self, sender: str, device: str, content: dict):
        call_id = content["call_id"]
        own_user, own_device = self.me
        if call_id in self.ended_ids:
            log(f"ignoring an invite for call {call_id}, which has ended")
            return
        invitee = content.get("invitee")
        if invitee is not None and invitee != own_user:
            log(f"ignoring an invite for {invitee}")
            return
        if (sender, device) == (own_user, own_device):
            return
        if not self.wanted(sender):
            log(f"ignoring an invite from {sender}/{device} (--only-user {self.args.only_user})")
            return
        session = content.get("sender_session_id")
        if not isinstance(session, str):
            log(f"ignoring an invite from {sender}/{device} without sender_session_id")
            return
        key = (sender, device)
        member = self.members.get(key)
        if member is None:
            log(f"invite from {sender}/{device}, not (yet) a member device of the call: answering anyway")
        elif wants_outgoing(own_user, own_device, sender, device):
            log(f"invite from {sender}/{device}, which we are supposed to call")
        prev = self.calls.get(key)
        if prev is not None:
            if prev.role == "caller" and prev.phase in ("new", "invited"):
                # CallEventHandler's glare rule: the call with the smaller call_id wins.
                if prev.call_id < call_id:
                    log(f"glare with {sender}/{device}: keeping our {prev}, refusing {call_id}")
                    self.spawn(self.refuse(sender, device, session, call_id))
                    return
                log(f"glare with {sender}/{device}: their call {call_id} replaces our {prev}")
            else:
                log(f"their new call {call_id} replaces {prev}")
            prev.request_hangup("replaced")
            self.forget(prev)
        call = PeerCall(self, sender, device, session, "callee", call_id)
        call.member_seen = member is not None
        self.calls[key] = call
        self.by_id[call_id] = call
        emit("call", **call.ident(), role="callee")
        call.queue.put_nowait((sender, "m.call.invite", content))
        for item in self.early_candidates.pop(call_id, []):
            call.queue.put_nowait(item)

    async def refuse(self, user: str, device: str, session: str, call_id: str):
        """Hangs up a call we never took (its first message from us, so seq 0)."""
        self.ended_ids.add(call_id)
        content = {"reason": "replaced", "version": "1", "call_id": call_id, "party_id": self.client.device_id,
                   "conf_id": self.args.group_call, "device_id": self.client.device_id,
                   "sender_session_id": self.session_id, "dest_session_id": session, "seq": 0,
                   TO_DEVICE_MESSAGE_ID: str(uuid.uuid4())}
        try:
            await self.client.send_to_device("m.call.hangup", user, device, content)
        except MatrixError as e:
            log(f"refusing call {call_id}: {e}")

    # --- commands ---

    def live_calls(self):
        return [c for c in self.calls.values() if not c.ended]

    def report_calls(self, first: dict) -> list:
        out = []
        for call_id, ts in sorted(first.items(), key=lambda kv: kv[1]):
            call = self.by_id.get(call_id)
            who = call.ident() if call else {"peer_user": None, "peer_device": None, "call_id": call_id}
            out.append({**who, "ts_ms": ts})
        return out

    async def cmd_mute(self, audio, video):
        changed = {}
        if audio is not None and bool(audio) != self.media.audio_muted:
            changed["audio"] = bool(audio)
        if video is not None and bool(video) != self.media.video_muted:
            changed["video"] = bool(video)
        watching = [c.call_id for c in self.live_calls() if c.connected_ts is not None]
        watch = self.media.watch(changed, watching if changed else [])
        commanded = now_ms()
        self.media.audio_muted = changed.get("audio", self.media.audio_muted)
        self.media.video_muted = changed.get("video", self.media.video_muted)
        # GroupCall.setMicrophoneMuted / setLocalVideoMuted: tracks disabled, then the metadata.
        await asyncio.gather(*(c.send_metadata() for c in self.live_calls()))
        first = await self.media.wait(watch, MUTE_WATCH_S)
        ts = min(first.values()) if first else commanded
        emit("muted", audio=self.media.audio_muted, video=self.media.video_muted, ts_ms=ts,
             calls=self.report_calls(first))

    async def cmd_screen_share(self, on: bool):
        if on == self.sharing:
            raise ValueError(f"screen share is already {'on' if on else 'off'}")
        self.sharing = on
        calls = self.live_calls()
        if on:
            # Calls not up yet get the screen with their invite or answer, on their own time.
            watch = self.media.watch({"screen": True}, [c.call_id for c in calls if c.phase == "up"])
        commanded = now_ms()
        results = await asyncio.gather(*(c.screen_share(on) for c in calls), return_exceptions=True)
        detached = {}
        for call, result in zip(calls, results):
            if isinstance(result, Exception):
                log(f"screen share {'on' if on else 'off'} in {call} failed: {result!r}")
                emit("error", message=f"screen share in call {call.call_id}: {result!r}")
            elif result is not None:
                detached[call.call_id] = result
        try:
            await self.put_member(True)  # onLocalFeedsChanged: the feeds changed
        except MatrixError as e:
            emit("error", message=f"updating the member feeds failed: {e}")
        first = await self.media.wait(watch, SCREEN_WATCH_S) if on else detached
        ts = min(first.values()) if first else commanded
        emit("screen_share", on=on, ts_ms=ts, calls=self.report_calls(first))

    async def handle(self, line: str):
        try:
            msg = json.loads(line)
            if not isinstance(msg, dict):
                raise ValueError("not a JSON object")
            cmd = msg.get("cmd")
            if cmd in ("leave", "end_call"):  # at once, not after a command still waiting
                self.end_call = self.end_call or cmd == "end_call"
                self.stop.set()
                return
            if cmd not in ("mute", "screen_share"):
                raise ValueError(f"unknown cmd {cmd!r}")
            if cmd == "screen_share" and not isinstance(msg.get("on"), bool):
                raise ValueError("screen_share wants a boolean 'on'")
            async with self.commands:  # one media change at a time, in order
                if self.leaving or self.stop.is_set():
                    raise ValueError(f"{cmd!r} while leaving")
                if cmd == "mute":
                    await self.cmd_mute(msg.get("audio"), msg.get("video"))
                else:
                    await self.cmd_screen_share(msg["on"])
        except Exception as e:  # a bad command must not end the participant
            log(f"command {line.strip()!r} failed: {type(e).__name__}: {e}")
            emit("error", message=f"{type(e).__name__}: {e}")

    def start_stdin(self):
        loop = self.loop

        def reader():
            for line in sys.stdin:
                if line.strip():
                    asyncio.run_coroutine_threadsafe(self.handle(line), loop)
            log("stdin closed; still running")

        threading.Thread(target=reader, name="stdin", daemon=True).start()

    # --- the run ---

    async def join_call(self):
        args = self.args
        await self.sync_once(0)
        if not self.joined_room:
            log(f"not in {args.room}; joining it")
            await self.client.join(args.room)
            await self.sync_once(0)
        if args.create_call:
            content = {k: v for k, v in (self.call_state or {}).items() if k != "m.terminated"}
            content.update({"m.intent": "m.room", "m.type": "m.video"})
            await self.client.put_state(args.room, GROUP_CALL_EVENT, args.group_call, content)
            self.call_state = content
            self.call_ready.set()
            log(f"group call {args.group_call} created in {args.room}")
        deadline = self.loop.time() + args.join_timeout
        while not self.call_ready.is_set():
            left = deadline - self.loop.time()
            if left <= 0:
                raise Failed(f"no group call {args.group_call} in {args.room} within {args.join_timeout:g} s")
            await self.sync_once(int(min(left, SYNC_TIMEOUT_MS / 1000) * 1000))
        await self.put_member(True)
        self.joined = True
        emit("joined", user=self.client.user_id, device=self.client.device_id, session_id=self.session_id,
             group_call=args.group_call, room=args.room)

    async def leave(self):
        """GroupCall.leave (and terminate): hang up every call, then withdraw our device."""
        self.leaving = True
        if self.expiry_timer is not None:
            self.expiry_timer.cancel()
        await asyncio.gather(*(c.end("user_hangup", by="us", send=True) for c in list(self.calls.values())),
                             return_exceptions=True)
        ts = now_ms()
        if self.joined:
            await self.put_member(False)
        if self.end_call:
            content = {**(self.call_state or {}), "m.terminated": "call_ended"}
            await self.client.put_state(self.args.room, GROUP_CALL_EVENT, self.args.group_call, content)
            log(f"group call {self.args.group_call} terminated")
        emit("left", ts_ms=ts)

    async def run(self) -> int:
        self.loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self.stop.set)
        Stdout.on_close.append(self.stop.set)
        await self.client.login(self.args.user, self.args.password)
        log(f"logged in as {self.client.user_id}, device {self.client.device_id}, session {self.session_id}")
        code = 0
        pump = None
        try:
            await self.join_call()
            pump = asyncio.create_task(self.pump())
            refresh = self.spawn(self.refresh_member())
            self.start_stdin()
            if self.args.seconds is not None:
                self.loop.call_later(self.args.seconds, self.stop.set)
            self.reconcile()
            stopper = asyncio.create_task(self.stop.wait())
            done, _ = await asyncio.wait([stopper, pump], return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            refresh.cancel()
            if pump in done:
                pump.result()  # raises what stopped it
                raise Failed("the /sync loop stopped")
            log("leaving")
        except (Failed, MatrixError) as e:
            log(f"failed: {e}")
            emit("error", message=str(e))
            code = 1
        except Exception as e:
            traceback.print_exc(file=sys.stderr)
            emit("error", message=f"{type(e).__name__}: {e}")
            code = 1
        finally:
            if pump is not None:
                pump.cancel()
            try:
                await self.leave()
            except Exception as e:
                log(f"leaving failed: {type(e).__name__}: {e}")
                emit("error", message=f"leaving failed: {e}")
                code = 1
            try:
                await self.client.logout()
            except MatrixError as e:
                log(f"logout failed: {e}")
        return code


def parse_size(text: str):
    try:
        w, h = (int(p) for p in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError("want WIDTHxHEIGHT, e.g. 320x180") from None
    if w < 32 or h < 16 or w % 2 or h % 2:
        raise argparse.ArgumentTypeError("width >= 32, height >= 16, both even")
    return w, h


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--homeserver", required=True, help="client-server API base URL")
    p.add_argument("--user", required=True, help="localpart or full user id")
    p.add_argument("--password", required=True)
    p.add_argument("--room", required=True, help="the room id of the group call")
    p.add_argument("--group-call", required=True, help="the group call id (state key of its state event)")
    p.add_argument("--create-call", action="store_true", help="put the group call state event first")
    p.add_argument("--grey", type=int, default=128, help="the camera's background grey level (0-255)")
    p.add_argument("--size", type=parse_size, default=(320, 180), help="video size WxH (320x180)")
    p.add_argument("--fps", type=int, default=15, help="video frame rate (15)")
    p.add_argument("--only-user", help="call and answer this user only")
    p.add_argument("--seconds", type=float, help="leave after this long (default: on a command)")
    p.add_argument("--join-timeout", type=float, default=60.0,
                   help="seconds to wait for the group call state event (without --create-call)")
    args = p.parse_args(argv)
    if not 0 <= args.grey <= 255:
        p.error("--grey must be in 0..255")
    if not 1 <= args.fps <= 60:
        p.error("--fps must be in 1..60")
    return args


async def main(args) -> int:
    # aiortc encodes in the default executor, and the HTTP requests run in threads too (one
    # blocked in a 5 s long-poll): give them room, since asyncio's default is cores + 4 threads.
    asyncio.get_running_loop().set_default_executor(concurrent.futures.ThreadPoolExecutor(max_workers=32))
    aiortc.rtcrtpreceiver.decoder_worker = counting_worker
    try:
        return await Participant(args).run()
    except Exception as e:
        log(f"failed: {type(e).__name__}: {e}")
        emit("error", message=f"{type(e).__name__}: {e}")
        return 1


if __name__ == "__main__":
    arguments = parse_args()
    # Not asyncio.run: its shutdown waits for the executor's threads, among them the last /sync
    # long-poll, which cannot be interrupted. Everything of ours is closed when main returns.
    code = asyncio.new_event_loop().run_until_complete(main(arguments))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
