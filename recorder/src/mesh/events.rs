//! The wire format of MSC3401 mesh group calls: the call and member state events, and the fields
//! a peer call's to-device `m.call.*` message carries on top of the 1:1 content (which
//! [`crate::voip1::events`] parses). Strict, bounded parsing with a typed error per rejection.

use serde_json::{Map, Value};
use thiserror::Error;

/// The group call: state key = group call id.
pub const GROUP_CALL_EVENT_TYPE: &str = "org.matrix.msc3401.call";
/// A user's devices in group calls: state key = the user id. MatrixRTC's legacy memberships use
/// the same type with per-device state keys and another content.
pub const MEMBER_EVENT_TYPE: &str = "org.matrix.msc3401.call.member";
/// The key of a member event's list of calls; its presence tells a mesh membership from a
/// MatrixRTC one.
pub const CALLS_KEY: &str = "m.calls";

/// Bounds on what one event may hold.
const MAX_CALLS: usize = 16;
const MAX_DEVICES: usize = 64;
const MAX_FEEDS: usize = 16;
const MAX_ID_LEN: usize = 255;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MeshParseError {
    #[error("the content is not a JSON object")]
    NotAnObject,
    #[error("`{0}` is missing")]
    Missing(&'static str),
    #[error("`{field}` has the wrong type (expected {expected})")]
    WrongType { field: &'static str, expected: &'static str },
    #[error("`{0}` is longer than 255 bytes or empty")]
    BadId(&'static str),
    #[error("`{field}` lists more than {max} entries")]
    TooMany { field: &'static str, max: usize },
    #[error("state key {state_key:?} is not the sender {sender}: a user may only announce their own devices")]
    NotOwnState { state_key: String, sender: String },
}

/// `org.matrix.msc3401.call` content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupCallState {
    /// `m.terminated` is set, or the content is empty (redacted): the call is over.
    pub terminated: bool,
    /// `m.type`: `m.video` or `m.voice`.
    pub call_type: Option<String>,
}

pub fn parse_group_call(content: &Value) -> Result<GroupCallState, MeshParseError> {
    let o = content.as_object().ok_or(MeshParseError::NotAnObject)?;
    let terminated = o.is_empty() || o.get("m.terminated").is_some_and(|v| !v.is_null());
    let call_type = opt_str(o, "m.type")?.map(str::to_owned);
    Ok(GroupCallState { terminated, call_type })
}

/// One device of a member, in one group call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberDevice {
    pub call_id: String,
    pub device_id: String,
    pub session_id: String,
    /// Unix ms after which the device no longer counts; `None` when the client sent none.
    pub expires_ts: Option<u64>,
    /// `feeds[].purpose`: `m.usermedia`, `m.screenshare`.
    pub feeds: Vec<String>,
}

/// The devices a member event announces (any group call). Content without `m.calls` (a leave,
/// `{}`) announces none.
pub fn parse_member(state_key: &str, sender: &str, content: &Value) -> Result<Vec<MemberDevice>, MeshParseError> {
    if state_key != sender {
        return Err(MeshParseError::NotOwnState { state_key: state_key.to_owned(), sender: sender.to_owned() });
    }
    let o = content.as_object().ok_or(MeshParseError::NotAnObject)?;
    let Some(calls) = o.get(CALLS_KEY) else { return Ok(Vec::new()) };
    let calls = calls.as_array().ok_or(MeshParseError::WrongType { field: "m.calls", expected: "array" })?;
    if calls.len() > MAX_CALLS {
        return Err(MeshParseError::TooMany { field: "m.calls", max: MAX_CALLS });
    }
    let mut out = Vec::new();
    for call in calls {
        let call = call.as_object().ok_or(MeshParseError::WrongType { field: "m.calls[]", expected: "object" })?;
        let call_id = id(call, "m.call_id")?;
        let devices = match call.get("m.devices") {
            None => continue,
            Some(d) => d.as_array().ok_or(MeshParseError::WrongType { field: "m.devices", expected: "array" })?,
        };
        if devices.len() > MAX_DEVICES {
            return Err(MeshParseError::TooMany { field: "m.devices", max: MAX_DEVICES });
        }
        for d in devices {
            let d = d.as_object().ok_or(MeshParseError::WrongType { field: "m.devices[]", expected: "object" })?;
            let expires_ts = match d.get("expires_ts") {
                None | Some(Value::Null) => None,
                Some(v) => Some(
                    v.as_u64()
                        .or_else(|| v.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
                        .ok_or(MeshParseError::WrongType { field: "expires_ts", expected: "non-negative number" })?,
                ),
            };
            let feeds = match d.get("feeds") {
                None | Some(Value::Null) => Vec::new(),
                Some(f) => {
                    let f = f.as_array().ok_or(MeshParseError::WrongType { field: "feeds", expected: "array" })?;
                    if f.len() > MAX_FEEDS {
                        return Err(MeshParseError::TooMany { field: "feeds", max: MAX_FEEDS });
                    }
                    f.iter()
                        .filter_map(|feed| feed.get("purpose").and_then(Value::as_str).map(str::to_owned))
                        .collect()
                }
            };
            out.push(MemberDevice {
                call_id: call_id.to_owned(),
                device_id: id(d, "device_id")?.to_owned(),
                session_id: id(d, "session_id")?.to_owned(),
                expires_ts,
                feeds,
            });
        }
    }
    Ok(out)
}

/// What a group call's peer message carries besides the 1:1 content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub call_id: String,
    /// The group call id.
    pub conf_id: String,
    /// The sender's device.
    pub device_id: String,
    pub sender_session_id: String,
    /// The session the message is meant for; messages for another one are dropped.
    pub dest_session_id: Option<String>,
    /// Per call, from 0; messages are processed in this order.
    pub seq: Option<u64>,
}

/// Reads the envelope; `None` for a to-device call event without `conf_id` (not a group call's).
pub fn parse_envelope(content: &Value) -> Result<Option<Envelope>, MeshParseError> {
    let o = content.as_object().ok_or(MeshParseError::NotAnObject)?;
    if o.get("conf_id").is_none() {
        return Ok(None);
    }
    let seq = match o.get("seq") {
        None | Some(Value::Null) => None,
        Some(v) => Some(v.as_u64().ok_or(MeshParseError::WrongType { field: "seq", expected: "non-negative integer" })?),
    };
    Ok(Some(Envelope {
        call_id: id(o, "call_id")?.to_owned(),
        conf_id: id(o, "conf_id")?.to_owned(),
        device_id: id(o, "device_id")?.to_owned(),
        sender_session_id: id(o, "sender_session_id")?.to_owned(),
        dest_session_id: opt_str(o, "dest_session_id")?.map(str::to_owned),
        seq,
    }))
}

/// The fields the bot adds to every `m.call.*` content it sends in a group call.
pub fn wrap(content: &mut Value, conf_id: &str, device_id: &str, session_id: &str, dest_session_id: &str, seq: u64) {
    if let Some(o) = content.as_object_mut() {
        o.insert("conf_id".into(), conf_id.into());
        o.insert("device_id".into(), device_id.into());
        o.insert("sender_session_id".into(), session_id.into());
        o.insert("dest_session_id".into(), dest_session_id.into());
        o.insert("seq".into(), seq.into());
    }
}

/// The bot's member event content: its one device in `call_id`, or none (leaving).
pub fn member_content(joined: Option<(&str, &str, &str, u64)>) -> Value {
    match joined {
        None => serde_json::json!({ CALLS_KEY: [] }),
        Some((call_id, device_id, session_id, expires_ts)) => serde_json::json!({
            CALLS_KEY: [{
                "m.call_id": call_id,
                "m.devices": [{
                    "device_id": device_id,
                    "session_id": session_id,
                    "expires_ts": expires_ts,
                    // The bot sends no media; it announces no feeds.
                    "feeds": [],
                }],
            }],
        }),
    }
}

fn id<'a>(o: &'a Map<String, Value>, field: &'static str) -> Result<&'a str, MeshParseError> {
    let s = o
        .get(field)
        .ok_or(MeshParseError::Missing(field))?
        .as_str()
        .ok_or(MeshParseError::WrongType { field, expected: "string" })?;
    if s.is_empty() || s.len() > MAX_ID_LEN {
        return Err(MeshParseError::BadId(field));
    }
    Ok(s)
}

fn opt_str<'a>(o: &'a Map<String, Value>, field: &'static str) -> Result<Option<&'a str>, MeshParseError> {
    match o.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_str().map(Some).ok_or(MeshParseError::WrongType { field, expected: "string" }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn group_call_states() {
        let live = parse_group_call(&json!({"m.intent": "m.room", "m.type": "m.video"})).unwrap();
        assert!(!live.terminated);
        assert_eq!(live.call_type.as_deref(), Some("m.video"));
        assert!(parse_group_call(&json!({"m.intent": "m.room", "m.terminated": "call_ended"})).unwrap().terminated);
        assert!(parse_group_call(&json!({})).unwrap().terminated, "a redacted call is over");
        assert_eq!(parse_group_call(&json!([])), Err(MeshParseError::NotAnObject));
        assert!(matches!(parse_group_call(&json!({"m.type": 3})), Err(MeshParseError::WrongType { field: "m.type", .. })));
    }

    #[test]
    fn member_devices_are_read() {
        let content = json!({"m.calls": [{"m.call_id": "g1", "m.devices": [
            {"device_id": "DEV", "session_id": "s1", "expires_ts": 1_700_000_000_000u64, "feeds": [{"purpose": "m.usermedia"}, {"purpose": "m.screenshare"}]},
            {"device_id": "OLD", "session_id": "s0"},
        ]}]});
        let d = parse_member("@a:x", "@a:x", &content).unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].call_id, "g1");
        assert_eq!(d[0].expires_ts, Some(1_700_000_000_000));
        assert_eq!(d[0].feeds, vec!["m.usermedia", "m.screenshare"]);
        assert_eq!(d[1].expires_ts, None);
        assert!(parse_member("@a:x", "@a:x", &json!({"m.calls": []})).unwrap().is_empty());
        assert!(parse_member("@a:x", "@a:x", &json!({})).unwrap().is_empty(), "a leave");
    }

    #[test]
    fn bad_member_events_are_refused() {
        let ok = json!({"m.calls": [{"m.call_id": "g", "m.devices": [{"device_id": "D", "session_id": "s"}]}]});
        assert!(matches!(parse_member("@b:x", "@a:x", &ok), Err(MeshParseError::NotOwnState { .. })));
        let no_session = json!({"m.calls": [{"m.call_id": "g", "m.devices": [{"device_id": "D"}]}]});
        assert_eq!(parse_member("@a:x", "@a:x", &no_session), Err(MeshParseError::Missing("session_id")));
        let bad_expiry = json!({"m.calls": [{"m.call_id": "g", "m.devices": [{"device_id": "D", "session_id": "s", "expires_ts": "soon"}]}]});
        assert!(matches!(parse_member("@a:x", "@a:x", &bad_expiry), Err(MeshParseError::WrongType { field: "expires_ts", .. })));
        let many: Vec<Value> = (0..65).map(|i| json!({"device_id": format!("D{i}"), "session_id": "s"})).collect();
        let flood = json!({"m.calls": [{"m.call_id": "g", "m.devices": many}]});
        assert!(matches!(parse_member("@a:x", "@a:x", &flood), Err(MeshParseError::TooMany { field: "m.devices", .. })));
        assert!(matches!(parse_member("@a:x", "@a:x", &json!({"m.calls": "g"})), Err(MeshParseError::WrongType { .. })));
        let long = "x".repeat(256);
        let long_id = json!({"m.calls": [{"m.call_id": long, "m.devices": []}]});
        assert_eq!(parse_member("@a:x", "@a:x", &long_id), Err(MeshParseError::BadId("m.call_id")));
    }

    #[test]
    fn envelopes() {
        let c = json!({"call_id": "c1", "conf_id": "g1", "device_id": "DEV", "sender_session_id": "s1",
                       "dest_session_id": "me", "seq": 3, "party_id": "DEV", "version": "1"});
        let e = parse_envelope(&c).unwrap().unwrap();
        assert_eq!((e.conf_id.as_str(), e.device_id.as_str(), e.seq), ("g1", "DEV", Some(3)));
        assert_eq!(e.dest_session_id.as_deref(), Some("me"));
        assert_eq!(parse_envelope(&json!({"call_id": "c1"})).unwrap(), None, "not a group call's");
        assert!(matches!(parse_envelope(&json!({"call_id": "c", "conf_id": "g", "device_id": "D", "sender_session_id": "s", "seq": -1})),
            Err(MeshParseError::WrongType { field: "seq", .. })));
        assert_eq!(parse_envelope(&json!({"conf_id": "g", "device_id": "D", "sender_session_id": "s"})), Err(MeshParseError::Missing("call_id")));
    }

    #[test]
    fn what_the_bot_sends() {
        let mut c = json!({"call_id": "c", "party_id": "BOT", "version": "1"});
        wrap(&mut c, "g", "BOT", "sess", "theirs", 4);
        assert_eq!(c["conf_id"], "g");
        assert_eq!(c["dest_session_id"], "theirs");
        assert_eq!(c["seq"], 4);
        let joined = member_content(Some(("g", "BOT", "sess", 99)));
        let d = parse_member("@bot:x", "@bot:x", &joined).unwrap();
        assert_eq!(d.len(), 1);
        assert_eq!((d[0].device_id.as_str(), d[0].session_id.as_str(), d[0].expires_ts), ("BOT", "sess", Some(99)));
        assert!(parse_member("@bot:x", "@bot:x", &member_content(None)).unwrap().is_empty());
    }
}
