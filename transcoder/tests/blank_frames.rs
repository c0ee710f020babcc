//! A 1280x720 VP8 camera track into which tiny blank key frames were injected, as a LiveKit
//! SFU does (8x8 pixels, 31 bytes): the track flips 720p → 8x8 → 720p, starts or ends at 8x8,
//! or has a single 8x8 frame between two 720p segments. Such a track goes through TrackWriter,
//! the per-track join and the composite render. The join refuses the size change naming the
//! segment; the composite scales every frame into its tile whatever its size.
//!
//! The composites put the camera in tiles whose shape is between square and 16:9 (a grid of
//! five, and the camera column beside a screen share), where a 720p picture is letterboxed
//! above and below and a square one is not: a tile chain that keeps the first picture's
//! placement for later ones copies a square picture below the tile's buffer there.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use transcoder::{
    join_segments, layout, render, Codec, CompositeParticipant, CompositeSpec, CompositeTrack,
    Interval, MediaKind, Rect, SegmentInfo, TrackSource, TrackWriter, TrackWriterConfig,
    TranscodeError,
};

const W: u32 = 640;
const H: u32 = 360;
const FPS: i64 = 30;
const FRAME_US: i64 = 33_333;
const S: i64 = 1_000_000;

/// The blank VP8 key frame a LiveKit SFU injects: 8x8 pixels, black.
const BLANK_VP8_8X8: [u8; 31] = [
    0x10, 0x02, 0x00, 0x9d, 0x01, 0x2a, 0x08, 0x00, 0x08, 0x00, 0x00, 0x47, 0x08, 0x85, 0x85, 0x88,
    0x85, 0x84, 0x88, 0x02, 0x02, 0x00, 0x0c, 0x0d, 0x60, 0x00, 0xfe, 0xff, 0xab, 0x50, 0x80,
];

fn blank(pts_us: i64) -> Packet {
    Packet {
        data: BLANK_VP8_8X8.to_vec(),
        pts_us,
        duration_us: FRAME_US,
        key: true,
    }
}

/// A red 1280x720 camera of `secs` seconds at 30 fps, a key frame every second.
fn hd_camera(dir: &Path, secs: u32) -> Vec<Packet> {
    let src = dir.join("hd.webm");
    encode(
        &src,
        Codec::Vp8,
        &format!("color=c=red:s=1280x720:r={FPS}:d={secs}"),
    );
    let pkts = packets(&src);
    assert_eq!(pkts.len() as i64, secs as i64 * FPS);
    pkts
}

fn write_track(dir: &Path, id: &str, pkts: &[Packet]) -> Vec<SegmentInfo> {
    let cfg = TrackWriterConfig::new(dir.join("segs"), id, Codec::Vp8);
    let segs = write_all(TrackWriter::new(cfg).unwrap(), pkts, 0);
    assert_eq!(
        segs.iter().map(|s| s.frames).sum::<u64>(),
        pkts.len() as u64,
        "{id}: every frame is in a segment"
    );
    segs
}

fn sizes(segs: &[SegmentInfo]) -> Vec<(u32, u32)> {
    segs.iter()
        .map(|s| (s.width.unwrap(), s.height.unwrap()))
        .collect()
}

fn paths(segs: &[SegmentInfo]) -> Vec<PathBuf> {
    segs.iter().map(|s| s.path.clone()).collect()
}

/// Joining the whole track is refused at segment `index` with `change`, and writes nothing;
/// each run of 720p segments between the 8x8 ones joins into a file that decodes cleanly.
fn check_join(dir: &Path, segs: &[SegmentInfo], index: usize, change: &str) {
    let out = dir.join("a-cam.webm");
    match join_segments(&paths(segs), &out) {
        Err(TranscodeError::ParametersChanged {
            index: i,
            path,
            change: c,
        }) => {
            assert_eq!(i, index);
            assert_eq!(path, segs[index].path);
            assert_eq!(c, change);
        }
        other => panic!("a track with 8x8 segments was joined: {other:?}"),
    }
    assert!(!out.exists(), "a refused join wrote {}", out.display());
    let runs: Vec<&[SegmentInfo]> = segs
        .split(|s| s.width != Some(1280))
        .filter(|r| !r.is_empty())
        .collect();
    assert!(!runs.is_empty(), "no 720p segments");
    for (n, run) in runs.iter().enumerate() {
        let out = dir.join(format!("run{n}.webm"));
        let report = join_segments(&paths(run), &out).unwrap();
        let frames: u64 = run.iter().map(|s| s.frames).sum();
        assert_eq!(report.packets, frames);
        let pr = probe(&out);
        assert_eq!((pr.width, pr.height), (Some(1280), Some(720)));
        assert_eq!(pr.decoded_frames, frames);
        let errors = decode_errors(&out);
        assert!(errors.is_empty(), "joined 720p run {n}: {errors}");
    }
}

/// Where A's camera is drawn.
#[derive(Debug, Clone, Copy)]
enum Stage {
    /// Five participants in a 3+2 grid; B has a steady camera, C–E none.
    Grid,
    /// A and B; B shares its screen, so A's camera sits in the column beside the stage.
    ScreenShare,
}

impl Stage {
    fn ids(self) -> &'static [&'static str] {
        match self {
            Stage::Grid => &["a", "b", "c", "d", "e"],
            Stage::ScreenShare => &["a", "b"],
        }
    }

    /// A's camera tile and where B's steady blue picture is.
    fn tiles(self) -> (Rect, Rect) {
        match self {
            Stage::Grid => {
                let t = layout(W, H, self.ids(), None);
                (t[0].rect, t[1].rect)
            }
            Stage::ScreenShare => {
                let t = layout(W, H, self.ids(), Some("b"));
                (t[1].rect, t[0].rect)
            }
        }
    }
}

/// Renders A's segments with B's steady track in `stage`; checks the composite's length and
/// that it decodes.
fn composite(dir: &Path, stage: Stage, a_segs: &[SegmentInfo], duration_us: i64) -> PathBuf {
    let dir = dir.join(format!("{stage:?}"));
    let secs = (duration_us + S - 1) / S;
    let b_src = dir.join("b.webm");
    std::fs::create_dir_all(&dir).unwrap();
    encode(
        &b_src,
        Codec::Vp8,
        &format!("color=c=blue:s=320x240:r={FPS}:d={secs}"),
    );
    let b_segs = write_track(&dir, "b", &packets(&b_src));

    let mut spec = CompositeSpec::new(duration_us);
    spec.width = W;
    spec.height = H;
    spec.participants = stage
        .ids()
        .iter()
        .map(|id| CompositeParticipant {
            id: id.to_string(),
            display_name: id.to_uppercase(),
            present: vec![Interval::new(0, duration_us)],
            not_recorded: vec![],
        })
        .collect();
    let video = |pid: &str, source, segs: &[SegmentInfo]| CompositeTrack {
        participant_id: pid.into(),
        kind: MediaKind::Video,
        source,
        codec: Codec::Vp8,
        segments: paths(segs),
        muted: vec![],
    };
    let b_source = match stage {
        Stage::Grid => TrackSource::Camera,
        Stage::ScreenShare => TrackSource::Screen,
    };
    spec.tracks = vec![
        video("a", TrackSource::Camera, a_segs),
        video("b", b_source, &b_segs),
    ];
    let out = dir.join("out.mp4");
    let report = render(&spec, &out, &mut |_| {}).unwrap();
    assert!(report.has_video);
    assert_eq!(
        report.frames as i64,
        duration_us * FPS / S,
        "{stage:?}: frames of the composite"
    );
    let d = format_duration_us(&out);
    assert!(
        (d - duration_us).abs() <= 50_000,
        "{stage:?}: composite lasts {d} us, want {duration_us}"
    );
    let errors = decode_errors(&out);
    assert!(errors.is_empty(), "{stage:?}: composite: {errors}");
    out
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Seen {
    Red,
    Blue,
    Black,
    Placeholder,
    Other([u8; 3]),
}

fn seen(pic: &[u8], x: u32, y: u32) -> Seen {
    let i = ((y * W + x) * 3) as usize;
    let [r, g, b] = [pic[i], pic[i + 1], pic[i + 2]];
    let near = |v: u8, want: u8| (v as i32 - want as i32).abs() <= 12;
    if r > 180 && g < 70 && b < 70 {
        Seen::Red
    } else if b > 180 && r < 70 && g < 70 {
        Seen::Blue
    } else if r <= 8 && g <= 8 && b <= 8 {
        Seen::Black
    } else if near(r, 0x3a) && near(g, 0x3a) && near(b, 0x3a) {
        Seen::Placeholder
    } else {
        Seen::Other([r, g, b])
    }
}

/// Where a `w`x`h` picture lands in `tile`: scaled to fit, kept even, centred (the graph's
/// `scale=…:force_original_aspect_ratio=decrease:force_divisible_by=2,pad=…`).
fn fitted(tile: Rect, w: u32, h: u32) -> Rect {
    let rescale = |a: u32, b: u32, c: u32| ((a as u64 * b as u64 + c as u64 / 2) / c as u64) as u32;
    let fw = rescale(tile.h, w, h).min(tile.w) & !1;
    let fh = rescale(tile.w, h, w).min(tile.h) & !1;
    Rect {
        x: tile.x + (((tile.w - fw) / 2) & !1),
        y: tile.y + (((tile.h - fh) / 2) & !1),
        w: fw,
        h: fh,
    }
}

/// A's tile at `t_us` shows a `w`x`h` picture of `colour` fitted into it: that colour inside
/// the fitted rectangle, placeholder grey in any margin wide enough to sample away from the
/// picture's edge. Samples avoid the centre of the tile's bottom, where the name is.
fn assert_tile(out: &Path, stage: Stage, t_us: i64, (w, h): (u32, u32), colour: Seen) {
    let (a, b) = stage.tiles();
    let pic = rgb_picture_at(out, t_us as f64 / 1e6, W, H);
    assert_eq!(
        seen(&pic, b.x + b.w / 2, b.y + b.h / 2),
        Seen::Blue,
        "{stage:?}: B at {t_us} us"
    );
    let f = fitted(a, w, h);
    let mut want = vec![
        ("centre", f.x + f.w / 2, f.y + f.h / 2, colour),
        ("left quarter", f.x + f.w / 4, f.y + f.h / 2, colour),
        ("right quarter", f.x + f.w * 3 / 4, f.y + f.h / 2, colour),
        ("top quarter", f.x + f.w / 2, f.y + f.h / 4, colour),
        ("bottom quarter", f.x + f.w / 4, f.y + f.h * 3 / 4, colour),
    ];
    const MARGIN: u32 = 8;
    if f.y - a.y >= MARGIN {
        want.push((
            "top margin",
            f.x + f.w / 4,
            (a.y + f.y) / 2,
            Seen::Placeholder,
        ));
        let bottom = f.y + f.h;
        want.push((
            "bottom margin",
            f.x + f.w / 4,
            (bottom + a.y + a.h) / 2,
            Seen::Placeholder,
        ));
    }
    if f.x - a.x >= MARGIN {
        let right = f.x + f.w;
        want.push((
            "left margin",
            (a.x + f.x) / 2,
            f.y + f.h / 2,
            Seen::Placeholder,
        ));
        want.push((
            "right margin",
            (right + a.x + a.w) / 2,
            f.y + f.h / 2,
            Seen::Placeholder,
        ));
    }
    let got: Vec<_> = want
        .iter()
        .map(|&(what, x, y, _)| (what, seen(&pic, x, y)))
        .collect();
    let want: Vec<_> = want.iter().map(|&(what, _, _, c)| (what, c)).collect();
    assert_eq!(
        got, want,
        "{stage:?}: A's tile {a:?} at {t_us} us should show a {w}x{h} picture at {f:?}"
    );
}

const HD: (u32, u32) = (1280, 720);
const BLANK: (u32, u32) = (8, 8);

/// 720p, then blank frames for half a second, then 720p again. The 720p sender did not see
/// the blanks, so it goes on with delta frames until its next key frame; they land in the
/// 8x8 segment as they would in a live call.
#[test]
fn blank_frames_between_720p_segments() {
    let dir = tmp();
    let hd = hd_camera(dir.path(), 6);
    let pkts: Vec<Packet> = hd
        .iter()
        .map(|p| {
            if (2 * S..2 * S + S / 2).contains(&p.pts_us) {
                blank(p.pts_us)
            } else {
                p.clone()
            }
        })
        .collect();
    let segs = write_track(dir.path(), "a", &pkts);
    assert_eq!(sizes(&segs), vec![HD, BLANK, HD, HD]);
    assert_eq!(segs[1].start_us, 2 * S);
    assert_eq!(
        segs[2].start_us, hd[90].pts_us,
        "720p resumes at its next key frame"
    );

    check_join(dir.path(), &segs, 1, "size from 1280x720 to 8x8");

    for stage in [Stage::Grid, Stage::ScreenShare] {
        let out = composite(dir.path(), stage, &segs, 6 * S);
        assert_tile(&out, stage, S, HD, Seen::Red);
        assert_tile(&out, stage, 2 * S + 200_000, BLANK, Seen::Black);
        assert_tile(&out, stage, 3 * S + 500_000, HD, Seen::Red);
        assert_tile(&out, stage, 5 * S + 500_000, HD, Seen::Red);
    }
}

/// One blank frame just before a 720p key frame: an 8x8 segment of one frame between two
/// 720p segments.
#[test]
fn single_blank_frame_between_two_720p_segments() {
    let dir = tmp();
    let hd = hd_camera(dir.path(), 5);
    let at = hd[60].pts_us - 10_000;
    let mut pkts = hd.clone();
    pkts.insert(60, blank(at));
    let segs = write_track(dir.path(), "a", &pkts);
    assert_eq!(sizes(&segs), vec![HD, BLANK, HD, HD]);
    assert_eq!((segs[1].start_us, segs[1].frames), (at, 1));

    check_join(dir.path(), &segs, 1, "size from 1280x720 to 8x8");

    for stage in [Stage::Grid, Stage::ScreenShare] {
        let out = composite(dir.path(), stage, &segs, 5 * S);
        assert_tile(&out, stage, S, HD, Seen::Red);
        assert_tile(&out, stage, 2 * S + 500_000, HD, Seen::Red);
        assert_tile(&out, stage, 4 * S + 500_000, HD, Seen::Red);
    }
}

/// The SFU's blank frame starts the track, before the sender's first 720p key frame.
#[test]
fn track_starting_with_a_blank_frame() {
    let dir = tmp();
    let hd = hd_camera(dir.path(), 4);
    let mut pkts = vec![blank(0)];
    pkts.extend(hd.iter().map(|p| Packet {
        pts_us: p.pts_us + FRAME_US,
        ..p.clone()
    }));
    let segs = write_track(dir.path(), "a", &pkts);
    assert_eq!(sizes(&segs), vec![BLANK, HD, HD]);
    assert_eq!(segs[0].frames, 1);

    check_join(dir.path(), &segs, 1, "size from 8x8 to 1280x720");

    for stage in [Stage::Grid, Stage::ScreenShare] {
        let out = composite(dir.path(), stage, &segs, 4 * S);
        assert_tile(&out, stage, S, HD, Seen::Red);
        assert_tile(&out, stage, 3 * S + 500_000, HD, Seen::Red);
    }
}

/// The track ends with half a second of blank frames after its last 720p frame.
#[test]
fn track_ending_with_blank_frames() {
    let dir = tmp();
    let hd = hd_camera(dir.path(), 4);
    let end = hd.last().unwrap().pts_us + FRAME_US;
    let mut pkts = hd.clone();
    pkts.extend((0..15).map(|i| blank(end + i * FRAME_US)));
    let segs = write_track(dir.path(), "a", &pkts);
    assert_eq!(sizes(&segs), vec![HD, HD, BLANK]);
    assert_eq!(segs[2].start_us, end);

    check_join(dir.path(), &segs, 2, "size from 1280x720 to 8x8");

    for stage in [Stage::Grid, Stage::ScreenShare] {
        let out = composite(dir.path(), stage, &segs, 5 * S);
        assert_tile(&out, stage, S, HD, Seen::Red);
        assert_tile(&out, stage, 3 * S + 500_000, HD, Seen::Red);
        assert_tile(&out, stage, end + 200_000, BLANK, Seen::Black);
    }
}
