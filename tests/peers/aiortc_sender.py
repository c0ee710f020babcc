"""A synthetic caller for mxrec's WebRTC interop tests, on aiortc (an implementation independent of
webrtc-rs).

It offers one video and one audio track, prints the offer as one JSON line on stdout
(`{"type": "offer", "sdp": ...}`), reads the answer as one JSON line from stdin, sends media for
`--seconds` after the connection is up, closes and exits. Diagnostics go to stderr.

The media are made to be measured after recording:
- video, 640x360 at 30 fps: frame n is mid-grey with n written in binary as 16 black/white 32x32
  blocks along the top row (bit 15 first); every frame with n % 30 == 0 is all white (the flash)
  (CounterVideo takes another background colour for matrix_caller.py's screen share);
- audio, 48 kHz mono: a 1 kHz sine for the first 100 ms of each second, silence otherwise.
Both tracks count from one shared start time, so flash n*30 and beep n are meant to be
simultaneous; their RTP timestamps are `frame * 3000` (90 kHz) and `sample` (48 kHz) from that
start, and aiortc's Sender Reports tie both to its wall clock.

matrix_caller.py (the Matrix caller) imports the media classes from here, so importing this module
must stay free of side effects.
"""

import argparse
import asyncio
import fractions
import json
import sys
import time

import numpy as np
from aiortc import (
    RTCConfiguration,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av import AudioFrame, VideoFrame

WIDTH, HEIGHT, FPS = 640, 360, 30
RATE, SAMPLES_PER_FRAME = 48_000, 960  # 20 ms audio frames
BEEP_SAMPLES = RATE // 10  # 100 ms
BLOCK = 32


def log(*args):
    print("aiortc_sender:", *args, file=sys.stderr, flush=True)


class SharedStart:
    """The one start time both tracks pace from (set by whichever asks first)."""

    def __init__(self):
        self.t0 = None

    def get(self):
        if self.t0 is None:
            self.t0 = time.time()
        return self.t0


class CounterVideo(MediaStreamTrack):
    kind = "video"

    def __init__(self, start: SharedStart, background=(128, 128, 128)):
        """`background` is the RGB colour behind the counter (mid-grey unless told otherwise)."""
        super().__init__()
        self.start = start
        self.n = 0
        self.grey = np.full((HEIGHT, WIDTH, 3), background, dtype=np.uint8)
        self.white = np.full((HEIGHT, WIDTH, 3), 255, dtype=np.uint8)

    async def recv(self):
        if self.readyState != "live":
            raise MediaStreamError
        n = self.n
        self.n += 1
        wait = self.start.get() + n / FPS - time.time()
        if wait > 0:
            await asyncio.sleep(wait)
        if n % FPS == 0:
            arr = self.white
        else:
            arr = self.grey.copy()
            for bit in range(16):
                value = 255 if (n >> (15 - bit)) & 1 else 0
                arr[0:BLOCK, bit * BLOCK : (bit + 1) * BLOCK, :] = value
        frame = VideoFrame.from_ndarray(arr, format="rgb24")
        frame.pts = n * (90_000 // FPS)
        frame.time_base = fractions.Fraction(1, 90_000)
        return frame


class BeepAudio(MediaStreamTrack):
    kind = "audio"

    def __init__(self, start: SharedStart):
        super().__init__()
        self.start = start
        self.sample = 0
        t = np.arange(BEEP_SAMPLES) / RATE
        self.beep = (np.sin(2 * np.pi * 1000 * t) * 12_000).astype(np.int16)

    async def recv(self):
        if self.readyState != "live":
            raise MediaStreamError
        first = self.sample
        self.sample += SAMPLES_PER_FRAME
        wait = self.start.get() + first / RATE - time.time()
        if wait > 0:
            await asyncio.sleep(wait)
        arr = np.zeros(SAMPLES_PER_FRAME, dtype=np.int16)
        offset = first % RATE
        if offset < BEEP_SAMPLES:
            n = min(SAMPLES_PER_FRAME, BEEP_SAMPLES - offset)
            arr[:n] = self.beep[offset : offset + n]
        frame = AudioFrame.from_ndarray(arr.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = RATE
        frame.pts = first
        frame.time_base = fractions.Fraction(1, RATE)
        return frame


async def read_line() -> str:
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, sys.stdin.readline)


async def main(seconds: float, connect_timeout: float) -> int:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    start = SharedStart()
    video, audio = CounterVideo(start), BeepAudio(start)
    pc.addTrack(video)
    pc.addTrack(audio)
    connected = asyncio.Event()
    failed = asyncio.Event()

    @pc.on("connectionstatechange")
    async def on_state():
        log("connection state", pc.connectionState)
        if pc.connectionState == "connected":
            connected.set()
        elif pc.connectionState == "failed":
            failed.set()

    await pc.setLocalDescription(await pc.createOffer())
    offer = pc.localDescription
    print(json.dumps({"type": offer.type, "sdp": offer.sdp}), flush=True)

    line = await read_line()
    if not line.strip():
        log("no answer on stdin")
        await pc.close()
        return 2
    answer = json.loads(line)
    await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))

    waiter = asyncio.ensure_future(connected.wait())
    failer = asyncio.ensure_future(failed.wait())
    done, _ = await asyncio.wait({waiter, failer}, timeout=connect_timeout, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    failer.cancel()
    if not connected.is_set():
        log("not connected within", connect_timeout, "s; state", pc.connectionState)
        await pc.close()
        return 3

    await asyncio.sleep(seconds)
    log(f"sent {video.n} video frames, {audio.sample // SAMPLES_PER_FRAME} audio frames; closing")
    await pc.close()
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="how long to send after connecting")
    parser.add_argument("--connect-timeout", type=float, default=15.0)
    args = parser.parse_args()
    sys.exit(asyncio.run(main(args.seconds, args.connect_timeout)))
