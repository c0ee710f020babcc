//! End-to-end tests of the receive path: real frames from FFmpeg (generated at test time),
//! packetized, shuffled, duplicated and dropped, must come out byte-identical, in order, with
//! the right keyframe flags and timestamps; hand-made packets cover the corner cases.

use std::path::Path;
use std::process::Command;

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rtc_rtp::packetizer::Payloader;
use transcoder::{Codec, EncodedFrame};

use super::*;

/// A receiver config that does not hold frames for a Sender Report: these tests are about the
/// packets, not the clock.
fn untimed(codec: Codec) -> ReceiverConfig {
    ReceiverConfig { sender_report_wait: std::time::Duration::ZERO, ..ReceiverConfig::new(codec) }
}

fn rtp(seq: u16, ts: u32, marker: bool, payload: impl Into<Bytes>) -> rtc_rtp::Packet {
    let mut p = rtc_rtp::Packet::default();
    p.header.version = 2;
    p.header.sequence_number = seq;
    p.header.timestamp = ts;
    p.header.marker = marker;
    p.header.ssrc = 0x1234;
    p.payload = payload.into();
    p
}

/// Packetizes frames (each with its RTP timestamp) starting at `seq0`; marker on each frame's
/// last packet.
fn packetize(pay: &mut dyn Payloader, mtu: usize, frames: &[(Bytes, u32)], seq0: u16) -> Vec<rtc_rtp::Packet> {
    let mut out = Vec::new();
    let mut seq = seq0;
    for (data, ts) in frames {
        let payloads = pay.payload(mtu, data).unwrap();
        let n = payloads.len();
        for (i, p) in payloads.into_iter().enumerate() {
            out.push(rtp(seq, *ts, i + 1 == n, p));
            seq = seq.wrapping_add(1);
        }
    }
    out
}

/// Local shuffling (within windows of `window`), plus duplicates.
fn scramble(packets: Vec<rtc_rtp::Packet>, window: usize, dup_every: usize, seed: u64) -> Vec<rtc_rtp::Packet> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::new();
    for chunk in packets.chunks(window) {
        let mut c = chunk.to_vec();
        for i in (1..c.len()).rev() {
            c.swap(i, rng.gen_range(0..=i));
        }
        out.extend(c);
    }
    let mut with_dups = Vec::new();
    for (i, p) in out.into_iter().enumerate() {
        if dup_every > 0 && i % dup_every == 3 {
            with_dups.push(p.clone());
        }
        with_dups.push(p);
    }
    with_dups
}

#[derive(Default, Debug)]
struct Collected {
    frames: Vec<EncodedFrame>,
    keyframe_requests: usize,
    dropped: Vec<DropReason>,
}

fn drain(rx: &mut TrackReceiver, c: &mut Collected) {
    while let Some(o) = rx.poll_output() {
        match o {
            ReceiverOutput::Frame(f) => c.frames.push(f),
            ReceiverOutput::NeedKeyframe => c.keyframe_requests += 1,
            ReceiverOutput::FrameDropped { reason, .. } => c.dropped.push(reason),
        }
    }
}

/// Feeds packets `step_us` apart starting at `t0`, then lets the reorder bound pass.
fn feed(rx: &mut TrackReceiver, packets: Vec<rtc_rtp::Packet>, t0: i64, step_us: i64) -> Collected {
    let mut c = Collected::default();
    let mut now = t0;
    for p in packets {
        let _ = rx.handle_rtp(now, p);
        drain(rx, &mut c);
        now += step_us;
    }
    rx.handle_timeout(now + 1_000_000);
    drain(rx, &mut c);
    c
}

fn ffmpeg(dir: &Path, args: &[&str], out: &str) -> Vec<u8> {
    let path = dir.join(out);
    let status = Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi", "-i", "testsrc2=size=160x120:rate=30"])
        .args(args)
        .arg(&path)
        .status()
        .expect("ffmpeg runs");
    assert!(status.success(), "ffmpeg {args:?}");
    std::fs::read(path).unwrap()
}

/// Frames of an IVF file (32-byte header, then 12-byte frame headers).
fn ivf_frames(data: &[u8]) -> Vec<Bytes> {
    assert_eq!(&data[..4], b"DKIF");
    let mut i = u16::from_le_bytes([data[6], data[7]]) as usize;
    let mut frames = Vec::new();
    while i + 12 <= data.len() {
        let size = u32::from_le_bytes(data[i..i + 4].try_into().unwrap()) as usize;
        frames.push(Bytes::copy_from_slice(&data[i + 12..i + 12 + size]));
        i += 12 + size;
    }
    frames
}

/// The expected pts of each frame: the first *received* packet anchors the clock.
fn expected_pts(first_arrival_us: i64, anchor_ts: u32, ts: u32, rate: i64) -> i64 {
    let ticks = ts.wrapping_sub(anchor_ts) as i32 as i64;
    first_arrival_us + ((ticks * 1_000_000) as f64 / rate as f64).round() as i64
}

#[test]
fn vp8_real_frames_survive_reordering_duplicates_and_both_wraparounds() {
    let dir = tempfile::tempdir().unwrap();
    let ivf = ffmpeg(dir.path(), &["-frames:v", "30", "-c:v", "libvpx", "-g", "10", "-b:v", "300k", "-f", "ivf"], "v.ivf");
    let originals = ivf_frames(&ivf);
    assert_eq!(originals.len(), 30);
    let ts0 = u32::MAX - 3000 * 5; // the RTP timestamp wraps after 5 frames
    let frames: Vec<(Bytes, u32)> =
        originals.iter().enumerate().map(|(k, f)| (f.clone(), ts0.wrapping_add(3000 * k as u32))).collect();
    let mut pay = rtc_rtp::codec::vp8::Vp8Payloader::default();
    pay.enable_picture_id = true;
    let packets = packetize(&mut pay, 200, &frames, 65_500); // sequence numbers wrap too
    assert!(packets.len() > 60, "{} packets", packets.len());
    let scrambled = scramble(packets, 5, 7, 1);
    let (anchor_ts, t0) = (scrambled[0].header.timestamp, 1_000_000);

    let mut rx = TrackReceiver::new(untimed(Codec::Vp8));
    let c = feed(&mut rx, scrambled, t0, 1_000);
    assert_eq!(c.frames.len(), 30);
    assert!(c.frames[0].keyframe && c.frames[10].keyframe && !c.frames[1].keyframe);
    for (k, (f, (orig, ts))) in c.frames.iter().zip(&frames).enumerate() {
        assert_eq!(f.data, orig, "frame {k}");
        assert_eq!(f.keyframe, orig[0] & 1 == 0, "frame {k}");
        assert_eq!(f.pts_us, expected_pts(t0, anchor_ts, *ts, 90_000), "frame {k}");
    }
    let s = rx.stats();
    assert_eq!((s.lost, s.frames_dropped_incomplete, s.malformed_packets), (0, 0, 0));
    assert!(s.duplicates > 5, "{s:?}");
    assert_eq!(s.frames_emitted, 30);
    assert_eq!(c.keyframe_requests, 1, "only the initial request"); // answered by frame 0
    println!("vp8: {s:?}");
}

/// Splits an Annex B stream into NAL units (without start codes).
fn nals(data: &[u8]) -> Vec<&[u8]> {
    let mut starts = Vec::new();
    let mut i = 0;
    while i + 3 <= data.len() {
        if data[i..i + 3] == [0, 0, 1] {
            starts.push(i + 3);
            i += 3;
        } else {
            i += 1;
        }
    }
    let mut out = Vec::new();
    for (n, &s) in starts.iter().enumerate() {
        let mut e = starts.get(n + 1).map(|&x| x - 3).unwrap_or(data.len());
        while e > s && data[e - 1] == 0 {
            e -= 1;
        }
        out.push(&data[s..e]);
    }
    out
}

#[test]
fn h264_real_access_units_come_out_as_annex_b_with_parameter_sets_on_every_idr() {
    let dir = tempfile::tempdir().unwrap();
    let raw = ffmpeg(
        dir.path(),
        &["-frames:v", "24", "-c:v", "libx264", "-profile:v", "baseline", "-bf", "0", "-g", "8",
          "-x264-params", "aud=1", "-f", "h264"],
        "v.h264",
    );
    // Access units, split at the AUD (type 9).
    let mut aus: Vec<Vec<&[u8]>> = Vec::new();
    for nal in nals(&raw) {
        if nal[0] & 0x1f == 9 {
            aus.push(Vec::new());
        } else {
            aus.last_mut().expect("stream starts with an AUD").push(nal);
        }
    }
    assert_eq!(aus.len(), 24);
    let annexb = |nals: &[&[u8]]| -> Bytes {
        let mut v = Vec::new();
        for n in nals {
            v.extend_from_slice(&[0, 0, 0, 1]);
            v.extend_from_slice(n);
        }
        Bytes::from(v)
    };
    // Input: each AU as Annex B. Expected: the same without AUDs, and with SPS/PPS in front of
    // every IDR (x264 was told to send them only once).
    let (mut sps, mut pps) = (None, None);
    let mut expected = Vec::new();
    let mut frames = Vec::new();
    for (k, au) in aus.iter().enumerate() {
        let types: Vec<u8> = au.iter().map(|n| n[0] & 0x1f).collect();
        for n in au {
            match n[0] & 0x1f {
                7 => sps = Some(*n),
                8 => pps = Some(*n),
                _ => {}
            }
        }
        let idr = types.contains(&5);
        let mut want: Vec<&[u8]> = Vec::new();
        if idr {
            want.extend([sps.unwrap(), pps.unwrap()]);
        }
        want.extend(au.iter().copied().filter(|n| !matches!(n[0] & 0x1f, 7 | 8)));
        expected.push((annexb(&want), idr));
        // Send parameter sets only with the first IDR, as some senders do.
        let sent: Vec<&[u8]> = au.iter().copied().filter(|n| k == 0 || !matches!(n[0] & 0x1f, 7 | 8)).collect();
        frames.push((annexb(&sent), 1000 + 3000 * k as u32));
    }
    assert!(expected.iter().filter(|(_, idr)| *idr).count() >= 3);
    let packets = packetize(&mut rtc_rtp::codec::h264::H264Payloader::default(), 300, &frames, 100);
    let fu_a = packets.iter().filter(|p| p.payload[0] & 0x1f == 28).count();
    let stap_a = packets.iter().filter(|p| p.payload[0] & 0x1f == 24).count();
    assert!(fu_a > 0 && stap_a >= 1, "fu-a {fu_a}, stap-a {stap_a}");
    let scrambled = scramble(packets, 4, 5, 2);

    let mut rx = TrackReceiver::new(untimed(Codec::H264));
    let c = feed(&mut rx, scrambled, 0, 500);
    assert_eq!(c.frames.len(), 24, "{:?}", rx.stats());
    for (k, (f, (want, idr))) in c.frames.iter().zip(&expected).enumerate() {
        assert_eq!(f.data, want, "frame {k}");
        assert_eq!(f.keyframe, *idr, "frame {k}");
    }
    println!("h264: {:?}", rx.stats());
}

/// Non-flexible VP9 packetizer with picture id, layer indices and a correct P bit.
fn vp9_packetize(frame: &Bytes, key: bool, pic: u16, mtu: usize) -> Vec<Bytes> {
    let chunks: Vec<&[u8]> = frame.chunks(mtu).collect();
    let n = chunks.len();
    chunks
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let mut b0 = 0xa0; // I, L, F=0
            if !key {
                b0 |= 0x40;
            }
            if i == 0 {
                b0 |= 0x08;
            }
            if i + 1 == n {
                b0 |= 0x04;
            }
            let mut v = vec![b0, 0x80 | (pic >> 8) as u8, pic as u8, 0x00, 0x00];
            v.extend_from_slice(c);
            Bytes::from(v)
        })
        .collect()
}

#[test]
fn vp9_real_frames_keyframes_from_descriptor_and_header() {
    let dir = tempfile::tempdir().unwrap();
    let ivf = ffmpeg(
        dir.path(),
        &["-frames:v", "20", "-c:v", "libvpx-vp9", "-g", "10", "-lag-in-frames", "0", "-deadline", "realtime", "-f", "ivf"],
        "v.ivf",
    );
    let originals = ivf_frames(&ivf);
    assert_eq!(originals.len(), 20);
    let is_key = |f: &Bytes| f[0] & 0x04 == 0; // profile 0: frame_type is bit 2
    let mut packets = Vec::new();
    let mut seq = 40_000u16;
    for (k, f) in originals.iter().enumerate() {
        let payloads = vp9_packetize(f, is_key(f), k as u16, 250);
        let n = payloads.len();
        for (i, p) in payloads.into_iter().enumerate() {
            packets.push(rtp(seq, 3000 * k as u32, i + 1 == n, p));
            seq = seq.wrapping_add(1);
        }
    }
    let mut rx = TrackReceiver::new(untimed(Codec::Vp9));
    let c = feed(&mut rx, scramble(packets, 6, 0, 3), 0, 1000);
    assert_eq!(c.frames.len(), 20);
    for (k, (f, o)) in c.frames.iter().zip(&originals).enumerate() {
        assert_eq!(f.data, o, "frame {k}");
        assert_eq!(f.keyframe, is_key(o), "frame {k}");
    }
    assert!(c.frames[0].keyframe && c.frames[10].keyframe && !c.frames[1].keyframe);

    // webrtc-rs's own VP9 payloader never sets P: the frame header keeps delta frames delta.
    let frames: Vec<(Bytes, u32)> = originals.iter().enumerate().map(|(k, f)| (f.clone(), 3000 * k as u32)).collect();
    let packets = packetize(&mut rtc_rtp::codec::vp9::Vp9Payloader::default(), 300, &frames, 7);
    let mut rx = TrackReceiver::new(untimed(Codec::Vp9));
    let c = feed(&mut rx, packets, 0, 1000);
    let keys: Vec<bool> = c.frames.iter().map(|f| f.keyframe).collect();
    assert_eq!(keys, originals.iter().map(is_key).collect::<Vec<_>>());
}

#[test]
fn av1_real_temporal_units_rebuilt_with_size_fields() {
    let dir = tempfile::tempdir().unwrap();
    let ivf = ffmpeg(
        dir.path(),
        &["-frames:v", "12", "-c:v", "libaom-av1", "-usage", "realtime", "-cpu-used", "8", "-g", "6", "-f", "ivf"],
        "v.ivf",
    );
    let originals = ivf_frames(&ivf);
    assert_eq!(originals.len(), 12);
    // Expected: the temporal unit without its temporal delimiter OBU (type 2).
    let strip_td = |tu: &Bytes| -> Bytes {
        let mut out = Vec::new();
        let mut i = 0;
        while i < tu.len() {
            let h = tu[i];
            let hl = 1 + ((h & 4 != 0) as usize);
            assert!(h & 2 != 0, "IVF AV1 OBUs carry sizes");
            let (size, n) = depack_leb128(&tu[i + hl..]);
            let end = i + hl + n + size;
            if (h >> 3) & 0xf != 2 {
                out.extend_from_slice(&tu[i..end]);
            }
            i = end;
        }
        Bytes::from(out)
    };
    let has_seq_header = |tu: &Bytes| strip_td(tu).first().is_some_and(|h| (h >> 3) & 0xf == 1);
    let frames: Vec<(Bytes, u32)> = originals.iter().enumerate().map(|(k, f)| (f.clone(), 3000 * k as u32)).collect();
    let packets = packetize(&mut rtc_rtp::codec::av1::Av1Payloader::default(), 200, &frames, 65_530);
    assert!(packets.iter().any(|p| p.payload[0] & 0x80 != 0), "some OBU is fragmented (Z=1)");
    let mut rx = TrackReceiver::new(untimed(Codec::Av1));
    let c = feed(&mut rx, scramble(packets, 4, 6, 4), 0, 1000);
    assert_eq!(c.frames.len(), 12, "{:?}", rx.stats());
    for (k, (f, o)) in c.frames.iter().zip(&originals).enumerate() {
        assert_eq!(f.data, strip_td(o), "frame {k}");
        assert_eq!(f.keyframe, has_seq_header(o), "frame {k}");
    }
    assert!(c.frames[0].keyframe && c.frames[6].keyframe && !c.frames[1].keyframe);
}

fn depack_leb128(data: &[u8]) -> (usize, usize) {
    let mut v = 0usize;
    for (i, b) in data.iter().enumerate() {
        v |= ((b & 0x7f) as usize) << (7 * i);
        if b & 0x80 == 0 {
            return (v, i + 1);
        }
    }
    panic!("bad leb128")
}

/// A VP8 frame of `parts` packets: descriptor with S on the first, frame tag `key`.
fn vp8_packets(seq: u16, ts: u32, key: bool, parts: usize) -> Vec<rtc_rtp::Packet> {
    (0..parts)
        .map(|i| {
            let mut v = vec![if i == 0 { 0x10 } else { 0x00 }];
            if i == 0 {
                v.extend_from_slice(&[if key { 0x00 } else { 0x01 }, 0x00, 0x00]);
                if key {
                    v.extend_from_slice(&[0x9d, 0x01, 0x2a, 0xa0, 0x00, 0x78, 0x00]);
                }
            }
            v.extend_from_slice(&[i as u8; 20]);
            rtp(seq.wrapping_add(i as u16), ts, i + 1 == parts, v)
        })
        .collect()
}

#[test]
fn loss_drops_the_broken_frame_requests_a_keyframe_and_waits_for_it() {
    let mut rx = TrackReceiver::new(untimed(Codec::Vp8));
    let mut c = Collected::default();
    let mut now = 0;
    let send = |rx: &mut TrackReceiver, pkts: Vec<rtc_rtp::Packet>, now: &mut i64, c: &mut Collected| {
        for p in pkts {
            rx.handle_rtp(*now, p).unwrap();
            *now += 10_000;
            drain(rx, c);
        }
    };
    send(&mut rx, vp8_packets(0, 0, true, 3), &mut now, &mut c);
    assert_eq!((c.frames.len(), c.keyframe_requests), (1, 1));
    now = 1_000_000; // past the request interval
    let mut f2 = vp8_packets(3, 3000, false, 3);
    f2.remove(1); // seq 4 lost
    send(&mut rx, f2, &mut now, &mut c);
    send(&mut rx, vp8_packets(6, 6000, false, 2), &mut now, &mut c); // whole, but after the loss
    assert_eq!(c.frames.len(), 1, "held behind the gap");
    rx.handle_timeout(now + 200_000);
    drain(&mut rx, &mut c);
    assert_eq!(c.frames.len(), 1, "frame 2 dropped, frame 3 is a delta frame after a loss");
    assert_eq!(c.dropped.len(), 1);
    assert!(matches!(c.dropped[0], DropReason::Incomplete(_)));
    assert_eq!(c.keyframe_requests, 2);
    let s = rx.stats();
    assert_eq!((s.lost, s.frames_dropped_incomplete, s.frames_dropped_waiting_keyframe), (1, 1, 1));
    // Rate limit: asking again right away does nothing; after the interval it repeats.
    rx.request_keyframe(now + 200_000);
    drain(&mut rx, &mut c);
    assert_eq!(c.keyframe_requests, 2);
    let retry = rx.poll_timeout().unwrap();
    assert_eq!(retry, now + 200_000 + 500_000);
    rx.handle_timeout(retry);
    drain(&mut rx, &mut c);
    assert_eq!(c.keyframe_requests, 3);
    // The keyframe arrives: recording resumes, requests stop.
    now = retry + 10_000;
    send(&mut rx, vp8_packets(8, 9000, true, 2), &mut now, &mut c);
    send(&mut rx, vp8_packets(10, 12000, false, 2), &mut now, &mut c);
    assert_eq!(c.frames.len(), 3);
    assert!(c.frames[1].keyframe && !c.frames[2].keyframe);
    assert_eq!(rx.poll_timeout(), None);
    // On demand (the segment writer wants a keyframe to close a segment).
    rx.request_keyframe(now);
    drain(&mut rx, &mut c);
    assert_eq!(c.keyframe_requests, 3, "rate-limited: the last request was under 500 ms ago");
    rx.handle_timeout(retry + 500_000);
    drain(&mut rx, &mut c);
    assert_eq!(c.keyframe_requests, 4);
    assert_eq!(rx.stats().keyframe_requests, 4);
}

#[test]
fn h264_stap_a_and_fu_a_through_the_receiver_and_fu_a_without_start() {
    let sps = [0x67u8, 0x42, 0xc0, 0x1f, 0xda];
    let pps = [0x68u8, 0xce, 0x3c, 0x80];
    let mut stap = vec![0x78];
    for n in [&sps[..], &pps[..]] {
        stap.extend_from_slice(&(n.len() as u16).to_be_bytes());
        stap.extend_from_slice(n);
    }
    let idr: Vec<u8> = [0x65, 0x88].into_iter().chain(0..60u8).collect();
    let fu = |s: bool, e: bool, part: &[u8]| -> Vec<u8> {
        let mut v = vec![0x7c, (s as u8) << 7 | (e as u8) << 6 | 5];
        v.extend_from_slice(part);
        v
    };
    let mut rx = TrackReceiver::new(untimed(Codec::H264));
    let mut c = Collected::default();
    let pkts = vec![
        rtp(65534, 90_000, false, stap),
        rtp(65535, 90_000, false, fu(true, false, &idr[1..30])),
        rtp(0, 90_000, true, fu(false, true, &idr[30..])),
        // Next frame: FU-A middle and end, start lost (seq 1 never arrives).
        rtp(2, 93_000, false, fu(false, false, &[0x11; 10])),
        rtp(3, 93_000, true, fu(false, true, &[0x12; 10])),
        // A P frame as a single NAL unit (first_mb_in_slice = 0).
        rtp(4, 96_000, true, vec![0x41, 0x9a, 0x01]),
    ];
    for p in pkts {
        rx.handle_rtp(0, p).unwrap();
    }
    rx.handle_timeout(1_000_000);
    drain(&mut rx, &mut c);
    let mut want = vec![0, 0, 0, 1];
    want.extend_from_slice(&sps);
    want.extend_from_slice(&[0, 0, 0, 1]);
    want.extend_from_slice(&pps);
    want.extend_from_slice(&[0, 0, 0, 1]);
    want.extend_from_slice(&idr);
    assert_eq!(c.frames.len(), 1);
    assert_eq!(&c.frames[0].data[..], &want[..]);
    assert!(c.frames[0].keyframe);
    assert_eq!(c.dropped, vec![DropReason::Incomplete("the start of the frame is missing")]);
    let s = rx.stats();
    assert_eq!((s.lost, s.frames_dropped_incomplete, s.frames_dropped_waiting_keyframe), (1, 1, 1));
}

#[test]
fn malformed_packets_are_counted_and_never_panic() {
    // Truncated descriptors.
    let cases: Vec<(Codec, Vec<u8>)> = vec![
        (Codec::Vp8, vec![0x90]),
        (Codec::Vp8, vec![0x90, 0x80]),
        (Codec::Vp9, vec![0x80]),
        (Codec::Vp9, vec![0xa0, 0x01]),
        (Codec::H264, vec![0x7c, 0x85]),
        (Codec::H264, vec![0x78, 0x00, 0x10, 0x67]),
        (Codec::Av1, vec![0x00, 0x7f]),
    ];
    for (codec, payload) in cases {
        let mut rx = TrackReceiver::new(untimed(codec));
        let err = rx.handle_rtp(0, rtp(1, 0, true, payload.clone())).unwrap_err();
        assert!(err.to_string().contains("malformed"), "{err}");
        assert_eq!(rx.stats().malformed_packets, 1, "{codec} {payload:?}");
        rx.handle_timeout(1_000_000);
        assert_eq!(rx.stats().frames_emitted, 0);
    }
    // Random garbage through every codec: errors, drops, but no panic.
    let mut rng = StdRng::seed_from_u64(9);
    for codec in [Codec::Opus, Codec::Vp8, Codec::Vp9, Codec::H264, Codec::Av1] {
        let mut rx = TrackReceiver::new(untimed(codec));
        let mut now = 0;
        for i in 0..3000u32 {
            let len = rng.gen_range(0..40);
            let payload: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            let seq = (i + rng.gen_range(0..3)) as u16;
            let ts = (i / 3) * 3000 + rng.gen_range(0..2);
            let _ = rx.handle_rtp(now, rtp(seq, ts, rng.gen_bool(0.3), payload));
            now += rng.gen_range(0..5_000);
            while rx.poll_output().is_some() {}
        }
        rx.flush();
        while rx.poll_output().is_some() {}
        assert!(rx.stats().malformed_packets > 0 || codec == Codec::Opus);
    }
}

#[test]
fn opus_sequence_and_timestamp_wraparound() {
    let mut rx = TrackReceiver::new(untimed(Codec::Opus));
    let ts0 = u32::MAX - 960 * 2 + 1;
    let mut c = Collected::default();
    for k in 0..6u32 {
        let seq = 65533u16.wrapping_add(k as u16);
        rx.handle_rtp(5_000 + k as i64 * 20_000, rtp(seq, ts0.wrapping_add(960 * k), true, vec![0xfc, k as u8])).unwrap();
    }
    drain(&mut rx, &mut c);
    let pts: Vec<i64> = c.frames.iter().map(|f| f.pts_us).collect();
    assert_eq!(pts, vec![5_000, 25_000, 45_000, 65_000, 85_000, 105_000]);
    assert!(c.frames.iter().all(|f| f.keyframe));
    assert_eq!(c.frames[5].data[..], [0xfc, 5]);
    assert_eq!(c.keyframe_requests, 0, "audio never asks for keyframes");
    // A duplicate from before the wrap is late, not a new frame.
    rx.handle_rtp(200_000, rtp(65534, ts0.wrapping_add(960), true, vec![0xfc, 1])).unwrap();
    assert_eq!(rx.stats().late, 1);
    assert!(rx.poll_output().is_none());
}

#[test]
fn sender_reports_align_audio_and_video_of_one_sender_from_the_first_frame() {
    // The sender's NTP clock: 3 900 000 000 s since 1900 at the capture of the first samples.
    let ntp0: u64 = 3_900_000_000u64 << 32;
    let ntp_at = |ms: u64| ntp0 + ((ms << 32) / 1000);
    let (audio_ts0, video_ts0) = (4_000_000_000u32, 123_456u32); // unrelated random bases
    // Capture instant t (ms) → RTP timestamps.
    let a_ts = |ms: u32| audio_ts0.wrapping_add(48 * ms);
    let v_ts = |ms: u32| video_ts0.wrapping_add(90 * ms);

    let mut participant = ParticipantClock::default();
    let mut audio = TrackReceiver::new(ReceiverConfig::new(Codec::Opus));
    let mut video = TrackReceiver::new(ReceiverConfig::new(Codec::Vp8));
    // Arrival is skewed: audio arrives 30 ms after capture, video 180 ms (big keyframe, pacing).
    let rec0 = 2_000_000i64; // the recording clock at capture t=0
    let arrive = |ms: u32, skew: i64| rec0 + ms as i64 * 1000 + skew;
    let mut ca = Collected::default();
    let mut cv = Collected::default();
    audio.handle_rtp(arrive(0, 30_000), rtp(1, a_ts(0), true, vec![0xfc, 0])).unwrap();
    let vp = vp8_packets(1, v_ts(0), true, 1);
    video.handle_rtp(arrive(0, 180_000), vp[0].clone()).unwrap();
    audio.handle_timeout(arrive(900, 0));
    video.handle_timeout(arrive(900, 0));
    drain(&mut audio, &mut ca);
    drain(&mut video, &mut cv);
    // Before any SR the frames are held (timed by arrival they would be 150 ms apart)…
    assert!(ca.frames.is_empty() && cv.frames.is_empty(), "frames wait for the first Sender Report");
    assert_eq!(audio.poll_timeout(), Some(arrive(0, 30_000) + 6_000_000), "for at most 6 s");

    // SRs (sent at capture time 1000 ms, audio's arrives 20 ms later, video's 25 ms later).
    let sr_a = SenderReportTiming { ntp_time: ntp_at(1000), rtp_time: a_ts(1000) };
    let sr_v = SenderReportTiming { ntp_time: ntp_at(1000), rtp_time: v_ts(1000) };
    let off = participant.offset(sr_a, arrive(1000, 20_000));
    audio.handle_sender_report(sr_a, off);
    let off_v = participant.offset(sr_v, arrive(1000, 25_000));
    assert_eq!(off, off_v, "one offset per participant");
    video.handle_sender_report(sr_v, off_v);
    drain(&mut audio, &mut ca);
    drain(&mut video, &mut cv);
    // …then go out on the sender's clock: the first frames, captured together, get one pts, the
    // capture time + the first SR's transit (20 ms).
    assert_eq!((ca.frames.len(), cv.frames.len()), (1, 1));
    assert_eq!(ca.frames[0].pts_us, cv.frames[0].pts_us);
    assert_eq!(ca.frames[0].pts_us, rec0 + 20_000);
    assert_eq!(audio.stats().frames_held_for_sender_report, 1);
    assert_eq!(audio.stats().sender_report_wait_expired, 0);

    // Later frames are not held.
    audio.handle_rtp(arrive(2000, 30_000), rtp(2, a_ts(2000), true, vec![0xfc, 1])).unwrap();
    let vp = vp8_packets(2, v_ts(2000), false, 1);
    video.handle_rtp(arrive(2000, 180_000), vp[0].clone()).unwrap();
    drain(&mut audio, &mut ca);
    drain(&mut video, &mut cv);
    assert_eq!(ca.frames[1].pts_us, cv.frames[1].pts_us);
    assert_eq!(ca.frames[1].pts_us, rec0 + 2_000_000 + 20_000);
}

#[test]
fn without_a_sender_report_held_frames_go_out_timed_by_arrival() {
    let mut rx = TrackReceiver::new(ReceiverConfig::new(Codec::Opus));
    let mut out = Collected::default();
    // 20 ms frames arriving from 1 s on; no Sender Report ever comes.
    for k in 0..400u32 {
        let now = 1_000_000 + k as i64 * 20_000;
        rx.handle_timeout(now);
        rx.handle_rtp(now, rtp(k as u16, 960 * k, true, vec![0xfc, k as u8])).unwrap();
        drain(&mut rx, &mut out);
        if now < 7_000_000 {
            assert!(out.frames.is_empty(), "held at {now} µs");
        }
    }
    // At 7 s (6 s after the first packet) the 300 held frames went out, timed by arrival, and the
    // rest followed as they came.
    assert_eq!(out.frames.len(), 400);
    for (k, f) in out.frames.iter().enumerate() {
        assert_eq!(f.pts_us, 1_000_000 + k as i64 * 20_000);
    }
    let s = rx.stats();
    assert_eq!((s.frames_held_for_sender_report, s.sender_report_wait_expired), (300, 1));

    // A track that ends while holding gives its frames up at the flush.
    let mut rx = TrackReceiver::new(ReceiverConfig::new(Codec::Opus));
    let mut out = Collected::default();
    for k in 0..10u32 {
        rx.handle_rtp(k as i64 * 20_000, rtp(k as u16, 960 * k, true, vec![0xfc, 0])).unwrap();
    }
    drain(&mut rx, &mut out);
    assert!(out.frames.is_empty());
    rx.flush();
    drain(&mut rx, &mut out);
    assert_eq!(out.frames.len(), 10);

    // The hold is bounded in bytes too.
    let cfg = ReceiverConfig { max_held_bytes: 1000, ..ReceiverConfig::new(Codec::Opus) };
    let mut rx = TrackReceiver::new(cfg);
    let mut out = Collected::default();
    for k in 0..10u32 {
        rx.handle_rtp(k as i64 * 20_000, rtp(k as u16, 960 * k, true, vec![0xfc; 300])).unwrap();
    }
    drain(&mut rx, &mut out);
    assert_eq!(out.frames.len(), 10, "past 1000 held bytes the frames went out");
    assert_eq!(rx.stats().frames_held_for_sender_report, 4);
}
