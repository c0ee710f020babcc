//! What the bot knows about one LiveKit room, sans-IO: the other participants and their
//! published tracks, from the `JoinResponse`, `ParticipantUpdate`s and `TrackUnpublished`s the
//! server sends. It turns those (delta, versioned) messages into [`RoomEvent`]s and answers which
//! participant and track a subscribed media stream belongs to (its `a=msid` stream id is
//! `PA_…|TR_…` from protocol 1 on, its track id `TR_…`).

use std::collections::{BTreeMap, HashMap};

use livekit_protocol as proto;
use transcoder::MediaKind;

use crate::pipeline::TrackSource;

/// One published track of a remote participant, as the server describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteTrack {
    pub sid: String,
    pub participant_sid: String,
    pub identity: String,
    pub kind: MediaKind,
    pub source: TrackSource,
    pub muted: bool,
    /// `TrackInfo.encryption != NONE`: its frames carry LiveKit's E2EE trailer.
    pub encrypted: bool,
    pub mime_type: String,
    pub name: String,
}

/// One remote participant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteParticipant {
    pub sid: String,
    pub identity: String,
    pub name: String,
    /// `ParticipantInfo.version`; older updates are ignored.
    pub version: u32,
    pub tracks: BTreeMap<String, RemoteTrack>,
}

/// A change in the room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoomEvent {
    ParticipantJoined { sid: String, identity: String, name: String },
    ParticipantLeft { sid: String, identity: String },
    TrackPublished(RemoteTrack),
    TrackUnpublished(RemoteTrack),
    TrackMuted { track_sid: String, identity: String, muted: bool },
}

#[derive(Debug, Default)]
pub struct RoomState {
    own_sid: String,
    participants: HashMap<String, RemoteParticipant>,
    /// Which participant published a track, by track sid.
    track_owner: HashMap<String, String>,
}

fn kind_of(t: &proto::TrackInfo) -> Option<MediaKind> {
    match proto::TrackType::try_from(t.r#type) {
        Ok(proto::TrackType::Audio) => Some(MediaKind::Audio),
        Ok(proto::TrackType::Video) => Some(MediaKind::Video),
        _ => None,
    }
}

fn source_of(t: &proto::TrackInfo, kind: MediaKind) -> TrackSource {
    match (proto::TrackSource::try_from(t.source), kind) {
        (Ok(proto::TrackSource::Camera), _) => TrackSource::Camera,
        (Ok(proto::TrackSource::Microphone), _) => TrackSource::Microphone,
        (Ok(proto::TrackSource::ScreenShare), _) => TrackSource::Screen,
        (Ok(proto::TrackSource::ScreenShareAudio), _) => TrackSource::ScreenAudio,
        // Unknown sources: what a call usually means by a track of that kind.
        (_, MediaKind::Audio) => TrackSource::Microphone,
        (_, MediaKind::Video) => TrackSource::Camera,
    }
}

impl RoomState {
    pub fn new() -> Self {
        Self::default()
    }

    /// The bot's own participant sid (from the join), never reported as a remote participant.
    pub fn own_sid(&self) -> &str {
        &self.own_sid
    }

    pub fn participants(&self) -> impl Iterator<Item = &RemoteParticipant> {
        self.participants.values()
    }

    pub fn participant(&self, sid: &str) -> Option<&RemoteParticipant> {
        self.participants.get(sid)
    }

    pub fn track(&self, track_sid: &str) -> Option<&RemoteTrack> {
        let owner = self.track_owner.get(track_sid)?;
        self.participants.get(owner)?.tracks.get(track_sid)
    }

    /// The track a subscribed media stream carries: by its track id (`TR_…`), else by the
    /// second half of a packed stream id (`PA_…|TR_…`).
    pub fn track_for_stream(&self, stream_id: &str, track_id: &str) -> Option<&RemoteTrack> {
        self.track(track_id).or_else(|| stream_id.split_once('|').and_then(|(_, tr)| self.track(tr)))
    }

    /// A (re)join: everything known before is replaced by the join's view; what disappeared is
    /// reported as left/unpublished, what is new as joined/published.
    pub fn on_join(&mut self, join: &proto::JoinResponse) -> Vec<RoomEvent> {
        self.own_sid = join.participant.as_ref().map(|p| p.sid.clone()).unwrap_or_default();
        let mut events = Vec::new();
        let present: Vec<&str> = join.other_participants.iter().map(|p| p.sid.as_str()).collect();
        let gone: Vec<String> = self.participants.keys().filter(|s| !present.contains(&s.as_str())).cloned().collect();
        for sid in gone {
            events.extend(self.remove(&sid));
        }
        for p in &join.other_participants {
            events.extend(self.apply(p, true));
        }
        events
    }

    /// A `ParticipantUpdate` (deltas: only the participants listed changed).
    pub fn on_update(&mut self, update: &proto::ParticipantUpdate) -> Vec<RoomEvent> {
        let mut events = Vec::new();
        for p in &update.participants {
            if p.sid == self.own_sid {
                continue;
            }
            if p.state == proto::participant_info::State::Disconnected as i32 {
                events.extend(self.remove(&p.sid));
            } else {
                events.extend(self.apply(p, false));
            }
        }
        events
    }

    /// A `TrackUnpublished` (sent to the track's publisher; other participants learn it from an
    /// update, but either way the track is gone).
    pub fn on_track_unpublished(&mut self, track_sid: &str) -> Vec<RoomEvent> {
        let Some(owner) = self.track_owner.remove(track_sid) else { return Vec::new() };
        let Some(p) = self.participants.get_mut(&owner) else { return Vec::new() };
        p.tracks.remove(track_sid).map(RoomEvent::TrackUnpublished).into_iter().collect()
    }

    fn remove(&mut self, sid: &str) -> Vec<RoomEvent> {
        let Some(p) = self.participants.remove(sid) else { return Vec::new() };
        let mut events: Vec<RoomEvent> = p
            .tracks
            .into_values()
            .map(|t| {
                self.track_owner.remove(&t.sid);
                RoomEvent::TrackUnpublished(t)
            })
            .collect();
        events.push(RoomEvent::ParticipantLeft { sid: p.sid, identity: p.identity });
        events
    }

    fn apply(&mut self, info: &proto::ParticipantInfo, from_join: bool) -> Vec<RoomEvent> {
        let mut events = Vec::new();
        if info.sid.is_empty() || info.sid == self.own_sid {
            return events;
        }
        let known = self.participants.contains_key(&info.sid);
        if known && !from_join {
            let old = &self.participants[&info.sid];
            if info.version != 0 && info.version < old.version {
                return events;
            }
        }
        let entry = self.participants.entry(info.sid.clone()).or_insert_with(|| RemoteParticipant {
            sid: info.sid.clone(),
            identity: info.identity.clone(),
            name: info.name.clone(),
            version: info.version,
            tracks: BTreeMap::new(),
        });
        if !known {
            events.push(RoomEvent::ParticipantJoined {
                sid: info.sid.clone(),
                identity: info.identity.clone(),
                name: info.name.clone(),
            });
        }
        entry.version = info.version;
        entry.name = info.name.clone();
        let mut current: BTreeMap<String, RemoteTrack> = BTreeMap::new();
        for t in &info.tracks {
            let Some(kind) = kind_of(t) else { continue };
            current.insert(
                t.sid.clone(),
                RemoteTrack {
                    sid: t.sid.clone(),
                    participant_sid: info.sid.clone(),
                    identity: info.identity.clone(),
                    kind,
                    source: source_of(t, kind),
                    muted: t.muted,
                    encrypted: t.encryption != proto::encryption::Type::None as i32,
                    mime_type: t.mime_type.clone(),
                    name: t.name.clone(),
                },
            );
        }
        let old = std::mem::take(&mut entry.tracks);
        for (sid, t) in &old {
            if !current.contains_key(sid) {
                self.track_owner.remove(sid);
                events.push(RoomEvent::TrackUnpublished(t.clone()));
            }
        }
        for (sid, t) in &current {
            match old.get(sid) {
                None => {
                    self.track_owner.insert(sid.clone(), info.sid.clone());
                    events.push(RoomEvent::TrackPublished(t.clone()));
                }
                Some(o) if o.muted != t.muted => events.push(RoomEvent::TrackMuted {
                    track_sid: sid.clone(),
                    identity: t.identity.clone(),
                    muted: t.muted,
                }),
                Some(_) => {}
            }
        }
        if let Some(p) = self.participants.get_mut(&info.sid) {
            p.tracks = current;
        }
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn track(sid: &str, ty: proto::TrackType, source: proto::TrackSource, muted: bool, enc: bool) -> proto::TrackInfo {
        proto::TrackInfo {
            sid: sid.into(),
            r#type: ty as i32,
            source: source as i32,
            muted,
            encryption: if enc { proto::encryption::Type::Gcm as i32 } else { 0 },
            mime_type: if ty == proto::TrackType::Audio { "audio/opus".into() } else { "video/VP8".into() },
            ..Default::default()
        }
    }

    fn participant(sid: &str, identity: &str, version: u32, tracks: Vec<proto::TrackInfo>) -> proto::ParticipantInfo {
        proto::ParticipantInfo {
            sid: sid.into(),
            identity: identity.into(),
            name: format!("name of {identity}"),
            version,
            tracks,
            state: proto::participant_info::State::Active as i32,
            ..Default::default()
        }
    }

    fn join(others: Vec<proto::ParticipantInfo>) -> proto::JoinResponse {
        proto::JoinResponse {
            participant: Some(participant("PA_bot", "@bot:hs:BOT", 1, vec![])),
            other_participants: others,
            ..Default::default()
        }
    }

    #[test]
    fn join_reports_participants_and_tracks() {
        let mut room = RoomState::new();
        let ev = room.on_join(&join(vec![participant(
            "PA_a",
            "@a:hs:A",
            3,
            vec![
                track("TR_v", proto::TrackType::Video, proto::TrackSource::Camera, false, true),
                track("TR_m", proto::TrackType::Audio, proto::TrackSource::Microphone, true, true),
            ],
        )]));
        assert_eq!(ev.len(), 3, "{ev:?}");
        assert!(matches!(&ev[0], RoomEvent::ParticipantJoined { identity, .. } if identity == "@a:hs:A"));
        let t = room.track_for_stream("PA_a|TR_v", "TR_v").expect("known track");
        assert_eq!((t.kind, t.source, t.encrypted, t.identity.as_str()), (MediaKind::Video, TrackSource::Camera, true, "@a:hs:A"));
        // The packed stream id alone is enough.
        assert_eq!(room.track_for_stream("PA_a|TR_m", "").unwrap().source, TrackSource::Microphone);
        assert!(room.track("TR_m").unwrap().muted);
        assert_eq!(room.own_sid(), "PA_bot");
    }

    #[test]
    fn updates_publish_mute_unpublish_and_leave() {
        let mut room = RoomState::new();
        room.on_join(&join(vec![participant(
            "PA_a",
            "@a:hs:A",
            1,
            vec![track("TR_v", proto::TrackType::Video, proto::TrackSource::Camera, false, false)],
        )]));
        // Screen share added and camera muted.
        let ev = room.on_update(&proto::ParticipantUpdate {
            participants: vec![participant(
                "PA_a",
                "@a:hs:A",
                2,
                vec![
                    track("TR_v", proto::TrackType::Video, proto::TrackSource::Camera, true, false),
                    track("TR_s", proto::TrackType::Video, proto::TrackSource::ScreenShare, false, false),
                ],
            )],
        });
        // In track sid order.
        assert_eq!(
            ev,
            vec![
                RoomEvent::TrackPublished(room.track("TR_s").unwrap().clone()),
                RoomEvent::TrackMuted { track_sid: "TR_v".into(), identity: "@a:hs:A".into(), muted: true },
            ]
        );
        assert_eq!(room.track("TR_s").unwrap().source, TrackSource::Screen);
        // An older version is ignored.
        assert!(room
            .on_update(&proto::ParticipantUpdate { participants: vec![participant("PA_a", "@a:hs:A", 1, vec![])] })
            .is_empty());
        // Screen share stopped.
        let ev = room.on_update(&proto::ParticipantUpdate {
            participants: vec![participant(
                "PA_a",
                "@a:hs:A",
                3,
                vec![track("TR_v", proto::TrackType::Video, proto::TrackSource::Camera, true, false)],
            )],
        });
        assert!(matches!(&ev[..], [RoomEvent::TrackUnpublished(t)] if t.sid == "TR_s"));
        assert!(room.track("TR_s").is_none());
        // A new participant, then the first one leaves.
        let ev = room.on_update(&proto::ParticipantUpdate { participants: vec![participant("PA_b", "@b:hs:B", 1, vec![])] });
        assert!(matches!(&ev[..], [RoomEvent::ParticipantJoined { sid, .. }] if sid == "PA_b"));
        let mut gone = participant("PA_a", "@a:hs:A", 4, vec![]);
        gone.state = proto::participant_info::State::Disconnected as i32;
        let ev = room.on_update(&proto::ParticipantUpdate { participants: vec![gone] });
        assert!(matches!(&ev[..], [RoomEvent::TrackUnpublished(t), RoomEvent::ParticipantLeft { identity, .. }]
            if t.sid == "TR_v" && identity == "@a:hs:A"));
        assert!(room.track("TR_v").is_none());
        // Our own participant is never a remote one.
        assert!(room.on_update(&proto::ParticipantUpdate { participants: vec![participant("PA_bot", "@bot:hs:BOT", 5, vec![])] }).is_empty());
    }

    #[test]
    fn rejoin_reports_who_disappeared() {
        let mut room = RoomState::new();
        room.on_join(&join(vec![participant("PA_a", "@a:hs:A", 1, vec![]), participant("PA_b", "@b:hs:B", 1, vec![])]));
        let ev = room.on_join(&join(vec![participant("PA_b", "@b:hs:B", 2, vec![])]));
        assert_eq!(ev, vec![RoomEvent::ParticipantLeft { sid: "PA_a".into(), identity: "@a:hs:A".into() }]);
        assert_eq!(room.participants().count(), 1);
    }

    #[test]
    fn unpublished_message_removes_the_track() {
        let mut room = RoomState::new();
        room.on_join(&join(vec![participant(
            "PA_a",
            "@a:hs:A",
            1,
            vec![track("TR_v", proto::TrackType::Video, proto::TrackSource::Camera, false, false)],
        )]));
        assert_eq!(room.on_track_unpublished("TR_v").len(), 1);
        assert!(room.on_track_unpublished("TR_v").is_empty());
        assert!(room.track("TR_v").is_none());
    }
}
