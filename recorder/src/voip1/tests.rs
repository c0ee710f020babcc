//! Scenario tests: JSON shaped like matrix-js-sdk's (`call.ts`: party_id = device id, version
//! "1", lifetime 60000, stable metadata key, candidate batches ending in `{"candidate": ""}`)
//! driven through [`Voip1Calls`], asserting the exact actions that come out.

use serde_json::{json, Value};

use super::call::{
    Action, IgnoreReason, PeerCommand, PeerEvent, PeerFailure, Purpose, RecordAction, StopReason,
    Timeout, TrackKind,
};
use super::calls::{Input, Output, RoomEvent, Voip1Calls};
use super::events::{Candidate, ParseError};
use super::{CallId, PartyId, RoomId, UnixMs, UserId, Voip1Config};

const BOT: &str = "@mxrec:localhost";
const OUR_PARTY: &str = "MXRECDEVICE";
const ALICE: &str = "@alice:localhost";
const ALICE_PARTY: &str = "ALICEDEVICE";
const ROOM: &str = "!dm:localhost";
const CALL: &str = "1700000000000aBcDeFgHiJkLmNoPq";
const T0: u64 = 1_700_000_000_000;

const OFFER: &str = "v=0\r\no=- 4611731400430051336 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n\
a=group:BUNDLE 0 1\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\na=sendrecv\r\n\
a=msid:usermedia-1 audio-1\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:1\r\na=sendrecv\r\n\
a=msid:usermedia-1 video-1\r\n";
const HOST: &str = "candidate:1966762133 1 udp 2122260223 127.0.0.1 50000 typ host";
const ANSWER_SDP: &str = "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0 1\r\n\
m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\na=recvonly\r\n\
a=candidate:167090039 1 udp 2130706431 127.0.0.1 40000 typ host\r\na=end-of-candidates\r\n\
m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:1\r\na=recvonly\r\n";
const OUR_HOST: &str = "candidate:167090039 1 udp 2130706431 127.0.0.1 40000 typ host";
/// An answer taken before gathering finished: no candidates, no end-of-candidates.
const BARE_ANSWER_SDP: &str = "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n\
m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\na=recvonly\r\n";

struct Harness {
    calls: Voip1Calls,
    now: u64,
    joined: usize,
}

impl Harness {
    fn new() -> Self {
        Self::with(Voip1Config::default())
    }

    fn with(cfg: Voip1Config) -> Self {
        Harness {
            calls: Voip1Calls::new(cfg, UserId::from(BOT), PartyId::from(OUR_PARTY)),
            now: T0,
            joined: 2,
        }
    }

    fn at(&mut self, ms_after_t0: u64) -> &mut Self {
        self.now = T0 + ms_after_t0;
        self
    }

    /// A room event sent 100 ms ago.
    fn room(&mut self, sender: &str, event_type: &str, content: Value) -> Vec<Action> {
        self.room_aged(sender, event_type, content, 100)
    }

    fn room_aged(
        &mut self,
        sender: &str,
        event_type: &str,
        content: Value,
        age: u64,
    ) -> Vec<Action> {
        let ev = RoomEvent {
            room_id: RoomId::from(ROOM),
            sender: UserId::from(sender),
            event_type: event_type.to_owned(),
            content,
            origin_server_ts: UnixMs(self.now - age),
            unsigned_age_ms: Some(age),
            joined_members: self.joined,
            now: UnixMs(self.now),
        };
        self.input(Input::Room(ev))
    }

    fn peer(&mut self, event: PeerEvent) -> Vec<Action> {
        self.peer_for(CALL, event)
    }

    fn peer_for(&mut self, call: &str, event: PeerEvent) -> Vec<Action> {
        let now = UnixMs(self.now);
        self.input(Input::Peer {
            room_id: RoomId::from(ROOM),
            call_id: CallId::from(call),
            event,
            now,
        })
    }

    fn tick(&mut self) -> Vec<Action> {
        let now = UnixMs(self.now);
        self.input(Input::Tick { now })
    }

    fn stop(&mut self) -> Vec<Action> {
        let now = UnixMs(self.now);
        self.input(Input::Stop {
            room_id: RoomId::from(ROOM),
            call_id: CallId::from(CALL),
            now,
        })
    }

    fn input(&mut self, input: Input) -> Vec<Action> {
        self.calls.handle_input(input);
        let mut v = Vec::new();
        while let Some(Output {
            room_id, action, ..
        }) = self.calls.poll_output()
        {
            assert_eq!(room_id, RoomId::from(ROOM));
            v.push(action);
        }
        v
    }

    /// Invite + AnswerCreated (full SDP): the call is answered and recording.
    fn answered(&mut self) {
        self.room(ALICE, "m.call.invite", invite());
        let out = self.peer(PeerEvent::AnswerCreated {
            sdp: ANSWER_SDP.into(),
        });
        assert!(matches!(
            out.as_slice(),
            [
                Action::SendRoomEvent { .. },
                Action::Record(RecordAction::Start { .. }),
                ..
            ]
        ));
    }
}

fn with(mut base: Value, extra: Value) -> Value {
    base.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    base
}

fn common(party: &str) -> Value {
    json!({"call_id": CALL, "party_id": party, "version": "1"})
}

fn invite() -> Value {
    with(
        common(ALICE_PARTY),
        json!({
            "lifetime": 60000,
            "offer": {"type": "offer", "sdp": OFFER},
            "capabilities": {"m.call.transferee": false, "m.call.dtmf": false},
            "sdp_stream_metadata": {"usermedia-1": {"purpose": "m.usermedia", "audio_muted": false, "video_muted": false}}
        }),
    )
}

fn candidates(list: Value) -> Value {
    with(common(ALICE_PARTY), json!({ "candidates": list }))
}

fn cand(c: &str, mid: &str, idx: u16) -> Candidate {
    Candidate {
        candidate: c.into(),
        sdp_mid: Some(mid.into()),
        sdp_mline_index: Some(idx),
    }
}

fn send(event_type: &'static str, content: Value) -> Action {
    Action::SendRoomEvent {
        event_type,
        content,
    }
}

fn ours(extra: Value) -> Value {
    with(
        json!({"call_id": CALL, "party_id": OUR_PARTY, "version": "1"}),
        extra,
    )
}

fn stop(reason: StopReason, at: u64) -> Action {
    Action::Record(RecordAction::Stop {
        reason,
        at: UnixMs(T0 + at),
    })
}

fn label(stream: &str, track: &str, kind: TrackKind, purpose: Purpose) -> Action {
    Action::Record(RecordAction::TrackLabel {
        stream_id: stream.into(),
        track_id: track.into(),
        kind,
        purpose,
    })
}

fn track(stream: &str, track: &str, kind: TrackKind) -> PeerEvent {
    PeerEvent::TrackOpened {
        stream_id: stream.into(),
        track_id: track.into(),
        kind,
    }
}

fn answer_json(sdp: &str) -> Value {
    ours(json!({
        "answer": {"type": "answer", "sdp": sdp},
        "capabilities": {"m.call.transferee": false, "m.call.dtmf": false},
        "sdp_stream_metadata": {}
    }))
}

const CLOSE: Action = Action::Peer(PeerCommand::Close);

#[test]
fn happy_path() {
    let mut h = Harness::new();
    assert_eq!(
        h.room(ALICE, "m.call.invite", invite()),
        vec![
            Action::Peer(PeerCommand::ApplyRemoteOffer { sdp: OFFER.into() }),
            Action::Peer(PeerCommand::CreateAnswer)
        ]
    );
    // js-sdk trickles a batch, then the end-of-candidates marker (not forwarded).
    h.at(300);
    assert_eq!(
        h.room(
            ALICE,
            "m.call.candidates",
            candidates(json!([{"candidate": HOST, "sdpMid": "0", "sdpMLineIndex": 0}]))
        ),
        vec![Action::Peer(PeerCommand::AddRemoteCandidates(vec![cand(
            HOST, "0", 0
        )]))]
    );
    assert_eq!(
        h.room(
            ALICE,
            "m.call.candidates",
            candidates(json!([{"candidate": ""}]))
        ),
        vec![]
    );
    // Our own gathering, before the answer: nothing goes out yet.
    h.at(400);
    let ours_host = PeerEvent::LocalCandidate {
        candidate: OUR_HOST.into(),
        sdp_mid: Some("".into()),
        sdp_mline_index: Some(0),
    };
    assert_eq!(h.peer(ours_host), vec![]);
    assert_eq!(h.peer(PeerEvent::GatheringComplete), vec![]);
    // The answer carries the candidate and end-of-candidates: nothing to trickle.
    h.at(500);
    assert_eq!(
        h.peer(PeerEvent::AnswerCreated {
            sdp: ANSWER_SDP.into()
        }),
        vec![
            send("m.call.answer", answer_json(ANSWER_SDP)),
            Action::Record(RecordAction::Start {
                caller: UserId::from(ALICE),
                caller_party: Some(PartyId::from(ALICE_PARTY)),
                at: UnixMs(T0 + 500)
            }),
        ]
    );
    // Our answer echoes back through sync.
    assert_eq!(
        h.room(BOT, "m.call.answer", answer_json(ANSWER_SDP)),
        vec![Action::Ignored(IgnoreReason::Echo)]
    );
    h.at(700);
    assert_eq!(
        h.room(
            ALICE,
            "m.call.select_answer",
            with(common(ALICE_PARTY), json!({"selected_party_id": OUR_PARTY}))
        ),
        vec![]
    );
    assert_eq!(h.peer(PeerEvent::PeerConnected), vec![]);
    assert_eq!(
        h.peer(track("usermedia-1", "audio-1", TrackKind::Audio)),
        vec![label(
            "usermedia-1",
            "audio-1",
            TrackKind::Audio,
            Purpose::Camera
        )]
    );
    assert_eq!(
        h.peer(track("usermedia-1", "video-1", TrackKind::Video)),
        vec![label(
            "usermedia-1",
            "video-1",
            TrackKind::Video,
            Purpose::Camera
        )]
    );
    h.at(120_000);
    assert_eq!(
        h.tick(),
        vec![],
        "a connected, selected call has no timeouts"
    );
    assert_eq!(h.calls.next_deadline(), None);
    assert_eq!(
        h.room(
            ALICE,
            "m.call.hangup",
            with(common(ALICE_PARTY), json!({"reason": "user_hangup"}))
        ),
        vec![
            CLOSE,
            stop(
                StopReason::RemoteHangup {
                    reason: Some("user_hangup".into())
                },
                120_000
            )
        ]
    );
    assert_eq!(h.calls.active_calls(), 0);
    assert_eq!(
        h.room(
            ALICE,
            "m.call.candidates",
            candidates(json!([{"candidate": HOST}]))
        ),
        vec![Action::Ignored(IgnoreReason::CallEnded)]
    );
    assert_eq!(
        h.peer(PeerEvent::PeerConnected),
        vec![],
        "late peer events of an ended call are silent"
    );
}

#[test]
fn candidates_before_the_invite_are_held_and_applied_after_the_offer() {
    let mut h = Harness::new();
    assert_eq!(
        h.room(
            ALICE,
            "m.call.candidates",
            candidates(json!([{"candidate": HOST, "sdpMid": "0", "sdpMLineIndex": 0}]))
        ),
        vec![Action::Ignored(IgnoreReason::HeldForInvite)]
    );
    assert_eq!(
        h.room(ALICE, "m.call.invite", invite()),
        vec![
            Action::Peer(PeerCommand::ApplyRemoteOffer { sdp: OFFER.into() }),
            Action::Peer(PeerCommand::CreateAnswer),
            Action::Peer(PeerCommand::AddRemoteCandidates(vec![cand(HOST, "0", 0)])),
        ]
    );
}

#[test]
fn held_candidates_expire() {
    let mut h = Harness::new();
    h.room(
        ALICE,
        "m.call.candidates",
        candidates(json!([{"candidate": HOST}])),
    );
    h.at(10_000);
    assert_eq!(h.tick(), vec![]);
    assert_eq!(
        h.room(ALICE, "m.call.invite", invite()).len(),
        2,
        "no stale candidates replayed"
    );
}

#[test]
fn candidates_during_answering_go_straight_to_the_peer() {
    let mut h = Harness::new();
    h.room(ALICE, "m.call.invite", invite());
    assert_eq!(
        h.room(
            ALICE,
            "m.call.candidates",
            candidates(json!([{"candidate": HOST, "sdpMid": "0", "sdpMLineIndex": 0}]))
        ),
        vec![Action::Peer(PeerCommand::AddRemoteCandidates(vec![cand(
            HOST, "0", 0
        )]))]
    );
}

#[test]
fn local_candidates_missing_from_the_answer_are_trickled_in_batches() {
    let mut h = Harness::new();
    h.room(ALICE, "m.call.invite", invite());
    let srflx =
        "candidate:842163049 1 udp 1677729535 203.0.113.7 40001 typ srflx raddr 0.0.0.0 rport 0";
    let relay =
        "candidate:3 1 udp 41885439 198.51.100.1 3478 typ relay raddr 203.0.113.7 rport 40001";
    let local = |c: &str| PeerEvent::LocalCandidate {
        candidate: c.into(),
        sdp_mid: Some("".into()),
        sdp_mline_index: Some(0),
    };
    // One candidate gathered before the answer but not in its SDP (gathering timed out).
    h.at(100);
    h.peer(local(srflx));
    h.at(2_000);
    assert_eq!(
        h.peer(PeerEvent::AnswerCreated {
            sdp: BARE_ANSWER_SDP.into()
        }),
        vec![
            send("m.call.answer", answer_json(BARE_ANSWER_SDP)),
            Action::Record(RecordAction::Start {
                caller: UserId::from(ALICE),
                caller_party: Some(PartyId::from(ALICE_PARTY)),
                at: UnixMs(T0 + 2_000)
            }),
            // sdpMid "" replaced by the answer's first mid.
            send(
                "m.call.candidates",
                ours(
                    json!({"candidates": [{"candidate": srflx, "sdpMid": "0", "sdpMLineIndex": 0}]})
                )
            ),
        ]
    );
    // A later candidate waits for the 200 ms batch window.
    h.at(2_050);
    assert_eq!(h.peer(local(relay)), vec![]);
    assert_eq!(h.calls.next_deadline(), Some(UnixMs(T0 + 2_250)));
    h.at(2_200);
    assert_eq!(h.tick(), vec![]);
    h.at(2_250);
    assert_eq!(
        h.tick(),
        vec![send(
            "m.call.candidates",
            ours(json!({"candidates": [{"candidate": relay, "sdpMid": "0", "sdpMLineIndex": 0}]}))
        )]
    );
    // Gathering completes: the end-of-candidates marker, exactly once.
    assert_eq!(
        h.peer(PeerEvent::GatheringComplete),
        vec![send(
            "m.call.candidates",
            ours(json!({"candidates": [{"candidate": ""}]}))
        )]
    );
    assert_eq!(h.peer(PeerEvent::GatheringComplete), vec![]);
}

#[test]
fn expired_invites_are_ignored() {
    let mut h = Harness::new();
    // js-sdk's rule: age > lifetime - 3 s grace.
    assert_eq!(
        h.room_aged(ALICE, "m.call.invite", invite(), 57_001),
        vec![Action::Ignored(IgnoreReason::Expired {
            age_ms: 57_001,
            lifetime_ms: 60_000
        })]
    );
    // Without unsigned.age, origin_server_ts + lifetime against now.
    let ev = RoomEvent {
        room_id: RoomId::from(ROOM),
        sender: UserId::from(ALICE),
        event_type: "m.call.invite".into(),
        content: invite(),
        origin_server_ts: UnixMs(T0 - 3_600_000),
        unsigned_age_ms: None,
        joined_members: 2,
        now: UnixMs(T0),
    };
    assert_eq!(
        h.input(Input::Room(ev)),
        vec![Action::Ignored(IgnoreReason::Expired {
            age_ms: 3_600_000,
            lifetime_ms: 60_000
        })]
    );
    assert_eq!(h.calls.active_calls(), 0);
}

#[test]
fn invite_expiring_while_the_answer_is_made_is_dropped_quietly() {
    let mut h = Harness::new();
    h.room_aged(ALICE, "m.call.invite", invite(), 50_000);
    assert_eq!(h.calls.next_deadline(), Some(UnixMs(T0 + 10_000)));
    h.at(10_000);
    assert_eq!(
        h.tick(),
        vec![
            Action::Warn(format!(
                "call {CALL}: invite expired before the answer was ready"
            )),
            CLOSE
        ]
    );
    assert_eq!(
        h.peer(PeerEvent::AnswerCreated {
            sdp: ANSWER_SDP.into()
        }),
        vec![],
        "no answer after the end"
    );
}

#[test]
fn invite_for_someone_else_or_from_ourselves_is_ignored() {
    let mut h = Harness::new();
    let for_bob = with(invite(), json!({"invitee": "@bob:localhost"}));
    assert_eq!(
        h.room(ALICE, "m.call.invite", for_bob),
        vec![Action::Ignored(IgnoreReason::NotForUs {
            invitee: UserId::from("@bob:localhost")
        })]
    );
    let from_our_other_device = with(invite(), json!({"party_id": "OTHERBOTDEVICE"}));
    assert_eq!(
        h.room(BOT, "m.call.invite", from_our_other_device),
        vec![Action::Ignored(IgnoreReason::OwnInvite)]
    );
    // Addressed to the bot explicitly: taken.
    let for_us = with(invite(), json!({"invitee": BOT}));
    assert_eq!(h.room(ALICE, "m.call.invite", for_us).len(), 2);
}

#[test]
fn echo_of_our_party_is_ignored() {
    let mut h = Harness::new();
    h.answered();
    assert_eq!(
        h.room(
            BOT,
            "m.call.candidates",
            ours(json!({"candidates": [{"candidate": ""}]}))
        ),
        vec![Action::Ignored(IgnoreReason::Echo)]
    );
    assert_eq!(
        h.room(BOT, "m.call.hangup", ours(json!({"reason": "user_hangup"}))),
        vec![Action::Ignored(IgnoreReason::Echo)],
        "our own hangup echo must not end anything"
    );
    assert_eq!(h.calls.active_calls(), 1);
}

#[test]
fn unknown_call_ids_are_ignored() {
    let mut h = Harness::new();
    let other = json!({"call_id": "nope", "party_id": ALICE_PARTY, "version": "1", "reason": "user_hangup"});
    assert_eq!(
        h.room(ALICE, "m.call.hangup", other),
        vec![Action::Ignored(IgnoreReason::UnknownCall)]
    );
    assert_eq!(
        h.peer_for("nope", PeerEvent::PeerConnected),
        vec![Action::Ignored(IgnoreReason::UnknownCall)]
    );
}

#[test]
fn select_answer_for_another_party_stops_without_hangup() {
    let mut h = Harness::new();
    h.answered();
    h.at(1_000);
    assert_eq!(
        h.room(
            ALICE,
            "m.call.select_answer",
            with(
                common(ALICE_PARTY),
                json!({"selected_party_id": "OTHERBOTDEVICE"})
            )
        ),
        vec![CLOSE, stop(StopReason::AnsweredElsewhere, 1_000)]
    );
}

#[test]
fn answer_from_our_other_device_while_answering_leaves_quietly() {
    let mut h = Harness::new();
    h.room(ALICE, "m.call.invite", invite());
    let theirs = with(
        answer_json(ANSWER_SDP),
        json!({"party_id": "OTHERBOTDEVICE"}),
    );
    assert_eq!(h.room(BOT, "m.call.answer", theirs), vec![CLOSE]);
    assert_eq!(
        h.peer(PeerEvent::AnswerCreated {
            sdp: ANSWER_SDP.into()
        }),
        vec![]
    );
}

#[test]
fn renegotiation_adds_a_labelled_screen_share() {
    let mut h = Harness::new();
    h.answered();
    h.peer(track("usermedia-1", "video-1", TrackKind::Video));
    let offer2 = format!("{OFFER}m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:2\r\na=sendonly\r\na=msid:screen-1 screen-video\r\n");
    h.at(30_000);
    let negotiate = with(
        common(ALICE_PARTY),
        json!({
            "description": {"type": "offer", "sdp": offer2},
            "lifetime": 60000,
            "sdp_stream_metadata": {
                "usermedia-1": {"purpose": "m.usermedia", "audio_muted": false, "video_muted": false},
                "screen-1": {"purpose": "m.screenshare", "audio_muted": false, "video_muted": false}
            }
        }),
    );
    assert_eq!(
        h.room(ALICE, "m.call.negotiate", negotiate),
        vec![
            Action::Peer(PeerCommand::ApplyRemoteOffer {
                sdp: offer2.clone()
            }),
            Action::Peer(PeerCommand::CreateAnswer)
        ]
    );
    assert_eq!(
        h.peer(PeerEvent::AnswerCreated {
            sdp: "v=0\r\na=mid:0\r\n".into()
        }),
        vec![send(
            "m.call.negotiate",
            ours(
                json!({"description": {"type": "answer", "sdp": "v=0\r\na=mid:0\r\n"}, "lifetime": 60000, "sdp_stream_metadata": {}})
            )
        )]
    );
    assert_eq!(
        h.peer(track("screen-1", "screen-video", TrackKind::Video)),
        vec![label(
            "screen-1",
            "screen-video",
            TrackKind::Video,
            Purpose::Screen
        )]
    );
    // A second AnswerCreated nobody asked for never produces a second negotiate answer.
    assert_eq!(
        h.peer(PeerEvent::AnswerCreated {
            sdp: "v=0\r\n".into()
        }),
        vec![Action::Ignored(IgnoreReason::UnexpectedAnswerCreated)]
    );
    // We never offer, so a negotiate answer is nonsense.
    let answer = with(
        common(ALICE_PARTY),
        json!({"description": {"type": "answer", "sdp": "v=0"}}),
    );
    assert_eq!(
        h.room(ALICE, "m.call.negotiate", answer),
        vec![Action::Ignored(IgnoreReason::UnsolicitedNegotiateAnswer)]
    );
}

#[test]
fn a_candidate_batch_waits_quietly_while_a_renegotiation_answer_is_made() {
    // The batch is not sent while the answer is being made, so its deadline must not count: a
    // deadline in the past made the runtime tick every millisecond until the answer came.
    let mut h = Harness::new();
    h.answered();
    let relay =
        "candidate:3 1 udp 41885439 198.51.100.1 3478 typ relay raddr 203.0.113.7 rport 40001";
    h.at(3_000);
    let negotiate = with(
        common(ALICE_PARTY),
        json!({"description": {"type": "offer", "sdp": OFFER}, "lifetime": 60000}),
    );
    assert_eq!(
        h.room(ALICE, "m.call.negotiate", negotiate),
        vec![
            Action::Peer(PeerCommand::ApplyRemoteOffer { sdp: OFFER.into() }),
            Action::Peer(PeerCommand::CreateAnswer)
        ]
    );
    h.at(3_010);
    assert_eq!(
        h.peer(PeerEvent::LocalCandidate {
            candidate: relay.into(),
            sdp_mid: Some("0".into()),
            sdp_mline_index: Some(0),
        }),
        vec![]
    );
    h.at(3_500); // past the 200 ms batch window, the answer still being made
    assert_eq!(h.tick(), vec![]);
    let next = h.calls.next_deadline().expect("the answer timeout is pending");
    assert!(next > UnixMs(T0 + 3_500), "a deadline in the past while the answer is made: {next:?}");
    // The answer goes out, then the batch with it or on the next tick: exactly once.
    let mut sent = h.peer(PeerEvent::AnswerCreated { sdp: "v=0\r\na=mid:0\r\n".into() });
    h.at(3_700);
    sent.extend(h.tick());
    let batches: Vec<&Action> = sent
        .iter()
        .filter(|a| matches!(a, Action::SendRoomEvent { event_type, .. } if *event_type == "m.call.candidates"))
        .collect();
    assert_eq!(batches.len(), 1, "one candidates event after the answer: {sent:?}");
}

#[test]
fn negotiate_during_the_initial_answer_waits_its_turn() {
    let mut h = Harness::new();
    h.room(ALICE, "m.call.invite", invite());
    let negotiate = with(
        common(ALICE_PARTY),
        json!({"description": {"type": "offer", "sdp": "v=0\r\nrestart"}}),
    );
    assert_eq!(h.room(ALICE, "m.call.negotiate", negotiate), vec![]);
    let out = h.peer(PeerEvent::AnswerCreated {
        sdp: ANSWER_SDP.into(),
    });
    assert_eq!(
        out[2..],
        [
            Action::Peer(PeerCommand::ApplyRemoteOffer {
                sdp: "v=0\r\nrestart".into()
            }),
            Action::Peer(PeerCommand::CreateAnswer)
        ]
    );
}

#[test]
fn track_without_metadata_is_camera_until_metadata_says_otherwise() {
    let mut h = Harness::new();
    h.answered();
    assert_eq!(
        h.peer(track("late-stream", "t1", TrackKind::Video)),
        vec![label(
            "late-stream",
            "t1",
            TrackKind::Video,
            Purpose::Camera
        )]
    );
    let changed = with(
        common(ALICE_PARTY),
        json!({"sdp_stream_metadata": {"late-stream": {"purpose": "m.screenshare"}}}),
    );
    assert_eq!(
        h.room(ALICE, "m.call.sdp_stream_metadata_changed", changed),
        vec![label(
            "late-stream",
            "t1",
            TrackKind::Video,
            Purpose::Screen
        )]
    );
}

#[test]
fn metadata_changes_become_mute_intervals() {
    let mut h = Harness::new();
    h.answered();
    let changed = |a: bool, v: bool| {
        with(
            common(ALICE_PARTY),
            json!({"org.matrix.msc3077.sdp_stream_metadata": {"usermedia-1": {"purpose": "m.usermedia", "audio_muted": a, "video_muted": v}}}),
        )
    };
    let muted = |a: bool, v: bool, at: u64| {
        Action::Record(RecordAction::Muted {
            stream_id: "usermedia-1".into(),
            audio_muted: a,
            video_muted: v,
            at: UnixMs(T0 + at),
        })
    };
    h.at(5_000);
    assert_eq!(
        h.room(
            ALICE,
            "org.matrix.call.sdp_stream_metadata_changed",
            changed(true, false)
        ),
        vec![muted(true, false, 5_000)]
    );
    assert_eq!(
        h.room(
            ALICE,
            "m.call.sdp_stream_metadata_changed",
            changed(true, false)
        ),
        vec![],
        "no change, no output"
    );
    h.at(9_000);
    assert_eq!(
        h.room(
            ALICE,
            "m.call.sdp_stream_metadata_changed",
            changed(false, true)
        ),
        vec![muted(false, true, 9_000)]
    );
    h.at(12_000);
    assert_eq!(
        h.room(
            ALICE,
            "m.call.sdp_stream_metadata_changed",
            changed(false, false)
        ),
        vec![muted(false, false, 12_000)]
    );
}

#[test]
fn muted_at_invite_is_reported_at_start() {
    let mut h = Harness::new();
    let inv = with(
        invite(),
        json!({"sdp_stream_metadata": {"usermedia-1": {"purpose": "m.usermedia", "video_muted": true}}}),
    );
    h.room(ALICE, "m.call.invite", inv);
    let out = h.peer(PeerEvent::AnswerCreated {
        sdp: ANSWER_SDP.into(),
    });
    assert_eq!(
        out[2],
        Action::Record(RecordAction::Muted {
            stream_id: "usermedia-1".into(),
            audio_muted: false,
            video_muted: true,
            at: UnixMs(T0)
        })
    );
}

#[test]
fn hangup_and_reject_from_the_caller_end_the_call_others_do_not() {
    let mut h = Harness::new();
    h.answered();
    let from_elsewhere = with(common("SOMEONEELSE"), json!({"reason": "user_hangup"}));
    assert_eq!(
        h.room(ALICE, "m.call.hangup", from_elsewhere),
        vec![Action::Ignored(IgnoreReason::NotFromOpponent {
            sender: UserId::from(ALICE),
            party_id: Some(PartyId::from("SOMEONEELSE"))
        })]
    );
    assert_eq!(
        h.room(ALICE, "m.call.hangup", common(ALICE_PARTY)),
        vec![CLOSE, stop(StopReason::RemoteHangup { reason: None }, 0)]
    );

    let mut h = Harness::new();
    h.answered();
    assert_eq!(
        h.room(ALICE, "m.call.reject", common(ALICE_PARTY)),
        vec![CLOSE, stop(StopReason::RemoteReject, 0)]
    );
}

#[test]
fn caller_hangup_before_our_answer_closes_without_recording() {
    let mut h = Harness::new();
    h.room(ALICE, "m.call.invite", invite());
    assert_eq!(
        h.room(
            ALICE,
            "m.call.hangup",
            with(common(ALICE_PARTY), json!({"reason": "invite_timeout"}))
        ),
        vec![CLOSE]
    );
}

#[test]
fn malformed_events_are_ignored_with_a_typed_error() {
    let mut h = Harness::new();
    let bad_type = with(invite(), json!({"offer": {"type": "answer", "sdp": OFFER}}));
    assert_eq!(
        h.room(ALICE, "m.call.invite", bad_type),
        vec![Action::Ignored(IgnoreReason::Malformed(
            ParseError::WrongSdpType {
                event_type: "m.call.invite",
                field: "offer.type".into(),
                expected: "offer",
                found: "answer".into()
            }
        ))]
    );
    let mut no_call_id = invite();
    no_call_id.as_object_mut().unwrap().remove("call_id");
    assert_eq!(
        h.room(ALICE, "m.call.invite", no_call_id),
        vec![Action::Ignored(IgnoreReason::Malformed(
            ParseError::MissingField {
                event_type: "m.call.invite",
                field: "call_id".into()
            }
        ))]
    );
    let huge = with(
        invite(),
        json!({"offer": {"type": "offer", "sdp": "a".repeat(300_000)}}),
    );
    assert!(matches!(
        h.room(ALICE, "m.call.invite", huge).as_slice(),
        [Action::Ignored(IgnoreReason::Malformed(
            ParseError::TooLong {
                len: 300_000,
                max: 262_144,
                ..
            }
        ))]
    ));
    let wrong = with(invite(), json!({"lifetime": "60000"}));
    assert!(matches!(
        h.room(ALICE, "m.call.invite", wrong).as_slice(),
        [Action::Ignored(IgnoreReason::Malformed(
            ParseError::WrongType { .. }
        ))]
    ));
    assert_eq!(h.calls.active_calls(), 0);
    // A malformed event of a live call leaves the call alone.
    h.answered();
    assert!(matches!(
        h.room(ALICE, "m.call.candidates", candidates(json!("candidate:1")))
            .as_slice(),
        [Action::Ignored(IgnoreReason::Malformed(
            ParseError::WrongType { .. }
        ))]
    ));
    assert_eq!(h.calls.active_calls(), 1);
}

#[test]
fn candidate_flood_is_capped_with_one_warning() {
    let cfg = Voip1Config {
        max_remote_candidates: 5,
        ..Voip1Config::default()
    };
    let mut h = Harness::with(cfg);
    h.answered();
    let three = |n: u32| {
        let list: Vec<Value> = (0..3).map(|i| json!({"candidate": format!("candidate:{n}{i} 1 udp 1 10.0.0.1 {} typ host", 1000 + i), "sdpMid": "0"})).collect();
        candidates(Value::Array(list))
    };
    let out = h.room(ALICE, "m.call.candidates", three(1));
    assert!(
        matches!(out.as_slice(), [Action::Peer(PeerCommand::AddRemoteCandidates(c))] if c.len() == 3)
    );
    let out = h.room(ALICE, "m.call.candidates", three(2));
    assert!(matches!(
        out.as_slice(),
        [Action::Warn(w), Action::Peer(PeerCommand::AddRemoteCandidates(c))]
            if c.len() == 2 && w.contains("more than 5 remote ICE candidates")
    ));
    assert_eq!(
        h.room(ALICE, "m.call.candidates", three(3)),
        vec![],
        "dropped, and no second warning"
    );
}

#[test]
fn version_0_call() {
    let mut h = Harness::new();
    let v0 = json!({"call_id": CALL, "version": 0, "lifetime": 60000, "offer": {"type": "offer", "sdp": OFFER}});
    assert_eq!(h.room(ALICE, "m.call.invite", v0).len(), 2);
    let out = h.peer(PeerEvent::AnswerCreated {
        sdp: ANSWER_SDP.into(),
    });
    // We still speak version "1" with a party_id, as js-sdk does towards v0 peers.
    assert_eq!(out[0], send("m.call.answer", answer_json(ANSWER_SDP)));
    assert!(matches!(
        &out[1],
        Action::Record(RecordAction::Start {
            caller_party: None,
            ..
        })
    ));
    h.at(40_000);
    h.peer(PeerEvent::PeerConnected);
    assert_eq!(
        h.tick(),
        vec![],
        "no select_answer is expected from a v0 caller"
    );
    let v0_candidates = json!({"call_id": CALL, "version": 0, "candidates": [{"candidate": HOST, "sdpMid": "0", "sdpMLineIndex": 0}]});
    assert_eq!(h.room(ALICE, "m.call.candidates", v0_candidates).len(), 1);
    assert_eq!(
        h.room(
            ALICE,
            "m.call.hangup",
            json!({"call_id": CALL, "version": 0})
        ),
        vec![
            CLOSE,
            stop(StopReason::RemoteHangup { reason: None }, 40_000)
        ]
    );
}

#[test]
fn version_0_stop_before_answer_is_a_hangup_without_reason() {
    let mut h = Harness::new();
    h.room(ALICE, "m.call.invite", json!({"call_id": CALL, "version": 0, "lifetime": 60000, "offer": {"type": "offer", "sdp": OFFER}}));
    assert_eq!(
        h.stop(),
        vec![send("m.call.hangup", ours(json!({}))), CLOSE]
    );
}

#[test]
fn second_invite_in_the_room_is_declined_as_busy() {
    let mut h = Harness::new();
    h.answered();
    let second = with(invite(), json!({"call_id": "second-call"}));
    assert_eq!(
        h.room(ALICE, "m.call.invite", second),
        vec![
            send(
                "m.call.reject",
                json!({"call_id": "second-call", "party_id": OUR_PARTY, "version": "1", "reason": "user_busy"})
            ),
            Action::Ignored(IgnoreReason::Busy {
                active: CallId::from(CALL)
            }),
        ]
    );
    let late = json!({"call_id": "second-call", "party_id": ALICE_PARTY, "version": "1", "candidates": [{"candidate": HOST}]});
    assert_eq!(
        h.room(ALICE, "m.call.candidates", late),
        vec![Action::Ignored(IgnoreReason::CallEnded)]
    );
    assert_eq!(h.calls.active_calls(), 1);
}

#[test]
fn invites_outside_a_two_member_room_are_ignored() {
    let mut h = Harness::new();
    h.joined = 3;
    assert_eq!(
        h.room(ALICE, "m.call.invite", invite()),
        vec![Action::Ignored(IgnoreReason::NotOneToOne {
            joined_members: 3
        })]
    );
}

#[test]
fn duplicates_never_produce_a_second_answer() {
    let mut h = Harness::new();
    h.answered();
    assert_eq!(
        h.room(ALICE, "m.call.invite", invite()),
        vec![Action::Ignored(IgnoreReason::DuplicateInvite)]
    );
    assert_eq!(
        h.peer(PeerEvent::AnswerCreated {
            sdp: ANSWER_SDP.into()
        }),
        vec![Action::Ignored(IgnoreReason::UnexpectedAnswerCreated)]
    );
    h.room(ALICE, "m.call.hangup", common(ALICE_PARTY));
    assert_eq!(
        h.room(ALICE, "m.call.invite", invite()),
        vec![Action::Ignored(IgnoreReason::CallEnded)]
    );
    assert_eq!(
        h.room(ALICE, "m.call.hangup", common(ALICE_PARTY)),
        vec![Action::Ignored(IgnoreReason::CallEnded)]
    );
}

#[test]
fn no_connection_after_the_answer_hangs_up_ice_failed() {
    let mut h = Harness::new();
    h.answered();
    h.room(
        ALICE,
        "m.call.select_answer",
        with(common(ALICE_PARTY), json!({"selected_party_id": OUR_PARTY})),
    );
    assert_eq!(h.calls.next_deadline(), Some(UnixMs(T0 + 30_000)));
    h.at(29_999);
    assert_eq!(h.tick(), vec![]);
    h.at(30_000);
    assert_eq!(
        h.tick(),
        vec![
            send("m.call.hangup", ours(json!({"reason": "ice_failed"}))),
            CLOSE,
            stop(StopReason::Timeout(Timeout::Connect), 30_000)
        ]
    );
}

#[test]
fn connected_but_never_selected_hangs_up() {
    let cfg = Voip1Config {
        select_answer_timeout_ms: 20_000,
        ..Voip1Config::default()
    };
    let mut h = Harness::with(cfg);
    h.answered();
    h.peer(PeerEvent::PeerConnected);
    h.at(20_000);
    assert_eq!(
        h.tick(),
        vec![
            send("m.call.hangup", ours(json!({"reason": "unknown_error"}))),
            CLOSE,
            stop(StopReason::Timeout(Timeout::SelectAnswer), 20_000)
        ]
    );
}

#[test]
fn no_answer_from_the_edge_rejects() {
    let mut h = Harness::new();
    h.room(ALICE, "m.call.invite", invite());
    h.at(10_000);
    assert_eq!(
        h.tick(),
        vec![
            send("m.call.reject", ours(json!({"reason": "unknown_error"}))),
            CLOSE
        ]
    );
}

#[test]
fn stop_before_and_after_the_answer() {
    let mut h = Harness::new();
    h.room(ALICE, "m.call.invite", invite());
    assert_eq!(
        h.stop(),
        vec![send("m.call.reject", ours(json!({}))), CLOSE]
    );

    let mut h = Harness::new();
    h.answered();
    h.at(5_000);
    assert_eq!(
        h.stop(),
        vec![
            send("m.call.hangup", ours(json!({"reason": "user_hangup"}))),
            CLOSE,
            stop(StopReason::LocalStop, 5_000)
        ]
    );
    assert_eq!(h.stop(), vec![], "stopping twice is harmless");
}

#[test]
fn peer_failure_hangs_up_with_its_reason() {
    let mut h = Harness::new();
    h.room(ALICE, "m.call.invite", invite());
    assert_eq!(
        h.peer(PeerEvent::PeerFailed {
            reason: PeerFailure::SetRemoteDescription("bad m-line".into())
        }),
        vec![
            send(
                "m.call.reject",
                ours(json!({"reason": "set_remote_description"}))
            ),
            CLOSE
        ]
    );

    let mut h = Harness::new();
    h.answered();
    assert_eq!(
        h.peer(PeerEvent::PeerFailed {
            reason: PeerFailure::Ice
        }),
        vec![
            send("m.call.hangup", ours(json!({"reason": "ice_failed"}))),
            CLOSE,
            stop(StopReason::PeerFailed(PeerFailure::Ice), 0)
        ]
    );
}

#[test]
fn transfer_events_are_recognised_and_ignored() {
    let mut h = Harness::new();
    h.answered();
    assert_eq!(
        h.room(ALICE, "m.call.replaces", common(ALICE_PARTY)),
        vec![Action::Ignored(IgnoreReason::Unsupported {
            event_type: "m.call.replaces"
        })]
    );
    assert_eq!(
        h.room(
            ALICE,
            "org.matrix.call.asserted_identity",
            common(ALICE_PARTY)
        ),
        vec![Action::Ignored(IgnoreReason::Unsupported {
            event_type: "m.call.asserted_identity"
        })]
    );
}

#[test]
fn stop_all_ends_every_call() {
    let mut h = Harness::new();
    h.answered();
    let now = UnixMs(T0 + 1);
    assert_eq!(
        h.input(Input::StopAll { now }),
        vec![
            send("m.call.hangup", ours(json!({"reason": "user_hangup"}))),
            CLOSE,
            stop(StopReason::LocalStop, 1)
        ]
    );
    assert_eq!(h.calls.active_calls(), 0);
}
