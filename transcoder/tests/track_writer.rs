//! TrackWriter against real encoder output: fixtures are encoded by the ffmpeg CLI at test
//! time, demuxed with ffmpeg-next and fed frame by frame as the receive path would.

mod common;

use std::path::Path;

use common::*;
use transcoder::{
    Codec, EncodedFrame, SegmentInfo, TrackWriter, TrackWriterConfig, TranscodeError,
};

/// Where the recording clock puts the track's first frame: not 0, to prove absolute times.
const OFFSET_US: i64 = 1_500_000;

fn fixture(dir: &Path, codec: Codec) -> std::path::PathBuf {
    fixture_gop(dir, codec, 30)
}

fn fixture_gop(dir: &Path, codec: Codec, gop: u32) -> std::path::PathBuf {
    let video = "testsrc=s=320x240:r=30:d=7";
    // MPEG-TS carries H.264 as Annex B and IVF keeps AV1 temporal units as they are: the forms
    // the WebRTC depacketizers hand over.
    let (name, src) = match codec {
        Codec::Opus => ("in.webm", "sine=f=440:d=7"),
        Codec::Vp8 | Codec::Vp9 => ("in.webm", video),
        Codec::H264 => ("in.ts", video),
        Codec::Av1 => ("in.ivf", "testsrc=s=256x144:r=30:d=7"),
    };
    let out = p(dir, name);
    encode_gop(&out, codec, src, gop);
    out
}

fn config(dir: &Path, codec: Codec) -> TrackWriterConfig {
    TrackWriterConfig::new(dir.join("segs"), format!("track-{codec}"), codec)
}

/// The checks every codec must pass.
fn check_segments(codec: Codec, segs: &[SegmentInfo], pkts: &[Packet], size: Option<(u32, u32)>) {
    assert!(segs.len() >= 3, "{codec}: only {} segments", segs.len());
    let frame_us = pkts[1].pts_us - pkts[0].pts_us;
    let input_end = pkts.last().unwrap().pts_us + OFFSET_US + frame_us;
    assert_eq!(
        segs[0].start_us,
        pkts[0].pts_us + OFFSET_US,
        "{codec}: first segment starts at the first frame"
    );
    assert!(
        (segs.last().unwrap().end_us - input_end).abs() <= frame_us,
        "{codec}: segments end at {} us, input at {input_end} us",
        segs.last().unwrap().end_us
    );
    let total: u64 = segs.iter().map(|s| s.frames).sum();
    assert_eq!(
        total,
        pkts.len() as u64,
        "{codec}: every frame is in exactly one segment"
    );
    for (i, s) in segs.iter().enumerate() {
        assert_eq!(s.index, i as u32);
        let ext = if codec == Codec::H264 { "mkv" } else { "webm" };
        assert_eq!(
            s.path.file_name().unwrap().to_str().unwrap(),
            format!("track-{codec}-{i:05}.{ext}")
        );
        assert_eq!(std::fs::metadata(&s.path).unwrap().len(), s.bytes);
        assert_eq!(s.sha256.len(), 64);
        if i + 1 < segs.len() {
            assert_eq!(
                s.end_us,
                segs[i + 1].start_us,
                "{codec}: segment {i} and the next are contiguous"
            );
            // Cut at the first keyframe at or after 2 s (audio: the first frame).
            let len = s.end_us - s.start_us;
            assert!(
                len >= 2_000_000 && len < 2_000_000 + 1_000_000 + frame_us,
                "{codec}: segment {i} lasts {len} us"
            );
        }
        let errors = decode_errors(&s.path);
        assert!(
            errors.is_empty(),
            "{codec}: segment {i} does not decode cleanly on its own: {errors}"
        );
        let pr = probe(&s.path);
        assert_eq!(pr.codec, codec.name());
        // Matroska keeps milliseconds.
        assert!(
            (pr.start_us - s.start_us).abs() <= 1000,
            "{codec}: segment {i} container start {} vs recorded {}",
            pr.start_us,
            s.start_us
        );
        assert!((pr.first_pts_us - s.start_us).abs() <= 1000);
        assert!(
            (pr.end_us - s.end_us).abs() <= 1000,
            "{codec}: segment {i} content ends at {} vs recorded {}",
            pr.end_us,
            s.end_us
        );
        assert_eq!(pr.packets, s.frames);
        if codec != Codec::Opus {
            assert_eq!(
                pr.decoded_frames, s.frames,
                "{codec}: segment {i}: every frame decodes"
            );
            assert_eq!(
                (pr.width, pr.height),
                size.map(|(w, h)| (Some(w), Some(h))).unwrap()
            );
            assert_eq!((s.width, s.height), (pr.width, pr.height));
        } else {
            assert!(pr.decoded_frames >= s.frames);
        }
    }
}

fn codec_round_trip(codec: Codec, size: Option<(u32, u32)>) {
    let tmpdir = tmp();
    let dir = tmpdir.path().to_path_buf();
    let src = fixture(&dir, codec);
    let pkts = packets(&src);
    assert!(pkts.len() > 100, "fixture too short");
    let writer = TrackWriter::new(config(&dir, codec)).unwrap();
    let segs = write_all(writer, &pkts, OFFSET_US);
    check_segments(codec, &segs, &pkts, size);
    // No half-written file is left behind after finish().
    for e in std::fs::read_dir(dir.join("segs")).unwrap() {
        let name = e.unwrap().file_name();
        assert!(
            !name.to_string_lossy().ends_with(".partial"),
            "{name:?} left behind"
        );
    }
}

#[test]
fn opus_segments() {
    codec_round_trip(Codec::Opus, None);
}

#[test]
fn vp8_segments() {
    codec_round_trip(Codec::Vp8, Some((320, 240)));
}

#[test]
fn vp9_segments() {
    codec_round_trip(Codec::Vp9, Some((320, 240)));
}

#[test]
fn h264_segments() {
    codec_round_trip(Codec::H264, Some((320, 240)));
}

#[test]
fn av1_segments() {
    codec_round_trip(Codec::Av1, Some((256, 144)));
}

#[test]
fn video_waits_for_a_keyframe_and_asks_for_one() {
    let dir = tmp();
    // Keyframes every 1.5 s, so a 2 s segment is due before the next keyframe comes.
    let src = fixture_gop(dir.path(), Codec::Vp8, 45);
    let pkts = packets(&src);
    let mut w = TrackWriter::new(config(dir.path(), Codec::Vp8)).unwrap();
    assert!(w.wants_keyframe());
    // Start mid-GOP: frames up to the next keyframe are dropped.
    let first_key = pkts.iter().skip(1).position(|p| p.key).unwrap() + 1;
    for p in &pkts[1..first_key] {
        assert!(w.write(frame(p, 0)).unwrap().is_empty());
        assert!(w.wants_keyframe());
    }
    assert_eq!(w.stats().dropped_before_keyframe, (first_key - 1) as u64);
    let mut segs = Vec::new();
    let mut asked = false;
    for p in &pkts[first_key..] {
        segs.extend(w.write(frame(p, 0)).unwrap());
        asked |= w.wants_keyframe();
    }
    assert!(asked, "a due segment asks for a keyframe until one comes");
    segs.extend(w.finish().unwrap());
    assert_eq!(segs[0].start_us, pkts[first_key].pts_us);
    assert!(segs.iter().all(|s| decode_errors(&s.path).is_empty()));
}

#[test]
fn an_interruption_closes_the_segment_and_the_next_one_starts_on_a_keyframe() {
    let dir = tmp();
    let src = fixture_gop(dir.path(), Codec::Vp8, 45);
    let pkts = packets(&src);
    let mut w = TrackWriter::new(config(dir.path(), Codec::Vp8)).unwrap();
    // Frames 0..40 written, then a pause: 40..70 are left out, writing goes on at 70 (mid-GOP).
    let mut segs = Vec::new();
    for p in &pkts[..40] {
        segs.extend(w.write(frame(p, 0)).unwrap());
    }
    let before = w.interrupt().unwrap();
    assert_eq!(before.len(), 1, "the open segment is closed at once");
    assert_eq!(before[0].frames, 40, "with every frame written before the pause");
    assert!(w.wants_keyframe(), "after the pause video waits for a keyframe");
    assert!(w.interrupt().unwrap().is_empty(), "a second interruption closes nothing");
    segs.extend(before);
    let next_key = 70 + pkts[70..].iter().position(|p| p.key).unwrap();
    for p in &pkts[70..] {
        segs.extend(w.write(frame(p, 0)).unwrap());
    }
    segs.extend(w.finish().unwrap());
    assert_eq!(w_dropped(&segs, &pkts), (next_key - 70) as u64 + 30);
    let after = &segs[1];
    assert_eq!(after.start_us, pkts[next_key].pts_us, "the next segment starts on the next keyframe");
    assert!(segs[0].end_us <= pkts[41].pts_us, "no segment spans the pause");
    assert!(segs.iter().all(|s| decode_errors(&s.path).is_empty()));
}

/// Frames of `pkts` that are in no segment.
fn w_dropped(segs: &[SegmentInfo], pkts: &[Packet]) -> u64 {
    pkts.len() as u64 - segs.iter().map(|s| s.frames).sum::<u64>()
}

#[test]
fn resolution_change_starts_a_new_segment() {
    let dir = tmp();
    let a = p(dir.path(), "a.webm");
    let b = p(dir.path(), "b.webm");
    let enc = [
        "-c:v",
        "libvpx",
        "-g",
        "30",
        "-deadline",
        "realtime",
        "-cpu-used",
        "8",
        "-b:v",
        "400k",
    ];
    let mut args = vec!["-f", "lavfi", "-i", "testsrc=s=640x360:r=30:d=3"];
    args.extend_from_slice(&enc);
    args.push(a.to_str().unwrap());
    ffmpeg(&args);
    let mut args = vec!["-f", "lavfi", "-i", "testsrc=s=320x240:r=30:d=3"];
    args.extend_from_slice(&enc);
    args.push(b.to_str().unwrap());
    ffmpeg(&args);
    let pa = packets(&a);
    let mut pb = packets(&b);
    let switch_us = pa.last().unwrap().pts_us + 33_333;
    for p in pb.iter_mut() {
        p.pts_us += switch_us;
    }
    let all: Vec<Packet> = pa.into_iter().chain(pb).collect();
    let w = TrackWriter::new(config(dir.path(), Codec::Vp8)).unwrap();
    let segs = write_all(w, &all, 0);
    let cut = segs
        .iter()
        .position(|s| s.start_us == switch_us)
        .expect("a segment starts exactly at the switch");
    for (i, s) in segs.iter().enumerate() {
        let want = if i < cut { (640, 360) } else { (320, 240) };
        assert_eq!(
            (s.width, s.height),
            (Some(want.0), Some(want.1)),
            "segment {i}"
        );
        let pr = probe(&s.path);
        assert_eq!(
            (pr.width, pr.height),
            (Some(want.0), Some(want.1)),
            "segment {i} as probed"
        );
        assert!(decode_errors(&s.path).is_empty());
    }
    // The segment before the switch was cut early, at 3 s rather than after 4 s.
    assert_eq!(segs[cut - 1].end_us, switch_us);
}

#[test]
fn garbage_frames_are_rejected_and_the_writer_goes_on() {
    let dir = tmp();
    let src = fixture(dir.path(), Codec::Vp8);
    let pkts = packets(&src);
    let mut w = TrackWriter::new(config(dir.path(), Codec::Vp8)).unwrap();
    let mut segs = Vec::new();
    let mut rejected = 0;
    for (i, p) in pkts.iter().enumerate() {
        if i == 40 {
            let bad = [
                EncodedFrame {
                    data: bytes::Bytes::new(),
                    pts_us: p.pts_us - 1,
                    keyframe: false,
                },
                // A key frame cut short in its header.
                EncodedFrame {
                    data: pkts[0].data.slice_to(6),
                    pts_us: p.pts_us - 1,
                    keyframe: true,
                },
                // Noise claiming to be a key frame: no VP8 start code.
                EncodedFrame {
                    data: vec![0x50u8; 200].into(),
                    pts_us: p.pts_us - 1,
                    keyframe: true,
                },
            ];
            for f in bad {
                match w.write(f) {
                    Err(TranscodeError::InvalidFrame { .. }) => rejected += 1,
                    other => panic!("garbage accepted: {other:?}"),
                }
            }
            // Going backwards in time: dropped.
            match w.write(frame(&pkts[10], 0)) {
                Err(TranscodeError::NonMonotonicPts { .. }) => {}
                other => panic!("backwards pts accepted: {other:?}"),
            }
        }
        segs.extend(w.write(frame(p, 0)).unwrap());
    }
    let stats = w.stats();
    segs.extend(w.finish().unwrap());
    assert_eq!(rejected, 3);
    assert_eq!(stats.rejected, 3);
    assert_eq!(stats.dropped_backwards, 1);
    assert_eq!(
        segs.iter().map(|s| s.frames).sum::<u64>(),
        pkts.len() as u64
    );
    for s in &segs {
        assert!(decode_errors(&s.path).is_empty());
    }

    // The other codecs' framing checks.
    let mut h = TrackWriter::new(TrackWriterConfig::new(
        dir.path().join("h"),
        "h",
        Codec::H264,
    ))
    .unwrap();
    assert!(matches!(
        h.write(EncodedFrame {
            data: vec![0x65, 1, 2, 3].into(),
            pts_us: 0,
            keyframe: true
        }),
        Err(TranscodeError::InvalidFrame { .. })
    ));
    let mut a = TrackWriter::new(TrackWriterConfig::new(
        dir.path().join("a"),
        "a",
        Codec::Av1,
    ))
    .unwrap();
    assert!(matches!(
        a.write(EncodedFrame {
            data: vec![0x32, 0x7f, 1].into(),
            pts_us: 0,
            keyframe: true
        }),
        Err(TranscodeError::InvalidFrame { .. })
    ));
    let mut o = TrackWriter::new(TrackWriterConfig::new(
        dir.path().join("o"),
        "o",
        Codec::Opus,
    ))
    .unwrap();
    assert!(matches!(
        o.write(EncodedFrame {
            data: bytes::Bytes::new(),
            pts_us: 0,
            keyframe: true
        }),
        Err(TranscodeError::InvalidFrame { .. })
    ));
    assert!(matches!(
        o.write(EncodedFrame {
            data: vec![0xfb].into(),
            pts_us: -5,
            keyframe: true
        }),
        Err(TranscodeError::InvalidFrame { .. })
    ));
}

trait SliceTo {
    fn slice_to(&self, n: usize) -> bytes::Bytes;
}
impl SliceTo for Vec<u8> {
    fn slice_to(&self, n: usize) -> bytes::Bytes {
        bytes::Bytes::copy_from_slice(&self[..n])
    }
}

#[test]
fn drop_closes_the_open_segment() {
    let dir = tmp();
    let src = fixture(dir.path(), Codec::Opus);
    let pkts = packets(&src);
    {
        let mut w = TrackWriter::new(config(dir.path(), Codec::Opus)).unwrap();
        for p in &pkts[..60] {
            w.write(frame(p, 0)).unwrap();
        }
    }
    let seg = dir.path().join("segs/track-opus-00000.webm");
    assert!(seg.exists(), "dropped writer closed its segment");
    assert!(decode_errors(&seg).is_empty());
}

/// The receive path may hand over two frames less than a millisecond apart (a clock re-anchored
/// by an RTCP sender report clamps to +1 µs). Matroska stores milliseconds, so the writer must
/// still give the muxer strictly increasing times instead of failing the segment.
#[test]
fn frames_within_one_millisecond_are_written_in_order() {
    let tmpdir = tmp();
    let dir = tmpdir.path().to_path_buf();
    let pkts = packets(&fixture(&dir, Codec::Opus));
    let mut writer = TrackWriter::new(config(&dir, Codec::Opus)).unwrap();
    let mut segs = Vec::new();
    let mut pts = OFFSET_US;
    for (i, p) in pkts.iter().take(60).enumerate() {
        // Frames 10..=12 are bunched 1 µs apart, as after a backwards clock step.
        pts += if (11..=12).contains(&i) { 1 } else { 20_000 };
        let f = EncodedFrame { data: p.data.clone().into(), pts_us: pts, keyframe: true };
        segs.extend(writer.write(f).expect("a bunched frame is accepted"));
    }
    segs.extend(writer.finish().unwrap());
    assert_eq!(segs.iter().map(|s| s.frames).sum::<u64>(), 60, "no frame lost");
    for s in &segs {
        let errs = decode_errors(&s.path);
        assert!(errs.trim().is_empty(), "{}: {errs}", s.path.display());
    }
}

/// A live audio clock that steps back a few ms (a sender report re-anchoring it) right at a
/// segment boundary must not make two segments overlap: the manifest refuses overlapping segments,
/// so one overlap would fail the whole recording's finalization.
#[test]
fn audio_clock_stepping_back_at_a_boundary_leaves_no_overlap() {
    let dir = tmp();
    let src = fixture(dir.path(), Codec::Opus);
    let pkts = packets(&src);
    let mut w = TrackWriter::new(config(dir.path(), Codec::Opus)).unwrap();
    let mut segs = Vec::new();
    for (n, p) in pkts.iter().enumerate() {
        // 20 ms frames; the first at 0, the rest of the first 2 s 19 ms late, later ones 15 ms
        // late: the first segment's last frame (1.999 s) then ends at 2.019 s, after the start of
        // the frame that is due to open the second segment (2.015 s).
        let n = n as i64;
        let late = match n {
            0 => 0,
            1..=99 => 19_000,
            _ => 15_000,
        };
        let f = EncodedFrame { pts_us: n * 20_000 + late, ..frame(p, 0) };
        segs.extend(w.write(f).unwrap());
    }
    segs.extend(w.finish().unwrap());
    assert!(segs.len() >= 2, "{segs:?}");
    for pair in segs.windows(2) {
        assert!(pair[0].end_us <= pair[1].start_us, "segments overlap: {:?} then {:?}", pair[0], pair[1]);
    }
}

/// A process killed mid-segment leaves `<segment>.partial`, never closed: the live muxer flushes
/// short clusters, so [`salvage_segment`] rebuilds all but the last half second or so, with the
/// recording-clock times, decodable.
#[test]
fn a_segment_left_open_by_a_kill_is_salvaged_up_to_its_last_cluster() {
    let dir = tmp();
    let src = fixture(dir.path(), Codec::Vp8);
    let pkts = packets(&src);
    let mut cfg = config(dir.path(), Codec::Vp8);
    cfg.segment_duration = std::time::Duration::from_secs(30);
    let mut w = TrackWriter::new(cfg).unwrap();
    for p in &pkts[..90] {
        assert!(w.write(frame(p, OFFSET_US)).unwrap().is_empty(), "one open segment");
    }
    // What a SIGKILL leaves: no trailer, whatever the muxer held in memory is gone.
    std::mem::forget(w);
    let partial = dir.path().join("segs/track-vp8-00000.webm.partial");
    assert!(partial.exists(), "the open segment is on disk as {}", partial.display());
    let out = dir.path().join("salvaged.webm");
    let s = transcoder::salvage_segment(&partial, &out).unwrap().expect("something salvaged");
    eprintln!("salvaged {} of 90 frames, {}–{} µs, {} bytes", s.packets, s.start_us, s.end_us, s.bytes);
    // At most one cluster (500 ms = 15 frames) in memory, the last read frame left out, and the
    // frame held back by the writer for its duration.
    assert!(s.packets >= 90 - 15 - 2, "salvaged {} frames of 90", s.packets);
    assert!(s.packets < 90);
    assert_eq!(s.start_us, (pkts[0].pts_us + OFFSET_US) / 1000 * 1000, "the first frame keeps its time");
    assert!(s.end_us <= pkts[89].pts_us + OFFSET_US);
    assert!(decode_errors(&out).is_empty(), "the salvaged segment decodes: {}", decode_errors(&out));
    assert!(partial.exists(), "the partial file is kept");

    // A segment with nothing flushed yet has nothing to salvage.
    let mut cfg = config(dir.path(), Codec::Opus);
    cfg.track_id = "short".into();
    let mut w = TrackWriter::new(cfg).unwrap();
    let opus = packets(&fixture(dir.path(), Codec::Opus));
    w.write(frame(&opus[0], 0)).unwrap();
    std::mem::forget(w);
    let partial = dir.path().join("segs/short-00000.webm.partial");
    let out = dir.path().join("short.webm");
    assert_eq!(transcoder::salvage_segment(&partial, &out).unwrap(), None);
    assert!(!out.exists());
}
