//! Composite speed: render() against the ffmpeg CLI running the same filtergraph() on the
//! same segments.
//!
//! Input: 4 participants, each a 1280×720 30 fps testsrc2 camera (VP8) and a sine microphone
//! (Opus), MXREC_BENCH_SECONDS long (default 60). Both tracks go through TrackWriter into 2 s
//! segments, as in production; render() reads the segments, and the CLI reads each track's
//! segments joined by the concat demuxer (all tracks start at 0, so the concat demuxer's
//! rebasing to 0 changes nothing). Run: `cargo bench -p transcoder --bench composite`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use ffmpeg_next as ff;
use transcoder::{
    filtergraph, render, Codec, CompositeParticipant, CompositeSpec, CompositeTrack, EncodedFrame,
    Interval, MediaKind, TrackSource, TrackWriter, TrackWriterConfig,
};

fn ffmpeg(args: &[&str]) {
    let out = Command::new("ffmpeg")
        .args(["-y", "-v", "error", "-nostdin"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ffmpeg {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Demuxes `src` and writes its packets through a TrackWriter; returns the segment paths.
fn segment(src: &Path, dir: &Path, id: &str, codec: Codec) -> Vec<PathBuf> {
    let mut ictx = ff::format::input(src).unwrap();
    let tb = ictx.stream(0).unwrap().time_base();
    let mut pkts = Vec::new();
    for (_, p) in ictx.packets() {
        let us = p.pts().unwrap() * 1_000_000 * tb.numerator() as i64 / tb.denominator() as i64;
        pkts.push(EncodedFrame {
            data: p.data().unwrap().to_vec().into(),
            pts_us: us,
            keyframe: p.is_key(),
        });
    }
    pkts.sort_by_key(|f| f.pts_us);
    let first = pkts[0].pts_us;
    let mut w = TrackWriter::new(TrackWriterConfig::new(dir, id, codec)).unwrap();
    let mut segs = Vec::new();
    for mut f in pkts {
        f.pts_us -= first;
        segs.extend(w.write(f).unwrap());
    }
    segs.extend(w.finish().unwrap());
    segs.into_iter().map(|s| s.path).collect()
}

fn main() {
    ff::init().unwrap();
    let secs: u32 = std::env::var("MXREC_BENCH_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let segdir = dir.join("segs");
    let mut spec = CompositeSpec::new(secs as i64 * 1_000_000);
    let t0 = Instant::now();
    for i in 0..4 {
        let id = format!("p{i}");
        let cam = dir.join(format!("{id}-cam.webm"));
        let mic = dir.join(format!("{id}-mic.webm"));
        ffmpeg(&[
            "-f",
            "lavfi",
            "-i",
            &format!("testsrc2=s=1280x720:r=30:d={secs}"),
            "-c:v",
            "libvpx",
            "-g",
            "60",
            "-deadline",
            "realtime",
            "-cpu-used",
            "8",
            "-b:v",
            "1500k",
            "-threads",
            "2",
            cam.to_str().unwrap(),
        ]);
        ffmpeg(&[
            "-f",
            "lavfi",
            "-i",
            &format!("sine=f={}:r=48000:d={secs}", 300 + 200 * i),
            "-ac",
            "2",
            "-c:a",
            "libopus",
            "-b:a",
            "48k",
            mic.to_str().unwrap(),
        ]);
        spec.participants.push(CompositeParticipant {
            id: id.clone(),
            display_name: format!("Participant {i}"),
            present: vec![Interval::new(0, spec.duration_us)],
            not_recorded: vec![],
        });
        spec.tracks.push(CompositeTrack {
            participant_id: id.clone(),
            kind: MediaKind::Video,
            source: TrackSource::Camera,
            codec: Codec::Vp8,
            segments: segment(&cam, &segdir, &format!("{id}-cam"), Codec::Vp8),
            muted: vec![],
        });
        spec.tracks.push(CompositeTrack {
            participant_id: id.clone(),
            kind: MediaKind::Audio,
            source: TrackSource::Microphone,
            codec: Codec::Opus,
            segments: segment(&mic, &segdir, &format!("{id}-mic"), Codec::Opus),
            muted: vec![],
        });
    }
    println!(
        "input: 4 × (720p30 VP8 + Opus), {secs} s, {} segments, prepared in {:.1} s",
        spec.tracks.iter().map(|t| t.segments.len()).sum::<usize>(),
        t0.elapsed().as_secs_f64()
    );

    let out = dir.join("render.mp4");
    let t = Instant::now();
    let report = render(&spec, &out, &mut |_| {}).unwrap();
    let ours = t.elapsed().as_secs_f64();

    let graph = filtergraph(&spec);
    let mut args: Vec<String> = Vec::new();
    for (i, track) in spec.tracks.iter().enumerate() {
        let list = dir.join(format!("concat{i}.txt"));
        let body: String = track
            .segments
            .iter()
            .map(|p| format!("file '{}'\n", p.display()))
            .collect();
        std::fs::write(&list, format!("ffconcat version 1.0\n{body}")).unwrap();
        args.extend(["-f", "concat", "-safe", "0", "-i"].map(String::from));
        args.push(list.to_string_lossy().into_owned());
    }
    let cli_out = dir.join("cli.mp4");
    args.extend(
        [
            "-filter_complex",
            &graph,
            "-map",
            "[vout]",
            "-map",
            "[aout]",
            "-c:v",
            "libx264",
            "-preset",
            "veryfast",
            "-crf",
            "23",
            "-pix_fmt",
            "yuv420p",
            "-g",
            "60",
            "-c:a",
            "aac",
            "-b:a",
            "128k",
            "-ar",
            "48000",
            "-movflags",
            "+faststart",
        ]
        .map(String::from),
    );
    args.push(cli_out.to_string_lossy().into_owned());
    let t = Instant::now();
    let status = Command::new("ffmpeg")
        .args(["-y", "-v", "error", "-nostdin"])
        .args(&args)
        .status()
        .unwrap();
    let cli = t.elapsed().as_secs_f64();

    let rt = |wall: f64| secs as f64 / wall;
    println!();
    println!("| renderer                      | wall (s) | speed (× real time) | frames |");
    println!("|-------------------------------|---------:|--------------------:|-------:|");
    println!(
        "| transcoder::render()          | {ours:8.1} | {:19.2} | {:6} |",
        rt(ours),
        report.frames
    );
    if status.success() {
        println!(
            "| ffmpeg CLI, same filtergraph  | {cli:8.1} | {:19.2} |        |",
            rt(cli)
        );
    } else {
        println!(
            "| ffmpeg CLI, same filtergraph  |   failed ({status})                 |        |"
        );
    }
    println!();
    println!(
        "render() decode errors: {}, output duration {:.2} s",
        report.decode_errors,
        report.duration_us as f64 / 1e6
    );
}
