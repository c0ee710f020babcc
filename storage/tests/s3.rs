//! The uploader against a real S3 server (Garage from deploy/dev/garage.sh), when MXREC_S3_ENDPOINT
//! is set. Includes the acceptance test: a 100 MB multipart upload survives the server being
//! stopped and restarted mid-upload, and the spool file goes only after verification.
//!
//! The tests stop and start the shared server, so they hold one lock and run one at a time.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use object_store::path::Path as ObjectPath;
use object_store::ObjectStoreExt;
use storage::store::{RetrySettings, S3StoreConfig, StoreBackend};
use storage::uploader::{UploadProgress, Verification};
use storage::{build_store, Error, Spool, StoreConfig, Uploader, UploaderConfig};
use tokio::sync::{mpsc, watch};

static SERVER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const MIB: usize = 1024 * 1024;
/// 100 MB (decimal) in the default 8 MiB parts.
const PARTS: u32 = 100_000_000usize.div_ceil(8 * MIB) as u32;

fn s3_config(retry: RetrySettings) -> Option<StoreConfig> {
    let Some(endpoint) = common::env("MXREC_S3_ENDPOINT") else {
        common::skip("S3 tests", "MXREC_S3_ENDPOINT");
        return None;
    };
    Some(StoreConfig {
        backend: StoreBackend::S3(S3StoreConfig {
            allow_http: endpoint.starts_with("http://"),
            endpoint: Some(endpoint),
            bucket: Some(common::env("MXREC_S3_BUCKET").expect("MXREC_S3_BUCKET")),
            region: Some(common::env("MXREC_S3_REGION").unwrap_or_else(|| "garage".into())),
            // Credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY.
            ..Default::default()
        }),
        prefix: format!("mxrec-tests/{}", uuid::Uuid::now_v7()),
        retry,
    })
}

#[tokio::test]
async fn s3_uploads_are_verified_by_etag() {
    common::init_tracing();
    let Some(cfg) = s3_config(RetrySettings::default()) else {
        return;
    };
    let _server = SERVER.lock().await;
    let store = build_store(&cfg).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path()).await.unwrap();
    let uploader = Uploader::new(store.clone(), spool.clone(), UploaderConfig::default()).unwrap();

    for (size, parts) in [(100_000usize, 0u32), (20 * MIB + 3, 3)] {
        let data = common::random_bytes(size);
        let local = spool.path_for(&format!("{size}.bin")).await.unwrap();
        tokio::fs::write(&local, &data).await.unwrap();
        let key = ObjectPath::from(format!("etag/{size}.bin"));
        let r = uploader.upload_file(&local, &key, None).await.unwrap();
        assert_eq!(
            (r.parts, r.verification),
            (parts, Verification::Etag),
            "{r:?}"
        );
        assert_eq!(
            r.etag.as_deref().map(|e| e.ends_with(&format!("-{parts}"))),
            Some(parts > 0),
            "{r:?}"
        );
        assert!(!local.exists());
        let back = store.get(&key).await.unwrap().bytes().await.unwrap();
        assert_eq!(common::sha256_hex(&back), common::sha256_hex(&data));
    }
}

#[tokio::test]
async fn s3_tampered_object_is_not_verified() {
    common::init_tracing();
    let Some(cfg) = s3_config(RetrySettings::default()) else {
        return;
    };
    let _server = SERVER.lock().await;
    let inner = build_store(&cfg).unwrap();
    let store = Arc::new(common::TamperingStore {
        inner,
        same_size: true,
    });
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path()).await.unwrap();
    let cfg = UploaderConfig {
        max_attempts: 1,
        ..Default::default()
    };
    let uploader = Uploader::new(store, spool.clone(), cfg).unwrap();
    for size in [5000usize, 9 * MIB] {
        let local = spool.path_for(&format!("t{size}.bin")).await.unwrap();
        tokio::fs::write(&local, common::random_bytes(size))
            .await
            .unwrap();
        let err = uploader
            .upload_file(&local, &ObjectPath::from(format!("t/{size}")), None)
            .await
            .unwrap_err();
        let Error::UploadFailed { last, .. } = &err else {
            panic!("{err}")
        };
        assert!(
            matches!(**last, Error::Verification { .. }) && last.to_string().contains("ETag"),
            "{last}"
        );
        assert!(local.exists(), "spool file kept");
    }
    assert_eq!(spool.scan().await.unwrap().len(), 2);
}

/// Upload 100 MB while the server goes away for a few seconds after some parts are in.
/// `retry` decides who rides out the outage: object_store's request retry or our whole-upload
/// retry. Returns the report.
async fn upload_through_outage(
    retry: RetrySettings,
    uploader_cfg: UploaderConfig,
) -> storage::UploadReport {
    let cfg = s3_config(retry).expect("checked by caller");
    let store = build_store(&cfg).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path()).await.unwrap();
    let uploader = Uploader::new(store.clone(), spool.clone(), uploader_cfg).unwrap();

    let data = common::random_bytes(100 * 1000 * 1000);
    let want = common::sha256_hex(&data);
    let local = spool.path_for("big.bin").await.unwrap();
    tokio::fs::write(&local, &data).await.unwrap();
    drop(data);
    let key = ObjectPath::from("outage/big.bin");
    let pending = spool.mark_pending(&local, &key, None).await.unwrap();

    // Progress goes through a bounded channel; until the outage starts the reader takes its
    // time, which paces the upload so the server is stopped while parts are still to come.
    let (tx, mut rx) = mpsc::channel::<UploadProgress>(1);
    let (seen_tx, mut seen) = watch::channel(None::<UploadProgress>);
    let outage = Arc::new(AtomicBool::new(false));
    let pacer = {
        let outage = outage.clone();
        tokio::spawn(async move {
            while let Some(p) = rx.recv().await {
                seen_tx.send_replace(Some(p));
                if !outage.load(Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }
        })
    };
    let upload = {
        let uploader = uploader.clone();
        let pending = pending.clone();
        tokio::spawn(async move { uploader.upload_with_progress(&pending, Some(tx)).await })
    };

    seen.wait_for(|p| p.as_ref().is_some_and(|p| p.parts_done >= 3))
        .await
        .unwrap();
    common::dev_script("garage.sh", "stop").await;
    outage.store(true, Ordering::SeqCst);
    let stopped = Instant::now();
    let parts_before = seen.borrow().as_ref().unwrap().parts_done;
    eprintln!("garage stopped after {parts_before} of {PARTS} parts");
    assert!(
        parts_before < PARTS,
        "the upload finished before the outage; pacing failed"
    );
    assert!(
        local.exists(),
        "spool file must exist while the server is down"
    );
    assert!(
        !upload.is_finished(),
        "upload cannot have finished while the server is down"
    );

    tokio::time::sleep(Duration::from_secs(5)).await; // the outage itself
    assert!(
        local.exists(),
        "spool file must exist while the server is down"
    );
    common::dev_script("garage.sh", "start").await;
    eprintln!("garage back after {:?}", stopped.elapsed());

    let report = tokio::time::timeout(Duration::from_secs(300), upload)
        .await
        .expect("upload finished")
        .unwrap();
    let report = report.unwrap_or_else(|e| panic!("upload failed through the outage: {e}"));
    pacer.await.unwrap();

    assert_eq!(report.size, 100_000_000);
    assert_eq!(report.parts, PARTS, "100 MB in 8 MiB parts");
    assert_eq!(report.sha256, want);
    assert_eq!(report.verification, Verification::Etag);
    assert!(!local.exists(), "spool file removed after verification");
    assert!(spool.scan().await.unwrap().is_empty());

    let back = store.get(&key).await.unwrap().bytes().await.unwrap();
    assert_eq!(back.len(), 100_000_000);
    assert_eq!(common::sha256_hex(&back), want, "downloaded bytes match");
    report
}

#[tokio::test]
async fn s3_acceptance_100mb_multipart_survives_restart_by_whole_upload_retry() {
    common::init_tracing();
    if s3_config(RetrySettings::default()).is_none() {
        return;
    }
    let _server = SERVER.lock().await;
    let metrics = common::metrics();
    let retries_before = metrics.counter("mxrec_upload_retries_total");
    // object_store gives up on a request within about a second, so the outage reaches the
    // uploader, which must retry the whole upload with back-off.
    let retry = RetrySettings {
        max_retries: 2,
        init_backoff_ms: 100,
        max_backoff_ms: 400,
        retry_timeout_secs: 5,
        ..Default::default()
    };
    let cfg = UploaderConfig {
        part_concurrency: 1,
        max_attempts: 12,
        initial_backoff_ms: 500,
        max_backoff_ms: 3_000,
        ..Default::default()
    };
    let report = upload_through_outage(retry, cfg).await;
    eprintln!("report: {report:?}");
    assert!(
        report.attempts >= 2,
        "the outage must have cost at least one attempt: {report:?}"
    );
    let retries = metrics.counter("mxrec_upload_retries_total") - retries_before;
    assert_eq!(
        retries,
        u64::from(report.attempts - 1),
        "every retry is counted"
    );
    assert_eq!(metrics.gauge("mxrec_uploads_pending"), 0.0);
}

#[tokio::test]
async fn s3_100mb_multipart_survives_restart_by_request_retry() {
    common::init_tracing();
    if s3_config(RetrySettings::default()).is_none() {
        return;
    }
    let _server = SERVER.lock().await;
    // object_store's retry, given enough budget, outlasts a few seconds of outage, so the same
    // multipart upload (same upload id, parts already in kept by Garage) continues after the
    // restart. (The default, 10 jittered retries from 100 ms, gives up after about 2-3 s of
    // refused connections; then the whole-upload retry takes over, as in the test above.)
    let retry = RetrySettings {
        max_retries: 40,
        init_backoff_ms: 500,
        max_backoff_ms: 1_000,
        ..Default::default()
    };
    let cfg = UploaderConfig {
        part_concurrency: 1,
        ..Default::default()
    };
    let report = upload_through_outage(retry, cfg).await;
    eprintln!("report: {report:?}");
    assert_eq!(
        report.attempts, 1,
        "object_store's own retry should have carried it: {report:?}"
    );
}
