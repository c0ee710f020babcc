//! One 1:1 call as the callee, from a valid invite to its end.
//!
//! The machine is created from an invite the dispatcher has already vetted (for us, not expired,
//! a DM, not busy). It immediately asks the WebRTC edge to apply the offer and create an answer;
//! everything after that is driven by inputs. The contract with the edge:
//!
//! - Peer commands are executed **in order** by the one task that owns the peer connection, so
//!   `AddRemoteCandidates` emitted after `ApplyRemoteOffer` always finds the remote description
//!   set. (Candidates that arrive before the invite is known are held by the dispatcher and
//!   replayed after the offer.)
//! - `CreateAnswer` means: create the answer, set it as local description, wait (bounded, e.g.
//!   2 s) for ICE gathering to complete, then report `AnswerCreated` with the **current local
//!   description** — which then carries every candidate gathered so far and, when gathering
//!   finished, `a=end-of-candidates`. aiortc only learns candidates from the SDP, so the answer
//!   waits for gathering; anything gathered later is trickled.
//! - Local candidates are never sent before the answer. After it, candidates already present in
//!   the answer SDP are dropped, the rest are batched: a batch goes out on the first `Tick`
//!   `candidate_batch_ms` after its first candidate, or at once on `GatheringComplete` together
//!   with the end-of-candidates marker (`{"candidate": ""}`, as js-sdk sends it). An empty
//!   `sdpMid` (webrtc-rs always reports `""`) is replaced by the first `a=mid` of our SDP.
//!
//! Declining follows what js-sdk accepts: before our answer is sent the caller only honours
//! `m.call.reject` (it ignores a hangup from a party it hasn't chosen), after it only
//! `m.call.hangup`; to a version 0 caller both are a hangup.
//!
//! Mesh group calls (MSC3401) also need the other direction: [`Voip1Call::outgoing`] places a
//! call. The edge makes a receive-only offer (`CreateOffer` → `OfferCreated`), the invite goes
//! out, the first answer from the invitee is applied (`ApplyRemoteAnswer`) and selected
//! (`m.call.select_answer`); from then on the call is the same as an answered one, and the
//! invitee's renegotiation offers (a screen share) are answered as usual.
//!
//! Recording: `Record(Start)` is emitted when the answer goes out (or, for a placed call, comes in), and `Record(Stop)` exactly once
//! after it, whatever ends the call. Track labels and mute changes are emitted only in between.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;

use serde_json::Value;

use super::events::{
    self, CallCommon, CallEvent, Candidate, HangupOrReject, Invite, SdpStreamMetadata, SdpType,
    StreamMetadata, StreamPurpose, VoipVersion,
};
use super::{CallId, PartyId, UnixMs, UserId, Voip1Config};

pub use super::events::Candidate as RemoteCandidate;

/// Renegotiation offers waiting while an answer is being made; a caller never has more than one
/// outstanding, so more than this means something is broken.
const MAX_PENDING_OFFERS: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrackKind {
    Audio,
    Video,
}

/// What a track shows, from MSC3077 metadata. `Camera` is usermedia: camera *and* microphone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    Camera,
    Screen,
}

/// Why the peer connection gave up. Each maps to the js-sdk `CallErrorCode` sent as hangup reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerFailure {
    /// ICE (or DTLS) failed or stayed disconnected.
    Ice,
    SetRemoteDescription(String),
    CreateAnswer(String),
    CreateOffer(String),
    SetLocalDescription(String),
    Other(String),
}

impl PeerFailure {
    pub fn hangup_reason(&self) -> &'static str {
        match self {
            PeerFailure::Ice => "ice_failed",
            PeerFailure::SetRemoteDescription(_) => "set_remote_description",
            PeerFailure::CreateAnswer(_) => "create_answer",
            PeerFailure::CreateOffer(_) => "local_offer_failed",
            PeerFailure::SetLocalDescription(_) => "set_local_description",
            PeerFailure::Other(_) => "unknown_error",
        }
    }
}

/// Events from the WebRTC edge about this call's peer connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerEvent {
    LocalCandidate {
        candidate: String,
        sdp_mid: Option<String>,
        sdp_mline_index: Option<u16>,
    },
    GatheringComplete,
    /// Reply to `PeerCommand::CreateAnswer`: the local description after gathering.
    AnswerCreated {
        sdp: String,
    },
    /// Reply to `PeerCommand::CreateOffer`: the local description after gathering.
    OfferCreated {
        sdp: String,
    },
    PeerFailed {
        reason: PeerFailure,
    },
    /// ICE + DTLS connected.
    PeerConnected,
    /// First RTP of a remote track (msid stream id = the MSC3077 metadata key).
    TrackOpened {
        stream_id: String,
        track_id: String,
        kind: TrackKind,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallInput {
    /// A parsed call event of this call; `sender` is the Matrix sender.
    Event {
        sender: UserId,
        event: CallEvent,
        now: UnixMs,
    },
    Peer {
        event: PeerEvent,
        now: UnixMs,
    },
    /// The bot ends the call (recording stopped, shutdown).
    Stop {
        now: UnixMs,
    },
    Tick {
        now: UnixMs,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerCommand {
    ApplyRemoteOffer { sdp: String },
    AddRemoteCandidates(Vec<RemoteCandidate>),
    CreateAnswer,
    /// A receive-only offer for a call the bot places; reply `OfferCreated`.
    CreateOffer,
    ApplyRemoteAnswer {
        sdp: String,
    },
    Close,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// The caller hung up (reason as sent).
    RemoteHangup {
        reason: Option<String>,
    },
    /// The caller (or another device of the bot's user, before we answered) sent `m.call.reject`.
    RemoteReject,
    /// The caller selected another device's answer.
    AnsweredElsewhere,
    /// `Stop` input.
    LocalStop,
    PeerFailed(PeerFailure),
    Timeout(Timeout),
    /// The invite's lifetime ran out before our answer was ready.
    InviteExpired,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timeout {
    /// No `AnswerCreated` after `CreateAnswer`.
    Answer,
    /// No `OfferCreated` after `CreateOffer`.
    Offer,
    /// A placed call's invite was not answered within its lifetime.
    Invite,
    /// No `PeerConnected` after the answer.
    Connect,
    /// Neither `select_answer` nor media after the answer (v1 callers).
    SelectAnswer,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordAction {
    /// The call is ours: the answer has been sent.
    Start {
        caller: UserId,
        caller_party: Option<PartyId>,
        at: UnixMs,
    },
    /// Which purpose a remote track serves. Emitted when the track opens, and again if later
    /// metadata changes what is known about its stream (a track without metadata is `Camera`).
    TrackLabel {
        stream_id: String,
        track_id: String,
        kind: TrackKind,
        purpose: Purpose,
    },
    /// The mute state of a stream changed (initial state: unmuted). `at` is when we learned it.
    Muted {
        stream_id: String,
        audio_muted: bool,
        video_muted: bool,
        at: UnixMs,
    },
    Stop {
        reason: StopReason,
        at: UnixMs,
    },
}

/// Why an input was dropped. The caller logs these at debug level (except `Malformed`, worth a
/// warning, and `Busy`, worth an info line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IgnoreReason {
    /// Content failed to parse.
    Malformed(events::ParseError),
    /// Our own event coming back (our party_id).
    Echo,
    /// An invite sent by the bot's own user from another device.
    OwnInvite,
    NotForUs {
        invitee: UserId,
    },
    Expired {
        age_ms: u64,
        lifetime_ms: u64,
    },
    /// A 1:1 call needs exactly two joined members.
    NotOneToOne {
        joined_members: usize,
    },
    /// A second invite while a call is active in the room; it was declined with `user_busy`.
    Busy {
        active: CallId,
    },
    UnknownCall,
    /// Candidates for an unknown call id, held in case the invite follows.
    HeldForInvite,
    CallEnded,
    DuplicateInvite,
    /// From a party/sender that is not our chosen opponent.
    NotFromOpponent {
        sender: UserId,
        party_id: Option<PartyId>,
    },
    /// Another device of the bot's user answered; wait for the caller's select_answer.
    AnsweredByOtherDevice,
    /// A negotiate *answer*: the bot never offers, so there is nothing to answer.
    UnsolicitedNegotiateAnswer,
    /// An `AnswerCreated` nobody asked for.
    UnexpectedAnswerCreated,
    /// Transfer / asserted identity: recognised, not supported.
    Unsupported {
        event_type: &'static str,
    },
    /// An event that makes no sense in this call's state (e.g. an answer from the caller).
    NotApplicable {
        event_type: &'static str,
    },
}

impl fmt::Display for IgnoreReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IgnoreReason::Malformed(e) => write!(f, "malformed call event: {e}"),
            IgnoreReason::Echo => f.write_str("our own event (same party_id)"),
            IgnoreReason::OwnInvite => f.write_str("invite sent by the bot's own user"),
            IgnoreReason::NotForUs { invitee } => write!(f, "invite addressed to {invitee}"),
            IgnoreReason::Expired {
                age_ms,
                lifetime_ms,
            } => {
                write!(
                    f,
                    "invite expired (age {age_ms} ms, lifetime {lifetime_ms} ms)"
                )
            }
            IgnoreReason::NotOneToOne { joined_members } => {
                write!(
                    f,
                    "room has {joined_members} joined members, a 1:1 call needs 2"
                )
            }
            IgnoreReason::Busy { active } => write!(
                f,
                "call {active} already active in this room: declined as busy"
            ),
            IgnoreReason::UnknownCall => f.write_str("unknown call id"),
            IgnoreReason::HeldForInvite => {
                f.write_str("candidates for an unknown call id, held in case its invite follows")
            }
            IgnoreReason::CallEnded => f.write_str("call already ended"),
            IgnoreReason::DuplicateInvite => f.write_str("duplicate invite"),
            IgnoreReason::NotFromOpponent { sender, party_id } => {
                write!(
                    f,
                    "not from the caller (sender {sender}, party {party_id:?})"
                )
            }
            IgnoreReason::AnsweredByOtherDevice => {
                f.write_str("another device of ours answered; waiting for select_answer")
            }
            IgnoreReason::UnsolicitedNegotiateAnswer => {
                f.write_str("negotiate answer, but we never offer")
            }
            IgnoreReason::UnexpectedAnswerCreated => {
                f.write_str("answer created but none was requested")
            }
            IgnoreReason::Unsupported { event_type } => write!(f, "{event_type} is not supported"),
            IgnoreReason::NotApplicable { event_type } => {
                write!(f, "{event_type} does not apply to this call now")
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    SendRoomEvent {
        event_type: &'static str,
        content: Value,
    },
    Peer(PeerCommand),
    Record(RecordAction),
    Ignored(IgnoreReason),
    Warn(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallState {
    /// A call the bot places: offer being made, or invite sent and no answer yet.
    Inviting,
    /// Offer handed to the edge, answer not sent yet.
    Answering,
    /// Answer sent.
    Answered,
    Ended,
}

/// What the edge is currently making an answer for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AnswerFor {
    Invite,
    Negotiate,
}

#[derive(Debug)]
struct OpenTrack {
    stream_id: String,
    kind: TrackKind,
    labelled: Option<Purpose>,
}

/// Which side of the call the bot is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Callee,
    /// The bot placed the call (mesh group calls).
    Caller,
}

/// One call of the bot: the callee side of a 1:1 call, or either side of a mesh group call's
/// peer call. See the module documentation for the contract.
#[derive(Debug)]
pub struct Voip1Call {
    cfg: Voip1Config,
    call_id: CallId,
    bot: UserId,
    our_party: PartyId,
    role: Role,
    /// The other party: the caller, or the invitee of a call the bot placed.
    caller: UserId,
    /// Its party id: from the invite, or from the answer the bot selected.
    caller_party: Option<PartyId>,
    caller_version: VoipVersion,
    /// When the invite (theirs, or ours once sent) stops being valid.
    invite_expires_at: UnixMs,
    /// A placed call's offer is being made since then.
    making_offer: Option<UnixMs>,
    /// Lifetime of the invite the bot sends.
    invite_lifetime_ms: u64,

    state: CallState,
    /// The answer being made and since when.
    making_answer: Option<(AnswerFor, UnixMs)>,
    pending_offers: VecDeque<String>,
    answer_sent_at: Option<UnixMs>,
    local_sdp: Option<String>,
    selected: bool,
    connected: bool,

    local_queue: Vec<Candidate>,
    local_queue_since: Option<UnixMs>,
    gathering_complete: bool,
    end_of_candidates_sent: bool,

    remote_candidates: usize,
    flood_warned: bool,

    streams: SdpStreamMetadata,
    emitted_mutes: BTreeMap<String, (bool, bool)>,
    tracks: BTreeMap<String, OpenTrack>,
    recording: bool,
    /// Why the call ended, once it has.
    ended_by: Option<StopReason>,

    out: VecDeque<Action>,
}

impl Voip1Call {
    /// Starts answering `invite` (already vetted by the dispatcher). `invite_expires_at` is when
    /// the caller stops waiting (arrival time + lifetime − age).
    #[allow(clippy::too_many_arguments)]
    pub fn from_invite(
        cfg: Voip1Config,
        bot: UserId,
        our_party: PartyId,
        caller: UserId,
        invite: Invite,
        invite_expires_at: UnixMs,
        now: UnixMs,
    ) -> Self {
        let mut call = Voip1Call::blank(cfg, invite.common.call_id.clone(), bot, our_party, Role::Callee, caller);
        call.caller_party = invite.common.party_id.clone();
        call.caller_version = invite.common.version;
        call.invite_expires_at = invite_expires_at;
        call.making_answer = Some((AnswerFor::Invite, now));
        if let Some(m) = invite.metadata {
            call.merge_metadata(m);
        }
        call.peer(PeerCommand::ApplyRemoteOffer {
            sdp: invite.offer_sdp,
        });
        call.peer(PeerCommand::CreateAnswer);
        call
    }

    /// Places a call to `invitee` (whose group call the bot joined): asks the edge for a
    /// receive-only offer, then invites with it. The invite is valid for `invite_lifetime_ms`.
    pub fn outgoing(
        cfg: Voip1Config,
        bot: UserId,
        our_party: PartyId,
        invitee: UserId,
        call_id: CallId,
        invite_lifetime_ms: u64,
        now: UnixMs,
    ) -> Self {
        let mut call = Voip1Call::blank(cfg, call_id, bot, our_party, Role::Caller, invitee);
        call.state = CallState::Inviting;
        call.making_offer = Some(now);
        call.invite_lifetime_ms = invite_lifetime_ms;
        // The bot chooses the answer itself; nobody selects it.
        call.selected = true;
        call.peer(PeerCommand::CreateOffer);
        call
    }

    /// A call in its first state, before a constructor sets what its side needs.
    fn blank(cfg: Voip1Config, call_id: CallId, bot: UserId, our_party: PartyId, role: Role, caller: UserId) -> Self {
        Voip1Call {
            cfg,
            call_id,
            bot,
            our_party,
            role,
            caller,
            caller_party: None,
            caller_version: VoipVersion::V1,
            invite_expires_at: UnixMs(u64::MAX),
            making_offer: None,
            invite_lifetime_ms: 0,
            state: CallState::Answering,
            making_answer: None,
            pending_offers: VecDeque::new(),
            answer_sent_at: None,
            local_sdp: None,
            selected: false,
            connected: false,
            local_queue: Vec::new(),
            local_queue_since: None,
            gathering_complete: false,
            end_of_candidates_sent: false,
            remote_candidates: 0,
            flood_warned: false,
            streams: SdpStreamMetadata::new(),
            emitted_mutes: BTreeMap::new(),
            tracks: BTreeMap::new(),
            recording: false,
            ended_by: None,
            out: VecDeque::new(),
        }
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn call_id(&self) -> &CallId {
        &self.call_id
    }

    pub fn caller(&self) -> &UserId {
        &self.caller
    }

    pub fn state(&self) -> CallState {
        self.state
    }

    pub fn is_ended(&self) -> bool {
        self.state == CallState::Ended
    }

    /// Why the call ended; `None` while it runs.
    pub fn ended_by(&self) -> Option<&StopReason> {
        self.ended_by.as_ref()
    }

    pub fn poll_output(&mut self) -> Option<Action> {
        self.out.pop_front()
    }

    /// The earliest time a `Tick` can change anything, if any.
    pub fn next_deadline(&self) -> Option<UnixMs> {
        if self.is_ended() {
            return None;
        }
        let mut d: Vec<UnixMs> = Vec::new();
        if let Some(since) = self.making_offer {
            d.push(since.plus(self.cfg.answer_timeout_ms));
        }
        if self.state == CallState::Inviting && self.making_offer.is_none() {
            d.push(self.invite_expires_at);
        }
        if let Some((what, since)) = self.making_answer {
            d.push(since.plus(self.cfg.answer_timeout_ms));
            if what == AnswerFor::Invite {
                d.push(self.invite_expires_at);
            }
        }
        if let Some(at) = self.answer_sent_at {
            if !self.connected {
                d.push(at.plus(self.cfg.connect_timeout_ms));
            }
            if self.needs_selection() {
                d.push(at.plus(self.cfg.select_answer_timeout_ms));
            }
        }
        // The batch waits while a description is being made (`on_tick` does not flush then), so
        // its deadline counts only after: a past deadline would make the caller spin.
        if let Some(since) = self.local_queue_since.filter(|_| self.can_trickle()) {
            d.push(since.plus(self.cfg.candidate_batch_ms));
        }
        d.into_iter().min()
    }

    pub fn handle_input(&mut self, input: CallInput) {
        if self.is_ended() {
            // Late peer events and ticks after the end are normal; say nothing about them.
            if let CallInput::Event { .. } = input {
                self.ignored(IgnoreReason::CallEnded);
            }
            return;
        }
        match input {
            CallInput::Event { sender, event, now } => self.on_event(sender, event, now),
            CallInput::Peer { event, now } => self.on_peer(event, now),
            CallInput::Stop { now } => {
                self.decline_or_hang_up(None, "user_hangup", StopReason::LocalStop, now)
            }
            CallInput::Tick { now } => self.on_tick(now),
        }
    }

    // ---- room events ----

    fn on_event(&mut self, sender: UserId, event: CallEvent, now: UnixMs) {
        let common = event.common().clone();
        if common.party_id.as_ref() == Some(&self.our_party) {
            return self.ignored(IgnoreReason::Echo);
        }
        if sender == self.bot {
            return self.on_own_user_event(event, now);
        }
        if !self.is_opponent(&sender, &common) {
            return self.ignored(IgnoreReason::NotFromOpponent {
                sender,
                party_id: common.party_id,
            });
        }
        match event {
            CallEvent::Invite(_) => self.ignored(IgnoreReason::DuplicateInvite),
            CallEvent::Candidates(c) => self.on_remote_candidates(c.candidates),
            CallEvent::SelectAnswer(s) => {
                if s.selected_party_id == self.our_party {
                    self.selected = true;
                } else {
                    self.end(now, None, StopReason::AnsweredElsewhere);
                }
            }
            CallEvent::Negotiate(n) => {
                if let Some(m) = n.metadata {
                    self.merge_metadata(m);
                }
                match n.description.kind {
                    SdpType::Offer => self.on_remote_offer(n.description.sdp, now),
                    SdpType::Answer => self.ignored(IgnoreReason::UnsolicitedNegotiateAnswer),
                }
            }
            CallEvent::SdpStreamMetadataChanged(m) => {
                self.merge_metadata(m.metadata);
                self.sync_recording(now);
            }
            CallEvent::Hangup(HangupOrReject { reason, .. }) => {
                self.end(now, None, StopReason::RemoteHangup { reason })
            }
            CallEvent::Reject(_) => self.end(now, None, StopReason::RemoteReject),
            CallEvent::Answer(a)
                if self.role == Role::Caller
                    && self.state == CallState::Inviting
                    && self.making_offer.is_none() =>
            {
                self.on_answer(a, now)
            }
            CallEvent::Answer(_) => self.ignored(IgnoreReason::NotApplicable {
                event_type: events::ANSWER,
            }),
            CallEvent::Replaces(_) => self.ignored(IgnoreReason::Unsupported {
                event_type: events::REPLACES,
            }),
            CallEvent::AssertedIdentity(_) => self.ignored(IgnoreReason::Unsupported {
                event_type: events::ASSERTED_IDENTITY,
            }),
        }
    }

    /// Events from another device of the bot's own user (ours were filtered as echo).
    fn on_own_user_event(&mut self, event: CallEvent, now: UnixMs) {
        match event {
            // Another device got there first; nothing of ours reached the caller, so leave quietly.
            CallEvent::Answer(_) if self.state == CallState::Answering => {
                self.end(now, None, StopReason::AnsweredElsewhere)
            }
            CallEvent::Answer(_) => self.ignored(IgnoreReason::AnsweredByOtherDevice),
            CallEvent::Reject(_) if self.state == CallState::Answering => {
                self.end(now, None, StopReason::RemoteReject)
            }
            other => self.ignored(IgnoreReason::NotApplicable {
                event_type: other.event_type(),
            }),
        }
    }

    /// js-sdk's `partyIdMatches`: version 0 messages count as party-less, and must match a
    /// party-less (version 0) opponent; the sender must be the caller as well.
    fn is_opponent(&self, sender: &UserId, c: &CallCommon) -> bool {
        let party = match c.version {
            VoipVersion::V0 => None,
            VoipVersion::V1 => c.party_id.as_ref(),
        };
        if self.role == Role::Caller && self.state == CallState::Inviting {
            // Any device of the invitee may answer (and send candidates) until one is chosen.
            return *sender == self.caller;
        }
        *sender == self.caller && party == self.caller_party.as_ref()
    }

    /// Local candidates may go out: our description is out and none is being made.
    fn can_trickle(&self) -> bool {
        self.local_sdp.is_some() && self.making_answer.is_none() && self.making_offer.is_none()
    }

    /// The invitee answered a call the bot placed: choose that answer and start recording.
    fn on_answer(&mut self, a: events::Answer, now: UnixMs) {
        let party = a.common.party_id.clone();
        self.caller_party = party.clone();
        self.caller_version = a.common.version;
        if let Some(m) = a.metadata {
            self.merge_metadata(m);
        }
        if let (VoipVersion::V1, Some(p)) = (a.common.version, party.as_ref()) {
            let content = events::select_answer_content(&self.call_id, &self.our_party, p);
            self.send(events::SELECT_ANSWER, content);
        }
        self.peer(PeerCommand::ApplyRemoteAnswer { sdp: a.answer_sdp });
        self.answered(now);
        let force = self.gathering_complete;
        self.flush_local_candidates(force);
    }

    /// The offer/answer exchange is done (our answer sent, or theirs to our invite applied):
    /// the call is ours and its recording starts.
    fn answered(&mut self, now: UnixMs) {
        self.state = CallState::Answered;
        self.answer_sent_at = Some(now);
        self.recording = true;
        self.out.push_back(Action::Record(RecordAction::Start {
            caller: self.caller.clone(),
            caller_party: self.caller_party.clone(),
            at: now,
        }));
        self.sync_recording(now);
    }

    fn on_remote_candidates(&mut self, candidates: Vec<Candidate>) {
        let mut accepted = Vec::new();
        let mut dropped = 0usize;
        // End-of-candidates markers carry nothing webrtc-rs uses; don't count or forward them.
        for c in candidates.into_iter().filter(|c| !c.is_end_of_candidates()) {
            if self.remote_candidates >= self.cfg.max_remote_candidates {
                dropped += 1;
            } else {
                self.remote_candidates += 1;
                accepted.push(c);
            }
        }
        if dropped > 0 && !self.flood_warned {
            self.flood_warned = true;
            self.warn(format!(
                "call {}: more than {} remote ICE candidates; dropping the rest",
                self.call_id, self.cfg.max_remote_candidates
            ));
        }
        if !accepted.is_empty() {
            self.peer(PeerCommand::AddRemoteCandidates(accepted));
        }
    }

    fn on_remote_offer(&mut self, sdp: String, now: UnixMs) {
        if self.making_answer.is_some() {
            if self.pending_offers.len() >= MAX_PENDING_OFFERS {
                self.pending_offers.pop_front();
                self.warn(format!(
                    "call {}: renegotiation offers pile up; dropping the oldest",
                    self.call_id
                ));
            }
            self.pending_offers.push_back(sdp);
            return;
        }
        self.start_negotiation(sdp, now);
    }

    fn start_negotiation(&mut self, sdp: String, now: UnixMs) {
        // An ICE restart gathers anew and ends with another GatheringComplete.
        self.gathering_complete = false;
        self.end_of_candidates_sent = false;
        self.making_answer = Some((AnswerFor::Negotiate, now));
        self.peer(PeerCommand::ApplyRemoteOffer { sdp });
        self.peer(PeerCommand::CreateAnswer);
    }

    // ---- peer events ----

    fn on_peer(&mut self, event: PeerEvent, now: UnixMs) {
        match event {
            PeerEvent::LocalCandidate {
                candidate,
                sdp_mid,
                sdp_mline_index,
            } => {
                if candidate.is_empty() {
                    return self.on_gathering_complete(now);
                }
                if self.local_queue.is_empty() {
                    self.local_queue_since = Some(now);
                }
                self.local_queue.push(Candidate {
                    candidate,
                    sdp_mid,
                    sdp_mline_index,
                });
            }
            PeerEvent::GatheringComplete => self.on_gathering_complete(now),
            PeerEvent::AnswerCreated { sdp } => self.on_answer_created(sdp, now),
            PeerEvent::OfferCreated { sdp } => self.on_offer_created(sdp, now),
            PeerEvent::PeerFailed { reason } => {
                let code = reason.hangup_reason();
                self.decline_or_hang_up(Some(code), code, StopReason::PeerFailed(reason), now)
            }
            PeerEvent::PeerConnected => self.connected = true,
            PeerEvent::TrackOpened {
                stream_id,
                track_id,
                kind,
            } => {
                // Media from the caller proves it chose our answer.
                self.selected = true;
                self.connected = true;
                self.tracks.insert(
                    track_id,
                    OpenTrack {
                        stream_id,
                        kind,
                        labelled: None,
                    },
                );
                self.sync_recording(now);
            }
        }
    }

    fn on_answer_created(&mut self, sdp: String, now: UnixMs) {
        let Some((what, _)) = self.making_answer.take() else {
            return self.ignored(IgnoreReason::UnexpectedAnswerCreated);
        };
        match what {
            AnswerFor::Invite => {
                if now >= self.invite_expires_at {
                    // The caller has hung up with invite_timeout by now; an answer would be noise.
                    self.warn(format!(
                        "call {}: invite expired before the answer was ready",
                        self.call_id
                    ));
                    return self.end(now, None, StopReason::InviteExpired);
                }
                let content = events::answer_content(&self.call_id, &self.our_party, &sdp);
                self.send(events::ANSWER, content);
                self.answered(now);
            }
            AnswerFor::Negotiate => {
                let content =
                    events::negotiate_answer_content(&self.call_id, &self.our_party, &sdp);
                self.send(events::NEGOTIATE, content);
            }
        }
        self.local_sdp = Some(sdp);
        // Whatever was gathered but is not in the SDP goes out now.
        let force = self.gathering_complete;
        self.flush_local_candidates(force);
        if let Some(next) = self.pending_offers.pop_front() {
            self.start_negotiation(next, now);
        }
    }

    fn on_offer_created(&mut self, sdp: String, now: UnixMs) {
        if self.making_offer.take().is_none() {
            return self.ignored(IgnoreReason::UnexpectedAnswerCreated);
        }
        let content = events::invite_content(
            &self.call_id,
            &self.our_party,
            &sdp,
            self.invite_lifetime_ms,
            &self.caller,
        );
        self.send(events::INVITE, content);
        self.invite_expires_at = now.plus(self.invite_lifetime_ms);
        self.local_sdp = Some(sdp);
        let force = self.gathering_complete;
        self.flush_local_candidates(force);
    }

    fn on_gathering_complete(&mut self, _now: UnixMs) {
        self.gathering_complete = true;
        if self.can_trickle() {
            self.flush_local_candidates(true);
        }
    }

    /// Sends queued local candidates not already in our SDP; with `complete`, also the
    /// end-of-candidates marker unless the SDP already says so.
    fn flush_local_candidates(&mut self, complete: bool) {
        let Some(sdp) = self.local_sdp.as_deref() else {
            return;
        };
        let first_mid = sdp
            .lines()
            .find_map(|l| l.trim_end().strip_prefix("a=mid:"))
            .map(str::to_owned);
        let mut batch: Vec<Candidate> = self
            .local_queue
            .drain(..)
            .filter(|c| !sdp_has_candidate(sdp, &c.candidate))
            .map(|mut c| {
                if c.sdp_mid.as_deref().is_none_or(str::is_empty) {
                    c.sdp_mid = first_mid.clone();
                    c.sdp_mline_index = Some(0);
                }
                c
            })
            .collect();
        self.local_queue_since = None;
        let sdp_complete = sdp.lines().any(|l| l.trim_end() == "a=end-of-candidates");
        if complete && !self.end_of_candidates_sent && !(sdp_complete && batch.is_empty()) {
            batch.push(Candidate {
                candidate: String::new(),
                sdp_mid: None,
                sdp_mline_index: None,
            });
        }
        if complete {
            self.end_of_candidates_sent = true;
        }
        if !batch.is_empty() {
            let content = events::candidates_content(&self.call_id, &self.our_party, &batch);
            self.send(events::CANDIDATES, content);
        }
    }

    // ---- time ----

    fn on_tick(&mut self, now: UnixMs) {
        if let Some(since) = self.making_offer {
            if now.since(since) >= self.cfg.answer_timeout_ms {
                // Nothing reached the invitee yet: nothing to tell it.
                return self.end(now, None, StopReason::Timeout(Timeout::Offer));
            }
        }
        if self.state == CallState::Inviting
            && self.making_offer.is_none()
            && now >= self.invite_expires_at
        {
            return self.hang_up("invite_timeout", StopReason::Timeout(Timeout::Invite), now);
        }
        if let Some((what, since)) = self.making_answer {
            if what == AnswerFor::Invite && now >= self.invite_expires_at {
                self.warn(format!(
                    "call {}: invite expired before the answer was ready",
                    self.call_id
                ));
                return self.end(now, None, StopReason::InviteExpired);
            }
            if now.since(since) >= self.cfg.answer_timeout_ms {
                return self.decline_or_hang_up(
                    Some("unknown_error"),
                    "unknown_error",
                    StopReason::Timeout(Timeout::Answer),
                    now,
                );
            }
        }
        if let Some(at) = self.answer_sent_at {
            if !self.connected && now.since(at) >= self.cfg.connect_timeout_ms {
                return self.hang_up("ice_failed", StopReason::Timeout(Timeout::Connect), now);
            }
            if self.needs_selection() && now.since(at) >= self.cfg.select_answer_timeout_ms {
                return self.hang_up(
                    "unknown_error",
                    StopReason::Timeout(Timeout::SelectAnswer),
                    now,
                );
            }
        }
        if self
            .local_queue_since
            .is_some_and(|s| now.since(s) >= self.cfg.candidate_batch_ms)
            && self.can_trickle()
        {
            self.flush_local_candidates(false);
        }
    }

    fn needs_selection(&self) -> bool {
        self.caller_version == VoipVersion::V1 && !self.selected
    }

    // ---- recording ----

    fn merge_metadata(&mut self, m: SdpStreamMetadata) {
        // MSC3077 sends the full map each time, but a stream missing from a later map may still
        // have open tracks; keep what we knew about it.
        self.streams.extend(m);
    }

    /// Emits the label and mute changes not yet reported (only while recording).
    fn sync_recording(&mut self, now: UnixMs) {
        if !self.recording {
            return;
        }
        for (track_id, t) in self.tracks.iter_mut() {
            let purpose = purpose_of(self.streams.get(&t.stream_id));
            if t.labelled != Some(purpose) {
                t.labelled = Some(purpose);
                self.out.push_back(Action::Record(RecordAction::TrackLabel {
                    stream_id: t.stream_id.clone(),
                    track_id: track_id.clone(),
                    kind: t.kind,
                    purpose,
                }));
            }
        }
        for (stream_id, s) in &self.streams {
            let state = (s.audio_muted, s.video_muted);
            let before = self
                .emitted_mutes
                .get(stream_id)
                .copied()
                .unwrap_or((false, false));
            if state != before {
                self.emitted_mutes.insert(stream_id.clone(), state);
                self.out.push_back(Action::Record(RecordAction::Muted {
                    stream_id: stream_id.clone(),
                    audio_muted: state.0,
                    video_muted: state.1,
                    at: now,
                }));
            }
        }
    }

    // ---- ending ----

    /// Ends the call telling the caller: before our answer a reject (hangup to v0 callers),
    /// after it a hangup.
    fn decline_or_hang_up(
        &mut self,
        reject_reason: Option<&str>,
        hangup_reason: &str,
        why: StopReason,
        now: UnixMs,
    ) {
        if self.state == CallState::Answered || self.role == Role::Caller {
            if self.making_offer.is_some() {
                // Our invite has not gone out: nobody to tell.
                return self.end(now, None, why);
            }
            return self.hang_up(hangup_reason, why, now);
        }
        let send = match self.caller_version {
            VoipVersion::V1 => (
                events::REJECT,
                events::reject_content(&self.call_id, &self.our_party, reject_reason),
            ),
            // js-sdk leaves out user_hangup for v0 peers, which don't know reasons.
            VoipVersion::V0 => {
                let reason = reject_reason.filter(|r| *r != "user_hangup");
                (
                    events::HANGUP,
                    events::hangup_content(&self.call_id, &self.our_party, reason),
                )
            }
        };
        self.end(now, Some(send), why);
    }

    fn hang_up(&mut self, reason: &str, why: StopReason, now: UnixMs) {
        let reason = match self.caller_version {
            VoipVersion::V0 if reason == "user_hangup" => None,
            _ => Some(reason),
        };
        let content = events::hangup_content(&self.call_id, &self.our_party, reason);
        self.end(now, Some((events::HANGUP, content)), why);
    }

    fn end(&mut self, now: UnixMs, send: Option<(&'static str, Value)>, why: StopReason) {
        if let Some((event_type, content)) = send {
            self.send(event_type, content);
        }
        self.peer(PeerCommand::Close);
        self.ended_by = Some(why.clone());
        if self.recording {
            self.recording = false;
            self.out.push_back(Action::Record(RecordAction::Stop {
                reason: why,
                at: now,
            }));
        }
        self.state = CallState::Ended;
        self.making_answer = None;
        self.making_offer = None;
        self.pending_offers.clear();
        self.local_queue.clear();
        self.local_queue_since = None;
    }

    // ---- output helpers ----

    fn send(&mut self, event_type: &'static str, content: Value) {
        self.out.push_back(Action::SendRoomEvent {
            event_type,
            content,
        });
    }

    fn peer(&mut self, c: PeerCommand) {
        self.out.push_back(Action::Peer(c));
    }

    fn ignored(&mut self, r: IgnoreReason) {
        self.out.push_back(Action::Ignored(r));
    }

    fn warn(&mut self, m: String) {
        self.out.push_back(Action::Warn(m));
    }
}

fn purpose_of(m: Option<&StreamMetadata>) -> Purpose {
    match m.map(|m| &m.purpose) {
        Some(StreamPurpose::Screenshare) => Purpose::Screen,
        Some(StreamPurpose::Usermedia | StreamPurpose::Other(_)) | None => Purpose::Camera,
    }
}

/// Whether `candidate` (with or without the `candidate:` prefix) is an `a=candidate:` line of `sdp`.
fn sdp_has_candidate(sdp: &str, candidate: &str) -> bool {
    let body = candidate
        .strip_prefix("candidate:")
        .unwrap_or(candidate)
        .trim();
    sdp.lines().any(|l| {
        l.trim_end()
            .strip_prefix("a=candidate:")
            .is_some_and(|c| c.trim() == body)
    })
}
