//! Uploads spool files to the object store and proves they arrived intact before the local copy
//! goes.
//!
//! Two layers of retry: object_store retries each HTTP request with back-off (configured in
//! [`crate::store::RetrySettings`]); on top, an upload that still fails (a long outage) is retried
//! as a whole with its own back-off, because object_store's multipart handle cannot resume a part
//! that failed. Verification compares the size from a HEAD and either the S3 ETag (MD5, or the
//! multipart MD5-of-MD5s) computed while reading, or, where the ETag carries no digest (local
//! filesystem and some stores), a SHA-256 of the object read back.
//!
//! [`UploadQueue`] is the form the recorder uses: one task owns the queue, callers send jobs over a
//! channel, and shutdown drains what was queued.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::stream::{FuturesUnordered, StreamExt};
use md5::Md5;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::error::{Error, Result};
use crate::ids::RecordingId;
use crate::spool::{PendingUpload, Spool};

const MIB: u64 = 1024 * 1024;
/// S3 rejects parts (other than the last) smaller than this.
pub const MIN_PART_SIZE: u64 = 5 * MIB;

/// How uploads are done. All sizes in bytes, times in milliseconds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UploaderConfig {
    /// Files of at least this size go by multipart upload; smaller ones by a single PUT.
    pub multipart_threshold: u64,
    /// Size of each multipart part (the last may be smaller); at least 5 MiB.
    pub part_size: u64,
    /// Parts of one upload in flight at once.
    pub part_concurrency: usize,
    /// Uploads the queue runs at once.
    pub upload_concurrency: usize,
    /// Attempts of a whole upload before it is reported failed (the file stays in the spool).
    pub max_attempts: u32,
    /// Back-off before the second attempt; doubles each time up to `max_backoff_ms`.
    pub initial_backoff_ms: u64,
    pub max_backoff_ms: u64,
    /// Keep the spool file after a verified upload (for debugging or a local archive).
    pub keep_local: bool,
    pub verify: VerifyMode,
    /// Jobs that may wait in the queue before `enqueue` waits for room.
    pub queue_capacity: usize,
}

impl Default for UploaderConfig {
    fn default() -> Self {
        Self {
            multipart_threshold: 8 * MIB,
            part_size: 8 * MIB,
            part_concurrency: 4,
            upload_concurrency: 2,
            // 1 + 2 + 4 + … + 60 s: a store that is away for about 15 minutes loses nothing.
            max_attempts: 20,
            initial_backoff_ms: 1_000,
            max_backoff_ms: 60_000,
            keep_local: false,
            verify: VerifyMode::Auto,
            // Jobs are small and the spool holds the files: while the store is away, a large call
            // closes ~30 segments a minute per track, and `enqueue` (called from the media path)
            // must not wait for room.
            queue_capacity: 16_384,
        }
    }
}

impl UploaderConfig {
    pub fn validate(&self) -> Result<()> {
        if self.part_size < MIN_PART_SIZE {
            return Err(Error::Config(format!(
                "upload.part_size is {} bytes; S3 needs at least {MIN_PART_SIZE}",
                self.part_size
            )));
        }
        if self.max_attempts == 0 || self.part_concurrency == 0 || self.upload_concurrency == 0 {
            return Err(Error::Config(
                "upload.max_attempts, part_concurrency and upload_concurrency must be at least 1"
                    .into(),
            ));
        }
        Ok(())
    }

    fn backoff(&self, failed_attempts: u32) -> Duration {
        let exp = failed_attempts.saturating_sub(1).min(20);
        let ms = self
            .initial_backoff_ms
            .saturating_mul(1 << exp)
            .min(self.max_backoff_ms);
        Duration::from_millis(ms)
    }
}

/// How an upload is proven intact.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VerifyMode {
    /// Compare the ETag when it has an MD5 form, else read back and compare SHA-256.
    #[default]
    Auto,
    /// Always read the object back and compare SHA-256: for stores whose ETag looks like an MD5
    /// but is not one (S3 with SSE-KMS, for example).
    ReadBack,
}

/// How verification succeeded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verification {
    /// ETag equals the MD5 (single PUT) or the multipart MD5-of-MD5s we computed.
    Etag,
    /// The object was read back and its SHA-256 matched.
    ReadBackSha256,
}

/// What a verified upload produced.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadReport {
    pub key: String,
    pub size: u64,
    /// Hex SHA-256 of the file.
    pub sha256: String,
    /// The store's ETag, unquoted, if it gave one.
    pub etag: Option<String>,
    /// Whole-upload attempts it took (1 = first try).
    pub attempts: u32,
    /// Number of parts; 0 for a single PUT.
    pub parts: u32,
    pub verification: Verification,
    /// Whether the spool file was kept (`keep_local`).
    pub kept_local: bool,
}

/// Progress of one upload attempt, for callers that want to show or react to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UploadProgress {
    pub attempt: u32,
    pub parts_done: u32,
    pub parts_total: u32,
    pub bytes_done: u64,
}

/// Uploads spool files. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Uploader {
    store: Arc<dyn ObjectStore>,
    spool: Spool,
    config: Arc<UploaderConfig>,
}

/// What one attempt learned while reading and sending the file.
struct Sent {
    size: u64,
    sha256: [u8; 32],
    /// ETags the store may legitimately report for these bytes.
    md5_etags: Vec<String>,
    parts: u32,
}

impl Uploader {
    pub fn new(store: Arc<dyn ObjectStore>, spool: Spool, config: UploaderConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            store,
            spool,
            config: Arc::new(config),
        })
    }

    pub fn spool(&self) -> &Spool {
        &self.spool
    }

    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    pub fn config(&self) -> &UploaderConfig {
        &self.config
    }

    /// Mark `local` pending for `key` and upload it now.
    pub async fn upload_file(
        &self,
        local: &Path,
        key: &ObjectPath,
        recording: Option<&RecordingId>,
    ) -> Result<UploadReport> {
        let pending = self.spool.mark_pending(local, key, recording).await?;
        self.upload(&pending).await
    }

    /// Upload, verify, and then remove the spool file (unless `keep_local`). On failure the file
    /// and its sidecar stay for a later try.
    pub async fn upload(&self, pending: &PendingUpload) -> Result<UploadReport> {
        metrics::gauge!("mxrec_uploads_pending").increment(1.0);
        let r = self.upload_with_progress(pending, None).await;
        metrics::gauge!("mxrec_uploads_pending").decrement(1.0);
        r
    }

    /// [`Uploader::upload`] that reports each finished part on `progress`. The send is awaited, so
    /// a bounded channel paces the upload.
    pub async fn upload_with_progress(
        &self,
        pending: &PendingUpload,
        progress: Option<mpsc::Sender<UploadProgress>>,
    ) -> Result<UploadReport> {
        let key = pending.object_key()?;
        let span = info_span!("upload", key = %key, recording = ?pending.recording.as_ref().map(|r| r.as_str()));
        async {
            let mut attempt = 0;
            loop {
                attempt += 1;
                match self.attempt(pending, &key, attempt, progress.as_ref()).await {
                    Ok(mut report) => {
                        report.attempts = attempt;
                        self.spool.complete(pending, self.config.keep_local).await?;
                        metrics::counter!("mxrec_uploads_total").increment(1);
                        metrics::counter!("mxrec_upload_bytes_total").increment(report.size);
                        info!(size = report.size, attempts = attempt, parts = report.parts, verification = ?report.verification, "upload verified");
                        return Ok(report);
                    }
                    Err(e) if !is_retryable(&e) || attempt >= self.config.max_attempts => {
                        metrics::counter!("mxrec_uploads_failed_total").increment(1);
                        warn!(attempts = attempt, error = %e, "upload failed; the spool file is kept");
                        return Err(Error::UploadFailed { key: key.to_string(), attempts: attempt, last: Box::new(e) });
                    }
                    Err(e) => {
                        let wait = self.config.backoff(attempt);
                        metrics::counter!("mxrec_upload_retries_total").increment(1);
                        warn!(attempt, error = %e, retry_in_ms = wait.as_millis() as u64, "upload attempt failed; retrying");
                        tokio::time::sleep(wait).await;
                    }
                }
            }
        }
        .instrument(span)
        .await
    }

    async fn attempt(
        &self,
        pending: &PendingUpload,
        key: &ObjectPath,
        attempt: u32,
        progress: Option<&mpsc::Sender<UploadProgress>>,
    ) -> Result<UploadReport> {
        let path = &pending.local_path;
        let size = tokio::fs::metadata(path)
            .await
            .map_err(|e| Error::io(path, e))?
            .len();
        let sent = if size < self.config.multipart_threshold {
            self.put_single(path, key).await?
        } else {
            self.put_multipart(path, key, size, attempt, progress)
                .await?
        };
        if sent.size != size {
            return Err(Error::Io {
                path: path.clone(),
                source: std::io::Error::other(format!(
                    "file changed size during upload ({size} -> {})",
                    sent.size
                )),
            });
        }
        let (etag, verification) = self.verify(key, &sent).await?;
        Ok(UploadReport {
            key: key.to_string(),
            size,
            sha256: hex::encode(sent.sha256),
            etag,
            attempts: attempt,
            parts: sent.parts,
            verification,
            kept_local: self.config.keep_local,
        })
    }

    async fn put_single(&self, path: &Path, key: &ObjectPath) -> Result<Sent> {
        let data = Bytes::from(
            tokio::fs::read(path)
                .await
                .map_err(|e| Error::io(path, e))?,
        );
        let sha256: [u8; 32] = Sha256::digest(&data).into();
        let md5 = hex::encode(Md5::digest(&data));
        let size = data.len() as u64;
        self.store
            .put(key, PutPayload::from_bytes(data))
            .await
            .map_err(|e| Error::store("put", key, e))?;
        Ok(Sent {
            size,
            sha256,
            md5_etags: vec![md5],
            parts: 0,
        })
    }

    async fn put_multipart(
        &self,
        path: &Path,
        key: &ObjectPath,
        size: u64,
        attempt: u32,
        progress: Option<&mpsc::Sender<UploadProgress>>,
    ) -> Result<Sent> {
        let part_size = self.config.part_size;
        let parts_total = size.div_ceil(part_size).max(1) as u32;
        let mut file = tokio::fs::File::open(path)
            .await
            .map_err(|e| Error::io(path, e))?;
        let mut upload = self
            .store
            .put_multipart(key)
            .await
            .map_err(|e| Error::store("start multipart upload", key, e))?;

        let mut sha = Sha256::new();
        let mut part_md5s: Vec<[u8; 16]> = Vec::new();
        let mut in_flight = FuturesUnordered::new();
        let mut read_total = 0u64;
        let mut done = UploadProgress {
            attempt,
            parts_done: 0,
            parts_total,
            bytes_done: 0,
        };

        let result: Result<()> = async {
            loop {
                let part = read_part(&mut file, path, part_size).await?;
                if part.is_empty() {
                    break;
                }
                sha.update(&part);
                part_md5s.push(Md5::digest(&part).into());
                read_total += part.len() as u64;
                let len = part.len() as u64;
                let fut = upload.put_part(PutPayload::from_bytes(part));
                in_flight.push(async move { fut.await.map(|()| len) });
                // Bounded concurrency: the file is never read further ahead than this.
                while in_flight.len() >= self.config.part_concurrency {
                    let len = in_flight
                        .next()
                        .await
                        .expect("non-empty")
                        .map_err(|e| Error::store("upload part", key, e))?;
                    report_part(&mut done, len, progress).await;
                }
            }
            while let Some(r) = in_flight.next().await {
                let len = r.map_err(|e| Error::store("upload part", key, e))?;
                report_part(&mut done, len, progress).await;
            }
            Ok(())
        }
        .await;

        if let Err(e) = result {
            drop(in_flight);
            // Best effort: stores keep incomplete uploads (and bill for them) until aborted or
            // expired by a lifecycle rule.
            if let Err(abort) = upload.abort().await {
                debug!(error = %abort, "could not abort the failed multipart upload");
            }
            return Err(e);
        }
        upload
            .complete()
            .await
            .map_err(|e| Error::store("complete multipart upload", key, e))?;
        Ok(Sent {
            size: read_total,
            sha256: sha.finalize().into(),
            md5_etags: multipart_etags(&part_md5s),
            parts: part_md5s.len() as u32,
        })
    }

    /// HEAD for the size, then the ETag or a read-back SHA-256.
    async fn verify(
        &self,
        key: &ObjectPath,
        sent: &Sent,
    ) -> Result<(Option<String>, Verification)> {
        let fail = |reason: String| Error::Verification {
            key: key.to_string(),
            reason,
        };
        let meta = self
            .store
            .head(key)
            .await
            .map_err(|e| Error::store("head", key, e))?;
        if meta.size != sent.size {
            return Err(fail(format!(
                "stored size {} differs from local size {}",
                meta.size, sent.size
            )));
        }
        let etag = meta.e_tag.as_deref().map(normalize_etag);
        if self.config.verify == VerifyMode::Auto {
            if let Some(etag) = etag.as_deref().filter(|e| is_md5_form(e)) {
                return if let Some(form) = sent.md5_etags.iter().position(|m| m == etag) {
                    debug!(
                        etag,
                        form = ["md5 / aws multipart", "garage multipart"][form.min(1)],
                        "ETag verified"
                    );
                    Ok((Some(etag.to_owned()), Verification::Etag))
                } else {
                    Err(fail(format!(
                        "ETag {etag} matches none of the expected {:?}",
                        sent.md5_etags
                    )))
                };
            }
        }
        let got = self.read_back_sha256(key).await?;
        if got != sent.sha256 {
            return Err(fail(format!(
                "read-back SHA-256 {} differs from local {}",
                hex::encode(got),
                hex::encode(sent.sha256)
            )));
        }
        Ok((etag, Verification::ReadBackSha256))
    }

    async fn read_back_sha256(&self, key: &ObjectPath) -> Result<[u8; 32]> {
        let mut stream = self
            .store
            .get(key)
            .await
            .map_err(|e| Error::store("get", key, e))?
            .into_stream();
        let mut sha = Sha256::new();
        while let Some(chunk) = stream.next().await {
            sha.update(chunk.map_err(|e| Error::store("get", key, e))?);
        }
        Ok(sha.finalize().into())
    }
}

async fn report_part(
    done: &mut UploadProgress,
    len: u64,
    progress: Option<&mpsc::Sender<UploadProgress>>,
) {
    done.parts_done += 1;
    done.bytes_done += len;
    if let Some(tx) = progress {
        let _ = tx.send(done.clone()).await;
    }
}

async fn read_part(file: &mut tokio::fs::File, path: &Path, part_size: u64) -> Result<Bytes> {
    let mut buf = BytesMut::with_capacity(part_size as usize);
    while (buf.len() as u64) < part_size {
        let n = file
            .read_buf(&mut buf)
            .await
            .map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
    }
    Ok(buf.freeze())
}

/// Local file problems and bad keys will not fix themselves; everything else (network, store,
/// verification) is worth another attempt.
fn is_retryable(e: &Error) -> bool {
    !matches!(e, Error::Io { .. } | Error::Config(_))
}

fn normalize_etag(raw: &str) -> String {
    raw.trim()
        .trim_start_matches("W/")
        .trim_matches('"')
        .to_ascii_lowercase()
}

/// `<32 hex>` or `<32 hex>-<parts>`: the forms an S3 ETag takes when it is an MD5 digest.
fn is_md5_form(etag: &str) -> bool {
    let (hash, parts) = match etag.split_once('-') {
        Some((h, n)) => (h, Some(n)),
        None => (etag, None),
    };
    hash.len() == 32
        && hash.bytes().all(|b| b.is_ascii_hexdigit())
        && parts.is_none_or(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// ETags a store may report for a multipart object with these part MD5s: "<md5>-<parts>" where
/// AWS (and Garage 2.5, checked by the S3 tests) hashes the concatenated binary part digests;
/// older Garage releases hashed their hex spellings, which is accepted too.
fn multipart_etags(part_md5s: &[[u8; 16]]) -> Vec<String> {
    let n = part_md5s.len();
    let mut aws = Md5::new();
    let mut garage = Md5::new();
    for m in part_md5s {
        aws.update(m);
        garage.update(hex::encode(m).as_bytes());
    }
    vec![
        format!("{}-{n}", hex::encode(aws.finalize())),
        format!("{}-{n}", hex::encode(garage.finalize())),
    ]
}

type Reply = oneshot::Sender<Result<UploadReport>>;

/// The recorder's view of the uploader: a queue owned by one task.
#[derive(Debug)]
pub struct UploadQueue {
    tx: mpsc::Sender<(PendingUpload, Option<Reply>)>,
    task: tokio::task::JoinHandle<()>,
    uploader: Uploader,
}

impl UploadQueue {
    /// Start the task that owns the queue.
    pub fn start(uploader: Uploader) -> Self {
        let (tx, rx) = mpsc::channel(uploader.config.queue_capacity.max(1));
        let task =
            tokio::spawn(run_queue(uploader.clone(), rx).instrument(info_span!("upload_queue")));
        Self { tx, task, uploader }
    }

    /// Mark the file pending (durably) and queue it. The returned receiver yields the outcome;
    /// dropping it is fine, the upload still happens.
    pub async fn enqueue(
        &self,
        local: &Path,
        key: &ObjectPath,
        recording: Option<&RecordingId>,
    ) -> Result<oneshot::Receiver<Result<UploadReport>>> {
        let pending = self
            .uploader
            .spool
            .mark_pending(local, key, recording)
            .await?;
        self.enqueue_pending(pending).await
    }

    /// Queue an upload that is already marked pending (e.g. found by [`Spool::scan`]).
    pub async fn enqueue_pending(
        &self,
        pending: PendingUpload,
    ) -> Result<oneshot::Receiver<Result<UploadReport>>> {
        let (reply, rx) = oneshot::channel();
        metrics::gauge!("mxrec_uploads_pending").increment(1.0);
        if self.tx.send((pending, Some(reply))).await.is_err() {
            metrics::gauge!("mxrec_uploads_pending").decrement(1.0);
            return Err(Error::QueueClosed);
        }
        Ok(rx)
    }

    /// Queue everything a previous run left in the spool. Returns each queued upload with the
    /// receiver of its outcome (dropping a receiver is fine: outcomes are logged and counted by
    /// the queue task), so recovery can wait for the files of the recordings it finishes.
    pub async fn resume_from_spool(
        &self,
    ) -> Result<Vec<(PendingUpload, oneshot::Receiver<Result<UploadReport>>)>> {
        let pending = self.uploader.spool.scan().await?;
        let mut queued = Vec::with_capacity(pending.len());
        for p in pending {
            info!(key = %p.key, file = %p.local_path.display(), "resuming upload left in the spool");
            let rx = self.enqueue_pending(p.clone()).await?;
            queued.push((p, rx));
        }
        Ok(queued)
    }

    /// Stop accepting jobs, finish every queued and running upload, then return.
    pub async fn shutdown(self) {
        drop(self.tx);
        if let Err(e) = self.task.await {
            warn!(error = %e, "upload queue task ended abnormally");
        }
    }
}

async fn run_queue(uploader: Uploader, mut rx: mpsc::Receiver<(PendingUpload, Option<Reply>)>) {
    let limit = uploader.config.upload_concurrency;
    let mut running = JoinSet::new();
    let mut open = true;
    while open || !running.is_empty() {
        tokio::select! {
            job = rx.recv(), if open && running.len() < limit => match job {
                Some((pending, reply)) => {
                    let uploader = uploader.clone();
                    running.spawn(async move {
                        let r = uploader.upload_with_progress(&pending, None).await;
                        metrics::gauge!("mxrec_uploads_pending").decrement(1.0);
                        if let Some(reply) = reply {
                            let _ = reply.send(r);
                        }
                    });
                }
                None => open = false,
            },
            Some(r) = running.join_next(), if !running.is_empty() => {
                if let Err(e) = r {
                    warn!(error = %e, "an upload task panicked; its file stays in the spool");
                }
            }
        }
    }
    debug!("upload queue drained");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etag_forms() {
        assert!(is_md5_form("d41d8cd98f00b204e9800998ecf8427e"));
        assert!(is_md5_form("d41d8cd98f00b204e9800998ecf8427e-13"));
        assert!(!is_md5_form("d41d8cd98f00b204e9800998ecf8427e-"));
        assert!(!is_md5_form("1a2b-5f3e1-400")); // local filesystem: inode-mtime-size
        assert!(!is_md5_form("0x8D9A0B1C2D3E4F5"));
        assert_eq!(normalize_etag("\"ABCDEF\""), "abcdef");
        assert_eq!(normalize_etag("W/\"abc\""), "abc");
    }

    #[test]
    fn multipart_etag_matches_the_aws_rule() {
        // Two parts "a" and "b": md5(md5("a") ++ md5("b")) - 2, as AWS documents it.
        let parts = [Md5::digest(b"a").into(), Md5::digest(b"b").into()];
        let mut cat = Vec::new();
        cat.extend_from_slice(&Md5::digest(b"a"));
        cat.extend_from_slice(&Md5::digest(b"b"));
        let expected = format!("{}-2", hex::encode(Md5::digest(&cat)));
        assert_eq!(multipart_etags(&parts)[0], expected);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let c = UploaderConfig {
            initial_backoff_ms: 100,
            max_backoff_ms: 1000,
            ..Default::default()
        };
        let ms: Vec<u128> = (1..=6).map(|n| c.backoff(n).as_millis()).collect();
        assert_eq!(ms, [100, 200, 400, 800, 1000, 1000]);
    }

    #[test]
    fn small_parts_are_rejected() {
        let c = UploaderConfig {
            part_size: MIB,
            ..Default::default()
        };
        assert!(matches!(c.validate(), Err(Error::Config(_))));
        assert!(UploaderConfig::default().validate().is_ok());
    }
}
