//! WHIP ingest end to end: `mxrec serve` with `[whip]` on, storing into Garage (S3), and two
//! independent WHIP publishers (aiortc, tests/peers/whip_publisher.py) recorded at the same time.
//! While they send, hostile and wrong requests hit the endpoint (no token, a wrong token, another
//! content type, a body that is no SDP, an oversized offer, a bad stream name, PATCH, an unknown
//! session): each is refused with its status and neither running session is disturbed. Afterwards
//! both recordings are read back as a user would: catalog state, the manifest from the bucket,
//! every segment against its SHA-256, and the composite (H.264 + AAC, moving video, audible audio,
//! every flash on its beep).

mod harness;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use harness::*;
use object_store::ObjectStoreExt;
use storage::{Catalog, RecordingState, RoomId};

const TOKEN: &str = "whip-test-token-0123456789abcdef";
const SECONDS: f64 = 8.0;
/// Flash and beep must coincide this closely in the composite.
const MAX_AV_OFFSET_MS: f64 = 40.0;

fn write_config(dir: &Path, s3: &S3, prefix: &str) -> std::path::PathBuf {
    let cfg = dir.join("mxrec.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"data_dir = "{data}"
[composite]
width = 640
height = 360
fps = 30
[storage]
{storage}[http]
bind = "127.0.0.1:0"
public_url = "http://127.0.0.1"
[webrtc]
bind_addrs = ["127.0.0.1:0"]
max_sdp_bytes = 32768
[whip]
enabled = true
bearer_token = "{TOKEN}"
max_sessions = 4
"#,
            data = dir.join("data").display(),
            storage = s3.storage_toml(prefix),
        ),
    )
    .unwrap();
    cfg
}

fn publisher(url: &str, seconds: f64) -> tokio::process::Child {
    let script = repo_root().join("tests/peers/whip_publisher.py");
    tokio::process::Command::new(python())
        .arg(&script)
        .args(["--url", url, "--token", TOKEN, "--seconds", &seconds.to_string()])
        .current_dir(repo_root().join("tests/peers"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("the WHIP publisher starts")
}

async fn publisher_report(child: tokio::process::Child, name: &str) -> serde_json::Value {
    let out = tokio::time::timeout(Duration::from_secs(90), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("publisher {name} did not finish within 90 s"))
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("publisher {name}: {text}");
    let report: serde_json::Value = text
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("publisher {name} printed no report (exit {:?})", out.status.code()));
    assert!(out.status.success(), "publisher {name} failed: {report}");
    report
}

/// Waits until the catalog has an uploaded recording of `room` and returns its id.
async fn uploaded_recording(catalog: &Catalog, room: &str, mxrec: &mut MxrecRun) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let rows = catalog.recent_recordings(&RoomId::new(room), 5).await.unwrap();
        if let Some(r) = rows.iter().find(|r| r.state == RecordingState::Uploaded) {
            assert_eq!(rows.len(), 1, "one recording of {room}: {rows:?}");
            return r.id.to_string();
        }
        mxrec.assert_running(&format!("waiting for the recording of {room}"));
        assert!(
            tokio::time::Instant::now() < deadline,
            "no uploaded recording of {room} within 120 s: {:?}\n{}",
            rows.iter().map(|r| (r.id.to_string(), r.state.as_str())).collect::<Vec<_>>(),
            mxrec.stderr_tail(60)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whip_publishers_are_recorded_and_bad_requests_refused() {
    let Some(s3) = s3() else {
        skip("whip_publishers_are_recorded_and_bad_requests_refused", "no S3 server (MXREC_TEST_S3_*)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let prefix = format!("whip-{}", unique_suffix());
    let cfg = write_config(dir.path(), &s3, &prefix);
    let mut mxrec = MxrecRun::start_command(dir.path(), &cfg, "serve");
    let base = mxrec.wait_line("listening:", Duration::from_secs(60)).await;
    let http = reqwest::Client::new();

    // Two publishers at once, started a second apart.
    let studio = publisher(&format!("{base}/whip/studio-1"), SECONDS);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let guest = publisher(&format!("{base}/whip/guest.2"), SECONDS);
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Refusals while both send.
    let offer_url = format!("{base}/whip/other");
    let sdp = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n";
    let r = http.post(&offer_url).header("content-type", "application/sdp").body(sdp).send().await.unwrap();
    assert_eq!(r.status(), 401, "no token");
    assert_eq!(r.headers().get("www-authenticate").map(|v| v.to_str().unwrap()), Some("Bearer"));
    let r = http.post(&offer_url).bearer_auth("wrong-token-0123456789").header("content-type", "application/sdp").body(sdp).send().await.unwrap();
    assert_eq!(r.status(), 401, "a wrong token");
    let r = http.post(&offer_url).bearer_auth(TOKEN).header("content-type", "application/json").body("{}").send().await.unwrap();
    assert_eq!(r.status(), 415, "another content type");
    let r = http.post(&offer_url).bearer_auth(TOKEN).header("content-type", "application/sdp").body("hello").send().await.unwrap();
    assert_eq!(r.status(), 400, "a body that is no SDP");
    let r = http.post(&offer_url).bearer_auth(TOKEN).header("content-type", "application/sdp").body(sdp).send().await.unwrap();
    let status = r.status();
    let why = r.text().await.unwrap();
    assert_eq!(status, 400, "an SDP offer without media is refused by the WebRTC stack: {why}");
    eprintln!("offer without media refused: {why}");
    let huge = format!("{sdp}{}", "a=x-padding:0123456789abcdef\r\n".repeat(2000));
    let r = http.post(&offer_url).bearer_auth(TOKEN).header("content-type", "application/sdp").body(huge).send().await.unwrap();
    assert_eq!(r.status(), 413, "an offer over webrtc.max_sdp_bytes");
    let r = http.post(format!("{base}/whip/bad!name")).bearer_auth(TOKEN).header("content-type", "application/sdp").body(sdp).send().await.unwrap();
    assert_eq!(r.status(), 400, "a stream name outside [A-Za-z0-9._-]");
    let r = http.patch(format!("{base}/whip/studio-1/0123")).bearer_auth(TOKEN).body("a=end-of-candidates").send().await.unwrap();
    assert_eq!(r.status(), 405, "PATCH (no trickle ICE, no ICE restart)");
    let r = http.delete(format!("{base}/whip/studio-1/0123")).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(r.status(), 404, "DELETE of an unknown session");
    let r = http.request(reqwest::Method::OPTIONS, &offer_url).send().await.unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(r.headers().get("accept-post").map(|v| v.to_str().unwrap()), Some("application/sdp"));
    mxrec.assert_running("the refused requests");

    let studio = publisher_report(studio, "studio-1").await;
    let guest = publisher_report(guest, "guest.2").await;
    for (name, r) in [("studio-1", &studio), ("guest.2", &guest)] {
        assert_eq!(r["status"], 201, "{name}: POST answered 201");
        assert_eq!(r["delete_status"], 200, "{name}: DELETE answered 200");
        assert!(r["location"].as_str().unwrap().starts_with(&format!("/whip/{name}/")), "{name}: Location {}", r["location"]);
    }

    let catalog = Catalog::connect(&format!("sqlite://{}", dir.path().join("data/mxrec.db").display())).await.unwrap();
    let store = s3_store(&s3, &prefix);
    for name in ["studio-1", "guest.2"] {
        let room = format!("whip:{name}");
        let id = uploaded_recording(&catalog, &room, &mut mxrec).await;
        let manifest = load_manifest(&s3, &prefix, &room, &id).await;
        assert_eq!(manifest.call.flavour, storage::manifest::CallFlavour::Whip);
        assert_eq!(manifest.participants.len(), 1, "{name}: one participant");
        assert_eq!(manifest.participants[0].user_id, room);
        let kinds: std::collections::BTreeSet<&str> = manifest.tracks.iter().map(|t| t.kind.as_str()).collect();
        assert_eq!(kinds, ["audio", "video"].into_iter().collect(), "{name}: track kinds");
        for t in &manifest.tracks {
            assert!(!t.segments.is_empty(), "{name}: track {} has segments", t.id);
            for s in &t.segments {
                let bytes = store.get(&object_store::path::Path::parse(&s.key).unwrap()).await.unwrap().bytes().await.unwrap();
                assert_eq!(sha256_hex(&bytes), s.sha256, "{name}: SHA-256 of segment {}", s.key);
            }
            eprintln!("{name}: track {} ({} {}): {} segments verified", t.id, t.kind.as_str(), t.codec, t.segments.len());
        }
        let out = manifest.outputs.iter().find(|o| o.kind == storage::manifest::OutputKind::Mp4).expect("an MP4 composite");
        let bytes = store.get(&object_store::path::Path::parse(&out.key).unwrap()).await.unwrap().bytes().await.unwrap();
        assert_eq!(sha256_hex(&bytes), out.sha256, "{name}: SHA-256 of the composite");
        let path = dir.path().join(format!("{name}.mp4"));
        std::fs::write(&path, &bytes).unwrap();
        check_call_composite(&path, SECONDS, MAX_AV_OFFSET_MS);
    }
    catalog.close().await;
    let status = mxrec.stop(Duration::from_secs(60));
    assert!(status.success(), "mxrec serve exits cleanly on SIGTERM: {status}");
}
