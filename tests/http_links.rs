//! The HTTP side against real servers: the axum application runs on 127.0.0.1:0 inside each test
//! over a SQLite catalog and a local store in a temporary directory (real files, FFmpeg-made media),
//! and is spoken to with a real HTTP client. Checked: share links serve the exact bytes, with
//! ranges; expired, revoked, unknown and malformed tokens are refused alike; issue and fetch land
//! in the audit trail; /healthz follows the catalog; /metrics lists what mxrec emits. One test
//! drives the `mxrec` binary end to end (import, `links create`, `serve`, `links revoke`, SIGTERM);
//! one redirects to a presigned URL of Garage (S3) when `MXREC_S3_ENDPOINT` is set.

mod harness;

use std::sync::Arc;
use std::time::Duration;

use harness::*;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use recorder::config::HttpConfig;
use recorder::http::{HttpState, Links};
use storage::manifest::CallFlavour;
use storage::{Catalog, ObjectKeys, RecordingId, RoomId};

/// A running server over its own catalog and store; stops (gracefully) on `stop`.
struct Server {
    base: String,
    catalog: Catalog,
    links: Links,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Server {
    async fn start(
        catalog: Catalog,
        store: Arc<dyn ObjectStore>,
        signer: Option<Arc<dyn object_store::signer::Signer>>,
    ) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let config = HttpConfig { public_url: base.clone(), presign_ttl_secs: 120, ..HttpConfig::default() };
        let state = HttpState::new(catalog.clone(), store, signer, config);
        let links = state.links.clone();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(recorder::http::serve(listener, state, async {
            let _ = rx.await;
        }));
        Server { base, catalog, links, stop: Some(tx), task }
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(15), self.task).await.expect("server stops").unwrap().unwrap();
    }
}

/// A tempdir with a SQLite catalog, a local store, and one recording whose composite (a real MP4),
/// manifest-like JSON and one track segment are stored.
struct Fixture {
    _dir: tempfile::TempDir,
    recording: RecordingId,
    composite_key: String,
    composite: Vec<u8>,
    json_key: String,
    segment_key: String,
}

async fn fixture() -> (Fixture, Catalog, Arc<dyn ObjectStore>) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("recordings");
    let store = storage::build_store(&toml::from_str(&format!("root = \"{}\"", root.display())).unwrap()).unwrap();
    let catalog = Catalog::connect(&format!("sqlite://{}", dir.path().join("mxrec.db").display())).await.unwrap();
    let room = RoomId::new("!links:example.org");
    let call = catalog.create_call(&room, CallFlavour::Import, None, storage::now_ms()).await.unwrap();
    let rec = catalog.create_recording(&call.id, storage::now_ms()).await.unwrap();
    let keys = ObjectKeys::new(&room, &rec.id);

    let mp4 = dir.path().join("call.mp4");
    ffmpeg(&[
        "-f", "lavfi", "-i", "testsrc2=size=320x240:rate=15:duration=2",
        "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", mp4.to_str().unwrap(),
    ]);
    let composite = std::fs::read(&mp4).unwrap();
    assert!(composite.len() > 1000, "fixture too small: {}", composite.len());
    let composite_key = keys.output("call.mp4");
    store.put(&composite_key, PutPayload::from(composite.clone())).await.unwrap();
    let json_key = keys.manifest();
    store.put(&json_key, PutPayload::from_static(b"{\"format_version\":1}")).await.unwrap();
    let segment_key = keys.segment(&"alice-cam".into(), 1, "webm");
    store.put(&segment_key, PutPayload::from_static(b"\x1a\x45\xdf\xa3 not really webm")).await.unwrap();
    let f = Fixture {
        _dir: dir,
        recording: rec.id,
        composite_key: composite_key.to_string(),
        composite,
        json_key: json_key.to_string(),
        segment_key: segment_key.to_string(),
    };
    (f, catalog, store)
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap()
}

fn header<'a>(r: &'a reqwest::Response, name: &str) -> &'a str {
    r.headers()
        .get(name)
        .map(|v| v.to_str().unwrap())
        .unwrap_or_else(|| panic!("no {name} header in {:?}", r.headers()))
}

async fn actions(catalog: &Catalog, rec: &RecordingId) -> Vec<(String, serde_json::Value)> {
    catalog.audit_events(rec).await.unwrap().into_iter().map(|e| (e.action, e.detail)).collect()
}

#[tokio::test]
async fn a_link_serves_the_file_whole_and_in_ranges_and_every_use_is_audited() {
    let (f, catalog, store) = fixture().await;
    let server = Server::start(catalog, store, None).await;
    let link = server.links.issue(&f.recording, &f.composite_key, server.links.default_ttl()).await.unwrap();
    assert!(link.url.starts_with(&format!("{}/r/", server.base)), "{}", link.url);
    assert_eq!(link.url.len(), server.base.len() + 3 + 43);
    let expected_expiry = chrono::Utc::now() + chrono::Duration::days(7);
    assert!((link.expires_at - expected_expiry).num_seconds().abs() < 60, "{}", link.expires_at);
    // Only the hash is stored.
    let stored = server.catalog.links_of_recording(&f.recording).await.unwrap();
    assert_eq!(stored.len(), 1);
    assert_ne!(stored[0].token_hash, link.token);
    assert!(!stored[0].token_hash.contains(&link.token));

    let http = client();
    let size = f.composite.len();
    let r = http.get(&link.url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "content-type"), "video/mp4");
    assert_eq!(header(&r, "accept-ranges"), "bytes");
    assert_eq!(header(&r, "content-length"), size.to_string());
    let disposition = header(&r, "content-disposition").to_owned();
    assert_eq!(disposition, format!("inline; filename=\"{}-call.mp4\"", f.recording));
    let body = r.bytes().await.unwrap();
    assert_eq!(sha256_hex(&body), sha256_hex(&f.composite));

    let r = http.get(&link.url).header("range", "bytes=100-1099").send().await.unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(header(&r, "content-range"), format!("bytes 100-1099/{size}"));
    assert_eq!(header(&r, "content-length"), "1000");
    assert_eq!(header(&r, "content-type"), "video/mp4");
    assert_eq!(&r.bytes().await.unwrap()[..], &f.composite[100..1100]);

    let r = http.get(&link.url).header("range", "bytes=-10").send().await.unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(header(&r, "content-range"), format!("bytes {}-{}/{size}", size - 10, size - 1));
    assert_eq!(&r.bytes().await.unwrap()[..], &f.composite[size - 10..]);

    let r = http.get(&link.url).header("range", format!("bytes={size}-")).send().await.unwrap();
    assert_eq!(r.status(), 416);
    assert_eq!(header(&r, "content-range"), format!("bytes */{size}"));

    // Several ranges at once are answered with the whole file, which the RFC allows.
    let r = http.get(&link.url).header("range", "bytes=0-1,5-6").send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap().len(), size);

    // The manifest and a track segment get their own types and names.
    let m = server.links.issue(&f.recording, &f.json_key, Duration::from_secs(60)).await.unwrap();
    let r = http.get(&m.url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "content-type"), "application/json");
    assert_eq!(r.text().await.unwrap(), "{\"format_version\":1}");
    let s = server.links.issue(&f.recording, &f.segment_key, Duration::from_secs(60)).await.unwrap();
    let r = http.get(&s.url).send().await.unwrap();
    assert_eq!(header(&r, "content-type"), "video/webm");
    assert_eq!(
        header(&r, "content-disposition"),
        format!("inline; filename=\"{}-alice-cam-000001.webm\"", f.recording)
    );

    let audit = actions(&server.catalog, &f.recording).await;
    let issued: Vec<_> = audit.iter().filter(|(a, _)| a == "link.issued").collect();
    assert_eq!(issued.len(), 3, "{audit:?}");
    assert_eq!(issued[0].1["object_key"], f.composite_key.as_str());
    let fetched: Vec<_> = audit
        .iter()
        .filter(|(a, d)| a == "link.fetched" && d["link"] == link.id.as_str())
        .map(|(_, d)| (d["status"].as_u64().unwrap(), d["range"].as_str().map(str::to_owned)))
        .collect();
    assert_eq!(
        fetched,
        vec![
            (200, None),
            (206, Some("bytes=100-1099".into())),
            (206, Some("bytes=-10".into())),
            (416, Some(format!("bytes={size}-"))),
            (200, Some("bytes=0-1,5-6".into())),
        ]
    );
    // No token in clear anywhere in the audit trail.
    assert!(!format!("{audit:?}").contains(&link.token));
    server.stop().await;
}

#[tokio::test]
async fn expired_revoked_unknown_and_garbage_tokens_are_refused_alike() {
    let (f, catalog, store) = fixture().await;
    let server = Server::start(catalog, store, None).await;
    let http = client();
    let expired = server.links.issue(&f.recording, &f.composite_key, Duration::ZERO).await.unwrap();
    let live = server.links.issue(&f.recording, &f.composite_key, Duration::from_secs(3600)).await.unwrap();
    assert_eq!(http.get(&live.url).send().await.unwrap().status(), 200);

    let refused = |r: reqwest::Response| async move {
        assert_eq!(r.status(), 404, "{:?}", r.headers());
        r.text().await.unwrap()
    };
    let expired_body = refused(http.get(&expired.url).send().await.unwrap()).await;
    assert!(expired_body.contains("not valid"), "{expired_body}");

    assert_eq!(server.links.revoke_recording(&f.recording).await.unwrap(), 2);
    assert_eq!(server.links.revoke_recording(&f.recording).await.unwrap(), 0);
    let revoked_body = refused(http.get(&live.url).send().await.unwrap()).await;
    assert_eq!(revoked_body, expired_body);

    // A well-formed token that was never issued, and a zoo of malformed ones.
    let never = format!("{}/r/{}", server.base, "A".repeat(43));
    assert_eq!(refused(http.get(&never).send().await.unwrap()).await, expired_body);
    let long = "x".repeat(8000);
    for garbage in [
        "x",
        "%00",
        "%2e%2e",
        "..",
        "%E2%82%AC%F0%9F%99%82",
        "AAAA%0d%0aSet-Cookie:%20a=b",
        long.as_str(),
        &format!("{}=", "A".repeat(42)),
    ] {
        let r = http.get(format!("{}/r/{garbage}", server.base)).send().await.unwrap();
        assert_eq!(r.status(), 404, "{garbage}");
        assert!(r.headers().get("set-cookie").is_none());
        // `..` and `%2e%2e` are dot segments: the client normalises them away before sending.
        if !matches!(garbage, ".." | "%2e%2e") {
            assert_eq!(r.text().await.unwrap(), expired_body, "{garbage}");
        }
    }
    // The server is still up after all that.
    assert_eq!(http.get(format!("{}/healthz", server.base)).send().await.unwrap().status(), 200);

    let audit = actions(&server.catalog, &f.recording).await;
    let reasons: Vec<_> = audit
        .iter()
        .filter(|(a, _)| a == "link.refused")
        .map(|(_, d)| d["reason"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(reasons, ["expired", "revoked"], "{audit:?}");
    assert_eq!(audit.iter().filter(|(a, _)| a == "link.revoked").count(), 2);
    server.stop().await;
}

#[tokio::test]
async fn healthz_follows_the_catalog_and_metrics_are_described() {
    let (f, catalog, store) = fixture().await;
    let server = Server::start(catalog, store, None).await;
    let http = client();
    // A fetch, so the link counter has moved.
    let link = server.links.issue(&f.recording, &f.json_key, Duration::from_secs(60)).await.unwrap();
    assert_eq!(http.get(&link.url).send().await.unwrap().status(), 200);

    let r = http.get(format!("{}/metrics", server.base)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(header(&r, "content-type").starts_with("text/plain"));
    let text = r.text().await.unwrap();
    for name in [
        "mxrec_active_calls",
        "mxrec_active_tracks",
        "mxrec_rtp_bytes_received_total",
        "mxrec_rtp_packets_received_total",
        "mxrec_rtp_packets_lost_total",
        "mxrec_segments_written_total",
        "mxrec_uploads_pending",
        "mxrec_uploads_failed_total",
        "mxrec_uploads_total",
        "mxrec_upload_bytes_total",
        "mxrec_upload_retries_total",
        "mxrec_link_fetches_total",
    ] {
        assert!(text.contains(&format!("# HELP {name} ")), "no HELP for {name} in\n{text}");
        assert!(text.lines().any(|l| l.starts_with(name) && !l.starts_with('#')), "no sample of {name} in\n{text}");
    }
    let served = text.lines().find(|l| l.starts_with("mxrec_link_fetches_total{outcome=\"served\"}")).unwrap();
    let n: f64 = served.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(n >= 1.0, "{served}");
    // Installing again is harmless and renders the same registry.
    let again = recorder::http::install_metrics_recorder().render();
    assert!(again.contains("# HELP mxrec_active_calls"));

    let r = http.get(format!("{}/healthz", server.base)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "ok\n");
    server.catalog.close().await;
    let r = http.get(format!("{}/healthz", server.base)).send().await.unwrap();
    assert_eq!(r.status(), 503);
    let body = r.text().await.unwrap();
    assert!(body.contains("catalog") && !body.contains("store"), "{body}");
    // With the catalog gone, links cannot be checked: 503, not a crash and not a leak.
    assert_eq!(http.get(&link.url).send().await.unwrap().status(), 503);
    server.stop().await;
}

#[tokio::test]
async fn cli_creates_serves_and_revokes_links_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let media = d.join("alice.webm");
    ffmpeg(&[
        "-f", "lavfi", "-i", "testsrc2=size=160x120:rate=10:duration=2",
        "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000:duration=2",
        "-c:v", "libvpx", "-deadline", "realtime", "-cpu-used", "8", "-g", "10",
        "-c:a", "libopus", media.to_str().unwrap(),
    ]);
    let cfg = d.join("mxrec.toml");
    std::fs::write(
        &cfg,
        format!(
            "data_dir = \"{data}\"\n[composite]\nwidth = 320\nheight = 180\nfps = 10\n\
             [http]\nbind = \"127.0.0.1:0\"\npublic_url = \"https://rec.example.org/\"\n",
            data = d.join("data").display()
        ),
    )
    .unwrap();
    let out = mxrec(
        d,
        &cfg,
        &["import", "--room", "!cli:example.org", "-p", &format!("@alice:example.org#Alice={}", media.display())],
    );
    assert!(out.status.success(), "import: {}", String::from_utf8_lossy(&out.stderr));
    let recording = stdout_value(&out, "recording").expect("recording id printed");
    // The local store's default root is relative to the working directory.
    let composite_path = d.join(stdout_value(&out, "composite").expect("composite printed"));
    let composite = std::fs::read(&composite_path).unwrap();

    let out = mxrec(d, &cfg, &["links", "create", &recording]);
    assert!(out.status.success(), "links create: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let url = stdout
        .split_whitespace()
        .find(|w| w.starts_with("https://rec.example.org/r/"))
        .unwrap_or_else(|| panic!("{stdout}"))
        .to_owned();
    assert!(stdout.starts_with("composite (mp4): "), "{stdout}");
    let out = mxrec(d, &cfg, &["links", "create", &recording, "--what", "manifest", "--ttl-hours", "1"]);
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).starts_with("manifest: https://"));
    let out = mxrec(d, &cfg, &["links", "create", &recording, "--what", "all-tracks"]);
    let tracks = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(tracks.lines().count() >= 2 && tracks.lines().all(|l| l.starts_with("track ")), "{tracks}");
    let out = mxrec(d, &cfg, &["links", "create", "no-such-recording"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no-such-recording"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // `mxrec serve`, reached on the address it prints, serves the composite byte for byte.
    let mut child = std::process::Command::new(mxrec_bin())
        .current_dir(d)
        .arg("--config")
        .arg(&cfg)
        .arg("serve")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap();
    let guard = KillOnDrop(child.id());
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    let base = line.trim().strip_prefix("listening: ").unwrap_or_else(|| panic!("serve printed {line:?}")).to_owned();
    let local = url.replace("https://rec.example.org", &base);
    let http = client();
    let r = http.get(&local).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(sha256_hex(&r.bytes().await.unwrap()), sha256_hex(&composite));

    let out = mxrec(d, &cfg, &["links", "revoke", &recording]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let revoked: u32 = stdout_value(&out, "revoked").unwrap().parse().unwrap();
    assert!(revoked >= 4, "{revoked}");
    assert_eq!(http.get(&local).send().await.unwrap().status(), 404);

    // SIGTERM: a clean, prompt exit.
    let killed = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(killed.success());
    let status = tokio::task::spawn_blocking(move || child.wait()).await.unwrap().unwrap();
    assert!(status.success(), "serve exited with {status}");
    std::mem::forget(guard);
}

/// Kills a child process left running by a failed assertion.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill").args(["-KILL", &self.0.to_string()]).status();
    }
}

#[tokio::test]
async fn s3_links_redirect_to_a_presigned_url_that_serves_the_object() {
    let Some(s3) = s3() else {
        return skip(
            "http_links::s3_links_redirect_to_a_presigned_url_that_serves_the_object",
            "MXREC_S3_ENDPOINT is not set",
        );
    };
    let dir = tempfile::tempdir().unwrap();
    let prefix = format!("http-links-{}", RecordingId::generate());
    let cfg = s3.store_config(&format!("{prefix}/x"));
    let store = storage::build_store(&cfg).unwrap();
    let signer = storage::store::build_signer(&cfg).unwrap().expect("S3 presigns");
    let catalog = Catalog::connect(&format!("sqlite://{}", dir.path().join("mxrec.db").display())).await.unwrap();
    let room = RoomId::new("!s3:example.org");
    let call = catalog.create_call(&room, CallFlavour::Import, None, storage::now_ms()).await.unwrap();
    let rec = catalog.create_recording(&call.id, storage::now_ms()).await.unwrap();
    let key = ObjectKeys::new(&room, &rec.id).output("call.mp4");
    let bytes: Vec<u8> = (0..300_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    store.put(&key, PutPayload::from(bytes.clone())).await.unwrap();

    let server = Server::start(catalog, store.clone(), Some(signer)).await;
    let link = server.links.issue(&rec.id, key.as_ref(), Duration::from_secs(600)).await.unwrap();
    let http = client();
    let r = http.get(&link.url).send().await.unwrap();
    assert_eq!(r.status(), 307);
    let location = header(&r, "location").to_owned();
    assert!(location.starts_with(&format!("{}/{}/{prefix}/x/rooms/", s3.endpoint, s3.bucket)), "{location}");
    assert!(location.contains("X-Amz-Expires=120"), "{location}");

    let r = http.get(&location).send().await.unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
    assert_eq!(header(&r, "content-type"), "video/mp4");
    assert!(header(&r, "content-disposition").contains(&format!("{}-call.mp4", rec.id)));
    assert_eq!(sha256_hex(&r.bytes().await.unwrap()), sha256_hex(&bytes));
    // Players seek on the presigned URL itself.
    let r = http.get(&location).header("range", "bytes=10-19").send().await.unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(&r.bytes().await.unwrap()[..], &bytes[10..20]);

    let audit = actions(&server.catalog, &rec.id).await;
    assert!(audit.iter().any(|(a, d)| a == "link.fetched" && d["status"] == 307), "{audit:?}");
    server.links.revoke_recording(&rec.id).await.unwrap();
    assert_eq!(http.get(&link.url).send().await.unwrap().status(), 404);
    store.delete(&key).await.unwrap();
    server.stop().await;
}
