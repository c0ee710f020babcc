//! The receive path of one track: RTP packets with arbitrary sequence numbers, timestamps,
//! marker bits and payloads, interleaved with timeouts, Sender Reports and keyframe requests,
//! through `TrackReceiver` (unwrapping, reorder buffer, depacketizer, clock). The same packets go
//! through a bare reorder buffer as well, to check its ordering, and every frame that comes out
//! goes through the segment writer's bitstream check.
//!
//! Input: `codec`, `max_packets`, `max_delay_ms`, `flags`, then records until the input ends:
//!
//! ```text
//! op & 7 in 0..=4: a packet   [seq delta: i8] [ts: see op>>4 & 3] [advance ms: u8] [len: u8] [payload]
//!                              ts 0: same as the last, 1: +3000, 2: + u32 LE, 3: = u32 LE
//!                              op & 8: marker
//! op & 7 == 5: time passes    [advance ms: u16 LE], then handle_timeout
//! op & 7 == 6: Sender Report  [ntp: u64 LE] [rtp: u32 LE]
//! op & 7 == 7: keyframe request
//! ```
//!
//! Checks: released frames come in strictly increasing sequence order, never mix timestamps,
//! and the buffer stays within its packet bound; a depacketized frame is no larger than a
//! codec-specific bound of its packets' payloads; emitted frames have strictly increasing,
//! non-negative timestamps at least 1 ms apart; a video track's first frame is a keyframe; VP8
//! and H.264 keyframe flags agree with the bitstream; the stats add up.

#![no_main]

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use recorder::fuzzing::{HeldPacket, PushOutcome, Released, ReorderBuffer};
use recorder::rtp::{
    Depacketizer, ParticipantClock, ReceiverConfig, ReceiverOutput, SenderReportTiming, SeqUnwrapper,
    TimestampUnwrapper, TrackReceiver,
};
use transcoder::{Codec, MediaKind};

const CODECS: [Codec; 5] = [Codec::Opus, Codec::Vp8, Codec::Vp9, Codec::H264, Codec::Av1];
/// `TrackClock`'s minimum spacing of output timestamps.
const MIN_SPACING_US: i64 = 1000;

struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn u8(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (a, b) = self.0.split_at(n.min(self.0.len()));
        self.0 = b;
        a
    }
    fn le<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let b = self.bytes(N);
        out[..b.len()].copy_from_slice(b);
        out
    }
}

/// The harness's copy of the receiver's input side, feeding a bare reorder buffer so its output
/// order can be checked packet by packet (the receiver only shows whole frames). Entries of
/// packets dropped inside the buffer stay in `held`; an input is a few thousand packets at most.
struct Mirror {
    seqs: SeqUnwrapper,
    timestamps: TimestampUnwrapper,
    depack: Depacketizer,
    buffer: ReorderBuffer,
    max_packets: usize,
    /// Payload address → (extended seq, extended ts) of every packet the buffer holds.
    held: HashMap<usize, (i64, i64)>,
    last_released_seq: Option<i64>,
    released: Vec<Released>,
}

impl Mirror {
    fn push(&mut self, now_us: i64, seq: u16, ts: u32, marker: bool, payload: Bytes) {
        let seq = self.seqs.unwrap(seq);
        let ts = self.timestamps.unwrap(ts);
        let info = if payload.is_empty() {
            Some(recorder::rtp::PacketInfo { starts_frame: None })
        } else {
            self.depack.inspect(&payload).ok()
        };
        let key = payload.as_ptr() as usize;
        let media = !payload.is_empty();
        let held = HeldPacket { ts, marker, payload, info, arrival_us: now_us };
        if self.buffer.push(seq, held) == PushOutcome::Held && media {
            self.held.insert(key, (seq, ts));
        }
        self.release(now_us);
    }

    fn release(&mut self, now_us: i64) {
        self.buffer.release(now_us, &mut self.released);
        self.check();
        assert!(self.buffer.held() <= self.max_packets, "{} packets held, bound {}", self.buffer.held(), self.max_packets);
    }

    fn flush(&mut self) {
        self.buffer.flush(&mut self.released);
        self.check();
        assert_eq!(self.buffer.held(), 0, "flush left packets in the buffer");
    }

    fn check(&mut self) {
        for r in self.released.drain(..) {
            let Released::Frame { ts, payloads } = r else { continue };
            assert!(!payloads.is_empty(), "a released frame without packets");
            for p in &payloads {
                let (seq, pts) = self.held.remove(&(p.as_ptr() as usize)).expect("released a packet that was never held");
                assert_eq!(pts, ts, "frame {ts} holds a packet of timestamp {pts}");
                assert!(self.last_released_seq.is_none_or(|last| seq > last), "seq {seq} released after {:?}", self.last_released_seq);
                self.last_released_seq = Some(seq);
            }
            let total: usize = payloads.iter().map(Bytes::len).sum();
            let mut depack = self.depack.clone();
            let extra = match &depack {
                Depacketizer::H264(ps) => ps.sps.as_ref().map_or(0, Bytes::len) + ps.pps.as_ref().map_or(0, Bytes::len) + 8,
                _ => 0,
            };
            if let Ok(Some(frame)) = depack.assemble(&payloads) {
                let bound = match depack {
                    // One payload, as is.
                    Depacketizer::Opus => total,
                    // Descriptors stripped.
                    Depacketizer::Vp8 => total - payloads.len(),
                    // Descriptors stripped, a superframe index (2 markers, ≤ 8 sizes of ≤ 4 bytes).
                    Depacketizer::Vp9 => total + 34,
                    // Each NAL unit (≥ 1 byte) gets a 4-byte start code; remembered parameter sets.
                    Depacketizer::H264(_) => 5 * total + extra,
                    // Each OBU (≥ 1 byte) gets a size field of at most 3 bytes (packets are small).
                    Depacketizer::Av1 => 4 * total,
                };
                assert!(frame.data.len() <= bound, "{}-byte frame from {total} payload bytes", frame.data.len());
            }
            // Keep the parameter sets the receiver's depacketizer has seen too.
            self.depack = depack;
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let codec = CODECS[input.u8().unwrap_or(0) as usize % CODECS.len()];
    let max_packets = 1 + input.u8().unwrap_or(0) as usize % 64;
    let max_delay = Duration::from_millis(input.u8().unwrap_or(0) as u64 * 4);
    let flags = input.u8().unwrap_or(0);

    let mut cfg = ReceiverConfig::new(codec);
    cfg.max_packets = max_packets;
    cfg.max_delay = max_delay;
    cfg.drop_until_keyframe_after_loss = flags & 1 != 0;
    // The hold for the first Sender Report: the default (6 s, 16 MiB), none, or a tiny byte bound.
    if flags & 2 != 0 {
        cfg.sender_report_wait = Duration::ZERO;
    } else if flags & 4 != 0 {
        cfg.max_held_bytes = 256;
    }
    let video = codec.kind() == MediaKind::Video;
    let mut rx = TrackReceiver::new(cfg);
    let mut mirror = Mirror {
        seqs: SeqUnwrapper::default(),
        timestamps: TimestampUnwrapper::default(),
        depack: Depacketizer::new(codec),
        buffer: ReorderBuffer::new(max_delay.as_micros() as i64, max_packets),
        max_packets,
        held: HashMap::new(),
        last_released_seq: None,
        released: Vec::new(),
    };
    let mut clock = ParticipantClock::default();

    let mut now_us: i64 = 0;
    let (mut seq, mut ts) = (0u16, 0u32);
    let mut sent = 0u64;
    let mut payload_bytes = 0usize;
    let mut frames = Vec::new();
    while let Some(op) = input.u8() {
        match op & 7 {
            0..=4 => {
                seq = seq.wrapping_add(input.u8().unwrap_or(0) as i8 as u16);
                ts = match (op >> 4) & 3 {
                    0 => ts,
                    1 => ts.wrapping_add(3000),
                    2 => ts.wrapping_add(u32::from_le_bytes(input.le())),
                    _ => u32::from_le_bytes(input.le()),
                };
                now_us += input.u8().unwrap_or(0) as i64 * 1000;
                let len = input.u8().unwrap_or(0) as usize;
                // A copy per packet: the mirror tells packets apart by payload address.
                let payload = Bytes::copy_from_slice(input.bytes(len));
                payload_bytes += payload.len();
                let mut p = rtc_rtp::Packet::default();
                p.header.version = 2;
                p.header.sequence_number = seq;
                p.header.timestamp = ts;
                p.header.marker = op & 8 != 0;
                p.payload = payload.clone();
                sent += 1;
                let _ = rx.handle_rtp(now_us, p);
                mirror.push(now_us, seq, ts, op & 8 != 0, payload);
            }
            5 => {
                now_us += u16::from_le_bytes(input.le()) as i64 * 1000;
                rx.handle_timeout(now_us);
                mirror.release(now_us);
            }
            6 => {
                let sr = SenderReportTiming { ntp_time: u64::from_le_bytes(input.le()), rtp_time: u32::from_le_bytes(input.le()) };
                let offset = clock.offset(sr, now_us);
                rx.handle_sender_report(sr, offset);
            }
            _ => rx.request_keyframe(now_us),
        }
        drain(&mut rx, &mut frames);
        if let Some(t) = rx.poll_timeout() {
            assert!(t >= 0, "timeout {t} before the recording epoch");
        }
    }
    rx.flush();
    mirror.flush();
    drain(&mut rx, &mut frames);

    let stats = rx.stats();
    assert_eq!(stats.packets_received, sent);
    assert_eq!(stats.payload_bytes, payload_bytes as u64);
    assert_eq!(stats.frames_emitted, frames.len() as u64);
    assert!(stats.keyframes_emitted <= stats.frames_emitted);
    let frame_bytes: usize = frames.iter().map(|f: &transcoder::EncodedFrame| f.data.len()).sum();
    let growth = match codec {
        Codec::H264 => 5,
        Codec::Av1 => 4,
        _ => 2,
    };
    // Every frame is made of distinct packets (H.264 may repeat remembered parameter sets).
    if codec != Codec::H264 {
        assert!(frame_bytes <= growth * payload_bytes + 34 * frames.len(), "{frame_bytes} bytes of frames from {payload_bytes} bytes of payload");
    }
    let mut last_pts: Option<i64> = None;
    for (i, f) in frames.iter().enumerate() {
        assert!(f.pts_us >= 0, "frame {i} at {} µs", f.pts_us);
        if let Some(last) = last_pts {
            assert!(f.pts_us >= last + MIN_SPACING_US, "frame {i} at {} µs after one at {last} µs", f.pts_us);
        }
        last_pts = Some(f.pts_us);
        if video && i == 0 {
            assert!(f.keyframe, "a video track's first frame is not a keyframe");
        }
        // What the segment writer makes of the frame must not panic; where the receiver and the
        // writer read the same bit, they must agree.
        // (An H.264 payload without emulation prevention can hide a start code, so there only
        // an IDR the receiver saw must be seen by the writer too.)
        if let Ok(key) = transcoder::fuzzing::check_frame(codec, &f.data, f.keyframe) {
            match codec {
                Codec::Vp8 => assert_eq!(key, f.keyframe, "keyframe flag disagrees with the VP8 bitstream"),
                Codec::H264 if f.keyframe => assert!(key, "an H.264 keyframe without an IDR for the writer"),
                _ => {}
            }
        }
    }
});

fn drain(rx: &mut TrackReceiver, frames: &mut Vec<transcoder::EncodedFrame>) {
    while let Some(out) = rx.poll_output() {
        if let ReceiverOutput::Frame(f) = out {
            assert!(!f.data.is_empty(), "an empty frame");
            frames.push(f);
        }
    }
}
