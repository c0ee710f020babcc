//! `GET /r/<token>`: the file behind a share link.
//!
//! A store with URLs of its own (S3, GCS, Azure) gets a 307 to a short-lived presigned URL, so
//! the bytes never pass through mxrec. The local store is streamed from the object store in
//! chunks, honouring a single `Range` (206, or 416 past the end), so a video player can seek and
//! nothing is ever held whole in memory.
//!
//! Unknown, malformed, expired and revoked tokens get the same 404 with the same text, so the
//! answer does not tell which links exist. A members-only link serves only with a grant
//! (`?grant=…`, see [`super::members`]); without one it answers with the page that gets one. Each request on an existing link is audited before any
//! byte is sent; when the audit cannot be written the request fails rather than go unrecorded.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use object_store::path::Path as ObjectPath;
use object_store::signer::SignedUrlOptions;
use object_store::{GetOptions, GetRange, ObjectStoreExt};
use storage::catalog::LinkRecord;
use tracing::{debug, warn};

use super::links::{link_id, Lookup};
use super::members;
use super::metrics::link_fetch;
use super::range::{self, ByteRange};
use super::HttpState;

const GONE: &str = "This link is not valid: it may have expired or been revoked.\n";
const UNAVAILABLE: &str = "The recording cannot be served right now; try again later.\n";

pub(crate) async fn serve_link(
    State(state): State<Arc<HttpState>>,
    Path(token): Path<String>,
    RawQuery(query): RawQuery,
    method: Method,
    headers: HeaderMap,
) -> Response {
    let link = match state.links.lookup(&token).await {
        Ok(Lookup::Valid(link)) => link,
        Ok(Lookup::Unknown) => {
            debug!("request on an unknown link");
            link_fetch("refused");
            return refused();
        }
        Ok(Lookup::Refused(link, why)) => {
            link_fetch("refused");
            let detail = serde_json::json!({ "link": link_id(&link.token_hash), "reason": why });
            if let Err(e) = state.catalog.audit("http", "link.refused", Some(&link.recording_id), detail).await {
                warn!(link = link_id(&link.token_hash), error = %e, "cannot audit a refused link request");
            }
            return refused();
        }
        Err(e) => {
            warn!(error = %e, "cannot look up a link in the catalog; answering 503");
            link_fetch("failed");
            return unavailable();
        }
    };
    // For a members-only link, who proved membership; the audit trail names them.
    let member = match &link.members_room {
        None => None,
        Some(_) => match members::admit(&state, &link, query.as_deref()).await {
            Ok(user) => Some(user),
            Err(answer) => return answer,
        },
    };
    let member = member.as_ref().map(|u| u.as_str());
    let key = match ObjectPath::parse(&link.object_key) {
        Ok(k) => k,
        Err(e) => {
            warn!(link = link_id(&link.token_hash), error = %e, "link holds an invalid object key");
            link_fetch("failed");
            return unavailable();
        }
    };
    let name = download_name(&link);
    let content_type = content_type(&link.object_key);
    let disposition = format!("inline; filename=\"{name}\"");

    if let Some(signer) = &state.signer {
        let ttl = state.config.presign_ttl();
        // The overrides make the store answer with the same type and file name as a local serve.
        let opts = SignedUrlOptions::default().with_query([
            ("response-content-type", content_type),
            ("response-content-disposition", disposition.as_str()),
        ]);
        let signed = match signer.signed_url_opts(Method::GET, &key, ttl, &opts).await {
            Err(object_store::Error::NotSupported { .. }) => signer.signed_url(Method::GET, &key, ttl).await,
            other => other,
        };
        let url = match signed {
            Ok(u) => u,
            Err(e) => {
                warn!(link = link_id(&link.token_hash), error = %e, "cannot presign the link's object");
                link_fetch("failed");
                return unavailable();
            }
        };
        if !audit_fetch(&state, &link, &method, StatusCode::TEMPORARY_REDIRECT, None, member).await {
            return unavailable();
        }
        link_fetch("redirected");
        return (
            StatusCode::TEMPORARY_REDIRECT,
            [(header::LOCATION, url.to_string()), (header::CACHE_CONTROL, "private, no-store".into())],
            [(header::REFERRER_POLICY, "no-referrer")],
        )
            .into_response();
    }

    let meta = match state.store.head(&key).await {
        Ok(m) => m,
        Err(e) => {
            warn!(link = link_id(&link.token_hash), key = %key, error = %e, "the link's object cannot be read");
            link_fetch("failed");
            let _ = state
                .catalog
                .audit(
                    "http",
                    "link.fetch_failed",
                    Some(&link.recording_id),
                    serde_json::json!({ "link": link_id(&link.token_hash), "error": e.to_string() }),
                )
                .await;
            return if matches!(e, object_store::Error::NotFound { .. }) { refused() } else { unavailable() };
        }
    };
    let size = meta.size;
    let etag = meta.e_tag.as_deref().map(|e| {
        if e.starts_with('"') || e.starts_with("W/") {
            e.to_owned()
        } else {
            format!("\"{e}\"")
        }
    });
    let range_header = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    // A range meant for another version of the object (If-Range) is ignored: send it whole.
    let if_range_ok = match headers.get(header::IF_RANGE).and_then(|v| v.to_str().ok()) {
        None => true,
        Some(v) => etag.as_deref() == Some(v.trim()),
    };
    let wanted = if if_range_ok { range::resolve(range_header, size) } else { ByteRange::Full };

    let mut h = HeaderMap::new();
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("private, no-store"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    if let Some(v) = etag.as_deref().and_then(|e| HeaderValue::from_str(e).ok()) {
        h.insert(header::ETAG, v);
    }
    if let Ok(v) = HeaderValue::from_str(&meta.last_modified.format("%a, %d %b %Y %H:%M:%S GMT").to_string()) {
        h.insert(header::LAST_MODIFIED, v);
    }

    let (status, slice) = match wanted {
        ByteRange::Unsatisfiable => {
            if !audit_fetch(&state, &link, &method, StatusCode::RANGE_NOT_SATISFIABLE, range_header, member).await {
                return unavailable();
            }
            link_fetch("unsatisfiable");
            h.insert(header::CONTENT_RANGE, header_value(format!("bytes */{size}")));
            return (StatusCode::RANGE_NOT_SATISFIABLE, h, "The requested range is outside the file.\n")
                .into_response();
        }
        ByteRange::Full => (StatusCode::OK, 0..size),
        ByteRange::Partial(r) => {
            h.insert(header::CONTENT_RANGE, header_value(format!("bytes {}-{}/{size}", r.start, r.end - 1)));
            (StatusCode::PARTIAL_CONTENT, r)
        }
    };
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CONTENT_DISPOSITION, header_value(disposition));
    h.insert(header::CONTENT_LENGTH, header_value((slice.end - slice.start).to_string()));

    if !audit_fetch(&state, &link, &method, status, range_header, member).await {
        return unavailable();
    }
    link_fetch("served");
    if method == Method::HEAD || slice.is_empty() {
        return (status, h).into_response();
    }
    let opts = GetOptions { range: Some(GetRange::Bounded(slice)), ..Default::default() };
    match state.store.get_opts(&key, opts).await {
        Ok(got) => (status, h, Body::from_stream(got.into_stream())).into_response(),
        Err(e) => {
            warn!(link = link_id(&link.token_hash), key = %key, error = %e, "reading the link's object failed");
            unavailable()
        }
    }
}

/// Appends `link.fetched`; `false` (and a log line) when the catalog would not take it.
async fn audit_fetch(
    state: &HttpState,
    link: &LinkRecord,
    method: &Method,
    status: StatusCode,
    range: Option<&str>,
    member: Option<&str>,
) -> bool {
    let mut detail = serde_json::json!({
        "link": link_id(&link.token_hash),
        "object_key": link.object_key,
        "method": method.as_str(),
        "status": status.as_u16(),
        "range": range,
    });
    if let Some(user) = member {
        detail["user"] = user.into();
        detail["members_room"] = link.members_room.as_deref().into();
    }
    match state.catalog.audit("http", "link.fetched", Some(&link.recording_id), detail).await {
        Ok(_) => true,
        Err(e) => {
            warn!(link = link_id(&link.token_hash), error = %e, "cannot audit a link request; refusing it");
            link_fetch("failed");
            false
        }
    }
}

pub(crate) fn refused() -> Response {
    (StatusCode::NOT_FOUND, [(header::CACHE_CONTROL, "no-store")], GONE).into_response()
}

pub(crate) fn unavailable() -> Response {
    (StatusCode::SERVICE_UNAVAILABLE, [(header::CACHE_CONTROL, "no-store")], UNAVAILABLE).into_response()
}

fn header_value(s: String) -> HeaderValue {
    // Every caller builds from digits, ASCII names and fixed text.
    HeaderValue::from_str(&s).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

/// The media type for a stored object, by its extension.
pub fn content_type(key: &str) -> &'static str {
    let ext = key.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase()).unwrap_or_default();
    match ext.as_str() {
        "mp4" => "video/mp4",
        "m4a" => "audio/mp4",
        "webm" => "video/webm",
        "mkv" => "video/x-matroska",
        "mka" => "audio/x-matroska",
        "json" => "application/json",
        _ => "application/octet-stream",
    }
}

/// A file name for the download: `<recording>-<what>`, e.g. `0190…-call.mp4` or
/// `0190…-<track>-000003.webm`, restricted to characters every OS and browser accepts.
pub fn download_name(link: &LinkRecord) -> String {
    let parts: Vec<&str> = link.object_key.split('/').collect();
    let what = match parts.as_slice() {
        [.., "tracks", track, file] => format!("{track}-{file}"),
        [.., file] => (*file).to_owned(),
        [] => "recording".to_owned(),
    };
    let raw = format!("{}-{what}", link.recording_id);
    let mut name: String =
        raw.chars().map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') { c } else { '_' }).collect();
    name.truncate(150);
    name.trim_start_matches('.').to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use storage::RecordingId;

    fn link(key: &str) -> LinkRecord {
        LinkRecord {
            token_hash: "ab".repeat(32),
            recording_id: RecordingId::new("0190-rec"),
            object_key: key.into(),
            created_at_ms: 0,
            expires_at_ms: None,
            revoked_at_ms: None,
            members_room: None,
        }
    }

    #[test]
    fn types_and_names_follow_the_key() {
        assert_eq!(content_type("a/b/call.mp4"), "video/mp4");
        assert_eq!(content_type("a/call.M4A"), "audio/mp4");
        assert_eq!(content_type("t/000001.webm"), "video/webm");
        assert_eq!(content_type("t/000001.mkv"), "video/x-matroska");
        assert_eq!(content_type("manifest.json"), "application/json");
        assert_eq!(content_type("noext"), "application/octet-stream");
        assert_eq!(download_name(&link("rooms/r/recordings/x/call.mp4")), "0190-rec-call.mp4");
        assert_eq!(
            download_name(&link("rooms/r/recordings/x/tracks/alice_cam/000003.webm")),
            "0190-rec-alice_cam-000003.webm"
        );
        let mut l = link("k/\"evil\r\n.json");
        l.recording_id = RecordingId::new("..\\x");
        let n = download_name(&l);
        assert!(n.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)), "{n}");
        assert!(!n.starts_with('.'), "{n}");
    }
}
