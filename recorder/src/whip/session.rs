//! One WHIP session's media side: the task that owns its receive-only peer connection and its
//! [`Recording`], from the answer to the finalized recording.
//!
//! The publisher is one participant (`whip:<name>`); its tracks are named by kind in order of
//! arrival: the first video track is the camera, a second one the screen; the first audio track
//! the microphone, a second one the screen's audio. As for calls, the recording starts once every
//! track has given its first frame (a track's frames are held until its first Sender Report puts
//! them on the sender's clock), or [`crate::bot::START_WAIT`] after the first frame, and the
//! earliest held frame is its zero.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use storage::manifest::CallFlavour;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, info_span, warn};
use transcoder::{Codec, EncodedFrame, MediaKind};

use crate::config::WhipConfig;
use crate::http::metrics as m;
use crate::peer::{PeerOutput, RecvPeer, TrackKey, TrackStats};
use crate::pipeline::{Env, ParticipantInfo, Recording, TrackInfo, TrackSource};

/// Frames held per track before the recording starts; older ones are dropped beyond this.
const MAX_HELD_FRAMES: usize = 600;
/// After the connection is closed, how long the last frames may take to drain.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Keyframe requests for a track whose writer waits for one, at most this often.
const KEYFRAME_REQUEST_INTERVAL: Duration = Duration::from_secs(1);

struct Slot {
    kind: MediaKind,
    codec: Codec,
    source: TrackSource,
    recording_track: Option<String>,
    held: VecDeque<EncodedFrame>,
    dropped_held: u64,
    ended: bool,
    last_keyframe_request: Option<Instant>,
    last_stats: TrackStats,
    span: tracing::Span,
}

pub(super) struct Session {
    env: Arc<Env>,
    name: String,
    id: String,
    epoch: Instant,
    connect_timeout: Duration,
    recording: Option<Recording>,
    /// Peer-clock µs that is the recording's zero.
    zero_us: i64,
    slots: HashMap<TrackKey, Slot>,
    first_held_at: Option<Instant>,
    frames_before_zero: u64,
    failed: Option<String>,
}

/// Why a session ended, for the log.
#[derive(Debug)]
enum End {
    Deleted,
    ConnectionFailed,
    NeverConnected,
    TracksEnded,
}

impl Session {
    pub(super) fn new(env: Arc<Env>, cfg: &WhipConfig, name: String, id: String, epoch: Instant) -> Self {
        Self {
            env,
            name,
            id,
            epoch,
            connect_timeout: Duration::from_secs(cfg.connect_timeout_secs),
            recording: None,
            zero_us: 0,
            slots: HashMap::new(),
            first_held_at: None,
            frames_before_zero: 0,
            failed: None,
        }
    }

    /// Runs until the session ends, then closes the connection, drains it and finalizes.
    pub(super) async fn run(mut self, mut peer: RecvPeer, mut out: mpsc::Receiver<PeerOutput>, mut stop: oneshot::Receiver<()>) {
        let connect_deadline = tokio::time::Instant::now() + self.connect_timeout;
        let mut connected = false;
        let end = loop {
            tokio::select! {
                _ = &mut stop => break End::Deleted,
                () = tokio::time::sleep_until(connect_deadline), if !connected => break End::NeverConnected,
                o = out.recv() => match o {
                    Some(PeerOutput::Connected) => {
                        connected = true;
                        info!("WHIP media connection up");
                    }
                    Some(PeerOutput::Failed { reason }) => {
                        warn!(%reason, "WHIP media connection failed");
                        break End::ConnectionFailed;
                    }
                    Some(o) => {
                        self.on_output(o, &peer).await;
                        if !self.slots.is_empty() && self.slots.values().all(|s| s.ended) {
                            break End::TracksEnded;
                        }
                    }
                    None => break End::TracksEnded,
                },
            }
        };
        info!(?end, "WHIP session ending; closing the connection");
        peer.close().await;
        let drain = async {
            while let Some(o) = out.recv().await {
                self.on_output(o, &peer).await;
            }
        };
        if tokio::time::timeout(DRAIN_TIMEOUT, drain).await.is_err() {
            warn!("tracks did not finish within {DRAIN_TIMEOUT:?} of closing; finishing with what arrived");
        }
        drop(peer);
        self.finish().await;
    }

    async fn on_output(&mut self, o: PeerOutput, peer: &RecvPeer) {
        match o {
            PeerOutput::TrackOpened { track, stream_id, track_id, kind, codec, clock_rate } => {
                let same_kind = self.slots.values().filter(|s| s.kind == kind).count();
                let source = match (kind, same_kind) {
                    (MediaKind::Video, 0) => TrackSource::Camera,
                    (MediaKind::Video, _) => TrackSource::Screen,
                    (MediaKind::Audio, 0) => TrackSource::Microphone,
                    (MediaKind::Audio, _) => TrackSource::ScreenAudio,
                };
                let span = info_span!("track", %track, ?codec);
                span.in_scope(|| info!(%stream_id, %track_id, clock_rate, %source, "track opened"));
                metrics::gauge!(m::ACTIVE_TRACKS).increment(1.0);
                self.slots.insert(
                    track,
                    Slot {
                        kind,
                        codec,
                        source,
                        recording_track: None,
                        held: VecDeque::new(),
                        dropped_held: 0,
                        ended: false,
                        last_keyframe_request: None,
                        last_stats: TrackStats::default(),
                        span,
                    },
                );
                if self.recording.is_some() {
                    self.add_track(track).await;
                }
            }
            PeerOutput::Frame { track, frame } => self.on_frame(track, frame, peer).await,
            PeerOutput::TrackEnded { track } => {
                if let Some(slot) = self.slots.get_mut(&track) {
                    if !slot.ended {
                        slot.ended = true;
                        metrics::gauge!(m::ACTIVE_TRACKS).decrement(1.0);
                        slot.span.in_scope(|| info!("track ended"));
                    }
                }
                // A track that ended without media no longer holds the start back.
                self.try_flush(false).await;
            }
            PeerOutput::Stats { track, stats } => {
                if let Some(slot) = self.slots.get_mut(&track) {
                    m::count_track_stats(&stats, &slot.last_stats);
                    slot.last_stats = stats;
                    slot.span.in_scope(|| debug!(?stats, "track stats"));
                }
            }
            PeerOutput::LocalCandidate { .. } | PeerOutput::GatheringComplete | PeerOutput::Connected => {}
            PeerOutput::Failed { reason } => warn!(%reason, "media connection failed"),
        }
    }

    async fn on_frame(&mut self, track: TrackKey, frame: EncodedFrame, peer: &RecvPeer) {
        let Some(slot) = self.slots.get_mut(&track) else { return };
        if self.recording.is_none() {
            self.first_held_at.get_or_insert_with(Instant::now);
        }
        slot.held.push_back(frame);
        if slot.held.len() > MAX_HELD_FRAMES {
            slot.held.pop_front();
            slot.dropped_held += 1;
            if slot.dropped_held.is_power_of_two() {
                slot.span.in_scope(|| warn!(dropped = slot.dropped_held, "recording not started yet; dropping the oldest held frames"));
            }
        }
        self.try_flush(false).await;
        // A writer that waits for a keyframe (start, parameter change) asks the publisher for one.
        let (Some(rec), Some(slot)) = (self.recording.as_ref(), self.slots.get_mut(&track)) else { return };
        if let Some(t) = &slot.recording_track {
            if rec.wants_keyframe(t) && slot.last_keyframe_request.is_none_or(|at| at.elapsed() >= KEYFRAME_REQUEST_INTERVAL) {
                slot.last_keyframe_request = Some(Instant::now());
                peer.request_keyframe(track);
            }
        }
    }

    /// Starts the recording once every live track has a frame (or the start wait passed, or the
    /// session ends: `closing`), then writes every held frame.
    async fn try_flush(&mut self, closing: bool) {
        if self.failed.is_some() {
            return;
        }
        if self.recording.is_none() {
            if self.slots.values().all(|s| s.held.is_empty()) {
                return;
            }
            let all_started = self.slots.values().all(|s| s.ended || !s.held.is_empty());
            let waited = self.first_held_at.is_some_and(|t| t.elapsed() >= crate::bot::START_WAIT);
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
            while let Some(mut f) = slot.held.pop_front() {
                f.pts_us -= zero;
                if f.pts_us < 0 {
                    self.frames_before_zero += 1;
                    continue;
                }
                if let Err(e) = rec.write(&track, f).await {
                    let reason = format!("writing track {track}: {e:#}");
                    warn!(error = %reason, "the recording cannot go on; what is stored so far is kept");
                    self.failed = Some(reason);
                    return;
                }
            }
        }
    }

    /// Creates the recording with the publisher as its participant and the earliest held frame
    /// as zero, and adds every track.
    async fn start_recording(&mut self) -> anyhow::Result<()> {
        self.zero_us = self.slots.values().filter_map(|s| s.held.front().map(|f| f.pts_us)).min().unwrap_or(0);
        let room = super::room_of(&self.name);
        let mut rec = Recording::start_at(
            self.env.clone(),
            &room,
            CallFlavour::Whip,
            Some(&self.id),
            crate::bot::wall_ms_at(self.epoch, self.zero_us),
        )
        .await?;
        let who = ParticipantInfo { id: room.clone(), user_id: room, device_id: Some(self.id.clone()), display_name: self.name.clone() };
        rec.participant_joined(who, 0).await?;
        metrics::gauge!(m::ACTIVE_CALLS).increment(1.0);
        info!(recording = %rec.id(), "recording the WHIP session");
        self.recording = Some(rec);
        let keys: Vec<TrackKey> = self.slots.keys().copied().collect();
        for k in keys {
            self.add_track(k).await;
        }
        Ok(())
    }

    async fn add_track(&mut self, key: TrackKey) {
        let (Some(slot), Some(rec)) = (self.slots.get_mut(&key), self.recording.as_mut()) else { return };
        if slot.recording_track.is_some() {
            return;
        }
        let info = TrackInfo { participant_id: super::room_of(&self.name), codec: slot.codec, source: slot.source };
        match rec.add_track(info).await {
            Ok(id) => {
                slot.span.in_scope(|| info!(recording_track = %id, "track recorded"));
                slot.recording_track = Some(id);
            }
            Err(e) => self.fail(format!("adding track {key}: {e:#}")),
        }
    }

    fn fail(&mut self, reason: String) {
        warn!(error = %reason, "the recording cannot go on");
        self.failed = Some(reason);
    }

    /// Writes what is still held and finalizes the recording.
    async fn finish(mut self) {
        self.try_flush(true).await;
        let open = self.slots.values().filter(|s| !s.ended).count();
        metrics::gauge!(m::ACTIVE_TRACKS).decrement(open as f64);
        if self.frames_before_zero > 0 {
            info!(frames = self.frames_before_zero, "frames stamped before the recording's first frame were dropped");
        }
        let Some(rec) = self.recording.take() else {
            info!(reason = self.failed.as_deref().unwrap_or("no media arrived"), "WHIP session ended without a recording");
            return;
        };
        metrics::gauge!(m::ACTIVE_CALLS).decrement(1.0);
        let id = rec.id().clone();
        match rec.finish().await {
            Ok(f) => info!(recording = %id, manifest = %f.manifest_location, composites = f.composites.len(), "WHIP recording stored"),
            Err(e) => warn!(recording = %id, error = %format!("{e:#}"), "finalizing the WHIP recording failed; its files stay in the spool"),
        }
    }
}
