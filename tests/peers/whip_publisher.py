"""A WHIP publisher (RFC 9725) on aiortc, for mxrec's WHIP ingest test: an implementation
independent of webrtc-rs speaking plain HTTP.

It POSTs its offer (aiortc gathers every candidate before the offer is made: no trickle) to
`--url` with `Authorization: Bearer --token`, applies the answer of the `201 Created`, sends the
measurable media of aiortc_sender.py (a counter video with a white flash at every whole second, a
1 kHz beep at every whole second) for `--seconds` after the connection is up, then DELETEs the
session URL from `Location`. It prints one JSON line on stdout with what happened:
`{"status": 201, "location": "...", "connected": true, "video_frames": n, "audio_frames": n,
"delete_status": 200}`. Diagnostics go to stderr. Exit 0 only when all of it worked.
"""

import argparse
import asyncio
import json
import sys
import urllib.error
import urllib.parse
import urllib.request

from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

from aiortc_sender import SAMPLES_PER_FRAME, BeepAudio, CounterVideo, SharedStart


def log(*args):
    print("whip_publisher:", *args, file=sys.stderr, flush=True)


def request(method: str, url: str, token: str, body: bytes = None, content_type: str = None):
    """One HTTP request; returns (status, headers, body) for every status, errors included."""
    headers = {"Authorization": f"Bearer {token}"}
    if content_type:
        headers["Content-Type"] = content_type
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


async def main(args) -> int:
    report = {"status": None, "location": None, "connected": False, "video_frames": 0, "audio_frames": 0,
              "delete_status": None}
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    start = SharedStart()
    video, audio = CounterVideo(start), BeepAudio(start)
    pc.addTransceiver(video, direction="sendonly")
    pc.addTransceiver(audio, direction="sendonly")
    connected, failed = asyncio.Event(), asyncio.Event()

    @pc.on("connectionstatechange")
    async def on_state():
        log("connection state", pc.connectionState)
        if pc.connectionState == "connected":
            connected.set()
        elif pc.connectionState == "failed":
            failed.set()

    await pc.setLocalDescription(await pc.createOffer())
    loop = asyncio.get_running_loop()
    status, headers, body = await loop.run_in_executor(
        None, request, "POST", args.url, args.token, pc.localDescription.sdp.encode(), "application/sdp")
    report["status"] = status
    location = next((v for k, v in headers.items() if k.lower() == "location"), None)
    content_type = next((v for k, v in headers.items() if k.lower() == "content-type"), "")
    if status != 201 or not location or not content_type.startswith("application/sdp"):
        log("POST answered", status, content_type, body[:200])
        print(json.dumps(report), flush=True)
        await pc.close()
        return 2
    session_url = urllib.parse.urljoin(args.url, location)
    report["location"] = location
    await pc.setRemoteDescription(RTCSessionDescription(sdp=body.decode(), type="answer"))

    waiter = asyncio.ensure_future(connected.wait())
    failer = asyncio.ensure_future(failed.wait())
    await asyncio.wait({waiter, failer}, timeout=args.connect_timeout, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    failer.cancel()
    report["connected"] = connected.is_set()
    if connected.is_set():
        await asyncio.sleep(args.seconds)
    else:
        log("not connected within", args.connect_timeout, "s; state", pc.connectionState)
    report["video_frames"] = video.n
    report["audio_frames"] = audio.sample // SAMPLES_PER_FRAME
    log(f"sent {report['video_frames']} video frames, {report['audio_frames']} audio frames; ending the session")
    status, _, body = await loop.run_in_executor(None, request, "DELETE", session_url, args.token)
    report["delete_status"] = status
    await pc.close()
    print(json.dumps(report), flush=True)
    return 0 if report["connected"] and status == 200 else 3


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="the WHIP endpoint, e.g. http://127.0.0.1:8080/whip/studio")
    parser.add_argument("--token", required=True)
    parser.add_argument("--seconds", type=float, default=8.0, help="how long to send after connecting")
    parser.add_argument("--connect-timeout", type=float, default=15.0)
    sys.exit(asyncio.run(main(parser.parse_args())))
