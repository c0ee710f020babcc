//! Share links: an unguessable token that lets whoever holds it fetch one object of one recording
//! until the link expires or is revoked.
//!
//! A token is 256 bits from the operating system's CSPRNG, written as 43 characters of URL-safe
//! base64. The catalog stores only its SHA-256, so the database (or a backup of it) cannot be
//! turned back into working links, and the token itself exists only in the issued URL. Issuing and
//! revoking land in the audit trail; so does every use, from the download handler.
//!
//! A members-only link ([`Links::issue_members_only`]) names a Matrix room as well: holding the
//! token is not enough, the person opening it must also prove (see [`super::members`]) that they
//! are a current member of that room.

use std::fmt;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use chrono::{DateTime, Utc};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt};
use rand::RngCore;
use sha2::{Digest, Sha256};
use storage::catalog::{LinkRecord, LinkRefusal};
use storage::{now_ms, Catalog, Manifest, RecordingId};

use crate::config::HttpConfig;

/// Random bytes in a token.
const TOKEN_BYTES: usize = 32;
/// Characters of a token: unpadded base64 of [`TOKEN_BYTES`].
pub const TOKEN_LEN: usize = (TOKEN_BYTES * 4).div_ceil(3);

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("recording {0} is not in the catalog; no link was issued")]
    UnknownRecording(RecordingId),
    #[error("recording {recording} has no {what} yet (state: {state}); links are issued once it is stored")]
    NotStored { recording: RecordingId, what: &'static str, state: String },
    #[error("`{0}` is not a valid object key")]
    BadKey(String),
    #[error("`{0}` is not a Matrix room id like !abc:example.org; no link was issued")]
    BadRoom(String),
    #[error("reading the manifest of recording {recording}: {reason}")]
    Manifest { recording: RecordingId, reason: String },
    #[error(transparent)]
    Catalog(#[from] storage::Error),
}

/// An issued link. Holds the token in clear: print it or send it, never log it.
#[derive(Clone)]
pub struct Link {
    pub token: String,
    /// `<http.public_url>/r/<token>`.
    pub url: String,
    pub expires_at: DateTime<Utc>,
    pub recording_id: RecordingId,
    pub object_key: String,
    /// A short, non-secret name of the link (a prefix of the token's hash) for logs and audit.
    pub id: String,
    /// Set for a members-only link: the room whose current members may open it.
    pub members_room: Option<String>,
}

impl fmt::Debug for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Link")
            .field("id", &self.id)
            .field("recording_id", &self.recording_id)
            .field("object_key", &self.object_key)
            .field("expires_at", &self.expires_at)
            .field("members_room", &self.members_room)
            .finish_non_exhaustive()
    }
}

/// What a token turned out to be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup {
    Valid(LinkRecord),
    Refused(LinkRecord, LinkRefusal),
    /// Malformed, or no such link.
    Unknown,
}

/// Issues, looks up and revokes links. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Links {
    catalog: Catalog,
    public_base: String,
    default_ttl: Duration,
}

impl Links {
    pub fn new(catalog: Catalog, config: &HttpConfig) -> Self {
        Self { catalog, public_base: config.public_base().to_owned(), default_ttl: config.link_ttl() }
    }

    /// `http.link_ttl_hours`.
    pub fn default_ttl(&self) -> Duration {
        self.default_ttl
    }

    /// A new link to `object_key` (relative to the store) of `recording`, valid for `ttl`.
    pub async fn issue(&self, recording: &RecordingId, object_key: &str, ttl: Duration) -> Result<Link, LinkError> {
        self.issue_link(recording, object_key, ttl, None).await
    }

    /// A new members-only link: like [`Links::issue`], and it opens only for someone who proves
    /// with a Matrix OpenID token that they are a current member of `room_id` when they open it.
    pub async fn issue_members_only(
        &self,
        recording: &RecordingId,
        object_key: &str,
        ttl: Duration,
        room_id: &str,
    ) -> Result<Link, LinkError> {
        if !is_room_id(room_id) {
            return Err(LinkError::BadRoom(room_id.to_owned()));
        }
        self.issue_link(recording, object_key, ttl, Some(room_id)).await
    }

    async fn issue_link(
        &self,
        recording: &RecordingId,
        object_key: &str,
        ttl: Duration,
        members_room: Option<&str>,
    ) -> Result<Link, LinkError> {
        let key = ObjectPath::parse(object_key).map_err(|_| LinkError::BadKey(object_key.to_owned()))?;
        if key.as_ref().is_empty() {
            return Err(LinkError::BadKey(object_key.to_owned()));
        }
        if self.catalog.get_recording(recording).await?.is_none() {
            return Err(LinkError::UnknownRecording(recording.clone()));
        }
        let token = mint_token();
        let hash = hash_token(&token);
        let now = now_ms();
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        let expires_at_ms = now.saturating_add(ttl_ms);
        let record = LinkRecord {
            token_hash: hash.clone(),
            recording_id: recording.clone(),
            object_key: key.to_string(),
            created_at_ms: now,
            expires_at_ms: Some(expires_at_ms),
            revoked_at_ms: None,
            members_room: members_room.map(str::to_owned),
        };
        self.catalog.insert_link(&record).await?;
        let id = link_id(&hash).to_owned();
        self.catalog
            .audit(
                "mxrec",
                "link.issued",
                Some(recording),
                serde_json::json!({
                    "link": id,
                    "object_key": record.object_key,
                    "expires_at_ms": expires_at_ms,
                    "members_room": record.members_room,
                }),
            )
            .await?;
        Ok(Link {
            url: format!("{}/r/{token}", self.public_base),
            token,
            expires_at: DateTime::from_timestamp_millis(expires_at_ms).unwrap_or(DateTime::<Utc>::MAX_UTC),
            recording_id: recording.clone(),
            object_key: record.object_key,
            id,
            members_room: record.members_room,
        })
    }

    /// Revokes every link of a recording; returns how many were still unrevoked.
    pub async fn revoke_recording(&self, recording: &RecordingId) -> Result<u64, LinkError> {
        if self.catalog.get_recording(recording).await?.is_none() {
            return Err(LinkError::UnknownRecording(recording.clone()));
        }
        let n = self.catalog.revoke_links_of_recording(recording, now_ms()).await?;
        self.catalog.audit("mxrec", "link.revoked", Some(recording), serde_json::json!({ "count": n })).await?;
        Ok(n)
    }

    /// Revokes one link by its token; `false` if there was no such unrevoked link.
    pub async fn revoke(&self, token: &str) -> Result<bool, LinkError> {
        let (Lookup::Valid(link) | Lookup::Refused(link, _)) = self.lookup(token).await? else {
            return Ok(false);
        };
        let done = self.catalog.revoke_link(&link.token_hash, now_ms()).await?;
        if done {
            self.catalog
                .audit(
                    "mxrec",
                    "link.revoked",
                    Some(&link.recording_id),
                    serde_json::json!({ "link": link_id(&link.token_hash), "count": 1 }),
                )
                .await?;
        }
        Ok(done)
    }

    /// What `token` is worth now. A malformed token is not looked up at all.
    pub async fn lookup(&self, token: &str) -> Result<Lookup, LinkError> {
        if !is_well_formed(token) {
            return Ok(Lookup::Unknown);
        }
        Ok(match self.catalog.link_by_token_hash(&hash_token(token)).await? {
            None => Lookup::Unknown,
            Some(link) => match link.check(now_ms()) {
                Ok(()) => Lookup::Valid(link),
                Err(why) => Lookup::Refused(link, why),
            },
        })
    }
}

fn mint_token() -> String {
    let mut bytes = [0u8; TOKEN_BYTES];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Lowercase hex SHA-256 of a token: the only form the catalog keeps.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// The non-secret short name of a link, from its hash.
pub fn link_id(token_hash: &str) -> &str {
    &token_hash[..token_hash.len().min(16)]
}

/// A room id as the Matrix spec shapes it: `!` and an opaque part, usually `:server` after it
/// (room version 12 ids have none). At most 255 bytes, no whitespace or control characters.
pub fn is_room_id(s: &str) -> bool {
    s.len() <= 255
        && s.strip_prefix('!').is_some_and(|rest| !rest.is_empty() && !rest.starts_with(':'))
        && s.chars().all(|c| !c.is_whitespace() && !c.is_control())
}

fn is_well_formed(token: &str) -> bool {
    token.len() == TOKEN_LEN && token.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Which objects of a recording `mxrec links create` issues links for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum What {
    /// The composite MP4 (or M4A).
    Composite,
    /// The JSON manifest.
    Manifest,
    /// Every segment of every track.
    AllTracks,
}

/// One object a link can be issued for, with a label saying what it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shareable {
    pub label: String,
    pub key: String,
}

/// The objects of `recording` that `what` names, read from its stored manifest (segments from the
/// catalog, which has them before a manifest exists).
pub async fn shareable_objects(
    catalog: &Catalog,
    store: &dyn ObjectStore,
    recording: &RecordingId,
    what: What,
) -> Result<Vec<Shareable>, LinkError> {
    let rec = catalog.get_recording(recording).await?.ok_or_else(|| LinkError::UnknownRecording(recording.clone()))?;
    let not_stored = |what| LinkError::NotStored { recording: recording.clone(), what, state: rec.state.to_string() };
    match what {
        What::AllTracks => {
            let mut out = Vec::new();
            for track in catalog.tracks(recording).await? {
                for s in catalog.segments(recording, &track.id).await? {
                    out.push(Shareable { label: format!("track {} segment {}", track.id, s.index), key: s.object_key });
                }
            }
            if out.is_empty() {
                return Err(not_stored("track segments"));
            }
            Ok(out)
        }
        What::Manifest => {
            let key = rec.manifest_key.clone().ok_or_else(|| not_stored("manifest"))?;
            Ok(vec![Shareable { label: "manifest".into(), key }])
        }
        What::Composite => {
            let key = rec.manifest_key.clone().ok_or_else(|| not_stored("manifest"))?;
            let manifest_err = |reason: String| LinkError::Manifest { recording: recording.clone(), reason };
            let path = ObjectPath::parse(&key).map_err(|e| manifest_err(e.to_string()))?;
            let bytes =
                async { store.get(&path).await?.bytes().await }.await.map_err(|e| manifest_err(e.to_string()))?;
            let manifest = Manifest::from_json(&bytes).map_err(|e| manifest_err(e.to_string()))?;
            let out: Vec<Shareable> = manifest
                .outputs
                .iter()
                .map(|o| Shareable { label: format!("composite ({})", o.kind.as_str()), key: o.key.clone() })
                .collect();
            if out.is_empty() {
                return Err(not_stored("composite"));
            }
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_long_random_and_url_safe() {
        let a = mint_token();
        let b = mint_token();
        assert_ne!(a, b);
        assert_eq!(a.len(), TOKEN_LEN);
        assert_eq!(TOKEN_LEN, 43);
        assert!(is_well_formed(&a), "{a}");
        assert_eq!(hash_token(&a).len(), 64);
        assert_ne!(hash_token(&a), hash_token(&b));
    }

    #[test]
    fn room_ids_are_recognised() {
        for ok in ["!abc:example.org", "!abc:localhost:8448", "!31hneApxJ_1o-63DmFrpeqnkFfWppnzWso1JvH3ogLM"] {
            assert!(is_room_id(ok), "{ok}");
        }
        for bad in ["", "!", "!:x", "abc:example.org", "#alias:example.org", "!a b:x", "!a\n:x", &format!("!{}", "a".repeat(255))] {
            assert!(!is_room_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn malformed_tokens_are_recognised() {
        let ok = "A".repeat(TOKEN_LEN);
        assert!(is_well_formed(&ok));
        for bad in [
            "",
            "abc",
            &"A".repeat(TOKEN_LEN + 1),
            &format!("{}=", "A".repeat(TOKEN_LEN - 1)),
            &format!("{}é", "A".repeat(TOKEN_LEN - 2)),
        ] {
            assert!(!is_well_formed(bad), "{bad:?}");
        }
    }
}
