//! join_segments against real segments: fixtures are encoded by the ffmpeg CLI at test time,
//! written through TrackWriter into ~2 s segments, then joined back into one file per track and
//! checked with ffprobe and a full decode.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use transcoder::{
    join_segments, Codec, EncodedFrame, JoinReport, SegmentInfo, TrackWriter, TrackWriterConfig,
    TranscodeError,
};

/// Where the recording clock puts the track's first frame: not 0, to prove times are kept.
const OFFSET_US: i64 = 1_500_000;

/// A 7 s track of `codec` written through TrackWriter; returns its segments.
fn track(dir: &Path, codec: Codec) -> Vec<SegmentInfo> {
    let (src, name) = match codec {
        Codec::Opus => ("sine=f=440:d=7", "in.webm"),
        Codec::H264 => ("testsrc=s=320x240:r=30:d=7", "in.ts"),
        Codec::Av1 => ("testsrc=s=256x144:r=30:d=7", "in.ivf"),
        _ => ("testsrc=s=320x240:r=30:d=7", "in.webm"),
    };
    let input = p(dir, name);
    encode(&input, codec, src);
    let writer = TrackWriter::new(config(dir, codec)).unwrap();
    let segs = write_all(writer, &packets(&input), OFFSET_US);
    assert!(segs.len() >= 3, "{codec}: only {} segments", segs.len());
    segs
}

fn config(dir: &Path, codec: Codec) -> TrackWriterConfig {
    TrackWriterConfig::new(dir.join("segs"), format!("track-{codec}"), codec)
}

fn paths(segs: &[SegmentInfo]) -> Vec<PathBuf> {
    segs.iter().map(|s| s.path.clone()).collect()
}

fn partial(out: &Path) -> PathBuf {
    PathBuf::from(format!("{}.partial", out.display()))
}

/// DTS of every packet of the file's first stream, in its time base.
fn dts(path: &Path) -> Vec<i64> {
    run(
        "ffprobe",
        &[
            "-v",
            "error",
            "-select_streams",
            "0",
            "-show_entries",
            "packet=dts",
            "-of",
            "csv=p=0",
            path.to_str().unwrap(),
        ],
    )
    .lines()
    .filter(|l| !l.trim().is_empty())
    .map(|l| l.trim().trim_end_matches(',').parse().unwrap())
    .collect()
}

fn stream_count(path: &Path) -> u64 {
    let out = run(
        "ffprobe",
        &[
            "-v",
            "error",
            "-show_entries",
            "format=nb_streams",
            "-of",
            "csv=p=0",
            path.to_str().unwrap(),
        ],
    );
    out.trim().parse().unwrap()
}

/// The EBML DocType the file declares: "webm" or "matroska".
fn doc_type(path: &Path) -> &'static str {
    let head = &std::fs::read(path).unwrap()[..64];
    if head.windows(4).any(|w| w == b"webm") {
        "webm"
    } else if head.windows(8).any(|w| w == b"matroska") {
        "matroska"
    } else {
        panic!("{}: no Matroska DocType", path.display())
    }
}

/// The checks every joined track must pass, against the segments it was joined from.
fn check_joined(codec: Codec, segs: &[SegmentInfo], report: &JoinReport, out: &Path) {
    assert_eq!(report.path, out);
    assert!(!partial(out).exists(), "{codec}: .partial left behind");
    let bytes = std::fs::read(out).unwrap();
    assert_eq!(report.bytes, bytes.len() as u64);
    use sha2::Digest;
    assert_eq!(report.sha256, hex::encode(sha2::Sha256::digest(&bytes)));

    assert_eq!(stream_count(out), 1, "{codec}: one stream");
    let pr = probe(out);
    assert_eq!(pr.codec, codec.name());
    let want_doc = if codec == Codec::H264 {
        "matroska"
    } else {
        "webm"
    };
    assert_eq!(
        doc_type(out),
        want_doc,
        "{codec}: container of the segments"
    );

    let frames: u64 = segs.iter().map(|s| s.frames).sum();
    assert_eq!(
        report.packets, frames,
        "{codec}: every segment packet joined"
    );
    assert_eq!(pr.packets, frames, "{codec}: every packet in the file");
    assert_eq!(report.dropped_packets, 0);

    // Timestamps stay on the recording clock; Matroska keeps milliseconds.
    let (start, end) = (segs[0].start_us, segs.last().unwrap().end_us);
    assert!(
        (pr.first_pts_us - start).abs() <= 1000,
        "{codec}: joined file starts at {} us, first segment at {start} us",
        pr.first_pts_us
    );
    assert!(
        (pr.end_us - end).abs() <= 1000,
        "{codec}: joined file ends at {} us, last segment at {end} us",
        pr.end_us
    );
    assert!(
        (report.duration_us - (end - start)).abs() <= 2000,
        "{codec}: reported {} us, segments span {} us",
        report.duration_us,
        end - start
    );

    let d = dts(out);
    assert_eq!(d.len() as u64, frames);
    assert!(
        d.windows(2).all(|w| w[0] < w[1]),
        "{codec}: DTS not strictly increasing"
    );
    let errors = decode_errors(out);
    assert!(errors.is_empty(), "{codec}: joined file: {errors}");
    if codec != Codec::Opus {
        assert_eq!(pr.decoded_frames, frames, "{codec}: every frame decodes");
        let want = if codec == Codec::Av1 {
            (256, 144)
        } else {
            (320, 240)
        };
        assert_eq!((pr.width, pr.height), (Some(want.0), Some(want.1)));
    }
}

fn join_round_trip(codec: Codec, out_name: &str) {
    let dir = tmp();
    let segs = track(dir.path(), codec);
    let out = p(dir.path(), out_name);
    let report = join_segments(&paths(&segs), &out).unwrap();
    check_joined(codec, &segs, &report, &out);
}

#[test]
fn vp8_track_joins_into_one_webm() {
    join_round_trip(Codec::Vp8, "cam.webm");
}

#[test]
fn opus_track_joins_into_one_webm() {
    join_round_trip(Codec::Opus, "mic.webm");
}

#[test]
fn h264_track_joins_into_one_mkv() {
    join_round_trip(Codec::H264, "cam.mkv");
}

/// TrackWriter writes AV1 into WebM, so its joined file is WebM too.
#[test]
fn av1_track_joins_into_one_webm() {
    join_round_trip(Codec::Av1, "cam.webm");
}

#[test]
fn a_gap_between_segments_stays_a_gap() {
    let dir = tmp();
    let segs = track(dir.path(), Codec::Vp8);
    let kept = [segs[0].clone(), segs[2].clone()];
    let out = p(dir.path(), "gap.webm");
    let report = join_segments(&paths(&kept), &out).unwrap();
    assert_eq!(report.packets, kept[0].frames + kept[1].frames);
    assert_eq!(report.dropped_packets + report.nudged_packets, 0);
    let span = kept[1].end_us - kept[0].start_us;
    assert!(
        (report.duration_us - span).abs() <= 2000,
        "the gap counts in the duration: {} vs {span}",
        report.duration_us
    );
    // The packet after the gap sits where its segment put it, not right after the one before.
    let d = dts(&out);
    let after_gap = d[kept[0].frames as usize] * 1000;
    assert!((after_gap - kept[1].start_us).abs() <= 1000);
    assert!(decode_errors(&out).is_empty());
}

/// Two segments whose boundary packets round onto the same millisecond (a clock step bunched
/// frames 1 µs apart just before the cut): the joined file nudges the later one instead of
/// writing a DTS that does not increase, and keeps every packet.
#[test]
fn boundary_packets_on_one_millisecond_are_nudged() {
    let dir = tmp();
    let input = p(dir.path(), "in.webm");
    encode(&input, Codec::Opus, "sine=f=440:d=3");
    let pkts = packets(&input);
    let mut w = TrackWriter::new(config(dir.path(), Codec::Opus)).unwrap();
    let mut segs = Vec::new();
    // 20 ms apart up to 1.98 s, three frames bunched at 1.999 s (written as 1999, 2000 and
    // 2001 ms), then the frame at 2 s that opens the next segment at 2000 ms.
    let mut times: Vec<i64> = (0..100).map(|k| k * 20_000).collect();
    times.extend([1_999_000, 1_999_001, 1_999_002]);
    times.extend((0..40).map(|k| 2_000_000 + k * 20_000));
    for (p, t) in pkts.iter().zip(&times) {
        let f = EncodedFrame {
            data: p.data.clone().into(),
            pts_us: *t,
            keyframe: true,
        };
        segs.extend(w.write(f).unwrap());
    }
    segs.extend(w.finish().unwrap());
    assert_eq!(segs.len(), 2);
    assert_eq!(segs[1].start_us, 2_000_000);

    let out = p(dir.path(), "mic.webm");
    let report = join_segments(&paths(&segs), &out).unwrap();
    assert_eq!(report.packets, times.len() as u64, "no packet lost");
    assert_eq!(report.dropped_packets, 0);
    assert_eq!(report.nudged_packets, 1);
    let d = dts(&out);
    assert!(d.windows(2).all(|w| w[0] < w[1]), "{d:?}");
    assert_eq!(&d[100..105], &[1999, 2000, 2001, 2002, 2020]);
    assert!(decode_errors(&out).is_empty());
}

/// The same segment given twice overlaps completely: the second copy is dropped and counted,
/// and what is written still decodes.
#[test]
fn overlapping_segments_are_dropped_and_counted() {
    let dir = tmp();
    let segs = track(dir.path(), Codec::Vp8);
    let out = p(dir.path(), "twice.webm");
    let report = join_segments(&[segs[0].path.clone(), segs[0].path.clone()], &out).unwrap();
    assert_eq!(report.packets, segs[0].frames);
    assert_eq!(report.dropped_packets, segs[0].frames);
    assert!(decode_errors(&out).is_empty());
    assert_eq!(probe(&out).decoded_frames, segs[0].frames);
}

#[test]
fn resolution_change_is_refused_naming_the_segment() {
    let dir = tmp();
    let a = p(dir.path(), "a.webm");
    let b = p(dir.path(), "b.webm");
    encode(&a, Codec::Vp8, "testsrc=s=640x360:r=30:d=3");
    encode(&b, Codec::Vp8, "testsrc=s=320x240:r=30:d=3");
    let pa = packets(&a);
    let mut pb = packets(&b);
    let switch_us = pa.last().unwrap().pts_us + 33_333;
    for p in pb.iter_mut() {
        p.pts_us += switch_us;
    }
    let all: Vec<Packet> = pa.into_iter().chain(pb).collect();
    let segs = write_all(
        TrackWriter::new(config(dir.path(), Codec::Vp8)).unwrap(),
        &all,
        0,
    );
    let cut = segs.iter().position(|s| s.start_us == switch_us).unwrap();

    let out = p(dir.path(), "cam.webm");
    match join_segments(&paths(&segs), &out) {
        Err(TranscodeError::ParametersChanged {
            index,
            path,
            change,
        }) => {
            assert_eq!(index, cut);
            assert_eq!(path, segs[cut].path);
            assert_eq!(change, "size from 640x360 to 320x240");
        }
        other => panic!("a size change was joined: {other:?}"),
    }
    assert!(!out.exists() && !partial(&out).exists());
    // The segments before the change still join.
    let report = join_segments(&paths(&segs[..cut]), &out).unwrap();
    assert_eq!(
        report.packets,
        segs[..cut].iter().map(|s| s.frames).sum::<u64>()
    );
}

#[test]
fn missing_segment_is_an_error_and_writes_nothing() {
    let dir = tmp();
    let segs = track(dir.path(), Codec::Opus);
    let mut list = paths(&segs);
    let missing = dir.path().join("segs/track-opus-00099.webm");
    list.insert(1, missing.clone());
    let out = p(dir.path(), "mic.webm");
    let err = join_segments(&list, &out).unwrap_err();
    match &err {
        TranscodeError::BadSegment { path, .. } => assert_eq!(path, &missing),
        other => panic!("unexpected error: {other:?}"),
    }
    assert!(err.to_string().contains("track-opus-00099.webm"), "{err}");
    assert!(!out.exists() && !partial(&out).exists());
    assert!(matches!(
        join_segments(&[], &out),
        Err(TranscodeError::Unsupported(_))
    ));
}

/// A segment cut short reads without an error in libavformat, up to the cut; the join must
/// still refuse it rather than produce a track with a hole. A failed join also leaves an
/// earlier successful one in place.
#[test]
fn truncated_segment_is_an_error_and_keeps_the_earlier_join() {
    let dir = tmp();
    let segs = track(dir.path(), Codec::Vp8);
    let out = p(dir.path(), "cam.webm");
    let good = join_segments(&paths(&segs), &out).unwrap();

    let victim = &segs[segs.len() - 1].path;
    let bytes = std::fs::read(victim).unwrap();
    std::fs::write(victim, &bytes[..bytes.len() * 2 / 3]).unwrap();
    match join_segments(&paths(&segs), &out) {
        Err(TranscodeError::BadSegment { path, reason }) => {
            assert_eq!(&path, victim);
            assert!(reason.contains("cut short"), "{reason}");
        }
        other => panic!("a truncated segment was joined: {other:?}"),
    }
    assert!(!partial(&out).exists());
    let kept = std::fs::read(&out).unwrap();
    use sha2::Digest;
    assert_eq!(hex::encode(sha2::Sha256::digest(&kept)), good.sha256);

    // Not a segment at all.
    let junk = p(dir.path(), "junk.webm");
    std::fs::write(&junk, b"not a matroska file").unwrap();
    assert!(matches!(
        join_segments(std::slice::from_ref(&junk), &p(dir.path(), "x.webm")),
        Err(TranscodeError::BadSegment { path, .. }) if path == junk
    ));
}
