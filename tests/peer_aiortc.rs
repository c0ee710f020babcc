//! Interop of the WebRTC edge with an independent implementation: aiortc (Python) calls, the
//! recorder's [`RecvPeer`] answers on loopback, and what it receives goes through the real
//! segment writers. Checked on the written segments, the way a viewer would see them: a VP8 and
//! an Opus track, media all along, clean decodes, at least 5 s of video, and A/V sync — aiortc
//! draws an all-white frame and starts a 1 kHz beep at every whole second, so on the recording
//! clock each flash must sit on a beep onset.
//!
//! Needs the venv of `deploy/dev/pyenv.sh` (`MXREC_TEST_PYTHON` overrides the interpreter); the
//! test runs that script itself when the venv is missing and fails if it cannot make one.

mod harness;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use recorder::peer::{PeerConfig, PeerOutput, RecvPeer, TrackKey};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use transcoder::{Codec, SegmentInfo, TrackWriter, TrackWriterConfig};

/// How long aiortc sends after connecting.
const SEND_SECONDS: &str = "7";
/// Flash and beep must coincide this closely on the recording clock.
const MAX_AV_OFFSET_MS: f64 = 40.0;

struct Track {
    codec: Codec,
    writer: Option<TrackWriter>,
    segments: Vec<SegmentInfo>,
    frame_pts_us: Vec<i64>,
    write_errors: Vec<String>,
}

#[derive(Default)]
struct Received {
    tracks: BTreeMap<TrackKey, Track>,
    connected: bool,
    local_candidate_mids: Vec<Option<String>>,
    stats: BTreeMap<TrackKey, recorder::peer::TrackStats>,
}

impl Received {
    fn handle(&mut self, out: PeerOutput, peer: &RecvPeer, dir: &Path) {
        match out {
            PeerOutput::Connected => self.connected = true,
            PeerOutput::LocalCandidate { sdp_mid, .. } => self.local_candidate_mids.push(sdp_mid),
            PeerOutput::Failed { reason } => panic!("peer connection failed: {reason}"),
            PeerOutput::TrackOpened { track, codec, stream_id, track_id, clock_rate, .. } => {
                eprintln!("track {track} opened: {codec} @ {clock_rate} Hz, msid {stream_id} {track_id}");
                let cfg = TrackWriterConfig::new(dir, format!("{track}-{}", codec.name()), codec);
                let writer = TrackWriter::new(cfg).expect("track writer");
                self.tracks.insert(
                    track,
                    Track { codec, writer: Some(writer), segments: vec![], frame_pts_us: vec![], write_errors: vec![] },
                );
            }
            PeerOutput::Frame { track, frame } => {
                let t = self.tracks.get_mut(&track).expect("frame of an opened track");
                t.frame_pts_us.push(frame.pts_us);
                let w = t.writer.as_mut().expect("writer open");
                match w.write(frame) {
                    Ok(closed) => t.segments.extend(closed),
                    Err(e) => t.write_errors.push(e.to_string()),
                }
                if w.wants_keyframe() {
                    peer.request_keyframe(track);
                }
            }
            PeerOutput::TrackEnded { track } => {
                if let Some(t) = self.tracks.get_mut(&track) {
                    if let Some(w) = t.writer.take() {
                        t.segments.extend(w.finish().expect("finish writer"));
                    }
                }
            }
            PeerOutput::Stats { track, stats } => {
                self.stats.insert(track, stats);
            }
            PeerOutput::GatheringComplete => {}
        }
    }

    fn finish(&mut self) {
        for t in self.tracks.values_mut() {
            if let Some(w) = t.writer.take() {
                t.segments.extend(w.finish().expect("finish writer"));
            }
        }
    }

    fn track(&self, codec: Codec) -> &Track {
        self.tracks.values().find(|t| t.codec == codec).unwrap_or_else(|| panic!("no {codec} track opened"))
    }
}

fn paths(segments: &[SegmentInfo]) -> Vec<&Path> {
    segments.iter().map(|s| s.path.as_path()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aiortc_call_is_received_recorded_and_in_sync() {
    let python = harness::python();
    let script = harness::repo_root().join("tests/peers/aiortc_sender.py");
    let dir = tempfile::tempdir().unwrap();

    let mut child = tokio::process::Command::new(&python)
        .arg(&script)
        .args(["--seconds", SEND_SECONDS])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {} {}: {e}", python.display(), script.display()));
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut stdin = child.stdin.take().unwrap();
    let offer_line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("aiortc printed no offer within 30 s")
        .unwrap()
        .expect("aiortc exited before printing its offer");
    let offer: serde_json::Value = serde_json::from_str(&offer_line).expect("offer is JSON");
    assert_eq!(offer["type"], "offer");

    let epoch = Instant::now();
    let cfg = PeerConfig::new(vec!["127.0.0.1:0".into()], epoch);
    let (mut peer, mut outputs) = RecvPeer::new(cfg).await.expect("peer connection");
    peer.apply_remote_offer(offer["sdp"].as_str().unwrap().to_owned()).await.expect("offer applied");
    let answer = peer.create_answer().await.expect("answer");
    assert!(answer.contains("a=candidate:"), "the answer carries our candidates:\n{answer}");
    assert!(answer.contains("a=end-of-candidates"), "gathering completed before answering:\n{answer}");
    assert!(answer.contains("a=recvonly"), "the answer is receive-only:\n{answer}");
    let answer_line = serde_json::json!({"type": "answer", "sdp": answer}).to_string() + "\n";
    stdin.write_all(answer_line.as_bytes()).await.unwrap();
    stdin.flush().await.unwrap();

    let mut rec = Received::default();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        tokio::select! {
            out = outputs.recv() => match out {
                Some(out) => rec.handle(out, &peer, dir.path()),
                None => panic!("peer outputs ended before aiortc finished"),
            },
            status = child.wait() => break status.unwrap(),
            _ = tokio::time::sleep_until(deadline) => panic!("aiortc did not finish within 60 s"),
        }
    };
    assert!(status.success(), "aiortc sender failed: {status}");
    peer.close().await;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), outputs.recv()).await {
            Ok(Some(out)) => rec.handle(out, &peer, dir.path()),
            Ok(None) => break,
            Err(_) => panic!("peer outputs did not end within 10 s of close"),
        }
    }
    rec.finish();

    // What arrived.
    assert!(rec.connected, "Connected was reported");
    assert!(!rec.local_candidate_mids.is_empty(), "local candidates were reported");
    let first_mid = answer.lines().find_map(|l| l.trim().strip_prefix("a=mid:")).unwrap();
    for mid in &rec.local_candidate_mids {
        assert_eq!(mid.as_deref(), Some(first_mid), "local candidates carry the answer's first mid");
    }
    for (key, stats) in &rec.stats {
        eprintln!("track {key} stats: {stats:?}");
        assert!(stats.sender_reports >= 2, "Sender Reports reached track {key}: {stats:?}");
        assert_eq!(stats.queue_dropped, 0, "nothing dropped between poll loop and receiver of {key}");
    }
    assert_eq!(rec.stats.len(), 2, "final stats of both tracks");
    let video = rec.track(Codec::Vp8);
    let audio = rec.track(Codec::Opus);
    for (name, t) in [("video", video), ("audio", audio)] {
        assert!(t.write_errors.is_empty(), "{name} frames refused by the writer: {:?}", t.write_errors);
        let gaps = t.frame_pts_us.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(i64::MAX);
        let span_us = t.frame_pts_us.last().unwrap() - t.frame_pts_us[0];
        eprintln!(
            "{name}: {} frames over {:.2} s, largest gap {:.1} ms, {} segments",
            t.frame_pts_us.len(),
            span_us as f64 / 1e6,
            gaps as f64 / 1e3,
            t.segments.len()
        );
        assert!(gaps < 300_000, "{name} frames kept arriving (largest gap {gaps} µs)");
    }
    let video_stats = rec.stats.values().find(|s| s.receiver.keyframes_emitted > 0).expect("video stats");
    assert!(video_stats.plis_sent >= 1 && video_stats.receiver.keyframes_emitted >= 2, "PLIs were sent and answered: {video_stats:?}");
    assert!(video.frame_pts_us.len() >= 150, "≥ 5 s of 30 fps video: {}", video.frame_pts_us.len());
    assert!(audio.frame_pts_us.len() >= 250, "≥ 5 s of 20 ms audio: {}", audio.frame_pts_us.len());

    // The segments, as a viewer gets them.
    let mut decode_errors = vec![];
    for seg in video.segments.iter().chain(&audio.segments) {
        let errors = harness::decode_errors(&seg.path);
        if !errors.trim().is_empty() {
            decode_errors.push(format!("{}: {}", seg.path.display(), errors.trim()));
        }
        eprintln!(
            "segment {}: {:.3}–{:.3} s, {} frames, {} bytes",
            seg.path.file_name().unwrap().to_string_lossy(),
            seg.start_us as f64 / 1e6,
            seg.end_us as f64 / 1e6,
            seg.frames,
            seg.bytes
        );
    }
    let covered_us: i64 = video.segments.iter().map(|s| s.end_us - s.start_us).sum();
    assert!(covered_us >= 5_000_000, "video covers ≥ 5 s: {covered_us} µs");

    // A/V sync on the recording clock.
    let flashes = harness::flash_times(&harness::luma_per_frame(&paths(&video.segments)));
    let beeps = harness::beep_onsets(&harness::audio_rms_per_ms(&paths(&audio.segments)));
    eprintln!("flashes at {flashes:.3?}\nbeep onsets at {beeps:.3?}");
    let offsets_ms = harness::av_offsets_ms(&flashes, &beeps);
    eprintln!("A/V offsets (video − audio) in ms: {offsets_ms:.1?}");
    assert!(offsets_ms.len() >= 4, "at least 4 flash/beep pairs found ({} flashes, {} beeps)", flashes.len(), beeps.len());
    assert!(decode_errors.is_empty(), "segments decode with errors:\n{}", decode_errors.join("\n"));
    let worst = offsets_ms.iter().fold(0.0f64, |m, o| m.max(o.abs()));
    assert!(worst <= MAX_AV_OFFSET_MS, "flash and beep within {MAX_AV_OFFSET_MS} ms: offsets {offsets_ms:.1?}");
}
