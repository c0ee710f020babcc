//! Who is opening a members-only link: a Matrix OpenID token, checked at the homeserver that
//! issued it.
//!
//! A Matrix client can ask its homeserver for an OpenID token
//! (`POST /_matrix/client/v3/user/{userId}/openid/request_token`): a short-lived token that proves
//! the user's id and nothing else, and only to whoever asks the *same* homeserver about it
//! (`GET /_matrix/federation/v1/openid/userinfo`). The browser hands mxrec
//! `{access_token, matrix_server_name}`; mxrec finds that server, asks it, and accepts the answer
//! only when the user id it names belongs to that very server, since otherwise any homeserver
//! could vouch for anyone's id.
//!
//! Finding the server: `http.openid_homeservers` first (operators' overrides, the test Synapse);
//! then part of the spec's server discovery: a server name that is an IP literal or carries a port
//! is used as it is; otherwise `https://<name>/.well-known/matrix/server` may delegate (`m.server`);
//! otherwise `https://<name>:8448`. SRV records are not looked up.
//!
//! The token is a bearer credential: it goes to that base URL only, is never logged, never stored,
//! and no error message built here contains it (reqwest errors are stripped of their URL, which
//! carries it in the query).

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use reqwest::Url;
use serde::Deserialize;
use storage::UserId;
use tracing::debug;

use crate::config::HttpConfig;

/// Longest OpenID access token accepted (Synapse's are 24 characters).
pub const MAX_TOKEN_LEN: usize = 1024;
/// Longest server name accepted (the spec's limit for the whole name).
pub const MAX_SERVER_NAME_LEN: usize = 255;
/// Longest answer read from a homeserver (`userinfo`, `.well-known`).
const MAX_ANSWER_BYTES: usize = 16 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Port of the federation API when nothing else says.
const FEDERATION_PORT: u16 = 8448;

/// What the browser sends to prove who it is: the fields of a `request_token` answer.
#[derive(Clone, Deserialize)]
pub struct OpenIdProof {
    pub access_token: String,
    pub matrix_server_name: String,
}

impl fmt::Debug for OpenIdProof {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenIdProof")
            .field("access_token", &"<redacted>")
            .field("matrix_server_name", &self.matrix_server_name)
            .finish()
    }
}

impl OpenIdProof {
    /// Parses and checks a request body, so that only a plausible token is ever sent anywhere.
    pub fn parse(body: &[u8]) -> Result<Self, OpenIdError> {
        let proof: OpenIdProof = serde_json::from_slice(body).map_err(|e| {
            OpenIdError::Malformed(format!(
                "the body must be JSON {{\"access_token\": \"…\", \"matrix_server_name\": \"…\"}} \
                 (the answer of your homeserver's openid/request_token): {e}"
            ))
        })?;
        let t = &proof.access_token;
        if t.is_empty() || t.len() > MAX_TOKEN_LEN || !t.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(OpenIdError::Malformed(format!(
                "access_token must be 1 to {MAX_TOKEN_LEN} printable ASCII characters without spaces"
            )));
        }
        if parse_server_name(&proof.matrix_server_name).is_none() {
            let shown: String = proof.matrix_server_name.chars().take(80).collect();
            return Err(OpenIdError::Malformed(format!(
                "matrix_server_name `{}` is not a Matrix server name like example.org or example.org:8448",
                shown.escape_default()
            )));
        }
        Ok(proof)
    }
}

/// Why an OpenID proof was not accepted. [`OpenIdError::reason`] names it for audit and clients.
#[derive(Debug, thiserror::Error)]
pub enum OpenIdError {
    #[error("{0}")]
    Malformed(String),
    #[error(
        "the OpenID token is not valid at {server}: its homeserver does not know it (such tokens \
         expire after about an hour); get a new one"
    )]
    NotValid { server: String },
    #[error(
        "the homeserver of {server} vouched for {user}, who is not a user of {server}; a homeserver \
         can only vouch for its own users"
    )]
    WrongServer { server: String, user: String },
    #[error("cannot check the OpenID token at {server} ({base}): {reason}; try again later")]
    Unreachable { server: String, base: String, reason: String },
}

impl OpenIdError {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "malformed",
            Self::NotValid { .. } => "openid_token_not_valid",
            Self::WrongServer { .. } => "user_not_of_that_server",
            Self::Unreachable { .. } => "homeserver_unreachable",
        }
    }
}

/// A server name split into host and optional port, if it is one:
/// `host[:port]` where host is a DNS name, an IPv4 address or a bracketed IPv6 address.
pub fn parse_server_name(name: &str) -> Option<(&str, Option<u16>)> {
    if name.is_empty() || name.len() > MAX_SERVER_NAME_LEN {
        return None;
    }
    let (host, port) = if name.starts_with('[') {
        let end = name.find(']')?;
        let (host, rest) = name.split_at(end + 1);
        let inner = &host[1..host.len() - 1];
        if inner.parse::<std::net::Ipv6Addr>().is_err() {
            return None;
        }
        match rest {
            "" => (host, None),
            _ => (host, Some(rest.strip_prefix(':')?)),
        }
    } else {
        match name.split_once(':') {
            None => (name, None),
            Some((h, p)) => (h, Some(p)),
        }
    };
    let port = match port {
        None => None,
        Some(p) if (1..=5).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()) => {
            Some(p.parse::<u16>().ok().filter(|p| *p != 0)?)
        }
        Some(_) => return None,
    };
    let dns_ok = |h: &str| {
        !h.is_empty()
            && h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
            && !h.starts_with(['.', '-'])
    };
    if !host.starts_with('[') && !dns_ok(host) {
        return None;
    }
    Some((host, port))
}

/// Whether `name` is a Matrix server name (`example.org`, `example.org:8448`, `[::1]:8448`).
pub fn is_server_name(name: &str) -> bool {
    parse_server_name(name).is_some()
}

/// The first step of finding a server's federation base URL.
#[derive(Debug, PartialEq, Eq)]
enum Discovery {
    /// Known without asking anyone.
    Base(String),
    /// Ask `https://<host>/.well-known/matrix/server`; without an answer, `https://<host>:8448`.
    WellKnown { host: String },
}

fn discovery(server_name: &str, overrides: &BTreeMap<String, String>) -> Option<Discovery> {
    if let Some(base) = overrides.get(server_name) {
        return Some(Discovery::Base(base.trim_end_matches('/').to_owned()));
    }
    let (host, port) = parse_server_name(server_name)?;
    let is_ip = host.starts_with('[') || host.parse::<IpAddr>().is_ok();
    Some(if is_ip || port.is_some() {
        Discovery::Base(format!("https://{host}:{}", port.unwrap_or(FEDERATION_PORT)))
    } else {
        Discovery::WellKnown { host: host.to_owned() }
    })
}

/// The base URL a `.well-known/matrix/server` answer delegates to, if it is a usable one.
fn delegated_base(well_known: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct WellKnown {
        #[serde(rename = "m.server")]
        server: String,
    }
    let wk: WellKnown = serde_json::from_slice(well_known).ok()?;
    let (host, port) = parse_server_name(&wk.server)?;
    Some(format!("https://{host}:{}", port.unwrap_or(FEDERATION_PORT)))
}

/// The user id in a `userinfo` answer, if it belongs to `server_name`.
fn vouched_user(userinfo: &[u8], server_name: &str) -> Result<UserId, OpenIdError> {
    #[derive(Deserialize)]
    struct UserInfo {
        sub: String,
    }
    let unexpected = |reason: String| OpenIdError::Unreachable {
        server: server_name.to_owned(),
        base: String::new(),
        reason,
    };
    let info: UserInfo = serde_json::from_slice(userinfo)
        .map_err(|e| unexpected(format!("its userinfo answer is not {{\"sub\": \"@user:server\"}}: {e}")))?;
    let user = info.sub;
    let server_of_user = user
        .strip_prefix('@')
        .and_then(|rest| rest.split_once(':'))
        .filter(|(local, server)| !local.is_empty() && user.len() <= 255 && is_server_name(server))
        .map(|(_, server)| server);
    match server_of_user {
        None => Err(unexpected(format!("its userinfo answer names `{}`, not a user id", user.escape_default()))),
        Some(s) if s != server_name => Err(OpenIdError::WrongServer { server: server_name.to_owned(), user }),
        Some(_) => Ok(UserId::new(user)),
    }
}

/// Checks OpenID tokens at their homeservers. Cheap to clone.
#[derive(Clone, Debug)]
pub struct OpenIdVerifier {
    overrides: BTreeMap<String, String>,
    /// For `.well-known` (which may redirect, as the spec allows).
    discovery: reqwest::Client,
    /// For `userinfo`: never follows a redirect, which would carry the token somewhere else.
    userinfo: reqwest::Client,
}

impl OpenIdVerifier {
    pub fn new(config: &HttpConfig) -> Self {
        let client = |redirects| {
            reqwest::Client::builder()
                .connect_timeout(CONNECT_TIMEOUT)
                .timeout(REQUEST_TIMEOUT)
                .redirect(redirects)
                .user_agent(concat!("mxrec/", env!("CARGO_PKG_VERSION")))
                .build()
                .expect("the HTTP client for OpenID checks can be built")
        };
        Self {
            overrides: config.openid_homeservers.clone(),
            discovery: client(reqwest::redirect::Policy::limited(3)),
            userinfo: client(reqwest::redirect::Policy::none()),
        }
    }

    /// The federation base URL of `server_name` (see the module documentation).
    pub async fn base_url(&self, server_name: &str) -> Result<String, OpenIdError> {
        let plan = discovery(server_name, &self.overrides)
            .ok_or_else(|| OpenIdError::Malformed(format!("`{server_name}` is not a Matrix server name")))?;
        let host = match plan {
            Discovery::Base(base) => return Ok(base),
            Discovery::WellKnown { host } => host,
        };
        let url = format!("https://{host}/.well-known/matrix/server");
        let delegated = match self.discovery.get(&url).send().await {
            Ok(r) if r.status().is_success() => read_limited(r).await.ok().and_then(|b| delegated_base(&b)),
            Ok(r) => {
                debug!(server = server_name, status = %r.status(), "no .well-known/matrix/server delegation");
                None
            }
            Err(e) => {
                debug!(server = server_name, error = %e.without_url(), "no .well-known/matrix/server delegation");
                None
            }
        };
        Ok(delegated.unwrap_or_else(|| format!("https://{host}:{FEDERATION_PORT}")))
    }

    /// The user the token belongs to, as its homeserver says, if that user is of that server.
    pub async fn verify(&self, proof: &OpenIdProof) -> Result<UserId, OpenIdError> {
        let server = proof.matrix_server_name.as_str();
        let base = self.base_url(server).await?;
        let unreachable =
            |reason: String| OpenIdError::Unreachable { server: server.to_owned(), base: base.clone(), reason };
        let mut url = Url::parse(&base).map_err(|e| unreachable(format!("not a URL: {e}")))?;
        url.path_segments_mut()
            .map_err(|()| unreachable("not a base URL".into()))?
            .pop_if_empty()
            .extend(["_matrix", "federation", "v1", "openid", "userinfo"]);
        url.query_pairs_mut().append_pair("access_token", &proof.access_token);
        let answer = self.userinfo.get(url).send().await.map_err(|e| unreachable(e.without_url().to_string()))?;
        let status = answer.status();
        let body = read_limited(answer).await.map_err(unreachable)?;
        match status.as_u16() {
            200 => vouched_user(&body, server).map_err(|e| match e {
                OpenIdError::Unreachable { reason, .. } => unreachable(reason),
                other => other,
            }),
            // M_UNKNOWN_TOKEN (Synapse answers 401; some servers 403).
            401 | 403 => Err(OpenIdError::NotValid { server: server.to_owned() }),
            404 => Err(unreachable("it does not serve /_matrix/federation/v1/openid/userinfo (404)".into())),
            _ => Err(unreachable(format!("userinfo answered HTTP {status}"))),
        }
    }
}

/// A response body of at most [`MAX_ANSWER_BYTES`], read chunk by chunk.
async fn read_limited(mut r: reqwest::Response) -> Result<Vec<u8>, String> {
    let too_large = || format!("its answer is larger than {MAX_ANSWER_BYTES} bytes");
    if r.content_length().is_some_and(|n| n > MAX_ANSWER_BYTES as u64) {
        return Err(too_large());
    }
    let mut body = Vec::new();
    while let Some(chunk) = r.chunk().await.map_err(|e| e.without_url().to_string())? {
        if body.len() + chunk.len() > MAX_ANSWER_BYTES {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names_follow_the_spec_grammar() {
        assert_eq!(parse_server_name("example.org"), Some(("example.org", None)));
        assert_eq!(parse_server_name("localhost"), Some(("localhost", None)));
        assert_eq!(parse_server_name("matrix.example.org:8448"), Some(("matrix.example.org", Some(8448))));
        assert_eq!(parse_server_name("1.2.3.4:1"), Some(("1.2.3.4", Some(1))));
        assert_eq!(parse_server_name("[::1]"), Some(("[::1]", None)));
        assert_eq!(parse_server_name("[2001:db8::1]:443"), Some(("[2001:db8::1]", Some(443))));
        let long = "a".repeat(256);
        for bad in [
            "",
            ":80",
            "example.org:",
            "example.org:0",
            "example.org:65536",
            "example.org:8a",
            "example.org:80:80",
            "exa mple.org",
            "example.org/path",
            "user@example.org",
            "example.org?x",
            "[::1",
            "[zz]:80",
            "[::1]80",
            ".example.org",
            "-x.org",
            "é.org",
            long.as_str(),
        ] {
            assert_eq!(parse_server_name(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn overrides_ip_literals_and_ports_need_no_lookup() {
        let overrides = BTreeMap::from([("localhost".to_owned(), "http://127.0.0.1:18008/".to_owned())]);
        let d = |n: &str| discovery(n, &overrides);
        assert_eq!(d("localhost"), Some(Discovery::Base("http://127.0.0.1:18008".into())));
        assert_eq!(d("localhost:8448"), Some(Discovery::Base("https://localhost:8448".into())));
        assert_eq!(d("10.0.0.1"), Some(Discovery::Base("https://10.0.0.1:8448".into())));
        assert_eq!(d("[::1]:8009"), Some(Discovery::Base("https://[::1]:8009".into())));
        assert_eq!(d("example.org"), Some(Discovery::WellKnown { host: "example.org".into() }));
        assert_eq!(d("bad name"), None);
    }

    #[test]
    fn well_known_delegation_names_host_and_port() {
        assert_eq!(delegated_base(br#"{"m.server": "matrix.example.org:443"}"#).as_deref(), Some("https://matrix.example.org:443"));
        assert_eq!(delegated_base(br#"{"m.server": "matrix.example.org"}"#).as_deref(), Some("https://matrix.example.org:8448"));
        for bad in [&br#"{"m.server": "https://matrix.example.org"}"#[..], br#"{"m.server": 5}"#, b"{}", b"<html>"] {
            assert_eq!(delegated_base(bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn a_homeserver_vouches_only_for_its_own_users() {
        assert_eq!(vouched_user(br#"{"sub": "@alice:localhost"}"#, "localhost").unwrap().as_str(), "@alice:localhost");
        assert_eq!(
            vouched_user(br#"{"sub": "@alice:example.org:8448"}"#, "example.org:8448").unwrap().as_str(),
            "@alice:example.org:8448"
        );
        let e = vouched_user(br#"{"sub": "@alice:localhost"}"#, "example.org").unwrap_err();
        assert_eq!(e.reason(), "user_not_of_that_server");
        assert!(e.to_string().contains("@alice:localhost") && e.to_string().contains("example.org"), "{e}");
        for bad in [&br#"{"sub": "alice"}"#[..], br#"{"sub": "@:localhost"}"#, br#"{"sub": "@a"}"#, b"{}", b"[]"] {
            assert_eq!(vouched_user(bad, "localhost").unwrap_err().reason(), "homeserver_unreachable");
        }
    }

    #[test]
    fn proofs_are_checked_before_anything_is_sent() {
        let p = OpenIdProof::parse(br#"{"access_token": "abcDEF123", "matrix_server_name": "localhost", "expires_in": 3600, "token_type": "Bearer"}"#).unwrap();
        assert_eq!(p.matrix_server_name, "localhost");
        assert!(!format!("{p:?}").contains("abcDEF123"), "the token is never in Debug output");
        let long = format!(r#"{{"access_token": "{}", "matrix_server_name": "localhost"}}"#, "a".repeat(MAX_TOKEN_LEN + 1));
        for bad in [
            &b"not json"[..],
            br#"{"access_token": "abc"}"#,
            br#"{"access_token": 5, "matrix_server_name": "localhost"}"#,
            br#"{"access_token": "", "matrix_server_name": "localhost"}"#,
            br#"{"access_token": "a b", "matrix_server_name": "localhost"}"#,
            br#"{"access_token": "abc", "matrix_server_name": "evil.org/x?y"}"#,
            br#"{"access_token": "abc", "matrix_server_name": ""}"#,
            long.as_bytes(),
        ] {
            let e = OpenIdProof::parse(bad).unwrap_err();
            assert_eq!(e.reason(), "malformed", "{}", String::from_utf8_lossy(bad));
        }
    }
}
