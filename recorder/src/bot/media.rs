//! The recording side of calls made of plain peer connections: a 1:1 call (one connection) and
//! a mesh group call (one connection per device in the call). [`CallMedia`] takes what the
//! connections report and what the call machines say about them (who is at the other end, which
//! track is camera or screen, mutes) and keeps one [`Recording`].
//!
//! Clock: every connection of a call stamps frames in µs since one epoch. The recording's zero
//! is the earliest frame held when it starts, so a recording starts with media, not with the
//! second or so of ICE and DTLS set-up. It starts once a party is known, a labelled track has
//! media and every track that sends any has given its first frame (or [`super::START_WAIT`]
//! passed); a call that never carried media leaves no recording.
//!
//! A track's frames are held until the call machine says what it is (camera or screen, from the
//! party's stream metadata), one round trip through the machine after the track opens.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use matrix_sdk::ruma::OwnedRoomId;
use storage::manifest::CallFlavour;
use tracing::{debug, info, info_span, warn};
use transcoder::{Codec, EncodedFrame, MediaKind};

use super::messages;
use super::rooms::Pending;
use super::BotContext;
use crate::http::metrics as m;
use crate::peer::{PeerOutput, RecvPeer, TrackKey, TrackStats};
use crate::pipeline::{ParticipantInfo, Recording, TrackInfo, TrackSource};
use crate::voip1::{self, PeerCommand, PeerEvent, Purpose, RecordAction};

/// Frames held per track while waiting for its label; older ones are dropped beyond this.
const MAX_PENDING_FRAMES: usize = 600;
/// Keyframe requests for a track whose writer waits for one, at most this often.
const KEYFRAME_REQUEST_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// One peer connection of a call, numbered by the task that owns it.
pub type ConnNo = u32;

/// Executes one peer command on a connection, in the order the call machine emitted it;
/// returns what the machine must hear back.
pub async fn execute(peer: &mut RecvPeer, cmd: PeerCommand) -> Option<PeerEvent> {
    let failed = |e: crate::peer::PeerError, what: &str| {
        warn!(error = %e, "{what}");
        Some(PeerEvent::PeerFailed { reason: e.failure() })
    };
    match cmd {
        PeerCommand::ApplyRemoteOffer { sdp } => peer.apply_remote_offer(sdp).await.err().and_then(|e| failed(e, "the offer was refused")),
        PeerCommand::ApplyRemoteAnswer { sdp } => peer.apply_remote_answer(sdp).await.err().and_then(|e| failed(e, "the answer was refused")),
        PeerCommand::AddRemoteCandidates(c) => {
            peer.add_remote_candidates(c).await;
            None
        }
        PeerCommand::CreateAnswer => match peer.create_answer().await {
            Ok(sdp) => Some(PeerEvent::AnswerCreated { sdp }),
            Err(e) => failed(e, "cannot answer"),
        },
        PeerCommand::CreateOffer => match peer.create_offer().await {
            Ok(sdp) => Some(PeerEvent::OfferCreated { sdp }),
            Err(e) => failed(e, "cannot make an offer"),
        },
        PeerCommand::Close => {
            peer.close().await;
            None
        }
    }
}

/// The other end of one connection: a recording participant.
#[derive(Debug, Clone)]
struct Party {
    id: String,
    user_id: String,
    device_id: Option<String>,
    /// Epoch µs of the answer.
    since_us: i64,
}

/// One remote track as the call task sees it.
struct Slot {
    stream_id: String,
    track_id: String,
    kind: MediaKind,
    codec: Codec,
    /// Camera, microphone, screen… from the call machine's label.
    source: Option<TrackSource>,
    /// The recording's track id once labelled and added.
    recording_track: Option<String>,
    pending: VecDeque<EncodedFrame>,
    dropped_pending: u64,
    /// Mute state last reported for this track's stream, applied when the track is added.
    muted: bool,
    last_keyframe_request: Option<Instant>,
    last_stats: TrackStats,
    ended: bool,
    span: tracing::Span,
}

/// The recording side of one call. See the module documentation.
pub struct CallMedia {
    ctx: Arc<BotContext>,
    room_id: OwnedRoomId,
    flavour: CallFlavour,
    external_call_id: String,
    epoch: Instant,
    parties: BTreeMap<ConnNo, Party>,
    pub recording: Option<Recording>,
    /// Epoch µs that is the recording's zero.
    zero_us: i64,
    slots: HashMap<(ConnNo, TrackKey), Slot>,
    /// Mute states by connection and stream id, as last reported.
    stream_mutes: HashMap<(ConnNo, String), (bool, bool)>,
    frames_before_zero: u64,
    /// When the first frame was held before the recording started.
    first_held_at: Option<Instant>,
    pub failed: Option<String>,
    /// A party was ever known: the room was told the call is recorded.
    had_party: bool,
    /// Room commands given before the recording existed.
    pub pending: Pending,
    /// Users who had opted out when the recording was registered.
    pub optouts: BTreeSet<String>,
}

impl CallMedia {
    pub fn new(ctx: Arc<BotContext>, room_id: OwnedRoomId, flavour: CallFlavour, external_call_id: &str, epoch: Instant) -> Self {
        Self {
            ctx,
            room_id,
            flavour,
            external_call_id: external_call_id.to_owned(),
            epoch,
            parties: BTreeMap::new(),
            recording: None,
            zero_us: 0,
            slots: HashMap::new(),
            stream_mutes: HashMap::new(),
            frames_before_zero: 0,
            first_held_at: None,
            failed: None,
            had_party: false,
            pending: Pending::default(),
            optouts: BTreeSet::new(),
        }
    }

    /// µs on the recording's clock now (negative before it starts).
    pub fn now_us(&self) -> i64 {
        self.epoch.elapsed().as_micros() as i64 - self.zero_us
    }

    /// The first party, once known (the caller of a 1:1 call).
    pub fn first_party(&self) -> Option<&str> {
        self.parties.values().next().map(|p| p.user_id.as_str())
    }

    /// What the call machine said about connection `conn`. `participant_id` names the party in
    /// the recording (a mesh device's `user:device`); `None` names it by user id (a 1:1 caller).
    pub async fn on_record(&mut self, conn: ConnNo, participant_id: Option<&str>, action: RecordAction) {
        match action {
            RecordAction::Start { caller, caller_party, .. } => {
                self.had_party = true;
                let party = Party {
                    id: participant_id.map_or_else(|| caller.0.clone(), str::to_owned),
                    user_id: caller.0,
                    device_id: caller_party.map(|p| p.0),
                    since_us: self.epoch.elapsed().as_micros() as i64,
                };
                if self.recording.is_some() {
                    let at = self.now_us().max(0);
                    self.join(&party, at).await;
                }
                self.parties.insert(conn, party);
                self.try_flush(false).await;
            }
            RecordAction::TrackLabel { stream_id, track_id, kind, purpose } => {
                let source = source_of(purpose, kind);
                // Ids can repeat (empty without a=msid, or a reopened track): an unlabelled track
                // of the same kind is the one meant.
                let media_kind = media_kind(kind);
                let matches = |c: ConnNo, s: &Slot| c == conn && s.stream_id == stream_id && s.track_id == track_id && s.kind == media_kind;
                let slot = self.slots.iter().filter(|((c, _), s)| matches(*c, s)).min_by_key(|((_, k), s)| (s.source.is_some(), *k));
                if let Some((key, _)) = slot {
                    let key = *key;
                    self.label(key, source).await;
                    self.try_flush(false).await;
                } else {
                    debug!(conn, %stream_id, %track_id, ?purpose, "label for an unknown track");
                }
            }
            RecordAction::Muted { stream_id, audio_muted, video_muted, .. } => {
                self.stream_mutes.insert((conn, stream_id.clone()), (audio_muted, video_muted));
                let at = self.now_us().max(0);
                for ((_, _), slot) in self.slots.iter_mut().filter(|((c, _), s)| *c == conn && s.stream_id == stream_id) {
                    let muted = if slot.kind == MediaKind::Audio { audio_muted } else { video_muted };
                    slot.muted = muted;
                    if let (Some(rec), Some(track)) = (self.recording.as_mut(), slot.recording_track.as_ref()) {
                        rec.set_muted(track, muted, at);
                    }
                }
            }
            RecordAction::Stop { .. } => self.party_left(conn).await,
        }
    }

    /// A connection's call ended while the recording goes on (a mesh device left): its tracks
    /// end, and its party leaves the recording.
    async fn party_left(&mut self, conn: ConnNo) {
        self.try_flush(false).await;
        let at = self.now_us().max(0);
        for ((c, _), slot) in self.slots.iter_mut() {
            if *c != conn {
                continue;
            }
            if !slot.ended {
                slot.ended = true;
                metrics::gauge!(m::ACTIVE_TRACKS).decrement(1.0);
            }
            slot.pending.clear();
            if let (Some(rec), Some(track)) = (self.recording.as_mut(), slot.recording_track.as_ref()) {
                if let Err(e) = rec.end_track(track).await {
                    warn!(%track, error = %format!("{e:#}"), "closing a departed party's track failed");
                }
            }
        }
        let Some(party) = self.parties.remove(&conn) else { return };
        // Another connection to the same device (it called again) keeps it present.
        if self.parties.values().any(|p| p.id == party.id) {
            return;
        }
        if let Some(rec) = self.recording.as_mut() {
            if let Err(e) = rec.participant_left(&party.id, at).await {
                warn!(participant = %party.id, error = %format!("{e:#}"), "cannot record a participant leaving");
            }
        }
    }

    async fn join(&mut self, party: &Party, at_us: i64) {
        let display_name = self.ctx.display_name(&self.room_id, &party.user_id).await;
        let info = ParticipantInfo { id: party.id.clone(), user_id: party.user_id.clone(), device_id: party.device_id.clone(), display_name };
        if let Some(rec) = self.recording.as_mut() {
            if let Err(e) = rec.participant_joined(info, at_us).await {
                warn!(participant = %party.id, error = %format!("{e:#}"), "cannot record a participant joining");
            }
        }
    }

    /// Handles one output of connection `conn`; returns what the call machine must hear of it.
    pub async fn on_output(&mut self, conn: ConnNo, o: PeerOutput, peer: Option<&RecvPeer>) -> Option<PeerEvent> {
        match o {
            PeerOutput::LocalCandidate { candidate, sdp_mid, sdp_mline_index } => {
                Some(PeerEvent::LocalCandidate { candidate, sdp_mid, sdp_mline_index })
            }
            PeerOutput::GatheringComplete => Some(PeerEvent::GatheringComplete),
            PeerOutput::Connected => {
                info!(conn, "media connection up");
                Some(PeerEvent::PeerConnected)
            }
            PeerOutput::Failed { reason } => {
                warn!(conn, %reason, "media connection failed");
                Some(PeerEvent::PeerFailed { reason: voip1::PeerFailure::Ice })
            }
            PeerOutput::TrackOpened { track, stream_id, track_id, kind, codec, clock_rate } => {
                let span = info_span!("track", conn, %track, ?codec);
                span.in_scope(|| info!(%stream_id, %track_id, clock_rate, "track opened"));
                metrics::gauge!(m::ACTIVE_TRACKS).increment(1.0);
                let muted = self
                    .stream_mutes
                    .get(&(conn, stream_id.clone()))
                    .is_some_and(|(a, v)| if kind == MediaKind::Audio { *a } else { *v });
                self.slots.insert(
                    (conn, track),
                    Slot {
                        stream_id: stream_id.clone(),
                        track_id: track_id.clone(),
                        kind,
                        codec,
                        source: None,
                        recording_track: None,
                        pending: VecDeque::new(),
                        dropped_pending: 0,
                        muted,
                        last_keyframe_request: None,
                        last_stats: TrackStats::default(),
                        ended: false,
                        span,
                    },
                );
                let kind = match kind {
                    MediaKind::Audio => voip1::TrackKind::Audio,
                    MediaKind::Video => voip1::TrackKind::Video,
                };
                Some(PeerEvent::TrackOpened { stream_id, track_id, kind })
            }
            PeerOutput::Frame { track, frame } => {
                self.on_frame((conn, track), frame, peer).await;
                None
            }
            PeerOutput::TrackEnded { track } => {
                if let Some(slot) = self.slots.get_mut(&(conn, track)) {
                    if !slot.ended {
                        slot.ended = true;
                        metrics::gauge!(m::ACTIVE_TRACKS).decrement(1.0);
                        slot.span.in_scope(|| info!("track ended"));
                    }
                }
                None
            }
            PeerOutput::Stats { track, stats } => {
                if let Some(slot) = self.slots.get_mut(&(conn, track)) {
                    m::count_track_stats(&stats, &slot.last_stats);
                    slot.last_stats = stats;
                    slot.span.in_scope(|| debug!(?stats, "track stats"));
                }
                None
            }
        }
    }

    async fn on_frame(&mut self, key: (ConnNo, TrackKey), frame: EncodedFrame, peer: Option<&RecvPeer>) {
        let Some(slot) = self.slots.get_mut(&key) else { return };
        if slot.ended {
            return;
        }
        if self.recording.is_none() {
            self.first_held_at.get_or_insert_with(Instant::now);
        }
        slot.pending.push_back(frame);
        if slot.pending.len() > MAX_PENDING_FRAMES {
            slot.pending.pop_front();
            slot.dropped_pending += 1;
            if slot.dropped_pending.is_power_of_two() {
                slot.span.in_scope(|| warn!(dropped = slot.dropped_pending, "track not labelled yet; dropping its oldest held frames"));
            }
        }
        self.try_flush(false).await;
        // A writer that waits for a keyframe (start, parameter change) asks the sender for one.
        let (Some(rec), Some(slot), Some(peer)) = (self.recording.as_ref(), self.slots.get_mut(&key), peer) else { return };
        if let Some(t) = &slot.recording_track {
            if rec.wants_keyframe(t) && slot.last_keyframe_request.is_none_or(|at| at.elapsed() >= KEYFRAME_REQUEST_INTERVAL) {
                slot.last_keyframe_request = Some(Instant::now());
                peer.request_keyframe(key.1);
            }
        }
    }

    /// Starts the recording when it is time (see the module documentation; `closing`: the call
    /// ends), then writes every held frame of labelled tracks.
    async fn try_flush(&mut self, closing: bool) {
        if self.failed.is_some() || (self.parties.is_empty() && self.recording.is_none()) {
            return;
        }
        if self.recording.is_none() {
            let labelled_with_media = self.slots.values().any(|s| s.source.is_some() && !s.pending.is_empty());
            if !labelled_with_media {
                return;
            }
            let all_started = self.slots.values().all(|s| s.ended || s.muted || !s.pending.is_empty());
            let waited = self.first_held_at.is_some_and(|t| t.elapsed() >= super::START_WAIT);
            if !(all_started || waited || closing) {
                return;
            }
            if let Err(e) = self.start_recording().await {
                self.fail(format!("starting the recording: {e:#}"));
                return;
            }
        }
        let zero = self.zero_us;
        let Some(rec) = self.recording.as_mut() else { return };
        for slot in self.slots.values_mut() {
            let Some(track) = slot.recording_track.clone() else { continue };
            while let Some(mut f) = slot.pending.pop_front() {
                f.pts_us -= zero;
                if f.pts_us < 0 {
                    self.frames_before_zero += 1;
                    continue;
                }
                if let Err(e) = rec.write(&track, f).await {
                    self.failed = Some(format!("writing track {track}: {e:#}"));
                    warn!(error = %format!("{e:#}"), "the recording cannot go on; what is stored so far is kept");
                    return;
                }
            }
        }
    }

    /// Creates the recording (catalog rows, spool directory) with the known parties and the
    /// earliest held frame as zero, and adds the tracks labelled so far.
    async fn start_recording(&mut self) -> anyhow::Result<()> {
        self.zero_us = self.slots.values().filter_map(|s| s.pending.front().map(|f| f.pts_us)).min().unwrap_or(0);
        let mut rec = Recording::start_at(
            self.ctx.env.clone(),
            self.room_id.as_str(),
            self.flavour,
            Some(&self.external_call_id),
            super::wall_ms_at(self.epoch, self.zero_us),
        )
        .await?;
        for u in &self.optouts {
            rec.opt_out(u, u, 0).await?;
        }
        self.pending.replay(&mut rec).await?;
        metrics::gauge!(m::ACTIVE_CALLS).increment(1.0);
        info!(recording = %rec.id(), "recording the call");
        self.recording = Some(rec);
        let parties: Vec<Party> = self.parties.values().cloned().collect();
        for p in parties {
            let at = (p.since_us - self.zero_us).max(0);
            self.join(&p, at).await;
        }
        // Tracks labelled before the recording existed are added now.
        let labelled: Vec<(ConnNo, TrackKey)> =
            self.slots.iter().filter(|(_, s)| s.source.is_some() && s.recording_track.is_none()).map(|(k, _)| *k).collect();
        for k in labelled {
            self.add_track(k).await;
        }
        Ok(())
    }

    /// Labels a track (the first label wins) and adds it to the recording if that exists; else it
    /// is added when the recording starts.
    async fn label(&mut self, key: (ConnNo, TrackKey), source: TrackSource) {
        let Some(slot) = self.slots.get_mut(&key) else { return };
        if slot.source.is_some() {
            return;
        }
        slot.source = Some(source);
        if self.recording.is_some() {
            self.add_track(key).await;
        }
    }

    async fn add_track(&mut self, key: (ConnNo, TrackKey)) {
        let (Some(slot), Some(rec), Some(party)) = (self.slots.get_mut(&key), self.recording.as_mut(), self.parties.get(&key.0)) else {
            return;
        };
        let Some(source) = slot.source else { return };
        let info = TrackInfo { participant_id: party.id.clone(), codec: slot.codec, source };
        match rec.add_track(info).await {
            Ok(id) => {
                if slot.muted {
                    rec.set_muted(&id, true, (self.epoch.elapsed().as_micros() as i64 - self.zero_us).max(0));
                }
                slot.span.in_scope(|| info!(recording_track = %id, %source, participant = %party.id, "track recorded"));
                slot.recording_track = Some(id);
            }
            Err(e) => {
                let reason = format!("adding track {}/{}: {e:#}", key.0, key.1);
                warn!(error = %reason, "the recording cannot go on");
                self.failed = Some(reason);
            }
        }
    }

    fn fail(&mut self, reason: String) {
        warn!(error = %reason, "the recording cannot go on");
        self.failed = Some(reason);
    }

    /// Writes what is still held, finalizes, and returns the notice for the room (`None` when
    /// no party was ever known: the room was never told of a recording).
    pub async fn finish(mut self, nothing: &str) -> Option<messages::Notice> {
        // Tracks the machine never labelled are recorded as camera/microphone (no metadata).
        let unlabelled: Vec<((ConnNo, TrackKey), MediaKind)> =
            self.slots.iter().filter(|(_, s)| s.source.is_none() && !s.pending.is_empty()).map(|(k, s)| (*k, s.kind)).collect();
        for (k, kind) in unlabelled {
            let kind = match kind {
                MediaKind::Audio => voip1::TrackKind::Audio,
                MediaKind::Video => voip1::TrackKind::Video,
            };
            self.label(k, source_of(Purpose::Camera, kind)).await;
        }
        self.try_flush(true).await;
        for slot in self.slots.values() {
            if !slot.ended {
                metrics::gauge!(m::ACTIVE_TRACKS).decrement(1.0);
            }
        }
        if self.frames_before_zero > 0 {
            info!(frames = self.frames_before_zero, "frames stamped before the recording's first frame were dropped");
        }
        let Some(rec) = self.recording.take() else {
            return self.had_party.then(|| messages::recording_failed(self.failed.as_deref().unwrap_or(nothing)));
        };
        metrics::gauge!(m::ACTIVE_CALLS).decrement(1.0);
        Some(self.ctx.store_and_announce(rec, self.failed.as_deref()).await)
    }
}

fn media_kind(kind: voip1::TrackKind) -> MediaKind {
    match kind {
        voip1::TrackKind::Audio => MediaKind::Audio,
        voip1::TrackKind::Video => MediaKind::Video,
    }
}

fn source_of(purpose: Purpose, kind: voip1::TrackKind) -> TrackSource {
    match (purpose, kind) {
        (Purpose::Camera, voip1::TrackKind::Video) => TrackSource::Camera,
        (Purpose::Camera, voip1::TrackKind::Audio) => TrackSource::Microphone,
        (Purpose::Screen, voip1::TrackKind::Video) => TrackSource::Screen,
        (Purpose::Screen, voip1::TrackKind::Audio) => TrackSource::ScreenAudio,
    }
}
