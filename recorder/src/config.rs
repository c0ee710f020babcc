//! mxrec's configuration: one typed tree with defaults, read from one TOML file and overridden by
//! `MXREC_…` environment variables.
//!
//! Every key is documented in `mxrec.example.toml` at the repository root; that file is parsed by a
//! unit test below so the documentation cannot drift from the code. Library crates own the shape
//! of their own sections (`storage`, `upload`); this module composes them and is the only place the
//! binary reads settings from.
//!
//! Environment overrides: `MXREC_<SECTION>__<KEY>` (double underscore between levels), e.g.
//! `MXREC_CATALOG__URL=postgres://…` or `MXREC_COMPOSITE__FPS=25`. Only variables whose first part
//! names a known section or top-level key are read, so unrelated `MXREC_*` variables (test
//! harness coordinates, for instance) are never mistaken for configuration.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

/// Top-level keys and sections; the environment filter and the example test rely on this list.
const TOP_LEVEL_KEYS: &[&str] = &[
    "data_dir",
    "log",
    "recording",
    "composite",
    "storage",
    "upload",
    "catalog",
    "http",
    "matrix",
    "webrtc",
    "matrixrtc",
    "control",
    "whip",
];

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Directory for local state: the spool and the SQLite catalog (when their own keys are unset).
    /// The local store's directory is `storage.root`.
    pub data_dir: PathBuf,
    pub log: LogConfig,
    pub recording: RecordingConfig,
    pub composite: CompositeConfig,
    pub storage: storage::StoreConfig,
    pub upload: storage::UploaderConfig,
    pub catalog: CatalogConfig,
    pub http: HttpConfig,
    pub matrix: MatrixConfig,
    pub webrtc: WebrtcConfig,
    pub matrixrtc: MatrixRtcConfig,
    pub control: ControlConfig,
    pub whip: WhipConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./data"),
            log: LogConfig::default(),
            recording: RecordingConfig::default(),
            composite: CompositeConfig::default(),
            storage: storage::StoreConfig::default(),
            upload: storage::UploaderConfig::default(),
            catalog: CatalogConfig::default(),
            http: HttpConfig::default(),
            matrix: MatrixConfig::default(),
            webrtc: WebrtcConfig::default(),
            matrixrtc: MatrixRtcConfig::default(),
            control: ControlConfig::default(),
            whip: WhipConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A tracing filter: a level (`info`) or directives (`mxrec=debug,storage=info`).
    pub level: String,
    /// Emit JSON lines instead of human-readable text.
    pub json: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { level: "info".into(), json: false }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RecordingConfig {
    /// Length of each codec-copy segment in seconds. A crash loses at most the open segment.
    pub segment_seconds: f64,
    /// Where segments are written before upload; default `<data_dir>/spool`.
    pub spool_dir: Option<PathBuf>,
}

impl Default for RecordingConfig {
    fn default() -> Self {
        Self { segment_seconds: 2.0, spool_dir: None }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CompositeConfig {
    /// Render one composite MP4 (or M4A for audio-only calls) when a recording ends.
    pub enabled: bool,
    pub width: u32,
    pub height: u32,
    pub fps: u32,
    /// TrueType font for participant names under the tiles.
    pub font_path: PathBuf,
}

impl Default for CompositeConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            width: 1280,
            height: 720,
            fps: 30,
            font_path: PathBuf::from("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CatalogConfig {
    /// `sqlite://path.db` or `postgres://user:pass@host/db`; default `sqlite://<data_dir>/mxrec.db`.
    pub url: Option<String>,
}

/// The HTTP server (`mxrec serve`): share links, `/healthz`, `/metrics`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address the server listens on. Loopback by default: put a TLS reverse proxy in front.
    pub bind: String,
    /// Base URL people reach the server at; links are `<public_url>/r/<token>`.
    pub public_url: String,
    /// Lifetime of a share link, in hours (default 7 days).
    pub link_ttl_hours: u64,
    /// Lifetime of the presigned store URL a link redirects to (S3, GCS, Azure), in seconds.
    /// Only the start of a download must fall within it.
    pub presign_ttl_secs: u64,
    /// Time a request may take to produce its response headers; a download's body may stream for
    /// longer.
    pub request_timeout_secs: u64,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// After SIGINT/SIGTERM, how long open connections (downloads) may finish before the server
    /// closes them.
    pub shutdown_grace_secs: u64,
    /// Members-only links: where to check a Matrix OpenID token, by the server name the token
    /// claims (`"example.org"` → `"https://matrix.example.org"`, the base URL serving
    /// `/_matrix/federation/v1/openid/userinfo`). A server not listed is found through
    /// `https://<name>/.well-known/matrix/server`, else at `https://<name>:8448`.
    pub openid_homeservers: BTreeMap<String, String>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            bind: "127.0.0.1:8080".into(),
            public_url: "http://127.0.0.1:8080".into(),
            link_ttl_hours: 7 * 24,
            presign_ttl_secs: 15 * 60,
            request_timeout_secs: 30,
            max_body_bytes: 64 * 1024,
            shutdown_grace_secs: 10,
            openid_homeservers: BTreeMap::new(),
        }
    }
}

impl HttpConfig {
    pub fn link_ttl(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.link_ttl_hours.saturating_mul(3600))
    }

    pub fn presign_ttl(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.presign_ttl_secs)
    }

    /// `public_url` without a trailing slash, ready to have `/r/<token>` appended.
    pub fn public_base(&self) -> &str {
        self.public_url.trim_end_matches('/')
    }

    fn validate(&self, bad: &mut impl FnMut(&str, String)) {
        if self.bind.parse::<std::net::SocketAddr>().is_err() {
            bad("http.bind", format!("`{}` is not an address like 127.0.0.1:8080", self.bind));
        }
        let u = &self.public_url;
        let rest = u.strip_prefix("https://").or_else(|| u.strip_prefix("http://"));
        if rest.is_none_or(|r| r.is_empty() || r.starts_with('/') || r.contains(['?', '#', ' '])) {
            bad("http.public_url", format!("`{u}` is not an http(s):// base URL without query or fragment"));
        }
        if !(1..=24 * 366).contains(&self.link_ttl_hours) {
            bad("http.link_ttl_hours", format!("{} is outside 1..=8784 hours", self.link_ttl_hours));
        }
        // SigV4 presigned URLs cannot live longer than 7 days.
        if !(1..=7 * 24 * 3600).contains(&self.presign_ttl_secs) {
            bad("http.presign_ttl_secs", format!("{} is outside 1..=604800 seconds", self.presign_ttl_secs));
        }
        if self.request_timeout_secs == 0 {
            bad("http.request_timeout_secs", "must be at least 1".into());
        }
        for (name, base) in &self.openid_homeservers {
            let key = format!("http.openid_homeservers.\"{name}\"");
            if !crate::http::openid::is_server_name(name) {
                bad(&key, format!("`{name}` is not a Matrix server name like example.org or example.org:8448"));
            }
            let rest = base.strip_prefix("https://").or_else(|| base.strip_prefix("http://"));
            if rest.is_none_or(|r| r.is_empty() || r.starts_with('/') || r.contains(['?', '#', ' '])) {
                bad(&key, format!("`{base}` is not an http(s):// base URL without query or fragment"));
            }
        }
    }
}

/// The bot's Matrix account (`mxrec run`). Other subcommands ignore this section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MatrixConfig {
    /// Base URL of the homeserver's client API, e.g. `https://matrix.example.org`.
    pub homeserver: Option<String>,
    /// The bot's user: a full id (`@mxrec:example.org`) or a localpart.
    pub user: Option<String>,
    /// Password login; also lets the bot bootstrap cross-signing for its device.
    pub password: Option<String>,
    /// Alternatively an access token of an existing device, with that device's id.
    pub access_token: Option<String>,
    pub device_id: Option<String>,
    /// Display name of the device the bot creates at its first password login.
    pub device_name: String,
    /// Who may invite the bot into a room: user ids (`@alice:example.org`), server names
    /// (`example.org` or `:example.org`: every user of that server) or `*` (anyone). Empty: nobody.
    pub allowed_inviters: Vec<String>,
    /// Passphrase encrypting the bot's SQLite state and crypto stores at rest.
    pub store_passphrase: Option<String>,
    /// Where the stores and the saved session live; default `<data_dir>/matrix`.
    pub store_dir: Option<PathBuf>,
}

impl Default for MatrixConfig {
    fn default() -> Self {
        Self {
            homeserver: None,
            user: None,
            password: None,
            access_token: None,
            device_id: None,
            device_name: "mxrec recorder".into(),
            allowed_inviters: Vec::new(),
            store_passphrase: None,
            store_dir: None,
        }
    }
}

/// The WebRTC side of calls the bot takes part in.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebrtcConfig {
    /// UDP addresses each call binds, one ICE host candidate per address. `0.0.0.0:0` expands to
    /// every non-loopback interface; give `127.0.0.1:0` for calls on one machine.
    pub bind_addrs: Vec<String>,
    /// STUN/TURN server URLs (`stun:host:port`, `turn:host:port?transport=udp`).
    pub ice_servers: Vec<String>,
    /// Credentials for the TURN servers in `ice_servers`.
    pub turn_username: Option<String>,
    pub turn_password: Option<String>,
    /// Bounds on what a 1:1 caller's `m.call.*` events may hold; past them an event is rejected
    /// (and logged) as a whole, and a call's candidates past `max_candidates_per_call` are
    /// dropped. The homeserver already caps an event at 64 KiB; these keep a call's total and
    /// what reaches the WebRTC stack small.
    pub max_sdp_bytes: usize,
    pub max_candidates_per_event: usize,
    pub max_candidate_bytes: usize,
    pub max_candidates_per_call: usize,
}

impl WebrtcConfig {
    fn validate(&self, bad: &mut impl FnMut(&str, String)) {
        if self.bind_addrs.is_empty() {
            bad("webrtc.bind_addrs", "needs at least one address".into());
        }
        for a in &self.bind_addrs {
            if a.parse::<std::net::SocketAddr>().is_err() {
                bad("webrtc.bind_addrs", format!("`{a}` is not an address like 0.0.0.0:0"));
            }
        }
        for u in &self.ice_servers {
            if !(u.starts_with("stun:") || u.starts_with("turn:") || u.starts_with("turns:")) {
                bad("webrtc.ice_servers", format!("`{u}` is not a stun:/turn:/turns: URL"));
            }
        }
        for (key, v) in [
            ("webrtc.max_sdp_bytes", self.max_sdp_bytes),
            ("webrtc.max_candidates_per_event", self.max_candidates_per_event),
            ("webrtc.max_candidate_bytes", self.max_candidate_bytes),
            ("webrtc.max_candidates_per_call", self.max_candidates_per_call),
        ] {
            if v == 0 {
                bad(key, "must be at least 1".into());
            }
        }
    }

    /// The 1:1 signalling machine's settings with these bounds.
    pub fn voip1(&self) -> crate::voip1::Voip1Config {
        let mut cfg = crate::voip1::Voip1Config::default();
        cfg.max_remote_candidates = self.max_candidates_per_call;
        cfg.limits.max_sdp_bytes = self.max_sdp_bytes;
        cfg.limits.max_candidates_per_event = self.max_candidates_per_event;
        cfg.limits.max_candidate_bytes = self.max_candidate_bytes;
        cfg
    }
}

impl Default for WebrtcConfig {
    fn default() -> Self {
        Self {
            bind_addrs: vec!["0.0.0.0:0".into()],
            ice_servers: Vec::new(),
            turn_username: None,
            turn_password: None,
            max_sdp_bytes: 256 * 1024,
            max_candidates_per_event: 100,
            max_candidate_bytes: 1024,
            max_candidates_per_call: 200,
        }
    }
}

/// MatrixRTC calls (Element Call / Element X over LiveKit) that the bot records.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MatrixRtcConfig {
    /// Rooms (ids) whose MatrixRTC calls are recorded from the moment they start, for as long
    /// as they run. `mxrec record --room` asks a running bot for one call of any joined room.
    pub record_rooms: Vec<String>,
    /// SFUs the bot may mint its own LiveKit tokens for. A call whose focus
    /// (`livekit_service_url`) is not listed is joined through that JWT service with a Matrix
    /// OpenID token, as Element Call does.
    pub livekit: Vec<LiveKitCredentials>,
    /// The bot's call membership is removed by the homeserver this long after the bot stops
    /// refreshing it (MSC4140 delayed leave; refreshed every third of it).
    pub delayed_leave_ms: u64,
    /// `expires` of the bot's legacy membership event.
    pub membership_expires_ms: u64,
}

impl Default for MatrixRtcConfig {
    fn default() -> Self {
        Self {
            record_rooms: Vec::new(),
            livekit: Vec::new(),
            delayed_leave_ms: 10_000,
            membership_expires_ms: 4 * 3600 * 1000,
        }
    }
}

/// Who may control recordings from a room (`!rec …`), and how often.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlConfig {
    /// Room power level needed for `!rec start|stop|pause|resume|list` and for setting
    /// `org.mxrec.config`. `!rec status|help|optout|optin` are open to every member.
    pub power_level: i64,
    /// Users allowed those commands in every room the bot is in, whatever their power level.
    pub admins: Vec<String>,
    /// Commands one user may give per minute (over all rooms); more are refused.
    pub commands_per_user_per_minute: u32,
    /// Commands one room may give per minute (all users together).
    pub commands_per_room_per_minute: u32,
    /// Invites from one user the bot answers per hour; more are declined.
    pub invites_per_user_per_hour: u32,
    /// Links to recordings open only for current members of the recording's room (proven with a
    /// Matrix OpenID token), in every room; a room can ask for it alone with
    /// `org.mxrec.config` `{"members_only_links": true}`.
    pub members_only_links: bool,
}

impl Default for ControlConfig {
    fn default() -> Self {
        Self {
            power_level: 50,
            admins: Vec::new(),
            commands_per_user_per_minute: 10,
            commands_per_room_per_minute: 30,
            invites_per_user_per_hour: 20,
            members_only_links: false,
        }
    }
}

/// WHIP ingest (RFC 9725): any WHIP publisher (OBS, GStreamer, a browser) POSTs an SDP offer to
/// `<http.public_url>/whip/<name>` with the bearer token and is recorded like a call's participant.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WhipConfig {
    /// Off by default: the endpoint answers 404 until this is set.
    pub enabled: bool,
    /// The token every WHIP request must carry (`Authorization: Bearer …`); at least 16
    /// characters. Prefer the environment for it: `MXREC_WHIP__BEARER_TOKEN`.
    pub bearer_token: Option<String>,
    /// Sessions at once; one more is refused with 503.
    pub max_sessions: usize,
    /// A session whose media connection is not up this long after the answer is dropped.
    pub connect_timeout_secs: u64,
}

impl Default for WhipConfig {
    fn default() -> Self {
        Self { enabled: false, bearer_token: None, max_sessions: 50, connect_timeout_secs: 30 }
    }
}

impl std::fmt::Debug for WhipConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WhipConfig")
            .field("enabled", &self.enabled)
            .field("bearer_token", &self.bearer_token.as_ref().map(|_| "<redacted>"))
            .field("max_sessions", &self.max_sessions)
            .field("connect_timeout_secs", &self.connect_timeout_secs)
            .finish()
    }
}

impl WhipConfig {
    fn validate(&self, bad: &mut impl FnMut(&str, String)) {
        if !self.enabled {
            return;
        }
        match self.bearer_token.as_deref() {
            None => bad("whip.bearer_token", "is required when whip.enabled is set".into()),
            Some(t) if t.chars().count() < 16 || t.chars().any(|c| c.is_whitespace() || c.is_control()) => {
                bad("whip.bearer_token", "must be at least 16 characters without spaces".into())
            }
            Some(_) => {}
        }
        if self.max_sessions == 0 {
            bad("whip.max_sessions", "must be at least 1".into());
        }
        if self.connect_timeout_secs == 0 {
            bad("whip.connect_timeout_secs", "must be at least 1".into());
        }
    }
}

/// A LiveKit deployment mxrec has the API key of.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LiveKitCredentials {
    /// The `livekit_service_url` the room's members advertise for this SFU (`*`: any focus).
    pub service_url: String,
    /// The SFU's websocket URL, e.g. `wss://livekit.example.org`.
    pub url: String,
    pub api_key: String,
    pub api_secret: String,
}

impl std::fmt::Debug for LiveKitCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveKitCredentials")
            .field("service_url", &self.service_url)
            .field("url", &self.url)
            .field("api_key", &self.api_key)
            .finish_non_exhaustive()
    }
}

impl MatrixRtcConfig {
    /// The credentials for a focus, if mxrec has them.
    pub fn credentials_for(&self, service_url: &str) -> Option<&LiveKitCredentials> {
        let norm = |u: &str| u.trim_end_matches('/').to_owned();
        self.livekit
            .iter()
            .find(|c| norm(&c.service_url) == norm(service_url))
            .or_else(|| self.livekit.iter().find(|c| c.service_url == "*"))
    }
}

/// One thing wrong with a configuration, with the key it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

impl Config {
    /// Reads defaults ← `path` (when given) ← `MXREC_*` environment. Parse errors name the key and
    /// the file they came from.
    pub fn load(path: Option<&Path>) -> Result<Config, Vec<Problem>> {
        Self::figment(path, Env::prefixed("MXREC_"))
            .extract::<Config>()
            .map_err(|e| e.into_iter().map(problem_from_figment).collect())
    }

    fn figment(path: Option<&Path>, env: Env) -> Figment {
        // Defaults come from `#[serde(default)]`, not from a serialized default tree: merging one
        // would mix the default store's keys (`root`) into a file that picks another `kind`.
        let mut fig = Figment::new();
        if let Some(p) = path {
            fig = fig.merge(Toml::file_exact(p));
        }
        let env = env.split("__").filter(|key| {
            // Keys keep the variable's case here; figment matches fields case-insensitively.
            let first = key.as_str().split('.').next().unwrap_or("");
            TOP_LEVEL_KEYS.iter().any(|k| k.eq_ignore_ascii_case(first))
        });
        fig.merge(env)
    }

    pub fn spool_dir(&self) -> PathBuf {
        self.recording.spool_dir.clone().unwrap_or_else(|| self.data_dir.join("spool"))
    }

    pub fn catalog_url(&self) -> String {
        self.catalog
            .url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", self.data_dir.join("mxrec.db").display()))
    }

    pub fn matrix_store_dir(&self) -> PathBuf {
        self.matrix.store_dir.clone().unwrap_or_else(|| self.data_dir.join("matrix"))
    }

    /// What `mxrec run` needs beyond [`Config::validate`]: a usable Matrix account and WebRTC
    /// sockets.
    pub fn validate_bot(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        let mut bad = |key: &str, message: String| out.push(Problem { key: key.into(), message });
        let m = &self.matrix;
        match m.homeserver.as_deref() {
            None | Some("") => bad("matrix.homeserver", "is required to run the bot".into()),
            Some(h) if !(h.starts_with("http://") || h.starts_with("https://")) => {
                bad("matrix.homeserver", format!("`{h}` is not an http(s):// URL"))
            }
            Some(_) => {}
        }
        match m.user.as_deref() {
            None | Some("") => bad("matrix.user", "is required to run the bot".into()),
            Some(u) if u.starts_with('@') && !u.contains(':') => {
                bad("matrix.user", format!("`{u}` is neither a localpart nor @localpart:server"))
            }
            Some(_) => {}
        }
        match (&m.password, &m.access_token, &m.device_id) {
            (None, None, _) => bad("matrix.password", "give a password or an access_token".into()),
            (None, Some(_), None) => {
                bad("matrix.device_id", "an access_token needs the id of the device it belongs to".into())
            }
            _ => {}
        }
        for who in &m.allowed_inviters {
            if crate::bot::Allowlist::parse_entry(who).is_none() {
                bad("matrix.allowed_inviters", format!("`{who}` is not a user id, a server name or `*`"));
            }
        }
        self.webrtc.validate(&mut bad);
        let c = &self.control;
        for a in &c.admins {
            if !a.starts_with('@') || !a.contains(':') {
                bad("control.admins", format!("`{a}` is not a user id like @alice:example.org"));
            }
        }
        for (key, v) in [
            ("control.commands_per_user_per_minute", c.commands_per_user_per_minute),
            ("control.commands_per_room_per_minute", c.commands_per_room_per_minute),
            ("control.invites_per_user_per_hour", c.invites_per_user_per_hour),
        ] {
            if v == 0 {
                bad(key, "must be at least 1".into());
            }
        }
        let r = &self.matrixrtc;
        for room in &r.record_rooms {
            if !room.starts_with('!') || !room.contains(':') {
                bad("matrixrtc.record_rooms", format!("`{room}` is not a room id like !abc:example.org"));
            }
        }
        for c in &r.livekit {
            if !(c.url.starts_with("ws://") || c.url.starts_with("wss://")) {
                bad("matrixrtc.livekit.url", format!("`{}` is not a ws:// or wss:// URL", c.url));
            }
            if c.api_key.is_empty() || c.api_secret.is_empty() {
                bad("matrixrtc.livekit", format!("the credentials for `{}` need api_key and api_secret", c.service_url));
            }
        }
        if !(2_000..=600_000).contains(&r.delayed_leave_ms) {
            bad("matrixrtc.delayed_leave_ms", format!("{} is outside 2000..=600000", r.delayed_leave_ms));
        }
        if r.membership_expires_ms < 60_000 {
            bad("matrixrtc.membership_expires_ms", format!("{} is under a minute", r.membership_expires_ms));
        }
        out
    }

    pub fn segment_duration(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(self.recording.segment_seconds)
    }

    /// Semantic checks beyond what parsing catches; empty when the configuration is usable.
    pub fn validate(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        let mut bad = |key: &str, message: String| out.push(Problem { key: key.into(), message });

        let seg = self.recording.segment_seconds;
        if !(0.5..=60.0).contains(&seg) {
            bad("recording.segment_seconds", format!("{seg} is outside 0.5..=60 seconds"));
        }
        let c = &self.composite;
        if !(160..=3840).contains(&c.width) || c.width % 2 != 0 {
            bad("composite.width", format!("{} must be even and within 160..=3840", c.width));
        }
        if !(120..=2160).contains(&c.height) || c.height % 2 != 0 {
            bad("composite.height", format!("{} must be even and within 120..=2160", c.height));
        }
        if !(1..=60).contains(&c.fps) {
            bad("composite.fps", format!("{} is outside 1..=60", c.fps));
        }
        if c.enabled && !c.font_path.is_file() {
            bad(
                "composite.font_path",
                format!(
                    "{} is not a readable file (Debian: apt-get install fonts-dejavu-core)",
                    c.font_path.display()
                ),
            );
        }
        let url = self.catalog_url();
        if !(url.starts_with("sqlite:") || url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            bad("catalog.url", format!("`{url}` is neither sqlite://… nor postgres://…"));
        }
        // Building a remote store checks its settings without touching the network. A local
        // store is not built here: that would create its directory, and validating must have no
        // side effects (the directory is created when mxrec starts recording).
        match &self.storage.backend {
            storage::StoreBackend::Local(l) if l.root.as_os_str().is_empty() => {
                bad("storage.root", "is empty; give the directory for local recordings".into())
            }
            storage::StoreBackend::Local(_) => {}
            _ => {
                if let Err(e) = storage::build_store(&self.storage) {
                    bad("storage", e.to_string());
                }
            }
        }
        if let Err(e) = self.upload.validate() {
            bad("upload", e.to_string());
        }
        self.http.validate(&mut bad);
        self.whip.validate(&mut bad);
        if self.whip.enabled {
            // WHIP sessions are peer connections like calls; `mxrec serve` records them too.
            self.webrtc.validate(&mut bad);
        }
        out
    }
}

fn problem_from_figment(e: figment::Error) -> Problem {
    let key = if e.path.is_empty() { "(file)".to_string() } else { e.path.join(".") };
    let source = e
        .metadata
        .as_ref()
        .map(|m| match &m.source {
            Some(src) => format!(" (from {src})"),
            None => format!(" (from {})", m.name),
        })
        .unwrap_or_default();
    Problem { key, message: format!("{}{source}", e.kind) }
}

#[cfg(test)]
mod tests {
    use super::*;

    // figment::Jail owns the process environment during a closure; this helper keeps tests short.
    fn with_env<T>(env: &[(&str, &str)], f: impl FnOnce() -> T) -> T {
        let mut out = None;
        figment::Jail::expect_with(|jail| {
            jail.clear_env();
            for (k, v) in env {
                jail.set_env(k, v);
            }
            out = Some(f());
            Ok(())
        });
        out.unwrap()
    }

    #[test]
    fn defaults_are_valid_except_for_machine_dependent_font() {
        let c = Config::default();
        let problems: Vec<_> =
            c.validate().into_iter().filter(|p| p.key != "composite.font_path").collect();
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(c.catalog_url(), "sqlite://./data/mxrec.db");
        assert_eq!(c.spool_dir(), PathBuf::from("./data/spool"));
    }

    #[test]
    fn example_file_documents_a_valid_config() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../mxrec.example.toml");
        let cfg = with_env(&[], || Config::load(Some(&path))).expect("example parses");
        // The values it shows are the defaults, so the file documents them truthfully.
        assert_eq!(
            toml::Value::try_from(&cfg).unwrap(),
            toml::Value::try_from(Config::default()).unwrap(),
            "mxrec.example.toml shows a value that is not the default"
        );
        let problems: Vec<_> =
            cfg.validate().into_iter().filter(|p| p.key != "composite.font_path").collect();
        assert!(problems.is_empty(), "{problems:?}");
        // Every section of the tree appears in the example.
        let text = std::fs::read_to_string(&path).unwrap();
        for key in TOP_LEVEL_KEYS {
            let present = text.lines().any(|l| {
                let l = l.trim_start_matches('#').trim();
                l.starts_with(&format!("[{key}]")) || l.starts_with(&format!("{key} ="))
            });
            assert!(present, "mxrec.example.toml does not document `{key}`");
        }
    }

    #[test]
    fn env_overrides_file_and_ignores_unrelated_variables() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.toml");
        std::fs::write(&path, "[composite]\nfps = 25\n").unwrap();
        let cfg = with_env(
            &[("MXREC_COMPOSITE__WIDTH", "640"), ("MXREC_S3_ENDPOINT", "http://x"), ("MXREC_CONFIG", "y")],
            || Config::load(Some(&path)),
        )
        .unwrap();
        assert_eq!(cfg.composite.fps, 25);
        assert_eq!(cfg.composite.width, 640);
    }

    #[test]
    fn a_store_kind_other_than_the_default_takes_only_its_own_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.toml");
        std::fs::write(&path, "[storage]\nkind = \"s3\"\nbucket = \"b\"\nendpoint = \"http://127.0.0.1:1\"\n").unwrap();
        let cfg = with_env(&[], || Config::load(Some(&path))).unwrap();
        assert!(matches!(cfg.storage.backend, storage::StoreBackend::S3(_)));
        // And no file at all gives the embedded defaults.
        let cfg = with_env(&[], || Config::load(None)).unwrap();
        assert!(matches!(cfg.storage.backend, storage::StoreBackend::Local(_)));
        assert_eq!(cfg.composite.width, 1280);
    }

    #[test]
    fn openid_homeservers_take_dotted_server_names_and_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.toml");
        std::fs::write(
            &path,
            "[http.openid_homeservers]\n\"example.org\" = \"https://matrix.example.org\"\n\
             \"localhost:8448\" = \"http://127.0.0.1:8008/\"\n",
        )
        .unwrap();
        let cfg = with_env(&[], || Config::load(Some(&path))).unwrap();
        assert_eq!(cfg.http.openid_homeservers.len(), 2, "{:?}", cfg.http.openid_homeservers);
        assert_eq!(cfg.http.openid_homeservers["example.org"], "https://matrix.example.org");
        assert_eq!(cfg.http.openid_homeservers["localhost:8448"], "http://127.0.0.1:8008/");
        assert!(cfg.validate().iter().all(|p| !p.key.starts_with("http.")), "{:?}", cfg.validate());

        std::fs::write(&path, "[http.openid_homeservers]\n\"bad name/x\" = \"ftp://x\"\n").unwrap();
        let cfg = with_env(&[], || Config::load(Some(&path))).unwrap();
        let problems: Vec<_> = cfg.validate().into_iter().filter(|p| p.key.starts_with("http.")).collect();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems.iter().all(|p| p.key == "http.openid_homeservers.\"bad name/x\""), "{problems:?}");
    }

    #[test]
    fn call_event_limits_reach_the_signalling_machine_and_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.toml");
        std::fs::write(&path, "[webrtc]\nmax_sdp_bytes = 4096\nmax_candidates_per_call = 5\n").unwrap();
        let cfg = with_env(&[], || Config::load(Some(&path))).unwrap();
        let v = cfg.webrtc.voip1();
        assert_eq!((v.limits.max_sdp_bytes, v.max_remote_candidates), (4096, 5));
        assert_eq!(v.limits.max_candidates_per_event, 100, "the others keep their defaults");
        let defaults = WebrtcConfig::default().voip1();
        assert_eq!(defaults.limits, crate::voip1::Voip1Config::default().limits);
        assert_eq!(defaults.max_remote_candidates, crate::voip1::Voip1Config::default().max_remote_candidates);

        let mut c = Config::default();
        c.webrtc.max_candidates_per_event = 0;
        let keys: Vec<_> = c.validate_bot().into_iter().map(|p| p.key).collect();
        assert!(keys.contains(&"webrtc.max_candidates_per_event".to_string()), "{keys:?}");
    }

    #[test]
    fn unknown_key_and_wrong_type_are_explained_with_their_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.toml");
        std::fs::write(&path, "[composite]\nfps = \"fast\"\n").unwrap();
        let err = with_env(&[], || Config::load(Some(&path))).unwrap_err();
        assert_eq!(err[0].key, "composite.fps", "{err:?}");
        assert!(err[0].message.contains("m.toml"), "{err:?}");

        std::fs::write(&path, "[composite]\nfsp = 30\n").unwrap();
        let err = with_env(&[], || Config::load(Some(&path))).unwrap_err();
        assert!(err[0].message.contains("fsp"), "{err:?}");
    }

    #[test]
    fn validate_names_each_bad_key() {
        let mut c = Config::default();
        c.composite.width = 1279;
        c.composite.fps = 0;
        c.recording.segment_seconds = 0.1;
        c.catalog.url = Some("mysql://x".into());
        c.http.bind = "localhost".into();
        c.http.public_url = "ftp://x".into();
        c.http.link_ttl_hours = 0;
        c.http.presign_ttl_secs = 8 * 24 * 3600;
        let keys: Vec<_> = c.validate().into_iter().map(|p| p.key).collect();
        for k in [
            "composite.width",
            "composite.fps",
            "recording.segment_seconds",
            "catalog.url",
            "http.bind",
            "http.public_url",
            "http.link_ttl_hours",
            "http.presign_ttl_secs",
        ] {
            assert!(keys.contains(&k.to_string()), "{k} missing from {keys:?}");
        }
    }
}
