"""A Matrix 1:1 VoIP caller for mxrec's end-to-end tests and demo: plain HTTP + aiortc.

It is independent of the bot under test on both halves: the Matrix side is a few client-server
API calls made with urllib (no SDK), the media side is aiortc (not webrtc-rs). It
1. logs in with a password (m.login.password); its device id is its VoIP party_id;
2. unless --room is given, creates a DM with the bot (is_direct, trusted_private_chat, bot invited);
3. waits, on /sync, until the bot has joined;
4. calls the bot: `m.call.invite` (version "1") whose offer carries every ICE candidate, since aiortc
   gathers them all inside setLocalDescription, so it never trickles its own;
5. applies the bot's first `m.call.answer` and answers it with `m.call.select_answer`, then adds the
   bot's `m.call.candidates`;
6. once connected, sends the synthetic media of aiortc_sender.py (a frame counter and a white flash
   every second on video, a 1 kHz beep at every flash on audio) for --seconds;
   with --screen-share-at S, S seconds into the media it also shares a "screen" the way the js-sdk
   does: a second counter video (blue background, counting from 0) on a new sendonly transceiver
   with its own stream id, offered in `m.call.negotiate` {description {type "offer"}, lifetime,
   sdp_stream_metadata: camera stream m.usermedia, new stream m.screenshare}; the bot's
   `m.call.negotiate` answer must come within 15 s and is applied with setRemoteDescription;
7. sends `m.call.hangup` (reason user_hangup), closes the peer connection, and keeps syncing until
   the bot posts its "Recording saved:" notice (or "Recording failed:"), or --wait-links passes;
8. logs out, so repeated runs leave no devices behind.

Only events whose sender is the bot count, and call events only with this run's call_id. Notices
count only once the invite is out, so an older call's notice in a reused room is not taken.

stdout gets exactly one JSON line at the end (also when something failed early, with what is known):
  {"room_id", "call_id", "caller", "connected_ts_ms", "hangup_ts_ms",
   "recording_notice": {"body", "origin_server_ts", "event_id"} | null,  # "This call is being…"
   "links_notice": {"body", "origin_server_ts", "event_id"} | null,      # "Recording saved: …"
   "answer_sdp_recvonly": bool,
   "screen_share": {"negotiated", "answer_recvonly", "stream_id"} | null,  # null without the option
   "hangup_by": "caller" | "bot" | null, "error": str | null}
"negotiated" is whether the bot's negotiate answer arrived and was applied, "answer_recvonly"
whether every media section of that answer is recvonly.
Timestamps are this machine's wall clock in ms since the epoch. Exit status: 0 when the links notice
arrived and nothing failed, 1 otherwise (2 for bad arguments). Diagnostics go to stderr.
"""

import argparse
import asyncio
import dataclasses
import itertools
import json
import secrets
import signal
import sys
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request
from collections import defaultdict

from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.sdp import SessionDescription, candidate_from_sdp

from aiortc_sender import SAMPLES_PER_FRAME, BeepAudio, CounterVideo, SharedStart

# Long-poll length of one /sync. Short enough that the last one, which nobody waits for, ends soon
# after the run (the worker thread cannot be interrupted), long enough not to spin.
SYNC_TIMEOUT_MS = 5_000
# Attempts of an idempotent request (sync, send) on connection errors, 429 and 5xx.
RETRIES = 5

# How long the bot may take to answer the screen-share m.call.negotiate offer.
NEGOTIATE_TIMEOUT = 15.0
# The screen share's counter video background (RGB): blue, unlike the camera's grey.
SCREEN_BACKGROUND = (40, 70, 170)

RECORDING_STARTED = "This call is being recorded by "
RECORDING_SAVED = "Recording saved:"
RECORDING_FAILED = "Recording failed:"


def log(*args):
    print("matrix_caller:", *args, file=sys.stderr, flush=True)


def now_ms() -> int:
    return int(time.time() * 1000)


class Failed(Exception):
    """The run cannot go on. `hangup_reason` is what the caller tells the bot if a call is up."""

    def __init__(self, message: str, hangup_reason: str = "user_hangup"):
        super().__init__(message)
        self.hangup_reason = hangup_reason


class MatrixError(Exception):
    """A homeserver request failed: an HTTP error status, or no answer at all (status None)."""

    def __init__(self, what: str, status, body: dict):
        super().__init__(f"{what}: HTTP {status} {body}" if status else f"{what}: {body.get('error')}")
        self.status = status
        self.retry_after_ms = body.get("retry_after_ms")


def quote(part: str) -> str:
    return urllib.parse.quote(part, safe="")


class Matrix:
    """The handful of client-server API calls the caller needs.

    Requests are blocking urllib calls run in worker threads, which keeps the venv at what aiortc
    needs. Only idempotent requests are retried: /sync, and sends, whose transaction id makes a
    repeat harmless; createRoom and login are not, since a repeat would make a second room or device.
    """

    def __init__(self, homeserver: str):
        self.api = homeserver.rstrip("/") + "/_matrix/client/v3"
        self.token = None
        self.user_id = None
        self.device_id = None
        # Transaction ids need only be unique per access token, which a counter gives; the random
        # part keeps them unique even for a token shared by two processes.
        self._txn_prefix = f"mxrec-caller-{secrets.token_hex(6)}"
        self._txn_counter = itertools.count()

    def _blocking(self, method: str, path: str, body, query, timeout: float) -> dict:
        url = self.api + path + ("?" + urllib.parse.urlencode(query) if query else "")
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = "Bearer " + self.token
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.load(resp)

    async def request(self, method: str, path: str, body=None, query=None, timeout=30.0,
                      retry=False) -> dict:
        what = f"{method} {path}"
        delay = 0.5
        for attempt in itertools.count(1):
            try:
                return await asyncio.to_thread(self._blocking, method, path, body, query, timeout)
            except urllib.error.HTTPError as e:
                try:
                    detail = json.load(e)
                except ValueError:
                    detail = {}
                err = MatrixError(what, e.code, detail)
                transient = e.code == 429 or e.code >= 500
            except OSError as e:  # URLError, refused connections, timeouts
                err = MatrixError(what, None, {"error": str(e)})
                transient = True
            if not (retry and transient) or attempt == RETRIES:
                raise err
            wait = err.retry_after_ms / 1000 if err.retry_after_ms else delay
            log(f"{err}; retry {attempt}/{RETRIES - 1} in {wait:.1f} s")
            await asyncio.sleep(wait)
            delay = min(delay * 2, 8.0)

    async def login(self, user: str, password: str):
        resp = await self.request("POST", "/login", {
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": user},
            "password": password,
            "initial_device_display_name": "mxrec test caller",
        })
        self.token, self.user_id = resp["access_token"], resp["user_id"]
        self.device_id = resp["device_id"]

    async def logout(self):
        await self.request("POST", "/logout", {})
        self.token = None

    async def create_dm(self, invitee: str) -> str:
        resp = await self.request("POST", "/createRoom", {
            "preset": "trusted_private_chat",
            "is_direct": True,
            "invite": [invitee],
        })
        return resp["room_id"]

    async def joined_members(self, room_id: str) -> list:
        resp = await self.request("GET", f"/rooms/{quote(room_id)}/joined_members", retry=True)
        return sorted(resp.get("joined", {}))

    async def send(self, room_id: str, event_type: str, content: dict) -> str:
        txn = f"{self._txn_prefix}-{next(self._txn_counter)}"
        path = f"/rooms/{quote(room_id)}/send/{quote(event_type)}/{txn}"
        return (await self.request("PUT", path, content, retry=True))["event_id"]

    async def sync(self, since, filter_json: str, timeout_ms: int) -> dict:
        query = {"filter": filter_json, "timeout": str(timeout_ms)}
        if since:
            query["since"] = since
        return await self.request("GET", "/sync", query=query, timeout=timeout_ms / 1000 + 30, retry=True)


class RoomSync:
    """Long-polls /sync for one room and hands its events, in timeline order, to a handler.

    The first sync has no `since`: it carries the room's current state and recent history, handed
    over with live=False so the handler can learn memberships from it without reacting to old
    events. Every later sync runs in a background task (the pump); the main flow waits for the
    conditions the handler sets with `until`, which also surfaces a pump that died.
    """

    def __init__(self, client: Matrix, room_id: str, handler):
        self.client = client
        self.room_id = room_id
        self.handler = handler
        self.since = None
        self.task = None
        # Only this room; no presence, account data, receipts or typing.
        self.filter = json.dumps({
            "presence": {"not_types": ["*"]},
            "account_data": {"not_types": ["*"]},
            "room": {
                "rooms": [room_id],
                "timeline": {"limit": 100},
                "ephemeral": {"not_types": ["*"]},
                "account_data": {"not_types": ["*"]},
            },
        })

    async def start(self):
        await self._sync_once(live=False, timeout_ms=0)
        self.task = asyncio.create_task(self._pump())

    async def stop(self):
        if self.task is None:
            return
        self.task.cancel()
        try:
            await self.task
        except asyncio.CancelledError:
            pass
        except Exception as e:  # it died earlier; `until` reports that when it is waiting
            log(f"the /sync loop had stopped: {e}")

    async def _pump(self):
        while True:
            await self._sync_once(live=True, timeout_ms=SYNC_TIMEOUT_MS)

    async def _sync_once(self, live: bool, timeout_ms: int):
        resp = await self.client.sync(self.since, self.filter, timeout_ms)
        self.since = resp["next_batch"]
        room = resp.get("rooms", {}).get("join", {}).get(self.room_id, {})
        timeline = room.get("timeline", {})
        if live and timeline.get("limited"):
            log("warning: /sync skipped part of the room's timeline (limited); events may be missing")
        for event in room.get("state", {}).get("events", []) + timeline.get("events", []):
            await self.handler(event, live)

    async def until(self, *conditions: asyncio.Event, timeout: float) -> bool:
        """Waits until one of `conditions` is set or `timeout` s pass; True if one is set."""
        waiters = [asyncio.create_task(c.wait()) for c in conditions]
        try:
            done, _ = await asyncio.wait([*waiters, self.task], timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
        if self.task in done:
            self.task.result()  # raises what stopped the pump
            raise Failed("the /sync loop stopped")
        return any(c.is_set() for c in conditions)


@dataclasses.dataclass
class Report:
    """The JSON line printed at the end (see the module docstring)."""

    room_id: str = None
    call_id: str = None
    caller: str = None
    connected_ts_ms: int = None
    hangup_ts_ms: int = None
    recording_notice: dict = None
    links_notice: dict = None
    answer_sdp_recvonly: bool = False
    screen_share: dict = None
    hangup_by: str = None
    error: str = None


def all_recvonly(sdp: str) -> bool:
    """Whether every media section of an answer is recvonly (what a recording bot should answer)."""
    media = SessionDescription.parse(sdp).media
    return bool(media) and all(m.direction == "recvonly" for m in media)


def stream_ids(sdp: str) -> list:
    """The msid stream ids of an SDP (aiortc puts every addTrack track in one stream)."""
    ids = []
    for m in SessionDescription.parse(sdp).media:
        stream = (m.msid or "").split(" ")[0]
        if stream and stream != "-" and stream not in ids:
            ids.append(stream)
    return ids


def notice(event: dict) -> dict:
    return {
        "body": event["content"]["body"],
        "origin_server_ts": event.get("origin_server_ts"),
        "event_id": event.get("event_id"),
    }


class Call:
    """One call from the caller to the bot: the aiortc peer connection and what the bot's events
    have said so far.

    `on_event` is the RoomSync handler. It answers what needs answering at once (select_answer,
    candidates) and sets the asyncio.Events the main flow waits on; the Report collects the outcome.
    """

    def __init__(self, client: Matrix, room_id: str, bot: str, report: Report):
        self.client = client
        self.room_id = room_id
        self.bot = bot
        self.report = report
        self.call_id = f"mxrec-caller-{secrets.token_hex(12)}"
        self.party_id = client.device_id

        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        start = SharedStart()
        self.video, self.audio = CounterVideo(start), BeepAudio(start)
        self.pc.addTrack(self.video)
        self.pc.addTrack(self.audio)
        self.pc.on("connectionstatechange", self._on_connection_state)

        self.invited = False
        self.hung_up = False
        self.opponent = None  # the party_id of the answer taken
        self.early_candidates = defaultdict(list)  # per party_id, before an answer is taken
        self.candidates_added = 0
        self.screen = None  # the screen-share track, once added
        self.screen_offered = False  # a negotiate offer waits for its answer

        self.bot_joined = asyncio.Event()
        self.bot_refused = asyncio.Event()  # left or was banned while we wait for it
        self.answered = asyncio.Event()
        self.ended_by_bot = asyncio.Event()  # hangup or reject from the bot
        self.connected = asyncio.Event()
        self.screen_answered = asyncio.Event()  # the bot's negotiate answer was applied
        self.failed = asyncio.Event()
        self.finished = asyncio.Event()  # the "Recording saved:" or "Recording failed:" notice

    def _on_connection_state(self):
        state = self.pc.connectionState
        log("connection state", state)
        if state == "connected" and not self.connected.is_set():
            self.report.connected_ts_ms = now_ms()
            self.connected.set()
        elif state == "failed":
            self.failed.set()

    def _content(self, **fields) -> dict:
        return {"call_id": self.call_id, "party_id": self.party_id, "version": "1", **fields}

    async def invite(self):
        await self.pc.setLocalDescription(await self.pc.createOffer())
        offer = self.pc.localDescription
        streams = stream_ids(offer.sdp)
        if not streams:
            raise Failed("the aiortc offer has no msid stream id")
        usermedia = {"purpose": "m.usermedia", "audio_muted": False, "video_muted": False}
        self.invited = True
        self.report.call_id = self.call_id
        event_id = await self.client.send(self.room_id, "m.call.invite", self._content(
            lifetime=60_000,
            offer={"type": offer.type, "sdp": offer.sdp},
            sdp_stream_metadata={s: usermedia for s in streams},
            capabilities={"m.call.transferee": False, "m.call.dtmf": False},
        ))
        log(f"sent m.call.invite {event_id} (call {self.call_id}, party {self.party_id}, "
            f"streams {streams})")

    async def share_screen(self):
        """Adds the screen-share track on its own sendonly transceiver and stream, and offers it in
        m.call.negotiate; `_on_negotiate` applies the answer."""
        stream_id = f"screen-{secrets.token_hex(8)}"
        self.screen = CounterVideo(SharedStart(), background=SCREEN_BACKGROUND)
        transceiver = self.pc.addTransceiver(self.screen, "sendonly")
        transceiver.sender._stream_id = stream_id  # private aiortc attribute, read by createOffer
        await self.pc.setLocalDescription(await self.pc.createOffer())
        offer = self.pc.localDescription
        streams = stream_ids(offer.sdp)
        if stream_id not in streams or len(streams) < 2:
            raise Failed(f"the screen-share offer has streams {streams}, not the camera's and "
                         f"{stream_id}", "unknown_error")
        usermedia = {"purpose": "m.usermedia", "audio_muted": False, "video_muted": False}
        screenshare = {"purpose": "m.screenshare", "audio_muted": False, "video_muted": False}
        self.report.screen_share = {"negotiated": False, "answer_recvonly": False, "stream_id": stream_id}
        self.screen_offered = True
        event_id = await self.client.send(self.room_id, "m.call.negotiate", self._content(
            lifetime=60_000,
            description={"type": offer.type, "sdp": offer.sdp},
            sdp_stream_metadata={s: screenshare if s == stream_id else usermedia for s in streams},
        ))
        log(f"sent m.call.negotiate {event_id} offering screen share stream {stream_id} "
            f"(streams {streams})")

    async def hangup(self, reason: str):
        if self.hung_up:
            return
        self.hung_up = True
        self.report.hangup_ts_ms = now_ms()
        self.report.hangup_by = "caller"
        await self.client.send(self.room_id, "m.call.hangup", self._content(reason=reason))
        log(f"sent m.call.hangup ({reason})")

    async def on_event(self, event: dict, live: bool):
        sender, kind = event.get("sender"), event.get("type", "")
        content = event.get("content") or {}
        if sender != self.bot:
            return
        if kind == "m.room.member" and event.get("state_key") == self.bot:
            self._on_bot_membership(content.get("membership"), live)
        elif kind.startswith("m.call.") and content.get("call_id") == self.call_id and live:
            await self._on_call_event(kind, content)
        elif kind == "m.room.message" and content.get("msgtype") == "m.notice" and live and self.invited:
            self._on_notice(event)

    def _on_bot_membership(self, membership, live: bool):
        if membership == "join":
            self.bot_joined.set()
            return
        self.bot_joined.clear()
        if live and membership in ("leave", "ban"):
            log(f"the bot's membership is now {membership}")
            self.bot_refused.set()

    async def _on_call_event(self, kind: str, content: dict):
        party = content.get("party_id")
        if kind == "m.call.answer":
            await self._on_answer(content)
        elif kind == "m.call.negotiate":
            await self._on_negotiate(content)
        elif kind == "m.call.candidates":
            for c in content.get("candidates") or []:
                if self.opponent is None:
                    self.early_candidates[party].append(c)
                elif party == self.opponent:
                    await self._add_candidate(c)
        elif kind in ("m.call.hangup", "m.call.reject"):
            if self.opponent is not None and party != self.opponent:
                log(f"ignoring {kind} from party {party}, not the one answered")
                return
            log(f"the bot sent {kind} (reason {content.get('reason')!r})")
            if not self.hung_up:
                self.hung_up = True
                self.report.hangup_ts_ms = now_ms()
                self.report.hangup_by = "bot"
            self.ended_by_bot.set()
        else:
            log(f"ignoring {kind} from the bot")

    async def _on_answer(self, content: dict):
        if self.opponent is not None:
            log(f"ignoring another m.call.answer, from party {content.get('party_id')}")
            return
        answer = content.get("answer") or {}
        if answer.get("type") != "answer" or not answer.get("sdp"):
            raise Failed(f"the bot's m.call.answer has no answer SDP: {answer!r:.200}")
        self.opponent = content.get("party_id")
        if self.opponent is None:
            log("warning: the bot's answer has no party_id (VoIP version 0?)")
        self.report.answer_sdp_recvonly = all_recvonly(answer["sdp"])
        log(f"got m.call.answer from party {self.opponent}; recvonly: {self.report.answer_sdp_recvonly}")
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type="answer"))
        await self.client.send(self.room_id, "m.call.select_answer",
                               self._content(selected_party_id=self.opponent))
        for c in self.early_candidates.pop(self.opponent, []):
            await self._add_candidate(c)
        self.early_candidates.clear()
        self.answered.set()

    async def _on_negotiate(self, content: dict):
        party = content.get("party_id")
        description = content.get("description") or {}
        if party != self.opponent:
            log(f"ignoring m.call.negotiate from party {party}, not the one answered")
            return
        if description.get("type") != "answer":
            log(f"ignoring an m.call.negotiate of type {description.get('type')!r} from the bot "
                "(a recording bot should never offer)")
            return
        if not self.screen_offered:
            log("ignoring an m.call.negotiate answer that no offer of ours waits for")
            return
        if not description.get("sdp"):
            raise Failed("the bot's m.call.negotiate answer has no SDP", "unknown_error")
        self.screen_offered = False
        recvonly = all_recvonly(description["sdp"])
        self.report.screen_share["answer_recvonly"] = recvonly
        log(f"got the m.call.negotiate answer; recvonly: {recvonly}")
        try:
            await self.pc.setRemoteDescription(RTCSessionDescription(sdp=description["sdp"], type="answer"))
        except Exception as e:
            raise Failed(f"setRemoteDescription of the negotiate answer failed: "
                         f"{type(e).__name__}: {e}", "unknown_error") from e
        self.report.screen_share["negotiated"] = True
        self.screen_answered.set()

    async def _add_candidate(self, c: dict):
        """Adds one trickled candidate; an empty one is end-of-candidates (None for aiortc).

        aiortc drops candidates that come after end-of-candidates, which the bot's answer SDP
        already carries, so later ones only count if the answer did not end the list.
        """
        line = c.get("candidate") or ""
        if not line:
            await self.pc.addIceCandidate(None)
            return
        try:
            candidate = candidate_from_sdp(line.removeprefix("candidate:"))
        except (AssertionError, ValueError, IndexError):
            log(f"warning: ignoring a malformed candidate from the bot: {line!r}")
            return
        candidate.sdpMid = c.get("sdpMid")
        candidate.sdpMLineIndex = c.get("sdpMLineIndex")
        await self.pc.addIceCandidate(candidate)
        self.candidates_added += 1

    def _on_notice(self, event: dict):
        body = event["content"].get("body", "")
        if body.startswith(RECORDING_STARTED) and self.report.recording_notice is None:
            self.report.recording_notice = notice(event)
            log("recording notice:", body)
        elif body.startswith(RECORDING_SAVED) and not self.finished.is_set():
            self.report.links_notice = notice(event)
            log("links notice:", body.splitlines()[0], "(the whole body is in the JSON line)")
            self.finished.set()
        elif body.startswith(RECORDING_FAILED) and not self.finished.is_set():
            self.report.error = f"the bot posted: {body}"
            log("failure notice:", body)
            self.finished.set()
        else:
            log("another notice from the bot:", body)


async def wait_for_bot(call: Call, sync: RoomSync, timeout: float):
    if not await sync.until(call.bot_joined, call.bot_refused, timeout=timeout):
        raise Failed(f"the bot {call.bot} did not join {call.room_id} within {timeout} s")
    if not call.bot_joined.is_set():
        raise Failed(f"the bot {call.bot} left or refused the invite to {call.room_id} "
                     "(is the caller an allowed inviter?)")
    members = await call.client.joined_members(call.room_id)
    log(f"the bot is in the room; joined members: {', '.join(members)}")
    if len(members) != 2:
        log("warning: the bot answers 1:1 calls only in rooms of exactly two joined members")


async def talk(call: Call, sync: RoomSync, args):
    """From the invite to the end of the media; raises Failed with the hangup reason to send."""
    await call.invite()
    if not await sync.until(call.answered, call.ended_by_bot, timeout=args.answer_timeout):
        raise Failed(f"no m.call.answer within {args.answer_timeout} s", "invite_timeout")
    if call.ended_by_bot.is_set() and not call.answered.is_set():
        raise Failed("the bot ended the call without answering")
    if not await sync.until(call.connected, call.failed, call.ended_by_bot, timeout=args.connect_timeout):
        raise Failed(f"not connected {args.connect_timeout} s after the answer "
                     f"(state {call.pc.connectionState})", "ice_failed")
    if call.failed.is_set():
        raise Failed("the connection failed before media flowed", "ice_failed")
    if call.ended_by_bot.is_set():
        return
    log(f"connected; sending media for {args.seconds} s")
    loop = asyncio.get_running_loop()
    end = loop.time() + args.seconds
    if args.screen_share_at is not None and not await sync.until(
            call.ended_by_bot, call.failed, timeout=args.screen_share_at):
        await share_screen(call, sync)
    if not (call.ended_by_bot.is_set() or call.failed.is_set()):
        await sync.until(call.ended_by_bot, call.failed, timeout=max(0.0, end - loop.time()))
    if call.failed.is_set():
        raise Failed("the connection failed during the call", "ice_failed")
    screen = f", {call.screen.n} screen-share frames" if call.screen else ""
    log(f"sent {call.video.n} video frames, {call.audio.sample // SAMPLES_PER_FRAME} audio frames"
        f"{screen}; {call.candidates_added} trickled candidates passed to aiortc")


async def share_screen(call: Call, sync: RoomSync):
    """Offers the screen share and waits for the bot's negotiate answer (or the end of the call)."""
    await call.share_screen()
    if not await sync.until(call.screen_answered, call.ended_by_bot, call.failed,
                            timeout=NEGOTIATE_TIMEOUT):
        raise Failed(f"no m.call.negotiate answer within {NEGOTIATE_TIMEOUT:g} s", "unknown_error")
    if call.screen_answered.is_set():
        log("screen share negotiated")


async def call_bot(args, report: Report):
    client = Matrix(args.homeserver)
    await client.login(args.user, args.password)
    report.caller = client.user_id
    log(f"logged in as {client.user_id}, device {client.device_id}")
    try:
        room_id = args.room or await client.create_dm(args.bot)
        report.room_id = room_id
        log(f"room {room_id}" + ("" if args.room else f" created, {args.bot} invited"))
        call = Call(client, room_id, args.bot, report)
        sync = RoomSync(client, room_id, call.on_event)
        try:
            await sync.start()
            await wait_for_bot(call, sync, args.join_timeout)
            reason = "user_hangup"
            try:
                await talk(call, sync, args)
            except Failed as e:
                reason = e.hangup_reason
                raise
            finally:
                if call.invited:
                    await call.hangup(reason)
                await call.pc.close()
            if not await sync.until(call.finished, timeout=args.wait_links):
                raise Failed(f"no '{RECORDING_SAVED}' notice within {args.wait_links} s after the hangup")
        finally:
            await sync.stop()
            await call.pc.close()
    finally:
        try:
            await client.logout()
        except MatrixError as e:
            log(f"logout failed: {e}")


async def main(args) -> int:
    report = Report()
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    try:
        await call_bot(args, report)
    except (Failed, MatrixError) as e:
        report.error = report.error or str(e)
    except asyncio.CancelledError:
        report.error = report.error or "interrupted by a signal"
    except Exception as e:
        traceback.print_exc(file=sys.stderr)
        report.error = report.error or f"{type(e).__name__}: {e}"
    if report.error:
        log("error:", report.error)
    print(json.dumps(dataclasses.asdict(report)), flush=True)
    return 0 if report.links_notice and not report.error else 1


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--homeserver", required=True,
                        help="client-server API base URL, e.g. http://127.0.0.1:18008")
    parser.add_argument("--user", required=True, help="the caller's localpart (or full user id)")
    parser.add_argument("--password", required=True)
    parser.add_argument("--bot", required=True, help="the recording bot's user id, e.g. @rec:localhost")
    parser.add_argument("--seconds", type=float, default=10.0,
                        help="how long to send media once connected")
    parser.add_argument("--room", help="call in this room (the caller and the bot must be its only "
                        "members) instead of creating a DM")
    parser.add_argument("--join-timeout", type=float, default=60.0,
                        help="seconds to wait for the bot to join")
    parser.add_argument("--answer-timeout", type=float, default=30.0,
                        help="seconds to wait for m.call.answer")
    parser.add_argument("--connect-timeout", type=float, default=30.0,
                        help="seconds from the answer to a connected peer connection")
    parser.add_argument("--wait-links", type=float, default=90.0,
                        help="seconds after the hangup to wait for the 'Recording saved:' notice")
    parser.add_argument("--screen-share-at", type=float, metavar="SECONDS",
                        help="this many seconds into the media, add a screen-share video track and "
                        "renegotiate with m.call.negotiate (default: no screen share)")
    args = parser.parse_args()
    if args.screen_share_at is not None and not 0 <= args.screen_share_at < args.seconds:
        parser.error("--screen-share-at must be at least 0 and less than --seconds")
    return args


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
