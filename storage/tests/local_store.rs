//! The uploader against the embedded local-filesystem backend: single PUT and multipart,
//! read-back verification, spool cleanup only after verification, tampering detected, the queue
//! draining on shutdown and resuming from the spool after a restart.

mod common;

use std::sync::Arc;

use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt};
use storage::store::{LocalStoreConfig, StoreBackend};
use storage::uploader::{Verification, VerifyMode};
use storage::{
    build_store, Error, ObjectKeys, Spool, StoreConfig, UploadQueue, Uploader, UploaderConfig,
};

const MIB: usize = 1024 * 1024;

fn config() -> UploaderConfig {
    UploaderConfig {
        part_size: 5 * MIB as u64,
        multipart_threshold: 5 * MIB as u64,
        initial_backoff_ms: 10,
        max_backoff_ms: 50,
        max_attempts: 2,
        ..Default::default()
    }
}

async fn local_store(root: &std::path::Path) -> Arc<dyn ObjectStore> {
    build_store(&StoreConfig {
        backend: StoreBackend::Local(LocalStoreConfig {
            root: root.to_path_buf(),
        }),
        prefix: "mxrec/dev".into(),
        ..Default::default()
    })
    .unwrap()
}

#[tokio::test]
async fn local_single_and_multipart_uploads_verify_and_clear_the_spool() {
    common::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("objects");
    let store = local_store(&root).await;
    let spool = Spool::open(dir.path().join("spool")).await.unwrap();
    let uploader = Uploader::new(store.clone(), spool.clone(), config()).unwrap();
    let keys = ObjectKeys::new(&"!room:example.org".into(), &"rec-1".into());

    for (size, parts) in [(1000usize, 0u32), (12 * MIB + 7, 3)] {
        let data = common::random_bytes(size);
        let local = spool.path_for(&format!("rec-1/{size}.bin")).await.unwrap();
        tokio::fs::write(&local, &data).await.unwrap();
        let key = keys.segment(&"t1".into(), parts, "bin");
        let report = uploader
            .upload_file(&local, &key, Some(&"rec-1".into()))
            .await
            .unwrap();

        assert_eq!(report.size, size as u64);
        assert_eq!(report.sha256, common::sha256_hex(&data));
        assert_eq!(report.parts, parts);
        assert_eq!(report.attempts, 1);
        // The local filesystem's ETag is inode-mtime-size, not a digest, so it must read back.
        assert_eq!(report.verification, Verification::ReadBackSha256);
        assert!(!local.exists(), "spool file must go after verification");
        assert!(spool.scan().await.unwrap().is_empty());

        let stored = store.get(&key).await.unwrap().bytes().await.unwrap();
        assert_eq!(common::sha256_hex(&stored), report.sha256);
        // The prefix is applied by the store, under the configured root.
        let on_disk = root.join("mxrec/dev").join(key.to_string());
        assert_eq!(
            std::fs::metadata(&on_disk).unwrap().len(),
            size as u64,
            "{}",
            on_disk.display()
        );
    }
}

#[tokio::test]
async fn hostile_ids_stay_inside_the_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("objects");
    let store = local_store(&root).await;
    let spool = Spool::open(dir.path().join("spool")).await.unwrap();
    let uploader = Uploader::new(store, spool.clone(), config()).unwrap();

    let keys = ObjectKeys::new(&"../../../../etc".into(), &"..".into());
    let key = keys.segment(&"/passwd\0\n".into(), 1, "webm");
    let local = spool.path_for("../../x.webm").await.unwrap();
    assert!(local.starts_with(spool.root()), "{}", local.display());
    tokio::fs::write(&local, b"x").await.unwrap();
    uploader.upload_file(&local, &key, None).await.unwrap();

    // Exactly one file was written, and it is below <root>/mxrec/dev/rooms/.
    let files: Vec<_> = walk(&root);
    assert_eq!(files.len(), 1, "{files:?}");
    let canonical = files[0].canonicalize().unwrap();
    assert!(
        canonical.starts_with(root.join("mxrec/dev/rooms").canonicalize().unwrap()),
        "{}",
        canonical.display()
    );
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[tokio::test]
async fn tampered_objects_fail_verification_and_keep_the_spool_file() {
    common::init_tracing();
    for (same_size, size) in [(true, 2000usize), (false, 2000), (true, 11 * MIB)] {
        let dir = tempfile::tempdir().unwrap();
        let inner = local_store(&dir.path().join("objects")).await;
        let store = Arc::new(common::TamperingStore { inner, same_size });
        let spool = Spool::open(dir.path().join("spool")).await.unwrap();
        let uploader = Uploader::new(store, spool.clone(), config()).unwrap();

        let local = spool.path_for("a.bin").await.unwrap();
        tokio::fs::write(&local, common::random_bytes(size))
            .await
            .unwrap();
        let err = uploader
            .upload_file(&local, &ObjectPath::from("a.bin"), None)
            .await
            .unwrap_err();

        let Error::UploadFailed { attempts, last, .. } = &err else {
            panic!("{err}")
        };
        assert_eq!(
            *attempts, 2,
            "verification failures are retried up to max_attempts"
        );
        assert!(matches!(**last, Error::Verification { .. }), "{last}");
        let reason = last.to_string();
        assert!(
            reason.contains(if same_size { "SHA-256" } else { "size" }),
            "{reason}"
        );
        assert!(local.exists(), "the only good copy must stay in the spool");
        assert_eq!(
            spool.scan().await.unwrap().len(),
            1,
            "still pending for a later try"
        );
    }
}

#[tokio::test]
async fn keep_local_and_read_back_mode() {
    let dir = tempfile::tempdir().unwrap();
    let store = local_store(&dir.path().join("objects")).await;
    let spool = Spool::open(dir.path().join("spool")).await.unwrap();
    let cfg = UploaderConfig {
        keep_local: true,
        verify: VerifyMode::ReadBack,
        ..config()
    };
    let uploader = Uploader::new(store, spool.clone(), cfg).unwrap();
    let local = spool.path_for("k.bin").await.unwrap();
    tokio::fs::write(&local, b"keep me").await.unwrap();
    let r = uploader
        .upload_file(&local, &ObjectPath::from("k.bin"), None)
        .await
        .unwrap();
    assert!(r.kept_local && local.exists());
    assert!(
        spool.scan().await.unwrap().is_empty(),
        "no longer pending even though kept"
    );
}

#[tokio::test]
async fn queue_drains_on_shutdown_and_resumes_from_the_spool() {
    common::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let store = local_store(&dir.path().join("objects")).await;
    let spool_dir = dir.path().join("spool");

    // A previous run marked two files pending and died before uploading them.
    {
        let spool = Spool::open(&spool_dir).await.unwrap();
        for name in ["left1.bin", "left2.bin"] {
            let p = spool.path_for(name).await.unwrap();
            tokio::fs::write(&p, name.as_bytes()).await.unwrap();
            spool
                .mark_pending(&p, &ObjectPath::from(format!("old/{name}")), None)
                .await
                .unwrap();
        }
    }

    let spool = Spool::open(&spool_dir).await.unwrap();
    let queue = UploadQueue::start(Uploader::new(store.clone(), spool.clone(), config()).unwrap());
    assert_eq!(queue.resume_from_spool().await.unwrap().len(), 2);
    let mut replies = Vec::new();
    for i in 0..5 {
        let p = spool.path_for(&format!("new/{i}.bin")).await.unwrap();
        tokio::fs::write(&p, vec![i as u8; 1000 + i]).await.unwrap();
        replies.push(
            queue
                .enqueue(&p, &ObjectPath::from(format!("new/{i}.bin")), None)
                .await
                .unwrap(),
        );
    }
    queue.shutdown().await;

    // Everything queued before shutdown was uploaded, verified and removed from the spool.
    for r in replies {
        let report = r.await.unwrap().unwrap();
        assert_eq!(report.attempts, 1);
    }
    assert!(spool.scan().await.unwrap().is_empty());
    for key in ["old/left1.bin", "old/left2.bin", "new/0.bin", "new/4.bin"] {
        store.head(&ObjectPath::from(key)).await.unwrap();
    }
}
