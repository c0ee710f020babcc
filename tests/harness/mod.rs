//! Shared harness of the end-to-end tests: the real servers' coordinates (started by
//! `deploy/dev/test.sh`), fixture media made by FFmpeg at test time, and running `mxrec`.
//!
//! Tests that need a server they were not given say so loudly and return; `make test` always
//! provides them, so in CI nothing is skipped.

#![allow(dead_code)]

pub mod calls;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The S3 server's coordinates, from `deploy/dev/garage.sh env`.
pub struct S3 {
    pub endpoint: String,
    pub bucket: String,
    pub region: String,
}

impl S3 {
    /// The keys of a `[storage]` section for this server under `prefix` (credentials come from
    /// `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`).
    pub fn storage_toml(&self, prefix: &str) -> String {
        format!(
            "kind = \"s3\"\nendpoint = \"{}\"\nbucket = \"{}\"\nregion = \"{}\"\nallow_http = true\nprefix = \"{prefix}\"\n",
            self.endpoint, self.bucket, self.region
        )
    }

    pub fn store_config(&self, prefix: &str) -> storage::StoreConfig {
        toml::from_str(&self.storage_toml(prefix)).unwrap()
    }
}

pub fn s3() -> Option<S3> {
    Some(S3 {
        endpoint: std::env::var("MXREC_S3_ENDPOINT").ok()?,
        bucket: std::env::var("MXREC_S3_BUCKET").ok()?,
        region: std::env::var("MXREC_S3_REGION").unwrap_or_else(|_| "garage".into()),
    })
}

/// The LiveKit SFU that deploy/dev/livekit.sh starts (`livekit.sh env`).
#[derive(Debug, Clone)]
pub struct LiveKit {
    pub url: String,
    pub key: String,
    pub secret: String,
    /// The JWT service stand-in (tests/peers/lk_jwt_standin.py) in front of it.
    pub service_url: String,
}

pub fn livekit() -> Option<LiveKit> {
    Some(LiveKit {
        url: std::env::var("MXREC_TEST_LIVEKIT_URL").ok()?,
        key: std::env::var("MXREC_TEST_LIVEKIT_KEY").ok()?,
        secret: std::env::var("MXREC_TEST_LIVEKIT_SECRET").ok()?,
        service_url: std::env::var("MXREC_TEST_RTC_SERVICE_URL").ok()?,
    })
}

impl LiveKit {
    /// A token that may publish and subscribe in `room` (what the JWT service gives members).
    pub fn member_token(&self, room: &str, identity: &str) -> String {
        use livekit_api::access_token::{AccessToken, VideoGrants};
        AccessToken::with_api_key(&self.key, &self.secret)
            .with_identity(identity)
            .with_name(identity)
            .with_grants(VideoGrants {
                room_join: true,
                room: room.to_owned(),
                can_publish: Some(true),
                can_subscribe: Some(true),
                can_publish_data: Some(true),
                ..Default::default()
            })
            .to_jwt()
            .expect("mint a member token")
    }
}

pub fn postgres_url() -> Option<String> {
    std::env::var("MXREC_TEST_POSTGRES_URL").ok()
}

/// Says loudly that a test did not run. Written to the process's stderr directly, since the test
/// harness captures `eprintln!` of passing tests.
pub fn skip(test: &str, why: &str) {
    use std::io::Write;
    if std::env::var_os("MXREC_REQUIRE_TEST_SERVERS").is_some() {
        panic!("{test} needs a test server: {why}; MXREC_REQUIRE_TEST_SERVERS forbids skipping");
    }
    let _ = writeln!(std::io::stderr(), "!!! SKIPPED {test}: {why} (make test sets it)");
}

/// Runs FFmpeg with `args`, panicking with its stderr on failure.
pub fn ffmpeg(args: &[&str]) {
    let out = Command::new("ffmpeg").args(["-v", "error", "-y"]).args(args).output().expect("ffmpeg runs");
    assert!(out.status.success(), "ffmpeg {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// `ffprobe` JSON for a file.
pub fn ffprobe(path: &Path) -> serde_json::Value {
    let out = Command::new("ffprobe")
        .args(["-v", "error", "-print_format", "json", "-show_format", "-show_streams"])
        .arg(path)
        .output()
        .expect("ffprobe runs");
    assert!(out.status.success(), "ffprobe {}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("ffprobe prints JSON")
}

/// Decodes a file completely and returns what the decoder complained about (empty: clean).
pub fn decode_errors(path: &Path) -> String {
    // ffprobe decodes every frame of every stream and reports only what the demuxer and decoders
    // say. `ffmpeg -f null` also reports its own output side: with frames of variable spacing
    // (a track converging onto its sender's clock, 30 ms apart for a while) its constant-rate
    // null muxer saw two frames on one tick and called that "non monotonically increasing dts".
    let out = Command::new("ffprobe")
        .args(["-v", "error", "-show_entries", "frame=pts", "-of", "csv=p=0"])
        .arg(path)
        .output()
        .expect("ffprobe runs");
    let mut s = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        s.push_str(&format!("\n(exit {:?})", out.status.code()));
    }
    s
}

pub fn mxrec_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_mxrec"))
}

/// Runs `mxrec` with a config file and arguments in `cwd`.
pub fn mxrec(cwd: &Path, config: &Path, args: &[&str]) -> Output {
    Command::new(mxrec_bin())
        .current_dir(cwd)
        .arg("--config")
        .arg(config)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("mxrec runs")
}

pub fn stdout_value(out: &Output, label: &str) -> Option<String> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{label}:")).map(|v| v.trim().to_string()))
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Files (not directories) left under `dir`.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else { return out };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The repository and its Python peers (aiortc, the Matrix caller).

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The interpreter with aiortc, making the venv of `deploy/dev/pyenv.sh` when it is missing
/// (`MXREC_TEST_PYTHON` overrides it).
pub fn python() -> PathBuf {
    use std::process::Stdio;
    if let Ok(p) = std::env::var("MXREC_TEST_PYTHON") {
        return PathBuf::from(p);
    }
    let script = repo_root().join("deploy/dev/pyenv.sh");
    let out = Command::new("bash").arg(&script).stderr(Stdio::inherit()).output();
    match out {
        Ok(out) if out.status.success() => {
            PathBuf::from(String::from_utf8_lossy(&out.stdout).trim().lines().last().unwrap_or(""))
        }
        Ok(out) => panic!(
            "the aiortc venv is missing and {} could not make it (exit {:?}); run it by hand and \
             read its error, or point MXREC_TEST_PYTHON at a python with aiortc 1.16 and numpy",
            script.display(),
            out.status.code()
        ),
        Err(e) => panic!("cannot run {}: {e}", script.display()),
    }
}

// ---------------------------------------------------------------------------------------------
// A/V measurement on recorded media. The synthetic senders (tests/peers/*.py, or an FFmpeg lavfi
// graph) draw an all-white frame and start a 1 kHz beep at every whole second; after recording,
// each flash must sit on a beep onset.

/// `ffprobe` over a lavfi graph reading `path` (`source` is `movie` or `amovie`); returns
/// (pts seconds, tag value) per frame, in decode order.
pub fn probe_frames(source: &str, path: &Path, filters: &str, tag: &str) -> Vec<(f64, f64)> {
    let graph = format!("{source}={},{filters}", path.display());
    let out = Command::new("ffprobe")
        .args(["-v", "error", "-f", "lavfi", "-i", &graph])
        .args(["-show_entries", &format!("frame=pts_time:frame_tags={tag}"), "-of", "csv=p=0"])
        .output()
        .expect("ffprobe runs");
    assert!(out.status.success(), "ffprobe {graph}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut it = l.split(',');
            let t = it.next()?.trim().parse().ok()?;
            let v = it.next()?.trim();
            let v = if v == "-inf" { f64::NEG_INFINITY } else { v.parse().ok()? };
            Some((t, v))
        })
        .collect()
}

/// Average luma (signalstats YAVG, 0–255) of every video frame of `paths`, sorted by time.
pub fn luma_per_frame(paths: &[&Path]) -> Vec<(f64, f64)> {
    let mut frames: Vec<(f64, f64)> =
        paths.iter().flat_map(|p| probe_frames("movie", p, "signalstats", "lavfi.signalstats.YAVG")).collect();
    frames.sort_by(|a, b| a.0.total_cmp(&b.0));
    frames
}

/// For every video frame of `path` but the first, the largest luma difference (0–255) from the
/// frame before it: near 0 for a repeated frame (encoder noise stays well below 40), large where
/// something changed (a counter block flipping between black and white).
pub fn frame_changes(path: &Path) -> Vec<(f64, f64)> {
    probe_frames("movie", path, "tblend=all_mode=difference,signalstats", "lavfi.signalstats.YMAX")
}

/// Audio RMS level (dBFS) per 1 ms chunk at 48 kHz (48 samples; a little more at lower rates) of
/// `paths`, sorted by time.
pub fn audio_rms_per_ms(paths: &[&Path]) -> Vec<(f64, f64)> {
    let mut chunks: Vec<(f64, f64)> = paths
        .iter()
        .flat_map(|p| {
            probe_frames(
                "amovie",
                p,
                "asetnsamples=n=48:p=0,astats=metadata=1:reset=1",
                "lavfi.astats.Overall.RMS_level",
            )
        })
        .collect();
    chunks.sort_by(|a, b| a.0.total_cmp(&b.0));
    chunks
}

/// Times (s) where a frame turns bright after a normal one. "Bright" is relative: above halfway
/// between the median and the brightest frame, so a flash still counts when a composite shows the
/// sender in a tile on a dark canvas. Nothing counts when the brightest frame is within 20 levels
/// of the median (no flash at all).
pub fn flash_times(frames: &[(f64, f64)]) -> Vec<f64> {
    if frames.is_empty() {
        return vec![];
    }
    let mut lumas: Vec<f64> = frames.iter().map(|f| f.1).collect();
    lumas.sort_by(f64::total_cmp);
    let median = lumas[lumas.len() / 2];
    let max = *lumas.last().unwrap();
    if max - median < 20.0 {
        return vec![];
    }
    let threshold = median + (max - median) / 2.0;
    let mut out = vec![];
    let mut prev_bright = false;
    for &(t, yavg) in frames {
        let bright = yavg > threshold;
        if bright && !prev_bright {
            out.push(t);
        }
        prev_bright = bright;
    }
    out
}

/// Times (s) where the audio gets loud (RMS above −40 dBFS) after at least 200 ms of quiet.
pub fn beep_onsets(chunks: &[(f64, f64)]) -> Vec<f64> {
    let mut out = vec![];
    let mut quiet_since: Option<f64> = None;
    for &(t, rms_db) in chunks {
        if rms_db > -40.0 {
            if quiet_since.is_some_and(|q| t - q >= 0.2) {
                out.push(t);
            }
            quiet_since = None;
        } else if quiet_since.is_none() {
            quiet_since = Some(t);
        }
    }
    out
}

/// Video − audio offset (ms) of every flash that has a beep onset within 0.5 s.
pub fn av_offsets_ms(flashes: &[f64], beeps: &[f64]) -> Vec<f64> {
    flashes
        .iter()
        .filter_map(|f| {
            let b = beeps.iter().min_by(|a, b| (*a - f).abs().total_cmp(&(*b - f).abs()))?;
            ((f - b).abs() < 0.5).then(|| (f - b) * 1000.0)
        })
        .collect()
}

/// What [`check_call_composite`] measured.
#[derive(Debug)]
pub struct CompositeReport {
    pub duration_s: f64,
    pub video_frames: usize,
    /// Frames that differ visibly (a luma difference above 40) from the frame before them.
    pub changed_frames: usize,
    pub loudest_rms_db: f64,
    pub flashes: Vec<f64>,
    pub beeps: Vec<f64>,
    pub offsets_ms: Vec<f64>,
}

/// Checks a call's composite the way a viewer sees it: H.264 + AAC, `expect_s` ± 0.5 s long, a
/// clean decode, moving video (the senders' frame counters change every frame: at least half the
/// frames must differ from the one before), audible audio, and every flash on a beep within `max_offset_ms`, for at least
/// `expect_s` − 2 flash/beep pairs.
pub fn check_call_composite(path: &Path, expect_s: f64, max_offset_ms: f64) -> CompositeReport {
    let probe = ffprobe(path);
    let streams = probe["streams"].as_array().expect("ffprobe lists streams");
    let codec_of = |kind: &str| -> Vec<String> {
        streams
            .iter()
            .filter(|s| s["codec_type"] == kind)
            .map(|s| s["codec_name"].as_str().unwrap_or("?").to_owned())
            .collect()
    };
    assert_eq!(codec_of("video"), ["h264"], "composite video streams, in {probe}");
    assert_eq!(codec_of("audio"), ["aac"], "composite audio streams, in {probe}");
    let duration_s: f64 =
        probe["format"]["duration"].as_str().and_then(|d| d.parse().ok()).expect("composite duration");
    let errors = decode_errors(path);
    assert!(errors.trim().is_empty(), "the composite does not decode cleanly: {errors}");

    let frames = luma_per_frame(&[path]);
    let chunks = audio_rms_per_ms(&[path]);
    let flashes = flash_times(&frames);
    let beeps = beep_onsets(&chunks);
    let offsets_ms = av_offsets_ms(&flashes, &beeps);
    let changed_frames = frame_changes(path).iter().filter(|c| c.1 > 40.0).count();
    let loudest_rms_db = chunks.iter().map(|c| c.1).fold(f64::NEG_INFINITY, f64::max);
    let report = CompositeReport {
        duration_s,
        video_frames: frames.len(),
        changed_frames,
        loudest_rms_db,
        flashes,
        beeps,
        offsets_ms,
    };
    eprintln!(
        "composite {}: {:.3} s, {} video frames ({} differ from the one before), loudest 1 ms {:.1} dBFS\n  \
         flashes at {:.3?}\n  beep onsets at {:.3?}\n  A/V offsets (video − audio) ms: {:.1?}",
        path.display(),
        report.duration_s,
        report.video_frames,
        report.changed_frames,
        report.loudest_rms_db,
        report.flashes,
        report.beeps,
        report.offsets_ms
    );
    assert!((duration_s - expect_s).abs() <= 0.5, "the composite lasts {duration_s:.3} s, not {expect_s} ± 0.5 s");
    assert!(report.video_frames >= 10, "the composite has {} video frames", report.video_frames);
    assert!(
        report.changed_frames * 2 >= report.video_frames,
        "the composite's video is (nearly) frozen: {} of {} frames differ from the one before",
        report.changed_frames,
        report.video_frames
    );
    assert!(
        report.loudest_rms_db > -30.0,
        "the composite's audio is silent (loudest 1 ms: {:.1} dBFS)",
        report.loudest_rms_db
    );
    let min_pairs = (expect_s - 2.0).max(1.0) as usize;
    assert!(
        report.offsets_ms.len() >= min_pairs,
        "at least {min_pairs} flash/beep pairs in the composite ({} flashes, {} beeps, {} pairs)",
        report.flashes.len(),
        report.beeps.len(),
        report.offsets_ms.len()
    );
    let worst = report.offsets_ms.iter().fold(0.0f64, |m, o| m.max(o.abs()));
    assert!(
        worst <= max_offset_ms,
        "flash and beep within {max_offset_ms} ms in the composite: {:.1?}",
        report.offsets_ms
    );
    report
}

// ---------------------------------------------------------------------------------------------
// Matrix: the Synapse of `deploy/dev/synapse.sh`, its users, and `mxrec run` as the bot.

/// The homeserver's coordinates, from `deploy/dev/synapse.sh env`.
pub struct Synapse {
    pub homeserver: String,
    pub secret: String,
}

pub fn synapse() -> Option<Synapse> {
    Some(Synapse {
        homeserver: std::env::var("MXREC_TEST_HOMESERVER").ok()?.trim_end_matches('/').to_owned(),
        secret: std::env::var("MXREC_TEST_SYNAPSE_SECRET").ok()?,
    })
}

/// A suffix that makes user names and key prefixes unique per test run.
pub fn unique_suffix() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("{:x}{:x}", std::process::id(), nanos % (1 << 40))
}

/// Registers a new (non-admin) user through Synapse's shared-secret admin API and returns its
/// full user id. No device is created (`inhibit_login`): each client logs in itself.
/// The HMAC-SHA1 is computed by the system python3, which the servers need anyway.
pub fn register_user(hs: &Synapse, localpart: &str, password: &str) -> String {
    const SCRIPT: &str = r#"
import hashlib, hmac, json, os, sys, urllib.error, urllib.request
url = os.environ["HS"] + "/_synapse/admin/v1/register"
user, pw, secret = os.environ["U"], os.environ["P"], os.environ["SECRET"]
try:
    with urllib.request.urlopen(url, timeout=30) as r:
        nonce = json.load(r)["nonce"]
    mac = hmac.new(secret.encode(), b"\0".join([nonce.encode(), user.encode(), pw.encode(), b"notadmin"]),
                   hashlib.sha1).hexdigest()
    body = json.dumps({"nonce": nonce, "username": user, "password": pw, "mac": mac, "admin": False,
                       "inhibit_login": True}).encode()
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        print(json.load(r)["user_id"])
except urllib.error.HTTPError as e:
    sys.exit(f"registering {user}: HTTP {e.code} {e.read().decode(errors='replace')}")
"#;
    let out = Command::new("python3")
        .args(["-c", SCRIPT])
        .env("HS", &hs.homeserver)
        .env("U", localpart)
        .env("P", password)
        .env("SECRET", &hs.secret)
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "registering {localpart} on {} failed: {}",
        hs.homeserver,
        String::from_utf8_lossy(&out.stderr)
    );
    let user_id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(user_id.starts_with('@'), "registration printed no user id: {user_id:?}");
    user_id
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// What `mxrec run` needs to be a bot recording into S3, with a SQLite catalog in `data_dir`.
pub struct BotSetup<'a> {
    pub data_dir: &'a Path,
    pub homeserver: &'a str,
    pub user: &'a str,
    pub password: &'a str,
    pub allowed_inviters: &'a [&'a str],
    pub http_port: u16,
    pub s3: &'a S3,
    /// Key prefix in the bucket, so runs never see each other's objects.
    pub prefix: &'a str,
}

impl BotSetup<'_> {
    pub fn http_base(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    /// The config file of docs (contract): every section not named here keeps its defaults; S3
    /// credentials come from `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`.
    pub fn write(&self, path: &Path) {
        let inviters: Vec<String> = self.allowed_inviters.iter().map(|u| format!("{u:?}")).collect();
        std::fs::write(
            path,
            format!(
                r#"data_dir = "{data}"
[matrix]
homeserver = "{hs}"
user = "{user}"
password = "{password}"
device_name = "mxrec recorder"
allowed_inviters = [{inviters}]
[webrtc]
bind_addrs = ["127.0.0.1:0"]
[http]
bind = "127.0.0.1:{port}"
public_url = "{base}"
[storage]
{storage}"#,
                data = self.data_dir.display(),
                hs = self.homeserver,
                user = self.user,
                password = self.password,
                inviters = inviters.join(", "),
                port = self.http_port,
                base = self.http_base(),
                storage = self.s3.storage_toml(self.prefix),
            ),
        )
        .unwrap();
    }
}

/// A running `mxrec --config F run`: stdout lines are collected, stderr goes to a file. Dropping
/// it sends SIGTERM and waits (SIGKILL after 30 s); if the thread is panicking, the tail of the
/// log is printed first.
pub struct MxrecRun {
    child: std::process::Child,
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
    pub stdout_seen: Vec<String>,
    pub stderr_path: PathBuf,
}

impl MxrecRun {
    /// Starts `mxrec run` in `cwd`. `RUST_LOG` is `MXREC_TEST_RUST_LOG` or info for mxrec and
    /// warnings for matrix-sdk (errors only for its crypto crate, which warns about the missing
    /// key backup at every room key).
    pub fn start(cwd: &Path, config: &Path) -> Self {
        Self::start_command(cwd, config, "run")
    }

    /// Starts `mxrec <command>` (`run`, `serve`) in `cwd`, as [`MxrecRun::start`] does.
    pub fn start_command(cwd: &Path, config: &Path, command: &str) -> Self {
        use std::io::BufRead;
        use std::process::Stdio;
        let stderr_path = cwd.join("mxrec.stderr.log");
        // Appended to: a restart in the same directory keeps the log of the run before.
        let stderr = std::fs::OpenOptions::new().create(true).append(true).open(&stderr_path).unwrap();
        let log = std::env::var("MXREC_TEST_RUST_LOG").unwrap_or_else(|_| {
            "info,matrix_sdk=warn,matrix_sdk_base=warn,matrix_sdk_crypto=error,matrix_sdk_sqlite=warn,\
             webrtc=warn,rtc=warn,sqlx=warn"
                .into()
        });
        let mut child = Command::new(mxrec_bin())
            .current_dir(cwd)
            .arg("--config")
            .arg(config)
            .arg(command)
            .env("RUST_LOG", log)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("mxrec starts");
        let (tx, lines) = tokio::sync::mpsc::unbounded_channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        MxrecRun { child, lines, stdout_seen: vec![], stderr_path }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the stdout line starting with `prefix` (e.g. `"bot:"`) and returns the rest,
    /// trimmed. Panics with the log's tail when mxrec exits or `timeout` passes first.
    pub async fn wait_line(&mut self, prefix: &str, timeout: std::time::Duration) -> String {
        if let Some(l) = self.stdout_seen.iter().find_map(|l| l.strip_prefix(prefix)) {
            return l.trim().to_owned();
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(line)) => {
                    eprintln!("mxrec stdout: {line}");
                    self.stdout_seen.push(line.clone());
                    if let Some(rest) = line.strip_prefix(prefix) {
                        return rest.trim().to_owned();
                    }
                }
                Ok(None) => {
                    let status = self.child.wait().ok();
                    panic!("mxrec exited ({status:?}) before printing `{prefix}`; its log:\n{}", self.stderr_tail(60))
                }
                Err(_) => {
                    panic!("mxrec printed no `{prefix}` line within {timeout:?}; its log:\n{}", self.stderr_tail(60))
                }
            }
        }
    }

    /// Panics with the log's tail unless the process is still running.
    pub fn assert_running(&mut self, after: &str) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("mxrec exited ({status}) after {after}; its log:\n{}", self.stderr_tail(80));
        }
    }

    /// The last `n` lines of mxrec's stderr.
    pub fn stderr_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.stderr_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(n)..].join("\n");
        format!("--- last {} lines of {} ---\n{tail}\n---", n.min(lines.len()), self.stderr_path.display())
    }

    /// Lines of mxrec's stderr that contain `needle`.
    pub fn log_lines_with(&self, needle: &str) -> Vec<String> {
        let text = std::fs::read_to_string(&self.stderr_path).unwrap_or_default();
        text.lines().filter(|l| l.contains(needle)).map(str::to_owned).collect()
    }

    /// SIGTERM, then waits up to `grace` (SIGKILL after it). Returns the exit status.
    pub fn stop(&mut self, grace: std::time::Duration) -> std::process::ExitStatus {
        if let Some(status) = self.child.try_wait().unwrap() {
            return status;
        }
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let deadline = std::time::Instant::now() + grace;
        while std::time::Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let _ = writeln_stderr(&format!("mxrec (pid {}) ignored SIGTERM for {grace:?}: SIGKILL", self.child.id()));
        let _ = self.child.kill();
        self.child.wait().unwrap()
    }
}

impl MxrecRun {
    /// SIGKILL, as a crash or an OOM kill would end it: no cleanup runs. Returns the status.
    pub fn kill(&mut self) -> std::process::ExitStatus {
        let _ = self.child.kill();
        self.child.wait().unwrap()
    }
}

impl Drop for MxrecRun {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = writeln_stderr(&self.stderr_tail(120));
        }
        self.stop(std::time::Duration::from_secs(30));
    }
}

fn writeln_stderr(s: &str) -> std::io::Result<()> {
    use std::io::Write;
    writeln!(std::io::stderr(), "{s}")
}

/// A share link of the bot's links notice: `Track <id> (<format>, <size>): <url>`, where the
/// format names the codec, maybe after the container (`WebM VP8`).
#[derive(Debug, Clone)]
pub struct TrackLink {
    pub track_id: String,
    pub format: String,
    pub url: String,
}

impl TrackLink {
    /// Whether the format names `codec` (an FFmpeg or manifest codec name), ignoring case.
    pub fn names_codec(&self, codec: &str) -> bool {
        self.format.split_whitespace().any(|w| w.eq_ignore_ascii_case(codec))
    }
}

/// The bot's notice after a recording (contract): a `Recording saved:` line, a `Composite …: URL`
/// line, one `Track …: URL` line per track, and `… Recording <id>.` at the end.
#[derive(Debug, Clone)]
pub struct LinksNotice {
    pub summary: String,
    pub composite_url: String,
    pub tracks: Vec<TrackLink>,
    pub recording_id: String,
}

/// `https?://…/r/<43 url-safe base64 chars>`, the shape of every share link.
pub fn is_share_link(url: &str) -> bool {
    let Some((base, token)) = url.rsplit_once("/r/") else { return false };
    (base.starts_with("http://") || base.starts_with("https://"))
        && !base.contains(' ')
        && token.len() == 43
        && token.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl LinksNotice {
    /// Parses the notice's plain body; panics naming what is missing.
    pub fn parse(body: &str) -> Self {
        let lines: Vec<&str> = body.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
        let summary = lines.first().copied().unwrap_or_default().to_owned();
        assert!(
            summary.starts_with("Recording saved:"),
            "links notice does not start with `Recording saved:`:\n{body}"
        );
        let url_of = |line: &str| -> String {
            let url = line.rsplit_once(": ").map(|(_, u)| u.trim()).unwrap_or_default();
            assert!(is_share_link(url), "not a share link in {line:?}:\n{body}");
            url.to_owned()
        };
        let composite: Vec<String> = lines.iter().filter(|l| l.starts_with("Composite")).map(|l| url_of(l)).collect();
        assert_eq!(composite.len(), 1, "one Composite line in the links notice:\n{body}");
        let tracks = lines
            .iter()
            .filter_map(|l| l.strip_prefix("Track "))
            .map(|rest| {
                let (id, after) = rest.split_once(" (").unwrap_or_else(|| panic!("Track line without `(`: {rest:?}"));
                let format = after.split([',', ')']).next().unwrap().trim().to_owned();
                TrackLink { track_id: id.trim().to_owned(), format, url: url_of(rest) }
            })
            .collect();
        let recording_id = lines
            .iter()
            .find_map(|l| l.split_once("Recording ").filter(|_| !l.starts_with("Recording saved:")).map(|(_, r)| r))
            .map(|r| r.trim().trim_end_matches('.').to_owned())
            .unwrap_or_else(|| panic!("no `Recording <id>.` in the links notice:\n{body}"));
        LinksNotice { summary, composite_url: composite[0].clone(), tracks, recording_id }
    }
}

/// GETs a share link, following the redirect to the store's presigned URL; returns the body and
/// the URL it finally came from.
pub async fn fetch_link(http: &reqwest::Client, url: &str) -> (Vec<u8>, String) {
    let r = http.get(url).send().await.unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = r.status();
    let final_url = r.url().to_string();
    let body = r.bytes().await.unwrap_or_else(|e| panic!("GET {url} (→ {final_url}): body: {e}"));
    assert!(
        status.is_success(),
        "GET {url} (→ {final_url}): HTTP {status}: {}",
        String::from_utf8_lossy(&body[..body.len().min(500)])
    );
    assert!(!body.is_empty(), "GET {url} (→ {final_url}) returned nothing");
    (body.to_vec(), final_url)
}

/// The object key (below `prefix`) a presigned path-style S3 URL of `s3` points at, if it does.
pub fn presigned_key(s3: &S3, prefix: &str, url: &str) -> Option<String> {
    let rest = url.strip_prefix(s3.endpoint.trim_end_matches('/'))?;
    let path = rest.split('?').next()?;
    let key = path.strip_prefix(&format!("/{}/", s3.bucket))?;
    let key = if prefix.is_empty() { key } else { key.strip_prefix(&format!("{}/", prefix.trim_matches('/')))? };
    Some(key.to_owned())
}

/// The store the bot writes to (same S3 env, same prefix).
pub fn s3_store(s3: &S3, prefix: &str) -> std::sync::Arc<dyn object_store::ObjectStore> {
    storage::build_store(&s3.store_config(prefix)).unwrap()
}

/// A recording's manifest from the bucket, waiting up to 15 s for the upload to become visible.
pub async fn load_manifest(s3: &S3, prefix: &str, room_id: &str, recording_id: &str) -> storage::Manifest {
    let store = s3_store(s3, prefix);
    let key =
        storage::ObjectKeys::new(&storage::RoomId::new(room_id), &storage::RecordingId::new(recording_id)).manifest();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        match storage::Manifest::load_object(store.as_ref(), &key).await {
            Ok(m) => return m,
            Err(e) if tokio::time::Instant::now() < deadline => {
                eprintln!("manifest {key} not readable yet: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
            Err(e) => {
                use futures::TryStreamExt;
                let listed: Vec<String> =
                    store.list(None).map_ok(|o| o.location.to_string()).try_collect().await.unwrap_or_default();
                panic!("manifest {key} (prefix {prefix}): {e}; the bucket holds under the prefix: {listed:#?}")
            }
        }
    }
}

/// Everything after the links notice of a recorded 1:1 call, checked as a user and an auditor
/// would: the composite link serves an MP4 that [`check_call_composite`] accepts; every track
/// link serves a file that decodes; the manifest (from the bucket, where the bot's
/// `storage::ObjectKeys` put it) has `caller` as a participant, an audio and a video track;
/// every segment in the bucket has the manifest's size and SHA-256; the composite the link served
/// is the manifest's output byte for byte, and a track link that serves a stored object serves it
/// byte for byte.
pub async fn verify_call_recording(
    dir: &Path,
    s3: &S3,
    prefix: &str,
    room_id: &str,
    caller: &str,
    notice: &LinksNotice,
    expect_s: f64,
    max_offset_ms: f64,
) -> storage::Manifest {
    use object_store::ObjectStoreExt;
    let http = reqwest::Client::new();
    let (composite, _) = fetch_link(&http, &notice.composite_url).await;
    let composite_path = dir.join("composite.mp4");
    std::fs::write(&composite_path, &composite).unwrap();
    check_call_composite(&composite_path, expect_s, max_offset_ms);

    let mut track_files = vec![];
    for (i, t) in notice.tracks.iter().enumerate() {
        let (bytes, from) = fetch_link(&http, &t.url).await;
        let path = dir.join(format!("track-{i}.bin"));
        std::fs::write(&path, &bytes).unwrap();
        let probe = ffprobe(&path);
        let codecs: Vec<&str> =
            probe["streams"].as_array().unwrap().iter().filter_map(|s| s["codec_name"].as_str()).collect();
        assert!(codecs.iter().any(|c| t.names_codec(c)), "track link {} ({}) serves {codecs:?}", t.track_id, t.format);
        let errors = decode_errors(&path);
        assert!(errors.trim().is_empty(), "track {} does not decode cleanly: {errors}", t.track_id);
        eprintln!(
            "track link {} ({}): {} bytes, {} s",
            t.track_id,
            t.format,
            bytes.len(),
            probe["format"]["duration"].as_str().unwrap_or("?")
        );
        track_files.push((t, sha256_hex(&bytes), presigned_key(s3, prefix, &from)));
    }

    // The manifest; the notice may be posted a moment before the upload is visible.
    let store = s3_store(s3, prefix);
    let manifest = load_manifest(s3, prefix, room_id, &notice.recording_id).await;
    assert_eq!(manifest.recording_id, notice.recording_id);
    assert_eq!(manifest.room.id, room_id);
    assert!(
        manifest.participants.iter().any(|p| p.user_id == caller),
        "the caller {caller} is a participant: {:?}",
        manifest.participants.iter().map(|p| &p.user_id).collect::<Vec<_>>()
    );
    let kinds: std::collections::BTreeSet<&str> = manifest.tracks.iter().map(|t| t.kind.as_str()).collect();
    assert_eq!(kinds, ["audio", "video"].into_iter().collect(), "track kinds in the manifest");

    let mut stored_shas = std::collections::BTreeMap::new();
    for t in &manifest.tracks {
        assert!(!t.segments.is_empty(), "track {} has no segment", t.id);
        for s in &t.segments {
            let path = object_store::path::Path::parse(&s.key).unwrap();
            let bytes =
                store.get(&path).await.unwrap_or_else(|e| panic!("segment {}: {e}", s.key)).bytes().await.unwrap();
            assert_eq!(bytes.len() as u64, s.bytes, "size of segment {}", s.key);
            assert_eq!(sha256_hex(&bytes), s.sha256, "SHA-256 of segment {}", s.key);
            stored_shas.insert(s.sha256.clone(), s.key.clone());
        }
        eprintln!("track {} ({} {}): {} segments verified", t.id, t.kind.as_str(), t.codec, t.segments.len());
    }
    let mp4: Vec<_> = manifest.outputs.iter().filter(|o| o.kind == storage::manifest::OutputKind::Mp4).collect();
    assert_eq!(mp4.len(), 1, "one mp4 output in the manifest");
    let out = mp4[0];
    let stored = store.get(&object_store::path::Path::parse(&out.key).unwrap()).await.unwrap().bytes().await.unwrap();
    assert_eq!(sha256_hex(&stored), out.sha256, "SHA-256 of the stored composite {}", out.key);
    assert_eq!(sha256_hex(&composite), out.sha256, "the composite link serves the manifest's output {}", out.key);
    for o in &manifest.outputs {
        stored_shas.insert(o.sha256.clone(), o.key.clone());
    }

    // Each track link serves an object of the bucket byte for byte (seen through the presigned URL
    // it redirects to); if the manifest lists that object, with the manifest's SHA-256.
    for (t, sha, key) in &track_files {
        let m = manifest.tracks.iter().find(|m| m.id == t.track_id);
        let m = m.unwrap_or_else(|| {
            panic!(
                "track link {} is not a manifest track: {:?}",
                t.track_id,
                manifest.tracks.iter().map(|t| &t.id).collect::<Vec<_>>()
            )
        });
        assert!(t.names_codec(&m.codec), "track {}: the link says {}, the manifest {}", t.track_id, t.format, m.codec);
        match key {
            Some(key) => {
                let path = object_store::path::Path::parse(key).unwrap();
                let stored =
                    store.get(&path).await.unwrap_or_else(|e| panic!("track file {key}: {e}")).bytes().await.unwrap();
                assert_eq!(&sha256_hex(&stored), sha, "track link {} serves the stored {key}", t.track_id);
                match stored_shas.get(sha) {
                    Some(listed) => {
                        eprintln!("track link {} serves {key}, listed in the manifest as {listed}", t.track_id)
                    }
                    None => eprintln!("track link {} serves {key} (not a manifest object)", t.track_id),
                }
            }
            None => assert!(
                stored_shas.contains_key(sha),
                "track link {} was not served from the bucket, and is no manifest object",
                t.track_id
            ),
        }
    }
    assert_eq!(notice.tracks.len(), manifest.tracks.len(), "one Track link per manifest track");
    manifest
}
