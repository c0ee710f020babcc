//! Shared test helpers: fixture media made by the ffmpeg CLI at test time, packet extraction
//! with ffmpeg-next, and checks run through ffprobe.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use ffmpeg_next as ff;
use transcoder::{EncodedFrame, SegmentInfo, TrackWriter};

pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `ffmpeg -y -v error <args>`.
pub fn ffmpeg(args: &[&str]) {
    let mut all = vec!["-y", "-v", "error", "-nostdin"];
    all.extend_from_slice(args);
    run("ffmpeg", &all);
}

#[derive(Clone)]
pub struct Packet {
    pub data: Vec<u8>,
    pub pts_us: i64,
    pub duration_us: i64,
    pub key: bool,
}

/// Packets of the first stream of `path`, with pts relative to the first packet.
pub fn packets(path: &Path) -> Vec<Packet> {
    ff::init().unwrap();
    let mut ictx = ff::format::input(path).unwrap();
    let tb = ictx.stream(0).unwrap().time_base();
    let mut out = Vec::new();
    let mut first = None;
    for (st, pkt) in ictx.packets() {
        if st.index() != 0 {
            continue;
        }
        let ts = pkt.pts().or(pkt.dts()).expect("fixture packet without pts");
        let us = ts * 1_000_000 * tb.numerator() as i64 / tb.denominator() as i64;
        let first = *first.get_or_insert(us);
        out.push(Packet {
            data: pkt.data().unwrap().to_vec(),
            pts_us: us - first,
            duration_us: pkt.duration() * 1_000_000 * tb.numerator() as i64
                / tb.denominator() as i64,
            key: pkt.is_key(),
        });
    }
    out.sort_by_key(|p| p.pts_us);
    out
}

pub fn frame(p: &Packet, offset_us: i64) -> EncodedFrame {
    EncodedFrame {
        data: p.data.clone().into(),
        pts_us: p.pts_us + offset_us,
        keyframe: p.key,
    }
}

/// Writes all packets, shifted by `offset_us`, and returns every closed segment.
pub fn write_all(writer: TrackWriter, pkts: &[Packet], offset_us: i64) -> Vec<SegmentInfo> {
    let mut writer = writer;
    let mut segs = Vec::new();
    for p in pkts {
        segs.extend(
            writer
                .write(frame(p, offset_us))
                .expect("fixture frame rejected"),
        );
    }
    segs.extend(writer.finish().unwrap());
    segs
}

/// Decodes the whole file with the CLI; returns what it printed at level error (empty = clean).
pub fn decode_errors(path: &Path) -> String {
    let out = Command::new("ffmpeg")
        .args(["-v", "error", "-nostdin", "-i"])
        .arg(path)
        .args(["-f", "null", "-"])
        .output()
        .unwrap();
    let mut s = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        s.push_str(&format!("exit status {}", out.status));
    }
    s
}

pub struct Probe {
    pub start_us: i64,
    /// Absolute end of the last frame (see `probe`).
    pub width: Option<u32>,
    pub height: Option<u32>,
    pub decoded_frames: u64,
    pub codec: String,
    pub first_pts_us: i64,
    pub end_us: i64,
    pub packets: u64,
}

fn json(args: &[&str], path: &Path) -> serde_json::Value {
    let mut a: Vec<&str> = vec!["-v", "error", "-of", "json"];
    a.extend_from_slice(args);
    a.push(path.to_str().unwrap());
    serde_json::from_str(&run("ffprobe", &a)).unwrap()
}

fn us(v: &serde_json::Value) -> i64 {
    (v.as_str().unwrap().parse::<f64>().unwrap() * 1e6).round() as i64
}

/// Probes stream 0 of a segment: container start, dimensions, decoded frame count, and the
/// span its packets cover (first pts to last pts + duration).
pub fn probe(path: &Path) -> Probe {
    let s = json(
        &[
            "-count_frames",
            "-show_entries",
            "stream=codec_name,width,height,nb_read_frames,start_time",
            "-select_streams",
            "0",
        ],
        path,
    );
    let st = &s["streams"][0];
    let p = json(
        &[
            "-show_entries",
            "packet=pts_time,duration_time",
            "-select_streams",
            "0",
        ],
        path,
    );
    let pkts = p["packets"].as_array().unwrap();
    let first = us(&pkts[0]["pts_time"]);
    // Matroska SimpleBlocks carry no duration; the muxer records the end of the last frame
    // in the segment's Duration element, which it counts from timestamp 0.
    let end = us(&json(&["-show_entries", "format=duration"], path)["format"]["duration"]);
    Probe {
        start_us: us(&st["start_time"]),
        width: st["width"].as_u64().map(|v| v as u32),
        height: st["height"].as_u64().map(|v| v as u32),
        decoded_frames: st["nb_read_frames"].as_str().unwrap().parse().unwrap(),
        codec: st["codec_name"].as_str().unwrap().to_string(),
        first_pts_us: first,
        end_us: end,
        packets: pkts.len() as u64,
    }
}

pub fn format_duration_us(path: &Path) -> i64 {
    let v = json(&["-show_entries", "format=duration"], path);
    us(&v["format"]["duration"])
}

/// The `w`x`h` RGB24 picture of the video in `path` at `t_s` seconds.
pub fn rgb_picture_at(path: &Path, t_s: f64, w: u32, h: u32) -> Vec<u8> {
    let out = Command::new("ffmpeg")
        .args(["-v", "error", "-nostdin", "-i"])
        .arg(path)
        .args(["-ss", &format!("{t_s:.3}"), "-frames:v", "1", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(out.stdout.len(), (w * h * 3) as usize);
    out.stdout
}

/// A scratch directory; with MXREC_KEEP_TEST_DIR set it is kept for inspection.
pub fn tmp() -> tempfile::TempDir {
    let mut dir = tempfile::tempdir().unwrap();
    if std::env::var_os("MXREC_KEEP_TEST_DIR").is_some() {
        dir.disable_cleanup(true);
        eprintln!("test dir kept: {}", dir.path().display());
    }
    dir
}

pub fn p(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

/// Encodes the lavfi source `src` (e.g. `testsrc=s=320x240:r=30:d=7`, `sine=f=440:d=7`) with
/// the codec and settings a WebRTC sender would use, into `out`, whose extension picks a
/// container that keeps the packets as the receive path hands them over (`.webm` for VP8 and
/// Opus, `.ts` for H.264 in Annex B, `.ivf` for AV1).
pub fn encode(out: &Path, codec: transcoder::Codec, src: &str) {
    encode_gop(out, codec, src, 30)
}

/// [`encode`] with a keyframe every `gop` frames (video).
pub fn encode_gop(out: &Path, codec: transcoder::Codec, src: &str, gop: u32) {
    use transcoder::Codec;
    let gop = gop.to_string();
    let gop = gop.as_str();
    let rt = [
        "-deadline",
        "realtime",
        "-cpu-used",
        "8",
        "-lag-in-frames",
        "0",
    ];
    let enc: Vec<&str> = match codec {
        Codec::Opus => vec!["-ac", "2", "-c:a", "libopus", "-b:a", "64k"],
        Codec::Vp8 | Codec::Vp9 => {
            let name = if codec == Codec::Vp8 {
                "libvpx"
            } else {
                "libvpx-vp9"
            };
            let mut v = vec!["-c:v", name, "-g", gop, "-b:v", "400k"];
            v.extend_from_slice(&rt);
            v
        }
        Codec::H264 => vec![
            "-c:v",
            "libx264",
            "-pix_fmt",
            "yuv420p",
            "-profile:v",
            "baseline",
            "-bf",
            "0",
            "-g",
            gop,
            "-preset",
            "veryfast",
        ],
        Codec::Av1 => vec![
            "-c:v",
            "libaom-av1",
            "-cpu-used",
            "8",
            "-usage",
            "realtime",
            "-lag-in-frames",
            "0",
            "-g",
            gop,
            "-b:v",
            "200k",
        ],
    };
    let mut args = vec!["-f", "lavfi", "-i", src];
    args.extend(enc);
    args.push(out.to_str().unwrap());
    ffmpeg(&args);
}
