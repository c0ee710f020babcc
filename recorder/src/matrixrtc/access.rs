//! Getting into a MatrixRTC call's SFU: the two ways a recorder gets a LiveKit access token.
//!
//! - **API key** (self-hosted deployments that give mxrec the SFU's key/secret): mxrec mints the
//!   token itself with the room name and identity rules of the JWT service (room =
//!   unpadded base64 SHA-256 of `[room_id, "m.call#ROOM"]`; identity `@user:hs:DEVICE` for legacy
//!   memberships, the hashed member identity for sticky ones).
//! - **OpenID** (every deployment with Element's JWT service): a Matrix OpenID token goes to the
//!   focus' `livekit_service_url` — `/sfu/get` for legacy memberships, `/get_token` for sticky
//!   ones — which checks it against the homeserver and answers `{url, jwt}`.
//!
//! Either way the room name the bot joins is read back from the token's `video.room` claim.

use std::time::Duration;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// The LiveKit grant the bot joins with.
#[derive(Clone)]
pub struct SfuGrant {
    /// The SFU's websocket URL.
    pub url: String,
    pub jwt: String,
    /// `video.room` of the token.
    pub room: String,
    /// `sub` of the token: the bot's participant identity.
    pub identity: String,
}

impl std::fmt::Debug for SfuGrant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SfuGrant").field("url", &self.url).field("room", &self.room).field("identity", &self.identity).finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("minting the LiveKit token failed: {0}")]
    Mint(String),
    #[error("the JWT service at {url} refused: HTTP {status}: {body}")]
    Refused { url: String, status: u16, body: String },
    #[error("the JWT service at {url} is unreachable: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("the JWT service answered something that is not a LiveKit grant: {0}")]
    BadGrant(String),
}

/// Claims of a LiveKit token that the bot reads back.
#[derive(Debug, Deserialize)]
struct Claims {
    #[serde(default)]
    sub: String,
    #[serde(default)]
    video: VideoClaim,
}

#[derive(Debug, Default, Deserialize)]
struct VideoClaim {
    #[serde(default)]
    room: String,
}

/// Reads `sub` and `video.room` from a JWT without checking its signature (the SFU does that).
pub fn read_grant(url: &str, jwt: &str) -> Result<SfuGrant, AccessError> {
    let payload = jwt.split('.').nth(1).ok_or_else(|| AccessError::BadGrant("not a JWT".into()))?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|e| AccessError::BadGrant(format!("JWT payload is not base64url: {e}")))?;
    let claims: Claims =
        serde_json::from_slice(&bytes).map_err(|e| AccessError::BadGrant(format!("JWT claims: {e}")))?;
    if claims.video.room.is_empty() {
        return Err(AccessError::BadGrant("the token grants no room (video.room)".into()));
    }
    Ok(SfuGrant { url: url.to_owned(), jwt: jwt.to_owned(), room: claims.video.room, identity: claims.sub })
}

/// Mints a subscribe-only token for `room` with the SFU's API key. The participant is visible
/// (a recorder that hides is not what MatrixRTC members consented to) and marked as recorder.
pub fn mint(url: &str, key: &str, secret: &str, room: &str, identity: &str, name: &str, ttl: Duration) -> Result<SfuGrant, AccessError> {
    use livekit_api::access_token::{AccessToken, VideoGrants};
    let grants = VideoGrants {
        room_join: true,
        room: room.to_owned(),
        can_subscribe: Some(true),
        can_publish: Some(false),
        can_publish_data: Some(false),
        recorder: true,
        ..Default::default()
    };
    let jwt = AccessToken::with_api_key(key, secret)
        .with_identity(identity)
        .with_name(name)
        .with_ttl(ttl)
        .with_grants(grants)
        .to_jwt()
        .map_err(|e| AccessError::Mint(e.to_string()))?;
    Ok(SfuGrant { url: url.to_owned(), jwt, room: room.to_owned(), identity: identity.to_owned() })
}

/// A Matrix OpenID token as the JWT service wants it.
#[derive(Clone, Serialize, Deserialize)]
pub struct OpenIdToken {
    pub access_token: String,
    pub token_type: String,
    pub matrix_server_name: String,
    pub expires_in: u64,
}

impl std::fmt::Debug for OpenIdToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenIdToken").field("matrix_server_name", &self.matrix_server_name).finish_non_exhaustive()
    }
}

#[derive(Serialize)]
struct SfuGetBody<'a> {
    room: &'a str,
    openid_token: &'a OpenIdToken,
    device_id: &'a str,
}

#[derive(Serialize)]
struct GetTokenMember<'a> {
    id: &'a str,
    claimed_user_id: &'a str,
    claimed_device_id: &'a str,
}

#[derive(Serialize)]
struct GetTokenBody<'a> {
    room_id: &'a str,
    slot_id: &'a str,
    openid_token: &'a OpenIdToken,
    member: GetTokenMember<'a>,
}

#[derive(Deserialize)]
struct ServiceGrant {
    url: String,
    jwt: String,
}

/// How the bot asks a JWT service: the legacy endpoint (identity `@user:hs:DEVICE`) or the
/// MSC4143 one (hashed member identity).
#[derive(Debug, Clone)]
pub enum ServiceRequest {
    SfuGet { room_id: String, device_id: String },
    GetToken { room_id: String, slot_id: String, member_id: String, user_id: String, device_id: String },
}

/// Asks the JWT service at `service_url` for a grant.
pub async fn from_service(
    http: &reqwest::Client,
    service_url: &str,
    openid: &OpenIdToken,
    req: &ServiceRequest,
) -> Result<SfuGrant, AccessError> {
    let base = service_url.trim_end_matches('/');
    let (url, body) = match req {
        ServiceRequest::SfuGet { room_id, device_id } => (
            format!("{base}/sfu/get"),
            serde_json::to_value(SfuGetBody { room: room_id, openid_token: openid, device_id }),
        ),
        ServiceRequest::GetToken { room_id, slot_id, member_id, user_id, device_id } => (
            format!("{base}/get_token"),
            serde_json::to_value(GetTokenBody {
                room_id,
                slot_id,
                openid_token: openid,
                member: GetTokenMember { id: member_id, claimed_user_id: user_id, claimed_device_id: device_id },
            }),
        ),
    };
    let body = body.map_err(|e| AccessError::BadGrant(e.to_string()))?;
    let resp = http
        .post(&url)
        .json(&body)
        .timeout(Duration::from_secs(15))
        .send()
        .await
        .map_err(|e| AccessError::Unreachable { url: url.clone(), reason: e.to_string() })?;
    let status = resp.status();
    let text = resp.text().await.map_err(|e| AccessError::Unreachable { url: url.clone(), reason: e.to_string() })?;
    if !status.is_success() {
        return Err(AccessError::Refused { url, status: status.as_u16(), body: text.chars().take(300).collect() });
    }
    let g: ServiceGrant = serde_json::from_str(&text).map_err(|e| AccessError::BadGrant(format!("{e}: {}", text.chars().take(200).collect::<String>())))?;
    read_grant(&g.url, &g.jwt)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_token_carries_room_and_identity() {
        let g = mint("ws://127.0.0.1:7880", "devkey", "a-secret-long-enough-for-hs256-xxxxxx", "ROOMHASH", "@bot:hs:DEV", "Recorder", Duration::from_secs(3600)).unwrap();
        let back = read_grant(&g.url, &g.jwt).unwrap();
        assert_eq!((back.room.as_str(), back.identity.as_str()), ("ROOMHASH", "@bot:hs:DEV"));
        let payload = g.jwt.split('.').nth(1).unwrap();
        let claims: serde_json::Value =
            serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
        assert_eq!(claims["video"]["canPublish"], false);
        assert_eq!(claims["video"]["canSubscribe"], true);
        assert_eq!(claims["video"]["roomJoin"], true);
        assert_eq!(claims["iss"], "devkey");
        // Debug never shows the token.
        assert!(!format!("{g:?}").contains(&g.jwt));
    }

    #[test]
    fn bad_grants_are_refused() {
        assert!(matches!(read_grant("u", "nope"), Err(AccessError::BadGrant(_))));
        assert!(matches!(read_grant("u", "a.!!!.c"), Err(AccessError::BadGrant(_))));
        let no_room = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"sub":"x"}"#);
        assert!(matches!(read_grant("u", &format!("a.{no_room}.c")), Err(AccessError::BadGrant(_))));
    }
}
