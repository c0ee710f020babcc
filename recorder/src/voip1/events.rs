//! The `m.call.*` wire format: strict parsing of what callers send, and the serde types of what
//! the bot sends.
//!
//! Parsing is hand-written over `serde_json::Value` rather than derived, so that every rejection
//! says exactly which field was wrong and how ([`ParseError`]); derived serde errors don't name the
//! field for type mismatches. It is strict where the protocol is (a `call_id` is required, an
//! offer's `type` must be `"offer"`, SDPs are non-empty and bounded, lists are bounded) and lenient
//! where real clients differ: version 0 clients send integer `0` and no `party_id`, stream
//! metadata comes under the stable `sdp_stream_metadata` or the MSC3077 unstable key, `null`
//! stands for an absent optional field (js-sdk's end-of-candidates entry has `sdpMid: null`), and
//! unknown fields are ignored.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{Map, Value};
use thiserror::Error;

use super::{CallId, PartyId, UserId};

pub const INVITE: &str = "m.call.invite";
pub const CANDIDATES: &str = "m.call.candidates";
pub const ANSWER: &str = "m.call.answer";
pub const SELECT_ANSWER: &str = "m.call.select_answer";
pub const NEGOTIATE: &str = "m.call.negotiate";
pub const SDP_STREAM_METADATA_CHANGED: &str = "m.call.sdp_stream_metadata_changed";
/// The unstable name js-sdk also listens to.
pub const SDP_STREAM_METADATA_CHANGED_UNSTABLE: &str =
    "org.matrix.call.sdp_stream_metadata_changed";
pub const HANGUP: &str = "m.call.hangup";
pub const REJECT: &str = "m.call.reject";
pub const REPLACES: &str = "m.call.replaces";
pub const ASSERTED_IDENTITY: &str = "m.call.asserted_identity";
pub const ASSERTED_IDENTITY_UNSTABLE: &str = "org.matrix.call.asserted_identity";

/// Stable key of the MSC3077 stream metadata map.
pub const METADATA_KEY: &str = "sdp_stream_metadata";
/// Unstable key of the same map, sent by older clients.
pub const METADATA_KEY_UNSTABLE: &str = "org.matrix.msc3077.sdp_stream_metadata";

/// The version the bot speaks and puts in everything it sends.
pub const OUR_VERSION: &str = "1";

/// Bounds applied while parsing, so a hostile or broken client can't make us hold (or hand the
/// WebRTC stack) arbitrarily large input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseLimits {
    pub max_sdp_bytes: usize,
    pub max_candidates_per_event: usize,
    pub max_candidate_bytes: usize,
    /// call_id, party_id, stream ids, sdpMid, user ids, reasons.
    pub max_id_bytes: usize,
    pub max_streams: usize,
}

impl Default for ParseLimits {
    fn default() -> Self {
        Self {
            max_sdp_bytes: 256 * 1024,
            max_candidates_per_event: 100,
            max_candidate_bytes: 1024,
            max_id_bytes: 255,
            max_streams: 32,
        }
    }
}

/// Why a call event's content was rejected. `event_type` is the `m.call.*` type, `field` a path
/// inside the content such as `candidates[2].sdpMLineIndex`.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ParseError {
    #[error("`{0}` is not a call event type")]
    UnknownEventType(String),
    #[error("{event_type}: content is not a JSON object")]
    NotAnObject { event_type: &'static str },
    #[error("{event_type}: required field `{field}` is missing")]
    MissingField {
        event_type: &'static str,
        field: String,
    },
    #[error("{event_type}: field `{field}` must be {expected}")]
    WrongType {
        event_type: &'static str,
        field: String,
        expected: &'static str,
    },
    #[error("{event_type}: version {found} is not supported (only \"1\" and legacy 0)")]
    UnsupportedVersion {
        event_type: &'static str,
        found: String,
    },
    #[error("{event_type}: `{field}` must be \"{expected}\", not \"{found}\"")]
    WrongSdpType {
        event_type: &'static str,
        field: String,
        expected: &'static str,
        found: String,
    },
    #[error("{event_type}: `{field}` is empty")]
    Empty {
        event_type: &'static str,
        field: String,
    },
    #[error("{event_type}: `{field}` is {len} bytes, over the limit of {max}")]
    TooLong {
        event_type: &'static str,
        field: String,
        len: usize,
        max: usize,
    },
    #[error("{event_type}: `{field}` has {len} entries, over the limit of {max}")]
    TooMany {
        event_type: &'static str,
        field: String,
        len: usize,
        max: usize,
    },
}

/// VoIP protocol version of an event. Version 0 events have no meaningful `party_id`
/// (js-sdk ignores one if present, and so do we).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VoipVersion {
    V0,
    V1,
}

/// Fields every call event carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallCommon {
    pub call_id: CallId,
    /// Always `None` for version 0.
    pub party_id: Option<PartyId>,
    pub version: VoipVersion,
}

/// `capabilities` (MSC2747). Absent means all false.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Capabilities {
    #[serde(rename = "m.call.transferee")]
    pub transferee: bool,
    #[serde(rename = "m.call.dtmf")]
    pub dtmf: bool,
}

/// MSC3077 stream purpose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamPurpose {
    Usermedia,
    Screenshare,
    /// A purpose this code doesn't know (future MSCs); recorded like usermedia.
    Other(String),
}

/// One entry of the stream metadata map, keyed by the SDP msid stream id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamMetadata {
    pub purpose: StreamPurpose,
    pub audio_muted: bool,
    pub video_muted: bool,
}

pub type SdpStreamMetadata = BTreeMap<String, StreamMetadata>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SdpType {
    Offer,
    Answer,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionDescription {
    pub kind: SdpType,
    pub sdp: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invite {
    pub common: CallCommon,
    /// The offer SDP (`offer.type` checked to be `"offer"`).
    pub offer_sdp: String,
    pub lifetime_ms: u64,
    pub invitee: Option<UserId>,
    pub capabilities: Capabilities,
    pub metadata: Option<SdpStreamMetadata>,
}

/// One ICE candidate as Matrix carries it (`RTCIceCandidateInit` JSON). An empty `candidate`
/// is the end-of-candidates marker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Candidate {
    pub candidate: String,
    #[serde(rename = "sdpMid", skip_serializing_if = "Option::is_none")]
    pub sdp_mid: Option<String>,
    #[serde(rename = "sdpMLineIndex", skip_serializing_if = "Option::is_none")]
    pub sdp_mline_index: Option<u16>,
}

impl Candidate {
    pub fn is_end_of_candidates(&self) -> bool {
        self.candidate.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidates {
    pub common: CallCommon,
    pub candidates: Vec<Candidate>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub common: CallCommon,
    pub answer_sdp: String,
    pub capabilities: Capabilities,
    pub metadata: Option<SdpStreamMetadata>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelectAnswer {
    pub common: CallCommon,
    pub selected_party_id: PartyId,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiate {
    pub common: CallCommon,
    pub description: SessionDescription,
    pub lifetime_ms: Option<u64>,
    pub metadata: Option<SdpStreamMetadata>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetadataChanged {
    pub common: CallCommon,
    pub metadata: SdpStreamMetadata,
}

/// `m.call.hangup` or `m.call.reject`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HangupOrReject {
    pub common: CallCommon,
    pub reason: Option<String>,
}

/// A parsed `m.call.*` event content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallEvent {
    Invite(Invite),
    Candidates(Candidates),
    Answer(Answer),
    SelectAnswer(SelectAnswer),
    Negotiate(Negotiate),
    SdpStreamMetadataChanged(MetadataChanged),
    Hangup(HangupOrReject),
    Reject(HangupOrReject),
    /// Call transfer (`m.call.replaces`): recognised, not supported; only the common fields.
    Replaces(CallCommon),
    /// `m.call.asserted_identity`: recognised, not used; only the common fields.
    AssertedIdentity(CallCommon),
}

impl CallEvent {
    pub fn common(&self) -> &CallCommon {
        match self {
            CallEvent::Invite(e) => &e.common,
            CallEvent::Candidates(e) => &e.common,
            CallEvent::Answer(e) => &e.common,
            CallEvent::SelectAnswer(e) => &e.common,
            CallEvent::Negotiate(e) => &e.common,
            CallEvent::SdpStreamMetadataChanged(e) => &e.common,
            CallEvent::Hangup(e) | CallEvent::Reject(e) => &e.common,
            CallEvent::Replaces(c) | CallEvent::AssertedIdentity(c) => c,
        }
    }

    /// The stable event type name.
    pub fn event_type(&self) -> &'static str {
        match self {
            CallEvent::Invite(_) => INVITE,
            CallEvent::Candidates(_) => CANDIDATES,
            CallEvent::Answer(_) => ANSWER,
            CallEvent::SelectAnswer(_) => SELECT_ANSWER,
            CallEvent::Negotiate(_) => NEGOTIATE,
            CallEvent::SdpStreamMetadataChanged(_) => SDP_STREAM_METADATA_CHANGED,
            CallEvent::Hangup(_) => HANGUP,
            CallEvent::Reject(_) => REJECT,
            CallEvent::Replaces(_) => REPLACES,
            CallEvent::AssertedIdentity(_) => ASSERTED_IDENTITY,
        }
    }
}

/// Whether `event_type` is one of the call event types [`parse`] understands (cheap pre-filter for
/// the Matrix edge).
pub fn is_call_event_type(event_type: &str) -> bool {
    canonical_type(event_type).is_some()
}

fn canonical_type(event_type: &str) -> Option<&'static str> {
    Some(match event_type {
        INVITE => INVITE,
        CANDIDATES => CANDIDATES,
        ANSWER => ANSWER,
        SELECT_ANSWER => SELECT_ANSWER,
        NEGOTIATE => NEGOTIATE,
        SDP_STREAM_METADATA_CHANGED | SDP_STREAM_METADATA_CHANGED_UNSTABLE => {
            SDP_STREAM_METADATA_CHANGED
        }
        HANGUP => HANGUP,
        REJECT => REJECT,
        REPLACES => REPLACES,
        ASSERTED_IDENTITY | ASSERTED_IDENTITY_UNSTABLE => ASSERTED_IDENTITY,
        _ => return None,
    })
}

/// Parses the content of a call event with the default [`ParseLimits`].
pub fn parse(event_type: &str, content: &Value) -> Result<CallEvent, ParseError> {
    parse_with(&ParseLimits::default(), event_type, content)
}

/// Parses the content of a call event.
pub fn parse_with(
    limits: &ParseLimits,
    event_type: &str,
    content: &Value,
) -> Result<CallEvent, ParseError> {
    let ty = canonical_type(event_type)
        .ok_or_else(|| ParseError::UnknownEventType(event_type.to_owned()))?;
    let map = content
        .as_object()
        .ok_or(ParseError::NotAnObject { event_type: ty })?;
    let o = Obj {
        ty,
        limits,
        map,
        prefix: String::new(),
    };
    let common = o.common()?;
    Ok(match ty {
        INVITE => {
            let offer = o.description("offer", SdpType::Offer)?;
            CallEvent::Invite(Invite {
                common,
                offer_sdp: offer.sdp,
                lifetime_ms: o.req_u64("lifetime")?,
                invitee: o.opt_id("invitee")?.map(UserId),
                capabilities: o.capabilities()?,
                metadata: o.metadata()?,
            })
        }
        CANDIDATES => CallEvent::Candidates(Candidates {
            common,
            candidates: o.candidates()?,
        }),
        ANSWER => {
            let answer = o.description("answer", SdpType::Answer)?;
            CallEvent::Answer(Answer {
                common,
                answer_sdp: answer.sdp,
                capabilities: o.capabilities()?,
                metadata: o.metadata()?,
            })
        }
        SELECT_ANSWER => CallEvent::SelectAnswer(SelectAnswer {
            common,
            selected_party_id: PartyId(o.req_id("selected_party_id")?),
        }),
        NEGOTIATE => CallEvent::Negotiate(Negotiate {
            common,
            description: o.any_description("description")?,
            lifetime_ms: o.opt_u64("lifetime")?,
            metadata: o.metadata()?,
        }),
        SDP_STREAM_METADATA_CHANGED => {
            let metadata = o.metadata()?.ok_or_else(|| o.missing(METADATA_KEY))?;
            CallEvent::SdpStreamMetadataChanged(MetadataChanged { common, metadata })
        }
        HANGUP => CallEvent::Hangup(HangupOrReject {
            common,
            reason: o.opt_id("reason")?,
        }),
        REJECT => CallEvent::Reject(HangupOrReject {
            common,
            reason: o.opt_id("reason")?,
        }),
        REPLACES => CallEvent::Replaces(common),
        _ => CallEvent::AssertedIdentity(common),
    })
}

/// A JSON object being parsed, with the path prefix used in error messages.
struct Obj<'a> {
    ty: &'static str,
    limits: &'a ParseLimits,
    map: &'a Map<String, Value>,
    prefix: String,
}

impl<'a> Obj<'a> {
    fn path(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    fn missing(&self, key: &str) -> ParseError {
        ParseError::MissingField {
            event_type: self.ty,
            field: self.path(key),
        }
    }

    fn wrong(&self, key: &str, expected: &'static str) -> ParseError {
        ParseError::WrongType {
            event_type: self.ty,
            field: self.path(key),
            expected,
        }
    }

    /// The value under `key`, with JSON `null` treated as absent.
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn child(&self, key: &str) -> Result<Option<Obj<'a>>, ParseError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Object(map)) => Ok(Some(Obj {
                ty: self.ty,
                limits: self.limits,
                map,
                prefix: format!("{}.", self.path(key)),
            })),
            Some(_) => Err(self.wrong(key, "an object")),
        }
    }

    fn opt_str(&self, key: &str, max: usize) -> Result<Option<&'a str>, ParseError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) if s.len() > max => Err(ParseError::TooLong {
                event_type: self.ty,
                field: self.path(key),
                len: s.len(),
                max,
            }),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(self.wrong(key, "a string")),
        }
    }

    fn opt_id(&self, key: &str) -> Result<Option<String>, ParseError> {
        Ok(self
            .opt_str(key, self.limits.max_id_bytes)?
            .map(str::to_owned))
    }

    fn req_id(&self, key: &str) -> Result<String, ParseError> {
        let s = self
            .opt_str(key, self.limits.max_id_bytes)?
            .ok_or_else(|| self.missing(key))?;
        if s.is_empty() {
            return Err(ParseError::Empty {
                event_type: self.ty,
                field: self.path(key),
            });
        }
        Ok(s.to_owned())
    }

    fn opt_u64(&self, key: &str) -> Result<Option<u64>, ParseError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| self.wrong(key, "a non-negative integer")),
        }
    }

    fn req_u64(&self, key: &str) -> Result<u64, ParseError> {
        self.opt_u64(key)?.ok_or_else(|| self.missing(key))
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>, ParseError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(self.wrong(key, "a boolean")),
        }
    }

    fn common(&self) -> Result<CallCommon, ParseError> {
        let call_id = CallId(self.req_id("call_id")?);
        let version = match self.get("version") {
            None => return Err(self.missing("version")),
            Some(Value::String(s)) if s == "1" => VoipVersion::V1,
            Some(Value::Number(n)) if n.as_u64() == Some(0) => VoipVersion::V0,
            Some(v @ (Value::String(_) | Value::Number(_))) => {
                let mut found = v.to_string();
                found.truncate(32);
                return Err(ParseError::UnsupportedVersion {
                    event_type: self.ty,
                    found,
                });
            }
            Some(_) => return Err(self.wrong("version", "the string \"1\" or the integer 0")),
        };
        let party_id = match version {
            // js-sdk ignores a v0 event's party_id (partyIdMatches), so it can't identify anyone.
            VoipVersion::V0 => None,
            VoipVersion::V1 => Some(PartyId(self.req_id("party_id")?)),
        };
        Ok(CallCommon {
            call_id,
            party_id,
            version,
        })
    }

    fn sdp(&self, key: &str) -> Result<String, ParseError> {
        let sdp = self
            .opt_str(key, self.limits.max_sdp_bytes)?
            .ok_or_else(|| self.missing(key))?;
        if sdp.trim().is_empty() {
            return Err(ParseError::Empty {
                event_type: self.ty,
                field: self.path(key),
            });
        }
        Ok(sdp.to_owned())
    }

    fn sdp_type(&self) -> Result<SdpType, ParseError> {
        match self.opt_str("type", self.limits.max_id_bytes)? {
            None => Err(self.missing("type")),
            Some("offer") => Ok(SdpType::Offer),
            Some("answer") => Ok(SdpType::Answer),
            Some(other) => Err(ParseError::WrongSdpType {
                event_type: self.ty,
                field: self.path("type"),
                expected: "offer\" or \"answer",
                found: other.to_owned(),
            }),
        }
    }

    /// `{type, sdp}` whose type must be `want`.
    fn description(&self, key: &str, want: SdpType) -> Result<SessionDescription, ParseError> {
        let d = self.child(key)?.ok_or_else(|| self.missing(key))?;
        let (expected, found) = match (&want, d.opt_str("type", self.limits.max_id_bytes)?) {
            (_, None) => return Err(d.missing("type")),
            (SdpType::Offer, Some("offer")) | (SdpType::Answer, Some("answer")) => {
                return Ok(SessionDescription {
                    kind: want,
                    sdp: d.sdp("sdp")?,
                })
            }
            (SdpType::Offer, Some(f)) => ("offer", f),
            (SdpType::Answer, Some(f)) => ("answer", f),
        };
        Err(ParseError::WrongSdpType {
            event_type: self.ty,
            field: d.path("type"),
            expected,
            found: found.to_owned(),
        })
    }

    fn any_description(&self, key: &str) -> Result<SessionDescription, ParseError> {
        let d = self.child(key)?.ok_or_else(|| self.missing(key))?;
        let kind = d.sdp_type()?;
        Ok(SessionDescription {
            kind,
            sdp: d.sdp("sdp")?,
        })
    }

    fn capabilities(&self) -> Result<Capabilities, ParseError> {
        let Some(c) = self.child("capabilities")? else {
            return Ok(Capabilities::default());
        };
        Ok(Capabilities {
            transferee: c.opt_bool("m.call.transferee")?.unwrap_or(false),
            dtmf: c.opt_bool("m.call.dtmf")?.unwrap_or(false),
        })
    }

    /// The stream metadata map under the stable key, else the unstable one.
    fn metadata(&self) -> Result<Option<SdpStreamMetadata>, ParseError> {
        let key = if self.get(METADATA_KEY).is_some() {
            METADATA_KEY
        } else {
            METADATA_KEY_UNSTABLE
        };
        let Some(m) = self.child(key)? else {
            return Ok(None);
        };
        if m.map.len() > self.limits.max_streams {
            return Err(ParseError::TooMany {
                event_type: self.ty,
                field: self.path(key),
                len: m.map.len(),
                max: self.limits.max_streams,
            });
        }
        let mut out = SdpStreamMetadata::new();
        for stream_id in m.map.keys() {
            if stream_id.len() > self.limits.max_id_bytes {
                return Err(ParseError::TooLong {
                    event_type: self.ty,
                    field: format!("{} key", self.path(key)),
                    len: stream_id.len(),
                    max: self.limits.max_id_bytes,
                });
            }
            let s = m
                .child(stream_id)?
                .ok_or_else(|| m.wrong(stream_id, "an object"))?;
            let purpose = match s.opt_str("purpose", self.limits.max_id_bytes)? {
                None => return Err(s.missing("purpose")),
                Some("m.usermedia") => StreamPurpose::Usermedia,
                Some("m.screenshare") => StreamPurpose::Screenshare,
                Some(other) => StreamPurpose::Other(other.to_owned()),
            };
            out.insert(
                stream_id.clone(),
                StreamMetadata {
                    purpose,
                    audio_muted: s.opt_bool("audio_muted")?.unwrap_or(false),
                    video_muted: s.opt_bool("video_muted")?.unwrap_or(false),
                },
            );
        }
        Ok(Some(out))
    }

    fn candidates(&self) -> Result<Vec<Candidate>, ParseError> {
        let list = match self.get("candidates") {
            None => return Err(self.missing("candidates")),
            Some(Value::Array(list)) => list,
            Some(_) => return Err(self.wrong("candidates", "an array")),
        };
        let max = self.limits.max_candidates_per_event;
        if list.len() > max {
            return Err(ParseError::TooMany {
                event_type: self.ty,
                field: self.path("candidates"),
                len: list.len(),
                max,
            });
        }
        let mut out = Vec::with_capacity(list.len());
        for (i, v) in list.iter().enumerate() {
            let key = format!("candidates[{i}]");
            let Value::Object(map) = v else {
                return Err(self.wrong(&key, "an object"));
            };
            let c = Obj {
                ty: self.ty,
                limits: self.limits,
                map,
                prefix: format!("{key}."),
            };
            let candidate = c
                .opt_str("candidate", self.limits.max_candidate_bytes)?
                .ok_or_else(|| c.missing("candidate"))?;
            let sdp_mline_index = match c.opt_u64("sdpMLineIndex")? {
                Some(n) => Some(
                    u16::try_from(n)
                        .map_err(|_| c.wrong("sdpMLineIndex", "an integer below 65536"))?,
                ),
                None => None,
            };
            out.push(Candidate {
                candidate: candidate.to_owned(),
                sdp_mid: c.opt_id("sdpMid")?,
                sdp_mline_index,
            });
        }
        Ok(out)
    }
}

// ---- What the bot sends. Every event carries call_id, party_id and version "1". ----

#[derive(Debug, Clone, Serialize)]
struct Base<'a> {
    call_id: &'a str,
    party_id: &'a str,
    version: &'static str,
}

#[derive(Debug, Clone, Serialize)]
struct DescriptionOut<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    sdp: &'a str,
}

/// The bot sends no media, so it declares no streams; the empty map (rather than no key) keeps
/// js-sdk from warning that it "can not send/receive multiple streams".
fn empty_metadata() -> BTreeMap<String, Value> {
    BTreeMap::new()
}

#[derive(Debug, Clone, Serialize)]
struct AnswerOut<'a> {
    #[serde(flatten)]
    base: Base<'a>,
    answer: DescriptionOut<'a>,
    capabilities: Capabilities,
    sdp_stream_metadata: BTreeMap<String, Value>,
}

#[derive(Debug, Clone, Serialize)]
struct NegotiateOut<'a> {
    #[serde(flatten)]
    base: Base<'a>,
    description: DescriptionOut<'a>,
    lifetime: u64,
    sdp_stream_metadata: BTreeMap<String, Value>,
}

#[derive(Debug, Clone, Serialize)]
struct InviteOut<'a> {
    #[serde(flatten)]
    base: Base<'a>,
    offer: DescriptionOut<'a>,
    lifetime: u64,
    invitee: &'a str,
    capabilities: Capabilities,
    sdp_stream_metadata: BTreeMap<String, Value>,
}

#[derive(Debug, Clone, Serialize)]
struct SelectAnswerOut<'a> {
    #[serde(flatten)]
    base: Base<'a>,
    selected_party_id: &'a str,
}

#[derive(Debug, Clone, Serialize)]
struct CandidatesOut<'a> {
    #[serde(flatten)]
    base: Base<'a>,
    candidates: &'a [Candidate],
}

#[derive(Debug, Clone, Serialize)]
struct ReasonOut<'a> {
    #[serde(flatten)]
    base: Base<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
}

fn base<'a>(call_id: &'a CallId, party_id: &'a PartyId) -> Base<'a> {
    Base {
        call_id: call_id.as_str(),
        party_id: party_id.as_str(),
        version: OUR_VERSION,
    }
}

fn to_value<T: Serialize>(t: &T) -> Value {
    // Plain structs of strings, bools and maps with string keys: serialisation can't fail.
    serde_json::to_value(t).expect("call event content serialises")
}

pub fn answer_content(call_id: &CallId, party_id: &PartyId, sdp: &str) -> Value {
    to_value(&AnswerOut {
        base: base(call_id, party_id),
        answer: DescriptionOut {
            kind: "answer",
            sdp,
        },
        capabilities: Capabilities::default(),
        sdp_stream_metadata: empty_metadata(),
    })
}

/// The invite of a call the bot places (mesh group calls): a receive-only offer to `invitee`.
pub fn invite_content(call_id: &CallId, party_id: &PartyId, sdp: &str, lifetime_ms: u64, invitee: &UserId) -> Value {
    to_value(&InviteOut {
        base: base(call_id, party_id),
        offer: DescriptionOut { kind: "offer", sdp },
        lifetime: lifetime_ms,
        invitee: invitee.as_str(),
        capabilities: Capabilities::default(),
        sdp_stream_metadata: empty_metadata(),
    })
}

/// The caller's choice among the answers: the one from `selected`.
pub fn select_answer_content(call_id: &CallId, party_id: &PartyId, selected: &PartyId) -> Value {
    to_value(&SelectAnswerOut { base: base(call_id, party_id), selected_party_id: selected.as_str() })
}

/// Our answer to a renegotiation offer; `lifetime` as js-sdk sends it (60 s).
pub fn negotiate_answer_content(call_id: &CallId, party_id: &PartyId, sdp: &str) -> Value {
    to_value(&NegotiateOut {
        base: base(call_id, party_id),
        description: DescriptionOut {
            kind: "answer",
            sdp,
        },
        lifetime: 60_000,
        sdp_stream_metadata: empty_metadata(),
    })
}

pub fn candidates_content(call_id: &CallId, party_id: &PartyId, candidates: &[Candidate]) -> Value {
    to_value(&CandidatesOut {
        base: base(call_id, party_id),
        candidates,
    })
}

pub fn hangup_content(call_id: &CallId, party_id: &PartyId, reason: Option<&str>) -> Value {
    to_value(&ReasonOut {
        base: base(call_id, party_id),
        reason,
    })
}

pub fn reject_content(call_id: &CallId, party_id: &PartyId, reason: Option<&str>) -> Value {
    to_value(&ReasonOut {
        base: base(call_id, party_id),
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SDP: &str = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n";

    fn invite_json() -> Value {
        json!({
            "call_id": "c1", "party_id": "ALICEDEV", "version": "1", "lifetime": 60000,
            "offer": {"type": "offer", "sdp": SDP},
            "capabilities": {"m.call.transferee": false, "m.call.dtmf": false},
            "org.matrix.msc3077.sdp_stream_metadata": {
                "s1": {"purpose": "m.usermedia", "audio_muted": false, "video_muted": true}
            }
        })
    }

    #[test]
    fn parses_a_js_sdk_invite_with_unstable_metadata_key() {
        let CallEvent::Invite(inv) = parse(INVITE, &invite_json()).unwrap() else {
            panic!()
        };
        assert_eq!(inv.common.call_id, CallId::from("c1"));
        assert_eq!(inv.common.party_id, Some(PartyId::from("ALICEDEV")));
        assert_eq!(inv.common.version, VoipVersion::V1);
        assert_eq!(inv.lifetime_ms, 60000);
        assert_eq!(inv.offer_sdp, SDP);
        let m = inv.metadata.unwrap();
        assert_eq!(
            m["s1"],
            StreamMetadata {
                purpose: StreamPurpose::Usermedia,
                audio_muted: false,
                video_muted: true
            }
        );
    }

    #[test]
    fn stable_metadata_key_wins_over_unstable() {
        let mut v = invite_json();
        v["sdp_stream_metadata"] = json!({"s2": {"purpose": "m.screenshare"}});
        let CallEvent::Invite(inv) = parse(INVITE, &v).unwrap() else {
            panic!()
        };
        let m = inv.metadata.unwrap();
        assert_eq!(m.keys().collect::<Vec<_>>(), vec!["s2"]);
        assert_eq!(m["s2"].purpose, StreamPurpose::Screenshare);
        assert!(!m["s2"].audio_muted && !m["s2"].video_muted);
    }

    #[test]
    fn version_0_has_no_party_id_and_ignores_a_sent_one() {
        let v = json!({"call_id": "c0", "version": 0, "lifetime": 60000, "party_id": "X",
                       "offer": {"type": "offer", "sdp": SDP}});
        let CallEvent::Invite(inv) = parse(INVITE, &v).unwrap() else {
            panic!()
        };
        assert_eq!(inv.common.version, VoipVersion::V0);
        assert_eq!(inv.common.party_id, None);
        let h = parse(HANGUP, &json!({"call_id": "c0", "version": 0})).unwrap();
        assert_eq!(
            h,
            CallEvent::Hangup(HangupOrReject {
                common: inv.common,
                reason: None
            })
        );
    }

    #[test]
    fn rejects_bad_versions() {
        let mut v = invite_json();
        v["version"] = json!("2");
        assert_eq!(
            parse(INVITE, &v),
            Err(ParseError::UnsupportedVersion {
                event_type: INVITE,
                found: "\"2\"".into()
            })
        );
        v["version"] = json!(1);
        assert!(matches!(
            parse(INVITE, &v),
            Err(ParseError::UnsupportedVersion { .. })
        ));
        v["version"] = json!(true);
        assert!(
            matches!(parse(INVITE, &v), Err(ParseError::WrongType { field, .. }) if field == "version")
        );
        v.as_object_mut().unwrap().remove("version");
        assert!(
            matches!(parse(INVITE, &v), Err(ParseError::MissingField { field, .. }) if field == "version")
        );
    }

    #[test]
    fn rejects_missing_call_id_and_party_id() {
        let mut v = invite_json();
        v.as_object_mut().unwrap().remove("call_id");
        assert_eq!(
            parse(INVITE, &v),
            Err(ParseError::MissingField {
                event_type: INVITE,
                field: "call_id".into()
            })
        );
        let mut v = invite_json();
        v["call_id"] = json!("");
        assert_eq!(
            parse(INVITE, &v),
            Err(ParseError::Empty {
                event_type: INVITE,
                field: "call_id".into()
            })
        );
        let mut v = invite_json();
        v["call_id"] = json!(42);
        assert_eq!(
            parse(INVITE, &v),
            Err(ParseError::WrongType {
                event_type: INVITE,
                field: "call_id".into(),
                expected: "a string"
            })
        );
        let mut v = invite_json();
        v.as_object_mut().unwrap().remove("party_id");
        assert_eq!(
            parse(INVITE, &v),
            Err(ParseError::MissingField {
                event_type: INVITE,
                field: "party_id".into()
            })
        );
    }

    #[test]
    fn rejects_bad_offers() {
        let mut v = invite_json();
        v["offer"]["type"] = json!("answer");
        assert_eq!(
            parse(INVITE, &v),
            Err(ParseError::WrongSdpType {
                event_type: INVITE,
                field: "offer.type".into(),
                expected: "offer",
                found: "answer".into()
            })
        );
        let mut v = invite_json();
        v["offer"]["sdp"] = json!("  ");
        assert_eq!(
            parse(INVITE, &v),
            Err(ParseError::Empty {
                event_type: INVITE,
                field: "offer.sdp".into()
            })
        );
        let mut v = invite_json();
        v["offer"]["sdp"] = json!(7);
        assert!(
            matches!(parse(INVITE, &v), Err(ParseError::WrongType { field, .. }) if field == "offer.sdp")
        );
        let mut v = invite_json();
        v["offer"] = json!("v=0");
        assert!(
            matches!(parse(INVITE, &v), Err(ParseError::WrongType { field, expected: "an object", .. }) if field == "offer")
        );
        let mut v = invite_json();
        v.as_object_mut().unwrap().remove("offer");
        assert!(
            matches!(parse(INVITE, &v), Err(ParseError::MissingField { field, .. }) if field == "offer")
        );
        let mut v = invite_json();
        v["offer"]["sdp"] = json!("a".repeat(256 * 1024 + 1));
        assert_eq!(
            parse(INVITE, &v),
            Err(ParseError::TooLong {
                event_type: INVITE,
                field: "offer.sdp".into(),
                len: 256 * 1024 + 1,
                max: 256 * 1024
            })
        );
    }

    #[test]
    fn rejects_wrong_types_elsewhere() {
        let mut v = invite_json();
        v["lifetime"] = json!("60000");
        assert!(
            matches!(parse(INVITE, &v), Err(ParseError::WrongType { field, .. }) if field == "lifetime")
        );
        let mut v = invite_json();
        v["lifetime"] = json!(-1);
        assert!(
            matches!(parse(INVITE, &v), Err(ParseError::WrongType { field, .. }) if field == "lifetime")
        );
        let mut v = invite_json();
        v["invitee"] = json!(["@bot:x"]);
        assert!(
            matches!(parse(INVITE, &v), Err(ParseError::WrongType { field, .. }) if field == "invitee")
        );
        let mut v = invite_json();
        v["capabilities"]["m.call.dtmf"] = json!("no");
        assert!(
            matches!(parse(INVITE, &v), Err(ParseError::WrongType { field, .. }) if field == "capabilities.m.call.dtmf")
        );
        let mut v = invite_json();
        v["org.matrix.msc3077.sdp_stream_metadata"]["s1"]["audio_muted"] = json!(1);
        assert!(matches!(
            parse(INVITE, &v),
            Err(ParseError::WrongType { field, .. }) if field == "org.matrix.msc3077.sdp_stream_metadata.s1.audio_muted"
        ));
        let mut v = invite_json();
        v["org.matrix.msc3077.sdp_stream_metadata"]["s1"] = json!({"audio_muted": true});
        assert!(
            matches!(parse(INVITE, &v), Err(ParseError::MissingField { field, .. }) if field.ends_with("s1.purpose"))
        );
        assert_eq!(
            parse(INVITE, &json!([])),
            Err(ParseError::NotAnObject { event_type: INVITE })
        );
        assert_eq!(
            parse("m.room.message", &json!({})),
            Err(ParseError::UnknownEventType("m.room.message".into()))
        );
    }

    #[test]
    fn candidates_parse_with_null_mid_end_marker_and_bounds() {
        let v = json!({"call_id": "c1", "party_id": "P", "version": "1", "candidates": [
            {"candidate": "candidate:1 1 udp 2122260223 127.0.0.1 50000 typ host", "sdpMid": "0", "sdpMLineIndex": 0},
            {"candidate": "", "sdpMid": null, "sdpMLineIndex": null}
        ]});
        let CallEvent::Candidates(c) = parse(CANDIDATES, &v).unwrap() else {
            panic!()
        };
        assert_eq!(c.candidates.len(), 2);
        assert_eq!(c.candidates[0].sdp_mid.as_deref(), Some("0"));
        assert!(c.candidates[1].is_end_of_candidates());
        assert_eq!(c.candidates[1].sdp_mid, None);

        let many: Vec<Value> = (0..101)
            .map(|_| json!({"candidate": "candidate:x"}))
            .collect();
        let v = json!({"call_id": "c1", "party_id": "P", "version": "1", "candidates": many});
        assert_eq!(
            parse(CANDIDATES, &v),
            Err(ParseError::TooMany {
                event_type: CANDIDATES,
                field: "candidates".into(),
                len: 101,
                max: 100
            })
        );
        let v = json!({"call_id": "c1", "party_id": "P", "version": "1", "candidates": [{"candidate": "x", "sdpMLineIndex": "0"}]});
        assert!(
            matches!(parse(CANDIDATES, &v), Err(ParseError::WrongType { field, .. }) if field == "candidates[0].sdpMLineIndex")
        );
        let v = json!({"call_id": "c1", "party_id": "P", "version": "1", "candidates": {}});
        assert!(
            matches!(parse(CANDIDATES, &v), Err(ParseError::WrongType { field, .. }) if field == "candidates")
        );
        let v = json!({"call_id": "c1", "party_id": "P", "version": "1", "candidates": [{"sdpMid": "0"}]});
        assert!(
            matches!(parse(CANDIDATES, &v), Err(ParseError::MissingField { field, .. }) if field == "candidates[0].candidate")
        );
    }

    #[test]
    fn other_event_types_parse() {
        let base = json!({"call_id": "c1", "party_id": "P", "version": "1"});
        let with = |extra: Value| {
            let mut v = base.clone();
            v.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            v
        };
        assert!(
            matches!(parse(SELECT_ANSWER, &with(json!({"selected_party_id": "B"}))),
            Ok(CallEvent::SelectAnswer(s)) if s.selected_party_id == PartyId::from("B"))
        );
        assert!(
            matches!(parse(SELECT_ANSWER, &base), Err(ParseError::MissingField { field, .. }) if field == "selected_party_id")
        );
        assert!(
            matches!(parse(NEGOTIATE, &with(json!({"description": {"type": "offer", "sdp": SDP}, "lifetime": 60000}))),
            Ok(CallEvent::Negotiate(n)) if n.description.kind == SdpType::Offer && n.lifetime_ms == Some(60000))
        );
        assert!(
            matches!(parse(NEGOTIATE, &with(json!({"description": {"type": "pranswer", "sdp": SDP}}))),
            Err(ParseError::WrongSdpType { field, .. }) if field == "description.type")
        );
        assert!(
            matches!(parse(SDP_STREAM_METADATA_CHANGED_UNSTABLE, &with(json!({"sdp_stream_metadata": {}}))),
            Ok(CallEvent::SdpStreamMetadataChanged(m)) if m.metadata.is_empty())
        );
        assert!(
            matches!(parse(SDP_STREAM_METADATA_CHANGED, &base), Err(ParseError::MissingField { field, .. }) if field == "sdp_stream_metadata")
        );
        assert!(
            matches!(parse(HANGUP, &with(json!({"reason": "user_hangup"}))),
            Ok(CallEvent::Hangup(h)) if h.reason.as_deref() == Some("user_hangup"))
        );
        assert!(matches!(parse(REJECT, &base), Ok(CallEvent::Reject(r)) if r.reason.is_none()));
        assert!(matches!(
            parse(
                ANSWER,
                &with(json!({"answer": {"type": "offer", "sdp": SDP}}))
            ),
            Err(ParseError::WrongSdpType {
                expected: "answer",
                ..
            })
        ));
        assert!(matches!(parse(REPLACES, &base), Ok(CallEvent::Replaces(_))));
        assert!(matches!(
            parse(ASSERTED_IDENTITY_UNSTABLE, &base),
            Ok(CallEvent::AssertedIdentity(_))
        ));
    }

    #[test]
    fn sent_contents_have_the_js_sdk_shape() {
        let (c, p) = (CallId::from("c1"), PartyId::from("BOT"));
        assert_eq!(
            answer_content(&c, &p, "v=0"),
            json!({"call_id": "c1", "party_id": "BOT", "version": "1",
                   "answer": {"type": "answer", "sdp": "v=0"},
                   "capabilities": {"m.call.transferee": false, "m.call.dtmf": false},
                   "sdp_stream_metadata": {}})
        );
        assert_eq!(
            candidates_content(
                &c,
                &p,
                &[Candidate {
                    candidate: "".into(),
                    sdp_mid: None,
                    sdp_mline_index: None
                }]
            ),
            json!({"call_id": "c1", "party_id": "BOT", "version": "1", "candidates": [{"candidate": ""}]})
        );
        assert_eq!(
            reject_content(&c, &p, None),
            json!({"call_id": "c1", "party_id": "BOT", "version": "1"})
        );
        // Everything we send parses back.
        assert!(parse(ANSWER, &answer_content(&c, &p, "v=0")).is_ok());
        assert!(parse(NEGOTIATE, &negotiate_answer_content(&c, &p, "v=0")).is_ok());
        assert!(parse(HANGUP, &hangup_content(&c, &p, Some("user_hangup"))).is_ok());
    }
}
