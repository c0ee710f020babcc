//! Matrix 1:1 VoIP signalling (`m.call.*` room events, VoIP version "1" and legacy 0) for the
//! recording bot, as pure state machines: room events, peer-connection events and `now` go in,
//! actions come out (events to send, commands for the WebRTC edge, recording actions, log lines).
//! Nothing here touches a socket, a clock or a Matrix/WebRTC type, so every protocol rule is a
//! unit test.
//!
//! The bot is always the callee, never sends media and never makes an offer (so it is the polite
//! side of "perfect negotiation" and glare cannot happen).
//!
//! - [`events`]: the wire format — strict parsing of incoming content into [`CallEvent`] with a
//!   typed [`ParseError`] per rejection, and the serde types of what the bot sends.
//! - [`call`]: [`Voip1Call`], the life of one call: invite → answer (after ICE gathering, with the
//!   candidates inside the SDP) → select_answer / media → renegotiations → hangup.
//! - [`calls`]: [`Voip1Calls`], the bot-wide dispatcher: parses room events, drops what is not for
//!   us (expired, someone else's, our echo, unknown calls, group rooms), keeps one call per room,
//!   and routes everything else to the call by room and call id.
//!
//! Time is milliseconds since the Unix epoch ([`UnixMs`]) because that is what
//! `origin_server_ts` and `lifetime` are measured in.

pub mod call;
pub mod calls;
pub mod events;

pub use call::{
    Action, CallInput, CallState, IgnoreReason, PeerCommand, PeerEvent, PeerFailure, Purpose,
    RecordAction, RemoteCandidate, Role, StopReason, Timeout, TrackKind, Voip1Call,
};
pub use calls::{Input, Output, RoomEvent, Voip1Calls};
pub use events::{parse, parse_with, CallEvent, ParseError, ParseLimits, VoipVersion};

use std::fmt;

macro_rules! id_newtype {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(pub String);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                Self(s.to_owned())
            }
        }

        impl From<String> for $name {
            fn from(s: String) -> Self {
                Self(s)
            }
        }
    };
}

id_newtype!(
    /// `call_id` of an `m.call.*` event: chosen by the caller, shared by both sides.
    CallId
);
id_newtype!(
    /// `party_id`: one per client instance and call (matrix-js-sdk uses its device id).
    PartyId
);
id_newtype!(
    /// A Matrix user id (`@user:server`).
    UserId
);
id_newtype!(
    /// A Matrix room id (`!opaque:server`).
    RoomId
);

/// Wall-clock time in milliseconds since the Unix epoch, the unit of `origin_server_ts`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct UnixMs(pub u64);

impl UnixMs {
    pub fn plus(self, ms: u64) -> UnixMs {
        UnixMs(self.0.saturating_add(ms))
    }

    /// Milliseconds from `earlier` to `self`, 0 if `earlier` is later.
    pub fn since(self, earlier: UnixMs) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

/// Protocol knobs for the 1:1 call machines. Defaults follow matrix-js-sdk's timing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Voip1Config {
    /// Remote candidates accepted per call (end-of-candidates markers not counted); beyond it
    /// candidates are dropped and one warning is emitted.
    pub max_remote_candidates: usize,
    /// Local candidates gathered after the answer are trickled in batches: a batch goes out on
    /// the first `Tick` this long after its first candidate (js-sdk batches for ~200 ms too).
    pub candidate_batch_ms: u64,
    /// `CreateAnswer` (initial or renegotiation) must be followed by `AnswerCreated` within this;
    /// else the call is hung up (`unknown_error`).
    pub answer_timeout_ms: u64,
    /// After the answer is sent, the peer connection must report `PeerConnected` within this;
    /// else hangup `ice_failed` (js-sdk gives up on ICE after 30 s too).
    pub connect_timeout_ms: u64,
    /// After the answer is sent, a v1 caller must confirm us — `select_answer` naming our party,
    /// or media arriving — within this; else hangup `unknown_error`. Not applied to version 0
    /// callers, which never send `select_answer`.
    pub select_answer_timeout_ms: u64,
    /// Tolerance subtracted from an invite's lifetime when judging expiry on arrival
    /// (js-sdk's `RING_GRACE_PERIOD`): an invite that is about to expire is not worth answering.
    pub invite_grace_ms: u64,
    /// Candidate events for call ids we don't know yet are held this long (and at most
    /// `max_remote_candidates` per call id, for at most 8 call ids) in case the invite follows.
    pub orphan_candidates_ttl_ms: u64,
    /// Wire-format bounds.
    pub limits: ParseLimits,
}

impl Default for Voip1Config {
    fn default() -> Self {
        Self {
            max_remote_candidates: 200,
            candidate_batch_ms: 200,
            answer_timeout_ms: 10_000,
            connect_timeout_ms: 30_000,
            select_answer_timeout_ms: 30_000,
            invite_grace_ms: 3_000,
            orphan_candidates_ttl_ms: 10_000,
            limits: ParseLimits::default(),
        }
    }
}

#[cfg(test)]
mod tests;
