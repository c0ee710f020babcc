"""A MatrixRTC / Element-Call-style media publisher for mxrec's end-to-end tests, on LiveKit's own
client code (the `livekit` Python SDK: libwebrtc and LiveKit's native frame cryptor), so it is
independent of the recorder's webrtc-rs stack.

One process is one LiveKit participant:

    python livekit_publisher.py --url ws://127.0.0.1:PORT --token JWT
        [--key BASE64 --key-index N] [--seconds S]
        [--screen-share-at T --screen-share-for D] [--background GREY|R,G,B]

It connects, publishes a camera video track (VP8, 640x360 at 30 fps, source CAMERA, one layer)
and a microphone track (Opus, 48 kHz mono, source MICROPHONE; no DTX, no RED unless asked).

E2EE (only with --key): per-participant keys exactly as Element Call sets them up
(livekit-client's BaseKeyProvider with ratchetWindowSize 10, keyringSize 256, sharedKey false,
raw 16-byte Matrix keys imported as HKDF material): KeyProviderOptions(shared_key=None,
key_derivation_function=HKDF, key_ring_size=256, ratchet_window_size=10, ratchet_salt
"LKFrameEncryptionKey", failure_tolerance 10). The key goes to this participant's own identity at
--key-index, and every sending frame cryptor is pointed at that index (a native cryptor starts at
index 0, so there is a few-frame window right after each publish where frames are dropped for a
missing key when the index is not 0). Without --key nothing is encrypted.

The media are made to be measured after recording (the same idea as aiortc_sender.py):
- camera frame n is mid-grey (or --background) with n written in binary as 16 black/white 32x32
  blocks along the top row (bit 15 first, white = 1); every frame with n % 30 == 0 is all white
  (the flash);
- audio: a 1 kHz sine for the first 100 ms of each second, silence otherwise;
- both count from one shared start (frame n at start + n/30 s, sample k at start + k/48000 s),
  paced on the monotonic clock; each video frame is captured with the wall-clock timestamp of its
  slot, and audio goes out in 10 ms chunks without the SDK's queue (queue_size_ms=0), so flash
  n*30 and beep n leave together and LiveKit's RTP timestamps / Sender Reports tie them together;
- screen share (--screen-share-at, or the stdin command): a second video track, source
  SCREEN_SHARE, 1280x720 at 15 fps, blue background (40, 70, 170) with the same counter blocks
  counting its own frames from 0 (flash when m % 15 == 0, i.e. once a second); its frame m is
  paced at share start + m/15 s on the same clock.

stdin, JSON lines (EOF is not a leave):
    {"cmd": "set_key", "index": N, "key": "<base64 of 16 bytes>"}   key rotation, own identity
    {"cmd": "screen_share", "on": true|false}
    {"cmd": "leave"}                                                 unpublish, disconnect, exit 0
stdout, one JSON line per event (flushed):
    {"event": "connected", "identity", "participant_sid", "room"}
    {"event": "published", "source": "camera"|"microphone"|"screen_share", "track_sid",
     "encryption": "GCM"|"NONE"|..., "key_index": N|null}
    {"event": "unpublished", "source", "track_sid"}
    {"event": "key", "index": N}                                     after a set_key
    {"event": "error", "message"}                                    a bad command (still running)
    {"event": "disconnected", "reason"}                              the server ended the session
    {"event": "left"}
--seconds S (default: until leave) ends it like a leave; so do SIGTERM and SIGINT.
Exit codes: 0 after a leave, 1 on a failure, 3 when the server disconnected us.
Diagnostics go to stderr, prefixed "livekit_publisher:".
"""

import argparse
import asyncio
import base64
import binascii
import json
import os
import signal
import sys
import threading
import time

import numpy as np
from livekit import rtc

CAM_W, CAM_H, CAM_FPS = 640, 360, 30
SCREEN_W, SCREEN_H, SCREEN_FPS = 1280, 720, 15
# 10 ms audio chunks, each captured at the time of its first sample. Without the SDK's queue
# (queue_size_ms=0) the SDK hands each capture straight to libwebrtc, which wants 10 ms frames:
# 20 ms captures came out silent in livekit 1.2.1.
RATE, CHUNK = 48_000, 480
BEEP_SAMPLES = RATE // 10  # 100 ms
BLOCK = 32
GREY = (128, 128, 128)
SCREEN_BACKGROUND = (40, 70, 170)  # the blue of matrix_caller.py's screen share

# Element Call's key provider (matrixKeyProvider.ts: ratchetWindowSize 10, keyringSize 256; the
# rest livekit-client's defaults: per-participant keys, failureTolerance 10, HKDF key material).
KEY_RING_SIZE = 256
RATCHET_WINDOW_SIZE = 10
FAILURE_TOLERANCE = 10
RATCHET_SALT = b"LKFrameEncryptionKey"


def log(*args):
    print("livekit_publisher:", *args, file=sys.stderr, flush=True)


def emit(event: str, **fields):
    print(json.dumps({"event": event, **fields}), flush=True)


def rgb_to_yuv(rgb):
    """BT.601 limited range, what libwebrtc's I420 <-> RGB conversions assume."""
    r, g, b = rgb
    y = 16 + (65.738 * r + 129.057 * g + 25.064 * b) / 256
    u = 128 + (-37.945 * r - 74.494 * g + 112.439 * b) / 256
    v = 128 + (112.439 * r - 94.154 * g - 18.285 * b) / 256
    return tuple(int(round(min(max(c, 0), 255))) for c in (y, u, v))


class CounterFrames:
    """I420 frames: `background` with the frame number as 16 black/white blocks along the top row,
    all white every `flash_every` frames. The planes are made once; a frame is one copy plus the
    16 blocks, to keep three publishers cheap on two cores."""

    def __init__(self, width, height, background, flash_every):
        self.width, self.height, self.flash_every = width, height, flash_every
        self.y_size = width * height
        self.c_size = (width // 2) * (height // 2)
        y, u, v = rgb_to_yuv(background)
        base = np.empty(self.y_size + 2 * self.c_size, dtype=np.uint8)
        base[: self.y_size] = y
        base[self.y_size : self.y_size + self.c_size] = u
        base[self.y_size + self.c_size :] = v
        # The block row is neutral in chroma so that the blocks are pure black / white.
        self._planes(base)[1][: BLOCK // 2, : 16 * BLOCK // 2] = 128
        self._planes(base)[2][: BLOCK // 2, : 16 * BLOCK // 2] = 128
        self.base = base
        white = np.empty_like(base)
        white[: self.y_size] = 235
        white[self.y_size :] = 128
        self.white = white

    def _planes(self, buf):
        y = buf[: self.y_size].reshape(self.height, self.width)
        u = buf[self.y_size : self.y_size + self.c_size].reshape(self.height // 2, self.width // 2)
        v = buf[self.y_size + self.c_size :].reshape(self.height // 2, self.width // 2)
        return y, u, v

    def frame(self, n) -> rtc.VideoFrame:
        if n % self.flash_every == 0:
            buf = self.white.copy()
        else:
            buf = self.base.copy()
            y = self._planes(buf)[0]
            for bit in range(16):
                y[:BLOCK, bit * BLOCK : (bit + 1) * BLOCK] = 235 if (n >> (15 - bit)) & 1 else 16
        return rtc.VideoFrame(self.width, self.height, rtc.VideoBufferType.I420, buf.data)


class Clock:
    """The one start both media pace from: a monotonic origin for sleeping and the wall-clock time
    of the same instant for capture timestamps."""

    def __init__(self):
        self.mono = time.monotonic()
        self.wall = time.time()

    async def sleep_until(self, offset: float):
        wait = self.mono + offset - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)

    def wall_us(self, offset: float) -> int:
        return int((self.wall + offset) * 1_000_000)


def parse_colour(text: str):
    parts = [int(p) for p in text.split(",")]
    if len(parts) == 1:
        parts *= 3
    if len(parts) != 3 or not all(0 <= p <= 255 for p in parts):
        raise argparse.ArgumentTypeError("want GREY (0-255) or R,G,B")
    return tuple(parts)


def decode_key(text: str) -> bytes:
    try:
        key = base64.b64decode(text + "=" * (-len(text) % 4), validate=False)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"key is not base64: {e}") from None
    if not key:
        raise ValueError("empty key")
    return key


class Publisher:
    def __init__(self, args):
        self.args = args
        self.room = rtc.Room()
        self.key_index = args.key_index if args.key else None
        self.stop = asyncio.Event()
        self.exit_code = 0
        self.clock = None
        self.pubs = {}  # source name -> LocalTrackPublication
        self.tasks = []
        self.screen_task = None
        self.screen_source = None
        self.sent = {"camera": 0, "microphone": 0, "screen_share": 0}
        self.commands = asyncio.Lock()  # stdin commands run one at a time, in order

    # --- E2EE -----------------------------------------------------------------------------------

    def room_options(self) -> rtc.RoomOptions:
        options = rtc.RoomOptions(auto_subscribe=False)
        if self.args.key:
            options.encryption = rtc.E2EEOptions(
                encryption_type=rtc.EncryptionType.GCM,
                key_provider_options=rtc.KeyProviderOptions(
                    shared_key=None,
                    ratchet_salt=RATCHET_SALT,
                    ratchet_window_size=RATCHET_WINDOW_SIZE,
                    failure_tolerance=FAILURE_TOLERANCE,
                    key_ring_size=KEY_RING_SIZE,
                    key_derivation_function=rtc.KeyDerivationFunction.HKDF,
                ),
            )
        return options

    def own_cryptors(self, track_sid=None):
        identity = self.room.local_participant.identity
        return [
            c
            for c in self.room.e2ee_manager.frame_cryptors()
            if c.participant_identity == identity and (track_sid is None or c.track_sid == track_sid)
        ]

    async def point_cryptor(self, track_sid: str):
        """Makes the sender cryptor of a fresh publication encrypt with the current key index (the
        native cryptor is created at index 0, possibly a moment after publish returns)."""
        if self.key_index is None:
            return
        for _ in range(200):
            cryptors = self.own_cryptors(track_sid)
            if cryptors:
                for c in cryptors:
                    c.set_key_index(self.key_index)
                return
            await asyncio.sleep(0.01)
        log(f"no frame cryptor appeared for {track_sid}; it keeps the default key index 0")

    def set_key(self, index: int, key: bytes):
        if self.key_index is None:
            raise ValueError("E2EE is off (started without --key)")
        if not 0 <= index < KEY_RING_SIZE:
            raise ValueError(f"key index {index} outside the key ring (0..{KEY_RING_SIZE - 1})")
        provider = self.room.e2ee_manager.key_provider
        provider.set_key(self.room.local_participant.identity, key, index)
        self.key_index = index
        for c in self.own_cryptors():
            c.set_key_index(index)

    # --- media ----------------------------------------------------------------------------------

    async def publish(self, name, track, options):
        pub = await self.room.local_participant.publish_track(track, options)
        await self.point_cryptor(pub.sid)
        self.pubs[name] = pub
        emit(
            "published",
            source=name,
            track_sid=pub.sid,
            encryption=rtc.EncryptionType.Name(pub.encryption_type),
            key_index=self.key_index,
        )
        return pub

    async def unpublish(self, name):
        pub = self.pubs.pop(name, None)
        if pub is None:
            return
        try:
            await self.room.local_participant.unpublish_track(pub.sid)
        except Exception as e:  # noqa: BLE001 - report and go on leaving
            log(f"unpublishing {name} failed: {e}")
        emit("unpublished", source=name, track_sid=pub.sid)

    async def camera_loop(self, source: rtc.VideoSource):
        frames = CounterFrames(CAM_W, CAM_H, self.args.background, CAM_FPS)
        n = 0
        while True:
            await self.clock.sleep_until(n / CAM_FPS)
            source.capture_frame(frames.frame(n), timestamp_us=self.clock.wall_us(n / CAM_FPS))
            n += 1
            self.sent["camera"] = n

    async def audio_loop(self, source: rtc.AudioSource):
        t = np.arange(BEEP_SAMPLES) / RATE
        beep = (np.sin(2 * np.pi * 1000 * t) * 12_000).astype(np.int16)
        second = np.zeros(RATE, dtype=np.int16)
        second[:BEEP_SAMPLES] = beep
        k = 0
        while True:
            await self.clock.sleep_until(k / RATE)
            offset = k % RATE
            chunk = second[offset : offset + CHUNK]
            await source.capture_frame(rtc.AudioFrame(chunk.tobytes(), RATE, 1, CHUNK))
            k += CHUNK
            self.sent["microphone"] = k // CHUNK

    async def screen_loop(self, source: rtc.VideoSource, start: float):
        frames = CounterFrames(SCREEN_W, SCREEN_H, SCREEN_BACKGROUND, SCREEN_FPS)
        m = 0
        while True:
            at = start + m / SCREEN_FPS
            await self.clock.sleep_until(at)
            source.capture_frame(frames.frame(m), timestamp_us=self.clock.wall_us(at))
            m += 1
            self.sent["screen_share"] = m

    async def screen_share(self, on: bool):
        if on and "screen_share" not in self.pubs and self.screen_task is None:
            start = time.monotonic() - self.clock.mono
            self.screen_source = rtc.VideoSource(SCREEN_W, SCREEN_H, is_screencast=True)
            self.screen_task = asyncio.create_task(self.screen_loop(self.screen_source, start))
            track = rtc.LocalVideoTrack.create_video_track("screen_share", self.screen_source)
            options = rtc.TrackPublishOptions(
                source=rtc.TrackSource.SOURCE_SCREENSHARE,
                video_codec=rtc.VideoCodec.VP8,
                simulcast=False,
                video_encoding=rtc.VideoEncoding(max_bitrate=1_500_000, max_framerate=SCREEN_FPS),
            )
            await self.publish("screen_share", track, options)
        elif not on and self.screen_task is not None:
            await self.unpublish("screen_share")
            self.screen_task.cancel()
            self.screen_task = None
            await self.screen_source.aclose()
            self.screen_source = None

    async def screen_schedule(self, at: float, duration):
        await self.clock.sleep_until(at)
        await self.screen_share(True)
        if duration is not None:
            await self.clock.sleep_until(at + duration)
            await self.screen_share(False)

    # --- control --------------------------------------------------------------------------------

    async def handle(self, line: str):
        async with self.commands:
            await self._handle(line)

    async def _handle(self, line: str):
        try:
            msg = json.loads(line)
            cmd = msg.get("cmd")
            if cmd == "set_key":
                index = int(msg["index"])
                self.set_key(index, decode_key(msg["key"]))
                log(f"now sending with key index {index}")
                emit("key", index=index)
            elif cmd == "screen_share":
                await self.screen_share(bool(msg["on"]))
            elif cmd == "leave":
                self.stop.set()
            else:
                raise ValueError(f"unknown cmd {cmd!r}")
        except Exception as e:  # noqa: BLE001 - a bad command must not end the participant
            log(f"command {line.strip()!r} failed: {e}")
            emit("error", message=f"{type(e).__name__}: {e}")

    def start_stdin(self, loop):
        """stdin is read on a daemon thread (a blocked readline must not hold up exit); EOF ends
        the reading, not the participant."""

        def reader():
            for line in sys.stdin:
                if line.strip():
                    asyncio.run_coroutine_threadsafe(self.handle(line), loop)
            log("stdin closed; still running")

        threading.Thread(target=reader, name="stdin", daemon=True).start()

    async def run(self) -> int:
        args = self.args
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)

        @self.room.on("disconnected")
        def on_disconnected(reason):
            if not self.stop.is_set():
                log(f"disconnected by the server: {reason}")
                try:
                    reason = rtc.DisconnectReason.Name(reason)
                except Exception:  # noqa: BLE001 - an unknown value: report the number
                    pass
                emit("disconnected", reason=str(reason))
                self.exit_code = 3
                self.stop.set()

        @self.room.on("e2ee_state_changed")
        def on_e2ee_state(participant, state):
            log(f"e2ee state of {participant.identity}: {rtc.EncryptionState.Name(state)}")

        await self.room.connect(args.url, args.token, self.room_options())
        me = self.room.local_participant
        if args.key:
            self.room.e2ee_manager.key_provider.set_key(me.identity, args.key, args.key_index)
        emit("connected", identity=me.identity, participant_sid=me.sid, room=self.room.name)

        camera = rtc.VideoSource(CAM_W, CAM_H)
        mic = rtc.AudioSource(RATE, 1, queue_size_ms=0)
        self.clock = Clock()
        self.tasks += [
            asyncio.create_task(self.camera_loop(camera)),
            asyncio.create_task(self.audio_loop(mic)),
        ]
        await self.publish(
            "camera",
            rtc.LocalVideoTrack.create_video_track("camera", camera),
            rtc.TrackPublishOptions(
                source=rtc.TrackSource.SOURCE_CAMERA,
                video_codec=rtc.VideoCodec.VP8,
                simulcast=False,
                video_encoding=rtc.VideoEncoding(max_bitrate=800_000, max_framerate=CAM_FPS),
            ),
        )
        await self.publish(
            "microphone",
            rtc.LocalAudioTrack.create_audio_track("microphone", mic),
            rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE, dtx=args.dtx, red=args.red),
        )

        self.start_stdin(loop)
        if args.screen_share_at is not None:
            self.tasks.append(
                asyncio.create_task(self.screen_schedule(args.screen_share_at, args.screen_share_for))
            )
        if args.seconds is not None:
            loop.call_later(args.seconds, self.stop.set)

        await self.stop.wait()
        log(f"leaving; sent {self.sent}")
        for task in self.tasks:
            task.cancel()
        if self.exit_code == 0:
            await self.screen_share(False)
            for name in list(self.pubs):
                await self.unpublish(name)
            await self.room.disconnect()
            emit("left")
        return self.exit_code


async def main(args) -> int:
    try:
        return await Publisher(args).run()
    except Exception as e:  # noqa: BLE001
        log(f"failed: {type(e).__name__}: {e}")
        return 1


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True, help="the LiveKit server's ws:// or wss:// URL")
    p.add_argument("--token", required=True, help="the access token (JWT) to join with")
    p.add_argument("--key", type=decode_key, help="this participant's E2EE key (base64); enables E2EE")
    p.add_argument("--key-index", type=int, default=0, help="the index of --key (default 0)")
    p.add_argument("--seconds", type=float, help="leave after this long (default: on the leave cmd)")
    p.add_argument("--screen-share-at", type=float, help="start a screen share this many seconds in")
    p.add_argument("--screen-share-for", type=float, help="and stop it after this many seconds")
    p.add_argument("--background", type=parse_colour, default=GREY,
                   help="the camera's background: GREY (0-255) or R,G,B (default 128)")
    p.add_argument("--dtx", action="store_true", help="publish the microphone with Opus DTX")
    p.add_argument("--red", action="store_true", help="publish the microphone with RED")
    args = p.parse_args(argv)
    if not 0 <= args.key_index < KEY_RING_SIZE:
        p.error(f"--key-index must be in 0..{KEY_RING_SIZE - 1}")
    return args


def raise_priority() -> None:
    """A real publisher runs on its own device; here it shares two cores with the SFU, the
    recorder and the other publishers. Audio is paced by this process (10 ms chunks, no SDK queue),
    so a starved publisher pushes its samples late and libwebrtc stamps them late: the media itself
    then carries an A/V skew that grows with the machine's load (seen: tens of ms while a build
    ran beside the tests). A higher priority keeps the publisher on time; without the privilege to
    raise it, it runs as it is."""
    try:
        os.nice(-10)
    except OSError as e:
        print(f"livekit_publisher: cannot raise priority ({e}); running at normal priority", file=sys.stderr)


if __name__ == "__main__":
    raise_priority()
    code = asyncio.run(main(parse_args()))
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: the SDK's native library can abort while it is being unloaded
    # after a clean leave ("panic in a function that cannot unwind", SIGABRT, seen with livekit
    # 1.2.1), which would turn a finished session into a failed exit.
    os._exit(code)
