//! Who is in a MatrixRTC call (Element Call over LiveKit), and whose media key is whose.
//!
//! One [`RtcSession`] follows one room's call in slot `m.call#ROOM`. Memberships come from two
//! places that Element Call writes depending on its mode: legacy `org.matrix.msc3401.call.member`
//! state events (modes `legacy` and `compatibility`, the default) and sticky
//! `org.matrix.msc4143.rtc.member` timeline events (mode `matrix_2_0`). The session merges them the
//! way matrix-js-sdk does (`sessionMembershipsForSlot`): sticky wins for the same user+device, a
//! membership counts only while unexpired and while its user is joined to the room, and the
//! result is ordered by creation time. Changes come out as [`SessionEvent`]s from
//! [`RtcSession::poll_event`]; each [`Member`] carries the LiveKit identity its media will have
//! and the SFU (transport) it publishes to, so the caller knows which LiveKit rooms to join.
//!
//! [`KeyRouter`] takes `io.element.call.encryption_keys` (to-device, or the old room-event
//! variant), maps each key to a LiveKit identity through the session's members and emits
//! [`KeyUpdate`]s for the frame decryptor. A key is never membership: keys from devices not (yet)
//! in the call are held until their membership appears, and keys from devices that have left keep
//! working for the identity they had, since frames in flight may still need them.
//!
//! Everything here is sans-IO: the caller feeds parsed events and `now_ms` (Unix ms) and polls
//! outputs; nothing reads a clock or touches the network. Key bytes never appear in `Debug` output
//! or logs.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt;

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD_NO_PAD};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

/// State event type of legacy (session) memberships.
pub const LEGACY_MEMBER_EVENT_TYPE: &str = "org.matrix.msc3401.call.member";
/// Sticky event type of MSC4143 memberships.
pub const RTC_MEMBER_EVENT_TYPE: &str = "org.matrix.msc4143.rtc.member";
/// Media key event type, to-device and (old clients) room event.
pub const ENCRYPTION_KEYS_EVENT_TYPE: &str = "io.element.call.encryption_keys";
/// The one slot Element Call uses: application `m.call`, id `ROOM` (legacy `call_id: ""`).
pub const CALL_SLOT_ID: &str = "m.call#ROOM";
/// Legacy `expires` when the content has none (js-sdk `DEFAULT_EXPIRE_DURATION`).
pub const DEFAULT_LEGACY_EXPIRES_MS: u64 = 4 * 60 * 60 * 1000;
/// Sticky duration when the caller doesn't know the event's; also what js-sdk sends with.
pub const DEFAULT_STICKY_DURATION_MS: u64 = 60 * 60 * 1000;
/// MSC4354 caps stickiness at one hour; longer claims are clamped.
pub const MAX_STICKY_DURATION_MS: u64 = 60 * 60 * 1000;

/// Keys kept per (user, device), the newest per index; the oldest is dropped first.
const MAX_KEPT_KEYS_PER_DEVICE: usize = 64;
/// Devices never seen in the call whose keys are kept at most; beyond this the one holding the
/// oldest key is forgotten.
const MAX_UNKNOWN_DEVICES: usize = 256;
/// Key lengths accepted. Element Call sends 16 bytes; LiveKit derives from any length, so only
/// the absurd is refused.
const KEY_LEN_RANGE: std::ops::RangeInclusive<usize> = 1..=64;

const LEGACY_LABEL: &str = "org.matrix.msc3401.call.member state event";
const STICKY_LABEL: &str = "org.matrix.msc4143.rtc.member sticky event";
const TO_DEVICE_KEYS_LABEL: &str = "io.element.call.encryption_keys to-device event";
const ROOM_KEYS_LABEL: &str = "io.element.call.encryption_keys room event";

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// Why an event was refused. Each names the event kind and the offending field; the event is
/// then ignored (for a state or sticky event, whatever it replaced no longer counts).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RtcParseError {
    #[error("{event}: content is not a JSON object; event ignored")]
    NotAnObject { event: &'static str },
    #[error("{event}: required field `{field}` is missing; event ignored")]
    Missing { event: &'static str, field: String },
    #[error("{event}: field `{field}` must be {expected}; event ignored")]
    WrongType {
        event: &'static str,
        field: String,
        expected: &'static str,
    },
    #[error("{event}: field `{field}` is invalid: {reason}; event ignored")]
    Invalid {
        event: &'static str,
        field: String,
        reason: String,
    },
    #[error(
        "{LEGACY_LABEL}: state key `{state_key}` is not `[_]{sender}_{device}[_<application><call_id>]` \
         for sender {sender} and device `{device}`; event ignored"
    )]
    StateKeyMismatch {
        state_key: String,
        sender: String,
        device: String,
    },
    #[error("{event}: member user `{claimed}` is not the sender {sender}; event ignored")]
    SenderMismatch {
        event: &'static str,
        claimed: String,
        sender: String,
    },
    #[error(
        "{LEGACY_LABEL}: the old `memberships` array format (state key {state_key}) is not \
         supported; event ignored"
    )]
    UnsupportedLegacyFormat { state_key: String },
    #[error(
        "io.element.call.encryption_keys for room {got} handed to the key router of room \
         {expected}; keys dropped"
    )]
    RoomMismatch { expected: String, got: String },
}

type Result<T> = std::result::Result<T, RtcParseError>;

/// A JSON object being read, with the event label and the path prefix errors should name.
struct Obj<'a> {
    event: &'static str,
    path: String,
    map: &'a Map<String, Value>,
}

impl<'a> Obj<'a> {
    fn root(event: &'static str, v: &'a Value) -> Result<Self> {
        match v.as_object() {
            Some(map) => Ok(Obj {
                event,
                path: String::new(),
                map,
            }),
            None => Err(RtcParseError::NotAnObject { event }),
        }
    }

    fn field(&self, name: &str) -> String {
        format!("{}{}", self.path, name)
    }

    /// Present and not null.
    fn get(&self, name: &str) -> Option<&'a Value> {
        self.map.get(name).filter(|v| !v.is_null())
    }

    fn has(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    fn missing(&self, name: &str) -> RtcParseError {
        RtcParseError::Missing {
            event: self.event,
            field: self.field(name),
        }
    }

    fn wrong(&self, name: &str, expected: &'static str) -> RtcParseError {
        RtcParseError::WrongType {
            event: self.event,
            field: self.field(name),
            expected,
        }
    }

    fn invalid(&self, name: &str, reason: impl Into<String>) -> RtcParseError {
        RtcParseError::Invalid {
            event: self.event,
            field: self.field(name),
            reason: reason.into(),
        }
    }

    fn opt_str(&self, name: &str) -> Result<Option<&'a str>> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(self.wrong(name, "a string")),
        }
    }

    fn str(&self, name: &str) -> Result<&'a str> {
        self.opt_str(name)?.ok_or_else(|| self.missing(name))
    }

    /// A non-negative integer; JSON floats with no fraction are accepted (JS has only numbers).
    fn opt_u64(&self, name: &str) -> Result<Option<u64>> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Number(n)) => {
                if let Some(u) = n.as_u64() {
                    return Ok(Some(u));
                }
                match n.as_f64() {
                    Some(f) if f.is_finite() && f >= 0.0 && f.fract() == 0.0 && f < 9.007e15 => {
                        Ok(Some(f as u64))
                    }
                    _ => Err(self.wrong(name, "a non-negative integer")),
                }
            }
            Some(_) => Err(self.wrong(name, "a non-negative integer")),
        }
    }

    fn obj(&self, name: &str) -> Result<Obj<'a>> {
        match self.get(name) {
            None => Err(self.missing(name)),
            Some(Value::Object(map)) => Ok(Obj {
                event: self.event,
                path: format!("{}.", self.field(name)),
                map,
            }),
            Some(_) => Err(self.wrong(name, "an object")),
        }
    }

    fn opt_array(&self, name: &str) -> Result<Option<&'a Vec<Value>>> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(_) => Err(self.wrong(name, "an array")),
        }
    }

    fn array(&self, name: &str) -> Result<&'a Vec<Value>> {
        self.opt_array(name)?.ok_or_else(|| self.missing(name))
    }

    fn element(&self, name: &str, i: usize, v: &'a Value) -> Result<Obj<'a>> {
        let path = format!("{}[{i}]", self.field(name));
        match v.as_object() {
            Some(map) => Ok(Obj {
                event: self.event,
                path: format!("{path}."),
                map,
            }),
            None => Err(RtcParseError::WrongType {
                event: self.event,
                field: path,
                expected: "an object",
            }),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Transports
// ---------------------------------------------------------------------------------------------

/// A LiveKit SFU as MatrixRTC names it: the JWT service to ask for a token, and (legacy
/// memberships only) the alias Element Call adds, which is the Matrix room id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Transport {
    pub livekit_service_url: String,
    pub livekit_alias: Option<String>,
}

/// One entry of `foci_preferred` / `rtc_transports` / `transports.published`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransportEntry {
    Livekit(Transport),
    /// Another transport type, or a `livekit` entry without a service URL: nothing a LiveKit
    /// recorder can connect to.
    Other {
        kind: String,
    },
}

impl TransportEntry {
    fn livekit(&self) -> Option<&Transport> {
        match self {
            TransportEntry::Livekit(t) => Some(t),
            TransportEntry::Other { .. } => None,
        }
    }
}

fn parse_transports(o: &Obj<'_>, name: &str, list: &[Value]) -> Result<Vec<TransportEntry>> {
    let mut out = Vec::with_capacity(list.len());
    for (i, v) in list.iter().enumerate() {
        let t = o.element(name, i, v)?;
        let kind = t.str("type")?;
        let url = t.opt_str("livekit_service_url")?;
        let alias = t.opt_str("livekit_alias")?;
        out.push(match (kind, url) {
            ("livekit", Some(url)) if !url.is_empty() => TransportEntry::Livekit(Transport {
                livekit_service_url: url.to_owned(),
                livekit_alias: alias.map(str::to_owned),
            }),
            _ => TransportEntry::Other {
                kind: kind.to_owned(),
            },
        });
    }
    Ok(out)
}

/// The transport a member publishes to when the list's first entry is LiveKit. js-sdk takes
/// entry 0 whatever it is; a later LiveKit entry is not where this member's media is.
fn first_livekit(list: &[TransportEntry]) -> Option<Transport> {
    list.first().and_then(TransportEntry::livekit).cloned()
}

// ---------------------------------------------------------------------------------------------
// Legacy state memberships
// ---------------------------------------------------------------------------------------------

/// `focus_active.focus_selection`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FocusSelection {
    /// Each member publishes to its own `foci_preferred[0]` (Element Call `compatibility`).
    MultiSfu,
    /// Everyone uses the oldest member's transport (Element Call `legacy`).
    OldestMembership,
    /// Unknown or absent: js-sdk then has no transport for the member.
    Other(String),
}

/// A parsed `org.matrix.msc3401.call.member` state event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegacyMemberEvent {
    pub state_key: String,
    pub sender: String,
    pub origin_server_ts: u64,
    pub content: LegacyContent,
}

// Parsed events are short-lived values on their way into the session; boxing buys nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LegacyContent {
    /// No `application` (`{}` or `{leave_reason}`): whatever this state key said is withdrawn.
    Leave,
    Member(LegacyMembership),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegacyMembership {
    pub application: String,
    /// As on the wire; `""` is the room call.
    pub call_id: String,
    /// `application#call_id`, with `""` read as `ROOM`.
    pub slot_id: String,
    pub scope: Option<String>,
    pub device_id: String,
    pub membership_id: Option<String>,
    /// `created_ts`, or the event's `origin_server_ts` when absent (first join).
    pub created_ts: u64,
    pub expires_ms: u64,
    /// `created_ts + expires`: the membership counts while `now < expires_at_ms`.
    pub expires_at_ms: u64,
    pub focus_type: String,
    pub focus_selection: FocusSelection,
    pub foci_preferred: Vec<TransportEntry>,
    pub call_intent: Option<String>,
}

/// The part of a legacy state key after `[_]{sender}_`, or `None` when it isn't the sender's.
fn legacy_state_key_rest<'a>(state_key: &'a str, sender: &str) -> Option<&'a str> {
    // A Matrix user id starts with `@`, so a leading `_` is never part of it.
    let key = state_key.strip_prefix('_').unwrap_or(state_key);
    key.strip_prefix(sender)?
        .strip_prefix('_')
        .filter(|rest| !rest.is_empty())
}

/// Parses a legacy membership state event.
///
/// State keys accepted: `{sender}_{device}_{application}{call_id}` (js-sdk today; for the room
/// call `…_m.call`) and the older `{sender}_{device}`, each with or without the leading `_` that
/// rooms without MSC3757/MSC3779 need. For a leave only the `[_]{sender}_` prefix is checked,
/// since there is no device to compare with.
pub fn parse_legacy_member(
    state_key: &str,
    sender: &str,
    origin_server_ts: u64,
    content: &Value,
) -> Result<LegacyMemberEvent> {
    let o = Obj::root(LEGACY_LABEL, content)?;
    if o.has("memberships") {
        return Err(RtcParseError::UnsupportedLegacyFormat {
            state_key: state_key.to_owned(),
        });
    }
    let rest = legacy_state_key_rest(state_key, sender);
    let event = |content| LegacyMemberEvent {
        state_key: state_key.to_owned(),
        sender: sender.to_owned(),
        origin_server_ts,
        content,
    };
    if !o.has("application") {
        if rest.is_none() {
            return Err(RtcParseError::StateKeyMismatch {
                state_key: state_key.to_owned(),
                sender: sender.to_owned(),
                device: "<any>".to_owned(),
            });
        }
        return Ok(event(LegacyContent::Leave));
    }

    let application = o.str("application")?;
    let call_id = o.str("call_id")?;
    let device_id = o.str("device_id")?;
    if device_id.is_empty() {
        return Err(o.invalid("device_id", "empty"));
    }
    let key_ok = rest.is_some_and(|rest| {
        rest == device_id || rest == format!("{device_id}_{application}{call_id}")
    });
    if !key_ok {
        return Err(RtcParseError::StateKeyMismatch {
            state_key: state_key.to_owned(),
            sender: sender.to_owned(),
            device: device_id.to_owned(),
        });
    }
    let scope = o.opt_str("scope")?;
    let membership_id = o.opt_str("membershipID")?;
    let call_intent = o.opt_str("m.call.intent")?;
    let created_ts = o.opt_u64("created_ts")?.unwrap_or(origin_server_ts);
    let expires_ms = o.opt_u64("expires")?.unwrap_or(DEFAULT_LEGACY_EXPIRES_MS);
    let focus = o.obj("focus_active")?;
    let focus_type = focus.str("type")?;
    let focus_selection = match focus.opt_str("focus_selection")? {
        Some("multi_sfu") => FocusSelection::MultiSfu,
        Some("oldest_membership") => FocusSelection::OldestMembership,
        other => FocusSelection::Other(other.unwrap_or_default().to_owned()),
    };
    let foci = o.array("foci_preferred")?;
    let foci_preferred = parse_transports(&o, "foci_preferred", foci)?;
    let slot_call = if call_id.is_empty() { "ROOM" } else { call_id };
    Ok(event(LegacyContent::Member(LegacyMembership {
        application: application.to_owned(),
        call_id: call_id.to_owned(),
        slot_id: format!("{application}#{slot_call}"),
        scope: scope.map(str::to_owned),
        device_id: device_id.to_owned(),
        membership_id: membership_id.map(str::to_owned),
        created_ts,
        expires_ms,
        expires_at_ms: created_ts.saturating_add(expires_ms),
        focus_type: focus_type.to_owned(),
        focus_selection,
        foci_preferred,
        call_intent: call_intent.map(str::to_owned),
    })))
}

// ---------------------------------------------------------------------------------------------
// Sticky memberships
// ---------------------------------------------------------------------------------------------

/// A parsed `org.matrix.msc4143.rtc.member` sticky event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StickyMemberEvent {
    pub sender: String,
    pub origin_server_ts: u64,
    /// `sticky_key` or `msc4354_sticky_key`; with the sender it names what a later event replaces.
    pub sticky_key: String,
    /// The stickiness the caller knew of, clamped to [`MAX_STICKY_DURATION_MS`].
    pub sticky_duration_ms: u64,
    pub content: StickyContent,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StickyContent {
    /// Neither `application` nor `member`: `{msc4354_sticky_key[, slot_id][, leave_reason]}`.
    Leave {
        slot_id: Option<String>,
    },
    Member(RtcMembership),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RtcMembership {
    /// `application.type`.
    pub application: String,
    pub call_intent: Option<String>,
    pub slot_id: String,
    pub user_id: String,
    pub device_id: String,
    /// `member.id`, part of the hashed LiveKit identity.
    pub member_id: String,
    /// `transports.published` (js-sdk 43) or `rtc_transports` (older).
    pub transports: Vec<TransportEntry>,
}

/// Parses a sticky membership event. `sticky_duration_ms` is the event's stickiness as the
/// caller got it (unsigned/sticky data); `None` means [`DEFAULT_STICKY_DURATION_MS`].
///
/// Lenient where js-sdk is strict but nothing here depends on it: `versions` and
/// `transports.can_subscribe` may be absent, and `member.claimed_user_id`/`claimed_device_id`
/// (an earlier draft) are read when `user_id`/`device_id` are not there.
pub fn parse_sticky_member(
    sender: &str,
    origin_server_ts: u64,
    content: &Value,
    sticky_duration_ms: Option<u64>,
) -> Result<StickyMemberEvent> {
    let o = Obj::root(STICKY_LABEL, content)?;
    let sticky_key = match (o.opt_str("sticky_key")?, o.opt_str("msc4354_sticky_key")?) {
        (Some(a), Some(b)) if a != b => {
            return Err(o.invalid("sticky_key", "differs from msc4354_sticky_key"));
        }
        (Some(k), _) | (None, Some(k)) => k.to_owned(),
        (None, None) => return Err(o.missing("sticky_key or msc4354_sticky_key")),
    };
    let event = |content| StickyMemberEvent {
        sender: sender.to_owned(),
        origin_server_ts,
        sticky_key: sticky_key.clone(),
        sticky_duration_ms: sticky_duration_ms
            .unwrap_or(DEFAULT_STICKY_DURATION_MS)
            .min(MAX_STICKY_DURATION_MS),
        content,
    };
    if !o.has("application") && !o.has("member") {
        let slot_id = o.opt_str("slot_id")?.map(str::to_owned);
        return Ok(event(StickyContent::Leave { slot_id }));
    }

    let app = o.obj("application")?;
    let application = app.str("type")?;
    if application.contains('#') {
        return Err(app.invalid("type", "must not contain `#`"));
    }
    let call_intent = app.opt_str("m.call.intent")?;
    let slot_id = o.str("slot_id")?;
    if !slot_id
        .strip_prefix(application)
        .is_some_and(|s| s.starts_with('#') && s.len() > 1)
    {
        return Err(o.invalid("slot_id", format!("must be `{application}#<id>`")));
    }
    let member = o.obj("member")?;
    let user_id = match member.opt_str("user_id")? {
        Some(u) => u,
        None => member
            .opt_str("claimed_user_id")?
            .ok_or_else(|| member.missing("user_id"))?,
    };
    let device_id = match member.opt_str("device_id")? {
        Some(d) => d,
        None => member
            .opt_str("claimed_device_id")?
            .ok_or_else(|| member.missing("device_id"))?,
    };
    if device_id.is_empty() {
        return Err(member.invalid("device_id", "empty"));
    }
    let member_id = member.str("id")?;
    if user_id != sender {
        return Err(RtcParseError::SenderMismatch {
            event: STICKY_LABEL,
            claimed: user_id.to_owned(),
            sender: sender.to_owned(),
        });
    }
    let transports = if o.has("transports") {
        let t = o.obj("transports")?;
        if let Some(subs) = t.opt_array("can_subscribe")? {
            if !subs.iter().all(Value::is_string) {
                return Err(t.wrong("can_subscribe", "an array of strings"));
            }
        }
        parse_transports(&t, "published", t.array("published")?)?
    } else if o.has("rtc_transports") {
        parse_transports(&o, "rtc_transports", o.array("rtc_transports")?)?
    } else {
        return Err(o.missing("transports.published or rtc_transports"));
    };
    Ok(event(StickyContent::Member(RtcMembership {
        application: application.to_owned(),
        call_intent: call_intent.map(str::to_owned),
        slot_id: slot_id.to_owned(),
        user_id: user_id.to_owned(),
        device_id: device_id.to_owned(),
        member_id: member_id.to_owned(),
        transports,
    })))
}

// ---------------------------------------------------------------------------------------------
// Key events
// ---------------------------------------------------------------------------------------------

/// One media key. `Debug` shows its length, never its bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct EncryptionKey {
    pub index: u8,
    pub key: Vec<u8>,
}

impl fmt::Debug for EncryptionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EncryptionKey")
            .field("index", &self.index)
            .field("key", &format_args!("<{} bytes redacted>", self.key.len()))
            .finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySource {
    ToDevice,
    RoomEvent,
}

/// A parsed `io.element.call.encryption_keys`, either variant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncryptionKeysEvent {
    pub room_id: String,
    pub sender: String,
    /// The claimed device, trusted as js-sdk trusts it.
    pub device_id: String,
    /// `member.id`, defaulting to `sender:device` (informational: routing uses the membership).
    pub member_id: String,
    pub keys: Vec<EncryptionKey>,
    /// The sender's `sent_ts`; for a room event without one, its `origin_server_ts`.
    pub sent_ts: Option<u64>,
    pub source: KeySource,
}

/// Std or URL-safe alphabet, padded or not, as js-sdk `decodeBase64` accepts.
fn decode_key(o: &Obj<'_>, name: &str, s: &str) -> Result<Vec<u8>> {
    const LENIENT: GeneralPurpose = GeneralPurpose::new(
        &alphabet::STANDARD,
        GeneralPurposeConfig::new()
            .with_decode_padding_mode(DecodePaddingMode::Indifferent)
            .with_decode_allow_trailing_bits(true),
    );
    let normalised: String = s
        .trim()
        .chars()
        .map(|c| match c {
            '-' => '+',
            '_' => '/',
            c => c,
        })
        .collect();
    let bytes = LENIENT
        .decode(normalised.as_bytes())
        .map_err(|e| o.invalid(name, format!("not base64 ({e})")))?;
    if !KEY_LEN_RANGE.contains(&bytes.len()) {
        return Err(o.invalid(
            name,
            format!(
                "{} bytes, expected {}..={}",
                bytes.len(),
                KEY_LEN_RANGE.start(),
                KEY_LEN_RANGE.end()
            ),
        ));
    }
    Ok(bytes)
}

fn parse_key_entry(o: &Obj<'_>) -> Result<EncryptionKey> {
    let key_str = o.str("key")?;
    if key_str.is_empty() {
        return Err(o.invalid("key", "empty"));
    }
    let index = o.opt_u64("index")?.ok_or_else(|| o.missing("index"))?;
    let index =
        u8::try_from(index).map_err(|_| o.invalid("index", format!("{index} is not 0..=255")))?;
    Ok(EncryptionKey {
        index,
        key: decode_key(o, "key", key_str)?,
    })
}

/// Parses a decrypted to-device `io.element.call.encryption_keys` (Part 2 B2). `sender` is the
/// to-device sender. The room is returned, not checked: [`KeyRouter::handle_keys`] checks it.
pub fn parse_to_device_keys(sender: &str, content: &Value) -> Result<EncryptionKeysEvent> {
    let o = Obj::root(TO_DEVICE_KEYS_LABEL, content)?;
    let room_id = o.str("room_id")?;
    let keys = o.obj("keys")?;
    let key = parse_key_entry(&keys)?;
    let member = o.obj("member")?;
    let device_id = member.str("claimed_device_id")?;
    if device_id.is_empty() {
        return Err(member.invalid("claimed_device_id", "empty"));
    }
    let member_id = member
        .opt_str("id")?
        .map_or_else(|| format!("{sender}:{device_id}"), str::to_owned);
    Ok(EncryptionKeysEvent {
        room_id: room_id.to_owned(),
        sender: sender.to_owned(),
        device_id: device_id.to_owned(),
        member_id,
        keys: vec![key],
        sent_ts: o.opt_u64("sent_ts")?,
        source: KeySource::ToDevice,
    })
}

/// Parses the old room-event variant (Part 2 B3): `{keys: [{index, key}], device_id, call_id: "",
/// sent_ts}` in timeline of `room_id`. Any bad entry refuses the whole event, as js-sdk did.
pub fn parse_room_keys(
    room_id: &str,
    sender: &str,
    origin_server_ts: u64,
    content: &Value,
) -> Result<EncryptionKeysEvent> {
    let o = Obj::root(ROOM_KEYS_LABEL, content)?;
    let device_id = o.str("device_id")?;
    if device_id.is_empty() {
        return Err(o.invalid("device_id", "empty"));
    }
    let call_id = o.str("call_id")?;
    if !call_id.is_empty() {
        return Err(o.invalid(
            "call_id",
            format!("`{call_id}` is not the room call (\"\")"),
        ));
    }
    let list = o.array("keys")?;
    if list.is_empty() {
        return Err(o.invalid("keys", "empty"));
    }
    let mut keys = Vec::with_capacity(list.len());
    for (i, v) in list.iter().enumerate() {
        keys.push(parse_key_entry(&o.element("keys", i, v)?)?);
    }
    Ok(EncryptionKeysEvent {
        room_id: room_id.to_owned(),
        sender: sender.to_owned(),
        device_id: device_id.to_owned(),
        member_id: format!("{sender}:{device_id}"),
        keys,
        sent_ts: Some(o.opt_u64("sent_ts")?.unwrap_or(origin_server_ts)),
        source: KeySource::RoomEvent,
    })
}

// ---------------------------------------------------------------------------------------------
// Identities and room names
// ---------------------------------------------------------------------------------------------

/// JSON text of an array of strings. `go` selects Go `encoding/json` escaping (also `<`, `>`,
/// `&`, U+2028, U+2029); otherwise it is JS `JSON.stringify`. Both use `\b \f \n \r \t` and
/// lowercase `\u00xx` for other controls (Go ≥ 1.22).
fn json_string_array(items: &[&str], go: bool) -> String {
    let mut out = String::from("[");
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push('"');
        for c in item.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
                '<' | '>' | '&' | '\u{2028}' | '\u{2029}' if go => {
                    out.push_str(&format!("\\u{:04x}", c as u32))
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
    out.push(']');
    out
}

fn unpadded_sha256_b64(text: &str) -> String {
    STANDARD_NO_PAD.encode(Sha256::digest(text.as_bytes()))
}

/// LiveKit identity of a legacy membership (and of `/sfu/get` tokens): `user:device`.
pub fn legacy_identity(user_id: &str, device_id: &str) -> String {
    format!("{user_id}:{device_id}")
}

/// LiveKit identity of a sticky membership (and of `/get_token` tokens): js-sdk
/// `computeRtcIdentityRaw`, unpadded std base64 of SHA-256 of `JSON.stringify([user, device, id])`.
pub fn rtc_identity(user_id: &str, device_id: &str, member_id: &str) -> String {
    unpadded_sha256_b64(&json_string_array(&[user_id, device_id, member_id], false))
}

/// LiveKit room name of a slot, as lk-jwt-service ≥ 0.4.1 computes it (Go `json.Marshal`, so
/// `<`, `>`, `&` are escaped): unpadded std base64 of SHA-256 of `[room_id, slot_id]`.
pub fn livekit_room_name(room_id: &str, slot_id: &str) -> String {
    unpadded_sha256_b64(&json_string_array(&[room_id, slot_id], true))
}

// ---------------------------------------------------------------------------------------------
// The session
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberKind {
    Legacy,
    Sticky,
}

/// A device in the call, as the recorder needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub user_id: String,
    pub device_id: String,
    /// Sticky: `member.id`. Legacy: `membershipID`, else `user:device`.
    pub member_id: String,
    /// The LiveKit participant identity its media carries (Part 2 B5).
    pub identity: String,
    /// The SFU it publishes to (Part 2 B6 "SFU per member"), if a LiveKit one.
    pub transport: Option<Transport>,
    pub created_ts: u64,
    pub expires_at_ms: u64,
    pub kind: MemberKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEvent {
    MemberJoined(Member),
    /// Same device and identity, something else changed (transport, expiry, created_ts).
    MemberUpdated(Member),
    /// Also emitted, followed by `MemberJoined`, when a device's identity changes.
    MemberLeft(Member),
    /// The first member (other than the bot's own device) appeared.
    SessionStarted,
    /// The last member (other than the bot's own device) is gone.
    SessionEnded,
}

#[derive(Debug, Clone)]
struct StoredLegacy {
    sender: String,
    origin_server_ts: u64,
    m: LegacyMembership,
}

#[derive(Debug, Clone)]
struct StoredSticky {
    origin_server_ts: u64,
    created_ts: u64,
    expires_at_ms: u64,
    m: RtcMembership,
}

/// A membership that counts, before transports are resolved.
struct Candidate {
    member: Member,
    /// Its own first transport (what an `oldest_membership` follower would use if it is oldest).
    own_transport: Option<Transport>,
    selection: Option<FocusSelection>,
    /// Newest wins between two sources of the same kind for one device.
    event_ts: u64,
}

/// The call in one room's slot `m.call#ROOM`, from membership events; see the module docs.
#[derive(Debug)]
pub struct RtcSession {
    room_id: String,
    own_device: Option<(String, String)>,
    now_ms: u64,
    joined: HashSet<String>,
    legacy: HashMap<String, StoredLegacy>,
    /// Newest origin_server_ts seen per legacy state key, leaves included: a sync can hand the
    /// room state from before its timeline to the handlers after the timeline's newer events,
    /// and that older membership must not come back.
    legacy_seen: HashMap<String, u64>,
    sticky: HashMap<(String, String), StoredSticky>,
    /// Newest origin_server_ts seen per (sender, sticky key), leaves included, so that an older
    /// event arriving late doesn't resurrect a membership.
    sticky_seen: HashMap<(String, String), u64>,
    current: BTreeMap<(String, String), Member>,
    own: Option<Member>,
    events: VecDeque<SessionEvent>,
}

impl RtcSession {
    pub fn new(room_id: impl Into<String>) -> Self {
        RtcSession {
            room_id: room_id.into(),
            own_device: None,
            now_ms: 0,
            joined: HashSet::new(),
            legacy: HashMap::new(),
            legacy_seen: HashMap::new(),
            sticky: HashMap::new(),
            sticky_seen: HashMap::new(),
            current: BTreeMap::new(),
            own: None,
            events: VecDeque::new(),
        }
    }

    pub fn room_id(&self) -> &str {
        &self.room_id
    }

    /// The bot's own device: never reported as a member, but see
    /// [`own_membership_present`](Self::own_membership_present).
    pub fn set_own_device(&mut self, user_id: &str, device_id: &str, now_ms: u64) {
        self.own_device = Some((user_id.to_owned(), device_id.to_owned()));
        self.recompute(now_ms);
    }

    /// Room membership of a user (`m.room.member` join or not). Users never reported are not
    /// joined, and their call memberships don't count — the bot's own user included.
    pub fn set_joined(&mut self, user_id: &str, joined: bool, now_ms: u64) {
        let changed = if joined {
            self.joined.insert(user_id.to_owned())
        } else {
            self.joined.remove(user_id)
        };
        if changed {
            self.recompute(now_ms);
        } else {
            self.advance(now_ms);
        }
    }

    /// Parses and applies a legacy state event. If it doesn't parse, the state key no longer
    /// holds a membership (the room state was replaced by what didn't parse), and the error says
    /// why.
    pub fn handle_legacy_state_event(
        &mut self,
        state_key: &str,
        sender: &str,
        origin_server_ts: u64,
        content: &Value,
        now_ms: u64,
    ) -> Result<()> {
        match self.legacy_seen.get(state_key) {
            Some(&seen) if origin_server_ts < seen => {
                tracing::debug!(room = %self.room_id, state_key, "older call member state than one already applied; ignored");
                self.advance(now_ms);
                return Ok(());
            }
            _ => {
                self.legacy_seen.insert(state_key.to_owned(), origin_server_ts);
            }
        }
        match parse_legacy_member(state_key, sender, origin_server_ts, content) {
            Ok(ev) => {
                self.apply_legacy(ev, now_ms);
                Ok(())
            }
            Err(e) => {
                tracing::debug!(room = %self.room_id, state_key, sender, error = %e, "call member state refused");
                if self.legacy.remove(state_key).is_some() {
                    self.recompute(now_ms);
                } else {
                    self.advance(now_ms);
                }
                Err(e)
            }
        }
    }

    pub fn apply_legacy(&mut self, ev: LegacyMemberEvent, now_ms: u64) {
        match ev.content {
            LegacyContent::Leave => {
                self.legacy.remove(&ev.state_key);
            }
            LegacyContent::Member(m) => {
                self.legacy.insert(
                    ev.state_key,
                    StoredLegacy {
                        sender: ev.sender,
                        origin_server_ts: ev.origin_server_ts,
                        m,
                    },
                );
            }
        }
        self.recompute(now_ms);
    }

    /// Parses and applies a sticky event. A refused event still replaces an earlier one with the
    /// same sender and sticky key, when the key could be read.
    pub fn handle_sticky_event(
        &mut self,
        sender: &str,
        origin_server_ts: u64,
        content: &Value,
        sticky_duration_ms: Option<u64>,
        now_ms: u64,
    ) -> Result<()> {
        match parse_sticky_member(sender, origin_server_ts, content, sticky_duration_ms) {
            Ok(ev) => {
                self.apply_sticky(ev, now_ms);
                Ok(())
            }
            Err(e) => {
                tracing::debug!(room = %self.room_id, sender, error = %e, "rtc member sticky event refused");
                let key = content
                    .get("sticky_key")
                    .or_else(|| content.get("msc4354_sticky_key"))
                    .and_then(Value::as_str);
                match key {
                    Some(k) => self.apply_sticky(
                        StickyMemberEvent {
                            sender: sender.to_owned(),
                            origin_server_ts,
                            sticky_key: k.to_owned(),
                            sticky_duration_ms: 0,
                            content: StickyContent::Leave { slot_id: None },
                        },
                        now_ms,
                    ),
                    None => self.advance(now_ms),
                }
                Err(e)
            }
        }
    }

    pub fn apply_sticky(&mut self, ev: StickyMemberEvent, now_ms: u64) {
        let now = now_ms.max(self.now_ms);
        let key = (ev.sender.clone(), ev.sticky_key.clone());
        if self
            .sticky_seen
            .get(&key)
            .is_some_and(|&seen| seen > ev.origin_server_ts)
        {
            tracing::debug!(room = %self.room_id, sender = %ev.sender, "older sticky membership ignored");
            self.advance(now_ms);
            return;
        }
        self.sticky_seen.insert(key.clone(), ev.origin_server_ts);
        match ev.content {
            StickyContent::Leave { .. } => {
                self.sticky.remove(&key);
            }
            StickyContent::Member(m) => {
                // A timestamp in the future can't extend stickiness past receipt + duration.
                let start = ev.origin_server_ts.min(now);
                let expires_at_ms = start.saturating_add(ev.sticky_duration_ms);
                // A refresh of the same member keeps its place in the order.
                let created_ts = match self.sticky.get(&key) {
                    Some(prev)
                        if prev.m.member_id == m.member_id && prev.m.device_id == m.device_id =>
                    {
                        prev.created_ts.min(ev.origin_server_ts)
                    }
                    _ => ev.origin_server_ts,
                };
                self.sticky.insert(
                    key,
                    StoredSticky {
                        origin_server_ts: ev.origin_server_ts,
                        created_ts,
                        expires_at_ms,
                        m,
                    },
                );
            }
        }
        self.recompute(now_ms);
    }

    /// Applies expiry at `now_ms`. Call it at [`next_expiry`](Self::next_expiry) at the latest.
    pub fn tick(&mut self, now_ms: u64) {
        self.recompute(now_ms);
        let now = self.now_ms;
        self.legacy.retain(|_, l| l.m.expires_at_ms > now);
        self.sticky.retain(|_, s| s.expires_at_ms > now);
        // Anything older than the longest stickiness is expired on arrival anyway.
        self.sticky_seen
            .retain(|_, ts| ts.saturating_add(MAX_STICKY_DURATION_MS) > now);
    }

    pub fn poll_event(&mut self) -> Option<SessionEvent> {
        self.events.pop_front()
    }

    /// Members other than the bot's own device, by `created_ts` (then user, device).
    pub fn members(&self) -> Vec<&Member> {
        let mut v: Vec<&Member> = self.current.values().collect();
        v.sort_by(|a, b| {
            (a.created_ts, &a.user_id, &a.device_id).cmp(&(b.created_ts, &b.user_id, &b.device_id))
        });
        v
    }

    pub fn member(&self, user_id: &str, device_id: &str) -> Option<&Member> {
        self.current
            .get(&(user_id.to_owned(), device_id.to_owned()))
    }

    pub fn is_active(&self) -> bool {
        !self.current.is_empty()
    }

    /// The SFUs to join, distinct by service URL, in member order (the oldest member's entry
    /// wins when two differ only by alias: the LiveKit room name no longer depends on it).
    pub fn transports_in_use(&self) -> Vec<Transport> {
        let mut seen = HashSet::new();
        self.members()
            .into_iter()
            .filter_map(|m| m.transport.clone())
            .filter(|t| seen.insert(t.livekit_service_url.clone()))
            .collect()
    }

    /// The earliest future moment a stored membership expires, own included.
    pub fn next_expiry(&self) -> Option<u64> {
        let now = self.now_ms;
        let legacy = self.legacy.values().map(|l| l.m.expires_at_ms);
        let sticky = self.sticky.values().map(|s| s.expires_at_ms);
        legacy.chain(sticky).filter(|&t| t > now).min()
    }

    /// Whether the bot's own device has a membership that others count (valid, unexpired, its
    /// user joined): if not, keys won't be sent to it.
    pub fn own_membership_present(&self) -> bool {
        self.own.is_some()
    }

    pub fn own_membership(&self) -> Option<&Member> {
        self.own.as_ref()
    }

    fn advance(&mut self, now_ms: u64) {
        self.now_ms = self.now_ms.max(now_ms);
    }

    fn candidates(&self) -> HashMap<(String, String), Candidate> {
        let now = self.now_ms;
        let mut out: HashMap<(String, String), Candidate> = HashMap::new();
        for s in self.sticky.values() {
            let m = &s.m;
            if m.slot_id != CALL_SLOT_ID
                || s.expires_at_ms <= now
                || !self.joined.contains(&m.user_id)
            {
                continue;
            }
            let key = (m.user_id.clone(), m.device_id.clone());
            if out
                .get(&key)
                .is_some_and(|c| c.event_ts > s.origin_server_ts)
            {
                continue;
            }
            let own_transport = first_livekit(&m.transports);
            out.insert(
                key,
                Candidate {
                    member: Member {
                        user_id: m.user_id.clone(),
                        device_id: m.device_id.clone(),
                        member_id: m.member_id.clone(),
                        identity: rtc_identity(&m.user_id, &m.device_id, &m.member_id),
                        transport: own_transport.clone(),
                        created_ts: s.created_ts,
                        expires_at_ms: s.expires_at_ms,
                        kind: MemberKind::Sticky,
                    },
                    own_transport,
                    selection: None,
                    event_ts: s.origin_server_ts,
                },
            );
        }
        for l in self.legacy.values() {
            let m = &l.m;
            let room_scope = m.scope.as_deref().is_none_or(|s| s == "m.room");
            if m.slot_id != CALL_SLOT_ID
                || !room_scope
                || m.expires_at_ms <= now
                || !self.joined.contains(&l.sender)
            {
                continue;
            }
            let key = (l.sender.clone(), m.device_id.clone());
            match out.get(&key) {
                Some(c) if c.member.kind == MemberKind::Sticky => continue,
                Some(c) if c.event_ts > l.origin_server_ts => continue,
                _ => {}
            }
            let own_transport = first_livekit(&m.foci_preferred);
            out.insert(
                key,
                Candidate {
                    member: Member {
                        user_id: l.sender.clone(),
                        device_id: m.device_id.clone(),
                        member_id: m
                            .membership_id
                            .clone()
                            .unwrap_or_else(|| legacy_identity(&l.sender, &m.device_id)),
                        identity: legacy_identity(&l.sender, &m.device_id),
                        transport: None,
                        created_ts: m.created_ts,
                        expires_at_ms: m.expires_at_ms,
                        kind: MemberKind::Legacy,
                    },
                    own_transport,
                    selection: Some(m.focus_selection.clone()),
                    event_ts: l.origin_server_ts,
                },
            );
        }
        out
    }

    fn recompute(&mut self, now_ms: u64) {
        self.advance(now_ms);
        let mut candidates = self.candidates();
        // js-sdk picks the oldest among all memberships, its own included.
        let oldest_transport = candidates
            .values()
            .min_by(|a, b| {
                let ka = (a.member.created_ts, &a.member.user_id, &a.member.device_id);
                ka.cmp(&(b.member.created_ts, &b.member.user_id, &b.member.device_id))
            })
            .and_then(|c| c.own_transport.clone());
        for c in candidates.values_mut() {
            c.member.transport = match &c.selection {
                None | Some(FocusSelection::MultiSfu) => c.own_transport.clone(),
                Some(FocusSelection::OldestMembership) => oldest_transport.clone(),
                Some(FocusSelection::Other(_)) => None,
            };
        }
        self.own = self
            .own_device
            .as_ref()
            .and_then(|k| candidates.remove(k))
            .map(|c| c.member);
        let next: BTreeMap<(String, String), Member> =
            candidates.into_iter().map(|(k, c)| (k, c.member)).collect();

        let was_active = !self.current.is_empty();
        let is_active = !next.is_empty();
        if !was_active && is_active {
            self.events.push_back(SessionEvent::SessionStarted);
        }
        let mut joined = Vec::new();
        let mut updated = Vec::new();
        for (key, old) in &self.current {
            match next.get(key) {
                None => self.events.push_back(SessionEvent::MemberLeft(old.clone())),
                Some(new) if new.identity != old.identity => {
                    self.events.push_back(SessionEvent::MemberLeft(old.clone()));
                    joined.push(new.clone());
                }
                Some(new) if new != old => updated.push(new.clone()),
                Some(_) => {}
            }
        }
        for (key, new) in &next {
            if !self.current.contains_key(key) {
                joined.push(new.clone());
            }
        }
        joined.sort_by_key(|m| m.created_ts);
        for m in &joined {
            tracing::debug!(room = %self.room_id, user = %m.user_id, device = %m.device_id, identity = %m.identity, "call member joined");
        }
        self.events
            .extend(joined.into_iter().map(SessionEvent::MemberJoined));
        self.events
            .extend(updated.into_iter().map(SessionEvent::MemberUpdated));
        if was_active && !is_active {
            self.events.push_back(SessionEvent::SessionEnded);
        }
        self.current = next;
    }
}

// ---------------------------------------------------------------------------------------------
// Key routing
// ---------------------------------------------------------------------------------------------

/// A key for the frame decryptor: install `key` at `index` for participant `identity`.
/// `Debug` never shows the key.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyUpdate {
    pub identity: String,
    pub index: u8,
    pub key: Vec<u8>,
}

impl fmt::Debug for KeyUpdate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyUpdate")
            .field("identity", &self.identity)
            .field("index", &self.index)
            .field("key", &format_args!("<{} bytes redacted>", self.key.len()))
            .finish()
    }
}

/// What became of the keys of one event.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeyIntake {
    /// Routed to a known identity now.
    pub routed: usize,
    /// Waiting for the device's membership.
    pub held: usize,
    /// Older (`sent_ts`) than a key already seen for the same device and index.
    pub outdated: usize,
    /// From the bot's own device.
    pub own: usize,
}

#[derive(Debug, Clone)]
struct HeldKey {
    seq: u64,
    key: EncryptionKey,
}

type DeviceKey = (String, String);

/// Maps media keys to LiveKit identities; see the module docs. Feed it every [`SessionEvent`]
/// (or [`sync_members`](Self::sync_members)) and every parsed key event.
#[derive(Debug)]
pub struct KeyRouter {
    room_id: String,
    own_device: Option<DeviceKey>,
    /// Last identity of each device seen in the call, kept after it leaves.
    identities: HashMap<DeviceKey, String>,
    /// The newest key per index of each device, in receipt order. For devices not (yet) in the
    /// call these are the held keys; for the others they are replayed when the device's identity
    /// changes (legacy → sticky, or a rejoin with a new member id), since the sender keeps
    /// encrypting with its current key whatever identity its membership gives it.
    keys: HashMap<DeviceKey, VecDeque<HeldKey>>,
    latest_sent: HashMap<(String, String, u8), u64>,
    /// Digest of the key last emitted per (identity, index), to skip re-sends.
    installed: HashMap<(String, u8), [u8; 32]>,
    seq: u64,
    out: VecDeque<KeyUpdate>,
}

impl KeyRouter {
    pub fn new(room_id: impl Into<String>) -> Self {
        KeyRouter {
            room_id: room_id.into(),
            own_device: None,
            identities: HashMap::new(),
            keys: HashMap::new(),
            latest_sent: HashMap::new(),
            installed: HashMap::new(),
            seq: 0,
            out: VecDeque::new(),
        }
    }

    /// Keys claimed by this device are ignored (the bot sends none; nobody should claim it).
    pub fn set_own_device(&mut self, user_id: &str, device_id: &str) {
        self.own_device = Some((user_id.to_owned(), device_id.to_owned()));
    }

    pub fn handle_session_event(&mut self, ev: &SessionEvent) {
        match ev {
            SessionEvent::MemberJoined(m) | SessionEvent::MemberUpdated(m) => {
                self.member_present(m)
            }
            // The identity stays: keys that come after the leave still go to it.
            SessionEvent::MemberLeft(_)
            | SessionEvent::SessionStarted
            | SessionEvent::SessionEnded => {}
        }
    }

    /// Learns the session's current members (for a router created mid-call).
    pub fn sync_members(&mut self, session: &RtcSession) {
        for m in session.members() {
            self.member_present(m);
        }
    }

    /// Routes the keys of one event. `now_ms` stands in for a missing `sent_ts`.
    pub fn handle_keys(&mut self, ev: EncryptionKeysEvent, now_ms: u64) -> Result<KeyIntake> {
        if ev.room_id != self.room_id {
            return Err(RtcParseError::RoomMismatch {
                expected: self.room_id.clone(),
                got: ev.room_id,
            });
        }
        let mut intake = KeyIntake::default();
        let device: DeviceKey = (ev.sender, ev.device_id);
        if self.own_device.as_ref() == Some(&device) {
            intake.own = ev.keys.len();
            return Ok(intake);
        }
        let sent = ev.sent_ts.unwrap_or(now_ms);
        for key in ev.keys {
            let filter_key = (device.0.clone(), device.1.clone(), key.index);
            if self
                .latest_sent
                .get(&filter_key)
                .is_some_and(|&latest| latest > sent)
            {
                tracing::debug!(room = %self.room_id, user = %device.0, device = %device.1, index = key.index, "outdated media key dropped");
                intake.outdated += 1;
                continue;
            }
            self.latest_sent.insert(filter_key, sent);
            self.keep(&device, key.clone());
            match self.identities.get(&device).cloned() {
                Some(identity) => {
                    self.emit(identity, key);
                    intake.routed += 1;
                }
                None => {
                    tracing::debug!(room = %self.room_id, user = %device.0, device = %device.1, index = key.index, "media key held until membership");
                    intake.held += 1;
                }
            }
        }
        Ok(intake)
    }

    pub fn poll_update(&mut self) -> Option<KeyUpdate> {
        self.out.pop_front()
    }

    /// Keys held for devices never seen in the call.
    pub fn held_count(&self) -> usize {
        self.keys
            .iter()
            .filter(|(device, _)| !self.identities.contains_key(*device))
            .map(|(_, q)| q.len())
            .sum()
    }

    fn member_present(&mut self, m: &Member) {
        let device = (m.user_id.clone(), m.device_id.clone());
        self.identities.insert(device.clone(), m.identity.clone());
        // Already-installed keys are skipped by `emit`, so only held keys and keys new to this
        // identity come out.
        let kept: Vec<EncryptionKey> = self
            .keys
            .get(&device)
            .into_iter()
            .flatten()
            .map(|h| h.key.clone())
            .collect();
        for key in kept {
            self.emit(m.identity.clone(), key);
        }
    }

    fn keep(&mut self, device: &DeviceKey, key: EncryptionKey) {
        self.seq += 1;
        let queue = self.keys.entry(device.clone()).or_default();
        // A newer key for the same index supersedes the kept one.
        queue.retain(|h| h.key.index != key.index);
        queue.push_back(HeldKey { seq: self.seq, key });
        while queue.len() > MAX_KEPT_KEYS_PER_DEVICE {
            queue.pop_front();
        }
        let unknown = self
            .keys
            .keys()
            .filter(|d| !self.identities.contains_key(*d))
            .count();
        if unknown > MAX_UNKNOWN_DEVICES {
            let victim = self
                .keys
                .iter()
                .filter(|(d, _)| *d != device && !self.identities.contains_key(*d))
                .min_by_key(|(_, q)| q.front().map_or(0, |h| h.seq))
                .map(|(d, _)| d.clone());
            if let Some(victim) = victim {
                tracing::warn!(room = %self.room_id, user = %victim.0, device = %victim.1, "held media keys dropped: too many devices without membership");
                self.keys.remove(&victim);
                // Its newest `sent_ts` per index goes too, or claiming ever new device ids
                // (to-device senders pick them freely) would grow that map without bound.
                self.latest_sent.retain(|(user, device, _), _| (user, device) != (&victim.0, &victim.1));
            }
        }
    }

    fn emit(&mut self, identity: String, key: EncryptionKey) {
        let digest: [u8; 32] = Sha256::digest(&key.key).into();
        let slot = (identity.clone(), key.index);
        if self.installed.get(&slot) == Some(&digest) {
            return;
        }
        self.installed.insert(slot, digest);
        self.out.push_back(KeyUpdate {
            identity,
            index: key.index,
            key: key.key,
        });
    }
}

// ---------------------------------------------------------------------------------------------
// The bot's own membership
// ---------------------------------------------------------------------------------------------

/// Legacy state key for a device's room-call membership. `room_version` matters only for
/// MSC3757/MSC3779 rooms, whose keys have no leading `_`.
pub fn legacy_state_key(user_id: &str, device_id: &str, room_version: Option<&str>) -> String {
    let key = format!("{user_id}_{device_id}_m.call");
    let owned_keys = room_version.is_some_and(|v| {
        v.starts_with("org.matrix.msc3757") || v.starts_with("org.matrix.msc3779")
    });
    if owned_keys {
        key
    } else {
        format!("_{key}")
    }
}

/// The bot's legacy membership as Element Call writes it in `compatibility` mode (multi-SFU,
/// transport with `livekit_alias` = room id, intent `video`). `created_ts` is `None` on the first
/// send and the first event's timestamp afterwards; `expires_ms` grows by 4 h per refresh as
/// js-sdk does. Returns (state key, content) for a room without MSC3757 state keys.
pub fn own_legacy_membership(
    user_id: &str,
    device_id: &str,
    service_url: &str,
    room_id: &str,
    created_ts: Option<u64>,
    expires_ms: u64,
) -> (String, Value) {
    let mut content = json!({
        "application": "m.call",
        "call_id": "",
        "scope": "m.room",
        "device_id": device_id,
        "membershipID": legacy_identity(user_id, device_id),
        "expires": expires_ms,
        "m.call.intent": "video",
        "focus_active": { "type": "livekit", "focus_selection": "multi_sfu" },
        "foci_preferred": [{
            "type": "livekit",
            "livekit_service_url": service_url,
            "livekit_alias": room_id,
        }],
    });
    if let (Some(ts), Some(map)) = (created_ts, content.as_object_mut()) {
        map.insert("created_ts".to_owned(), json!(ts));
    }
    (legacy_state_key(user_id, device_id, None), content)
}

/// The leave for [`own_legacy_membership`]: the same state key with `{}`.
pub fn own_legacy_leave(user_id: &str, device_id: &str) -> (String, Value) {
    (legacy_state_key(user_id, device_id, None), json!({}))
}

/// A sticky membership to send as `org.matrix.msc4143.rtc.member` with
/// `?org.matrix.msc4354.sticky_duration_ms=<sticky_duration_ms>`, re-sent before it runs out.
#[derive(Debug, Clone, PartialEq)]
pub struct OwnStickyMembership {
    pub content: Value,
    pub sticky_key: String,
    pub sticky_duration_ms: u64,
}

/// The bot's sticky membership for `matrix_2_0` rooms. It carries both transport shapes:
/// `transports {published, can_subscribe}` which js-sdk 43 requires, and `rtc_transports` which
/// earlier versions read. `member_id` (a fresh UUID per join, as Element Call does) is also the
/// sticky key and part of the bot's hashed LiveKit identity.
pub fn own_sticky_membership(
    user_id: &str,
    device_id: &str,
    member_id: &str,
    service_url: &str,
) -> OwnStickyMembership {
    let transport = json!({ "type": "livekit", "livekit_service_url": service_url });
    OwnStickyMembership {
        content: json!({
            "application": { "type": "m.call", "m.call.intent": "video" },
            "slot_id": CALL_SLOT_ID,
            "transports": { "published": [transport.clone()], "can_subscribe": ["livekit"] },
            "rtc_transports": [transport],
            "member": { "user_id": user_id, "device_id": device_id, "id": member_id },
            "versions": [],
            "msc4354_sticky_key": member_id,
        }),
        sticky_key: member_id.to_owned(),
        sticky_duration_ms: DEFAULT_STICKY_DURATION_MS,
    }
}

/// The sticky leave, in the shape js-sdk 43's delayed leave lands as.
pub fn own_sticky_leave(sticky_key: &str) -> Value {
    json!({ "msc4354_sticky_key": sticky_key, "slot_id": CALL_SLOT_ID })
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    const ROOM: &str = "!room:example.org";
    const ALICE: &str = "@alice:example.org";
    const BOB: &str = "@bob:example.org";
    const BOT: &str = "@bot:example.org";
    const URL: &str = "https://rtc.example.org/livekit/jwt";
    const T0: u64 = 1_760_000_000_000;
    const HOUR: u64 = 3_600_000;

    fn legacy_doc_example() -> Value {
        json!({ "application": "m.call", "call_id": "", "scope": "m.room", "device_id": "DEVICEID",
          "membershipID": "@alice:example.org:DEVICEID", "expires": 14400000, "m.call.intent": "video",
          "focus_active": { "type": "livekit", "focus_selection": "multi_sfu" },
          "foci_preferred": [ { "type": "livekit", "livekit_service_url": URL, "livekit_alias": ROOM } ],
          "created_ts": 1760000000000u64 })
    }

    fn legacy(device: &str, url: &str, selection: &str, created: u64) -> Value {
        json!({ "application": "m.call", "call_id": "", "scope": "m.room", "device_id": device,
          "expires": 4 * HOUR,
          "focus_active": { "type": "livekit", "focus_selection": selection },
          "foci_preferred": [ { "type": "livekit", "livekit_service_url": url, "livekit_alias": ROOM } ],
          "created_ts": created })
    }

    fn sticky_doc_example() -> Value {
        json!({ "application": { "type": "m.call", "m.call.intent": "video" }, "slot_id": "m.call#ROOM",
          "rtc_transports": [ { "type": "livekit", "livekit_service_url": URL } ],
          "member": { "user_id": ALICE, "device_id": "DEVICEID", "id": "uuid-1" },
          "versions": [], "msc4354_sticky_key": "uuid-1" })
    }

    fn sticky_js43(user: &str, device: &str, id: &str, url: &str) -> Value {
        json!({ "application": { "type": "m.call" }, "slot_id": "m.call#ROOM",
          "transports": { "published": [ { "type": "livekit", "livekit_service_url": url } ], "can_subscribe": ["livekit"] },
          "member": { "user_id": user, "device_id": device, "id": id },
          "versions": [], "msc4354_sticky_key": id })
    }

    fn sk(user: &str, device: &str) -> String {
        format!("_{user}_{device}_m.call")
    }

    fn drain(s: &mut RtcSession) -> Vec<SessionEvent> {
        std::iter::from_fn(|| s.poll_event()).collect()
    }

    fn session() -> RtcSession {
        let mut s = RtcSession::new(ROOM);
        for u in [ALICE, BOB, BOT] {
            s.set_joined(u, true, T0);
        }
        s
    }

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    fn to_device_key(device: &str, index: u8, key: &[u8], sent: u64) -> Value {
        json!({ "keys": { "index": index, "key": b64(key) }, "room_id": ROOM,
          "member": { "claimed_device_id": device, "id": "uuid-1" },
          "session": { "call_id": "", "application": "m.call", "scope": "m.room" }, "sent_ts": sent })
    }

    fn updates(r: &mut KeyRouter) -> Vec<KeyUpdate> {
        std::iter::from_fn(|| r.poll_update()).collect()
    }

    // --- parsing ---

    #[test]
    fn parses_legacy_doc_example() {
        let ev = parse_legacy_member(&sk(ALICE, "DEVICEID"), ALICE, T0 + 5, &legacy_doc_example())
            .unwrap();
        let LegacyContent::Member(m) = ev.content else {
            panic!("not a member")
        };
        assert_eq!(m.slot_id, CALL_SLOT_ID);
        assert_eq!(m.device_id, "DEVICEID");
        assert_eq!(m.created_ts, T0);
        assert_eq!(m.expires_at_ms, T0 + 4 * HOUR);
        assert_eq!(m.focus_selection, FocusSelection::MultiSfu);
        assert_eq!(
            m.foci_preferred,
            vec![TransportEntry::Livekit(Transport {
                livekit_service_url: URL.into(),
                livekit_alias: Some(ROOM.into())
            })]
        );
        assert_eq!(
            m.membership_id.as_deref(),
            Some("@alice:example.org:DEVICEID")
        );
    }

    #[test]
    fn legacy_defaults_and_state_key_forms() {
        let mut c = legacy_doc_example();
        let map = c.as_object_mut().unwrap();
        map.remove("created_ts");
        map.remove("expires");
        for key in [
            "_@alice:example.org_DEVICEID_m.call",
            "@alice:example.org_DEVICEID_m.call",
            "_@alice:example.org_DEVICEID",
            "@alice:example.org_DEVICEID",
        ] {
            let ev = parse_legacy_member(key, ALICE, T0, &c).unwrap();
            let LegacyContent::Member(m) = ev.content else {
                panic!()
            };
            assert_eq!(
                m.created_ts, T0,
                "created_ts falls back to origin_server_ts"
            );
            assert_eq!(m.expires_at_ms, T0 + DEFAULT_LEGACY_EXPIRES_MS);
        }
        let err = parse_legacy_member("_@mallory:example.org_DEVICEID_m.call", ALICE, T0, &c)
            .unwrap_err();
        assert!(
            matches!(err, RtcParseError::StateKeyMismatch { .. }),
            "{err}"
        );
        let err =
            parse_legacy_member("_@alice:example.org_OTHER_m.call", ALICE, T0, &c).unwrap_err();
        assert!(
            matches!(err, RtcParseError::StateKeyMismatch { .. }),
            "{err}"
        );
    }

    #[test]
    fn error_messages_read_well() {
        let err = parse_legacy_member(&sk(BOB, "D"), ALICE, T0, &json!({})).unwrap_err();
        assert_eq!(
            err.to_string(),
            "org.matrix.msc3401.call.member state event: state key `_@bob:example.org_D_m.call` is \
             not `[_]@alice:example.org_<any>[_<application><call_id>]` for sender \
             @alice:example.org and device `<any>`; event ignored"
        );
    }

    #[test]
    fn legacy_leaves() {
        for content in [json!({}), json!({"leave_reason": "m.delayed"})] {
            let ev = parse_legacy_member(&sk(ALICE, "D"), ALICE, T0, &content).unwrap();
            assert_eq!(ev.content, LegacyContent::Leave);
        }
        let err = parse_legacy_member(&sk(BOB, "D"), ALICE, T0, &json!({})).unwrap_err();
        assert!(matches!(err, RtcParseError::StateKeyMismatch { .. }));
    }

    #[test]
    fn legacy_errors_name_the_field() {
        let mut c = legacy_doc_example();
        c["device_id"] = json!(5);
        let err = parse_legacy_member(&sk(ALICE, "DEVICEID"), ALICE, T0, &c).unwrap_err();
        assert_eq!(
            err,
            RtcParseError::WrongType {
                event: LEGACY_LABEL,
                field: "device_id".into(),
                expected: "a string"
            }
        );
        let mut c = legacy_doc_example();
        c.as_object_mut().unwrap().remove("focus_active");
        let err = parse_legacy_member(&sk(ALICE, "DEVICEID"), ALICE, T0, &c).unwrap_err();
        assert_eq!(
            err,
            RtcParseError::Missing {
                event: LEGACY_LABEL,
                field: "focus_active".into()
            }
        );
        let mut c = legacy_doc_example();
        c["foci_preferred"][0]["type"] = json!(null);
        let err = parse_legacy_member(&sk(ALICE, "DEVICEID"), ALICE, T0, &c).unwrap_err();
        assert!(err.to_string().contains("foci_preferred[0].type"), "{err}");
        let err = parse_legacy_member(ALICE, ALICE, T0, &json!({"memberships": []})).unwrap_err();
        assert!(matches!(err, RtcParseError::UnsupportedLegacyFormat { .. }));
    }

    #[test]
    fn parses_both_sticky_shapes() {
        let ev = parse_sticky_member(ALICE, T0, &sticky_doc_example(), None).unwrap();
        assert_eq!(ev.sticky_key, "uuid-1");
        assert_eq!(ev.sticky_duration_ms, DEFAULT_STICKY_DURATION_MS);
        let StickyContent::Member(m) = ev.content else {
            panic!()
        };
        assert_eq!(
            (
                m.user_id.as_str(),
                m.device_id.as_str(),
                m.member_id.as_str()
            ),
            (ALICE, "DEVICEID", "uuid-1")
        );
        assert_eq!(m.call_intent.as_deref(), Some("video"));
        assert_eq!(
            first_livekit(&m.transports).unwrap().livekit_service_url,
            URL
        );

        let mut c = sticky_js43(ALICE, "DEVICEID", "uuid-2", URL);
        c.as_object_mut().unwrap().remove("msc4354_sticky_key");
        c["sticky_key"] = json!("uuid-2");
        let ev = parse_sticky_member(ALICE, T0, &c, Some(10 * HOUR)).unwrap();
        assert_eq!(ev.sticky_key, "uuid-2");
        assert_eq!(ev.sticky_duration_ms, MAX_STICKY_DURATION_MS, "clamped");
        let StickyContent::Member(m) = ev.content else {
            panic!()
        };
        assert_eq!(
            first_livekit(&m.transports).unwrap().livekit_service_url,
            URL
        );
    }

    #[test]
    fn sticky_leaves_and_errors() {
        let ev = parse_sticky_member(
            ALICE,
            T0,
            &json!({"msc4354_sticky_key": "k", "slot_id": "m.call#ROOM"}),
            None,
        )
        .unwrap();
        assert_eq!(
            ev.content,
            StickyContent::Leave {
                slot_id: Some(CALL_SLOT_ID.into())
            }
        );
        let ev = parse_sticky_member(ALICE, T0, &json!({"sticky_key": "k"}), None).unwrap();
        assert_eq!(ev.content, StickyContent::Leave { slot_id: None });

        let err = parse_sticky_member(BOB, T0, &sticky_doc_example(), None).unwrap_err();
        assert!(matches!(err, RtcParseError::SenderMismatch { .. }), "{err}");
        let mut c = sticky_doc_example();
        c.as_object_mut().unwrap().remove("msc4354_sticky_key");
        let err = parse_sticky_member(ALICE, T0, &c, None).unwrap_err();
        assert_eq!(
            err,
            RtcParseError::Missing {
                event: STICKY_LABEL,
                field: "sticky_key or msc4354_sticky_key".into()
            }
        );
        let mut c = sticky_doc_example();
        c.as_object_mut().unwrap().remove("rtc_transports");
        let err = parse_sticky_member(ALICE, T0, &c, None).unwrap_err();
        assert!(
            err.to_string()
                .contains("transports.published or rtc_transports"),
            "{err}"
        );
        let mut c = sticky_js43(ALICE, "D", "u", URL);
        c["transports"]["published"] = json!("x");
        let err = parse_sticky_member(ALICE, T0, &c, None).unwrap_err();
        assert_eq!(
            err,
            RtcParseError::WrongType {
                event: STICKY_LABEL,
                field: "transports.published".into(),
                expected: "an array"
            }
        );
        let mut c = sticky_doc_example();
        c["slot_id"] = json!("m.other#ROOM");
        let err = parse_sticky_member(ALICE, T0, &c, None).unwrap_err();
        assert!(err.to_string().contains("slot_id"), "{err}");
    }

    #[test]
    fn parses_key_events() {
        let key16: Vec<u8> = (0u8..16).collect();
        let ev = parse_to_device_keys(ALICE, &to_device_key("DEV", 2, &key16, T0)).unwrap();
        assert_eq!(
            (
                ev.room_id.as_str(),
                ev.device_id.as_str(),
                ev.member_id.as_str()
            ),
            (ROOM, "DEV", "uuid-1")
        );
        assert_eq!(
            ev.keys,
            vec![EncryptionKey {
                index: 2,
                key: key16.clone()
            }]
        );
        assert_eq!(ev.sent_ts, Some(T0));

        // url alphabet, unpadded; member.id defaults to sender:device
        let odd = [0xfbu8, 0xff, 0xfe, 1, 2];
        let url = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(odd);
        let c = json!({"keys": {"index": 0, "key": url}, "room_id": ROOM, "member": {"claimed_device_id": "DEV"}});
        let ev = parse_to_device_keys(ALICE, &c).unwrap();
        assert_eq!(ev.keys[0].key, odd);
        assert_eq!(ev.member_id, "@alice:example.org:DEV");
        assert!(
            !format!("{ev:?}").contains("251"),
            "Debug must not show key bytes"
        );

        let room = json!({"keys": [{"index": 0, "key": STANDARD_NO_PAD.encode(&key16)}, {"index": 1, "key": b64(&key16)}],
            "device_id": "DEV", "call_id": "", "sent_ts": T0});
        let ev = parse_room_keys(ROOM, ALICE, T0 + 9, &room).unwrap();
        assert_eq!(ev.keys.len(), 2);
        assert_eq!(ev.member_id, "@alice:example.org:DEV");
        assert_eq!(ev.source, KeySource::RoomEvent);

        let mut bad = room.clone();
        bad["call_id"] = json!("other");
        assert!(parse_room_keys(ROOM, ALICE, T0, &bad)
            .unwrap_err()
            .to_string()
            .contains("call_id"));
        let mut bad = room.clone();
        bad["keys"][1]["index"] = json!(256);
        assert!(parse_room_keys(ROOM, ALICE, T0, &bad)
            .unwrap_err()
            .to_string()
            .contains("keys[1].index"));
        let bad = json!({"keys": {"index": 0, "key": "!!!"}, "room_id": ROOM, "member": {"claimed_device_id": "D"}});
        assert!(matches!(
            parse_to_device_keys(ALICE, &bad),
            Err(RtcParseError::Invalid { .. })
        ));
        let bad = json!({"keys": {"index": 0, "key": b64(&[0u8; 65])}, "room_id": ROOM, "member": {"claimed_device_id": "D"}});
        assert!(parse_to_device_keys(ALICE, &bad)
            .unwrap_err()
            .to_string()
            .contains("65 bytes"));
        let bad = json!({"keys": {"index": "0", "key": b64(&key16)}, "room_id": ROOM, "member": {"claimed_device_id": "D"}});
        assert_eq!(
            parse_to_device_keys(ALICE, &bad).unwrap_err(),
            RtcParseError::WrongType {
                event: TO_DEVICE_KEYS_LABEL,
                field: "keys.index".into(),
                expected: "a non-negative integer"
            }
        );
        let bad = json!({"keys": {"index": 0, "key": b64(&key16)}, "room_id": ROOM, "member": {}});
        assert_eq!(
            parse_to_device_keys(ALICE, &bad).unwrap_err(),
            RtcParseError::Missing {
                event: TO_DEVICE_KEYS_LABEL,
                field: "member.claimed_device_id".into()
            }
        );
    }

    #[test]
    fn junk_never_panics() {
        let junk = [
            json!(null),
            json!(1),
            json!("x"),
            json!([]),
            json!({}),
            json!([{}]),
            json!({"application": null}),
            json!({"application": 1}),
            json!({"application": {}}),
            json!({"application": {"type": "m.call"}, "member": 3}),
            json!({"application": "m.call", "call_id": 1}),
            json!({"application": "m.call", "call_id": "", "device_id": "D", "focus_active": [], "foci_preferred": {}}),
            json!({"application": "m.call", "call_id": "", "device_id": "D", "focus_active": {"type": 1}}),
            json!({"application": "m.call", "call_id": "", "device_id": "D", "created_ts": -1}),
            json!({"application": "m.call", "call_id": "", "device_id": "D", "expires": 1.5e300}),
            json!({"sticky_key": 5}),
            json!({"sticky_key": "a", "msc4354_sticky_key": "b"}),
            json!({"msc4354_sticky_key": "k", "application": {"type": "m.call"}, "slot_id": "m.call#", "member": {}}),
            json!({"msc4354_sticky_key": "k", "member": {"user_id": ALICE}}),
            json!({"keys": null, "room_id": ROOM}),
            json!({"keys": [], "device_id": "D", "call_id": ""}),
            json!({"keys": [null], "device_id": "D", "call_id": ""}),
            json!({"keys": {"index": -1, "key": "AAAA"}, "room_id": ROOM, "member": {"claimed_device_id": "D"}}),
            json!({"keys": {"index": 0, "key": ""}, "room_id": ROOM, "member": {"claimed_device_id": "D"}}),
            json!({"keys": {"index": 0, "key": "===="}, "room_id": ROOM, "member": {"claimed_device_id": "D"}}),
            json!({"keys": {"index": 1e10, "key": "AAAA"}, "room_id": ROOM, "member": {"claimed_device_id": ""}}),
            json!({"transports": {"published": [1]}, "application": {"type": "m.call"}}),
        ];
        let mut s = session();
        for v in &junk {
            for state_key in [
                "",
                "_",
                ALICE,
                "_@alice:example.org_",
                "@alice:example.org_D_m.call",
            ] {
                let _ = parse_legacy_member(state_key, ALICE, T0, v);
                let _ = s.handle_legacy_state_event(state_key, ALICE, T0, v, T0);
            }
            let _ = parse_sticky_member(ALICE, T0, v, Some(u64::MAX));
            let _ = s.handle_sticky_event(ALICE, u64::MAX, v, None, T0);
            let _ = parse_to_device_keys(ALICE, v);
            let _ = parse_room_keys(ROOM, ALICE, T0, v);
        }
        s.tick(u64::MAX);
    }

    // --- identities ---

    #[test]
    fn identity_vectors() {
        assert_eq!(
            legacy_identity(ALICE, "ABCDEFGHIJ"),
            "@alice:example.org:ABCDEFGHIJ"
        );
        assert_eq!(
            rtc_identity(ALICE, "DEVICEID", "uuid-1"),
            "DKc8+HgZz7duBolppppxYcKPqWZFl5vXPIVAknpJXZM"
        );
    }

    #[test]
    fn room_name_vectors() {
        // python3: base64.b64encode(hashlib.sha256(json.dumps([r, s], separators=(',', ':'))
        //   .encode()).digest()).decode().rstrip('=')
        assert_eq!(
            livekit_room_name(ROOM, CALL_SLOT_ID),
            "TK4o8wNCXi5t5936bOvIzE/X3XFc7cgp3jGRDqK0j5E"
        );
        // Go form of ["!a<b>&c:example.org","m.call#ROOM"]: same Python with
        // .replace('<','\\u003c').replace('>','\\u003e').replace('&','\\u0026') on the JSON text
        // (JS form would hash to +i4WHmxOVfdSfFV+gM6DdLfTzkvWUho9HE1jkszDhbs).
        assert_eq!(
            livekit_room_name("!a<b>&c:example.org", CALL_SLOT_ID),
            "rJYuQB3QVCYKx6v9y+wMbaeTQAWT/4UxbF1jpprhay4"
        );
        assert_eq!(
            json_string_array(&["a\"\\\n\u{1}\u{8}<", "\u{2028}"], true),
            r#"["a\"\\\n\u0001\b\u003c","\u2028"]"#
        );
        assert_eq!(
            json_string_array(&["a\"\\\n\u{1}\u{8}<", "\u{2028}"], false),
            serde_json::to_string(&["a\"\\\n\u{1}\u{8}<", "\u{2028}"]).unwrap()
        );
    }

    // --- session ---

    #[test]
    fn an_older_legacy_event_does_not_undo_a_newer_leave() {
        let mut s = session();
        let join = legacy("A1", URL, "multi_sfu", T0);
        s.handle_legacy_state_event(&sk(ALICE, "A1"), ALICE, T0, &join, T0).unwrap();
        s.handle_legacy_state_event(&sk(ALICE, "A1"), ALICE, T0 + 5_000, &json!({}), T0 + 5_000).unwrap();
        drain(&mut s);
        // The sync's pre-timeline state (the join) reaches the handlers after the leave.
        s.handle_legacy_state_event(&sk(ALICE, "A1"), ALICE, T0, &join, T0 + 5_001).unwrap();
        assert!(drain(&mut s).is_empty());
        assert!(s.members().is_empty());
        assert!(!s.is_active());
    }

    #[test]
    fn legacy_join_update_leave() {
        let mut s = session();
        s.handle_legacy_state_event(
            &sk(ALICE, "A1"),
            ALICE,
            T0,
            &legacy("A1", URL, "multi_sfu", T0),
            T0,
        )
        .unwrap();
        let ev = drain(&mut s);
        assert_eq!(ev[0], SessionEvent::SessionStarted);
        let SessionEvent::MemberJoined(m) = &ev[1] else {
            panic!("{ev:?}")
        };
        assert_eq!(m.identity, "@alice:example.org:A1");
        assert_eq!(m.kind, MemberKind::Legacy);
        assert_eq!(m.transport.as_ref().unwrap().livekit_service_url, URL);
        assert_eq!(ev.len(), 2);

        let mut c = legacy("A1", URL, "multi_sfu", T0);
        c["expires"] = json!(8 * HOUR);
        s.handle_legacy_state_event(&sk(ALICE, "A1"), ALICE, T0 + HOUR, &c, T0 + HOUR)
            .unwrap();
        assert!(
            matches!(drain(&mut s)[..], [SessionEvent::MemberUpdated(ref m)] if m.expires_at_ms == T0 + 8 * HOUR)
        );

        s.handle_legacy_state_event(
            &sk(ALICE, "A1"),
            ALICE,
            T0 + 2 * HOUR,
            &json!({}),
            T0 + 2 * HOUR,
        )
        .unwrap();
        let ev = drain(&mut s);
        assert!(
            matches!(
                ev[..],
                [SessionEvent::MemberLeft(_), SessionEvent::SessionEnded]
            ),
            "{ev:?}"
        );
    }

    #[test]
    fn expiry() {
        let mut s = session();
        // Already expired on arrival: never a member.
        s.handle_legacy_state_event(
            &sk(ALICE, "OLD"),
            ALICE,
            T0,
            &legacy("OLD", URL, "multi_sfu", T0 - 5 * HOUR),
            T0,
        )
        .unwrap();
        assert!(drain(&mut s).is_empty());
        assert!(s.members().is_empty());

        s.handle_legacy_state_event(
            &sk(BOB, "B1"),
            BOB,
            T0,
            &legacy("B1", URL, "multi_sfu", T0 - 3 * HOUR),
            T0,
        )
        .unwrap();
        assert_eq!(drain(&mut s).len(), 2);
        assert_eq!(s.next_expiry(), Some(T0 + HOUR));
        s.tick(T0 + HOUR - 1);
        assert!(drain(&mut s).is_empty());
        s.tick(T0 + HOUR);
        let ev = drain(&mut s);
        assert!(
            matches!(ev[..], [SessionEvent::MemberLeft(ref m), SessionEvent::SessionEnded] if m.user_id == BOB),
            "{ev:?}"
        );
        assert_eq!(s.next_expiry(), None);

        // Sticky: expires origin_server_ts (clamped to receipt) + duration.
        s.handle_sticky_event(
            ALICE,
            T0 + 10 * HOUR,
            &sticky_doc_example(),
            Some(60_000),
            T0 + HOUR,
        )
        .unwrap();
        assert_eq!(
            s.member(ALICE, "DEVICEID").unwrap().expires_at_ms,
            T0 + HOUR + 60_000
        );
        s.tick(T0 + HOUR + 60_000);
        assert!(matches!(
            drain(&mut s)[..],
            [
                SessionEvent::SessionStarted,
                SessionEvent::MemberJoined(_),
                SessionEvent::MemberLeft(_),
                SessionEvent::SessionEnded
            ]
        ));
    }

    #[test]
    fn unjoined_user_ignored_until_joined() {
        let mut s = RtcSession::new(ROOM);
        s.handle_legacy_state_event(
            &sk(ALICE, "A1"),
            ALICE,
            T0,
            &legacy("A1", URL, "multi_sfu", T0),
            T0,
        )
        .unwrap();
        assert!(drain(&mut s).is_empty());
        s.set_joined(ALICE, true, T0 + 1);
        assert_eq!(drain(&mut s).len(), 2);
        s.set_joined(ALICE, false, T0 + 2);
        assert!(matches!(
            drain(&mut s)[..],
            [SessionEvent::MemberLeft(_), SessionEvent::SessionEnded]
        ));
    }

    #[test]
    fn sticky_wins_over_legacy() {
        let mut s = session();
        s.handle_legacy_state_event(
            &sk(ALICE, "DEVICEID"),
            ALICE,
            T0,
            &legacy("DEVICEID", "https://old", "multi_sfu", T0),
            T0,
        )
        .unwrap();
        drain(&mut s);
        s.handle_sticky_event(
            ALICE,
            T0 + 10,
            &sticky_js43(ALICE, "DEVICEID", "uuid-1", URL),
            None,
            T0 + 10,
        )
        .unwrap();
        let ev = drain(&mut s);
        // Identity changes from user:device to the hash: the old participant leaves, the new joins.
        assert!(
            matches!(&ev[..], [SessionEvent::MemberLeft(old), SessionEvent::MemberJoined(new)]
            if old.kind == MemberKind::Legacy && new.kind == MemberKind::Sticky
               && new.identity == "DKc8+HgZz7duBolppppxYcKPqWZFl5vXPIVAknpJXZM"
               && new.transport.as_ref().unwrap().livekit_service_url == URL),
            "{ev:?}"
        );
        assert_eq!(s.members().len(), 1);

        // The delayed sticky leave as js-sdk 43 lands it: legacy counts again.
        s.handle_sticky_event(
            ALICE,
            T0 + 20,
            &json!({"msc4354_sticky_key": "uuid-1", "slot_id": "m.call#ROOM"}),
            None,
            T0 + 20,
        )
        .unwrap();
        let ev = drain(&mut s);
        assert!(
            matches!(&ev[..], [SessionEvent::MemberLeft(_), SessionEvent::MemberJoined(m)] if m.kind == MemberKind::Legacy),
            "{ev:?}"
        );
        // An older sticky event arriving late doesn't resurrect it.
        s.handle_sticky_event(
            ALICE,
            T0 + 15,
            &sticky_js43(ALICE, "DEVICEID", "uuid-1", URL),
            None,
            T0 + 30,
        )
        .unwrap();
        assert!(drain(&mut s).is_empty());
    }

    #[test]
    fn oldest_membership_transport() {
        let mut s = session();
        s.handle_legacy_state_event(
            &sk(BOB, "B1"),
            BOB,
            T0 + 5,
            &legacy("B1", "https://bob-sfu", "oldest_membership", T0 + 5),
            T0 + 5,
        )
        .unwrap();
        assert_eq!(
            s.member(BOB, "B1")
                .unwrap()
                .transport
                .as_ref()
                .unwrap()
                .livekit_service_url,
            "https://bob-sfu"
        );
        s.handle_legacy_state_event(
            &sk(ALICE, "A1"),
            ALICE,
            T0 + 6,
            &legacy("A1", "https://alice-sfu", "oldest_membership", T0),
            T0 + 6,
        )
        .unwrap();
        // Alice is older: everyone follows her transport.
        for m in s.members() {
            assert_eq!(
                m.transport.as_ref().unwrap().livekit_service_url,
                "https://alice-sfu"
            );
        }
        assert_eq!(s.members()[0].user_id, ALICE, "ordered by created_ts");
        let ev = drain(&mut s);
        assert!(
            ev.iter()
                .any(|e| matches!(e, SessionEvent::MemberUpdated(m) if m.user_id == BOB)),
            "{ev:?}"
        );
        assert_eq!(s.transports_in_use().len(), 1);
    }

    #[test]
    fn multi_sfu_transports_distinct() {
        let mut s = session();
        s.handle_legacy_state_event(
            &sk(ALICE, "A1"),
            ALICE,
            T0,
            &legacy("A1", "https://a", "multi_sfu", T0),
            T0,
        )
        .unwrap();
        s.handle_legacy_state_event(
            &sk(BOB, "B1"),
            BOB,
            T0,
            &legacy("B1", "https://b", "multi_sfu", T0 + 1),
            T0,
        )
        .unwrap();
        s.handle_sticky_event(
            BOB,
            T0 + 2,
            &sticky_js43(BOB, "B2", "u", "https://a"),
            None,
            T0 + 2,
        )
        .unwrap();
        let urls: Vec<String> = s
            .transports_in_use()
            .into_iter()
            .map(|t| t.livekit_service_url)
            .collect();
        assert_eq!(urls, vec!["https://a".to_owned(), "https://b".to_owned()]);
    }

    #[test]
    fn own_device_hidden_but_present() {
        let mut s = session();
        s.set_own_device(BOT, "BOTDEV", T0);
        let (key, content) = own_legacy_membership(BOT, "BOTDEV", URL, ROOM, None, 4 * HOUR);
        s.handle_legacy_state_event(&key, BOT, T0, &content, T0)
            .unwrap();
        assert!(s.own_membership_present());
        assert!(drain(&mut s).is_empty());
        assert!(s.members().is_empty());
        let (key, leave) = own_legacy_leave(BOT, "BOTDEV");
        s.handle_legacy_state_event(&key, BOT, T0 + 1, &leave, T0 + 1)
            .unwrap();
        assert!(!s.own_membership_present());
    }

    #[test]
    fn refused_state_event_withdraws_membership() {
        let mut s = session();
        s.handle_legacy_state_event(
            &sk(ALICE, "A1"),
            ALICE,
            T0,
            &legacy("A1", URL, "multi_sfu", T0),
            T0,
        )
        .unwrap();
        drain(&mut s);
        let err = s.handle_legacy_state_event(
            &sk(ALICE, "A1"),
            ALICE,
            T0 + 1,
            &json!({"application": 3}),
            T0 + 1,
        );
        assert!(err.is_err());
        assert!(matches!(
            drain(&mut s)[..],
            [SessionEvent::MemberLeft(_), SessionEvent::SessionEnded]
        ));
    }

    // --- own membership content ---

    #[test]
    fn own_membership_contents_round_trip() {
        let (key, content) = own_legacy_membership(BOT, "BOTDEV", URL, ROOM, Some(T0), 8 * HOUR);
        assert_eq!(key, "_@bot:example.org_BOTDEV_m.call");
        assert_eq!(content["membershipID"], "@bot:example.org:BOTDEV");
        assert_eq!(content["foci_preferred"][0]["livekit_alias"], ROOM);
        let ev = parse_legacy_member(&key, BOT, T0 + 5, &content).unwrap();
        let LegacyContent::Member(m) = ev.content else {
            panic!()
        };
        assert_eq!((m.created_ts, m.expires_at_ms), (T0, T0 + 8 * HOUR));
        assert_eq!(
            legacy_state_key(BOT, "D", Some("org.matrix.msc3757.10")),
            "@bot:example.org_D_m.call"
        );

        let own = own_sticky_membership(BOT, "BOTDEV", "uuid-bot", URL);
        let ev = parse_sticky_member(BOT, T0, &own.content, Some(own.sticky_duration_ms)).unwrap();
        assert_eq!(ev.sticky_key, "uuid-bot");
        assert!(matches!(ev.content, StickyContent::Member(ref m) if m.slot_id == CALL_SLOT_ID));
        let leave = parse_sticky_member(BOT, T0, &own_sticky_leave("uuid-bot"), None).unwrap();
        assert!(matches!(leave.content, StickyContent::Leave { .. }));
    }

    // --- keys ---

    /// Hands every pending session event to the router, as the bot's runtime does.
    fn pump(s: &mut RtcSession, r: &mut KeyRouter) {
        while let Some(ev) = s.poll_event() {
            r.handle_session_event(&ev);
        }
    }

    fn joined_alice(s: &mut RtcSession, r: &mut KeyRouter, now: u64) {
        s.handle_legacy_state_event(
            &sk(ALICE, "A1"),
            ALICE,
            now,
            &legacy("A1", URL, "multi_sfu", now),
            now,
        )
        .unwrap();
        pump(s, r);
    }

    #[test]
    fn key_before_membership_is_held_then_released() {
        let mut s = session();
        let mut r = KeyRouter::new(ROOM);
        let k = [7u8; 16];
        let ev = parse_to_device_keys(ALICE, &to_device_key("A1", 0, &k, T0)).unwrap();
        let intake = r.handle_keys(ev, T0).unwrap();
        assert_eq!(
            intake,
            KeyIntake {
                held: 1,
                ..Default::default()
            }
        );
        assert!(r.poll_update().is_none());
        joined_alice(&mut s, &mut r, T0 + 1);
        let ups = updates(&mut r);
        assert_eq!(
            ups,
            vec![KeyUpdate {
                identity: "@alice:example.org:A1".into(),
                index: 0,
                key: k.to_vec()
            }]
        );
        assert_eq!(r.held_count(), 0);
        assert!(
            !format!("{:?}", ups[0]).contains('7'),
            "Debug must not show key bytes"
        );
        // A re-send of the same key is not installed twice.
        let ev = parse_to_device_keys(ALICE, &to_device_key("A1", 0, &k, T0)).unwrap();
        assert_eq!(r.handle_keys(ev, T0 + 2).unwrap().routed, 1);
        assert!(r.poll_update().is_none());
    }

    #[test]
    fn key_after_leave_kept_for_identity() {
        let mut s = session();
        let mut r = KeyRouter::new(ROOM);
        joined_alice(&mut s, &mut r, T0);
        s.handle_legacy_state_event(&sk(ALICE, "A1"), ALICE, T0 + 10, &json!({}), T0 + 10)
            .unwrap();
        pump(&mut s, &mut r);
        assert!(s.members().is_empty());
        let ev = parse_to_device_keys(ALICE, &to_device_key("A1", 1, &[9u8; 16], T0 + 11)).unwrap();
        assert_eq!(r.handle_keys(ev, T0 + 11).unwrap().routed, 1);
        let ups = updates(&mut r);
        assert_eq!(ups.len(), 1);
        assert_eq!(
            (ups[0].identity.as_str(), ups[0].index),
            ("@alice:example.org:A1", 1)
        );
        // …and it made nobody a member.
        s.tick(T0 + 12);
        assert!(s.members().is_empty() && s.poll_event().is_none());
    }

    #[test]
    fn rejoin_with_new_identity_gets_post_leave_keys() {
        let mut s = session();
        let mut r = KeyRouter::new(ROOM);
        s.handle_sticky_event(ALICE, T0, &sticky_js43(ALICE, "A1", "m1", URL), None, T0)
            .unwrap();
        pump(&mut s, &mut r);
        s.handle_sticky_event(
            ALICE,
            T0 + 1,
            &json!({"msc4354_sticky_key": "m1"}),
            None,
            T0 + 1,
        )
        .unwrap();
        pump(&mut s, &mut r);
        let ev = parse_to_device_keys(ALICE, &to_device_key("A1", 3, &[1u8; 16], T0 + 2)).unwrap();
        r.handle_keys(ev, T0 + 2).unwrap();
        assert_eq!(updates(&mut r)[0].identity, rtc_identity(ALICE, "A1", "m1"));
        s.handle_sticky_event(
            ALICE,
            T0 + 3,
            &sticky_js43(ALICE, "A1", "m2", URL),
            None,
            T0 + 3,
        )
        .unwrap();
        pump(&mut s, &mut r);
        let ups = updates(&mut r);
        assert_eq!(ups.len(), 1);
        assert_eq!(
            (ups[0].identity.clone(), ups[0].index),
            (rtc_identity(ALICE, "A1", "m2"), 3)
        );
    }

    #[test]
    fn identity_change_replays_device_keys() {
        let mut s = session();
        let mut r = KeyRouter::new(ROOM);
        joined_alice(&mut s, &mut r, T0);
        let ev = parse_to_device_keys(ALICE, &to_device_key("A1", 0, &[5u8; 16], T0 + 1)).unwrap();
        r.handle_keys(ev, T0 + 1).unwrap();
        assert_eq!(updates(&mut r)[0].identity, "@alice:example.org:A1");
        // The same device switches to a sticky membership (hashed identity).
        s.handle_sticky_event(
            ALICE,
            T0 + 2,
            &sticky_js43(ALICE, "A1", "m9", URL),
            None,
            T0 + 2,
        )
        .unwrap();
        pump(&mut s, &mut r);
        let ups = updates(&mut r);
        assert_eq!(ups.len(), 1);
        assert_eq!(
            (ups[0].identity.clone(), ups[0].index),
            (rtc_identity(ALICE, "A1", "m9"), 0)
        );
    }

    #[test]
    fn older_key_dropped() {
        let mut s = session();
        let mut r = KeyRouter::new(ROOM);
        joined_alice(&mut s, &mut r, T0);
        let new =
            parse_to_device_keys(ALICE, &to_device_key("A1", 0, &[2u8; 16], T0 + 100)).unwrap();
        let old =
            parse_to_device_keys(ALICE, &to_device_key("A1", 0, &[1u8; 16], T0 + 50)).unwrap();
        r.handle_keys(new, T0 + 200).unwrap();
        assert_eq!(
            r.handle_keys(old, T0 + 201).unwrap(),
            KeyIntake {
                outdated: 1,
                ..Default::default()
            }
        );
        let ups = updates(&mut r);
        assert_eq!(ups.len(), 1);
        assert_eq!(ups[0].key, vec![2u8; 16]);
        // Another index is independent.
        let other =
            parse_to_device_keys(ALICE, &to_device_key("A1", 1, &[3u8; 16], T0 + 50)).unwrap();
        assert_eq!(r.handle_keys(other, T0 + 202).unwrap().routed, 1);
    }

    #[test]
    fn held_keys_bounded_and_room_checked() {
        let mut r = KeyRouter::new(ROOM);
        for i in 0..100u64 {
            let mut c = to_device_key("A1", (i % 256) as u8, &[i as u8 + 1; 16], T0 + i);
            c["keys"]["index"] = json!(i);
            r.handle_keys(parse_to_device_keys(ALICE, &c).unwrap(), T0)
                .unwrap();
        }
        assert_eq!(r.held_count(), MAX_KEPT_KEYS_PER_DEVICE);
        let mut c = to_device_key("A1", 0, &[1u8; 16], T0);
        c["room_id"] = json!("!other:example.org");
        let err = r
            .handle_keys(parse_to_device_keys(ALICE, &c).unwrap(), T0)
            .unwrap_err();
        assert!(matches!(err, RtcParseError::RoomMismatch { .. }));
        r.set_own_device(BOT, "BOTDEV");
        let own = parse_to_device_keys(BOT, &to_device_key("BOTDEV", 0, &[1u8; 16], T0)).unwrap();
        assert_eq!(r.handle_keys(own, T0).unwrap().own, 1);
    }

    #[test]
    fn keys_from_ever_new_unknown_devices_stay_bounded() {
        // Each to-device event claims another device that never joins: the held keys are capped,
        // and so must be everything else kept about those devices.
        let mut r = KeyRouter::new(ROOM);
        for i in 0..(4 * MAX_UNKNOWN_DEVICES as u64) {
            let c = to_device_key(&format!("D{i}"), (i % 4) as u8, &[1u8; 16], T0 + i);
            r.handle_keys(parse_to_device_keys(ALICE, &c).unwrap(), T0).unwrap();
        }
        assert!(r.keys.len() <= MAX_UNKNOWN_DEVICES);
        assert!(r.latest_sent.len() <= MAX_UNKNOWN_DEVICES, "{} sent_ts entries kept", r.latest_sent.len());
    }

    #[test]
    fn room_key_event_routes_all_entries() {
        let mut s = session();
        let mut r = KeyRouter::new(ROOM);
        joined_alice(&mut s, &mut r, T0);
        let c = json!({"keys": [{"index": 0, "key": b64(&[1u8; 16])}, {"index": 1, "key": b64(&[2u8; 16])}],
            "device_id": "A1", "call_id": ""});
        let ev = parse_room_keys(ROOM, ALICE, T0 + 1, &c).unwrap();
        assert_eq!(r.handle_keys(ev, T0 + 2).unwrap().routed, 2);
        assert_eq!(updates(&mut r).len(), 2);
    }
}
