//! WHIP ingest (RFC 9725): a WHIP publisher (OBS, GStreamer's `whipclientsink`, a browser, the
//! load benchmark) is recorded like one participant of a call, through the same peer connection
//! ([`crate::peer::RecvPeer`]) and the same [`crate::pipeline::Recording`] calls use.
//!
//! - `POST /whip/<name>` with `Authorization: Bearer <whip.bearer_token>`, `Content-Type:
//!   application/sdp` and the SDP offer: `201 Created`, the answer (every local candidate in it:
//!   no trickle from our side) and `Location: /whip/<name>/<session>`.
//! - `DELETE /whip/<name>/<session>`: the session ends; its recording is finalized in the
//!   background (`200`).
//! - `PATCH` of a session: `405` (neither trickle ICE nor ICE restarts are supported; a publisher
//!   puts its candidates in the offer, as RFC 9725 lets it). `OPTIONS /whip/<name>`: `204` with
//!   `Accept-Post: application/sdp`.
//!
//! Refusals: `401` without the token, `415` for another content type, `413` for an offer larger
//! than `webrtc.max_sdp_bytes`, `400` for a name outside `[A-Za-z0-9._-]{1,64}` or an offer the
//! WebRTC stack rejects (the reason is in the body and the log), `503` (with `Retry-After`) past
//! `whip.max_sessions`. None of them touches a running session.
//!
//! A session is recorded in "room" `whip:<name>` (flavour `whip`), its call id the session id. It
//! ends on `DELETE`, when the media connection fails or every track has ended, when the connection
//! is not up within `whip.connect_timeout_secs`, and at shutdown ([`Whip::shutdown`]); each ends
//! with a finalized recording of what arrived. Recordings a killed process left unfinished are
//! finished when the next one starts ([`Whip::start`]).
//!
//! The whole module is off unless `whip.enabled`; its routes are then not mounted at all.

mod session;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use sha2::{Digest, Sha256};
use storage::manifest::CallFlavour;
use tokio::sync::{oneshot, Notify};
use tracing::{info, info_span, warn, Instrument};

use crate::config::{WebrtcConfig, WhipConfig};
use crate::http::HttpState;
use crate::peer::{PeerConfig, RecvPeer};
use crate::pipeline::{Env, Recording};

/// How long a shutdown waits for the WHIP sessions' recordings to be finalized.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(120);

/// The WHIP side of one process: the running sessions and what they share.
pub struct Whip {
    env: Arc<Env>,
    cfg: WhipConfig,
    webrtc: WebrtcConfig,
    /// SHA-256 of the configured token: requests are compared digest to digest, so the time a
    /// comparison takes says nothing about the token.
    token_digest: [u8; 32],
    sessions: Mutex<HashMap<String, SessionEntry>>,
    /// Woken whenever a session is gone (recording finalized).
    gone: Notify,
}

struct SessionEntry {
    name: String,
    /// Taken by the first `DELETE` (or the shutdown) that ends the session.
    stop: Option<oneshot::Sender<()>>,
}

impl Whip {
    /// The WHIP side, or `None` when `whip.enabled` is off. Starts finishing the WHIP recordings a
    /// previous run left unfinished, in the background.
    pub fn start(env: Arc<Env>) -> Option<Arc<Self>> {
        let cfg = env.config.whip.clone();
        if !cfg.enabled {
            return None;
        }
        let token = cfg.bearer_token.clone().unwrap_or_default();
        let whip = Arc::new(Self {
            webrtc: env.config.webrtc.clone(),
            token_digest: Sha256::digest(token.as_bytes()).into(),
            cfg,
            sessions: Mutex::new(HashMap::new()),
            gone: Notify::new(),
            env: env.clone(),
        });
        tokio::spawn(recover_unfinished(env).instrument(info_span!("whip_recovery")));
        info!(max_sessions = whip.cfg.max_sessions, "WHIP ingest enabled at /whip/<name>");
        Some(whip)
    }

    /// The routes, over the HTTP server's state (whose `whip` is this).
    pub(crate) fn routes(&self) -> Router<Arc<HttpState>> {
        Router::new()
            .route("/whip/{name}", post(publish).options(options))
            .route("/whip/{name}/{session}", axum::routing::delete(end).patch(patch))
            .layer(DefaultBodyLimit::max(self.webrtc.max_sdp_bytes))
    }

    /// Sessions running (or finalizing) now.
    pub fn session_count(&self) -> usize {
        self.lock().len()
    }

    /// Ends every session and waits, at most `grace`, until their recordings are finalized.
    pub async fn shutdown(&self, grace: Duration) {
        let stops: Vec<oneshot::Sender<()>> = self.lock().values_mut().filter_map(|s| s.stop.take()).collect();
        if stops.is_empty() && self.session_count() == 0 {
            return;
        }
        info!(sessions = self.session_count(), "ending the WHIP sessions");
        for s in stops {
            let _ = s.send(());
        }
        let all_gone = async {
            loop {
                let notified = self.gone.notified();
                if self.session_count() == 0 {
                    return;
                }
                notified.await;
            }
        };
        if tokio::time::timeout(grace, all_gone).await.is_err() {
            warn!(left = self.session_count(), "WHIP sessions still finalizing at shutdown; the next start finishes them");
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, SessionEntry>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn authorized(&self, headers: &HeaderMap) -> bool {
        let Some(value) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) else {
            return false;
        };
        let Some((scheme, token)) = value.split_once(' ') else { return false };
        if !scheme.eq_ignore_ascii_case("bearer") {
            return false;
        }
        let digest: [u8; 32] = Sha256::digest(token.trim().as_bytes()).into();
        digest == self.token_digest
    }

    fn finished(&self, id: &str) {
        self.lock().remove(id);
        self.gone.notify_waiters();
    }
}

/// The room a WHIP stream is recorded in.
pub fn room_of(name: &str) -> String {
    format!("whip:{name}")
}

fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn refuse(status: StatusCode, why: impl Into<String>) -> Response {
    let why = why.into();
    (status, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], format!("{why}\n")).into_response()
}

fn unauthorized() -> Response {
    let mut r = refuse(StatusCode::UNAUTHORIZED, "a valid bearer token is required");
    r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    r
}

fn whip_of(state: &HttpState) -> Option<&Arc<Whip>> {
    state.whip.as_ref()
}

async fn options() -> Response {
    let mut r = StatusCode::NO_CONTENT.into_response();
    r.headers_mut().insert("accept-post", HeaderValue::from_static("application/sdp"));
    r
}

/// `POST /whip/<name>`: a publisher's offer; answers with ours and starts the session.
async fn publish(State(state): State<Arc<HttpState>>, Path(name): Path<String>, headers: HeaderMap, body: Bytes) -> Response {
    let Some(whip) = whip_of(&state).cloned() else { return StatusCode::NOT_FOUND.into_response() };
    if !whip.authorized(&headers) {
        warn!(%name, "WHIP offer without a valid bearer token refused");
        return unauthorized();
    }
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let mime = content_type.split(';').next().unwrap_or("").trim();
    if !mime.eq_ignore_ascii_case("application/sdp") {
        return refuse(StatusCode::UNSUPPORTED_MEDIA_TYPE, format!("the offer must be application/sdp, not `{content_type}`"));
    }
    if !valid_name(&name) {
        return refuse(StatusCode::BAD_REQUEST, "the stream name must be 1 to 64 of A-Z a-z 0-9 . _ -");
    }
    if body.len() > whip.webrtc.max_sdp_bytes {
        return refuse(StatusCode::PAYLOAD_TOO_LARGE, format!("the offer is larger than {} bytes", whip.webrtc.max_sdp_bytes));
    }
    let Ok(offer) = String::from_utf8(body.to_vec()) else {
        return refuse(StatusCode::BAD_REQUEST, "the offer is not UTF-8 text");
    };
    if !offer.trim_start().starts_with("v=0") {
        warn!(%name, bytes = offer.len(), "WHIP offer that is not SDP refused");
        return refuse(StatusCode::BAD_REQUEST, "the body is not an SDP offer (it must start with v=0)");
    }
    let id = session_id();
    // Reserve the slot before the (slow) peer set-up so concurrent offers cannot exceed the limit.
    {
        let mut sessions = whip.lock();
        if sessions.len() >= whip.cfg.max_sessions {
            drop(sessions);
            warn!(%name, max = whip.cfg.max_sessions, "WHIP offer refused: too many sessions");
            let mut r = refuse(StatusCode::SERVICE_UNAVAILABLE, "too many WHIP sessions; try again later");
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("10"));
            return r;
        }
        sessions.insert(id.clone(), SessionEntry { name: name.clone(), stop: None });
    }
    // Released if this request is dropped half-way (client gone, request timeout).
    let reservation = Reservation { whip: whip.clone(), id: id.clone(), armed: true };
    let span = info_span!("whip", stream = %name, session = %id);
    match answer(&whip, offer).instrument(span.clone()).await {
        Ok((peer, out, epoch, answer_sdp)) => {
            reservation.disarm();
            let (stop_tx, stop_rx) = oneshot::channel();
            if let Some(entry) = whip.lock().get_mut(&id) {
                entry.stop = Some(stop_tx);
            }
            let location = format!("/whip/{name}/{id}");
            let task = session::Session::new(whip.env.clone(), &whip.cfg, name, id.clone(), epoch);
            let w = whip.clone();
            tokio::spawn(
                async move {
                    task.run(peer, out, stop_rx).await;
                    w.finished(&id);
                }
                .instrument(span),
            );
            let mut r = (StatusCode::CREATED, [(header::CONTENT_TYPE, "application/sdp")], answer_sdp).into_response();
            r.headers_mut().insert(header::LOCATION, HeaderValue::from_str(&location).expect("name and id are header-safe"));
            r
        }
        Err((status, why)) => {
            drop(reservation);
            span.in_scope(|| warn!(%why, "WHIP offer refused"));
            refuse(status, why)
        }
    }
}

/// A session slot taken by an offer being answered.
struct Reservation {
    whip: Arc<Whip>,
    id: String,
    armed: bool,
}

impl Reservation {
    /// The session task owns the slot from here on.
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.armed {
            self.whip.finished(&self.id);
        }
    }
}

type Answered = (RecvPeer, tokio::sync::mpsc::Receiver<crate::peer::PeerOutput>, std::time::Instant, String);

/// A receive-only peer connection with the offer applied and the answer made.
async fn answer(whip: &Whip, offer: String) -> Result<Answered, (StatusCode, String)> {
    let epoch = std::time::Instant::now();
    let mut cfg = PeerConfig::new(whip.webrtc.bind_addrs.clone(), epoch);
    cfg.ice_servers = crate::bot::call::ice_servers(&whip.webrtc);
    let (mut peer, out) = RecvPeer::new(cfg)
        .await
        .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, format!("cannot create a peer connection: {e}")))?;
    if let Err(e) = peer.apply_remote_offer(offer).await {
        peer.close().await;
        return Err((StatusCode::BAD_REQUEST, format!("the offer was refused: {e}")));
    }
    match peer.create_answer().await {
        Ok(sdp) => Ok((peer, out, epoch, sdp)),
        Err(e) => {
            peer.close().await;
            Err((StatusCode::BAD_REQUEST, format!("cannot answer the offer: {e}")))
        }
    }
}

/// `DELETE /whip/<name>/<session>`: ends the session; its recording is finalized afterwards.
async fn end(State(state): State<Arc<HttpState>>, Path((name, id)): Path<(String, String)>, headers: HeaderMap) -> Response {
    let Some(whip) = whip_of(&state) else { return StatusCode::NOT_FOUND.into_response() };
    if !whip.authorized(&headers) {
        return unauthorized();
    }
    let mut sessions = whip.lock();
    match sessions.get_mut(&id) {
        Some(entry) if entry.name == name => {
            if let Some(stop) = entry.stop.take() {
                let _ = stop.send(());
                info!(stream = %name, session = %id, "WHIP session ended by its publisher");
            }
            StatusCode::OK.into_response()
        }
        _ => refuse(StatusCode::NOT_FOUND, "no such WHIP session"),
    }
}

/// `PATCH` of a session: no trickle ICE, no ICE restart (RFC 9725 §4.3.1: 405).
async fn patch(State(state): State<Arc<HttpState>>, headers: HeaderMap) -> Response {
    let Some(whip) = whip_of(&state) else { return StatusCode::NOT_FOUND.into_response() };
    if !whip.authorized(&headers) {
        return unauthorized();
    }
    let mut r = refuse(StatusCode::METHOD_NOT_ALLOWED, "trickle ICE and ICE restarts are not supported; put the candidates in the offer");
    r.headers_mut().insert(header::ALLOW, HeaderValue::from_static("DELETE"));
    r
}

fn session_id() -> String {
    let bytes: [u8; 16] = rand::random();
    hex::encode(bytes)
}

/// Finishes the WHIP recordings a previous run left in the recording or finalizing state, from
/// what it stored (the same recovery Matrix calls get; there is no room to tell).
async fn recover_unfinished(env: Arc<Env>) {
    let rows = match env.recordings_to_finish().await {
        Ok(rows) => rows,
        Err(e) => {
            warn!(error = %e, "cannot list unfinished recordings");
            return;
        }
    };
    for row in rows {
        match env.catalog.get_call(&row.call_id).await {
            Ok(Some(call)) if call.flavour == CallFlavour::Whip => {}
            _ => continue,
        }
        let id = row.id.clone();
        info!(recording = %id, "finishing a WHIP recording a previous run left unfinished");
        match Recording::recover(env.clone(), row).await {
            Ok(Some(rec)) => match rec.finish().await {
                Ok(f) => info!(recording = %id, manifest = %f.manifest_location, "recovered WHIP recording stored"),
                Err(e) => warn!(recording = %id, error = %format!("{e:#}"), "finishing a recovered WHIP recording failed"),
            },
            Ok(None) => info!(recording = %id, "the unfinished WHIP recording held no media"),
            Err(e) => warn!(recording = %id, error = %format!("{e:#}"), "recovering a WHIP recording failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_names_are_key_safe_and_bounded() {
        for ok in ["a", "studio-1", "Bench.42_x", &"x".repeat(64)] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", "../etc", "a/b", "a b", "ä", &"x".repeat(65), "%2e%2e"] {
            assert!(!valid_name(bad), "{bad}");
        }
        assert_eq!(room_of("studio-1"), "whip:studio-1");
    }
}
