//! End to end through real servers: `mxrec import` records two participants (VP8+Opus in WebM,
//! H.264+Opus in MP4, the second joining 2 s late) into Garage (S3) with the catalog in
//! PostgreSQL; the test then reads everything back the way a user or an auditor would: the
//! manifest from the bucket, every segment and the composite checked against its SHA-256, the
//! catalog's rows, and a re-render with `mxrec export`. Bad input must fail clearly and store
//! nothing.

mod harness;

use std::path::Path;

use harness::*;
use object_store::path::Path as ObjectPath;
use object_store::ObjectStoreExt;
use storage::{Catalog, Manifest, RecordingId, RecordingState};

fn write_config(dir: &Path, s3: &S3, pg: &str, prefix: &str) -> std::path::PathBuf {
    let cfg = dir.join("mxrec.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"data_dir = "{data}"
[composite]
width = 640
height = 360
fps = 15
[storage]
{storage}[catalog]
url = "{pg}"
"#,
            data = dir.join("data").display(),
            storage = s3.storage_toml(prefix),
        ),
    )
    .unwrap();
    cfg
}

#[test]
fn import_stores_verified_tracks_composite_and_catalog_in_s3_and_postgres() {
    let (Some(s3), Some(pg)) = (s3(), postgres_url()) else {
        return skip("import_pipeline", "MXREC_S3_ENDPOINT or MXREC_TEST_POSTGRES_URL is not set");
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let alice = d.join("alice.webm");
    let bob = d.join("bob.mp4");
    ffmpeg(&[
        "-f", "lavfi", "-i", "testsrc2=size=320x240:rate=15:duration=6",
        "-f", "lavfi", "-i", "sine=frequency=880:sample_rate=48000:duration=6",
        "-c:v", "libvpx", "-deadline", "realtime", "-cpu-used", "8", "-g", "15",
        "-c:a", "libopus", alice.to_str().unwrap(),
    ]);
    ffmpeg(&[
        "-f", "lavfi", "-i", "smptebars=size=320x240:rate=15:duration=3",
        "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000:duration=3",
        "-c:v", "libx264", "-preset", "ultrafast", "-g", "15", "-pix_fmt", "yuv420p",
        "-c:a", "libopus", "-strict", "-2", bob.to_str().unwrap(),
    ]);
    let prefix = format!("e2e-{}", RecordingId::generate());
    let cfg = write_config(d, &s3, &pg, &prefix);

    let check = mxrec(d, &cfg, &["check-config"]);
    assert!(check.status.success(), "check-config: {}", String::from_utf8_lossy(&check.stderr));

    let out = mxrec(
        d,
        &cfg,
        &[
            "import", "--room", "!e2e:example.org",
            "-p", &format!("@alice:example.org#Alice={}", alice.display()),
            "-p", &format!("@bob:example.org#Bob={}@2", bob.display()),
        ],
    );
    assert!(out.status.success(), "import failed: {}", String::from_utf8_lossy(&out.stderr));
    let recording = RecordingId::new(stdout_value(&out, "recording").expect("recording id printed"));

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = harness::s3_store(&s3, &prefix);
        let catalog = Catalog::connect(&pg).await.unwrap();
        let rec = catalog.get_recording(&recording).await.unwrap().expect("recording in the catalog");
        assert_eq!(rec.state, RecordingState::Uploaded);
        let call = catalog.get_call(&rec.call_id).await.unwrap().expect("call in the catalog");
        assert!(call.ended_at_ms.is_some(), "the call's end is recorded");
        let people = catalog.participants(&recording).await.unwrap();
        assert_eq!(people.len(), 2);
        assert!(people.iter().all(|p| p.left_at_ms.is_some()), "everyone's leave is recorded: {people:?}");
        let manifest_key = ObjectPath::parse(rec.manifest_key.as_deref().expect("manifest key")).unwrap();
        let manifest = Manifest::load_object(store.as_ref(), &manifest_key).await.unwrap();

        // Who was there, and when.
        assert_eq!(manifest.participants.len(), 2);
        let bob = manifest.participants.iter().find(|p| p.user_id == "@bob:example.org").unwrap();
        assert_eq!(bob.present[0].start_us, 2_000_000);
        // Bob's file ends at 5 s on the call clock: he leaves within a frame of it.
        let left = bob.present[0].end_us.expect("Bob left");
        assert!((left - 5_000_000).abs() <= 70_000, "Bob left at {left} µs");
        assert_eq!(bob.display_name.as_deref(), Some("Bob"));

        // Four tracks, each segment in the bucket with the manifest's SHA-256, covering the media.
        assert_eq!(manifest.tracks.len(), 4, "{:?}", manifest.tracks.iter().map(|t| &t.id).collect::<Vec<_>>());
        let codecs: std::collections::BTreeSet<_> = manifest.tracks.iter().map(|t| t.codec.as_str()).collect();
        assert_eq!(codecs, ["h264", "opus", "vp8"].into_iter().collect());
        let seg_dir = d.join("segments");
        std::fs::create_dir_all(&seg_dir).unwrap();
        for t in &manifest.tracks {
            assert!(!t.segments.is_empty(), "track {} has no segment", t.id);
            let first = t.segments.first().unwrap().start_us;
            let last = t.segments.last().unwrap().end_us;
            let (want_start, want_len) = if t.participant.contains("bob") { (2_000_000, 3_000_000) } else { (0, 6_000_000) };
            assert!((first - want_start).abs() <= 70_000, "track {} starts at {first}", t.id);
            assert!(((last - first) - want_len).abs() <= 140_000, "track {} spans {}", t.id, last - first);
            let rows = catalog.segments(&recording, &storage::TrackId::new(t.id.as_str())).await.unwrap();
            assert_eq!(rows.len(), t.segments.len(), "catalog segments of {}", t.id);
            for s in &t.segments {
                let bytes = store.get(&ObjectPath::parse(&s.key).unwrap()).await.unwrap().bytes().await.unwrap();
                assert_eq!(bytes.len() as u64, s.bytes);
                assert_eq!(sha256_hex(&bytes), s.sha256, "segment {}", s.key);
                // Each segment decodes on its own.
                let f = seg_dir.join(format!("{}-{}.{}", t.id, s.index, if t.codec == "h264" { "mkv" } else { "webm" }));
                std::fs::write(&f, &bytes).unwrap();
                let errs = decode_errors(&f);
                assert!(errs.trim().is_empty(), "segment {} does not decode cleanly: {errs}", s.key);
            }
        }

        // The composite is in the bucket with its SHA-256.
        assert_eq!(manifest.outputs.len(), 1);
        let output = &manifest.outputs[0];
        let bytes = store.get(&ObjectPath::parse(&output.key).unwrap()).await.unwrap().bytes().await.unwrap();
        assert_eq!(sha256_hex(&bytes), output.sha256);
        let composite = d.join("composite.mp4");
        std::fs::write(&composite, &bytes).unwrap();
        let probe = ffprobe(&composite);
        let codecs: Vec<&str> =
            probe["streams"].as_array().unwrap().iter().map(|s| s["codec_name"].as_str().unwrap()).collect();
        assert_eq!(codecs, ["h264", "aac"]);
        let dur: f64 = probe["format"]["duration"].as_str().unwrap().parse().unwrap();
        assert!((dur - 6.0).abs() < 0.2, "composite lasts {dur} s");

        // Every upload verified in the catalog; the spool holds no file any more.
        let audit = catalog.audit_events(&recording).await.unwrap();
        assert!(audit.iter().any(|a| a.action == "recording.uploaded"), "{audit:?}");
        // (The spool's lock file stays: it is how one process owns the spool.)
        let left: Vec<_> =
            files_under(&d.join("data/spool")).into_iter().filter(|p| !p.ends_with(".lock")).collect();
        assert!(left.is_empty(), "spool not emptied: {left:?}");

        // Re-render from the bucket alone.
        let again = d.join("again/export.mp4");
        let out = mxrec(d, &cfg, &["export", "--manifest", manifest_key.as_ref(), "--out", again.to_str().unwrap()]);
        assert!(out.status.success(), "export failed: {}", String::from_utf8_lossy(&out.stderr));
        let dur2: f64 = ffprobe(&again)["format"]["duration"].as_str().unwrap().parse().unwrap();
        assert!((dur2 - dur).abs() < 0.05, "export lasts {dur2} s, composite {dur} s");
    });
}

#[test]
fn bad_input_and_bad_config_are_refused_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cfg = d.join("bad.toml");
    std::fs::write(&cfg, "[composite]\nwidth = 1279\nfsp = 30\n").unwrap();
    let out = mxrec(d, &cfg, &["check-config"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("fsp"), "unknown key not named: {err}");

    std::fs::write(&cfg, "[composite]\nwidth = 1279\n").unwrap();
    let out = mxrec(d, &cfg, &["check-config"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("composite.width"));

    // A call carries no MP3: refused before anything is recorded.
    std::fs::write(&cfg, format!("data_dir = \"{}\"\n", d.join("data").display())).unwrap();
    let mp3 = d.join("x.mp3");
    ffmpeg(&["-f", "lavfi", "-i", "sine=duration=1", mp3.to_str().unwrap()]);
    let out = mxrec(d, &cfg, &["import", "--room", "r", "-p", &format!("a={}", mp3.display())]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("mp3") && err.contains("Opus, VP8"), "unclear error: {err}");
    // Nothing half-recorded stays behind in the local store.
    assert!(files_under(&d.join("data/recordings")).is_empty());
}
