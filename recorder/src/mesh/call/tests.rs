use serde_json::json;

use super::*;

const BOT: &str = "@m:x";
const BOT_DEVICE: &str = "BOT";
const SESSION: &str = "botsess";

fn call() -> MeshCall {
    MeshCall::new(Voip1Config::default(), "g1", BOT, BOT_DEVICE, SESSION)
}

fn key(user: &str, device: &str) -> PeerKey {
    PeerKey { user_id: user.into(), device_id: device.into() }
}

fn device(user: &str, device: &str, session: &str) -> PeerDevice {
    PeerDevice { user_id: user.into(), device_id: device.into(), session_id: session.into() }
}

fn drain(c: &mut MeshCall) -> Vec<MeshOutput> {
    std::iter::from_fn(|| c.poll_output()).collect()
}

fn sent(out: &[MeshOutput]) -> Vec<(&str, &str, &Value)> {
    out.iter()
        .filter_map(|o| match o {
            MeshOutput::SendToDevice { user_id, event_type, content, .. } => Some((user_id.as_str(), *event_type, content)),
            _ => None,
        })
        .collect()
}

fn commands(out: &[MeshOutput]) -> Vec<(&PeerKey, &PeerCommand)> {
    out.iter()
        .filter_map(|o| match o {
            MeshOutput::Peer { peer, cmd, .. } => Some((peer, cmd)),
            _ => None,
        })
        .collect()
}

fn ignored(out: &[MeshOutput]) -> Vec<&MeshIgnore> {
    out.iter()
        .filter_map(|o| match o {
            MeshOutput::Ignored { reason, .. } => Some(reason),
            _ => None,
        })
        .collect()
}

/// A to-device call message from `user`'s `device` in session `session`, as js-sdk wraps it.
fn msg(user: &str, device: &str, session: &str, event_type: &str, seq: u64, call_id: &str, body: Value) -> MeshInput {
    let mut content = json!({"call_id": call_id, "party_id": device, "version": "1", "conf_id": "g1",
        "device_id": device, "sender_session_id": session, "dest_session_id": SESSION, "seq": seq});
    for (k, v) in body.as_object().unwrap() {
        content[k] = v.clone();
    }
    MeshInput::ToDevice { sender: user.into(), event_type: event_type.into(), content, now: UnixMs(1000) }
}

fn invite(user: &str, device: &str, session: &str, call_id: &str) -> MeshInput {
    msg(user, device, session, "m.call.invite", 0, call_id, json!({"offer": {"type": "offer", "sdp": "v=0 offer"}, "lifetime": 60000, "invitee": BOT}))
}

fn outgoing_call_id(out: &[MeshOutput]) -> CallId {
    out.iter()
        .find_map(|o| match o {
            MeshOutput::Peer { call_id, cmd: PeerCommand::CreateOffer, .. } => Some(call_id.clone()),
            _ => None,
        })
        .expect("an offer was asked for")
}

#[test]
fn the_bot_calls_devices_that_sort_above_it_and_waits_for_the_others() {
    let mut c = call();
    assert!(c.bot_calls(&key("@z:x", "Z")));
    assert!(!c.bot_calls(&key("@a:x", "A")));
    assert!(c.bot_calls(&key(BOT, "CCC")), "another device of the bot's user sorting above");
    assert!(!c.bot_calls(&key(BOT, "AAA")));
    c.handle_input(MeshInput::Devices { devices: vec![device("@a:x", "A", "sa"), device("@z:x", "Z", "sz"), device(BOT, BOT_DEVICE, SESSION)], now: UnixMs(0) });
    let out = drain(&mut c);
    let cmds = commands(&out);
    assert_eq!(cmds.len(), 1, "{out:?}");
    assert_eq!(cmds[0], (&key("@z:x", "Z"), &PeerCommand::CreateOffer));
    assert!(sent(&out).is_empty(), "nothing is sent before the offer exists");
}

#[test]
fn a_placed_call_invites_selects_the_answer_and_records() {
    let mut c = call();
    c.handle_input(MeshInput::Devices { devices: vec![device("@z:x", "Z", "sz")], now: UnixMs(0) });
    let id = outgoing_call_id(&drain(&mut c));
    let z = key("@z:x", "Z");
    c.handle_input(MeshInput::Peer { peer: z.clone(), call_id: id.clone(), event: PeerEvent::OfferCreated { sdp: "v=0 ours".into() }, now: UnixMs(10) });
    let out = drain(&mut c);
    let s = sent(&out);
    assert_eq!(s.len(), 1);
    let (to, ty, inv) = s[0];
    assert_eq!((to, ty), ("@z:x", "m.call.invite"));
    assert_eq!(inv["offer"]["sdp"], "v=0 ours");
    assert_eq!(inv["invitee"], "@z:x");
    assert_eq!(inv["lifetime"], 60000);
    assert_eq!((inv["conf_id"].as_str(), inv["device_id"].as_str(), inv["party_id"].as_str()), (Some("g1"), Some(BOT_DEVICE), Some(BOT_DEVICE)));
    assert_eq!((inv["sender_session_id"].as_str(), inv["dest_session_id"].as_str(), inv["seq"].as_u64()), (Some(SESSION), Some("sz"), Some(0)));

    let answer = msg("@z:x", "Z", "sz", "m.call.answer", 0, &id.0, json!({"answer": {"type": "answer", "sdp": "v=0 theirs"}}));
    c.handle_input(answer);
    let out = drain(&mut c);
    let s = sent(&out);
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].1, "m.call.select_answer");
    assert_eq!(s[0].2["selected_party_id"], "Z");
    assert_eq!(s[0].2["seq"], 1);
    assert!(commands(&out).contains(&(&z, &PeerCommand::ApplyRemoteAnswer { sdp: "v=0 theirs".into() })));
    assert!(out.iter().any(|o| matches!(o, MeshOutput::Record { action: RecordAction::Start { caller, .. }, .. } if caller.0 == "@z:x")));
}

#[test]
fn an_invite_is_answered_in_seq_order_to_the_sender_session() {
    let mut c = call();
    c.handle_input(MeshInput::Devices { devices: vec![device("@a:x", "A", "sa")], now: UnixMs(0) });
    assert!(commands(&drain(&mut c)).is_empty(), "a calls the bot");
    // Candidates (seq 1) overtake the invite (seq 0).
    let cands = msg("@a:x", "A", "sa2", "m.call.candidates", 1, "c1", json!({"candidates": [{"candidate": "candidate:1 1 udp 1 127.0.0.1 5000 typ host", "sdpMid": "0", "sdpMLineIndex": 0}]}));
    c.handle_input(cands);
    assert!(commands(&drain(&mut c)).is_empty(), "held until seq 0 comes");
    c.handle_input(invite("@a:x", "A", "sa2", "c1"));
    let out = drain(&mut c);
    let cmds: Vec<&PeerCommand> = commands(&out).into_iter().map(|(_, c)| c).collect();
    assert!(matches!(cmds[..], [PeerCommand::ApplyRemoteOffer { .. }, PeerCommand::CreateAnswer, PeerCommand::AddRemoteCandidates(_)]), "{cmds:?}");
    let a = key("@a:x", "A");
    c.handle_input(MeshInput::Peer { peer: a.clone(), call_id: CallId("c1".into()), event: PeerEvent::AnswerCreated { sdp: "v=0 answer".into() }, now: UnixMs(1100) });
    let out = drain(&mut c);
    let s = sent(&out);
    assert_eq!(s[0].1, "m.call.answer");
    assert_eq!(s[0].2["dest_session_id"], "sa2", "the invite's session, newer than the member event's");
    assert_eq!(s[0].2["seq"], 0);
    // The same candidates again are a duplicate.
    let again = msg("@a:x", "A", "sa2", "m.call.candidates", 1, "c1", json!({"candidates": []}));
    c.handle_input(again);
    assert_eq!(ignored(&drain(&mut c)), vec![&MeshIgnore::Duplicate { seq: 1 }]);
}

#[test]
fn messages_for_others_and_malformed_ones_are_dropped() {
    let mut c = call();
    let mut other_session = invite("@a:x", "A", "sa", "c1");
    let mut other_call = invite("@a:x", "A", "sa", "c2");
    let mut plain = invite("@a:x", "A", "sa", "c3");
    if let MeshInput::ToDevice { content, .. } = &mut other_session {
        content["dest_session_id"] = "someone-else".into();
    }
    if let MeshInput::ToDevice { content, .. } = &mut other_call {
        content["conf_id"] = "g2".into();
    }
    if let MeshInput::ToDevice { content, .. } = &mut plain {
        content.as_object_mut().unwrap().remove("conf_id");
    }
    let no_offer = msg("@a:x", "A", "sa", "m.call.invite", 0, "c4", json!({"lifetime": 60000}));
    let bad_seq = MeshInput::ToDevice {
        sender: "@a:x".into(),
        event_type: "m.call.invite".into(),
        content: json!({"call_id": "c5", "conf_id": "g1", "device_id": "A", "sender_session_id": "sa", "dest_session_id": SESSION, "seq": "one"}),
        now: UnixMs(0),
    };
    for input in [other_session, other_call, plain, no_offer, bad_seq] {
        c.handle_input(input);
    }
    let out = drain(&mut c);
    assert!(commands(&out).is_empty() && sent(&out).is_empty(), "{out:?}");
    let reasons = ignored(&out);
    assert_eq!(reasons.len(), 5);
    assert_eq!(reasons[0], &MeshIgnore::OtherSession);
    assert_eq!(reasons[1], &MeshIgnore::OtherGroupCall { conf_id: "g2".into() });
    assert_eq!(reasons[2], &MeshIgnore::NotGroupCall);
    assert!(matches!(reasons[3], MeshIgnore::Malformed(_)));
    assert!(matches!(reasons[4], MeshIgnore::Malformed(_)));
    // The machine still works.
    c.handle_input(invite("@a:x", "A", "sa", "c9"));
    assert!(!commands(&drain(&mut c)).is_empty());
}

/// Answers a's invite and connects it; returns nothing.
fn answered(c: &mut MeshCall, call_id: &str) {
    c.handle_input(MeshInput::Devices { devices: vec![device("@a:x", "A", "sa")], now: UnixMs(0) });
    c.handle_input(invite("@a:x", "A", "sa", call_id));
    c.handle_input(MeshInput::Peer { peer: key("@a:x", "A"), call_id: CallId(call_id.into()), event: PeerEvent::AnswerCreated { sdp: "v=0 a".into() }, now: UnixMs(1100) });
    c.handle_input(MeshInput::Peer { peer: key("@a:x", "A"), call_id: CallId(call_id.into()), event: PeerEvent::PeerConnected, now: UnixMs(1200) });
    drain(c);
}

#[test]
fn a_device_that_leaves_is_hung_up_on_and_its_recording_part_stops() {
    let mut c = call();
    answered(&mut c, "c1");
    c.handle_input(MeshInput::Devices { devices: vec![], now: UnixMs(5000) });
    let out = drain(&mut c);
    let s = sent(&out);
    assert_eq!(s.len(), 1);
    assert_eq!((s[0].1, s[0].2["reason"].as_str()), ("m.call.hangup", Some("user_hangup")));
    assert!(out.iter().any(|o| matches!(o, MeshOutput::Record { action: RecordAction::Stop { .. }, .. })));
    assert_eq!(c.active_calls(), 0);
    // A late message of that call.
    c.handle_input(msg("@a:x", "A", "sa", "m.call.hangup", 2, "c1", json!({"reason": "user_hangup"})));
    assert!(sent(&drain(&mut c)).is_empty());
}

#[test]
fn a_new_invite_replaces_the_devices_call() {
    let mut c = call();
    answered(&mut c, "c1");
    c.handle_input(invite("@a:x", "A", "sa3", "c2"));
    let out = drain(&mut c);
    let s = sent(&out);
    assert_eq!(s[0].1, "m.call.hangup", "the old call is hung up first");
    assert_eq!(s[0].2["call_id"], "c1");
    let cmds = commands(&out);
    assert!(cmds.iter().any(|(_, c)| matches!(c, PeerCommand::ApplyRemoteOffer { .. })));
    assert!(out.iter().any(|o| matches!(o, MeshOutput::Peer { call_id, cmd: PeerCommand::ApplyRemoteOffer { .. }, .. } if call_id.0 == "c2")));
}

#[test]
fn an_unanswered_placed_call_is_retried_three_times() {
    let mut c = call();
    c.handle_input(MeshInput::Devices { devices: vec![device("@z:x", "Z", "sz")], now: UnixMs(0) });
    let z = key("@z:x", "Z");
    let mut now = 0;
    let mut placed = 0;
    loop {
        let out = drain(&mut c);
        if let Some(id) = out.iter().find_map(|o| match o {
            MeshOutput::Peer { call_id, cmd: PeerCommand::CreateOffer, .. } => Some(call_id.clone()),
            _ => None,
        }) {
            placed += 1;
            c.handle_input(MeshInput::Peer { peer: z.clone(), call_id: id, event: PeerEvent::OfferCreated { sdp: "v=0".into() }, now: UnixMs(now) });
        }
        let Some(next) = c.next_deadline() else { break };
        now = next.0;
        c.handle_input(MeshInput::Tick { now: UnixMs(now) });
        if now > 10 * 60_000 {
            panic!("still calling after 10 minutes");
        }
    }
    assert_eq!(placed, MAX_ATTEMPTS as usize);
    assert_eq!(c.active_calls(), 0);
}

#[test]
fn a_rejoined_device_gets_a_new_call() {
    let mut c = call();
    c.handle_input(MeshInput::Devices { devices: vec![device("@z:x", "Z", "sz")], now: UnixMs(0) });
    let first = outgoing_call_id(&drain(&mut c));
    c.handle_input(MeshInput::Devices { devices: vec![device("@z:x", "Z", "sz-new")], now: UnixMs(100) });
    let out = drain(&mut c);
    let second = outgoing_call_id(&out);
    assert_ne!(first, second);
    assert!(out.iter().any(|o| matches!(o, MeshOutput::Peer { call_id, cmd: PeerCommand::Close, .. } if *call_id == first)));
}

#[test]
fn stopping_hangs_up_everyone_and_refuses_new_invites() {
    let mut c = call();
    answered(&mut c, "c1");
    c.handle_input(MeshInput::Devices { devices: vec![device("@a:x", "A", "sa"), device("@z:x", "Z", "sz")], now: UnixMs(2000) });
    drain(&mut c);
    assert_eq!(c.active_calls(), 2);
    c.handle_input(MeshInput::Stop { now: UnixMs(3000) });
    let out = drain(&mut c);
    assert_eq!(sent(&out).iter().filter(|s| s.1 == "m.call.hangup").count(), 1, "z's invite had not gone out: nothing to hang up");
    assert!(c.is_done());
    c.handle_input(invite("@b:x", "B", "sb", "c7"));
    assert_eq!(ignored(&drain(&mut c)), vec![&MeshIgnore::Leaving]);
    assert_eq!(c.next_deadline(), None, "no retry after a stop");
}

#[test]
fn a_gap_that_never_fills_is_skipped() {
    let mut c = call();
    c.handle_input(invite("@a:x", "A", "sa", "c1"));
    drain(&mut c);
    // seq 1 is lost; 2..=66 arrive.
    for seq in 2..=(MAX_HELD as u64 + 2) {
        c.handle_input(msg("@a:x", "A", "sa", "m.call.candidates", seq, "c1", json!({"candidates": [{"candidate": format!("candidate:{seq} 1 udp 1 127.0.0.1 {seq} typ host"), "sdpMid": "0"}]})));
    }
    let out = drain(&mut c);
    assert!(ignored(&out).contains(&&MeshIgnore::GapSkipped { from: 1, to: 2 }), "{:?}", ignored(&out));
    let added = commands(&out).iter().filter(|(_, c)| matches!(c, PeerCommand::AddRemoteCandidates(_))).count();
    assert_eq!(added, MAX_HELD + 1);
}
