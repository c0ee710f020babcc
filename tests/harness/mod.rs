//! Shared harness of the end-to-end tests: the real servers' coordinates (started by
//! `deploy/dev/test.sh`), fixture media made by FFmpeg at test time, and running `mxrec`.
//!
//! Tests that need a server they were not given say so loudly and return; `make test` always
//! provides them, so in CI nothing is skipped.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The S3 server's coordinates, from `deploy/dev/garage.sh env`.
pub struct S3 {
    pub endpoint: String,
    pub bucket: String,
    pub region: String,
}

pub fn s3() -> Option<S3> {
    Some(S3 {
        endpoint: std::env::var("MXREC_S3_ENDPOINT").ok()?,
        bucket: std::env::var("MXREC_S3_BUCKET").ok()?,
        region: std::env::var("MXREC_S3_REGION").unwrap_or_else(|_| "garage".into()),
    })
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
    let out = Command::new("ffmpeg")
        .args(["-v", "error", "-i"])
        .arg(path)
        .args(["-f", "null", "-"])
        .output()
        .expect("ffmpeg runs");
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
