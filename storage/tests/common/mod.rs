//! Shared harness for storage's end-to-end tests: real servers from `deploy/dev/*.sh`, chosen by
//! environment variables. A test whose server is not configured says so loudly and returns.
#![allow(dead_code)]

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    ObjectStoreExt, PutMultipartOptions, PutOptions, PutPayload, PutResult, UploadPart,
};

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "storage=info,object_store=warn".into()),
        )
        .with_test_writer()
        .try_init();
}

pub fn skip(what: &str, var: &str) {
    use std::io::Write;
    if std::env::var_os("MXREC_REQUIRE_TEST_SERVERS").is_some() {
        panic!("{what} needs {var}; MXREC_REQUIRE_TEST_SERVERS forbids skipping");
    }
    // Straight to the stderr handle: libtest captures eprintln! of passing tests, and a skip
    // must be seen.
    let bar = "!".repeat(78);
    let _ = writeln!(
        std::io::stderr(),
        "\n{bar}\n!!! SKIPPED {what}: {var} is not set (the Makefile sets it)\n{bar}\n"
    );
}

pub fn env(var: &str) -> Option<String> {
    std::env::var(var).ok().filter(|v| !v.is_empty())
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Run `deploy/dev/<script> <arg>` and insist it succeeds.
pub async fn dev_script(script: &str, arg: &str) {
    let path = repo_root().join("deploy/dev").join(script);
    let status = tokio::process::Command::new(&path)
        .arg(arg)
        .status()
        .await
        .expect("run dev script");
    assert!(
        status.success(),
        "{} {arg} failed: {status}",
        path.display()
    );
}

pub fn random_bytes(n: usize) -> Vec<u8> {
    use rand::RngCore;
    let mut v = vec![0u8; n];
    rand::thread_rng().fill_bytes(&mut v);
    v
}

pub fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

// ---- a minimal global metrics recorder, to check that retries are counted ----

#[derive(Default)]
pub struct TestRecorder {
    values: Mutex<HashMap<String, Arc<AtomicU64>>>,
}

impl TestRecorder {
    fn slot(&self, key: &metrics::Key) -> Arc<AtomicU64> {
        self.values
            .lock()
            .unwrap()
            .entry(key.name().to_owned())
            .or_default()
            .clone()
    }
    pub fn counter(&self, name: &str) -> u64 {
        self.values
            .lock()
            .unwrap()
            .get(name)
            .map(|v| v.load(Ordering::Relaxed))
            .unwrap_or(0)
    }
    pub fn gauge(&self, name: &str) -> f64 {
        f64::from_bits(
            self.values
                .lock()
                .unwrap()
                .get(name)
                .map(|v| v.load(Ordering::Relaxed))
                .unwrap_or(0),
        )
    }
}

impl metrics::Recorder for TestRecorder {
    fn describe_counter(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_gauge(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_histogram(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn register_counter(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        metrics::Counter::from_arc(self.slot(key))
    }
    fn register_gauge(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        metrics::Gauge::from_arc(self.slot(key))
    }
    fn register_histogram(
        &self,
        _: &metrics::Key,
        _: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        metrics::Histogram::noop()
    }
}

/// The process-wide recorder (installed on first use).
pub fn metrics() -> &'static TestRecorder {
    static R: OnceLock<&'static TestRecorder> = OnceLock::new();
    R.get_or_init(|| {
        let r: &'static TestRecorder = Box::leak(Box::default());
        metrics::set_global_recorder(r).expect("no other recorder");
        r
    })
}

// ---- a store that changes objects behind the uploader's back ----

/// Wraps a real store; after every successful write it overwrites the object with the same
/// number of bytes, all flipped, as if something else changed it before verification.
#[derive(Debug)]
pub struct TamperingStore {
    pub inner: Arc<dyn ObjectStore>,
    /// `true`: keep the size and change the content; `false`: truncate by one byte.
    pub same_size: bool,
}

impl fmt::Display for TamperingStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TamperingStore({})", self.inner)
    }
}

async fn tamper(
    inner: &Arc<dyn ObjectStore>,
    location: &Path,
    same_size: bool,
) -> object_store::Result<()> {
    let data = inner.get(location).await?.bytes().await?;
    let mut v: Vec<u8> = data.iter().map(|b| !b).collect();
    if !same_size {
        v.pop();
    }
    inner
        .put(location, PutPayload::from(Bytes::from(v)))
        .await?;
    Ok(())
}

#[derive(Debug)]
struct TamperingUpload {
    inner: Box<dyn MultipartUpload>,
    store: Arc<dyn ObjectStore>,
    location: Path,
    same_size: bool,
}

#[async_trait]
impl MultipartUpload for TamperingUpload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        self.inner.put_part(data)
    }
    async fn complete(&mut self) -> object_store::Result<PutResult> {
        let r = self.inner.complete().await?;
        tamper(&self.store, &self.location, self.same_size).await?;
        Ok(r)
    }
    async fn abort(&mut self) -> object_store::Result<()> {
        self.inner.abort().await
    }
}

#[async_trait]
impl ObjectStore for TamperingStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        let r = self.inner.put_opts(location, payload, opts).await?;
        tamper(&self.inner, location, self.same_size).await?;
        Ok(r)
    }
    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        let inner = self.inner.put_multipart_opts(location, opts).await?;
        Ok(Box::new(TamperingUpload {
            inner,
            store: self.inner.clone(),
            location: location.clone(),
            same_size: self.same_size,
        }))
    }
    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        self.inner.get_opts(location, options).await
    }
    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        self.inner.delete_stream(locations)
    }
    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }
    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }
    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}
