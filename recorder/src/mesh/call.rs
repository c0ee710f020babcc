//! The bot's part in one mesh group call while it records it: one peer call per device in the
//! call, placed or answered by the ordering rule, over to-device messages. Pure: the devices in
//! the call, to-device messages, peer-connection events and `now` go in; to-device messages to
//! send, peer commands and recording actions per peer call come out.
//!
//! Each peer call is a [`Voip1Call`] (callee for devices whose user sorts below the bot's,
//! caller for the others); this machine adds what a group call puts around it:
//! - every message it sends carries `conf_id`, `device_id`, `sender_session_id`,
//!   `dest_session_id` and a per-call `seq`;
//! - a received message is dropped when it is for another group call or another session of
//!   the bot, and is processed in `seq` order per call (held until the gap fills; a gap that
//!   never fills is skipped past once [`MAX_HELD`] messages wait);
//! - a device that joins is called (or waits to be called); one that leaves or shows a new
//!   session is hung up on; an outgoing call that fails before connecting is placed again, at
//!   most [`MAX_ATTEMPTS`] times, [`RETRY_MS`] apart; an invite from a device that already has a
//!   call with the bot replaces that call (the device restarted it).

use std::collections::{BTreeMap, VecDeque};
use std::fmt;

use serde_json::Value;

use super::events::{self, Envelope};
use super::session::PeerDevice;
use crate::voip1::events::{self as wire, CallEvent};
use crate::voip1::{
    Action, CallId, CallInput, CallState, IgnoreReason, PartyId, PeerCommand, PeerEvent, RecordAction, Role, StopReason, UnixMs,
    UserId, Voip1Call, Voip1Config,
};


/// Messages held per call while an earlier `seq` is missing.
pub const MAX_HELD: usize = 64;
/// Placing a call to one device: at most this many attempts in a row that never connect.
pub const MAX_ATTEMPTS: u32 = 3;
pub const RETRY_MS: u64 = 3_000;
/// Lifetime of the bot's invites (js-sdk's CALL_TIMEOUT_MS).
pub const INVITE_LIFETIME_MS: u64 = 60_000;
/// Ended call ids remembered per device, so late messages for them are not "unknown".
const ENDED_MEMORY: usize = 8;
/// Call ids with a reorder buffer per device.
const MAX_REORDER_CALLS: usize = 8;

/// One device in the call.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PeerKey {
    pub user_id: String,
    pub device_id: String,
}

impl PeerKey {
    /// The recording's participant id of this device (the LiveKit identity form).
    pub fn participant_id(&self) -> String {
        format!("{}:{}", self.user_id, self.device_id)
    }
}

impl fmt::Display for PeerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.user_id, self.device_id)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum MeshInput {
    /// The devices in the call now (the bot's own excluded).
    Devices { devices: Vec<PeerDevice>, now: UnixMs },
    /// A to-device `m.call.*` message (decrypted if it was encrypted).
    ToDevice { sender: String, event_type: String, content: Value, now: UnixMs },
    Peer { peer: PeerKey, call_id: CallId, event: PeerEvent, now: UnixMs },
    /// The bot leaves the call: hang up every peer call.
    Stop { now: UnixMs },
    Tick { now: UnixMs },
}

/// Why a message was dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MeshIgnore {
    Malformed(String),
    /// A to-device call event without `conf_id`: not a group call's.
    NotGroupCall,
    OtherGroupCall { conf_id: String },
    /// `dest_session_id` is not the bot's current session.
    OtherSession,
    /// Already processed (`seq` below the next expected).
    Duplicate { seq: u64 },
    /// Skipped past a missing `seq` after holding [`MAX_HELD`] messages.
    GapSkipped { from: u64, to: u64 },
    /// The bot is leaving the call.
    Leaving,
    UnknownCall { call_id: String },
    /// What the peer call machine refused.
    Call(IgnoreReason),
}

impl fmt::Display for MeshIgnore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MeshIgnore::Malformed(e) => write!(f, "malformed group call message: {e}"),
            MeshIgnore::NotGroupCall => f.write_str("a call message without conf_id (not a group call's)"),
            MeshIgnore::OtherGroupCall { conf_id } => write!(f, "for another group call ({conf_id})"),
            MeshIgnore::OtherSession => f.write_str("for another session of the bot"),
            MeshIgnore::Duplicate { seq } => write!(f, "seq {seq} was already processed"),
            MeshIgnore::GapSkipped { from, to } => write!(f, "messages seq {from}..{to} never came; skipped past them"),
            MeshIgnore::Leaving => f.write_str("the bot is leaving the call"),
            MeshIgnore::UnknownCall { call_id } => write!(f, "unknown call id {call_id}"),
            MeshIgnore::Call(r) => r.fmt(f),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MeshOutput {
    SendToDevice { user_id: String, device_id: String, event_type: &'static str, content: Value },
    /// For the peer connection of (peer, call_id); the first command of a call creates it.
    Peer { peer: PeerKey, call_id: CallId, cmd: PeerCommand },
    Record { peer: PeerKey, call_id: CallId, action: RecordAction },
    Ignored { peer: Option<PeerKey>, reason: MeshIgnore },
    Warn(String),
}

#[derive(Debug)]
struct PeerCall {
    call: Voip1Call,
    /// `seq` of the next message the bot sends in this call.
    out_seq: u64,
    connected: bool,
}

#[derive(Debug, Default)]
struct Reorder {
    next: u64,
    held: BTreeMap<u64, (String, Value)>,
}

#[derive(Debug)]
struct Peer {
    /// Their session: `dest_session_id` of what the bot sends.
    session_id: String,
    /// Listed in the call's devices now.
    present: bool,
    call: Option<PeerCall>,
    ended: VecDeque<CallId>,
    /// Outgoing calls in a row that did not connect.
    attempts: u32,
    retry_at: Option<UnixMs>,
    reorder: BTreeMap<String, Reorder>,
}

impl Peer {
    fn new(session_id: String, present: bool) -> Self {
        Self { session_id, present, call: None, ended: VecDeque::new(), attempts: 0, retry_at: None, reorder: BTreeMap::new() }
    }
}

/// The bot in one group call. See the module documentation.
#[derive(Debug)]
pub struct MeshCall {
    cfg: Voip1Config,
    group_call_id: String,
    bot: UserId,
    bot_device: String,
    session_id: String,
    peers: BTreeMap<PeerKey, Peer>,
    next_call: u64,
    stopping: bool,
    out: VecDeque<MeshOutput>,
}

impl MeshCall {
    /// `session_id` is the bot's session in this call (fresh per join), announced in its member
    /// event.
    pub fn new(cfg: Voip1Config, group_call_id: &str, bot: &str, bot_device: &str, session_id: &str) -> Self {
        Self {
            cfg,
            group_call_id: group_call_id.to_owned(),
            bot: UserId(bot.to_owned()),
            bot_device: bot_device.to_owned(),
            session_id: session_id.to_owned(),
            peers: BTreeMap::new(),
            next_call: 0,
            stopping: false,
            out: VecDeque::new(),
        }
    }

    pub fn group_call_id(&self) -> &str {
        &self.group_call_id
    }

    pub fn poll_output(&mut self) -> Option<MeshOutput> {
        self.out.pop_front()
    }

    /// Stopping, and every peer call has ended.
    pub fn is_done(&self) -> bool {
        self.stopping && self.peers.values().all(|p| p.call.is_none())
    }

    /// Peer calls running now.
    pub fn active_calls(&self) -> usize {
        self.peers.values().filter(|p| p.call.is_some()).count()
    }

    pub fn next_deadline(&self) -> Option<UnixMs> {
        self.peers
            .values()
            .flat_map(|p| p.call.as_ref().and_then(|c| c.call.next_deadline()).into_iter().chain(p.retry_at))
            .min()
    }

    /// The ordering rule: the bot places the call when the other's user id sorts at or above its
    /// own (and, for another device of its own user, when that device id sorts above).
    pub fn bot_calls(&self, peer: &PeerKey) -> bool {
        match peer.user_id.as_str().cmp(self.bot.as_str()) {
            std::cmp::Ordering::Greater => true,
            std::cmp::Ordering::Equal => peer.device_id > self.bot_device,
            std::cmp::Ordering::Less => false,
        }
    }

    pub fn handle_input(&mut self, input: MeshInput) {
        match input {
            MeshInput::Devices { devices, now } => self.on_devices(devices, now),
            MeshInput::ToDevice { sender, event_type, content, now } => self.on_to_device(sender, event_type, content, now),
            MeshInput::Peer { peer, call_id, event, now } => {
                let Some(p) = self.peers.get_mut(&peer) else { return };
                match p.call.as_mut() {
                    Some(c) if *c.call.call_id() == call_id => {
                        if matches!(event, PeerEvent::PeerConnected | PeerEvent::TrackOpened { .. }) {
                            c.connected = true;
                            p.attempts = 0;
                        }
                        self.drive(&peer, CallInput::Peer { event, now }, now);
                    }
                    // A late event of a replaced call's connection.
                    _ => {}
                }
            }
            MeshInput::Stop { now } => {
                self.stopping = true;
                let keys: Vec<PeerKey> = self.peers.keys().cloned().collect();
                for k in keys {
                    if let Some(p) = self.peers.get_mut(&k) {
                        p.retry_at = None;
                    }
                    self.drive(&k, CallInput::Stop { now }, now);
                }
            }
            MeshInput::Tick { now } => {
                let keys: Vec<PeerKey> = self.peers.keys().cloned().collect();
                for k in keys {
                    self.drive(&k, CallInput::Tick { now }, now);
                    let Some(p) = self.peers.get_mut(&k) else { continue };
                    if p.retry_at.is_some_and(|t| now >= t) {
                        p.retry_at = None;
                        if p.present && p.call.is_none() && !self.stopping {
                            self.place_call(&k, now);
                        }
                    }
                }
            }
        }
    }

    fn on_devices(&mut self, devices: Vec<PeerDevice>, now: UnixMs) {
        let mut listed = Vec::new();
        for d in devices {
            let key = PeerKey { user_id: d.user_id, device_id: d.device_id };
            if key.user_id == self.bot.as_str() && key.device_id == self.bot_device {
                continue;
            }
            listed.push(key.clone());
            let mut new_session = false;
            match self.peers.get_mut(&key) {
                Some(p) => {
                    if p.session_id != d.session_id {
                        // The device rejoined: its old session's call is over.
                        p.session_id = d.session_id;
                        p.attempts = 0;
                        p.retry_at = None;
                        new_session = true;
                    }
                    p.present = true;
                }
                None => {
                    self.peers.insert(key.clone(), Peer::new(d.session_id, true));
                }
            }
            if new_session {
                self.drive(&key, CallInput::Stop { now }, now);
                // The old session's call is not retried: the new session gets a call of its own.
                if let Some(p) = self.peers.get_mut(&key) {
                    p.retry_at = None;
                    p.attempts = 0;
                }
            }
            let idle = self.peers.get(&key).is_some_and(|p| p.call.is_none() && p.retry_at.is_none());
            if idle && self.bot_calls(&key) && !self.stopping {
                self.place_call(&key, now);
            }
        }
        let gone: Vec<PeerKey> = self.peers.iter().filter(|(k, p)| p.present && !listed.contains(k)).map(|(k, _)| k.clone()).collect();
        for k in gone {
            if let Some(p) = self.peers.get_mut(&k) {
                p.present = false;
                p.retry_at = None;
            }
            self.drive(&k, CallInput::Stop { now }, now);
        }
        // Devices that left and have no call any more are forgotten.
        self.peers.retain(|_, p| p.present || p.call.is_some() || !p.reorder.is_empty());
    }

    fn place_call(&mut self, key: &PeerKey, now: UnixMs) {
        let call_id = CallId(format!("mxrec{}{}", now.0, self.next_call));
        self.next_call += 1;
        let call = Voip1Call::outgoing(
            self.cfg.clone(),
            self.bot.clone(),
            PartyId(self.bot_device.clone()),
            UserId(key.user_id.clone()),
            call_id,
            INVITE_LIFETIME_MS,
            now,
        );
        let Some(p) = self.peers.get_mut(key) else { return };
        p.attempts += 1;
        p.call = Some(PeerCall { call, out_seq: 0, connected: false });
        self.drain(key, now);
    }

    fn on_to_device(&mut self, sender: String, event_type: String, content: Value, now: UnixMs) {
        let env = match events::parse_envelope(&content) {
            Ok(Some(e)) => e,
            Ok(None) => return self.ignored(None, MeshIgnore::NotGroupCall),
            Err(e) => return self.ignored(None, MeshIgnore::Malformed(e.to_string())),
        };
        let key = PeerKey { user_id: sender, device_id: env.device_id.clone() };
        if env.conf_id != self.group_call_id {
            return self.ignored(Some(key), MeshIgnore::OtherGroupCall { conf_id: env.conf_id });
        }
        if env.dest_session_id.as_deref() != Some(self.session_id.as_str()) {
            return self.ignored(Some(key), MeshIgnore::OtherSession);
        }
        if key.user_id == self.bot.as_str() && key.device_id == self.bot_device {
            return self.ignored(Some(key), MeshIgnore::Call(IgnoreReason::Echo));
        }
        let peer = self.peers.entry(key.clone()).or_insert_with(|| Peer::new(env.sender_session_id.clone(), false));
        let ready = match env.seq {
            None => vec![(event_type, content)],
            Some(seq) => {
                if !peer.reorder.contains_key(&env.call_id) && peer.reorder.len() >= MAX_REORDER_CALLS {
                    // The oldest call's buffer goes: its call has been replaced by now.
                    let oldest = peer.reorder.keys().next().cloned();
                    if let Some(o) = oldest {
                        peer.reorder.remove(&o);
                    }
                }
                let r = peer.reorder.entry(env.call_id.clone()).or_default();
                if seq < r.next {
                    return self.ignored(Some(key), MeshIgnore::Duplicate { seq });
                }
                r.held.insert(seq, (event_type, content));
                let mut skipped = None;
                if r.held.len() > MAX_HELD {
                    let first = *r.held.keys().next().expect("not empty");
                    skipped = Some((r.next, first));
                    r.next = first;
                }
                let mut ready = Vec::new();
                while let Some(ev) = r.held.remove(&r.next) {
                    r.next += 1;
                    ready.push(ev);
                }
                if let Some((from, to)) = skipped {
                    self.ignored(Some(key.clone()), MeshIgnore::GapSkipped { from, to });
                }
                ready
            }
        };
        for (event_type, content) in ready {
            self.process(&key, &env, &event_type, &content, now);
        }
    }

    fn process(&mut self, key: &PeerKey, env: &Envelope, event_type: &str, content: &Value, now: UnixMs) {
        let event = match wire::parse_with(&self.cfg.limits, event_type, content) {
            Ok(e) => e,
            Err(e) => return self.ignored(Some(key.clone()), MeshIgnore::Malformed(e.to_string())),
        };
        if let CallEvent::Invite(invite) = event {
            return self.on_invite(key, env, invite, now);
        }
        let call_id = event.common().call_id.clone();
        let Some(p) = self.peers.get(key) else { return };
        match &p.call {
            Some(c) if *c.call.call_id() == call_id => {
                let input = CallInput::Event { sender: UserId(key.user_id.clone()), event, now };
                self.drive(key, input, now);
            }
            _ if p.ended.contains(&call_id) => self.ignored(Some(key.clone()), MeshIgnore::Call(IgnoreReason::CallEnded)),
            _ => self.ignored(Some(key.clone()), MeshIgnore::UnknownCall { call_id: call_id.0 }),
        }
    }

    fn on_invite(&mut self, key: &PeerKey, env: &Envelope, invite: wire::Invite, now: UnixMs) {
        if self.stopping {
            return self.ignored(Some(key.clone()), MeshIgnore::Leaving);
        }
        if let Some(invitee) = invite.invitee.as_ref().filter(|i| **i != self.bot) {
            return self.ignored(Some(key.clone()), MeshIgnore::Call(IgnoreReason::NotForUs { invitee: invitee.clone() }));
        }
        let call_id = invite.common.call_id.clone();
        let Some(p) = self.peers.get_mut(key) else { return };
        if p.ended.contains(&call_id) {
            return self.ignored(Some(key.clone()), MeshIgnore::Call(IgnoreReason::CallEnded));
        }
        match &p.call {
            Some(c) if *c.call.call_id() == call_id => {
                return self.ignored(Some(key.clone()), MeshIgnore::Call(IgnoreReason::DuplicateInvite));
            }
            // The device placed a new call (it restarted, or both sides called at once): it
            // replaces the one the bot has with it.
            Some(_) => self.drive(key, CallInput::Stop { now }, now),
            None => {}
        }
        let Some(p) = self.peers.get_mut(key) else { return };
        p.session_id = env.sender_session_id.clone();
        p.retry_at = None;
        let call = Voip1Call::from_invite(
            self.cfg.clone(),
            self.bot.clone(),
            PartyId(self.bot_device.clone()),
            UserId(key.user_id.clone()),
            invite.clone(),
            now.plus(invite.lifetime_ms),
            now,
        );
        p.call = Some(PeerCall { call, out_seq: 0, connected: false });
        self.drain(key, now);
    }

    /// Feeds one input to the peer's call (if any) and collects what it says.
    fn drive(&mut self, key: &PeerKey, input: CallInput, now: UnixMs) {
        let Some(c) = self.peers.get_mut(key).and_then(|p| p.call.as_mut()) else { return };
        c.call.handle_input(input);
        self.drain(key, now);
    }

    fn drain(&mut self, key: &PeerKey, now: UnixMs) {
        let bot_calls = self.bot_calls(key);
        let Some(p) = self.peers.get_mut(key) else { return };
        let Some(c) = p.call.as_mut() else { return };
        let call_id = c.call.call_id().clone();
        while let Some(action) = c.call.poll_output() {
            let out = match action {
                Action::SendRoomEvent { event_type, mut content } => {
                    events::wrap(&mut content, &self.group_call_id, &self.bot_device, &self.session_id, &p.session_id, c.out_seq);
                    c.out_seq += 1;
                    MeshOutput::SendToDevice { user_id: key.user_id.clone(), device_id: key.device_id.clone(), event_type, content }
                }
                Action::Peer(cmd) => MeshOutput::Peer { peer: key.clone(), call_id: call_id.clone(), cmd },
                Action::Record(action) => MeshOutput::Record { peer: key.clone(), call_id: call_id.clone(), action },
                Action::Ignored(r) => MeshOutput::Ignored { peer: Some(key.clone()), reason: MeshIgnore::Call(r) },
                Action::Warn(m) => MeshOutput::Warn(format!("{key}: {m}")),
            };
            self.out.push_back(out);
        }
        if c.call.state() != CallState::Ended {
            return;
        }
        let placed = c.call.role() == Role::Caller;
        let connected = c.connected;
        let hung_up = matches!(c.call.ended_by(), Some(StopReason::RemoteHangup { reason }) if reason.as_deref() == Some("user_hangup"));
        p.call = None;
        if p.ended.len() >= ENDED_MEMORY {
            p.ended.pop_front();
        }
        p.ended.push_back(call_id);
        // A placed call that never connected is placed again while the device is in the call.
        if placed && !connected && !hung_up && p.present && !self.stopping && p.attempts < MAX_ATTEMPTS {
            p.retry_at = Some(now.plus(RETRY_MS));
        } else if connected && !hung_up && p.present && !self.stopping && bot_calls {
            // A call that worked and broke (ICE failed later): call again.
            p.attempts = 0;
            p.retry_at = Some(now.plus(RETRY_MS));
        }
    }

    fn ignored(&mut self, peer: Option<PeerKey>, reason: MeshIgnore) {
        self.out.push_back(MeshOutput::Ignored { peer, reason });
    }
}

#[cfg(test)]
mod tests;
