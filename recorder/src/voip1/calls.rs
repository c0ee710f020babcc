//! The bot-wide dispatcher for 1:1 calls: every `m.call.*` room event the bot sees goes in, is
//! parsed, vetted and routed to its call by (room, call_id); peer events and ticks are routed the
//! same way. Outputs carry the room and call they concern.
//!
//! Invites are dropped when they are not for the bot (`invitee` set to someone else, sent by the
//! bot's own user), expired (age > lifetime − grace, as js-sdk judges it), or in a room that does
//! not have exactly two joined members. A second invite in a room whose call is still active is
//! **declined as busy**: `m.call.reject {reason: "user_busy"}` (a hangup with that reason to a
//! version 0 caller). js-sdk's caller, still in `InviteSent`, honours a reject from any party
//! and ends with the reject's reason, and Element then shows "The user you called is busy";
//! a hangup at that point would be ignored because no opponent party has been chosen. This is
//! also what the Matrix Dart SDK does when it can't take a call.
//!
//! Candidates for a call id not seen yet are held briefly (bounded) and replayed after its
//! invite, as js-sdk does; all other events for unknown call ids are `Ignored(UnknownCall)`.

use std::collections::{BTreeMap, VecDeque};

use serde_json::Value;

use super::call::{Action, CallInput, IgnoreReason, PeerEvent, Voip1Call};
use super::events::{self, CallEvent, VoipVersion};
use super::{CallId, PartyId, RoomId, UnixMs, UserId, Voip1Config};

/// How many ended call ids are remembered per bot, so late events for them read as
/// `CallEnded` rather than `UnknownCall`.
const ENDED_MEMORY: usize = 256;
/// Call ids with held (orphan) candidates at most.
const MAX_ORPHAN_CALLS: usize = 8;

/// A room event of an `m.call.*` type, as the Matrix edge saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct RoomEvent {
    pub room_id: RoomId,
    pub sender: UserId,
    pub event_type: String,
    pub content: Value,
    pub origin_server_ts: UnixMs,
    /// `unsigned.age` when the server gave one: preferred over `now − origin_server_ts`
    /// because it doesn't depend on the two clocks agreeing.
    pub unsigned_age_ms: Option<u64>,
    /// Joined members of the room now (1:1 calls need exactly 2).
    pub joined_members: usize,
    pub now: UnixMs,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    Room(RoomEvent),
    Peer {
        room_id: RoomId,
        call_id: CallId,
        event: PeerEvent,
        now: UnixMs,
    },
    /// The bot hangs up one call.
    Stop {
        room_id: RoomId,
        call_id: CallId,
        now: UnixMs,
    },
    /// The bot hangs up every call (shutdown).
    StopAll {
        now: UnixMs,
    },
    Tick {
        now: UnixMs,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    pub room_id: RoomId,
    /// `None` only when the event had no readable call_id.
    pub call_id: Option<CallId>,
    pub action: Action,
}

#[derive(Debug)]
struct Orphans {
    first_seen: UnixMs,
    sender: UserId,
    events: Vec<CallEvent>,
    count: usize,
}

/// All 1:1 calls of one bot identity (user id + party id).
#[derive(Debug)]
pub struct Voip1Calls {
    cfg: Voip1Config,
    bot: UserId,
    our_party: PartyId,
    calls: BTreeMap<(RoomId, CallId), Voip1Call>,
    ended: VecDeque<(RoomId, CallId)>,
    orphans: BTreeMap<(RoomId, CallId), Orphans>,
    out: VecDeque<Output>,
}

impl Voip1Calls {
    /// `our_party` is the party_id the bot uses in every call (js-sdk uses the device id).
    pub fn new(cfg: Voip1Config, bot: UserId, our_party: PartyId) -> Self {
        Self {
            cfg,
            bot,
            our_party,
            calls: BTreeMap::new(),
            ended: VecDeque::new(),
            orphans: BTreeMap::new(),
            out: VecDeque::new(),
        }
    }

    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// The earliest time a `Tick` can change anything.
    pub fn next_deadline(&self) -> Option<UnixMs> {
        let calls = self.calls.values().filter_map(Voip1Call::next_deadline);
        let orphans = self
            .orphans
            .values()
            .map(|o| o.first_seen.plus(self.cfg.orphan_candidates_ttl_ms));
        calls.chain(orphans).min()
    }

    /// The active call of a room, if any.
    pub fn active_call(&self, room_id: &RoomId) -> Option<&Voip1Call> {
        self.calls
            .iter()
            .find(|((r, _), _)| r == room_id)
            .map(|(_, c)| c)
    }

    pub fn active_calls(&self) -> usize {
        self.calls.len()
    }

    pub fn handle_input(&mut self, input: Input) {
        match input {
            Input::Room(ev) => self.on_room_event(ev),
            Input::Peer {
                room_id,
                call_id,
                event,
                now,
            } => {
                let key = (room_id, call_id);
                if self.calls.contains_key(&key) {
                    self.drive(key, CallInput::Peer { event, now });
                } else if !self.ended.contains(&key) {
                    self.emit(
                        &key.0,
                        Some(&key.1),
                        Action::Ignored(IgnoreReason::UnknownCall),
                    );
                }
            }
            Input::Stop {
                room_id,
                call_id,
                now,
            } => {
                let key = (room_id, call_id);
                if self.calls.contains_key(&key) {
                    self.drive(key, CallInput::Stop { now });
                }
            }
            Input::StopAll { now } => {
                let keys: Vec<_> = self.calls.keys().cloned().collect();
                for key in keys {
                    self.drive(key, CallInput::Stop { now });
                }
            }
            Input::Tick { now } => {
                let ttl = self.cfg.orphan_candidates_ttl_ms;
                self.orphans.retain(|_, o| now.since(o.first_seen) < ttl);
                let keys: Vec<_> = self.calls.keys().cloned().collect();
                for key in keys {
                    self.drive(key, CallInput::Tick { now });
                }
            }
        }
    }

    fn on_room_event(&mut self, ev: RoomEvent) {
        let event = match events::parse_with(&self.cfg.limits, &ev.event_type, &ev.content) {
            Ok(e) => e,
            Err(err) => {
                let call_id = ev
                    .content
                    .get("call_id")
                    .and_then(Value::as_str)
                    .map(CallId::from);
                return self.emit(
                    &ev.room_id,
                    call_id.as_ref(),
                    Action::Ignored(IgnoreReason::Malformed(err)),
                );
            }
        };
        let call_id = event.common().call_id.clone();
        if event.common().party_id.as_ref() == Some(&self.our_party) {
            return self.emit(
                &ev.room_id,
                Some(&call_id),
                Action::Ignored(IgnoreReason::Echo),
            );
        }
        let key = (ev.room_id.clone(), call_id);
        if let CallEvent::Invite(_) = event {
            return self.on_invite(key, ev, event);
        }
        if self.calls.contains_key(&key) {
            return self.drive(
                key,
                CallInput::Event {
                    sender: ev.sender,
                    event,
                    now: ev.now,
                },
            );
        }
        if self.ended.contains(&key) {
            return self.emit(
                &key.0,
                Some(&key.1),
                Action::Ignored(IgnoreReason::CallEnded),
            );
        }
        if let CallEvent::Candidates(c) = &event {
            if self.hold_orphan(&key, &ev, c.candidates.len(), ev.now) {
                self.orphans
                    .get_mut(&key)
                    .expect("just held")
                    .events
                    .push(event);
                return self.emit(
                    &key.0,
                    Some(&key.1),
                    Action::Ignored(IgnoreReason::HeldForInvite),
                );
            }
        }
        self.emit(
            &key.0,
            Some(&key.1),
            Action::Ignored(IgnoreReason::UnknownCall),
        )
    }

    /// Makes room for `n` orphan candidates of `key`; false when they can't be held.
    fn hold_orphan(
        &mut self,
        key: &(RoomId, CallId),
        ev: &RoomEvent,
        n: usize,
        now: UnixMs,
    ) -> bool {
        if !self.orphans.contains_key(key) {
            if self.orphans.len() >= MAX_ORPHAN_CALLS {
                return false;
            }
            let o = Orphans {
                first_seen: now,
                sender: ev.sender.clone(),
                events: Vec::new(),
                count: 0,
            };
            self.orphans.insert(key.clone(), o);
        }
        let o = self.orphans.get_mut(key).expect("present");
        if o.sender != ev.sender || o.count + n > self.cfg.max_remote_candidates {
            return false;
        }
        o.count += n;
        true
    }

    fn on_invite(&mut self, key: (RoomId, CallId), ev: RoomEvent, event: CallEvent) {
        let CallEvent::Invite(invite) = event else {
            unreachable!("checked by the caller")
        };
        let (room_id, call_id) = (&key.0, &key.1);
        if ev.sender == self.bot {
            return self.emit(
                room_id,
                Some(call_id),
                Action::Ignored(IgnoreReason::OwnInvite),
            );
        }
        if let Some(invitee) = invite.invitee.as_ref().filter(|i| **i != self.bot) {
            let r = IgnoreReason::NotForUs {
                invitee: invitee.clone(),
            };
            return self.emit(room_id, Some(call_id), Action::Ignored(r));
        }
        let age_ms = ev
            .unsigned_age_ms
            .unwrap_or_else(|| ev.now.since(ev.origin_server_ts));
        if age_ms > invite.lifetime_ms.saturating_sub(self.cfg.invite_grace_ms) {
            let r = IgnoreReason::Expired {
                age_ms,
                lifetime_ms: invite.lifetime_ms,
            };
            return self.emit(room_id, Some(call_id), Action::Ignored(r));
        }
        if self.calls.contains_key(&key) {
            return self.emit(
                room_id,
                Some(call_id),
                Action::Ignored(IgnoreReason::DuplicateInvite),
            );
        }
        if self.ended.contains(&key) {
            return self.emit(
                room_id,
                Some(call_id),
                Action::Ignored(IgnoreReason::CallEnded),
            );
        }
        if ev.joined_members != 2 {
            let r = IgnoreReason::NotOneToOne {
                joined_members: ev.joined_members,
            };
            return self.emit(room_id, Some(call_id), Action::Ignored(r));
        }
        if let Some(active) = self.active_call(room_id).map(|c| c.call_id().clone()) {
            let (event_type, content) = match invite.common.version {
                VoipVersion::V1 => (
                    events::REJECT,
                    events::reject_content(call_id, &self.our_party, Some("user_busy")),
                ),
                VoipVersion::V0 => (
                    events::HANGUP,
                    events::hangup_content(call_id, &self.our_party, Some("user_busy")),
                ),
            };
            self.emit(
                room_id,
                Some(call_id),
                Action::SendRoomEvent {
                    event_type,
                    content,
                },
            );
            self.emit(
                room_id,
                Some(call_id),
                Action::Ignored(IgnoreReason::Busy { active }),
            );
            self.orphans.remove(&key);
            return self.remember_ended(key);
        }
        let expires_at = ev.now.plus(invite.lifetime_ms.saturating_sub(age_ms));
        let call = Voip1Call::from_invite(
            self.cfg.clone(),
            self.bot.clone(),
            self.our_party.clone(),
            ev.sender.clone(),
            invite,
            expires_at,
            ev.now,
        );
        self.calls.insert(key.clone(), call);
        self.drain(&key);
        if let Some(o) = self.orphans.remove(&key) {
            for event in o.events {
                self.drive(
                    key.clone(),
                    CallInput::Event {
                        sender: o.sender.clone(),
                        event,
                        now: ev.now,
                    },
                );
            }
        }
    }

    /// Feeds one input to a live call and collects its outputs; forgets it once ended.
    fn drive(&mut self, key: (RoomId, CallId), input: CallInput) {
        if let Some(call) = self.calls.get_mut(&key) {
            call.handle_input(input);
        }
        self.drain(&key);
    }

    fn drain(&mut self, key: &(RoomId, CallId)) {
        let Some(call) = self.calls.get_mut(key) else {
            return;
        };
        while let Some(action) = call.poll_output() {
            self.out.push_back(Output {
                room_id: key.0.clone(),
                call_id: Some(key.1.clone()),
                action,
            });
        }
        if call.is_ended() {
            self.calls.remove(key);
            self.remember_ended(key.clone());
        }
    }

    fn remember_ended(&mut self, key: (RoomId, CallId)) {
        if self.ended.len() >= ENDED_MEMORY {
            self.ended.pop_front();
        }
        self.ended.push_back(key);
    }

    fn emit(&mut self, room_id: &RoomId, call_id: Option<&CallId>, action: Action) {
        self.out.push_back(Output {
            room_id: room_id.clone(),
            call_id: call_id.cloned(),
            action,
        });
    }
}
