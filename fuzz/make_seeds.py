#!/usr/bin/env python3
"""Writes the seed corpus in fuzz/corpus/<target>/: a few hand-made, valid inputs per target, in
the input formats the targets' doc comments describe. Run from anywhere; it rewrites the seeds.
Inputs saved from crashes (named crash-*) are kept as they are."""

import json
import os
import re
import struct

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def write(target, name, data):
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# ---- sdp: an offer, then after a NUL the candidate lines --------------------------------------

CHROME_OFFER = "\r\n".join([
    "v=0",
    "o=- 4611731400430051336 2 IN IP4 127.0.0.1",
    "s=-",
    "t=0 0",
    "a=group:BUNDLE 0 1",
    "a=extmap-allow-mixed",
    "a=msid-semantic: WMS b242ce31-3246-4da5-a1b2-14f962cd4c48",
    "m=audio 9 UDP/TLS/RTP/SAVPF 111 63 0 8 126",
    "c=IN IP4 0.0.0.0",
    "a=rtcp:9 IN IP4 0.0.0.0",
    "a=ice-ufrag:Yf7y",
    "a=ice-pwd:NhqWzw4iTInsWZLmXyB8b5s7",
    "a=ice-options:trickle",
    "a=fingerprint:sha-256 7B:8B:F0:65:5F:78:E2:51:3B:AC:6F:F3:3F:46:1B:35:DC:B8:5F:64:1A:24:C2:43:F0:A1:58:D0:A1:2C:19:08",
    "a=setup:actpass",
    "a=mid:0",
    "a=extmap:1 urn:ietf:params:rtp-hdrext:ssrc-audio-level",
    "a=extmap:4 urn:ietf:params:rtp-hdrext:sdes:mid",
    "a=sendrecv",
    "a=msid:b242ce31-3246-4da5-a1b2-14f962cd4c48 3d1c2d9b-7d5a-4b8e-9a43-0f9c0b1e6a11",
    "a=rtcp-mux",
    "a=rtcp-rsize",
    "a=rtpmap:111 opus/48000/2",
    "a=rtcp-fb:111 transport-cc",
    "a=fmtp:111 minptime=10;useinbandfec=1",
    "a=rtpmap:63 red/48000/2",
    "a=fmtp:63 111/111",
    "a=rtpmap:0 PCMU/8000",
    "a=rtpmap:8 PCMA/8000",
    "a=rtpmap:126 telephone-event/8000",
    "a=ssrc:1122334455 cname:4TOk42mSjXCkVIa6",
    "a=ssrc:1122334455 msid:b242ce31-3246-4da5-a1b2-14f962cd4c48 3d1c2d9b-7d5a-4b8e-9a43-0f9c0b1e6a11",
    "m=video 9 UDP/TLS/RTP/SAVPF 96 97 98 99 102 103 45",
    "c=IN IP4 0.0.0.0",
    "a=rtcp:9 IN IP4 0.0.0.0",
    "a=ice-ufrag:Yf7y",
    "a=ice-pwd:NhqWzw4iTInsWZLmXyB8b5s7",
    "a=ice-options:trickle",
    "a=fingerprint:sha-256 7B:8B:F0:65:5F:78:E2:51:3B:AC:6F:F3:3F:46:1B:35:DC:B8:5F:64:1A:24:C2:43:F0:A1:58:D0:A1:2C:19:08",
    "a=setup:actpass",
    "a=mid:1",
    "a=extmap:4 urn:ietf:params:rtp-hdrext:sdes:mid",
    "a=extmap:3 http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01",
    "a=sendrecv",
    "a=msid:b242ce31-3246-4da5-a1b2-14f962cd4c48 8c0e5a0a-53c4-4e8e-b7c4-6d7f5b0a2f31",
    "a=rtcp-mux",
    "a=rtcp-rsize",
    "a=rtpmap:96 VP8/90000",
    "a=rtcp-fb:96 goog-remb",
    "a=rtcp-fb:96 transport-cc",
    "a=rtcp-fb:96 ccm fir",
    "a=rtcp-fb:96 nack",
    "a=rtcp-fb:96 nack pli",
    "a=rtpmap:97 rtx/90000",
    "a=fmtp:97 apt=96",
    "a=rtpmap:98 VP9/90000",
    "a=rtcp-fb:98 nack pli",
    "a=fmtp:98 profile-id=0",
    "a=rtpmap:99 rtx/90000",
    "a=fmtp:99 apt=98",
    "a=rtpmap:102 H264/90000",
    "a=rtcp-fb:102 nack pli",
    "a=fmtp:102 level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f",
    "a=rtpmap:103 rtx/90000",
    "a=fmtp:103 apt=102",
    "a=rtpmap:45 AV1/90000",
    "a=rtcp-fb:45 nack pli",
    "a=ssrc-group:FID 2233445566 3344556677",
    "a=ssrc:2233445566 cname:4TOk42mSjXCkVIa6",
    "a=ssrc:3344556677 cname:4TOk42mSjXCkVIa6",
    "",
])
CANDIDATES = "\n".join([
    "candidate:842163049 1 udp 2122260223 192.168.1.20 54400 typ host generation 0 ufrag Yf7y network-id 1",
    "candidate:1510613869 1 udp 1686052607 203.0.113.7 54400 typ srflx raddr 192.168.1.20 rport 54400 generation 0",
    "candidate:3169361457 1 tcp 1518280447 192.168.1.20 9 typ host tcptype active generation 0",
])
write("sdp", "chrome-offer-with-candidates", CHROME_OFFER + "\0" + CANDIDATES)

AIORTC_OFFER = "\r\n".join([
    "v=0",
    "o=- 3919487412 3919487412 IN IP4 0.0.0.0",
    "s=-",
    "t=0 0",
    "a=group:BUNDLE 0",
    "a=msid-semantic:WMS *",
    "m=audio 50000 UDP/TLS/RTP/SAVPF 96 0 8",
    "c=IN IP4 127.0.0.1",
    "a=sendrecv",
    "a=extmap:1 urn:ietf:params:rtp-hdrext:sdes:mid",
    "a=mid:0",
    "a=msid:stream0 audio0",
    "a=rtcp:9 IN IP4 0.0.0.0",
    "a=rtcp-mux",
    "a=ssrc:1001 cname:aiortc",
    "a=rtpmap:96 opus/48000/2",
    "a=rtpmap:0 PCMU/8000",
    "a=rtpmap:8 PCMA/8000",
    "a=candidate:5c9c1b2d2b3e4f5a 1 udp 2130706431 127.0.0.1 50000 typ host",
    "a=end-of-candidates",
    "a=ice-ufrag:abcd",
    "a=ice-pwd:0123456789abcdefghijklmn",
    "a=fingerprint:sha-256 AA:BB:CC:DD:EE:FF:00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF:00:11:22:33:44:55:66:77:88:99",
    "a=setup:actpass",
    "",
])
write("sdp", "aiortc-audio-offer", AIORTC_OFFER)


# ---- rtp_depack: [codec] [max_packets] [max_delay/4 ms] [flags], then records ----------------
# packet record: [op] [seq delta i8] ([ts u32]) [advance ms] [len] [payload]; op & 8 = marker,
# (op >> 4) & 3: 0 same ts, 1 +3000, 2 + u32, 3 = u32.

def pkt(seq_delta, payload, marker=False, ts_mode=0, ts=None, advance_ms=1):
    op = (ts_mode << 4) | (8 if marker else 0)
    out = bytes([op, seq_delta & 0xFF])
    if ts_mode >= 2:
        out += struct.pack("<I", ts)
    return out + bytes([advance_ms, len(payload)]) + payload


def timeout(ms):
    return bytes([5]) + struct.pack("<H", ms)


def sender_report(ntp, rtp):
    return bytes([6]) + struct.pack("<QI", ntp, rtp)


def header(codec, max_packets=32, delay=50, flags=1):
    return bytes([codec, max_packets, delay, flags])


OPUS, VP8, VP9, H264, AV1 = range(5)

# VP8: a keyframe in two packets (S=1 PID=0, then continuation), then a delta frame, with the
# key frame's packets swapped; a Sender Report in between.
vp8_key = bytes([0x10, 0x00, 0x00, 0x00, 0x9D, 0x01, 0x2A, 0x40, 0x01, 0xF0, 0x00]) + bytes(range(20))
vp8_rest = bytes([0x00]) + bytes(range(20, 60))
vp8_delta = bytes([0x10, 0x01, 0x02, 0x03, 0x04])
write("rtp_depack", "vp8-key-reordered-then-delta",
      header(VP8)
      + pkt(1, vp8_rest, marker=True, ts_mode=3, ts=90000)
      + pkt(-1, vp8_key)
      + sender_report(0xE000_0000_0000_0000, 90000)
      + pkt(2, vp8_delta, marker=True, ts_mode=1)
      + timeout(300))

# H.264: STAP-A with SPS and PPS, an IDR in three FU-A fragments, then a P slice.
sps = bytes([0x67, 0x42, 0xC0, 0x1F, 0xDA])
pps = bytes([0x68, 0xCE, 0x3C, 0x80])
stap = bytes([0x78]) + struct.pack(">H", len(sps)) + sps + struct.pack(">H", len(pps)) + pps
idr = bytes([0x65]) + bytes((i * 7) & 0xFF for i in range(60))
fu = [bytes([0x7C, 0x80 | 5]) + idr[1:20], bytes([0x7C, 5]) + idr[20:40], bytes([0x7C, 0x40 | 5]) + idr[40:]]
write("rtp_depack", "h264-stap-a-fu-a-idr-then-p",
      header(H264)
      + pkt(0, stap, ts_mode=3, ts=1000)
      + pkt(1, fu[0]) + pkt(2, fu[2], marker=True) + pkt(-1, fu[1])
      + pkt(2, bytes([0x41, 0x9A, 0x01]), marker=True, ts_mode=1))

# Opus: five 20 ms frames, one lost, one duplicated, one padding-only packet.
opus = header(OPUS, delay=25)
for i, d in enumerate([0, 1, 2, 0, 2]):
    opus += pkt(d if i else 0, bytes([0x78, i, 0xAA]), marker=True, ts_mode=2, ts=960, advance_ms=20)
opus += pkt(1, b"", ts_mode=0)
write("rtp_depack", "opus-loss-duplicate-padding", opus + timeout(1000))

# VP9: two spatial layers of a keyframe picture (non-flexible, L bit), then a delta picture.
write("rtp_depack", "vp9-two-layers-then-delta",
      header(VP9)
      + pkt(0, bytes([0xAC, 0x05, 0x00, 0x07, 0x82, 0x49, 0x83, 0x42, 0x00]), ts_mode=3, ts=5000)
      + pkt(1, bytes([0xAC, 0x05, 0x02, 0x07, 4, 5]), marker=True)
      + pkt(1, bytes([0xEC, 0x06, 0x00, 0x08, 0x86, 0x00]), marker=True, ts_mode=1))

# AV1: a keyframe (N=1; sequence header and a frame OBU fragmented over two packets).
seq_hdr = bytes([1 << 3]) + bytes(range(12))
frame = bytes([6 << 3]) + bytes(range(100))
p1 = bytes([0x40 | 0x20 | 0x08, len(seq_hdr)]) + seq_hdr + frame[:50]
p2 = bytes([0x80 | 0x10]) + frame[50:]
write("rtp_depack", "av1-keyframe-fragmented",
      header(AV1) + pkt(0, p1, ts_mode=3, ts=7) + pkt(1, p2, marker=True))


# ---- rtcp: one compound packet ------------------------------------------------------------------

def rtcp(pt, count, body):
    assert len(body) % 4 == 0
    return bytes([0x80 | count, pt]) + struct.pack(">H", len(body) // 4) + body


def sdes_chunk(ssrc, items):
    body = struct.pack(">I", ssrc)
    for t, v in items:
        body += bytes([t, len(v)]) + v
    body += b"\0"
    while len(body) % 4:
        body += b"\0"
    return body


sr = rtcp(200, 1, struct.pack(">IQIII", 0x1234, 0xE8F0_1234_8000_0000, 90000, 10, 1000)
          + struct.pack(">IIIIII", 0x5678, 0x0100_0001, 7, 0, 0, 0))
sdes = rtcp(202, 1, sdes_chunk(0x1234, [(1, b"4TOk42mSjXCkVIa6"), (15, b"0")]))
write("rtcp", "sr-with-report-block-sdes-cname-mid", sr + sdes)
rr = rtcp(201, 0, struct.pack(">I", 0x9999))
write("rtcp", "rr-sdes-bye", rr + rtcp(202, 1, sdes_chunk(0x9999, [(1, b"x")])) + rtcp(203, 1, struct.pack(">I", 0x9999)))
write("rtcp", "two-srs", sr + rtcp(200, 0, struct.pack(">IQIII", 0x4321, 0xE8F0_1235_0000_0000, 48000, 5, 500)))


# ---- call_events: [selector] [flags] [len u16] [content] ----------------------------------------
# flags: bits 0-1 sender (0 alice, 1 bob, 2 bot, 3 eve), bit 2 room, bits 3-4 joined (1,2,3,2),
# bits 5-6 time step, bit 7 answer CreateAnswer at once (peer events: flags >> 5 picks the event).

def rec(selector, flags, content):
    if not isinstance(content, (str, bytes)):
        content = json.dumps(content, separators=(",", ":"))
    if isinstance(content, str):
        content = content.encode()
    return bytes([selector, flags]) + struct.pack("<H", len(content)) + content


INVITE, CANDS, ANSWER, SELECT, NEGOTIATE, META, META_U, HANGUP, REJECT = range(9)
common = {"call_id": "1700000000000abcd", "party_id": "ALICEDEV", "version": "1"}
aiortc_small = AIORTC_OFFER
write("call_events", "voip1-invite-candidates-select-hangup",
      rec(INVITE, 0x88, dict(common, lifetime=60000, offer={"type": "offer", "sdp": aiortc_small},
                             invitee="@mxrec:example.org",
                             **{"org.matrix.msc3077.sdp_stream_metadata":
                                {"stream0": {"purpose": "m.usermedia", "audio_muted": False}}}))
      + rec(CANDS, 0x08, dict(common, candidates=[
          {"candidate": "candidate:1 1 udp 2122260223 127.0.0.1 50000 typ host", "sdpMid": "0", "sdpMLineIndex": 0},
          {"candidate": "", "sdpMid": None}]))
      + rec(15, 0x80, "stream0")
      + rec(SELECT, 0x08, dict(common, selected_party_id="BOTDEVICE"))
      + rec(META, 0x08, dict(common, sdp_stream_metadata={"stream0": {"purpose": "m.usermedia", "video_muted": True}}))
      + rec(HANGUP, 0x28, dict(common, reason="user_hangup")))
write("call_events", "voip0-invite-negotiate-reject",
      rec(INVITE, 0x88, {"call_id": "v0call", "version": 0, "lifetime": 30000,
                         "offer": {"type": "offer", "sdp": aiortc_small}})
      + rec(NEGOTIATE, 0x08, {"call_id": "v0call", "version": 0, "lifetime": 30000,
                              "description": {"type": "offer", "sdp": aiortc_small}})
      + rec(REJECT, 0x08, {"call_id": "v0call", "version": 0}))

member = {
    "application": "m.call", "call_id": "", "scope": "m.room", "device_id": "ALICEDEV",
    "expires": 14400000, "created_ts": 1750000000000,
    "focus_active": {"type": "livekit", "focus_selection": "oldest_membership"},
    "foci_preferred": [{"type": "livekit", "livekit_service_url": "https://jwt.example.org",
                        "livekit_alias": "!one:example.org"}],
}
to_device_key = {"room_id": "!one:example.org", "keys": {"index": 0, "key": "MTIzNDU2Nzg5MGFiY2RlZg"},
                 "member": {"claimed_device_id": "ALICEDEV"}, "session": {"application": "m.call", "call_id": "", "scope": "m.room"},
                 "sent_ts": 1750000000500}
sticky = {
    "sticky_key": "bob-member-1", "slot_id": "m.call#ROOM",
    "application": {"type": "m.call", "m.call.intent": "video"},
    "member": {"user_id": "@bob:example.org", "device_id": "BOBDEV", "id": "bob-member-1"},
    "transports": {"published": [{"type": "livekit", "livekit_service_url": "https://jwt.example.org"}]},
    "versions": [],
}
room_keys = {"device_id": "BOBDEV", "call_id": "", "keys": [{"index": 0, "key": "AAECAwQFBgcICQoLDA0ODw=="}],
             "sent_ts": 1750000000000}
write("call_events", "matrixrtc-members-and-keys",
      rec(13, 0x00, to_device_key)
      + rec(11, 0x00, "@alice:example.org_ALICEDEV_m.call\n" + json.dumps(member))
      + rec(12, 0x01, sticky)
      + rec(14, 0x01, room_keys)
      + rec(11, 0x60, "@alice:example.org_ALICEDEV_m.call\n{}"))


# ---- manifest: the example of docs/manifest.md ---------------------------------------------------

doc = open(os.path.join(os.path.dirname(ROOT), "..", "docs", "manifest.md")).read()
example = re.search(r"```json\n(.*?)\n```", doc, re.S).group(1)
write("manifest", "docs-manifest-example", example)
m = json.loads(example)
m["tracks"].append({
    "id": "t2", "participant": "p1", "kind": "video", "codec": "vp8", "source": "camera",
    "muted": [], "undecryptable": [],
    "segments": [{"index": 0, "start_us": 0, "end_us": 2000000, "bytes": 99,
                  "sha256": "ef" * 32, "key": "rooms/x/recordings/r/tracks/t2/000000.webm"}],
})
m["participants"][0]["display_name"] = "Al'ice: [x], y; \\z"
m["pauses"].append({"start": "2025-01-01T00:00:10Z", "start_us": 10000000, "end": "2025-01-01T00:00:12Z", "end_us": 12000000})
write("manifest", "video-track-pause-odd-name", json.dumps(m, indent=1))
