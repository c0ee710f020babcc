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

/// The tests load the CPU with publishers; they must not overlap.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

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
    /// RTCP Sender Reports the track's receiver got (latest stats).
    sender_reports: u64,
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
    let _turn = serial();
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
                            writer: Some(writer), segments: vec![], written: 0, span_us: None, refused: BTreeMap::new(), sender_reports: 0,
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
                    SfuOutput::Stats { track, stats } => {
                        if let Some(t) = tracks.get_mut(&track) { t.sender_reports = stats.sender_reports; }
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
            "{} {:?} {}: {} frames written over {:.2} s, refused {:?}, {} segments, {} sender reports",
            t.identity, t.source, t.codec, t.written, t.seconds(), t.refused, t.segments.len(), t.sender_reports
        );
        // The SFU's Sender Reports (sent every 3 s) time every track by its sender's clock;
        // without them tracks fall back to packet arrival and A/V sync to chance.
        assert!(t.sender_reports >= 2, "{} {}: the SFU's sender reports arrive: {}", t.identity, t.codec, t.sender_reports);
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

/// A TCP relay in front of LiveKit's signalling port that can cut every relayed connection and
/// refuse new ones for a while: a signalling drop as a network fault makes it, while the media
/// (UDP, straight to the server's ICE candidates) flows on.
struct Relay {
    addr: std::net::SocketAddr,
    cut: tokio::sync::watch::Sender<u64>,
    refuse_until: Arc<std::sync::Mutex<Option<tokio::time::Instant>>>,
    accepted: Arc<std::sync::atomic::AtomicU64>,
}

impl Relay {
    async fn start(upstream: String) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (cut, cuts) = tokio::sync::watch::channel(0u64);
        let refuse_until: Arc<std::sync::Mutex<Option<tokio::time::Instant>>> = Arc::default();
        let accepted = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (refusing, counter) = (refuse_until.clone(), accepted.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let refused = refusing.lock().unwrap().is_some_and(|t| tokio::time::Instant::now() < t);
                if refused {
                    drop(inbound);
                    continue;
                }
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let upstream = upstream.clone();
                let mut cuts = cuts.clone();
                cuts.mark_unchanged();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&upstream).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cuts.changed() => {} // both sockets dropped: the link is gone
                    }
                });
            }
        });
        Relay { addr, cut, refuse_until, accepted }
    }

    /// Cuts every relayed connection; new ones are refused for `refuse`.
    fn cut(&self, refuse: Duration) {
        *self.refuse_until.lock().unwrap() = Some(tokio::time::Instant::now() + refuse);
        self.cut.send_modify(|n| *n += 1);
    }
}

/// What one SFU track delivered: pts of its frames.
#[derive(Default)]
struct Seen {
    pts_us: Vec<i64>,
}

impl Seen {
    /// The longest stretch without a frame, in seconds, and where it began (pts, seconds).
    fn longest_gap(&self) -> (f64, f64) {
        self.pts_us
            .windows(2)
            .map(|w| ((w[1] - w[0]) as f64 / 1e6, w[0] as f64 / 1e6))
            .fold((0.0, 0.0), |a, b| if b.0 > a.0 { b } else { a })
    }
}

/// A dropped signalling link is resumed without touching the media: the same tracks go on with no
/// gap. A link that stays down past the resume attempts is rejoined from scratch: new tracks of a
/// new generation, and media again after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signalling_drop_is_resumed_then_rejoined() {
    let Some(lk) = harness::livekit() else {
        return harness::skip("signalling_drop_is_resumed_then_rejoined", "no LiveKit server (MXREC_TEST_LIVEKIT_URL)");
    };
    let _turn = serial();
    let room = format!("lk-drop-{}", harness::unique_suffix());
    let mut b = Publisher::start(&lk, &room, "@b:localhost:DEVB", None, "90").await;
    b.wait_event("connected", Duration::from_secs(30)).await;
    b.wait_event("published", Duration::from_secs(30)).await;

    let upstream = lk.url.trim_start_matches("ws://").trim_end_matches('/').to_owned();
    let relay = Relay::start(upstream).await;
    let grant = access::mint(&lk.url, &lk.key, &lk.secret, &room, "@rec:localhost:BOT", "Recorder", Duration::from_secs(600)).unwrap();
    let epoch = Instant::now(); // frame pts count from here
    let cfg = SfuConfig {
        url: format!("ws://{}", relay.addr),
        bind_addrs: vec!["127.0.0.1:0".into()],
        ice_servers: vec![],
        epoch,
    };
    let (mut sfu, mut out) = SfuConnection::connect(cfg, Arc::new(FixedToken(grant.jwt.clone()))).await.expect("join through the relay");

    let mut seen: BTreeMap<SfuTrack, Seen> = BTreeMap::new();
    let mut kinds: BTreeMap<SfuTrack, Codec> = BTreeMap::new();
    let mut events: Vec<String> = vec![];
    let start = tokio::time::Instant::now();
    let at = |s: u64| start + Duration::from_secs(s);
    let (mut resume_cut, mut rejoin_cut) = (None, None);
    let mut rejoined_at = None;
    loop {
        tokio::select! {
            o = out.recv() => match o.expect("SFU outputs ended early") {
                SfuOutput::TrackOpened { track, codec, .. } => { kinds.insert(track, codec); }
                SfuOutput::Frame { track, frame } => seen.entry(track).or_default().pts_us.push(frame.pts_us),
                SfuOutput::Reconnecting { reason } => events.push(format!("reconnecting ({reason})")),
                SfuOutput::Reconnected { full_rejoin } => {
                    events.push(format!("reconnected (full rejoin: {full_rejoin})"));
                    if full_rejoin { rejoined_at = Some(tokio::time::Instant::now()); }
                }
                SfuOutput::Closed { reason } => panic!("SFU connection closed: {reason}; events {events:?}"),
                _ => {}
            },
            // 6 s in: a drop the resume survives (the relay takes new connections at once).
            _ = tokio::time::sleep_until(at(6)), if resume_cut.is_none() => {
                resume_cut = Some(epoch.elapsed());
                events.push("cut (resumable)".into());
                relay.cut(Duration::ZERO);
            }
            // 16 s in: down for 15 s, longer than every resume attempt (1 + 2 + 3 s).
            _ = tokio::time::sleep_until(at(16)), if rejoin_cut.is_none() => {
                rejoin_cut = Some(epoch.elapsed());
                events.push("cut (down 15 s)".into());
                relay.cut(Duration::from_secs(15));
            }
            // A new track's frames come out once its first Sender Report is in (at most
            // SENDER_REPORT_WAIT): watch the rejoined tracks that long plus 5 s.
            _ = tokio::time::sleep_until(rejoined_at.map_or(at(60), |t| t + recorder::rtp::SENDER_REPORT_WAIT + Duration::from_secs(5))) => break,
        }
    }
    sfu.close().await;
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_secs(10), out.recv()).await {}
    b.leave().await;

    eprintln!("events: {events:?}; relay accepted {} connections", relay.accepted.load(std::sync::atomic::Ordering::SeqCst));
    for (t, s) in &seen {
        let (gap, from) = s.longest_gap();
        eprintln!(
            "{t} {:?}: {} frames, pts {:.2}–{:.2} s, longest gap {gap:.2} s from {from:.2} s",
            kinds.get(t),
            s.pts_us.len(),
            s.pts_us.first().copied().unwrap_or(0) as f64 / 1e6,
            s.pts_us.last().copied().unwrap_or(0) as f64 / 1e6
        );
    }
    let resumed = events.iter().position(|e| e == "reconnected (full rejoin: false)");
    let rejoined = events.iter().position(|e| e == "reconnected (full rejoin: true)");
    assert!(resumed.is_some(), "the first drop was resumed: {events:?}");
    assert!(rejoined.is_some() && rejoined > resumed, "the long outage ended in a full rejoin: {events:?}");

    // Generation 0 spans the resumed drop without a gap; generation 1 has media after the rejoin.
    let resume_cut_s = resume_cut.unwrap().as_secs_f64();
    for codec in [Codec::Vp8, Codec::Opus] {
        let first: Vec<(&SfuTrack, &Seen)> =
            seen.iter().filter(|(t, _)| t.generation == 0 && kinds.get(t) == Some(&codec)).collect();
        assert_eq!(first.len(), 1, "one {codec} track before the rejoin: {:?}", first.iter().map(|f| f.0).collect::<Vec<_>>());
        let (_, s) = first[0];
        let (first_s, last_s) = (s.pts_us[0] as f64 / 1e6, *s.pts_us.last().unwrap() as f64 / 1e6);
        assert!(
            first_s < resume_cut_s - 1.0 && last_s > resume_cut_s + 5.0,
            "{codec} of generation 0 spans the resumed drop at {resume_cut_s:.2} s: {first_s:.2}–{last_s:.2} s"
        );
        let (gap, from) = s.longest_gap();
        // The server's ICE restart on resume may hold video for a moment (0.33 s seen), no more.
        assert!(gap < 1.0, "{codec}: no hole in the media across the resumed drop: {gap:.2} s from {from:.2} s");
        let after: usize = seen
            .iter()
            .filter(|(t, _)| t.generation > 0 && kinds.get(t) == Some(&codec))
            .map(|(_, s)| s.pts_us.len())
            .sum();
        let per_s = if codec == Codec::Vp8 { 10 } else { 40 };
        assert!(after >= 3 * per_s, "{codec}: media flows again after the rejoin ({after} frames after it)");
    }
}
