//! Members-only links: opened only by someone who is a member of the recording's room right now.
//!
//! Holding the token of such a link is not enough. `GET /r/<token>` without more answers 401 with
//! a small page (`members_page.html`, no external assets) whose own script signs in at the
//! visitor's homeserver, asks it for a Matrix OpenID token, signs out again, and posts that token
//! to `POST /r/<token>/openid`. There mxrec checks the token at its homeserver ([`super::openid`]),
//! asks [`RoomMembership`] whether that user is joined to the link's room, and answers with a
//! grant: an HMAC under a key of this process over the link, the user and an expiry
//! ([`GRANT_TTL`]). `GET /r/<token>?grant=…` then serves the file as for any link, and the
//! audit trail names the user. Grants are not stored anywhere: a restart invalidates them all,
//! which costs a visitor one more sign-in.
//!
//! Who is a member is not mxrec's to decide but the homeserver's, seen through some Matrix
//! account in the room: the bot's under `mxrec run`, or [`ClientApiMembership`] with any account
//! that can read the room's state. Without one (`mxrec serve` alone), members-only links answer 503.

use std::fmt;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use anyhow::{bail, Context};
use async_trait::async_trait;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use reqwest::Url;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use storage::catalog::LinkRecord;
use storage::{now_ms, UserId};
use tracing::{info, warn};

use super::links::{link_id, Lookup};
use super::metrics::link_fetch;
use super::openid::{OpenIdError, OpenIdProof};
use super::HttpState;

/// How long a grant opens its link after the membership check.
pub const GRANT_TTL: Duration = Duration::from_secs(10 * 60);
/// Largest `POST /r/<token>/openid` body read.
const MAX_PROOF_BYTES: usize = 8 * 1024;
/// Longest grant looked at.
const MAX_GRANT_LEN: usize = 1024;

/// Whether a Matrix user is in a room right now, as some Matrix account sees it.
#[async_trait]
pub trait RoomMembership: Send + Sync {
    /// `true` when `user_id` is joined to `room_id` (invited, left, banned or never there: `false`).
    /// An error means the answer could not be found out; the visitor is told to try again later.
    async fn is_joined(&self, room_id: &str, user_id: &str) -> anyhow::Result<bool>;
}

/// [`RoomMembership`] through the client-server API with an account in the room:
/// `GET /_matrix/client/v3/rooms/{roomId}/state/m.room.member/{userId}`.
pub struct ClientApiMembership {
    /// Base URL of the account's homeserver client API, e.g. `https://matrix.example.org`.
    pub homeserver_url: String,
    access_token: String,
    http: reqwest::Client,
}

impl ClientApiMembership {
    pub fn new(homeserver_url: impl Into<String>, access_token: impl Into<String>) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .context("building the HTTP client for membership checks")?;
        Ok(Self { homeserver_url: homeserver_url.into(), access_token: access_token.into(), http })
    }
}

impl fmt::Debug for ClientApiMembership {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientApiMembership").field("homeserver_url", &self.homeserver_url).finish_non_exhaustive()
    }
}

#[async_trait]
impl RoomMembership for ClientApiMembership {
    async fn is_joined(&self, room_id: &str, user_id: &str) -> anyhow::Result<bool> {
        #[derive(Deserialize)]
        struct Member {
            membership: String,
        }
        let mut url = Url::parse(&self.homeserver_url)
            .with_context(|| format!("homeserver URL `{}` for membership checks", self.homeserver_url))?;
        url.path_segments_mut()
            .map_err(|()| anyhow::anyhow!("`{}` is not a base URL", self.homeserver_url))?
            .pop_if_empty()
            .extend(["_matrix", "client", "v3", "rooms", room_id, "state", "m.room.member", user_id]);
        let answer = self
            .http
            .get(url)
            .bearer_auth(&self.access_token)
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("asking {} about {user_id} in {room_id}: {e}", self.homeserver_url))?;
        let status = answer.status();
        let body = answer.bytes().await.unwrap_or_default();
        match status.as_u16() {
            200 => {
                let m: Member = serde_json::from_slice(&body)
                    .with_context(|| format!("the m.room.member state of {user_id} in {room_id}"))?;
                Ok(m.membership == "join")
            }
            // No membership event at all: never was in the room.
            404 => Ok(false),
            _ => {
                let text: String = String::from_utf8_lossy(&body).chars().take(300).collect();
                bail!(
                    "{} answered HTTP {status} about {user_id} in {room_id} (is the checking account in \
                     that room?): {text}",
                    self.homeserver_url
                )
            }
        }
    }
}

/// Mints and checks grants. The key lives only in this process.
pub struct Grants {
    key: [u8; 32],
}

impl fmt::Debug for Grants {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Grants { key: <redacted> }")
    }
}

impl Default for Grants {
    fn default() -> Self {
        Self::new()
    }
}

/// Why a grant does not open a link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GrantRefusal {
    Malformed,
    /// Not made by this process for this link (or tampered with).
    NotValid,
    Expired,
}

impl GrantRefusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Malformed => "grant_malformed",
            Self::NotValid => "grant_not_valid",
            Self::Expired => "grant_expired",
        }
    }
}

impl Grants {
    pub fn new() -> Self {
        let mut key = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut key);
        Self { key }
    }

    fn mac(&self, token_hash: &str, user: &str, expires_at_ms: i64) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes a key of any length");
        // The token hash has a fixed length and the expiry is digits only, so the fields cannot
        // run into each other.
        for part in ["mxrec members-only grant v1", token_hash, user, &expires_at_ms.to_string()] {
            mac.update(part.as_bytes());
            mac.update(b"\n");
        }
        mac
    }

    /// A grant of the link whose token hashes to `token_hash`, for `user`, from `now_ms` on;
    /// with its expiry.
    pub fn issue(&self, token_hash: &str, user: &UserId, now_ms: i64) -> (String, i64) {
        let expires_at_ms = now_ms.saturating_add(GRANT_TTL.as_millis() as i64);
        let tag = self.mac(token_hash, user.as_str(), expires_at_ms).finalize().into_bytes();
        let grant =
            format!("{}.{expires_at_ms}.{}", URL_SAFE_NO_PAD.encode(user.as_str()), URL_SAFE_NO_PAD.encode(tag));
        (grant, expires_at_ms)
    }

    /// The user a grant was made for, if it opens this link at `now_ms`.
    pub fn check(&self, token_hash: &str, grant: &str, now_ms: i64) -> Result<UserId, GrantRefusal> {
        if grant.len() > MAX_GRANT_LEN {
            return Err(GrantRefusal::Malformed);
        }
        let parts: Vec<&str> = grant.split('.').collect();
        let [user, expires, tag] = parts[..] else {
            return Err(GrantRefusal::Malformed);
        };
        let user = URL_SAFE_NO_PAD
            .decode(user)
            .ok()
            .and_then(|u| String::from_utf8(u).ok())
            .ok_or(GrantRefusal::Malformed)?;
        if expires.is_empty() || !expires.bytes().all(|b| b.is_ascii_digit()) {
            return Err(GrantRefusal::Malformed);
        }
        let expires_at_ms: i64 = expires.parse().map_err(|_| GrantRefusal::Malformed)?;
        let tag = URL_SAFE_NO_PAD.decode(tag).map_err(|_| GrantRefusal::Malformed)?;
        self.mac(token_hash, &user, expires_at_ms).verify_slice(&tag).map_err(|_| GrantRefusal::NotValid)?;
        if expires_at_ms <= now_ms {
            return Err(GrantRefusal::Expired);
        }
        Ok(UserId::new(user))
    }
}

/// The `grant` parameter of a query string. Grants are URL-safe, so no decoding is needed; a
/// percent-encoded one simply does not check.
fn grant_param(query: Option<&str>) -> Option<&str> {
    query?.split('&').find_map(|kv| kv.strip_prefix("grant="))
}

/// Decides a `GET` on a members-only link: `Ok(user)` when it carries a valid grant, otherwise
/// the answer to send (the page, 403 or 503), audited.
pub(crate) async fn admit(state: &HttpState, link: &LinkRecord, query: Option<&str>) -> Result<UserId, Response> {
    let id = link_id(&link.token_hash);
    if state.membership.is_none() {
        refuse_audit(state, link, "membership_unavailable", None, None).await;
        link_fetch("failed");
        return Err(text(StatusCode::SERVICE_UNAVAILABLE, NO_MEMBERSHIP));
    }
    let Some(grant) = grant_param(query) else {
        refuse_audit(state, link, "proof_required", None, None).await;
        link_fetch("challenged");
        return Err(page());
    };
    match state.grants.check(&link.token_hash, grant, now_ms()) {
        Ok(user) => Ok(user),
        Err(why) => {
            info!(link = id, reason = why.as_str(), "refused a members-only link request with a bad grant");
            refuse_audit(state, link, why.as_str(), None, None).await;
            link_fetch("refused");
            Err(text(StatusCode::FORBIDDEN, BAD_GRANT))
        }
    }
}

/// `POST /r/<token>/openid`: checks an OpenID token and room membership, answers with a grant.
pub(crate) async fn prove(State(state): State<Arc<HttpState>>, Path(token): Path<String>, body: Body) -> Response {
    let link = match state.links.lookup(&token).await {
        Ok(Lookup::Valid(link)) => link,
        Ok(Lookup::Unknown) => {
            link_fetch("refused");
            return super::download::refused();
        }
        Ok(Lookup::Refused(link, why)) => {
            link_fetch("refused");
            let detail = serde_json::json!({ "link": link_id(&link.token_hash), "reason": why });
            if let Err(e) = state.catalog.audit("http", "link.refused", Some(&link.recording_id), detail).await {
                warn!(link = link_id(&link.token_hash), error = %e, "cannot audit a refused link request");
            }
            return super::download::refused();
        }
        Err(e) => {
            warn!(error = %e, "cannot look up a link in the catalog; answering 503");
            link_fetch("failed");
            return super::download::unavailable();
        }
    };
    let id = link_id(&link.token_hash).to_owned();
    let Some(room) = link.members_room.clone() else {
        return json_error(StatusCode::BAD_REQUEST, "not_members_only", "This link needs no proof: open it directly.");
    };
    let Some(membership) = state.membership.clone() else {
        refuse_audit(&state, &link, "membership_unavailable", None, None).await;
        link_fetch("failed");
        return json_error(StatusCode::SERVICE_UNAVAILABLE, "membership_unavailable", NO_MEMBERSHIP.trim_end());
    };
    let body = match axum::body::to_bytes(body, MAX_PROOF_BYTES).await {
        Ok(b) => b,
        Err(_) => {
            refuse_audit(&state, &link, "malformed", None, None).await;
            link_fetch("refused");
            return json_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "malformed",
                &format!("The proof must be a JSON body of at most {MAX_PROOF_BYTES} bytes."),
            );
        }
    };
    let proof = match OpenIdProof::parse(&body) {
        Ok(p) => p,
        Err(e) => return openid_refusal(&state, &link, None, e).await,
    };
    let server = proof.matrix_server_name.clone();
    let user = match state.openid.verify(&proof).await {
        Ok(u) => u,
        Err(e) => return openid_refusal(&state, &link, Some(&server), e).await,
    };
    match membership.is_joined(&room, user.as_str()).await {
        Ok(true) => {}
        Ok(false) => {
            info!(link = id, user = %user, "refused a members-only link: not a member of the room");
            refuse_audit(&state, &link, "not_a_member", Some(&user), Some(&server)).await;
            link_fetch("refused");
            let msg = format!(
                "{user} is not a member of the room this recording was made in, so this link does not open for \
                 them. Join the room (or ask to be invited) and try again."
            );
            return json_error(StatusCode::FORBIDDEN, "not_a_member", &msg);
        }
        Err(e) => {
            warn!(link = id, user = %user, error = format!("{e:#}"), "cannot check room membership; answering 503");
            refuse_audit(&state, &link, "membership_check_failed", Some(&user), Some(&server)).await;
            link_fetch("failed");
            return json_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "membership_check_failed",
                "Room membership cannot be checked right now; try again later.",
            );
        }
    }
    let (grant, expires_at_ms) = state.grants.issue(&link.token_hash, &user, now_ms());
    let detail = serde_json::json!({
        "link": id,
        "user": user,
        "matrix_server_name": server,
        "members_room": room,
        "expires_at_ms": expires_at_ms,
    });
    if let Err(e) = state.catalog.audit("http", "link.granted", Some(&link.recording_id), detail).await {
        warn!(link = id, error = %e, "cannot audit a members-only grant; refusing it");
        link_fetch("failed");
        return super::download::unavailable();
    }
    info!(link = id, user = %user, "granted a members-only link");
    link_fetch("granted");
    let body = serde_json::json!({ "grant": grant, "expires_at_ms": expires_at_ms, "user_id": user });
    json(StatusCode::OK, &body)
}

async fn openid_refusal(state: &HttpState, link: &LinkRecord, server: Option<&str>, e: OpenIdError) -> Response {
    let status = match e {
        OpenIdError::Malformed(_) => StatusCode::BAD_REQUEST,
        OpenIdError::NotValid { .. } | OpenIdError::WrongServer { .. } => StatusCode::FORBIDDEN,
        OpenIdError::Unreachable { .. } => StatusCode::BAD_GATEWAY,
    };
    let user = match &e {
        OpenIdError::WrongServer { user, .. } => Some(UserId::new(user.clone())),
        _ => None,
    };
    info!(link = link_id(&link.token_hash), server, reason = e.reason(), error = %e, "refused an OpenID proof");
    refuse_audit(state, link, e.reason(), user.as_ref(), server).await;
    link_fetch(if status == StatusCode::BAD_GATEWAY { "failed" } else { "refused" });
    let mut msg = e.to_string();
    if let Some(first) = msg.get(..1) {
        msg = first.to_uppercase() + &msg[1..];
    }
    json_error(status, e.reason(), &format!("{msg}."))
}

/// Appends `link.refused` for a members-only link; a failure to do so is logged, the answer
/// stays a refusal.
async fn refuse_audit(
    state: &HttpState,
    link: &LinkRecord,
    reason: &str,
    user: Option<&UserId>,
    server: Option<&str>,
) {
    let detail = serde_json::json!({
        "link": link_id(&link.token_hash),
        "reason": reason,
        "members_room": link.members_room,
        "user": user,
        "matrix_server_name": server,
    });
    if let Err(e) = state.catalog.audit("http", "link.refused", Some(&link.recording_id), detail).await {
        warn!(link = link_id(&link.token_hash), error = %e, "cannot audit a refused members-only link request");
    }
}

const NO_MEMBERSHIP: &str = "This link is only for members of the Matrix room the recording was made in, and this \
server has no Matrix account to check room membership with. Ask whoever shared it to share it from the \
recording bot, or for a plain link.\n";
const BAD_GRANT: &str = "This access grant is not valid for this link or has expired (grants last 10 minutes). \
Open the link without it to prove your room membership again.\n";

fn text(status: StatusCode, body: &'static str) -> Response {
    (status, [(header::CACHE_CONTROL, "no-store")], body).into_response()
}

fn json(status: StatusCode, body: &serde_json::Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json"), (header::CACHE_CONTROL, "no-store")],
        body.to_string(),
    )
        .into_response()
}

fn json_error(status: StatusCode, reason: &str, message: &str) -> Response {
    json(status, &serde_json::json!({ "reason": reason, "error": message }))
}

/// The page, and a Content-Security-Policy that lets exactly its own inline script run.
static PAGE: LazyLock<(Bytes, HeaderValue)> = LazyLock::new(|| {
    let html = include_str!("members_page.html");
    let script = html
        .split_once("<script>")
        .and_then(|(_, rest)| rest.split_once("</script>"))
        .map(|(s, _)| s)
        .expect("members_page.html has one inline <script>");
    let hash = STANDARD.encode(Sha256::digest(script.as_bytes()));
    // connect-src: the script talks to the visitor's homeserver, wherever that is.
    let csp = format!(
        "default-src 'none'; script-src 'sha256-{hash}'; style-src 'unsafe-inline'; connect-src *; \
         form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
    );
    (Bytes::from_static(html.as_bytes()), HeaderValue::from_str(&csp).expect("the CSP is ASCII"))
});

/// 401 with the page that lets a visitor prove their membership.
fn page() -> Response {
    let (html, csp) = &*PAGE;
    let mut h = HeaderMap::new();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::CONTENT_SECURITY_POLICY, csp.clone());
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    (StatusCode::UNAUTHORIZED, h, html.clone()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_open_one_link_for_one_user_for_a_while() {
        let g = Grants::new();
        let link = "ab".repeat(32);
        let alice = UserId::new("@alice:localhost");
        let (grant, exp) = g.issue(&link, &alice, 1_000);
        assert_eq!(exp, 1_000 + 600_000);
        assert!(grant.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)), "{grant}");
        assert_eq!(g.check(&link, &grant, 1_001), Ok(alice.clone()));
        assert_eq!(g.check(&link, &grant, exp), Err(GrantRefusal::Expired));
        assert_eq!(g.check(&"cd".repeat(32), &grant, 1_001), Err(GrantRefusal::NotValid), "another link");
        assert_eq!(Grants::new().check(&link, &grant, 1_001), Err(GrantRefusal::NotValid), "another process");

        // Changing the user or the expiry breaks the MAC.
        let parts: Vec<&str> = grant.split('.').collect();
        let mallory = URL_SAFE_NO_PAD.encode("@mallory:localhost");
        assert_eq!(g.check(&link, &format!("{mallory}.{}.{}", parts[1], parts[2]), 1_001), Err(GrantRefusal::NotValid));
        let later = format!("{}.{}.{}", parts[0], exp + 1_000_000, parts[2]);
        assert_eq!(g.check(&link, &later, 1_001), Err(GrantRefusal::NotValid));

        let long = "a".repeat(MAX_GRANT_LEN + 1);
        for bad in ["", "a.b", "a.b.c.d", "%%%.1.AAAA", "YQ.-1.AAAA", "YQ.1e3.AAAA", "YQ.1.***", long.as_str()] {
            assert_eq!(g.check(&link, bad, 1_001), Err(GrantRefusal::Malformed), "{bad:?}");
        }
    }

    #[test]
    fn the_grant_is_found_in_the_query() {
        assert_eq!(grant_param(None), None);
        assert_eq!(grant_param(Some("")), None);
        assert_eq!(grant_param(Some("grant=abc")), Some("abc"));
        assert_eq!(grant_param(Some("x=1&grant=abc&y=2")), Some("abc"));
        assert_eq!(grant_param(Some("nogrant=abc")), None);
    }

    #[test]
    fn the_page_is_self_contained_and_its_script_is_allowed_by_hash() {
        let (html, csp) = &*PAGE;
        let html = std::str::from_utf8(html).unwrap();
        assert!(html.contains("/_matrix/client/v3/login"));
        assert!(html.contains("/openid/request_token"));
        assert!(html.contains("/_matrix/client/v3/logout"));
        assert!(html.contains("/openid\""), "posts to /r/<token>/openid");
        assert_eq!(html.matches("<script>").count(), 1);
        for external in ["src=", "href=", "@import", "url("] {
            assert!(!html.contains(external), "the page loads nothing: found {external}");
        }
        let csp = csp.to_str().unwrap();
        assert!(csp.starts_with("default-src 'none'; script-src 'sha256-"), "{csp}");
    }
}
