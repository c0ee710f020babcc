//! A writer killed mid-segment, as a real crash: this test binary re-runs itself as a child
//! that writes frames and then aborts; the parent checks what is left on disk.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::*;
use transcoder::{Codec, SegmentInfo, TrackWriter, TrackWriterConfig};

const CHILD_ENV: &str = "MXREC_CRASH_CHILD_DIR";
/// The child aborts after writing the frame at this time, halfway into its third segment.
const ABORT_AT_US: i64 = 5_000_000;

fn child(dir: PathBuf) -> ! {
    let pkts = packets(&dir.join("in.webm"));
    let mut w =
        TrackWriter::new(TrackWriterConfig::new(dir.join("segs"), "cam", Codec::Vp8)).unwrap();
    for p in &pkts {
        for s in w.write(frame(p, 0)).unwrap() {
            // What the uploader would have been handed: the parent compares it with the disk.
            println!("CLOSED {}", serde_json::to_string(&s).unwrap());
        }
        if p.pts_us >= ABORT_AT_US {
            break;
        }
    }
    use std::io::Write;
    std::io::stdout().flush().unwrap();
    std::process::abort();
}

#[test]
fn killed_writer_loses_at_most_the_open_segment() {
    if let Some(dir) = std::env::var_os(CHILD_ENV) {
        child(PathBuf::from(dir));
    }
    let dir = tmp();
    let input = dir.path().join("in.webm");
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "testsrc=s=320x240:r=30:d=7",
        "-c:v",
        "libvpx",
        "-g",
        "30",
        "-deadline",
        "realtime",
        "-cpu-used",
        "8",
        "-b:v",
        "400k",
        input.to_str().unwrap(),
    ]);
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "killed_writer_loses_at_most_the_open_segment",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(CHILD_ENV, dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success(), "the child was supposed to abort");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let reported: Vec<SegmentInfo> = stdout
        .lines()
        .filter_map(|l| l.find("CLOSED ").map(|i| &l[i + 7..]))
        .map(|j| serde_json::from_str(j).unwrap())
        .collect();
    assert_eq!(
        reported.len(),
        2,
        "segments [0,2) and [2,4) closed before the crash: {stdout}"
    );

    let mut finals = Vec::new();
    let mut partials = Vec::new();
    for e in std::fs::read_dir(dir.path().join("segs")).unwrap() {
        let path = e.unwrap().path();
        if path.extension().unwrap() == "partial" {
            partials.push(path);
        } else {
            finals.push(path);
        }
    }
    finals.sort();
    // Every file with a final name is one the writer reported closed, byte for byte.
    assert_eq!(
        finals,
        reported.iter().map(|s| s.path.clone()).collect::<Vec<_>>()
    );
    for s in &reported {
        let bytes = std::fs::read(&s.path).unwrap();
        assert_eq!(bytes.len() as u64, s.bytes);
        use sha2::Digest;
        assert_eq!(hex::encode(sha2::Sha256::digest(&bytes)), s.sha256);
        let errors = decode_errors(&s.path);
        assert!(
            errors.is_empty(),
            "closed segment {} does not play on its own: {errors}",
            s.path.display()
        );
        assert_eq!(probe(&s.path).decoded_frames, s.frames);
    }
    // The loss is the open segment only: what is on disk runs without a gap up to where it began.
    assert_eq!(reported[0].start_us, 0);
    assert_eq!(reported[0].end_us, reported[1].start_us);
    assert_eq!(reported[1].end_us, 4_000_000);
    assert!(ABORT_AT_US - reported[1].end_us < 2_000_000);
    // And that open segment is the one `.partial` file, never mistaken for a closed one.
    assert_eq!(partials.len(), 1, "{partials:?}");
    assert!(partials[0]
        .to_string_lossy()
        .ends_with("cam-00002.webm.partial"));
}
