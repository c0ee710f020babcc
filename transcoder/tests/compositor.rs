//! The composite render against a known timeline: A (red camera, microphone with a tone at
//! 5.0 s after a gap) is there from 0 to 8 s with the camera muted 6–7 s; B (blue camera)
//! joins at 3 s and stays to the end at 10 s.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use transcoder::{
    layout, render, Codec, CompositeParticipant, CompositeSpec, CompositeTrack, Interval,
    MediaKind, TrackSource, TrackWriter, TrackWriterConfig,
};

const W: u32 = 640;
const H: u32 = 360;
const S: i64 = 1_000_000;

fn segments_of(dir: &Path, id: &str, codec: Codec, pkts: &[Packet]) -> Vec<PathBuf> {
    let w = TrackWriter::new(TrackWriterConfig::new(dir, id, codec)).unwrap();
    let mut frames = pkts.to_vec();
    frames.sort_by_key(|p| p.pts_us);
    write_all(w, &frames, 0)
        .into_iter()
        .map(|s| s.path)
        .collect()
}

fn camera(dir: &Path, name: &str, color: &str, secs: u32, offset_us: i64) -> Vec<PathBuf> {
    let src = dir.join(format!("{name}.webm"));
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        &format!("color=c={color}:s=320x240:r=30:d={secs}"),
        "-c:v",
        "libvpx",
        "-g",
        "30",
        "-deadline",
        "realtime",
        "-cpu-used",
        "8",
        "-b:v",
        "200k",
        src.to_str().unwrap(),
    ]);
    let pkts: Vec<Packet> = packets(&src)
        .into_iter()
        .map(|mut p| {
            p.pts_us += offset_us;
            p
        })
        .collect();
    segments_of(&dir.join("segs"), name, Codec::Vp8, &pkts)
}

/// A's microphone: silence 1–3 s, nothing 3–5 s (a gap in the timestamps), a 1 kHz tone 5–8 s.
fn microphone(dir: &Path) -> Vec<PathBuf> {
    let src = dir.join("mic.webm");
    ffmpeg(&[
        "-filter_complex",
        "anullsrc=r=48000:cl=stereo:d=2[s];sine=f=1000:r=48000:d=3,aformat=channel_layouts=stereo[t];[s][t]concat=n=2:v=0:a=1",
        "-c:a", "libopus", "-b:a", "64k", src.to_str().unwrap(),
    ]);
    let pkts: Vec<Packet> = packets(&src)
        .into_iter()
        .map(|mut p| {
            p.pts_us += if p.pts_us < 2 * S { S } else { 3 * S };
            p
        })
        .collect();
    segments_of(&dir.join("segs"), "a-mic", Codec::Opus, &pkts)
}

fn spec(dir: &Path, with_video: bool) -> CompositeSpec {
    let mut spec = CompositeSpec::new(10 * S);
    spec.width = W;
    spec.height = H;
    spec.participants = vec![
        CompositeParticipant {
            id: "a".into(),
            display_name: "Alice O'Neil: host".into(),
            present: vec![Interval::new(0, 8 * S)],
            not_recorded: vec![],
        },
        CompositeParticipant {
            id: "b".into(),
            display_name: "Bob [guest]".into(),
            present: vec![Interval::new(3 * S, 10 * S)],
            not_recorded: vec![],
        },
    ];
    spec.tracks.push(CompositeTrack {
        participant_id: "a".into(),
        kind: MediaKind::Audio,
        source: TrackSource::Microphone,
        codec: Codec::Opus,
        segments: microphone(dir),
        muted: vec![],
    });
    if with_video {
        spec.tracks.push(CompositeTrack {
            participant_id: "a".into(),
            kind: MediaKind::Video,
            source: TrackSource::Camera,
            codec: Codec::Vp8,
            segments: camera(dir, "a-cam", "red", 8, 0),
            muted: vec![Interval::new(6 * S, 7 * S)],
        });
        spec.tracks.push(CompositeTrack {
            participant_id: "b".into(),
            kind: MediaKind::Video,
            source: TrackSource::Camera,
            codec: Codec::Vp8,
            segments: camera(dir, "b-cam", "blue", 7, 3 * S),
            muted: vec![],
        });
    }
    spec
}

#[derive(Debug, PartialEq)]
enum Seen {
    Red,
    Blue,
    Placeholder,
    Background,
    Other([u8; 3]),
}

/// What is at the centre of `rect` (names sit at the bottom, away from the centre).
fn seen(pic: &[u8], x: u32, y: u32) -> Seen {
    let i = ((y * W + x) * 3) as usize;
    let [r, g, b] = [pic[i], pic[i + 1], pic[i + 2]];
    let near = |v: u8, want: u8| (v as i32 - want as i32).abs() <= 12;
    if r > 180 && g < 70 && b < 70 {
        Seen::Red
    } else if b > 180 && r < 70 && g < 70 {
        Seen::Blue
    } else if near(r, 0x3a) && near(g, 0x3a) && near(b, 0x3a) {
        Seen::Placeholder
    } else if near(r, 0x10) && near(g, 0x10) && near(b, 0x10) {
        Seen::Background
    } else {
        Seen::Other([r, g, b])
    }
}

fn centre(r: &transcoder::Rect) -> (u32, u32) {
    (r.x + r.w / 2, r.y + r.h / 3)
}

fn ffprobe_streams(path: &Path) -> Vec<String> {
    run(
        "ffprobe",
        &[
            "-v",
            "error",
            "-show_entries",
            "stream=codec_name",
            "-of",
            "csv=p=0",
            path.to_str().unwrap(),
        ],
    )
    .lines()
    .map(|l| l.trim().to_string())
    .collect()
}

/// Onset of the first sound louder than about -24 dBFS, in µs from the start of the output.
fn tone_onset_us(path: &Path) -> Option<i64> {
    let out = Command::new("ffmpeg")
        .args(["-v", "error", "-nostdin", "-i"])
        .arg(path)
        .args(["-vn", "-ac", "1", "-ar", "48000", "-f", "s16le", "-"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let samples: Vec<i16> = out
        .stdout
        .chunks_exact(2)
        .map(|c| i16::from_le_bytes([c[0], c[1]]))
        .collect();
    samples
        .iter()
        .position(|s| s.unsigned_abs() > 2000)
        .map(|i| i as i64 * 1_000_000 / 48_000)
}

#[test]
fn composite_follows_the_timeline() {
    let dir = tmp();
    let spec = spec(dir.path(), true);
    let out = dir.path().join("out.mp4");
    let mut calls = Vec::new();
    let report = render(&spec, &out, &mut |p| calls.push(p)).unwrap();
    assert!(report.has_video);
    assert_eq!(report.decode_errors, 0);
    assert_eq!(report.frames, 300, "10 s at 30 fps");
    assert!(calls.windows(2).all(|w| w[0] <= w[1]) && *calls.last().unwrap() == 1.0);

    assert_eq!(ffprobe_streams(&out), vec!["h264", "aac"]);
    let d = format_duration_us(&out);
    assert!((d - 10 * S).abs() <= 50_000, "duration {d} us");
    // faststart: the moov box comes before the media data.
    let head = std::fs::read(&out).unwrap();
    let moov = head.windows(4).position(|w| w == b"moov").unwrap();
    let mdat = head.windows(4).position(|w| w == b"mdat").unwrap();
    assert!(moov < mdat, "moov after mdat: not faststart");

    let one = layout(W, H, &["a"], None);
    let two = layout(W, H, &["a", "b"], None);
    let only_b = layout(W, H, &["b"], None);
    // 0–3 s: A alone, full frame.
    let (x, y) = centre(&one[0].rect);
    assert_eq!(seen(&rgb_picture_at(&out, 1.5, W, H), x, y), Seen::Red);
    // 3–8 s: two tiles, A left and B right.
    let pic = rgb_picture_at(&out, 5.5, W, H);
    let (ax, ay) = centre(&two[0].rect);
    let (bx, by) = centre(&two[1].rect);
    assert_eq!(seen(&pic, ax, ay), Seen::Red);
    assert_eq!(seen(&pic, bx, by), Seen::Blue);
    // Between the tiles, background.
    assert_eq!(seen(&pic, W / 2, 4), Seen::Background);
    // 6–7 s: A's camera muted, so a placeholder tile.
    let pic = rgb_picture_at(&out, 6.5, W, H);
    assert_eq!(seen(&pic, ax, ay), Seen::Placeholder);
    assert_eq!(seen(&pic, bx, by), Seen::Blue);
    // 8–10 s: A has left; B alone.
    let (x, y) = centre(&only_b[0].rect);
    assert_eq!(seen(&rgb_picture_at(&out, 9.0, W, H), x, y), Seen::Blue);

    // The tone starts at 5.0 s on the recording clock: the 3–5 s gap became silence.
    let onset = tone_onset_us(&out).expect("tone not found");
    eprintln!("tone onset in the composite: {onset} us");
    assert!((onset - 5 * S).abs() <= 20_000, "tone onset at {onset} us");
}

#[test]
fn paused_span_shows_a_card_and_is_silent() {
    let dir = tmp();
    let mut spec = spec(dir.path(), true);
    spec.paused = vec![Interval::new(4 * S, 6 * S)];
    let out = dir.path().join("out.mp4");
    render(&spec, &out, &mut |_| {}).unwrap();
    let pic = rgb_picture_at(&out, 4.5, W, H);
    let two = layout(W, H, &["a", "b"], None);
    let (bx, by) = centre(&two[1].rect);
    // The card is black with white text in the middle; B's tile is hidden.
    assert!(matches!(seen(&pic, bx, by), Seen::Other([r, g, b]) if r < 20 && g < 20 && b < 20));
    // The tone begins inside the pause, so it is first heard when the pause ends.
    let onset = tone_onset_us(&out).expect("tone not found");
    assert!((onset - 6 * S).abs() <= 25_000, "tone onset at {onset} us");
}

#[test]
fn an_opted_out_participant_is_a_not_recorded_tile_and_silent() {
    let dir = tmp();
    let mut spec = spec(dir.path(), true);
    // A opts out from 4.5 s to 6.5 s: the tone (from 5 s) is first heard at 6.5 s.
    spec.participants[0].not_recorded = vec![Interval::new(4_500_000, 6_500_000)];
    let out = dir.path().join("out.mp4");
    let report = render(&spec, &out, &mut |_| {}).unwrap();
    assert_eq!(report.decode_errors, 0);
    let two = layout(W, H, &["a", "b"], None);
    let (ax, ay) = centre(&two[0].rect);
    let (bx, by) = centre(&two[1].rect);
    let pic = rgb_picture_at(&out, 5.0, W, H);
    assert_eq!(seen(&pic, ax, ay), Seen::Placeholder, "A's camera is left out");
    assert_eq!(seen(&pic, bx, by), Seen::Blue, "B is recorded as before");
    // The label sits in the middle of A's tile: white text on the placeholder.
    let r = &two[0].rect;
    let white = (r.x..r.x + r.w)
        .flat_map(|x| (r.y + r.h / 2 - 10..r.y + r.h / 2 + 10).map(move |y| (x, y)))
        .filter(|&(x, y)| {
            let i = ((y * W + x) * 3) as usize;
            pic[i] > 200 && pic[i + 1] > 200 && pic[i + 2] > 200
        })
        .count();
    assert!(white > 50, "no label in A's tile ({white} white pixels)");
    // Before and after, A is seen again.
    assert_eq!(seen(&rgb_picture_at(&out, 4.0, W, H), ax, ay), Seen::Red);
    assert_eq!(seen(&rgb_picture_at(&out, 7.5, W, H), ax, ay), Seen::Red);
    let onset = tone_onset_us(&out).expect("tone not found");
    assert!((onset - 6_500_000).abs() <= 25_000, "tone onset at {onset} us");
}

#[test]
fn audio_only_gives_an_m4a() {
    let dir = tmp();
    let spec = spec(dir.path(), false);
    let out = dir.path().join("out.m4a");
    let report = render(&spec, &out, &mut |_| {}).unwrap();
    assert!(!report.has_video);
    assert_eq!(report.frames, 0);
    assert_eq!(ffprobe_streams(&out), vec!["aac"]);
    let d = format_duration_us(&out);
    assert!((d - 10 * S).abs() <= 50_000, "duration {d} us");
    let onset = tone_onset_us(&out).expect("tone not found");
    assert!((onset - 5 * S).abs() <= 20_000, "tone onset at {onset} us");
}
