//! What the group-call tests check in a recording: fetching it whole (manifest, composite, every
//! track file, each decoding cleanly), who was present when, and which tiles the composite shows
//! (found by each participant's camera background grey).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use storage::manifest::{CallFlavour, ParticipantInfo, TrackInfo, TrackSource};

use super::*;

/// A tile is at least this share of the frame; an absent one under [`ABSENT_SHARE`].
pub const PRESENT_SHARE: f64 = 0.02;
pub const ABSENT_SHARE: f64 = 0.002;
/// Luma tolerance around a background's grey after VP8, scaling and H.264.
pub const LUMA_TOLERANCE: f64 = 6.0;

pub struct Fetched {
    pub manifest: storage::Manifest,
    pub composite: PathBuf,
    /// Per-track file by manifest track id.
    pub files: HashMap<String, PathBuf>,
}

/// Fetches the manifest, the composite and every track link; each file must decode cleanly.
pub async fn fetch_recording(flavour: CallFlavour, work: &Path, s3: &S3, prefix: &str, room: &str, notice: &LinksNotice) -> Fetched {
    std::fs::create_dir_all(work).unwrap();
    let manifest = load_manifest(s3, prefix, room, &notice.recording_id).await;
    assert_eq!(manifest.room.id, room);
    assert_eq!(manifest.call.flavour, flavour, "the call flavour in the manifest");
    let http = reqwest::Client::new();
    let (bytes, _) = fetch_link(&http, &notice.composite_url).await;
    let composite = work.join("composite.mp4");
    std::fs::write(&composite, &bytes).unwrap();
    let errors = decode_errors(&composite);
    assert!(errors.trim().is_empty(), "the composite does not decode cleanly: {errors}");

    let mut files = HashMap::new();
    for (i, t) in notice.tracks.iter().enumerate() {
        assert!(
            manifest.tracks.iter().any(|m| m.id == t.track_id),
            "track link {} is no manifest track: {:?}",
            t.track_id,
            manifest.tracks.iter().map(|m| &m.id).collect::<Vec<_>>()
        );
        let (bytes, _) = fetch_link(&http, &t.url).await;
        let path = work.join(format!("track-{i}.bin"));
        std::fs::write(&path, &bytes).unwrap();
        let errors = decode_errors(&path);
        assert!(errors.trim().is_empty(), "track {} ({}) does not decode cleanly: {errors}", t.track_id, t.format);
        eprintln!("track link {} ({}): {} bytes, decodes cleanly", t.track_id, t.format, bytes.len());
        files.insert(t.track_id.clone(), path);
    }
    let with_file = manifest.tracks.iter().filter(|t| t.file.is_some()).count();
    assert_eq!(notice.tracks.len(), with_file, "one Track link per manifest track with a file");
    Fetched { manifest, composite, files }
}

pub fn person<'a>(m: &'a storage::Manifest, user: &str) -> &'a ParticipantInfo {
    m.participants.iter().find(|p| p.user_id == user).unwrap_or_else(|| {
        panic!("{user} is no participant: {:?}", m.participants.iter().map(|p| &p.user_id).collect::<Vec<_>>())
    })
}

/// The track of `user` from `source`, with segments and a file.
pub fn recorded_track<'a>(m: &'a storage::Manifest, user: &str, source: TrackSource) -> &'a TrackInfo {
    let pid = &person(m, user).id;
    let t = m.tracks.iter().find(|t| &t.participant == pid && t.source == source).unwrap_or_else(|| {
        panic!(
            "no {source} track of {user}; tracks: {:?}",
            m.tracks.iter().map(|t| (&t.participant, t.source.as_str())).collect::<Vec<_>>()
        )
    });
    assert!(!t.segments.is_empty(), "{user}'s {source} track {} has no segment", t.id);
    t
}

/// Presence of `user` in seconds on the recording clock: first start, last end.
pub fn presence_s(m: &storage::Manifest, user: &str) -> (f64, f64) {
    let p = person(m, user);
    let first = p.present.first().unwrap_or_else(|| panic!("{user} was never present"));
    let last = p.present.last().unwrap();
    let call_end = m.call.span.end_us.unwrap_or_default();
    (first.start_us as f64 / 1e6, last.end_us.unwrap_or(call_end) as f64 / 1e6)
}

/// The call's length (s) from the manifest, and the composite's, which must agree within 1.5 s.
pub fn check_composite_duration(f: &Fetched) -> f64 {
    let span = &f.manifest.call.span;
    let call_s = (span.end_us.expect("the call has ended") - span.start_us) as f64 / 1e6;
    let probe = ffprobe(&f.composite);
    let composite_s: f64 =
        probe["format"]["duration"].as_str().and_then(|d| d.parse().ok()).expect("composite duration");
    eprintln!("call {call_s:.3} s in the manifest, composite {composite_s:.3} s");
    assert!((composite_s - call_s).abs() <= 1.5, "the composite lasts {composite_s:.3} s, the call {call_s:.3} s");
    call_s
}

/// Flash and beep together between a member's camera and microphone files.
pub fn check_av(name: &str, video: &Path, audio: &Path, max_av_offset_ms: f64) {
    let flashes = flash_times(&luma_per_frame(&[video]));
    let beeps = beep_onsets(&audio_rms_per_ms(&[audio]));
    let offsets = av_offsets_ms(&flashes, &beeps);
    eprintln!("{name}: flashes {flashes:.3?}\n  beeps {beeps:.3?}\n  A/V offsets (video − audio) ms {offsets:.1?}");
    assert!(offsets.len() >= 4, "{name}: at least 4 flash/beep pairs ({} flashes, {} beeps)", flashes.len(), beeps.len());
    let worst = offsets.iter().fold(0.0f64, |w, o| w.max(o.abs()));
    assert!(worst <= max_av_offset_ms, "{name}: flash and beep within {max_av_offset_ms} ms: {offsets:.1?}");
}

/// The luma the publisher gives a grey background (BT.601 limited range, its `rgb_to_yuv`).
pub fn luma_of_grey(grey: u8) -> f64 {
    16.0 + 219.859 * grey as f64 / 256.0
}

/// For each grey, the largest share of a frame's pixels within [`LUMA_TOLERANCE`] of its luma,
/// over 5 frames from `at_s`: one frame may be a tile's flash. The Y plane is read as it is
/// (yuv420p out of a yuv420p stream: no range conversion).
pub fn grey_shares(composite: &Path, at_s: f64, greys: &[u8]) -> Vec<f64> {
    let lumas: Vec<f64> = greys.iter().map(|&g| luma_of_grey(g)).collect();
    luma_shares(composite, at_s, &lumas)
}

/// [`grey_shares`] for any luma.
pub fn luma_shares(composite: &Path, at_s: f64, lumas: &[f64]) -> Vec<f64> {
    let probe = ffprobe(composite);
    let video = probe["streams"].as_array().unwrap().iter().find(|s| s["codec_type"] == "video").expect("video");
    let (w, h) = (video["width"].as_u64().unwrap() as usize, video["height"].as_u64().unwrap() as usize);
    let out = Command::new("ffmpeg")
        .args(["-v", "error", "-ss", &format!("{at_s:.3}"), "-i"])
        .arg(composite)
        .args(["-frames:v", "5", "-f", "rawvideo", "-pix_fmt", "yuv420p", "-"])
        .output()
        .expect("ffmpeg runs");
    assert!(out.status.success(), "frames at {at_s:.3} s: {}", String::from_utf8_lossy(&out.stderr));
    let frame_len = w * h + 2 * w.div_ceil(2) * h.div_ceil(2);
    let frames: Vec<&[u8]> = out.stdout.chunks_exact(frame_len).collect();
    assert!(!frames.is_empty(), "no frame of the composite at {at_s:.3} s");
    lumas
        .iter()
        .map(|&target| {
            frames
                .iter()
                .map(|f| {
                    let near = f[..w * h].iter().filter(|&&y| (y as f64 - target).abs() <= LUMA_TOLERANCE).count();
                    near as f64 / (w * h) as f64
                })
                .fold(0.0, f64::max)
        })
        .collect()
}

/// Tiles at `at_s` in the composite by background grey: `Some(true)` present, `Some(false)`
/// absent, `None` only reported.
pub fn check_tiles(composite: &Path, at_s: f64, when: &str, tiles: &[(&str, u8, Option<bool>)]) {
    let greys: Vec<u8> = tiles.iter().map(|t| t.1).collect();
    let shares = grey_shares(composite, at_s, &greys);
    let report: Vec<String> =
        tiles.iter().zip(&shares).map(|((name, _, _), s)| format!("{name} {:.2}%", s * 100.0)).collect();
    eprintln!("composite at {at_s:.2} s ({when}): {}", report.join(", "));
    for ((name, grey, expect), share) in tiles.iter().zip(&shares) {
        match expect {
            Some(true) => assert!(
                *share >= PRESENT_SHARE,
                "{name}'s tile (grey {grey}) is missing at {at_s:.2} s ({when}): {:.2}% of the frame",
                share * 100.0
            ),
            Some(false) => assert!(
                *share < ABSENT_SHARE,
                "{name}'s tile (grey {grey}) is shown at {at_s:.2} s ({when}): {:.2}% of the frame",
                share * 100.0
            ),
            None => {}
        }
    }
}

