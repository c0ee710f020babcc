//! One 1:1 call's media side: the task that owns the call's receive-only peer connection and its
//! [`Recording`].
//!
//! It executes, in order, the peer commands and recording actions the call machine emitted (via
//! the runtime), reports what the peer connection says back to the runtime, and feeds every frame
//! to the recording. When the call stops it closes the connection, drains the last frames,
//! finalizes the recording (segments verified in the store, composite, per-track files, manifest,
//! catalog) and posts the links to the room.
//!
//! Clock: the peer stamps frames in µs since the task started. The recording's zero is the first
//! frame of the call, so a recording starts with media, not with the second or so of ICE and
//! DTLS set-up after the answer. The recording (and its catalog entry) is created at that first
//! frame; a call that never carried media leaves no recording.
//!
//! A track's frames are held until the call machine says what it is (camera or screen, from the
//! caller's stream metadata), which is one round trip through the runtime after the track opens.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use matrix_sdk::ruma::OwnedRoomId;
use tokio::sync::mpsc;
use tracing::{debug, info, info_span, warn, Instrument};
use transcoder::{Codec, EncodedFrame, MediaKind};

use super::messages::{self, SavedFile};
use super::outbox::Outgoing;
use super::rooms::{self, next_request, Control, Pending, Registration};
use super::BotContext;
use crate::http::metrics as m;
use crate::peer::{IceServer, PeerConfig, PeerOutput, RecvPeer, TrackKey, TrackStats};
use crate::pipeline::{ParticipantInfo, Recording, TrackInfo, TrackSource};
use crate::voip1::{self, PeerCommand, PeerEvent, PeerFailure, Purpose, RecordAction};

/// Frames held per track while waiting for its label; older ones are dropped beyond this.
const MAX_PENDING_FRAMES: usize = 600;
/// After the connection is closed, how long the last frames may take to drain.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Keyframe requests for a track whose writer waits for one, at most this often.
const KEYFRAME_REQUEST_INTERVAL: Duration = Duration::from_secs(1);

/// What the runtime hands the call task.
#[derive(Debug)]
pub enum CallCommand {
    Peer(PeerCommand),
    Record(RecordAction),
}

/// What the call task tells the runtime.
#[derive(Debug)]
pub enum CallReport {
    Peer(PeerEvent),
    /// Someone in the room stopped the recording (`!rec stop`): the bot hangs up.
    HangUp,
    /// The task is done (recording stored or given up); the runtime forgets the call.
    Ended,
}

struct EndedGuard {
    reports: mpsc::UnboundedSender<(CallKey, CallReport)>,
    key: CallKey,
}

impl Drop for EndedGuard {
    fn drop(&mut self) {
        let _ = self.reports.send((self.key.clone(), CallReport::Ended));
    }
}

/// Identifies a call for the runtime.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CallKey {
    pub room_id: OwnedRoomId,
    pub call_id: voip1::CallId,
}

pub struct CallTask {
    pub ctx: Arc<BotContext>,
    pub key: CallKey,
    pub reports: mpsc::UnboundedSender<(CallKey, CallReport)>,
    pub outbox: mpsc::UnboundedSender<Outgoing>,
}

impl CallTask {
    pub async fn run(self, cmds: mpsc::UnboundedReceiver<CallCommand>) {
        let span = info_span!("call", room = %self.key.room_id, call_id = %self.key.call_id);
        // Reports the end even if the task panics, so the runtime never waits for it forever.
        let _ended = EndedGuard { reports: self.reports.clone(), key: self.key.clone() };
        self.run_inner(cmds).instrument(span).await;
    }

    fn report(&self, ev: PeerEvent) {
        let _ = self.reports.send((self.key.clone(), CallReport::Peer(ev)));
    }

    async fn run_inner(self, mut cmds: mpsc::UnboundedReceiver<CallCommand>) {
        let epoch = Instant::now();
        let mut cfg = PeerConfig::new(self.ctx.config.webrtc.bind_addrs.clone(), epoch);
        cfg.ice_servers = ice_servers(&self.ctx.config.webrtc);
        let (mut peer, mut out) = match RecvPeer::new(cfg).await {
            Ok(p) => p,
            Err(e) => {
                warn!(error = %e, "cannot create the peer connection");
                self.report(PeerEvent::PeerFailed { reason: PeerFailure::Other(e.to_string()) });
                // Wait for the machine's Stop so the runtime sees the call end in order.
                while let Some(cmd) = cmds.recv().await {
                    if matches!(cmd, CallCommand::Record(RecordAction::Stop { .. }) | CallCommand::Peer(PeerCommand::Close)) {
                        break;
                    }
                }
                return;
            }
        };
        let mut media = CallMedia::new(self.ctx.clone(), self.key.clone(), epoch);
        let mut stopping = false;
        let mut drain_deadline: Option<tokio::time::Instant> = None;
        let mut reg: Option<Registration> = None;
        loop {
            if reg.is_none() && !stopping {
                // Room commands reach the call from the answer on: the caller is known then.
                if let (Some((caller, _)), false) = (&media.caller, media.registered) {
                    media.registered = true;
                    reg = Registration::open(&self.ctx.rooms, &self.key.room_id, "voip1", caller, &self.outbox);
                    if let Some(r) = &reg {
                        media.optouts = r.optouts.clone();
                    }
                }
            }
            if let Some(r) = reg.as_mut() {
                r.publish_recording_id(media.recording.as_ref(), &self.outbox);
            }
            tokio::select! {
                Some((c, reply)) = next_request(&mut reg), if !stopping => {
                    let at = media.now_us().max(0);
                    let Some(r) = reg.as_ref() else { continue };
                    let answer = rooms::apply(&self.ctx, &self.key.room_id, r, media.recording.as_mut(), &mut media.pending, c.clone(), at, &self.outbox).await;
                    let _ = reply.send(answer);
                    if matches!(c, Control::Stop { .. }) {
                        // The call machine hangs up and then stops this task as for any hangup.
                        let _ = self.reports.send((self.key.clone(), CallReport::HangUp));
                    }
                }
                cmd = cmds.recv(), if !stopping => match cmd {
                    Some(CallCommand::Peer(cmd)) => self.execute(&mut peer, cmd).await,
                    Some(CallCommand::Record(RecordAction::Stop { reason, .. })) => {
                        info!(?reason, "call ended; closing the connection");
                        stopping = true;
                        peer.close().await;
                        drain_deadline = Some(tokio::time::Instant::now() + DRAIN_TIMEOUT);
                    }
                    Some(CallCommand::Record(action)) => media.on_record(action).await,
                    None => {
                        stopping = true;
                        peer.close().await;
                        drain_deadline = Some(tokio::time::Instant::now() + DRAIN_TIMEOUT);
                    }
                },
                o = out.recv() => match o {
                    Some(o) => {
                        if let Some(ev) = media.on_output(o, &peer).await {
                            self.report(ev);
                        }
                    }
                    None => break,
                },
                () = sleep_until(drain_deadline) => {
                    warn!("tracks did not finish within {DRAIN_TIMEOUT:?} of closing; finishing with what arrived");
                    break;
                }
            }
        }
        drop(peer);
        if let Some(r) = reg.take() {
            r.close(&self.outbox);
        }
        if let Some(notice) = media.finish().await {
            let _ = self.outbox.send(Outgoing::Notice(notice));
        }
    }

    async fn execute(&self, peer: &mut RecvPeer, cmd: PeerCommand) {
        match cmd {
            PeerCommand::ApplyRemoteOffer { sdp } => {
                if let Err(e) = peer.apply_remote_offer(sdp).await {
                    warn!(error = %e, "the caller's offer was refused");
                    self.report(PeerEvent::PeerFailed { reason: e.failure() });
                }
            }
            PeerCommand::AddRemoteCandidates(c) => peer.add_remote_candidates(c).await,
            PeerCommand::CreateAnswer => match peer.create_answer().await {
                Ok(sdp) => self.report(PeerEvent::AnswerCreated { sdp }),
                Err(e) => {
                    warn!(error = %e, "cannot answer");
                    self.report(PeerEvent::PeerFailed { reason: e.failure() });
                }
            },
            PeerCommand::Close => peer.close().await,
        }
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

pub(crate) fn ice_servers(cfg: &crate::config::WebrtcConfig) -> Vec<IceServer> {
    if cfg.ice_servers.is_empty() {
        return Vec::new();
    }
    vec![IceServer {
        urls: cfg.ice_servers.clone(),
        username: cfg.turn_username.clone().unwrap_or_default(),
        credential: cfg.turn_password.clone().unwrap_or_default(),
    }]
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

/// The recording side of one call.
struct CallMedia {
    ctx: Arc<BotContext>,
    key: CallKey,
    epoch: Instant,
    /// The caller, from `RecordAction::Start`.
    caller: Option<(String, Option<String>)>,
    recording: Option<Recording>,
    /// Peer-clock µs that is the recording's zero.
    zero_us: i64,
    slots: HashMap<TrackKey, Slot>,
    /// Mute states by stream id, as last reported.
    stream_mutes: HashMap<String, (bool, bool)>,
    frames_before_zero: u64,
    /// When the first frame was held before the recording started.
    first_held_at: Option<Instant>,
    failed: Option<String>,
    /// Room control: registered once the caller is known; commands given before the first
    /// frame; users who had opted out.
    registered: bool,
    pending: Pending,
    optouts: BTreeSet<String>,
}

impl CallMedia {
    fn new(ctx: Arc<BotContext>, key: CallKey, epoch: Instant) -> Self {
        Self {
            ctx,
            key,
            epoch,
            caller: None,
            recording: None,
            zero_us: 0,
            slots: HashMap::new(),
            stream_mutes: HashMap::new(),
            frames_before_zero: 0,
            first_held_at: None,
            failed: None,
            registered: false,
            pending: Pending::default(),
            optouts: BTreeSet::new(),
        }
    }

    fn now_us(&self) -> i64 {
        self.epoch.elapsed().as_micros() as i64 - self.zero_us
    }

    async fn on_record(&mut self, action: RecordAction) {
        match action {
            RecordAction::Start { caller, caller_party, .. } => {
                self.caller = Some((caller.0, caller_party.map(|p| p.0)));
                self.try_flush(false).await;
            }
            RecordAction::TrackLabel { stream_id, track_id, kind, purpose } => {
                let source = source_of(purpose, kind);
                // Ids can repeat (empty without a=msid, or a reopened track): an unlabelled track
                // of the same kind is the one meant.
                let media_kind = match kind {
                    voip1::TrackKind::Audio => MediaKind::Audio,
                    voip1::TrackKind::Video => MediaKind::Video,
                };
                let matches = |s: &Slot| s.stream_id == stream_id && s.track_id == track_id && s.kind == media_kind;
                let slot = self
                    .slots
                    .iter()
                    .filter(|(_, s)| matches(s))
                    .min_by_key(|(k, s)| (s.source.is_some(), **k));
                if let Some((key, _)) = slot {
                    let key = *key;
                    self.label(key, source).await;
                    self.try_flush(false).await;
                } else {
                    debug!(%stream_id, %track_id, ?purpose, "label for an unknown track");
                }
            }
            RecordAction::Muted { stream_id, audio_muted, video_muted, .. } => {
                self.stream_mutes.insert(stream_id.clone(), (audio_muted, video_muted));
                let at = self.now_us().max(0);
                for slot in self.slots.values_mut().filter(|s| s.stream_id == stream_id) {
                    let muted = if slot.kind == MediaKind::Audio { audio_muted } else { video_muted };
                    slot.muted = muted;
                    if let (Some(rec), Some(track)) = (self.recording.as_mut(), slot.recording_track.as_ref()) {
                        rec.set_muted(track, muted, at);
                    }
                }
            }
            RecordAction::Stop { .. } => {}
        }
    }

    /// Handles one output of the peer; returns what the call machine must hear of it.
    async fn on_output(&mut self, o: PeerOutput, peer: &RecvPeer) -> Option<PeerEvent> {
        match o {
            PeerOutput::LocalCandidate { candidate, sdp_mid, sdp_mline_index } => {
                Some(PeerEvent::LocalCandidate { candidate, sdp_mid, sdp_mline_index })
            }
            PeerOutput::GatheringComplete => Some(PeerEvent::GatheringComplete),
            PeerOutput::Connected => {
                info!("media connection up");
                Some(PeerEvent::PeerConnected)
            }
            PeerOutput::Failed { reason } => {
                warn!(%reason, "media connection failed");
                Some(PeerEvent::PeerFailed { reason: PeerFailure::Ice })
            }
            PeerOutput::TrackOpened { track, stream_id, track_id, kind, codec, clock_rate } => {
                let span = info_span!("track", %track, ?codec);
                span.in_scope(|| info!(%stream_id, %track_id, clock_rate, "track opened"));
                metrics::gauge!(m::ACTIVE_TRACKS).increment(1.0);
                let muted = self
                    .stream_mutes
                    .get(&stream_id)
                    .is_some_and(|(a, v)| if kind == MediaKind::Audio { *a } else { *v });
                self.slots.insert(
                    track,
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
                self.on_frame(track, frame, peer).await;
                None
            }
            PeerOutput::TrackEnded { track } => {
                if let Some(slot) = self.slots.get_mut(&track) {
                    if !slot.ended {
                        slot.ended = true;
                        metrics::gauge!(m::ACTIVE_TRACKS).decrement(1.0);
                        slot.span.in_scope(|| info!("track ended"));
                    }
                }
                None
            }
            PeerOutput::Stats { track, stats } => {
                if let Some(slot) = self.slots.get_mut(&track) {
                    m::count_track_stats(&stats, &slot.last_stats);
                    slot.last_stats = stats;
                    slot.span.in_scope(|| debug!(?stats, "track stats"));
                }
                None
            }
        }
    }

    async fn on_frame(&mut self, track: TrackKey, frame: EncodedFrame, peer: &RecvPeer) {
        let Some(slot) = self.slots.get_mut(&track) else { return };
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
        let (Some(rec), Some(slot)) = (self.recording.as_ref(), self.slots.get_mut(&track)) else { return };
        if let Some(t) = &slot.recording_track {
            if rec.wants_keyframe(t) && slot.last_keyframe_request.is_none_or(|at| at.elapsed() >= KEYFRAME_REQUEST_INTERVAL) {
                slot.last_keyframe_request = Some(Instant::now());
                peer.request_keyframe(track);
            }
        }
    }

    /// Starts the recording once the call is ours, a labelled track has media and every track
    /// that sends any has given its first frame (or [`super::START_WAIT`] passed, or the call
    /// ends: `closing`), then writes every held frame of labelled tracks.
    async fn try_flush(&mut self, closing: bool) {
        if self.failed.is_some() || self.caller.is_none() {
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

    /// Creates the recording (catalog rows, spool directory) with the caller as participant and
    /// the earliest held frame as zero, and adds the tracks labelled so far.
    async fn start_recording(&mut self) -> anyhow::Result<()> {
        let (user, party) = self.caller.clone().expect("checked by the caller");
        self.zero_us = self.slots.values().filter_map(|s| s.pending.front().map(|f| f.pts_us)).min().unwrap_or(0);
        let mut rec = Recording::start_at(
            self.ctx.env.clone(),
            self.key.room_id.as_str(),
            storage::manifest::CallFlavour::Voip1,
            Some(self.key.call_id.as_str()),
            super::wall_ms_at(self.epoch, self.zero_us),
        )
        .await?;
        let display_name = self.ctx.display_name(&self.key.room_id, &user).await;
        rec.participant_joined(ParticipantInfo { id: user.clone(), user_id: user, device_id: party, display_name }, 0).await?;
        for u in &self.optouts {
            rec.opt_out(u, u, 0).await?;
        }
        self.pending.replay(&mut rec).await?;
        metrics::gauge!(m::ACTIVE_CALLS).increment(1.0);
        info!(recording = %rec.id(), "recording the call");
        self.recording = Some(rec);
        // Tracks labelled before the recording existed are added now.
        let labelled: Vec<TrackKey> =
            self.slots.iter().filter(|(_, s)| s.source.is_some() && s.recording_track.is_none()).map(|(k, _)| *k).collect();
        for k in labelled {
            self.add_track(k).await;
        }
        Ok(())
    }

    /// Labels a track (the first label wins) and adds it to the recording if that exists; else it
    /// is added when the recording starts.
    async fn label(&mut self, key: TrackKey, source: TrackSource) {
        let Some(slot) = self.slots.get_mut(&key) else { return };
        if slot.source.is_some() {
            return;
        }
        slot.source = Some(source);
        if self.recording.is_some() {
            self.add_track(key).await;
        }
    }

    async fn add_track(&mut self, key: TrackKey) {
        let (Some(slot), Some(rec), Some((user, _))) = (self.slots.get_mut(&key), self.recording.as_mut(), &self.caller)
        else {
            return;
        };
        let Some(source) = slot.source else { return };
        let info = TrackInfo { participant_id: user.clone(), codec: slot.codec, source };
        match rec.add_track(info).await {
            Ok(id) => {
                if slot.muted {
                    rec.set_muted(&id, true, (self.epoch.elapsed().as_micros() as i64 - self.zero_us).max(0));
                }
                slot.span.in_scope(|| info!(recording_track = %id, %source, "track recorded"));
                slot.recording_track = Some(id);
            }
            Err(e) => {
                let reason = format!("adding track {key}: {e:#}");
                warn!(error = %reason, "the recording cannot go on");
                self.failed = Some(reason);
            }
        }
    }

    fn fail(&mut self, reason: String) {
        warn!(error = %reason, "the recording cannot go on");
        self.failed = Some(reason);
    }

    /// Writes what is still held, finalizes, and returns the notice for the room.
    async fn finish(mut self) -> Option<messages::Notice> {
        // Tracks the machine never labelled are recorded as camera/microphone (no metadata).
        let unlabelled: Vec<(TrackKey, MediaKind)> = self
            .slots
            .iter()
            .filter(|(_, s)| s.source.is_none() && !s.pending.is_empty())
            .map(|(k, s)| (*k, s.kind))
            .collect();
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
            // The room was told the call is recorded; say why there is nothing.
            return self.caller.as_ref().map(|_| {
                messages::recording_failed(self.failed.as_deref().unwrap_or("no media arrived from the caller"))
            });
        };
        metrics::gauge!(m::ACTIVE_CALLS).decrement(1.0);
        Some(self.ctx.store_and_announce(rec, self.failed.as_deref()).await)
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

/// Links and sizes of a finished recording, for the room.
pub(super) fn saved_files(
    finished: &crate::pipeline::Finished,
    links: &HashMap<String, crate::http::Link>,
) -> (Option<SavedFile>, Vec<SavedFile>) {
    let composite = finished.manifest.outputs.first().and_then(|o| {
        links.get(&o.key).map(|l| SavedFile {
            label: "Composite".into(),
            detail: format!("{}, {}", o.kind.as_str().to_uppercase(), messages::human_bytes(o.bytes)),
            url: l.url.clone(),
        })
    });
    let tracks = finished
        .track_files
        .iter()
        .filter_map(|t| {
            links.get(&t.key).map(|l| SavedFile {
                label: format!("Track {}", t.track_id),
                detail: format!("{}, {}", t.codec_label, messages::human_bytes(t.bytes)),
                url: l.url.clone(),
            })
        })
        .collect();
    (composite, tracks)
}
