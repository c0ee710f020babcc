//! WHIP ingest under load: what `mxrec serve` spends in CPU and memory per recorded track, and
//! whether it keeps up, when N WHIP publishers (RFC 9725) each send one VP8 track (640x360,
//! 30 fps, about 1 Mbit/s) and one Opus track (20 ms frames) over loopback on this machine.
//!
//! ```text
//! cargo bench -p recorder --bench whip_load -- --publishers 10,50,100 --seconds 20 --warmup 8
//! ```
//!
//! Defaults: `--publishers 10,50,100,200,300 --seconds 20 --warmup 8`. Needs the `ffmpeg` CLI
//! (libvpx, libopus) once, to encode the media, which is cached under Cargo's target tmp dir.
//!
//! For each N, in order: a fresh `mxrec serve` (the package's own binary, same profile) in a temp
//! dir (local files, SQLite catalog, 2 s segments, no composite, WHIP on with a random bearer
//! token); its idle RSS; N webrtc-rs publishers connect (at most 20 at a time, non-trickle: each
//! gathers its host candidate on 127.0.0.1, POSTs the complete offer to `/whip/bench-<i>`, applies
//! the 201's answer) and stream as soon as they are connected; once all N are, a warm-up, then the
//! measuring window, sampled at both ends; then every session is DELETEd, the recorder gets
//! SIGTERM (killed if it has not exited 30 s later) and the temp dir goes. An N whose publishers
//! do not all connect within 60 s is reported as failed and the next N runs.
//!
//! Media is real-time paced: one task per kind (video every 33.3 ms, audio every 20 ms) sends
//! the due frame of every publisher through `TrackLocalStaticSample::write_sample`, each
//! publisher on its own phase so the recorder sees a steady stream rather than N-frame bursts.
//! The encoded files loop, with RTP timestamps continuing.
//!
//! Columns of the main table (window = the measuring window):
//! - `N`, `tracks`: publishers and the tracks they send (2 N).
//! - `recorder CPU (% of a core)`: user + system time of the recorder process over the window,
//!   in % of one core (the machine's total is 100 × cores). `CPU per track`: that / tracks.
//! - `RSS (MiB)`: the recorder's resident set at the end of the window. `RSS per track`: (that −
//!   the idle recorder's RSS before any publisher) / tracks.
//! - `packets`, `lost (%)`: the recorder's `mxrec_rtp_packets_received_total` and
//!   `mxrec_rtp_packets_lost_total` moved over the window; loss = lost / (received + lost). The
//!   recorder adds to these every 5 s per track, so a window holds each track's updates to ±5 s:
//!   keep it ≥ 20 s (±25 % at 20 s would be the worst case if all tracks were in phase; they are
//!   not, so the sum is much closer). The second table has the sender's packet count to compare.
//! - `frame write p50 / p99 / max`: quantiles 0.5, 0.99 and 1 of `mxrec_frame_write_seconds` (the
//!   time to write one frame into its track's segment file, closing a segment included) at the
//!   end of the window. They are the Prometheus exporter's rolling summary, which spans the last
//!   40–60 s (so part of the warm-up too), not just the window; the second table has the exact
//!   mean over the window (Δsum / Δcount). `n/a` when the recorder does not export it.
//! - `publisher CPU %`: this bench process (all publishers and the pacing) over the window, in %
//!   of one core: it competes with the recorder for the same cores, so a recorder figure near
//!   (100 × cores − this) means the machine, not the recorder, is the limit.
//!
//! The second table: connect time of all N; frames sent / frames due in the window (a shortfall
//! means the sender could not keep real time and the recorder was offered less than nominal
//! load); the pacing backlog at the end; write errors; RTP packets the publishers sent in the
//! window (from the packetizer's MTU, exact up to the VP8 picture id's size); the mean frame
//! write; the recorder's open file descriptors and peak RSS; DELETE answers; how it exited.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use reqwest::header::{CONTENT_TYPE, LOCATION};
use reqwest::StatusCode;
use rtc::ice::mdns::MulticastDnsMode;
use rtc::media::Sample;
use rtc::peer_connection::configuration::media_engine::{MIME_TYPE_OPUS, MIME_TYPE_VP8};
use rtc::rtp::packetizer::Payloader;
use rtc::rtp_transceiver::rtp_sender::{
    RTCPFeedback, RTCRtpCodec, RTCRtpCodecParameters, RTCRtpCodingParameters, RTCRtpEncodingParameters,
    RtpCodecKind,
};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinSet;
use tokio::time::{interval, sleep, timeout, timeout_at, MissedTickBehavior};
use webrtc::media_stream::track_local::static_sample::TrackLocalStaticSample;
use webrtc::media_stream::track_local::TrackLocal;
use webrtc::media_stream::MediaStreamTrack;
use webrtc::peer_connection::{
    register_default_interceptors, MediaEngine, PeerConnection, PeerConnectionBuilder,
    PeerConnectionEventHandler, RTCConfigurationBuilder, RTCIceGatheringState, RTCPeerConnectionState,
    RTCSessionDescription, Registry, SettingEngineBuilder,
};
use webrtc::rtp_transceiver::{RTCRtpTransceiverDirection, RTCRtpTransceiverInit, RtpTransceiver};

const DEFAULT_PUBLISHERS: [usize; 5] = [10, 50, 100, 200, 300];
/// Publishers negotiating at once.
const CONNECTS_IN_FLIGHT: usize = 20;
/// All N must be connected this long after the first POST, or the N is reported as failed.
const CONNECT_DEADLINE: Duration = Duration::from_secs(60);
/// One publisher: ICE gathering, the POST, and ICE + DTLS after the answer, each.
const STEP_TIMEOUT: Duration = Duration::from_secs(20);
const RECORDER_START_TIMEOUT: Duration = Duration::from_secs(30);
const RECORDER_STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the pacers look for due frames; each publisher's frames fall on its own phase, so
/// this only bounds the jitter.
const PACER_TICK: Duration = Duration::from_millis(5);
/// Frames one track may send in one tick when it is behind; the rest stays due (and visible).
const MAX_CATCH_UP: u64 = 5;
/// `TrackLocalStaticSample`'s packetizer MTU (1200) minus the RTP header, as it payloads.
const PAYLOAD_MTU: usize = 1200 - 12;
const MEDIA_SECONDS: u32 = 20;

/// A media kind as the pacers see it: how often a frame is due and what the packetizer is told.
#[derive(Clone, Copy)]
struct Cadence {
    period: Duration,
    /// Duration put on each sample: the packetizer advances the RTP timestamp by
    /// `duration × clock_rate` truncated, so video gets 33 333 334 ns (3000 ticks of 90 kHz, where
    /// 33 333 333 ns would truncate to 2999 and drift).
    sample_duration: Duration,
}

const VIDEO: Cadence =
    Cadence { period: Duration::from_nanos(33_333_333), sample_duration: Duration::from_nanos(33_333_334) };
const AUDIO: Cadence = Cadence { period: Duration::from_millis(20), sample_duration: Duration::from_millis(20) };

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("whip_load: {e:#}");
        std::process::exit(1);
    }
}

async fn run() -> Result<()> {
    let args = Args::parse()?;
    let media = Media::prepare().context("preparing the media")?;
    let clk_tck = clock_ticks_per_second();
    let mut rows = Vec::new();
    for &n in &args.publishers {
        eprintln!("whip_load: N = {n}");
        let row = run_one(n, &args, &media, clk_tck).await;
        match &row {
            Outcome::Measured(m) => eprintln!(
                "whip_load: N = {n}: recorder {:.1} % of a core, {:.1} MiB, {} packets received, {} lost",
                m.recorder_cpu_pct, m.rss_mib, m.packets_received, m.packets_lost
            ),
            Outcome::Failed(f) => eprintln!("whip_load: N = {n} failed: {}", f.reason),
        }
        rows.push((n, row));
    }
    print!("{}", report(&args, &media, &rows));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Arguments.

struct Args {
    publishers: Vec<usize>,
    seconds: u64,
    warmup: u64,
    /// What was passed, for the report's header.
    given: Vec<String>,
}

impl Args {
    fn parse() -> Result<Args> {
        let usage = "usage: cargo bench -p recorder --bench whip_load -- \
                     [--publishers 10,50,100,200,300] [--seconds 20] [--warmup 8]";
        let mut args = Args { publishers: DEFAULT_PUBLISHERS.to_vec(), seconds: 20, warmup: 8, given: Vec::new() };
        let mut it = std::env::args().skip(1);
        while let Some(arg) = it.next() {
            // `cargo bench` passes `--bench` to every bench binary.
            if arg == "--bench" {
                continue;
            }
            if arg == "--help" || arg == "-h" {
                println!("{usage}");
                std::process::exit(0);
            }
            let (key, inline) = match arg.split_once('=') {
                Some((k, v)) => (k.to_owned(), Some(v.to_owned())),
                None => (arg.clone(), None),
            };
            let mut value = || inline.clone().or_else(|| it.next()).with_context(|| format!("{key} needs a value; {usage}"));
            match key.as_str() {
                "--publishers" => {
                    let v = value()?;
                    args.publishers = v
                        .split(',')
                        .map(|s| s.trim().parse::<usize>().ok().filter(|&n| n > 0))
                        .collect::<Option<Vec<_>>>()
                        .with_context(|| format!("--publishers {v:?}: want positive numbers separated by commas"))?;
                    args.given.extend([key, v]);
                }
                "--seconds" | "--warmup" => {
                    let v = value()?;
                    let secs: u64 = v.parse().with_context(|| format!("{key} {v:?}: want whole seconds"))?;
                    if key == "--seconds" {
                        args.seconds = secs.max(1);
                    } else {
                        args.warmup = secs;
                    }
                    args.given.extend([key, v]);
                }
                _ => bail!("unknown argument {arg:?}; {usage}"),
            }
        }
        if args.seconds < 20 {
            eprintln!(
                "whip_load: note: a {} s window is short for the recorder's packet counters, which move every 5 s per track",
                args.seconds
            );
        }
        Ok(args)
    }
}

// ---------------------------------------------------------------------------------------------
// Media: encoded once by ffmpeg, parsed here into frames.

struct Frame {
    data: Bytes,
    /// RTP packets the packetizer makes of it.
    packets: u64,
}

struct Media {
    video: Arc<[Frame]>,
    audio: Arc<[Frame]>,
    video_keyframes: usize,
}

impl Media {
    fn prepare() -> Result<Media> {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("whip_load_media_v1");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let ivf = dir.join("video.ivf");
        let ogg = dir.join("audio.ogg");
        let secs = MEDIA_SECONDS.to_string();
        encode_once(
            &ivf,
            &[
                "-f", "lavfi", "-i", "testsrc2=size=640x360:rate=30", "-t", &secs, "-pix_fmt", "yuv420p",
                "-c:v", "libvpx", "-b:v", "1M", "-minrate", "1M", "-maxrate", "1M", "-deadline", "realtime",
                "-cpu-used", "8", "-g", "60", "-keyint_min", "60", "-auto-alt-ref", "0", "-lag-in-frames", "0",
                "-f", "ivf",
            ],
        )?;
        encode_once(
            &ogg,
            &[
                "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000", "-t", &secs, "-ac", "1",
                "-c:a", "libopus", "-b:a", "48k", "-frame_duration", "20", "-application", "voip", "-f", "ogg",
            ],
        )?;
        let video = read_ivf_vp8(&std::fs::read(&ivf)?).with_context(|| format!("reading {}", ivf.display()))?;
        let audio = read_ogg_packets(&std::fs::read(&ogg)?).with_context(|| format!("reading {}", ogg.display()))?;
        if video.is_empty() || audio.is_empty() {
            bail!("the encoded media is empty ({} video frames, {} audio frames)", video.len(), audio.len());
        }
        let video_keyframes = video.iter().filter(|f| f[0] & 1 == 0).count();
        if video[0][0] & 1 != 0 {
            bail!("{} does not start with a keyframe", ivf.display());
        }
        Ok(Media {
            video: with_packet_counts(video, vp8_payloader()?)?,
            audio: with_packet_counts(audio, opus_codec().rtp_codec.payloader()?)?,
            video_keyframes,
        })
    }

    fn bitrate_kbps(frames: &[Frame], cadence: Cadence) -> f64 {
        let bytes: usize = frames.iter().map(|f| f.data.len()).sum();
        bytes as f64 * 8.0 / (frames.len() as f64 * cadence.period.as_secs_f64()) / 1000.0
    }
}

/// Runs ffmpeg into `out` unless a previous run left it there (written under a temporary name
/// and renamed, so a half-written file is never taken for a cached one).
fn encode_once(out: &Path, args: &[&str]) -> Result<()> {
    if out.exists() {
        return Ok(());
    }
    let partial = out.with_extension("partial");
    eprintln!("whip_load: encoding {} with ffmpeg (once)", out.display());
    let result = std::process::Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-nostdin", "-y"])
        .args(args)
        .arg(&partial)
        .output()
        .context("running ffmpeg (is it installed, with libvpx and libopus?)")?;
    if !result.status.success() {
        bail!("ffmpeg failed ({}): {}", result.status, String::from_utf8_lossy(&result.stderr).trim());
    }
    std::fs::rename(&partial, out).with_context(|| format!("renaming {} into place", partial.display()))?;
    Ok(())
}

/// VP8 frames of an IVF file: a 32-byte header (`DKIF`, …, fourcc at 8), then per frame a
/// 12-byte header (u32 LE size, u64 LE pts) and the frame.
fn read_ivf_vp8(file: &[u8]) -> Result<Vec<Bytes>> {
    if file.len() < 32 || &file[0..4] != b"DKIF" {
        bail!("not an IVF file");
    }
    if &file[8..12] != b"VP80" {
        bail!("IVF fourcc is {:?}, not VP80", String::from_utf8_lossy(&file[8..12]));
    }
    let header_len = u16::from_le_bytes([file[6], file[7]]) as usize;
    let mut at = header_len.max(32);
    let mut frames = Vec::new();
    while at + 12 <= file.len() {
        let size = u32::from_le_bytes(file[at..at + 4].try_into()?) as usize;
        at += 12;
        if size == 0 || at + size > file.len() {
            bail!("IVF frame {} is truncated", frames.len());
        }
        frames.push(Bytes::copy_from_slice(&file[at..at + size]));
        at += size;
    }
    Ok(frames)
}

/// Opus packets of an Ogg file (RFC 7845), without the OpusHead and OpusTags packets. Pages are
/// `OggS`, 22 bytes of fields, a segment count and table, then the segments; a packet is the
/// concatenation of segments up to one shorter than 255 bytes (it may continue on the next page).
fn read_ogg_packets(file: &[u8]) -> Result<Vec<Bytes>> {
    let mut packets = Vec::new();
    let mut current = Vec::new();
    let mut at = 0;
    while at < file.len() {
        if file.len() < at + 27 || &file[at..at + 4] != b"OggS" {
            bail!("no Ogg page at byte {at}");
        }
        let segments = file[at + 26] as usize;
        let table = file.get(at + 27..at + 27 + segments).context("truncated Ogg segment table")?;
        at += 27 + segments;
        for &lacing in table {
            let segment = file.get(at..at + lacing as usize).context("truncated Ogg page")?;
            current.extend_from_slice(segment);
            at += lacing as usize;
            if lacing < 255 {
                packets.push(Bytes::from(std::mem::take(&mut current)));
            }
        }
    }
    if packets.len() < 2 || !packets[0].starts_with(b"OpusHead") || !packets[1].starts_with(b"OpusTags") {
        bail!("not an Ogg Opus file (no OpusHead, OpusTags)");
    }
    Ok(packets.split_off(2))
}

/// Counts each frame's RTP packets with the payloader the track uses, after one pass over the
/// whole list so the VP8 picture id is past 127 (2 bytes, as for most of a run).
fn with_packet_counts(frames: Vec<Bytes>, mut payloader: Box<dyn Payloader>) -> Result<Arc<[Frame]>> {
    for f in &frames {
        payloader.payload(PAYLOAD_MTU, f)?;
    }
    frames
        .into_iter()
        .map(|data| Ok(Frame { packets: payloader.payload(PAYLOAD_MTU, &data)?.len() as u64, data }))
        .collect::<Result<Vec<_>>>()
        .map(Arc::from)
}

fn vp8_payloader() -> Result<Box<dyn Payloader>> {
    Ok(vp8_codec().rtp_codec.payloader()?)
}

// ---------------------------------------------------------------------------------------------
// The recorder process.

struct Recorder {
    child: tokio::process::Child,
    pid: u32,
    base: String,
    stderr_path: PathBuf,
}

impl Recorder {
    async fn start(dir: &Path, token: &str, max_sessions: usize) -> Result<Recorder> {
        let config = dir.join("mxrec.toml");
        std::fs::write(&config, recorder_config(&dir.join("data"), token, max_sessions))
            .with_context(|| format!("writing {}", config.display()))?;
        let stderr_path = dir.join("mxrec.stderr");
        let stderr = std::fs::File::create(&stderr_path)?;
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_mxrec"))
            .arg("--config")
            .arg(&config)
            .arg("serve")
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .kill_on_drop(true)
            .spawn()
            .context("starting mxrec serve")?;
        let pid = child.id().context("mxrec serve exited at once")?;
        let stdout = child.stdout.take().context("no stdout pipe")?;
        let mut lines = BufReader::new(stdout).lines();
        let listening = timeout(RECORDER_START_TIMEOUT, async {
            while let Some(line) = lines.next_line().await? {
                if let Some(base) = line.trim().strip_prefix("listening: ") {
                    return Ok(base.trim_end_matches('/').to_owned());
                }
            }
            Err(anyhow!("mxrec serve closed its stdout without printing `listening:`"))
        })
        .await;
        let base = match listening {
            Ok(Ok(base)) => base,
            Ok(Err(e)) => bail!("{e:#}; its stderr ends:\n{}", tail(&stderr_path, 10).join("\n")),
            Err(_) => bail!(
                "mxrec serve printed no `listening:` line in {RECORDER_START_TIMEOUT:?}; its stderr ends:\n{}",
                tail(&stderr_path, 10).join("\n")
            ),
        };
        // Keep draining stdout so the recorder never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Recorder { child, pid, base, stderr_path })
    }

    /// SIGTERM, then up to [`RECORDER_STOP_TIMEOUT`] for it to finalize and exit, then SIGKILL.
    /// Says how it went.
    async fn stop(mut self) -> String {
        let asked = Instant::now();
        let term = tokio::process::Command::new("kill").args(["-TERM", &self.pid.to_string()]).status().await;
        if !matches!(term, Ok(s) if s.success()) {
            let _ = self.child.kill().await;
            return format!("SIGTERM failed ({term:?}); killed");
        }
        match timeout(RECORDER_STOP_TIMEOUT, self.child.wait()).await {
            Ok(Ok(status)) if status.success() => format!("exit 0 in {:.1} s", asked.elapsed().as_secs_f64()),
            Ok(Ok(status)) => format!("{status} in {:.1} s", asked.elapsed().as_secs_f64()),
            Ok(Err(e)) => format!("waiting for it failed: {e}"),
            Err(_) => {
                let _ = self.child.kill().await;
                format!("killed: still running {RECORDER_STOP_TIMEOUT:?} after SIGTERM")
            }
        }
    }
}

fn recorder_config(data_dir: &Path, token: &str, max_sessions: usize) -> String {
    let quoted = |s: &str| toml::Value::String(s.to_owned()).to_string();
    format!(
        r#"data_dir = {data_dir}
[log]
level = "warn"
[composite]
enabled = false
[recording]
segment_seconds = 2.0
[http]
bind = "127.0.0.1:0"
public_url = "http://127.0.0.1"
[webrtc]
bind_addrs = ["127.0.0.1:0"]
[whip]
enabled = true
bearer_token = {token}
max_sessions = {max_sessions}
"#,
        data_dir = quoted(&data_dir.to_string_lossy()),
        token = quoted(token),
    )
}

/// The last `n` lines of a file (empty if it cannot be read).
fn tail(path: &Path, n: usize) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<String> = text.lines().map(str::to_owned).collect();
    lines[lines.len().saturating_sub(n)..].to_vec()
}

// ---------------------------------------------------------------------------------------------
// Publishers.

/// Where and how to publish.
struct Whip {
    client: reqwest::Client,
    base: String,
    token: String,
}

/// One sending track of a publisher.
#[derive(Clone)]
struct Outbound {
    track: Arc<TrackLocalStaticSample>,
    ssrc: u32,
    payload_type: u8,
}

struct Publisher {
    index: usize,
    pc: Arc<dyn PeerConnection>,
    session_url: String,
    video: Outbound,
    audio: Outbound,
}

/// Gathering and connection state of a publisher's connection, as watch channels.
struct Events {
    gathering: watch::Sender<RTCIceGatheringState>,
    state: watch::Sender<RTCPeerConnectionState>,
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for Events {
    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        self.gathering.send_replace(state);
    }

    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        self.state.send_replace(state);
    }
}

fn vp8_codec() -> RTCRtpCodecParameters {
    let feedback = |typ: &str, parameter: &str| RTCPFeedback { typ: typ.to_owned(), parameter: parameter.to_owned() };
    RTCRtpCodecParameters {
        rtp_codec: RTCRtpCodec {
            mime_type: MIME_TYPE_VP8.to_owned(),
            clock_rate: 90000,
            channels: 0,
            sdp_fmtp_line: String::new(),
            rtcp_feedback: vec![
                feedback("goog-remb", ""),
                feedback("ccm", "fir"),
                feedback("nack", ""),
                feedback("nack", "pli"),
            ],
        },
        payload_type: 96,
    }
}

fn opus_codec() -> RTCRtpCodecParameters {
    RTCRtpCodecParameters {
        rtp_codec: RTCRtpCodec {
            mime_type: MIME_TYPE_OPUS.to_owned(),
            clock_rate: 48000,
            channels: 2,
            sdp_fmtp_line: "minptime=10;useinbandfec=1".to_owned(),
            rtcp_feedback: vec![],
        },
        payload_type: 111,
    }
}

/// Builds publisher `index`'s connection, publishes it, and returns once ICE and DTLS are up.
/// A failure closes the connection and, if the recorder had made a session, deletes it.
async fn connect_publisher(index: usize, whip: &Whip) -> Result<Publisher> {
    let (gathering, gathering_rx) = watch::channel(RTCIceGatheringState::New);
    let (state, state_rx) = watch::channel(RTCPeerConnectionState::New);
    let handler: Arc<dyn PeerConnectionEventHandler> = Arc::new(Events { gathering, state });

    let mut media_engine = MediaEngine::default();
    media_engine.register_codec(vp8_codec(), RtpCodecKind::Video)?;
    media_engine.register_codec(opus_codec(), RtpCodecKind::Audio)?;
    let registry = register_default_interceptors(Registry::new(), &mut media_engine)?;
    // As the recorder's own peer: no mDNS (it binds port 5353 per connection), host candidates.
    let settings = SettingEngineBuilder::new().with_multicast_dns_mode(MulticastDnsMode::Disabled).build();
    let pc = PeerConnectionBuilder::new()
        .with_configuration(RTCConfigurationBuilder::new().build())
        .with_media_engine(media_engine)
        .with_setting_engine(settings)
        .with_interceptor_registry(registry)
        .with_handler(handler)
        .with_udp_addrs(vec!["127.0.0.1:0".to_owned()])
        .build()
        .await
        .context("building the peer connection")?;
    let pc: Arc<dyn PeerConnection> = Arc::new(pc);

    let mut session_url = None;
    let result = publish(index, whip, &pc, gathering_rx, state_rx, &mut session_url).await;
    match result {
        Ok((video, audio)) => {
            let session_url = session_url.context("published without a session URL")?;
            Ok(Publisher { index, pc, session_url, video, audio })
        }
        Err(e) => {
            if let Some(url) = session_url {
                let _ = whip.client.delete(&url).bearer_auth(&whip.token).send().await;
            }
            let _ = pc.close().await;
            Err(e.context(format!("publisher bench-{index}")))
        }
    }
}

async fn publish(
    index: usize,
    whip: &Whip,
    pc: &Arc<dyn PeerConnection>,
    mut gathering: watch::Receiver<RTCIceGatheringState>,
    mut state: watch::Receiver<RTCPeerConnectionState>,
    session_url: &mut Option<String>,
) -> Result<(Outbound, Outbound)> {
    let stream_id = format!("bench-{index}");
    let video = add_sendonly_track(pc, &stream_id, RtpCodecKind::Video, vp8_codec()).await?;
    let audio = add_sendonly_track(pc, &stream_id, RtpCodecKind::Audio, opus_codec()).await?;

    let offer = pc.create_offer(None).await.context("creating the offer")?;
    pc.set_local_description(offer).await.context("setting the offer")?;
    // Non-trickle WHIP: the offer goes out with every candidate in it.
    timeout(STEP_TIMEOUT, gathering.wait_for(|s| *s == RTCIceGatheringState::Complete))
        .await
        .context("ICE gathering did not complete")?
        .context("the connection went away while gathering")?;
    let offer = pc.local_description().await.context("no local description after setting it")?;

    let url = format!("{}/whip/bench-{index}", whip.base);
    let response = whip
        .client
        .post(&url)
        .bearer_auth(&whip.token)
        .header(CONTENT_TYPE, "application/sdp")
        .body(offer.sdp)
        .send()
        .await
        .with_context(|| format!("POST {url}"))?;
    let status = response.status();
    let location = response.headers().get(LOCATION).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let body = response.text().await.with_context(|| format!("reading the answer of POST {url}"))?;
    if status != StatusCode::CREATED {
        bail!("POST {url} answered {status}, not 201: {}", body.chars().take(300).collect::<String>());
    }
    let location = location.with_context(|| format!("POST {url} answered 201 without a Location"))?;
    let resolved = reqwest::Url::parse(&url)?.join(&location).with_context(|| format!("Location {location:?}"))?;
    *session_url = Some(resolved.to_string());

    let answer = RTCSessionDescription::answer(body).context("the 201's body is not an SDP answer")?;
    pc.set_remote_description(answer).await.context("applying the answer")?;
    let reached = timeout(
        STEP_TIMEOUT,
        state.wait_for(|s| {
            matches!(
                s,
                RTCPeerConnectionState::Connected | RTCPeerConnectionState::Failed | RTCPeerConnectionState::Closed
            )
        }),
    )
    .await
    .context("ICE + DTLS did not connect")?
    .map(|s| *s)
    .context("the connection went away while connecting")?;
    if reached != RTCPeerConnectionState::Connected {
        bail!("the connection {reached} instead of connecting");
    }
    Ok((video.bind(MIME_TYPE_VP8).await?, audio.bind(MIME_TYPE_OPUS).await?))
}

/// A track added with its transceiver, its payload type known only after negotiation.
struct Pending {
    track: Arc<TrackLocalStaticSample>,
    ssrc: u32,
    transceiver: Arc<dyn RtpTransceiver>,
}

impl Pending {
    /// The negotiated payload type, checked to be `mime`'s (`write_sample` stamps it on packets).
    async fn bind(self, mime: &str) -> Result<Outbound> {
        let sender = self.transceiver.sender().await?.context("the transceiver has no sender")?;
        let params = sender.get_parameters().await?;
        let codec = params.rtp_parameters.codecs.first().with_context(|| format!("no codec negotiated for {mime}"))?;
        if !codec.rtp_codec.mime_type.eq_ignore_ascii_case(mime) {
            bail!("negotiated {} where {mime} was offered", codec.rtp_codec.mime_type);
        }
        Ok(Outbound { track: self.track, ssrc: self.ssrc, payload_type: codec.payload_type })
    }
}

async fn add_sendonly_track(
    pc: &Arc<dyn PeerConnection>,
    stream_id: &str,
    kind: RtpCodecKind,
    codec: RTCRtpCodecParameters,
) -> Result<Pending> {
    let ssrc = rand::random::<u32>();
    let track = Arc::new(TrackLocalStaticSample::new(
        Instant::now(),
        MediaStreamTrack::new(
            stream_id.to_owned(),
            format!("{stream_id}-{kind}"),
            format!("{stream_id}-{kind}"),
            kind,
            vec![RTCRtpEncodingParameters {
                rtp_coding_parameters: RTCRtpCodingParameters { ssrc: Some(ssrc), ..Default::default() },
                codec: codec.rtp_codec,
                active: true,
                ..Default::default()
            }],
        ),
    )?);
    let init = RTCRtpTransceiverInit {
        direction: RTCRtpTransceiverDirection::Sendonly,
        streams: vec![stream_id.to_owned()],
        send_encodings: vec![],
    };
    let transceiver = pc
        .add_transceiver_from_track(track.clone() as Arc<dyn TrackLocal>, Some(init))
        .await
        .with_context(|| format!("adding the {kind} transceiver"))?;
    Ok(Pending { track, ssrc, transceiver })
}

/// Connects N publishers, [`CONNECTS_IN_FLIGHT`] at a time, handing each to the pacers as soon
/// as it is connected. Returns those that connected and why the others did not.
async fn connect_all(n: usize, whip: &Arc<Whip>, pacers: &Pacers) -> (Vec<Publisher>, Vec<String>) {
    let permits = Arc::new(Semaphore::new(CONNECTS_IN_FLIGHT));
    let mut tasks = JoinSet::new();
    for index in 0..n {
        let (permits, whip) = (permits.clone(), whip.clone());
        tasks.spawn(async move {
            let _permit = permits.acquire_owned().await?;
            connect_publisher(index, &whip).await
        });
    }
    let deadline = tokio::time::Instant::now() + CONNECT_DEADLINE;
    let (mut connected, mut errors) = (Vec::new(), Vec::new());
    loop {
        match timeout_at(deadline, tasks.join_next()).await {
            Ok(Some(Ok(Ok(publisher)))) => {
                pacers.add(&publisher);
                connected.push(publisher);
            }
            Ok(Some(Ok(Err(e)))) => errors.push(format!("{e:#}")),
            Ok(Some(Err(e))) => errors.push(format!("a connect task failed: {e}")),
            Ok(None) => break,
            Err(_) => {
                errors.push(format!("{} publishers still connecting at the {CONNECT_DEADLINE:?} deadline", tasks.len()));
                // Dropping their connections is enough: the recorder is stopped after this N.
                tasks.abort_all();
                break;
            }
        }
    }
    (connected, errors)
}

/// Deletes every session (expecting 200) and closes every connection. Returns the number of
/// 200s and what the others answered.
async fn teardown(publishers: Vec<Publisher>, whip: &Arc<Whip>) -> (usize, Vec<String>) {
    let permits = Arc::new(Semaphore::new(CONNECTS_IN_FLIGHT));
    let mut tasks = JoinSet::new();
    for p in publishers {
        let (permits, whip) = (permits.clone(), whip.clone());
        tasks.spawn(async move {
            let _permit = permits.acquire_owned().await;
            let answer = whip.client.delete(&p.session_url).bearer_auth(&whip.token).send().await;
            let _ = p.pc.close().await;
            match answer {
                Ok(r) if r.status() == StatusCode::OK => Ok(()),
                Ok(r) => Err(format!("DELETE {} (bench-{}) answered {}", p.session_url, p.index, r.status())),
                Err(e) => Err(format!("DELETE {} (bench-{}): {e}", p.session_url, p.index)),
            }
        });
    }
    let (mut ok, mut failed) = (0, Vec::new());
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok(Ok(())) => ok += 1,
            Ok(Err(e)) => failed.push(e),
            Err(e) => failed.push(format!("a teardown task failed: {e}")),
        }
    }
    (ok, failed)
}

// ---------------------------------------------------------------------------------------------
// Pacing: one task per media kind sends every publisher's due frames.

/// Sender-side counters, over both kinds, since the pacers started.
#[derive(Clone, Default)]
struct PacerStats {
    /// Frames that real time says should have been sent by the last tick.
    frames_due: u64,
    frames_sent: u64,
    packets_sent: u64,
    write_errors: u64,
    first_error: Option<String>,
}

struct Pacers {
    video: mpsc::UnboundedSender<Paced>,
    audio: mpsc::UnboundedSender<Paced>,
    stats: Arc<Mutex<PacerStats>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    media_video: Arc<[Frame]>,
    media_audio: Arc<[Frame]>,
}

/// One track under a pacer: frame `k` is due at `first_due + k × period`.
struct Paced {
    out: Outbound,
    frames: Arc<[Frame]>,
    first_due: Instant,
    next: u64,
}

impl Pacers {
    fn start(media: &Media) -> Pacers {
        let stats = Arc::new(Mutex::new(PacerStats::default()));
        let (video, video_rx) = mpsc::unbounded_channel();
        let (audio, audio_rx) = mpsc::unbounded_channel();
        let tasks = vec![
            tokio::spawn(pace(video_rx, VIDEO, stats.clone())),
            tokio::spawn(pace(audio_rx, AUDIO, stats.clone())),
        ];
        Pacers { video, audio, stats, tasks, media_video: media.video.clone(), media_audio: media.audio.clone() }
    }

    /// Starts a connected publisher's media, each kind on a phase of its own (spread by index)
    /// so that N publishers do not all send on the same instant.
    fn add(&self, p: &Publisher) {
        let now = Instant::now();
        for (tx, out, frames, cadence) in [
            (&self.video, &p.video, &self.media_video, VIDEO),
            (&self.audio, &p.audio, &self.media_audio, AUDIO),
        ] {
            let phase_us = (p.index as u64 * 7_919) % cadence.period.as_micros() as u64;
            let _ = tx.send(Paced {
                out: out.clone(),
                frames: frames.clone(),
                first_due: now + Duration::from_micros(phase_us),
                next: 0,
            });
        }
    }

    fn stats(&self) -> PacerStats {
        self.stats.lock().unwrap().clone()
    }

    fn stop(self) {
        for t in self.tasks {
            t.abort();
        }
    }
}

async fn pace(mut incoming: mpsc::UnboundedReceiver<Paced>, cadence: Cadence, stats: Arc<Mutex<PacerStats>>) {
    let mut tracks: Vec<Paced> = Vec::new();
    // The `frames_due` this pacer last added, so the shared total can be replaced per kind.
    let mut due_reported = 0u64;
    let mut tick = interval(PACER_TICK);
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            added = incoming.recv() => match added {
                Some(t) => { tracks.push(t); continue; }
                None => return,
            },
            _ = tick.tick() => {}
        }
        let now = Instant::now();
        let mut due_total = 0;
        let mut writes = Vec::new();
        for t in &mut tracks {
            let due = match now.checked_duration_since(t.first_due) {
                Some(since) => (since.as_nanos() / cadence.period.as_nanos()) as u64 + 1,
                None => 0,
            };
            due_total += due;
            let batch = due.saturating_sub(t.next).min(MAX_CATCH_UP);
            if batch > 0 {
                writes.push(send_frames(t.out.clone(), t.frames.clone(), cadence, t.next, batch));
                t.next += batch;
            }
        }
        // All tracks' writes of this tick run together in this one task: a publisher whose
        // connection pushes back delays this tick, not the other publishers' frames within it.
        let results = futures::future::join_all(writes).await;
        let mut s = stats.lock().unwrap();
        s.frames_due = s.frames_due - due_reported + due_total;
        due_reported = due_total;
        for r in results {
            s.frames_sent += r.frames;
            s.packets_sent += r.packets;
            s.write_errors += r.errors;
            if s.first_error.is_none() {
                s.first_error = r.first_error;
            }
        }
    }
}

#[derive(Default)]
struct Sent {
    frames: u64,
    packets: u64,
    errors: u64,
    first_error: Option<String>,
}

async fn send_frames(out: Outbound, frames: Arc<[Frame]>, cadence: Cadence, first: u64, count: u64) -> Sent {
    let mut sent = Sent::default();
    for k in first..first + count {
        let frame = &frames[(k % frames.len() as u64) as usize];
        let sample =
            Sample { data: frame.data.clone(), duration: cadence.sample_duration, ..Sample::new(Instant::now()) };
        match out.track.write_sample(out.ssrc, out.payload_type, &sample, &[]).await {
            Ok(()) => {
                sent.frames += 1;
                sent.packets += frame.packets;
            }
            Err(e) => {
                sent.errors += 1;
                sent.first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    sent
}

// ---------------------------------------------------------------------------------------------
// One N.

struct Measured {
    connected_secs: f64,
    window_secs: f64,
    recorder_cpu_pct: f64,
    own_cpu_pct: f64,
    rss_mib: f64,
    idle_rss_mib: f64,
    peak_rss_mib: f64,
    fds: usize,
    packets_received: u64,
    packets_lost: u64,
    /// Quantiles 0.5, 0.99 and 1 of the frame write time, ms.
    frame_write_ms: [Option<f64>; 3],
    frame_write_mean_ms: Option<f64>,
    sender: PacerStats,
    /// Frames sent minus due at the end of the window (negative: behind).
    backlog_end: i64,
    deletes_ok: usize,
    delete_errors: Vec<String>,
    exit: String,
    stderr_lines: Vec<String>,
}

struct Failed {
    reason: String,
    exit: String,
    stderr_lines: Vec<String>,
}

enum Outcome {
    Measured(Measured),
    Failed(Failed),
}

async fn run_one(n: usize, args: &Args, media: &Media, clk_tck: f64) -> Outcome {
    let dir = match tempfile::Builder::new().prefix("mxrec-whip-load-").tempdir() {
        Ok(d) => d,
        Err(e) => {
            return Outcome::Failed(Failed {
                reason: format!("creating a temp dir: {e}"),
                exit: "not started".into(),
                stderr_lines: vec![],
            })
        }
    };
    let token = hex::encode(rand::random::<[u8; 16]>());
    let recorder = match Recorder::start(dir.path(), &token, n.max(400)).await {
        Ok(r) => r,
        Err(e) => {
            return Outcome::Failed(Failed {
                reason: format!("{e:#}"),
                exit: "did not start".into(),
                stderr_lines: vec![],
            })
        }
    };
    eprintln!("whip_load: recorder pid {} at {}", recorder.pid, recorder.base);
    let driven = drive(n, args, media, &recorder, token, clk_tck).await;
    let stderr_path = recorder.stderr_path.clone();
    let exit = recorder.stop().await;
    let stderr_lines = std::fs::read_to_string(&stderr_path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect::<Vec<_>>();
    drop(dir);
    match driven {
        Ok(mut m) => {
            m.exit = exit;
            m.stderr_lines = stderr_lines;
            Outcome::Measured(m)
        }
        Err(e) => Outcome::Failed(Failed { reason: format!("{e:#}"), exit, stderr_lines }),
    }
}

/// Everything between the recorder's start and its stop: publishers up, warm-up, the window,
/// publishers down. Publishers are torn down whatever happened.
async fn drive(n: usize, args: &Args, media: &Media, recorder: &Recorder, token: String, clk_tck: f64) -> Result<Measured> {
    sleep(Duration::from_secs(1)).await;
    let idle_rss_kib = proc_status_kib(recorder.pid, "VmRSS")?;
    let client = reqwest::Client::builder().no_proxy().timeout(STEP_TIMEOUT).build()?;
    let whip = Arc::new(Whip { client, base: recorder.base.clone(), token });

    let pacers = Pacers::start(media);
    let started = Instant::now();
    let (publishers, errors) = connect_all(n, &whip, &pacers).await;
    let connected_secs = started.elapsed().as_secs_f64();
    eprintln!("whip_load: {}/{n} publishers connected in {connected_secs:.1} s", publishers.len());

    let measured = if publishers.len() < n {
        let mut shown: Vec<&String> = errors.iter().take(3).collect();
        shown.dedup();
        Err(anyhow!(
            "{}/{n} publishers connected within {CONNECT_DEADLINE:?}; {} failed, first: {}",
            publishers.len(),
            errors.len(),
            shown.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(" | ")
        ))
    } else {
        measure(args, recorder, &whip, &pacers, clk_tck).await
    };
    pacers.stop();
    eprintln!("whip_load: deleting {} sessions", publishers.len());
    let (deletes_ok, delete_errors) = teardown(publishers, &whip).await;
    let mut m = measured?;
    m.connected_secs = connected_secs;
    m.idle_rss_mib = kib_to_mib(idle_rss_kib);
    m.deletes_ok = deletes_ok;
    m.delete_errors = delete_errors;
    Ok(m)
}

async fn measure(args: &Args, recorder: &Recorder, whip: &Whip, pacers: &Pacers, clk_tck: f64) -> Result<Measured> {
    eprintln!("whip_load: warm-up {} s, then measuring {} s", args.warmup, args.seconds);
    sleep(Duration::from_secs(args.warmup)).await;
    let a = Snapshot::take(recorder, whip, pacers).await?;
    sleep(Duration::from_secs(args.seconds)).await;
    let b = Snapshot::take(recorder, whip, pacers).await?;

    let secs = b.at.duration_since(a.at).as_secs_f64();
    let cpu_pct = |from: u64, to: u64| to.saturating_sub(from) as f64 / clk_tck / secs * 100.0;
    let delta = |name: &str| (b.metrics.total(name) - a.metrics.total(name)).max(0.0);
    let count = delta(&format!("{FRAME_WRITE}_count"));
    let frame_write_mean_ms = (count > 0.0).then(|| delta(&format!("{FRAME_WRITE}_sum")) / count * 1e3);
    let sender = PacerStats {
        frames_due: b.pacer.frames_due - a.pacer.frames_due,
        frames_sent: b.pacer.frames_sent - a.pacer.frames_sent,
        packets_sent: b.pacer.packets_sent - a.pacer.packets_sent,
        write_errors: b.pacer.write_errors - a.pacer.write_errors,
        first_error: b.pacer.first_error.clone(),
    };
    Ok(Measured {
        connected_secs: 0.0,
        window_secs: secs,
        recorder_cpu_pct: cpu_pct(a.recorder_ticks, b.recorder_ticks),
        own_cpu_pct: cpu_pct(a.own_ticks, b.own_ticks),
        rss_mib: kib_to_mib(b.rss_kib),
        idle_rss_mib: 0.0,
        peak_rss_mib: kib_to_mib(b.peak_rss_kib),
        fds: b.fds,
        packets_received: delta(RTP_RECEIVED) as u64,
        packets_lost: delta(RTP_LOST) as u64,
        frame_write_ms: [0.5, 0.99, 1.0].map(|q| b.metrics.frame_write_quantile(q).map(|s| s * 1e3)),
        frame_write_mean_ms,
        backlog_end: b.pacer.frames_sent as i64 - b.pacer.frames_due as i64,
        sender,
        deletes_ok: 0,
        delete_errors: vec![],
        exit: String::new(),
        stderr_lines: vec![],
    })
}

fn kib_to_mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

// ---------------------------------------------------------------------------------------------
// Sampling: /proc and /metrics.

const RTP_RECEIVED: &str = "mxrec_rtp_packets_received_total";
const RTP_LOST: &str = "mxrec_rtp_packets_lost_total";
const FRAME_WRITE: &str = "mxrec_frame_write_seconds";

struct Snapshot {
    at: Instant,
    recorder_ticks: u64,
    own_ticks: u64,
    rss_kib: u64,
    peak_rss_kib: u64,
    fds: usize,
    metrics: Scrape,
    pacer: PacerStats,
}

impl Snapshot {
    async fn take(recorder: &Recorder, whip: &Whip, pacers: &Pacers) -> Result<Snapshot> {
        let url = format!("{}/metrics", whip.base);
        let text = async { whip.client.get(&url).send().await?.error_for_status()?.text().await }
            .await
            .with_context(|| format!("GET {url}"))?;
        let pid = recorder.pid.to_string();
        Ok(Snapshot {
            at: Instant::now(),
            recorder_ticks: cpu_ticks(&pid)?,
            own_ticks: cpu_ticks("self")?,
            rss_kib: proc_status_kib(recorder.pid, "VmRSS")?,
            peak_rss_kib: proc_status_kib(recorder.pid, "VmHWM")?,
            fds: std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0),
            metrics: Scrape::parse(&text),
            pacer: pacers.stats(),
        })
    }
}

/// utime + stime of a process (`/proc/<pid>/stat` fields 14 and 15, counted after the `comm`
/// field, which may hold spaces), in clock ticks.
fn cpu_ticks(pid: &str) -> Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path} (has the process exited?)"))?;
    let after_comm = stat.rsplit_once(')').map(|(_, rest)| rest).context("no `)` in /proc stat")?;
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let field = |i: usize| -> Result<u64> { Ok(fields.get(i).context("short /proc stat")?.parse()?) };
    // After `comm` the list starts at field 3 (state): utime (14) is index 11, stime (15) 12.
    Ok(field(11)? + field(12)?)
}

/// A `kB` line (`VmRSS`, `VmHWM`) of `/proc/<pid>/status`, in KiB.
fn proc_status_kib(pid: u32, key: &str) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path} (has the process exited?)"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':')?.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no {key} in {path}"))
}

fn clock_ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse::<f64>().ok())
        .filter(|&t| t > 0.0)
        .unwrap_or(100.0)
}

/// What a Prometheus text scrape says about the metrics read here: every series summed by name
/// (labels ignored, so a counter split by label still totals), and the frame write summary's
/// quantiles.
struct Scrape {
    totals: HashMap<String, f64>,
    frame_write: Vec<(f64, f64)>,
}

impl Scrape {
    fn parse(text: &str) -> Scrape {
        let mut totals = HashMap::new();
        let mut frame_write = Vec::new();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
            let (name, labels, rest) = match line.find('{') {
                Some(open) => match line[open..].find('}') {
                    Some(close) => (&line[..open], &line[open + 1..open + close], &line[open + close + 1..]),
                    None => continue,
                },
                None => match line.split_once(' ') {
                    Some((name, rest)) => (name, "", rest),
                    None => continue,
                },
            };
            let Some(value) = rest.split_whitespace().next().and_then(|v| v.parse::<f64>().ok()) else { continue };
            if value.is_nan() {
                continue;
            }
            match label(labels, "quantile").and_then(|q| q.parse::<f64>().ok()) {
                Some(q) if name == FRAME_WRITE => frame_write.push((q, value)),
                Some(_) => {}
                None => *totals.entry(name.to_owned()).or_insert(0.0) += value,
            }
        }
        Scrape { totals, frame_write }
    }

    fn total(&self, name: &str) -> f64 {
        self.totals.get(name).copied().unwrap_or(0.0)
    }

    /// Quantile `q` of the frame write time in seconds; the worst over the series if the
    /// recorder labels several (by kind, say).
    fn frame_write_quantile(&self, q: f64) -> Option<f64> {
        self.frame_write.iter().filter(|(qq, _)| (qq - q).abs() < 1e-9).map(|&(_, v)| v).reduce(f64::max)
    }
}

/// The value of `key` in a Prometheus label set (`a="x",b="y"`).
fn label<'a>(labels: &'a str, key: &str) -> Option<&'a str> {
    labels.split(',').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k.trim() == key).then(|| v.trim().trim_matches('"'))
    })
}

// ---------------------------------------------------------------------------------------------
// The report.

fn report(args: &Args, media: &Media, rows: &[(usize, Outcome)]) -> String {
    let mut out = String::new();
    let cores = std::process::Command::new("nproc")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "?".into());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| c.lines().find_map(|l| l.strip_prefix("model name")?.split_once(':').map(|(_, m)| m.trim().to_owned())))
        .unwrap_or_else(|| "unknown CPU".into());
    let profile = if cfg!(debug_assertions) { "debug (not `cargo bench`)" } else { "optimised" };
    let mut command = "cargo bench -p recorder --bench whip_load".to_owned();
    if !args.given.is_empty() {
        command = format!("{command} -- {}", args.given.join(" "));
    }
    let _ = writeln!(out, "\n## WHIP ingest load\n");
    let _ = writeln!(out, "- machine: {cores} cores (`nproc`), {cpu}; recorder and publishers share them");
    let _ = writeln!(out, "- command: `{command}` ({profile} build of mxrec and the bench)");
    let _ = writeln!(
        out,
        "- per publisher: VP8 640x360 30 fps {:.0} kbit/s ({} frames looped, {} keyframes) + Opus 20 ms {:.0} kbit/s, \
         paced in real time by webrtc-rs 0.21.1 `TrackLocalStaticSample`s over loopback; WHIP POST non-trickle, {CONNECTS_IN_FLIGHT} at a time",
        Media::bitrate_kbps(&media.video, VIDEO),
        media.video.len(),
        media.video_keyframes,
        Media::bitrate_kbps(&media.audio, AUDIO),
    );
    let _ = writeln!(
        out,
        "- recorder: a fresh `mxrec serve` per N (local files, SQLite, 2 s segments, no composite); measured over a \
         {} s window after all N connected and a {} s warm-up: CPU = utime+stime of its process, RSS from /proc, \
         packets from /metrics (updated every 5 s per track); frame write quantiles are the exporter's rolling summary \
         (last 40–60 s)",
        args.seconds, args.warmup
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "| N | tracks | recorder CPU (% of a core) | CPU per track | RSS (MiB) | RSS per track (MiB) | packets | lost (%) | frame write p50 / p99 / max (ms) | publisher CPU % |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|");
    for (n, row) in rows {
        let tracks = 2 * n;
        match row {
            Outcome::Measured(m) => {
                let ms = |v: Option<f64>| v.map_or("n/a".to_owned(), |v| format!("{v:.2}"));
                let seen = m.packets_received + m.packets_lost;
                let loss = if seen > 0 { m.packets_lost as f64 / seen as f64 * 100.0 } else { 0.0 };
                let _ = writeln!(
                    out,
                    "| {n} | {tracks} | {:.1} | {:.2} | {:.1} | {:.3} | {} | {} ({loss:.2} %) | {} / {} / {} | {:.1} |",
                    m.recorder_cpu_pct,
                    m.recorder_cpu_pct / tracks as f64,
                    m.rss_mib,
                    (m.rss_mib - m.idle_rss_mib) / tracks as f64,
                    m.packets_received,
                    m.packets_lost,
                    ms(m.frame_write_ms[0]),
                    ms(m.frame_write_ms[1]),
                    ms(m.frame_write_ms[2]),
                    m.own_cpu_pct,
                );
            }
            Outcome::Failed(f) => {
                let _ = writeln!(out, "| {n} | {tracks} | failed: {} | | | | | | | |", one_line(&f.reason, 300));
            }
        }
    }

    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "| N | all connected after (s) | window (s) | frames sent / due in window | backlog at end (frames) | write errors | RTP packets sent in window | frame write mean (ms) | recorder fds | recorder idle / peak RSS (MiB) | DELETE 200 | recorder stop |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    for (n, row) in rows {
        match row {
            Outcome::Measured(m) => {
                let s = &m.sender;
                let sent_pct = if s.frames_due > 0 { s.frames_sent as f64 / s.frames_due as f64 * 100.0 } else { 0.0 };
                let _ = writeln!(
                    out,
                    "| {n} | {:.1} | {:.1} | {} / {} ({sent_pct:.1} %) | {} | {} | {} | {} | {} | {:.1} / {:.1} | {}/{n} | {} |",
                    m.connected_secs,
                    m.window_secs,
                    s.frames_sent,
                    s.frames_due,
                    -m.backlog_end,
                    s.write_errors,
                    s.packets_sent,
                    m.frame_write_mean_ms.map_or("n/a".to_owned(), |v| format!("{v:.3}")),
                    m.fds,
                    m.idle_rss_mib,
                    m.peak_rss_mib,
                    m.deletes_ok,
                    m.exit,
                );
            }
            Outcome::Failed(f) => {
                let _ = writeln!(out, "| {n} | failed | | | | | | | | | | {} |", f.exit);
            }
        }
    }

    // What the table cannot hold: errors, and what the recorder said on stderr.
    let mut notes = String::new();
    for (n, row) in rows {
        let (errors, stderr): (Vec<String>, &[String]) = match row {
            Outcome::Measured(m) => {
                let mut e = m.delete_errors.iter().take(3).cloned().collect::<Vec<_>>();
                if let Some(first) = &m.sender.first_error {
                    e.push(format!("first write error: {first}"));
                }
                (e, m.stderr_lines.as_slice())
            }
            Outcome::Failed(f) => (vec![f.reason.clone()], f.stderr_lines.as_slice()),
        };
        for e in errors {
            let _ = writeln!(notes, "- N = {n}: {}", one_line(&e, 600));
        }
        if !stderr.is_empty() {
            let _ = writeln!(notes, "- N = {n}: the recorder wrote {} lines on stderr; the last:", stderr.len());
            for l in &stderr[stderr.len().saturating_sub(3)..] {
                let _ = writeln!(notes, "  `{}`", one_line(l, 300));
            }
        }
    }
    if !notes.is_empty() {
        let _ = writeln!(out, "\n{notes}");
    }
    out
}

fn one_line(s: &str, max: usize) -> String {
    let flat: String = s.split_whitespace().collect::<Vec<_>>().join(" ").replace('|', "\\|");
    if flat.chars().count() > max {
        format!("{}…", flat.chars().take(max).collect::<String>())
    } else {
        flat
    }
}
