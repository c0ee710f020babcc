//! Matrix call signalling as the bot receives it: `m.call.*` room events through the parser and
//! the 1:1 call machines (`Voip1Calls`), and MatrixRTC memberships (legacy state and sticky
//! events) and `io.element.call.encryption_keys` (to-device and room variants) through
//! `RtcSession` and `KeyRouter`, interleaved with peer events and time.
//!
//! Input: records until the input ends, each `[selector] [flags] [length: u16 LE] [content]`:
//!
//! ```text
//! selector % 16  0..=10: the m.call.* event type CALL_TYPES[selector], content = JSON
//!                11: legacy member state event, content = "<state key>\n<JSON>"
//!                12: sticky member event, content = JSON
//!                13: to-device encryption keys, content = JSON
//!                14: room encryption keys, content = JSON
//!                15: peer event or time for the room's call, picked by flags >> 5, content = text
//! flags          bits 0-1 sender, bit 2 room, bits 3-4 joined members, bits 5-6 time step,
//!                bit 7: answer `CreateAnswer` at once
//! ```
//!
//! Checks: a parsed call event keeps the parser's promises (canonical type, bounded ids,
//! version 0 without party) and survives the bot's own serialisers (candidates, answer,
//! hangup); every event the bot sends passes its own strict parser; at most one call per room;
//! the membership changes the session reports replay to the members it holds; keys held for
//! unknown devices stay bounded.

#![no_main]

use std::collections::BTreeSet;

use libfuzzer_sys::fuzz_target;
use recorder::matrixrtc::session::{KeyRouter, RtcSession, SessionEvent};
use recorder::voip1::events::{self, CallEvent, ParseLimits, VoipVersion};
use recorder::voip1::{
    Action, Input, PartyId, PeerCommand, PeerEvent, PeerFailure, RoomEvent, RoomId, TrackKind, UnixMs, UserId,
    Voip1Calls, Voip1Config,
};
use serde_json::Value;

const CALL_TYPES: [&str; 11] = [
    events::INVITE,
    events::CANDIDATES,
    events::ANSWER,
    events::SELECT_ANSWER,
    events::NEGOTIATE,
    events::SDP_STREAM_METADATA_CHANGED,
    events::SDP_STREAM_METADATA_CHANGED_UNSTABLE,
    events::HANGUP,
    events::REJECT,
    events::REPLACES,
    events::ASSERTED_IDENTITY,
];
const BOT: &str = "@mxrec:example.org";
const BOT_DEVICE: &str = "BOTDEVICE";
const SENDERS: [&str; 4] = ["@alice:example.org", "@bob:example.org", BOT, "@eve:elsewhere.org"];
const ROOMS: [&str; 2] = ["!one:example.org", "!two:example.org"];
const STEPS_MS: [u64; 4] = [0, 1_000, 10_000, 61_000];
const ANSWER_SDP: &str = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n\
                          a=mid:0\r\na=candidate:1 1 udp 2130706431 127.0.0.1 40000 typ host\r\n";
/// `KeyRouter` keeps at most 64 keys for each of at most 256 devices without a membership.
const MAX_HELD_KEYS: usize = 256 * 64;

struct Rtc {
    session: RtcSession,
    router: KeyRouter,
    /// The members as replayed from the session's events.
    members: BTreeSet<(String, String)>,
}

fuzz_target!(|data: &[u8]| {
    let mut now = UnixMs(1_750_000_000_000);
    let mut calls = Voip1Calls::new(Voip1Config::default(), UserId::from(BOT), PartyId::from(BOT_DEVICE));
    let mut rtc = Rtc { session: RtcSession::new(ROOMS[0]), router: KeyRouter::new(ROOMS[0]), members: BTreeSet::new() };
    rtc.session.set_own_device(BOT, BOT_DEVICE, now.0);
    rtc.router.set_own_device(BOT, BOT_DEVICE);
    for s in &SENDERS[..3] {
        rtc.session.set_joined(s, true, now.0);
    }

    let mut rest = data;
    while rest.len() >= 4 {
        let (selector, flags) = (rest[0], rest[1]);
        let len = u16::from_le_bytes([rest[2], rest[3]]) as usize;
        let content = &rest[4..(4 + len).min(rest.len())];
        rest = &rest[4 + content.len()..];
        now = now.plus(STEPS_MS[(flags >> 5 & 3) as usize]);
        let sender = SENDERS[(flags & 3) as usize];
        let room = RoomId::from(ROOMS[(flags >> 2 & 1) as usize]);
        let Ok(text) = std::str::from_utf8(content) else { continue };
        match selector % 16 {
            s @ 0..=10 => {
                let Ok(json) = serde_json::from_str::<Value>(text) else { continue };
                check_parse(CALL_TYPES[s as usize], &json);
                calls.handle_input(Input::Room(RoomEvent {
                    room_id: room,
                    sender: UserId::from(sender),
                    event_type: CALL_TYPES[s as usize].to_owned(),
                    content: json,
                    origin_server_ts: now,
                    unsigned_age_ms: None,
                    joined_members: [1, 2, 3, 2][(flags >> 3 & 3) as usize],
                    now,
                }));
            }
            11 => {
                let (state_key, json) = text.split_once('\n').unwrap_or(("", text));
                let Ok(json) = serde_json::from_str::<Value>(json) else { continue };
                let _ = rtc.session.handle_legacy_state_event(state_key, sender, now.0, &json, now.0);
            }
            12 => {
                let Ok(json) = serde_json::from_str::<Value>(text) else { continue };
                let duration = (flags & 0x80 != 0).then_some(30_000);
                let _ = rtc.session.handle_sticky_event(sender, now.0, &json, duration, now.0);
            }
            13 | 14 => {
                let Ok(json) = serde_json::from_str::<Value>(text) else { continue };
                let parsed = if selector % 16 == 13 {
                    recorder::matrixrtc::session::parse_to_device_keys(sender, &json)
                } else {
                    recorder::matrixrtc::session::parse_room_keys(ROOMS[0], sender, now.0, &json)
                };
                if let Ok(keys) = parsed {
                    let count = keys.keys.len();
                    if let Ok(intake) = rtc.router.handle_keys(keys, now.0) {
                        assert_eq!(intake.routed + intake.held + intake.outdated + intake.own, count);
                    }
                }
            }
            _ => peer_input(&mut calls, room, flags, text, now),
        }
        rtc.session.tick(now.0);
        rtc.drain();
        drain_calls(&mut calls, flags & 0x80 != 0, now);
    }
    calls.handle_input(Input::StopAll { now });
    drain_calls(&mut calls, false, now);
    assert_eq!(calls.active_calls(), 0, "calls left after StopAll");
});

impl Rtc {
    fn drain(&mut self) {
        while let Some(ev) = self.session.poll_event() {
            match &ev {
                SessionEvent::MemberJoined(m) => {
                    assert!(!m.device_id.is_empty());
                    assert!(self.members.insert((m.user_id.clone(), m.device_id.clone())), "{m:?} joined twice");
                }
                SessionEvent::MemberUpdated(m) => {
                    assert!(self.members.contains(&(m.user_id.clone(), m.device_id.clone())), "{m:?} updated, not a member")
                }
                SessionEvent::MemberLeft(m) => {
                    assert!(self.members.remove(&(m.user_id.clone(), m.device_id.clone())), "{m:?} left, not a member")
                }
                SessionEvent::SessionStarted | SessionEvent::SessionEnded => {}
            }
            self.router.handle_session_event(&ev);
        }
        let now: BTreeSet<_> =
            self.session.members().iter().map(|m| (m.user_id.clone(), m.device_id.clone())).collect();
        assert_eq!(now, self.members, "the session's members differ from its reported changes");
        assert!(!self.members.contains(&(BOT.to_owned(), BOT_DEVICE.to_owned())), "the bot is its own member");
        while self.router.poll_update().is_some() {}
        assert!(self.router.held_count() <= MAX_HELD_KEYS);
    }
}

/// What the parser promises about any content it accepts, and what the bot's serialisers make
/// of it.
fn check_parse(event_type: &str, content: &Value) {
    let limits = ParseLimits::default();
    let Ok(ev) = events::parse(event_type, content) else { return };
    let common = ev.common().clone();
    assert!(!common.call_id.as_str().is_empty() && common.call_id.as_str().len() <= limits.max_id_bytes);
    match common.version {
        VoipVersion::V0 => assert!(common.party_id.is_none(), "a version 0 event with a party"),
        VoipVersion::V1 => assert!(common.party_id.as_ref().is_some_and(|p| !p.as_str().is_empty())),
    }
    let party = common.party_id.clone().unwrap_or_else(|| PartyId::from("P"));
    let again = |ty: &str, v: Value| events::parse(ty, &v).unwrap_or_else(|e| panic!("{ty} we made does not parse: {e}"));
    match &ev {
        CallEvent::Invite(i) => {
            assert!(i.offer_sdp.len() <= limits.max_sdp_bytes && !i.offer_sdp.trim().is_empty());
            let CallEvent::Answer(a) = again(events::ANSWER, events::answer_content(&common.call_id, &party, &i.offer_sdp))
            else {
                panic!("not an answer")
            };
            assert_eq!(a.answer_sdp, i.offer_sdp);
        }
        CallEvent::Candidates(c) => {
            assert!(c.candidates.len() <= limits.max_candidates_per_event);
            let CallEvent::Candidates(back) =
                again(events::CANDIDATES, events::candidates_content(&common.call_id, &party, &c.candidates))
            else {
                panic!("not candidates")
            };
            assert_eq!(back.candidates, c.candidates);
        }
        CallEvent::Hangup(h) | CallEvent::Reject(h) => {
            let CallEvent::Hangup(back) =
                again(events::HANGUP, events::hangup_content(&common.call_id, &party, h.reason.as_deref()))
            else {
                panic!("not a hangup")
            };
            assert_eq!(back.reason, h.reason);
        }
        _ => {}
    }
}

fn peer_input(calls: &mut Voip1Calls, room: RoomId, flags: u8, text: &str, now: UnixMs) {
    let Some(call_id) = calls.active_call(&room).map(|c| c.call_id().clone()) else {
        calls.handle_input(Input::Tick { now });
        return;
    };
    let event = match flags >> 5 {
        0 => PeerEvent::AnswerCreated { sdp: text.to_owned() },
        // webrtc-rs's own candidates are a line of ~100 bytes; longer ones would only test that
        // the bot forwards what it gathered.
        1 => PeerEvent::LocalCandidate {
            candidate: text.chars().take(200).collect(),
            sdp_mid: None,
            sdp_mline_index: Some(0),
        },
        2 => PeerEvent::GatheringComplete,
        3 => PeerEvent::PeerConnected,
        4 => PeerEvent::TrackOpened {
            stream_id: text.to_owned(),
            track_id: format!("t{}", text.len()),
            kind: if flags & 1 == 0 { TrackKind::Audio } else { TrackKind::Video },
        },
        5 => PeerEvent::PeerFailed { reason: PeerFailure::Ice },
        6 => return calls.handle_input(Input::Stop { room_id: room, call_id, now }),
        _ => return calls.handle_input(Input::Tick { now }),
    };
    calls.handle_input(Input::Peer { room_id: room, call_id, event, now });
}

/// Runs the machines' outputs: what the bot sends must pass its own parser; `CreateAnswer` is
/// answered at once when asked to.
fn drain_calls(calls: &mut Voip1Calls, answer: bool, now: UnixMs) {
    loop {
        let mut asked = Vec::new();
        while let Some(o) = calls.poll_output() {
            match &o.action {
                Action::SendRoomEvent { event_type, content } => {
                    let ev = events::parse(event_type, content)
                        .unwrap_or_else(|e| panic!("the bot sends a {event_type} it would refuse: {e}\n{content}"));
                    assert_eq!(ev.common().party_id.as_ref().map(|p| p.as_str()), Some(BOT_DEVICE));
                    assert_eq!(ev.common().version, VoipVersion::V1);
                    assert_eq!(Some(&ev.common().call_id), o.call_id.as_ref());
                }
                Action::Peer(PeerCommand::CreateAnswer) if answer => {
                    asked.push((o.room_id.clone(), o.call_id.clone().expect("a command names its call")))
                }
                _ => {}
            }
        }
        if asked.is_empty() {
            break;
        }
        for (room_id, call_id) in asked {
            let event = PeerEvent::AnswerCreated { sdp: ANSWER_SDP.to_owned() };
            calls.handle_input(Input::Peer { room_id, call_id, event, now });
        }
    }
    assert!(calls.active_calls() <= ROOMS.len(), "{} calls in {} rooms", calls.active_calls(), ROOMS.len());
}
