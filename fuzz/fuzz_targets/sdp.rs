//! An offer SDP (and its ICE candidates) on the way the recorder takes it: inside an
//! `m.call.invite` through the 1:1 call machines (`Voip1Calls`), which bound and hand it on as
//! `ApplyRemoteOffer`; applied to a webrtc-rs connection configured like every `RecvPeer`, which
//! parses it, negotiates and answers; the answer (or the failure) back into the call machine,
//! which puts the answer in the `m.call.answer` it sends (or hangs up).
//!
//! Input: the offer SDP; after a NUL byte, ICE candidate lines for an `m.call.candidates`.
//!
//! Checks: the SDP the edge is asked to apply is the one offered, within the parse limit; what
//! the bot sends parses with its own strict parser, names the call, and carries the answer SDP
//! unchanged.

#![no_main]

use libfuzzer_sys::fuzz_target;
use recorder::voip1::events::{self, CallEvent};
use recorder::voip1::{
    Action, Input, PeerCommand, PeerEvent, RoomEvent, RoomId, UnixMs, UserId, Voip1Calls, Voip1Config,
};
use serde_json::json;

const NOW: UnixMs = UnixMs(1_750_000_000_000);

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (sdp, candidates) = text.split_once('\0').unwrap_or((text, ""));

    let cfg = Voip1Config::default();
    let max_sdp = cfg.limits.max_sdp_bytes;
    let mut calls = Voip1Calls::new(cfg, UserId::from("@mxrec:example.org"), "BOTDEVICE".into());
    let room = RoomId::from("!room:example.org");
    let event = |event_type: &str, content: serde_json::Value| {
        Input::Room(RoomEvent {
            room_id: room.clone(),
            sender: UserId::from("@alice:example.org"),
            event_type: event_type.to_owned(),
            content,
            origin_server_ts: NOW,
            unsigned_age_ms: Some(0),
            joined_members: 2,
            now: NOW,
        })
    };
    calls.handle_input(event(
        events::INVITE,
        json!({"call_id": "c1", "party_id": "ALICE", "version": "1", "lifetime": 60000,
               "offer": {"type": "offer", "sdp": sdp}}),
    ));
    let lines: Vec<serde_json::Value> = candidates
        .lines()
        .take(100)
        .map(|c| json!({"candidate": c, "sdpMid": "0", "sdpMLineIndex": 0}))
        .collect();
    if !lines.is_empty() {
        calls.handle_input(event(
            events::CANDIDATES,
            json!({"call_id": "c1", "party_id": "ALICE", "version": "1", "candidates": lines}),
        ));
    }

    let mut offer = None;
    let mut remote_candidates = Vec::new();
    let mut create_answer = false;
    for action in drain(&mut calls) {
        match action {
            Action::Peer(PeerCommand::ApplyRemoteOffer { sdp: applied }) => {
                assert_eq!(applied, sdp, "the edge is asked to apply another SDP than offered");
                assert!(applied.len() <= max_sdp, "a {}-byte SDP got past the limit", applied.len());
                offer = Some(applied);
            }
            Action::Peer(PeerCommand::AddRemoteCandidates(c)) => remote_candidates.extend(c),
            Action::Peer(PeerCommand::CreateAnswer) => create_answer = true,
            _ => {}
        }
    }
    let Some(offer) = offer else { return };

    let result = recorder::fuzzing::answer_offer(&offer, &remote_candidates);
    if !create_answer {
        return;
    }
    let reply = match &result {
        Ok(answer) => PeerEvent::AnswerCreated { sdp: answer.clone() },
        Err(e) => PeerEvent::PeerFailed { reason: recorder::voip1::PeerFailure::SetRemoteDescription(e.clone()) },
    };
    calls.handle_input(Input::Peer { room_id: room.clone(), call_id: "c1".into(), event: reply, now: NOW });
    let mut answered = false;
    for action in drain(&mut calls) {
        let Action::SendRoomEvent { event_type, content } = action else { continue };
        if let (events::ANSWER, Ok(answer)) = (event_type, &result) {
            match events::parse(event_type, &content) {
                Ok(CallEvent::Answer(a)) => assert_eq!(&a.answer_sdp, answer, "the answer sent is not the answer made"),
                other => panic!("the answer sent does not parse back: {other:?}"),
            }
            answered = true;
        }
    }
    assert_eq!(answered, result.is_ok(), "answer made: {}, answer sent: {answered}", result.is_ok());
});

/// Everything the machines want done; every event the bot sends must pass its own parser.
fn drain(calls: &mut Voip1Calls) -> Vec<Action> {
    let mut out = Vec::new();
    while let Some(o) = calls.poll_output() {
        assert_eq!(o.room_id.as_str(), "!room:example.org");
        if let Action::SendRoomEvent { event_type, content } = &o.action {
            let ev = events::parse(event_type, content)
                .unwrap_or_else(|e| panic!("the bot sends a {event_type} it would refuse: {e}\n{content}"));
            assert_eq!(ev.common().call_id.as_str(), "c1");
            assert_eq!(ev.common().party_id.as_ref().map(|p| p.as_str()), Some("BOTDEVICE"));
        }
        out.push(o.action);
    }
    out
}
