//! Which object store recordings go to, and how keys inside it are spelled.
//!
//! The configuration is one serde enum tagged by `kind`, so a deployment picks a backend in its
//! TOML and the rest of mxrec only ever sees an `Arc<dyn ObjectStore>`. The optional `prefix` is
//! applied by wrapping the store in object_store's `PrefixStore`, so no caller can write outside it.
//!
//! Keys are assembled only from components passed through [`key_component`]: room ids, user ids and
//! display names are attacker-controlled strings, and a `..` or `/` in one must not be able to move
//! an object outside the recording's directory or the configured prefix.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::local::LocalFileSystem;
use object_store::path::{Path as ObjectPath, PathPart};
use object_store::prefix::PrefixStore;
use object_store::{BackoffConfig, ObjectStore, RetryConfig};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Where objects are stored. `kind` selects the backend (default `local`); the backend's keys,
/// `prefix` and `[retry]` sit beside it in the same table.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "serde_json::Map<String, serde_json::Value>")]
pub struct StoreConfig {
    #[serde(flatten)]
    pub backend: StoreBackend,
    /// Key prefix under which every object is written, e.g. `"mxrec"`. Split on `/`; each part
    /// is sanitized like any other key component. Empty means the bucket root.
    pub prefix: String,
    /// Retries of individual requests, done by object_store itself.
    pub retry: RetrySettings,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum StoreBackend {
    /// A directory on the local filesystem; the embedded default for a single-machine setup.
    Local(LocalStoreConfig),
    /// Any S3-compatible service (AWS, Garage, MinIO, Ceph RGW, R2, ...).
    S3(S3StoreConfig),
    /// Google Cloud Storage. Credentials follow object_store's `GOOGLE_*` environment variables
    /// unless given here.
    Gcs(GcsStoreConfig),
    /// Azure Blob Storage. Credentials follow object_store's `AZURE_*` environment variables
    /// unless given here.
    Azure(AzureStoreConfig),
}

impl TryFrom<serde_json::Map<String, serde_json::Value>> for StoreConfig {
    type Error = String;

    // By hand rather than derived: serde's `flatten` cannot default an internally tagged enum,
    // and a table that sets only `prefix` should still mean the local backend.
    fn try_from(mut map: serde_json::Map<String, serde_json::Value>) -> Result<Self, String> {
        let prefix = match map.remove("prefix") {
            None => String::new(),
            Some(serde_json::Value::String(s)) => s,
            Some(other) => return Err(format!("`prefix` must be a string, not {other}")),
        };
        let retry = match map.remove("retry") {
            None => RetrySettings::default(),
            Some(v) => serde_json::from_value(v).map_err(|e| format!("[retry]: {e}"))?,
        };
        map.entry("kind").or_insert_with(|| "local".into());
        let backend =
            serde_json::from_value(serde_json::Value::Object(map)).map_err(|e| e.to_string())?;
        Ok(Self {
            backend,
            prefix,
            retry,
        })
    }
}

impl Default for StoreBackend {
    fn default() -> Self {
        StoreBackend::Local(LocalStoreConfig::default())
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LocalStoreConfig {
    /// Directory holding the objects; created if missing.
    pub root: PathBuf,
}

impl Default for LocalStoreConfig {
    fn default() -> Self {
        Self {
            root: PathBuf::from("./data/recordings"),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct S3StoreConfig {
    /// Endpoint URL, e.g. `http://127.0.0.1:3900`; unset means AWS (or `AWS_ENDPOINT`).
    pub endpoint: Option<String>,
    /// Region; unset means `AWS_REGION`/`AWS_DEFAULT_REGION`, else `us-east-1`.
    pub region: Option<String>,
    /// Bucket name; unset means `AWS_BUCKET`.
    pub bucket: Option<String>,
    /// `true` for `https://bucket.endpoint/key`, `false` (default) for `https://endpoint/bucket/key`,
    /// which is what self-hosted stores usually need.
    pub virtual_hosted_style: bool,
    /// Allow plain `http://` endpoints. Only sensible for loopback or a private network.
    pub allow_http: bool,
    /// Unset means `AWS_ACCESS_KEY_ID` (or the usual AWS credential chain).
    pub access_key_id: Option<String>,
    /// Unset means `AWS_SECRET_ACCESS_KEY`.
    pub secret_access_key: Option<String>,
    /// Unset means `AWS_SESSION_TOKEN`.
    pub session_token: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GcsStoreConfig {
    pub bucket: Option<String>,
    /// Path to a service-account JSON file.
    pub service_account_path: Option<PathBuf>,
    /// The service-account JSON itself.
    pub service_account_key: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AzureStoreConfig {
    pub account: Option<String>,
    pub container: Option<String>,
    pub access_key: Option<String>,
    /// Custom endpoint (e.g. Azurite); unset means the public cloud.
    pub endpoint: Option<String>,
    pub allow_http: bool,
    /// Use the Azurite emulator's well-known account.
    pub use_emulator: bool,
}

/// object_store's per-request retry with exponential back-off. These retries happen inside one
/// request; the uploader adds its own retry of a whole upload on top.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetrySettings {
    /// Retries of one request before it fails; 0 disables.
    pub max_retries: usize,
    /// First back-off.
    pub init_backoff_ms: u64,
    /// Ceiling of one back-off.
    pub max_backoff_ms: u64,
    /// Growth factor between back-offs.
    pub backoff_base: f64,
    /// No retry starts after this long since the first try; keep under about 5 minutes, as a
    /// request's signature is not renewed between retries.
    pub retry_timeout_secs: u64,
}

impl Default for RetrySettings {
    fn default() -> Self {
        Self {
            // Short: a blip is retried here, request by request; a longer outage is the
            // uploader's to ride out (whole-upload attempts with back-off, logged and counted in
            // mxrec_upload_retries_total), where it shows.
            max_retries: 3,
            init_backoff_ms: 100,
            max_backoff_ms: 2_000,
            backoff_base: 2.0,
            retry_timeout_secs: 30,
        }
    }
}

impl RetrySettings {
    pub fn to_retry_config(&self) -> RetryConfig {
        RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(self.init_backoff_ms),
                max_backoff: Duration::from_millis(self.max_backoff_ms),
                base: self.backoff_base,
            },
            max_retries: self.max_retries,
            retry_timeout: Duration::from_secs(self.retry_timeout_secs),
        }
    }
}

/// The S3 client builder for `s3`: `from_env` first, so the usual AWS_* variables fill whatever
/// the config leaves unset. Shared by the store and the URL signer so both talk to one bucket.
fn s3_builder(s3: &S3StoreConfig, retry: RetryConfig) -> AmazonS3Builder {
    let mut b = AmazonS3Builder::from_env()
        .with_retry(retry)
        .with_virtual_hosted_style_request(s3.virtual_hosted_style)
        .with_allow_http(s3.allow_http);
    if let Some(v) = &s3.endpoint {
        b = b.with_endpoint(v);
    }
    if let Some(v) = &s3.region {
        b = b.with_region(v);
    }
    if let Some(v) = &s3.bucket {
        b = b.with_bucket_name(v);
    }
    if let Some(v) = &s3.access_key_id {
        b = b.with_access_key_id(v);
    }
    if let Some(v) = &s3.secret_access_key {
        b = b.with_secret_access_key(v);
    }
    if let Some(v) = &s3.session_token {
        b = b.with_token(v);
    }
    b
}

fn gcs_builder(gcs: &GcsStoreConfig, retry: RetryConfig) -> GoogleCloudStorageBuilder {
    let mut b = GoogleCloudStorageBuilder::from_env().with_retry(retry);
    if let Some(v) = &gcs.bucket {
        b = b.with_bucket_name(v);
    }
    if let Some(v) = &gcs.service_account_path {
        b = b.with_service_account_path(v.to_string_lossy());
    }
    if let Some(v) = &gcs.service_account_key {
        b = b.with_service_account_key(v);
    }
    b
}

fn azure_builder(az: &AzureStoreConfig, retry: RetryConfig) -> MicrosoftAzureBuilder {
    let mut b = MicrosoftAzureBuilder::from_env()
        .with_retry(retry)
        .with_allow_http(az.allow_http)
        .with_use_emulator(az.use_emulator);
    if let Some(v) = &az.account {
        b = b.with_account(v);
    }
    if let Some(v) = &az.container {
        b = b.with_container_name(v);
    }
    if let Some(v) = &az.access_key {
        b = b.with_access_key(v);
    }
    if let Some(v) = &az.endpoint {
        b = b.with_endpoint(v.clone());
    }
    b
}

/// Build the configured store, with the prefix applied.
pub fn build_store(config: &StoreConfig) -> Result<Arc<dyn ObjectStore>> {
    let retry = config.retry.to_retry_config();
    let cfg_err = |e: object_store::Error| Error::Config(e.to_string());
    let store: Arc<dyn ObjectStore> = match &config.backend {
        StoreBackend::Local(local) => {
            std::fs::create_dir_all(&local.root).map_err(|e| Error::io(&local.root, e))?;
            Arc::new(LocalFileSystem::new_with_prefix(&local.root).map_err(cfg_err)?)
        }
        StoreBackend::S3(s3) => {
            let b = s3_builder(s3, retry);
            Arc::new(b.build().map_err(cfg_err)?)
        }
        StoreBackend::Gcs(gcs) => {
            let b = gcs_builder(gcs, retry);
            Arc::new(b.build().map_err(cfg_err)?)
        }
        StoreBackend::Azure(az) => {
            let b = azure_builder(az, retry);
            Arc::new(b.build().map_err(cfg_err)?)
        }
    };
    let prefix = prefix_path(&config.prefix);
    if prefix.as_ref().is_empty() {
        Ok(store)
    } else {
        Ok(Arc::new(PrefixStore::new(store, prefix)))
    }
}

fn prefix_path(prefix: &str) -> ObjectPath {
    key(prefix.split('/').filter(|p| !p.is_empty()))
}

/// Longest component we produce, in bytes. Well under S3's 1024-byte key limit even with a
/// handful of components, and under the 255-byte file name limit of local filesystems.
pub const MAX_COMPONENT_LEN: usize = 96;

/// Turn an arbitrary string into one safe key component.
///
/// Keeps `[A-Za-z0-9._-]`, replaces everything else by `_`, never starts with `.` (so no `.`,
/// `..` or hidden files), and caps the length. When anything had to change, a short hash of the
/// original is appended so that distinct inputs (`!a:b` and `!a_b`) stay distinct keys. A string
/// that is already safe comes back unchanged, which keeps keys readable.
pub fn key_component(raw: &str) -> String {
    let mut out: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if out.starts_with('.') {
        out.replace_range(0..1, "_");
    }
    let changed = out != raw || out.is_empty() || out.len() > MAX_COMPONENT_LEN;
    if !changed {
        return out;
    }
    let digest = hex::encode(&Sha256::digest(raw.as_bytes())[..5]);
    // Output is pure ASCII here, so byte truncation is char-safe.
    out.truncate(MAX_COMPONENT_LEN - digest.len() - 1);
    if out.is_empty() {
        digest
    } else {
        format!("{out}-{digest}")
    }
}

/// Join raw strings into a key, sanitizing each one.
pub fn key<I, S>(components: I) -> ObjectPath
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    ObjectPath::from_iter(
        components
            .into_iter()
            .map(|c| PathPart::from(key_component(c.as_ref()))),
    )
}

/// The key layout of a recording. Every key is relative to the store (the prefix is applied by
/// the store), and every component is sanitized.
///
/// ```text
/// rooms/<room>/recordings/<recording>/manifest.json
/// rooms/<room>/recordings/<recording>/tracks/<track>/<index:06>.<ext>
/// rooms/<room>/recordings/<recording>/<name>           (composites, e.g. call.mp4)
/// ```
#[derive(Clone, Debug)]
pub struct ObjectKeys {
    room: String,
    recording: String,
}

impl ObjectKeys {
    pub fn new(room: &crate::RoomId, recording: &crate::RecordingId) -> Self {
        Self {
            room: room.as_str().to_owned(),
            recording: recording.as_str().to_owned(),
        }
    }

    fn base(&self) -> [&str; 4] {
        ["rooms", &self.room, "recordings", &self.recording]
    }

    pub fn manifest(&self) -> ObjectPath {
        key(self.base().into_iter().chain(["manifest.json"]))
    }

    pub fn segment(&self, track: &crate::TrackId, index: u32, ext: &str) -> ObjectPath {
        let file = format!("{index:06}.{ext}");
        key(self
            .base()
            .into_iter()
            .chain(["tracks", track.as_str(), &file]))
    }

    pub fn output(&self, file_name: &str) -> ObjectPath {
        key(self.base().into_iter().chain([file_name]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_safe(c: &str) {
        assert!(!c.is_empty(), "empty component");
        assert!(c.len() <= MAX_COMPONENT_LEN, "too long: {} bytes", c.len());
        assert!(!c.starts_with('.'), "starts with dot: {c}");
        assert!(
            c.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)),
            "unsafe char in {c:?}"
        );
    }

    #[test]
    fn safe_strings_are_unchanged() {
        for s in ["abc", "call.mp4", "000001.webm", "A-b_c.9"] {
            assert_eq!(key_component(s), s);
        }
    }

    #[test]
    fn hostile_strings_become_safe_components() {
        let long = "x".repeat(10_000);
        let nasty = [
            "",
            ".",
            "..",
            "../../etc/passwd",
            "/",
            "a/b",
            "a\\b",
            "a\0b",
            "\u{1b}[31mred",
            "\n\r\t",
            ".hidden",
            "!abc:example.org",
            "@alice:example.org",
            "Ålice 🙂 <script>",
            "%2e%2e",
            long.as_str(),
        ];
        for s in nasty {
            let c = key_component(s);
            assert_safe(&c);
            assert!(!c.contains('/') && c != "." && c != "..", "{s:?} -> {c:?}");
        }
    }

    #[test]
    fn altered_strings_keep_distinct_keys() {
        let a = key_component("!abc:example.org");
        let b = key_component("!abc_example.org");
        let c = key_component("_abc_example.org");
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert!(a.starts_with("_abc_example.org-"), "{a}");
        // Deterministic: the same room always lands in the same directory.
        assert_eq!(a, key_component("!abc:example.org"));
        let l1 = key_component(&"y".repeat(500));
        let l2 = key_component(&"y".repeat(501));
        assert_ne!(l1, l2);
    }

    #[test]
    fn keys_cannot_escape_the_layout() {
        let keys = ObjectKeys::new(&"../..".into(), &"../../x".into());
        let k = keys.segment(&"/etc/passwd".into(), 7, "webm").to_string();
        assert!(k.starts_with("rooms/"), "{k}");
        assert_eq!(k.split('/').count(), 7, "{k}");
        assert!(
            k.split('/').all(|p| p != ".." && p != "." && !p.is_empty()),
            "{k}"
        );
        assert!(k.ends_with("/000007.webm"), "{k}");
        assert_eq!(
            prefix_path("a/../b//c").to_string(),
            format!("a/{}/b/c", key_component(".."))
        );
    }

    #[test]
    fn config_defaults_to_local_and_parses_s3() {
        let c: StoreConfig = toml::from_str("").unwrap();
        assert_eq!(c.backend, StoreBackend::Local(LocalStoreConfig::default()));
        let c: StoreConfig = toml::from_str(
            r#"
            kind = "s3"
            endpoint = "http://127.0.0.1:3900"
            bucket = "b"
            region = "garage"
            allow_http = true
            prefix = "mxrec"
            [retry]
            max_retries = 7
            "#,
        )
        .unwrap();
        let StoreBackend::S3(s3) = &c.backend else {
            panic!("{c:?}")
        };
        assert_eq!(s3.bucket.as_deref(), Some("b"));
        assert!(s3.allow_http && !s3.virtual_hosted_style);
        assert_eq!(c.prefix, "mxrec");
        assert_eq!(c.retry.max_retries, 7);
        assert_eq!(c.retry.max_backoff_ms, 2_000, "unset keys keep their defaults");

        let c: StoreConfig = toml::from_str("prefix = \"p\"\nroot = \"/srv/rec\"").unwrap();
        assert_eq!(
            c.backend,
            StoreBackend::Local(LocalStoreConfig {
                root: "/srv/rec".into()
            })
        );
        for bad in [
            "kind = \"s4\"",
            "kind = \"s3\"\nbukket = \"x\"",
            "[retry]\nmax_retry = 1",
        ] {
            assert!(toml::from_str::<StoreConfig>(bad).is_err(), "{bad}");
        }
        // What we write we can read.
        let text = toml::to_string(&c).unwrap();
        assert_eq!(toml::from_str::<StoreConfig>(&text).unwrap(), c);
    }
}

// ---- presigning ----
//
// `build_store` hands out an `Arc<dyn ObjectStore>`, which has forgotten that the backend can sign
// URLs. The HTTP side needs that ability to redirect a download to the store instead of streaming
// it through mxrec, so the same configuration is built a second time here as a `Signer`, with the
// same prefix wrapping, so a signed key means the same object as a stored one.

/// A URL presigner for the configured store, or `None` for backends that have no URLs of their
/// own (the local filesystem), whose objects must be served by mxrec itself.
pub fn build_signer(config: &StoreConfig) -> Result<Option<Arc<dyn object_store::signer::Signer>>> {
    use object_store::signer::Signer;

    fn prefixed<T: ObjectStore + Signer>(store: T, prefix: &str) -> Arc<dyn Signer> {
        let prefix = prefix_path(prefix);
        if prefix.as_ref().is_empty() {
            Arc::new(store)
        } else {
            Arc::new(PrefixStore::new(store, prefix))
        }
    }

    let retry = config.retry.to_retry_config();
    let cfg_err = |e: object_store::Error| Error::Config(e.to_string());
    Ok(match &config.backend {
        StoreBackend::Local(_) => None,
        StoreBackend::S3(s3) => {
            let b = s3_builder(s3, retry);
            Some(prefixed(b.build().map_err(cfg_err)?, &config.prefix))
        }
        StoreBackend::Gcs(gcs) => {
            let b = gcs_builder(gcs, retry);
            Some(prefixed(b.build().map_err(cfg_err)?, &config.prefix))
        }
        StoreBackend::Azure(az) => {
            let b = azure_builder(az, retry);
            Some(prefixed(b.build().map_err(cfg_err)?, &config.prefix))
        }
    })
}

#[cfg(test)]
mod signer_tests {
    use super::*;

    #[tokio::test]
    async fn s3_signer_applies_the_prefix_and_local_has_none() {
        assert!(build_signer(&StoreConfig::default()).unwrap().is_none());
        let cfg: StoreConfig = toml::from_str(
            "kind = \"s3\"\nendpoint = \"http://127.0.0.1:3900\"\nbucket = \"b\"\nregion = \"garage\"\n\
             allow_http = true\nprefix = \"p/q\"\naccess_key_id = \"GK1\"\nsecret_access_key = \"s\"\n",
        )
        .unwrap();
        let signer = build_signer(&cfg).unwrap().expect("s3 signs");
        let url = signer
            .signed_url(
                object_store::signer::Method::GET,
                &ObjectPath::from("rooms/a/x.mp4"),
                Duration::from_secs(60),
            )
            .await
            .unwrap();
        assert!(
            url.as_str()
                .starts_with("http://127.0.0.1:3900/b/p/q/rooms/a/x.mp4?"),
            "{url}"
        );
        assert!(url.query().unwrap().contains("X-Amz-Expires=60"), "{url}");
    }
}
