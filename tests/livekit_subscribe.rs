//! The bot's LiveKit participant against a real LiveKit server and publishers whose media and
//! frame encryption are LiveKit's own (the Python SDK: libwebrtc and its native frame cryptor):
//! the Rust subscriber joins with a minted subscribe-only token, every published track reaches
//! it mapped to its participant and source, encrypted frames are decrypted with per-participant
//! HKDF keys (and across a key rotation), plain tracks pass through, and a participant whose key
//! never arrives yields no media at all. What is kept goes through the real segment writers and
//! must decode cleanly, with flash and beep together.
//!
//! Needs deploy/dev/livekit.sh's server (`MXREC_TEST_LIVEKIT_*`) and the venv of pyenv.sh.

mod harness;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use recorder::matrixrtc::access;
use recorder::matrixrtc::e2ee::ParticipantKeys;
use recorder::matrixrtc::livekit::{FixedToken, SfuConfig, SfuConnection, SfuOutput, SfuTrack};
use recorder::pipeline::TrackSource;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use transcoder::{Codec, SegmentInfo, TrackWriter, TrackWriterConfig};

const MAX_AV_OFFSET_MS: f64 = 40.0;

struct Publisher {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    events: tokio::sync::mpsc::UnboundedReceiver<serde_json::Value>,
}

impl Publisher {
    async fn start(lk: &harness::LiveKit, room: &str, identity: &str, key: Option<(&[u8], u8)>, background: &str) -> Self {
        let mut cmd = tokio::process::Command::new(harness::python());
        cmd.arg(harness::repo_root().join("tests/peers/livekit_publisher.py"))
            .args(["--url", &lk.url, "--token", &lk.member_token(room, identity), "--background", background]);
        if let Some((k, i)) = key {
            cmd.args(["--key", &base64::engine::general_purpose::STANDARD.encode(k), "--key-index", &i.to_string()]);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("start livekit_publisher.py");
        let stdin = child.stdin.take().unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let (tx, events) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(l)) = lines.next_line().await {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&l) {
                    let _ = tx.send(v);
                }
            }
        });
        Publisher { child, stdin, events }
    }

    async fn wait_event(&mut self, event: &str, timeout: Duration) -> serde_json::Value {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(v)) if v["event"] == event => return v,
                Ok(Some(_)) => {}
                Ok(None) => panic!("publisher exited before {event}"),
                Err(_) => panic!("no {event} from the publisher within {timeout:?}"),
            }
        }
    }

    async fn send(&mut self, cmd: serde_json::Value) {
        self.stdin.write_all(format!("{cmd}\n").as_bytes()).await.unwrap();
        self.stdin.flush().await.unwrap();
    }

    async fn leave(mut self) {
        self.send(serde_json::json!({"cmd": "leave"})).await;
        let status = tokio::time::timeout(Duration::from_secs(20), self.child.wait()).await.expect("publisher left").unwrap();
        assert!(status.success(), "publisher exit: {status}");
    }
}

struct Track {
    identity: String,
    source: TrackSource,
    codec: Codec,
    encrypted: bool,
    writer: Option<TrackWriter>,
    segments: Vec<SegmentInfo>,
    written: u64,
    /// pts (µs) of the first and last frame written.
    span_us: Option<(i64, i64)>,
    refused: BTreeMap<&'static str, u64>,
}

impl Track {
    fn seconds(&self) -> f64 {
        self.span_us.map_or(0.0, |(a, b)| (b - a) as f64 / 1e6)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn livekit_publishers_are_received_decrypted_and_recorded() {
    let Some(lk) = harness::livekit() else {
        return harness::skip("livekit_publishers_are_received_decrypted_and_recorded", "no LiveKit server (MXREC_TEST_LIVEKIT_URL)");
    };
    let room = format!("lk-sub-{}", harness::unique_suffix());
    let dir = tempfile::tempdir().unwrap();
    let key_a0 = [0x11u8; 16];
    let key_a1 = [0x22u8; 16];
    let key_c = [0x33u8; 16];

    // Publishers first, as in a call the bot joins later.
    let mut a = Publisher::start(&lk, &room, "@a:localhost:DEVA", Some((&key_a0, 0)), "128").await;
    let mut b = Publisher::start(&lk, &room, "@b:localhost:DEVB", None, "90").await;
    let mut c = Publisher::start(&lk, &room, "@c:localhost:DEVC", Some((&key_c, 0)), "160").await;
    for p in [&mut a, &mut b, &mut c] {
        p.wait_event("connected", Duration::from_secs(30)).await;
        p.wait_event("published", Duration::from_secs(30)).await;
    }

    // The bot: a visible, subscribe-only participant with a minted token.
    let grant = access::mint(&lk.url, &lk.key, &lk.secret, &room, "@rec:localhost:BOT", "Recorder", Duration::from_secs(600)).unwrap();
    let epoch = Instant::now();
    let cfg = SfuConfig { url: lk.url.clone(), bind_addrs: vec!["127.0.0.1:0".into()], ice_servers: vec![], epoch };
    let (mut sfu, mut out) = SfuConnection::connect(cfg, Arc::new(FixedToken(grant.jwt.clone()))).await.expect("join the LiveKit room");

    // The bot knows A's first key and never C's.
    let mut keys: HashMap<String, ParticipantKeys> = HashMap::new();
    keys.entry("@a:localhost:DEVA".into()).or_default().set_key(0, &key_a0).unwrap();
    let mut sif = Vec::new();
    let mut tracks: BTreeMap<SfuTrack, Track> = BTreeMap::new();
    let mut joined_identities = vec![];
    let mut rotated = false;
    let start = tokio::time::Instant::now();
    let end = start + Duration::from_secs(14);
    loop {
        tokio::select! {
            o = out.recv() => {
                let Some(o) = o else { panic!("SFU outputs ended early") };
                match o {
                    SfuOutput::Joined { sif_trailer, identity, .. } => {
                        assert_eq!(identity, "@rec:localhost:BOT");
                        sif = sif_trailer;
                    }
                    SfuOutput::Room(recorder::matrixrtc::livekit::RoomEvent::ParticipantJoined { identity, .. }) => joined_identities.push(identity),
                    SfuOutput::TrackOpened { track, remote, codec, .. } => {
                        let remote = remote.expect("every track maps to a published track");
                        eprintln!("track {track}: {} {:?} {codec} encrypted={}", remote.identity, remote.source, remote.encrypted);
                        let name = format!("{}-{}", remote.identity.replace([':', '@'], "_"), codec.name());
                        let writer = TrackWriter::new(TrackWriterConfig::new(dir.path(), name, codec)).unwrap();
                        tracks.insert(track, Track {
                            identity: remote.identity, source: remote.source, codec, encrypted: remote.encrypted,
                            writer: Some(writer), segments: vec![], written: 0, span_us: None, refused: BTreeMap::new(),
                        });
                    }
                    SfuOutput::Frame { track, frame } => {
                        let t = tracks.get_mut(&track).expect("frame of an opened track");
                        let frame = if t.encrypted {
                            let k = keys.entry(t.identity.clone()).or_default();
                            match recorder::matrixrtc::decrypt_frame(k, t.codec, frame, &sif) {
                                Ok(Some(f)) => f,
                                Ok(None) => continue,
                                Err(e) => { *t.refused.entry(e.cause()).or_default() += 1; continue; }
                            }
                        } else { frame };
                        let w = t.writer.as_mut().unwrap();
                        let pts = frame.pts_us;
                        t.span_us = Some(t.span_us.map_or((pts, pts), |(a, _)| (a, pts)));
                        match w.write(frame) {
                            Ok(closed) => { t.segments.extend(closed); t.written += 1; }
                            Err(e) => panic!("writer refused a frame of {}: {e}", t.identity),
                        }
                        if w.wants_keyframe() { sfu.request_keyframe(track); }
                    }
                    SfuOutput::Closed { reason } => panic!("SFU connection closed: {reason}"),
                    _ => {}
                }
            }
            _ = tokio::time::sleep_until(start + Duration::from_secs(7)), if !rotated => {
                // Rotation as Element Call does it: the new key reaches the others first.
                rotated = true;
                keys.get_mut("@a:localhost:DEVA").unwrap().set_key(1, &key_a1).unwrap();
                a.send(serde_json::json!({"cmd": "set_key", "index": 1, "key": base64::engine::general_purpose::STANDARD.encode(key_a1)})).await;
                a.wait_event("key", Duration::from_secs(10)).await;
            }
            _ = tokio::time::sleep_until(end) => break,
        }
    }
    sfu.close().await;
    // The last frames after the leave are not needed; the outputs just end.
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_secs(10), out.recv()).await {}
    for p in [a, b, c] {
        p.leave().await;
    }
    for t in tracks.values_mut() {
        if let Some(w) = t.writer.take() {
            t.segments.extend(w.finish().unwrap());
        }
    }

    for id in ["@a:localhost:DEVA", "@b:localhost:DEVB", "@c:localhost:DEVC"] {
        assert!(joined_identities.iter().any(|j| j == id), "{id} seen as participant: {joined_identities:?}");
    }
    let find = |id: &str, codec: Codec| {
        tracks.values().find(|t| t.identity == id && t.codec == codec).unwrap_or_else(|| panic!("no {codec} track of {id}"))
    };
    for t in tracks.values() {
        eprintln!(
            "{} {:?} {}: {} frames written over {:.2} s, refused {:?}, {} segments",
            t.identity, t.source, t.codec, t.written, t.seconds(), t.refused, t.segments.len()
        );
    }
    // A: encrypted, decrypted across the rotation; B: plain; C: nothing recorded.
    for id in ["@a:localhost:DEVA", "@b:localhost:DEVB"] {
        let v = find(id, Codec::Vp8);
        let m = find(id, Codec::Opus);
        assert_eq!((v.source, m.source), (TrackSource::Camera, TrackSource::Microphone));
        assert_eq!(v.encrypted, id == "@a:localhost:DEVA", "encryption flag of {id}");
        // Media starts a few seconds after the join (ICE, DTLS, first keyframe); the rotation at
        // 7 s falls inside what is written.
        for t in [v, m] {
            assert!(t.seconds() >= 7.0, "{id}: ≥ 7 s of {} written: {:.2} s", t.codec, t.seconds());
        }
        assert!(v.written as f64 >= 10.0 * v.seconds(), "{id}: video at ≥ 10 fps: {} frames in {:.2} s", v.written, v.seconds());
        let paths: Vec<&Path> = v.segments.iter().chain(&m.segments).map(|s| s.path.as_path()).collect();
        for p in &paths {
            let errors = harness::decode_errors(p);
            assert!(errors.trim().is_empty(), "{id}: {} decodes cleanly: {errors}", p.display());
        }
        let video_paths: Vec<&Path> = v.segments.iter().map(|s| s.path.as_path()).collect();
        let audio_paths: Vec<&Path> = m.segments.iter().map(|s| s.path.as_path()).collect();
        let flashes = harness::flash_times(&harness::luma_per_frame(&video_paths));
        let beeps = harness::beep_onsets(&harness::audio_rms_per_ms(&audio_paths));
        let offsets = harness::av_offsets_ms(&flashes, &beeps);
        eprintln!("{id}: flashes {flashes:.3?}\n beeps {beeps:.3?}\n offsets {offsets:.1?}");
        assert!(offsets.len() >= 4, "{id}: at least 4 flash/beep pairs: {offsets:?}");
        assert!(offsets.iter().all(|o| o.abs() <= MAX_AV_OFFSET_MS), "{id}: flash and beep within {MAX_AV_OFFSET_MS} ms: {offsets:.1?}");
    }
    let a_video = find("@a:localhost:DEVA", Codec::Vp8);
    let after_rotation = a_video.refused.values().sum::<u64>();
    assert!(after_rotation < 30, "A's frames decrypt across the key rotation (refused {:?})", a_video.refused);
    for codec in [Codec::Vp8, Codec::Opus] {
        let t = find("@c:localhost:DEVC", codec);
        assert_eq!(t.written, 0, "C's {codec} frames are never written without its key");
        assert!(t.refused.get("missing_key").copied().unwrap_or(0) >= 50, "C's {codec} frames counted as missing a key: {:?}", t.refused);
    }
}
