//! One recording, from the first frame to a stored, catalogued composite.
//!
//! A call adapter (import today; 1:1, MatrixRTC and mesh calls next) owns a [`Recording`] and
//! tells it who joined and left, which tracks exist, and each track's encoded frames on the
//! recording clock. The recording cuts frames into segments, queues every closed segment for
//! upload while the call is still running, and keeps the catalog in step. [`Recording::finish`]
//! runs the finalizer: wait for the segment uploads, render the composite, write and upload the
//! manifest, and move the catalog entry to `uploaded`.
//!
//! [`Env`] holds what every recording shares: the configuration, the store, the catalog, the spool
//! and the upload queue.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use object_store::path::Path as ObjectPath;
use object_store::ObjectStore;
use storage::catalog::{Segment, Track};
use storage::manifest::{self, CallFlavour, Manifest, Span, TrackKind};
use storage::{
    build_store, key_component, Catalog, ObjectKeys, RecordingId, RecordingState, RoomId, Spool,
    StoreBackend, UploadQueue, UploadReport, Uploader,
};
use tokio::sync::oneshot;
use tracing::{info, info_span, warn, Instrument};
use transcoder::{Codec, EncodedFrame, MediaKind, SegmentInfo, TrackWriter, TrackWriterConfig};

use crate::config::Config;
use crate::timeline::Timeline;

mod recovery;

pub use storage::manifest::TrackSource;

/// Finalizes tried per recording (the first one and the retries at later starts) before a failed
/// recording is left failed for good.
pub const FINALIZE_ATTEMPTS: usize = 3;
/// The audit action of a failed finalize; its count is the number of attempts so far.
const FINALIZE_FAILED: &str = "recording.finalize_failed";

/// What all recordings of one process share.
pub struct Env {
    pub config: Config,
    pub store: Arc<dyn ObjectStore>,
    pub catalog: Catalog,
    pub spool: Spool,
    uploads: Option<UploadQueue>,
    /// Uploads a previous run left in the spool, queued again at open, by object key: recovery
    /// takes the ones of the recordings it finishes and waits for them.
    resumed: std::sync::Mutex<BTreeMap<String, UploadReceiver>>,
    _spool_lock: storage::SpoolLock,
}

type UploadReceiver = oneshot::Receiver<storage::Result<UploadReport>>;

impl Env {
    /// Everything: store, spool, catalog (migrated), and the upload queue, which first picks up
    /// whatever a previous run left in the spool.
    pub async fn open(config: &Config) -> Result<Self> {
        let problems = config.validate();
        if !problems.is_empty() {
            let list: Vec<String> = problems.iter().map(ToString::to_string).collect();
            return Err(anyhow!("invalid configuration:\n  {}", list.join("\n  ")));
        }
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("creating data_dir {}", config.data_dir.display()))?;
        let store = build_store(&config.storage).context("opening the object store")?;
        let spool = Spool::open(config.spool_dir()).await.context("opening the spool")?;
        let spool_lock = spool.lock_exclusive()?;
        let catalog = Catalog::connect(&config.catalog_url())
            .await
            .with_context(|| format!("opening the catalog at {}", redact_url(&config.catalog_url())))?;
        let uploader = Uploader::new(store.clone(), spool.clone(), config.upload.clone())?;
        let uploads = UploadQueue::start(uploader);
        let resumed: BTreeMap<String, UploadReceiver> =
            uploads.resume_from_spool().await?.into_iter().map(|(p, rx)| (p.key, rx)).collect();
        if !resumed.is_empty() {
            info!(resumed = resumed.len(), "queued uploads left in the spool by a previous run");
        }
        Ok(Self {
            config: config.clone(),
            store,
            catalog,
            spool,
            uploads: Some(uploads),
            resumed: std::sync::Mutex::new(resumed),
            _spool_lock: spool_lock,
        })
    }

    /// The recordings a start finishes: those a previous run left in the recording or finalizing
    /// state, and those whose finalize failed (the store away for longer than the upload retries,
    /// say) fewer than [`FINALIZE_ATTEMPTS`] times. Their spooled files are still there; the
    /// uploads [`Env::open`] queued again carry them to the store.
    pub async fn recordings_to_finish(&self) -> Result<Vec<storage::catalog::Recording>> {
        let mut rows = self.catalog.unfinished_recordings().await?;
        for row in self.catalog.failed_recordings().await? {
            let attempts = self.catalog.audit_events(&row.id).await?.iter().filter(|e| e.action == FINALIZE_FAILED).count();
            if (1..FINALIZE_ATTEMPTS).contains(&attempts) {
                info!(recording = %row.id, attempts, "retrying the finalize of a recording that failed it");
                rows.push(row);
            }
        }
        Ok(rows)
    }

    /// The outcome of an upload queued again at open, once.
    fn take_resumed(&self, key: &str) -> Option<UploadReceiver> {
        self.resumed.lock().unwrap_or_else(|e| e.into_inner()).remove(key)
    }

    fn uploads(&self) -> &UploadQueue {
        self.uploads.as_ref().expect("upload queue lives until shutdown")
    }

    /// Finish every queued upload, then close the catalog.
    pub async fn shutdown(mut self) {
        if let Some(q) = self.uploads.take() {
            q.shutdown().await;
        }
        self.catalog.close().await;
    }

    /// Where an object can be found by a person: a file path for the local store, a URL-ish
    /// location otherwise.
    pub fn locate(&self, key: &ObjectPath) -> String {
        locate(&self.config.storage, key.as_ref())
    }
}

/// Where `key` lives, for a person: a file path for the local store, a URL-like name otherwise.
pub fn locate(cfg: &storage::StoreConfig, key: &str) -> String {
    let prefix = cfg.prefix.trim_matches('/');
    let full = if prefix.is_empty() { key.to_string() } else { format!("{prefix}/{key}") };
    match &cfg.backend {
        StoreBackend::Local(l) => l.root.join(full).display().to_string(),
        StoreBackend::S3(s) => format!("s3://{}/{full}", s.bucket.as_deref().unwrap_or("$AWS_BUCKET")),
        StoreBackend::Gcs(g) => format!("gs://{}/{full}", g.bucket.as_deref().unwrap_or("$GOOGLE_BUCKET")),
        StoreBackend::Azure(a) => {
            format!("azure://{}/{full}", a.container.as_deref().unwrap_or("$AZURE_CONTAINER_NAME"))
        }
    }
}

/// A one-line description of the configured store (no secrets).
pub fn describe_store(cfg: &storage::StoreConfig) -> String {
    let root = locate(cfg, "");
    match &cfg.backend {
        StoreBackend::S3(s) => format!(
            "{root} at {}",
            s.endpoint.as_deref().unwrap_or("the AWS endpoint (or $AWS_ENDPOINT)")
        ),
        _ => root,
    }
}

fn redact_url(url: &str) -> String {
    // postgres://user:secret@host → postgres://user:***@host
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => match url[s + 3..at].find(':') {
            Some(c) => format!("{}:***{}", &url[..s + 3 + c], &url[at..]),
            None => url.to_string(),
        },
        _ => url.to_string(),
    }
}

/// A participant as the call adapter knows them.
#[derive(Debug, Clone)]
pub struct ParticipantInfo {
    /// The adapter's key for this participant, unique in the call (user id + device for Matrix).
    pub id: String,
    pub user_id: String,
    pub device_id: Option<String>,
    pub display_name: String,
}

#[derive(Debug, Clone)]
pub struct TrackInfo {
    pub participant_id: String,
    pub codec: Codec,
    pub source: TrackSource,
}

struct TrackState {
    info: TrackInfo,
    writer: Option<TrackWriter>,
    segments: Vec<(SegmentInfo, ObjectPath)>,
    rejected_frames: u64,
}

/// One track joined into a single file (codec copy of its segments), stored beside the composite.
#[derive(Debug, Clone)]
pub struct TrackFile {
    pub track_id: String,
    pub key: String,
    pub bytes: u64,
    /// Container and codec for people, e.g. `WebM VP8`.
    pub codec_label: String,
}

/// The result of a finished recording.
#[derive(Debug)]
pub struct Finished {
    pub recording_id: RecordingId,
    pub manifest_key: ObjectPath,
    /// Where a person finds the manifest (a file path for the local store).
    pub manifest_location: String,
    pub composites: Vec<String>,
    /// Per-track files, in the manifest's track order (tracks that could not be joined are
    /// missing; their segments are in the store either way).
    pub track_files: Vec<TrackFile>,
    pub manifest: Manifest,
}

pub struct Recording {
    env: Arc<Env>,
    id: RecordingId,
    call_id: storage::CallId,
    keys: ObjectKeys,
    epoch_ms: i64,
    dir: PathBuf,
    participants: BTreeMap<String, (ParticipantInfo, Vec<storage::ParticipantId>)>,
    tracks: BTreeMap<String, TrackState>,
    timeline: Timeline,
    pending_uploads: Vec<(ObjectPath, PathBuf, UploadReceiver)>,
    last_us: i64,
    manifest: Manifest,
    /// Users who asked not to be recorded: every participant of theirs is left out.
    opted_out_users: BTreeSet<String>,
    /// Frames stamped before the last resume (or a participant's last opt-in) were captured
    /// inside the gap and arrive late: they are left out too.
    resumed_at_us: i64,
    opted_in_at_us: BTreeMap<String, i64>,
    span: tracing::Span,
}

fn kind_of(k: MediaKind) -> TrackKind {
    match k {
        MediaKind::Audio => TrackKind::Audio,
        MediaKind::Video => TrackKind::Video,
    }
}

impl Recording {
    /// Starts a recording of a call in `room`; the recording holds `env` until it finishes.
    pub async fn start(env: Arc<Env>, room: &str, flavour: CallFlavour, external_call_id: Option<&str>) -> Result<Self> {
        Self::start_at(env, room, flavour, external_call_id, storage::now_ms()).await
    }

    /// [`Recording::start`] with the wall-clock time (Unix ms) of the recording's zero, when
    /// that lies before now: frames held while the tracks of a call came up are written with
    /// times from that zero.
    pub async fn start_at(
        env: Arc<Env>,
        room: &str,
        flavour: CallFlavour,
        external_call_id: Option<&str>,
        epoch_ms: i64,
    ) -> Result<Self> {
        let room_id = RoomId::new(room);
        let call = env.catalog.create_call(&room_id, flavour, external_call_id, epoch_ms).await?;
        let rec = env.catalog.create_recording(&call.id, epoch_ms).await?;
        let keys = ObjectKeys::new(&room_id, &rec.id);
        let dir = env
            .spool
            .path_for(&format!("{}/{}/.keep", key_component(room), key_component(rec.id.as_str())))
            .await?
            .parent()
            .expect("spool path has a parent")
            .to_path_buf();
        let manifest = Manifest::new(
            rec.id.as_str(),
            epoch_ms,
            manifest::RoomInfo { id: room.to_string(), name: None },
            manifest::CallInfo {
                id: call.id.to_string(),
                flavour,
                span: Span::from_offsets(epoch_ms, 0, None),
            },
        );
        let span = info_span!("recording", room = %room, recording = %rec.id);
        span.in_scope(|| info!(dir = %dir.display(), "recording started"));
        env.catalog
            .audit("mxrec", "recording.started", Some(&rec.id), serde_json::json!({ "room": room }))
            .await?;
        Ok(Self {
            env: env.clone(),
            id: rec.id,
            call_id: call.id.clone(),
            keys,
            epoch_ms,
            dir,
            participants: BTreeMap::new(),
            tracks: BTreeMap::new(),
            timeline: Timeline::default(),
            pending_uploads: Vec::new(),
            last_us: 0,
            manifest,
            opted_out_users: BTreeSet::new(),
            resumed_at_us: 0,
            opted_in_at_us: BTreeMap::new(),
            span,
        })
    }

    pub fn id(&self) -> &RecordingId {
        &self.id
    }

    pub fn is_present(&self, participant: &str) -> bool {
        self.timeline.is_present(participant)
    }

    /// A participant joined (or rejoined): the timeline and the catalog learn it now, so a crash
    /// leaves a catalog that says who was there.
    pub async fn participant_joined(&mut self, p: ParticipantInfo, at_us: i64) -> Result<()> {
        if self.timeline.is_present(&p.id) {
            return Ok(());
        }
        self.timeline.joined(&p.id, at_us);
        if self.opted_out_users.contains(&p.user_id) {
            self.timeline.set_opted_out(&p.id, true, at_us);
        }
        let row = self
            .env
            .catalog
            .add_participant(
                &self.id,
                &p.id,
                &storage::UserId::new(p.user_id.as_str()),
                p.device_id.as_deref().map(storage::DeviceId::new).as_ref(),
                Some(&p.display_name),
                self.epoch_ms + at_us / 1000,
            )
            .await?;
        self.participants.entry(p.id.clone()).or_insert_with(|| (p, Vec::new())).1.push(row.id);
        Ok(())
    }

    pub async fn participant_left(&mut self, participant: &str, at_us: i64) -> Result<()> {
        if !self.timeline.is_present(participant) {
            return Ok(());
        }
        self.timeline.left(participant, at_us);
        // An opt-out lasts for the user, not for this presence: a rejoin opens a new span.
        self.timeline.set_opted_out(participant, false, at_us);
        if let Some(row) = self.participants.get(participant).and_then(|(_, rows)| rows.last()) {
            self.env.catalog.participant_left(row, self.epoch_ms + at_us / 1000).await?;
        }
        Ok(())
    }

    pub fn set_muted(&mut self, track: &str, muted: bool, at_us: i64) {
        self.timeline.set_muted(track, muted, at_us);
    }

    /// Marks where a track's media could not be decrypted (E2EE frames without a usable key):
    /// the manifest lists those spans; no media of them is written.
    pub fn set_undecryptable(&mut self, track: &str, undecryptable: bool, at_us: i64) {
        self.timeline.set_undecryptable(track, undecryptable, at_us);
    }

    /// Ends one track before the recording ends (a screen share stopped, a track unpublished):
    /// its writer closes its last segment now; later frames for it are refused.
    pub async fn end_track(&mut self, track: &str) -> Result<()> {
        let Some(w) = self.tracks.get_mut(track).and_then(|t| t.writer.take()) else { return Ok(()) };
        let closed = w.finish().with_context(|| format!("closing track {track}"))?;
        self.segments_closed(track, closed).await
    }

    /// Registers a track and opens its segment writer; returns the track id used in keys and the
    /// manifest.
    pub async fn add_track(&mut self, info: TrackInfo) -> Result<String> {
        let Some(participant_row) =
            self.participants.get(&info.participant_id).and_then(|(_, rows)| rows.last()).cloned()
        else {
            return Err(anyhow!("track for unknown participant {}", info.participant_id));
        };
        let base = key_component(&format!("{}-{}", info.participant_id, info.source));
        let mut id = base.clone();
        let mut n = 1;
        while self.tracks.contains_key(&id) {
            n += 1;
            id = format!("{base}-{n}");
        }
        let mut cfg = TrackWriterConfig::new(self.dir.join(&id), id.clone(), info.codec);
        cfg.segment_duration = self.env.config.segment_duration();
        let writer = TrackWriter::new(cfg)
        .with_context(|| format!("opening the segment writer for track {id}"))?;
        self.env
            .catalog
            .add_track(&Track {
                recording_id: self.id.clone(),
                id: storage::TrackId::new(id.as_str()),
                participant_id: participant_row,
                kind: kind_of(info.codec.kind()),
                codec: codec_name(info.codec).to_string(),
                source: info.source,
            })
            .await?;
        self.span.in_scope(|| info!(track = %id, codec = ?info.codec, source = %info.source, "track added"));
        self.tracks.insert(
            id.clone(),
            TrackState { info, writer: Some(writer), segments: Vec::new(), rejected_frames: 0 },
        );
        Ok(id)
    }

    /// Whether the track's writer waits for a keyframe (the receive path then asks for one).
    /// Not while paused or while the track's participant is opted out: nothing is written then.
    pub fn wants_keyframe(&self, track: &str) -> bool {
        if self.timeline.is_paused() {
            return false;
        }
        self.tracks
            .get(track)
            .filter(|t| !self.timeline.is_opted_out(&t.info.participant_id))
            .and_then(|t| t.writer.as_ref())
            .is_some_and(TrackWriter::wants_keyframe)
    }

    pub fn is_paused(&self) -> bool {
        self.timeline.is_paused()
    }

    /// Whether a user asked not to be recorded.
    pub fn is_opted_out(&self, user_id: &str) -> bool {
        self.opted_out_users.contains(user_id)
    }

    /// Pauses the recording: nothing is written until [`Self::resume`]; every open segment is
    /// closed now. False when it was paused already.
    pub async fn pause(&mut self, by: &str, at_us: i64) -> Result<bool> {
        if self.timeline.is_paused() {
            return Ok(false);
        }
        let at_us = self.control_time(at_us);
        self.timeline.set_paused(true, at_us);
        let tracks: Vec<String> = self.tracks.keys().cloned().collect();
        self.interrupt(&tracks).await?;
        self.control("pause", by, None, at_us).await?;
        Ok(true)
    }

    /// Ends a pause. False when it was not paused.
    pub async fn resume(&mut self, by: &str, at_us: i64) -> Result<bool> {
        if !self.timeline.is_paused() {
            return Ok(false);
        }
        let at_us = self.control_time(at_us);
        self.timeline.set_paused(false, at_us);
        self.resumed_at_us = self.resumed_at_us.max(at_us);
        self.control("resume", by, None, at_us).await?;
        Ok(true)
    }

    /// Leaves a user's audio and video out from now on (every device of theirs, and any that
    /// joins later); their open segments are closed now. False when they had opted out already.
    pub async fn opt_out(&mut self, user_id: &str, by: &str, at_us: i64) -> Result<bool> {
        if !self.opted_out_users.insert(user_id.to_owned()) {
            return Ok(false);
        }
        let at_us = self.control_time(at_us);
        let theirs = self.participants_of(user_id);
        for p in &theirs {
            if self.timeline.is_present(p) {
                self.timeline.set_opted_out(p, true, at_us);
            }
        }
        let tracks: Vec<String> =
            self.tracks.iter().filter(|(_, t)| theirs.contains(&t.info.participant_id)).map(|(id, _)| id.clone()).collect();
        self.interrupt(&tracks).await?;
        self.control("optout", by, Some(user_id), at_us).await?;
        Ok(true)
    }

    /// Records a user again. False when they had not opted out.
    pub async fn opt_in(&mut self, user_id: &str, by: &str, at_us: i64) -> Result<bool> {
        if !self.opted_out_users.remove(user_id) {
            return Ok(false);
        }
        let at_us = self.control_time(at_us);
        for p in self.participants_of(user_id) {
            self.timeline.set_opted_out(&p, false, at_us);
            self.opted_in_at_us.insert(p, at_us);
        }
        self.control("optin", by, Some(user_id), at_us).await?;
        Ok(true)
    }

    /// Notes in the manifest and the audit table that someone started or stopped the recording
    /// (`action` is `start` or `stop`); a stop also marks where the recording ends at the latest.
    pub async fn note(&mut self, action: &str, by: &str, at_us: i64) -> Result<()> {
        let at_us = self.control_time(at_us);
        if action == "stop" {
            self.last_us = self.last_us.max(at_us);
        }
        self.control(action, by, None, at_us).await
    }

    fn control_time(&self, at_us: i64) -> i64 {
        at_us.max(0)
    }

    fn participants_of(&self, user_id: &str) -> Vec<String> {
        self.participants.iter().filter(|(_, (p, _))| p.user_id == user_id).map(|(id, _)| id.clone()).collect()
    }

    /// Closes the open segments of `tracks` (frames are about to be left out).
    async fn interrupt(&mut self, tracks: &[String]) -> Result<()> {
        for id in tracks {
            let Some(w) = self.tracks.get_mut(id).and_then(|t| t.writer.as_mut()) else { continue };
            let closed = w.interrupt().with_context(|| format!("closing the open segment of track {id}"))?;
            self.segments_closed(id, closed).await?;
        }
        Ok(())
    }

    async fn control(&mut self, action: &str, by: &str, subject: Option<&str>, at_us: i64) -> Result<()> {
        self.manifest.control.push(manifest::ControlEvent {
            at: manifest::wall_clock(self.epoch_ms, at_us),
            at_us,
            action: action.to_owned(),
            by: by.to_owned(),
            subject: subject.map(str::to_owned),
        });
        self.span.in_scope(|| info!(action, by, subject, at_us, "recording control"));
        self.env
            .catalog
            .audit(by, &format!("recording.{action}"), Some(&self.id), serde_json::json!({ "at_us": at_us, "subject": subject }))
            .await?;
        Ok(())
    }

    /// Writes one frame. A frame the writer rejects (malformed, out of order) is counted and
    /// logged; the recording goes on. Only an unknown track or a failing spool is an error.
    /// Frames during a pause, or of a participant who opted out, are left out.
    pub async fn write(&mut self, track: &str, frame: EncodedFrame) -> Result<()> {
        if self.timeline.is_paused() {
            return Ok(());
        }
        let state = self.tracks.get_mut(track).ok_or_else(|| anyhow!("unknown track {track}"))?;
        let opted_in_at = self.opted_in_at_us.get(&state.info.participant_id).copied().unwrap_or(0);
        if self.timeline.is_opted_out(&state.info.participant_id)
            || frame.pts_us < self.resumed_at_us
            || frame.pts_us < opted_in_at
        {
            return Ok(());
        }
        let Some(writer) = state.writer.as_mut() else {
            return Err(anyhow!("track {track} is already finished"));
        };
        self.last_us = self.last_us.max(frame.pts_us);
        let started = std::time::Instant::now();
        let written = writer.write(frame);
        metrics::histogram!(crate::http::metrics::FRAME_WRITE_SECONDS).record(started.elapsed().as_secs_f64());
        let closed = match written {
            Ok(closed) => closed,
            Err(e) => {
                state.rejected_frames += 1;
                if state.rejected_frames <= 5 || state.rejected_frames.is_power_of_two() {
                    self.span.in_scope(|| {
                        warn!(track, rejected = state.rejected_frames, error = %e, "frame rejected")
                    });
                }
                return Ok(());
            }
        };
        self.segments_closed(track, closed).await
    }

    async fn segments_closed(&mut self, track: &str, closed: Vec<SegmentInfo>) -> Result<()> {
        for seg in closed {
            let ext = seg.path.extension().and_then(|e| e.to_str()).unwrap_or("mkv").to_string();
            let key = self.keys.segment(&storage::TrackId::new(track), seg.index, &ext);
            let rx = self.env.uploads().enqueue(&seg.path, &key, Some(&self.id)).await?;
            metrics::counter!(crate::http::metrics::SEGMENTS_WRITTEN).increment(1);
            self.pending_uploads.push((key.clone(), seg.path.clone(), rx));
            self.env
                .catalog
                .add_segment(&Segment {
                    recording_id: self.id.clone(),
                    track_id: storage::TrackId::new(track),
                    index: seg.index,
                    start_us: seg.start_us,
                    end_us: seg.end_us,
                    bytes: seg.bytes,
                    sha256: seg.sha256.clone(),
                    object_key: key.to_string(),
                })
                .await?;
            self.last_us = self.last_us.max(seg.end_us);
            self.tracks.get_mut(track).expect("track exists").segments.push((seg, key));
        }
        Ok(())
    }

    /// Ends the recording and runs the finalizer. Returns where everything went.
    pub async fn finish(mut self) -> Result<Finished> {
        let span = self.span.clone();
        async move {
            // Close every track even when one fails: a failure on one must not strand the others'
            // open segments. What could not be closed is logged and audited; the rest is stored.
            let mut close_errors = Vec::new();
            let ids: Vec<String> = self.tracks.keys().cloned().collect();
            for id in &ids {
                let Some(w) = self.tracks.get_mut(id).and_then(|t| t.writer.take()) else { continue };
                let closed = match w.finish() {
                    Ok(closed) => closed,
                    Err(e) => {
                        close_errors.push(format!("closing track {id}: {e}"));
                        continue;
                    }
                };
                if let Err(e) = self.segments_closed(id, closed).await {
                    close_errors.push(format!("queueing the last segments of track {id}: {e:#}"));
                }
            }
            for e in &close_errors {
                warn!(error = %e, "a track could not be closed cleanly; the others are stored");
            }
            let result = self.end_and_finalize(&close_errors).await;
            if let Err(e) = &result {
                let reason = format!("{e:#}");
                warn!(error = %reason, "finalize failed; spooled files are kept for a retry at the next start");
                let _ = self.env.catalog.set_recording_state(&self.id, RecordingState::Failed, Some(&reason)).await;
                let _ = self
                    .env
                    .catalog
                    .audit("mxrec", FINALIZE_FAILED, Some(&self.id), serde_json::json!({ "reason": reason }))
                    .await;
            }
            result
        }
        .instrument(span)
        .await
    }

    async fn end_and_finalize(&mut self, close_errors: &[String]) -> Result<Finished> {
        let end_us = self.last_us;
        let present: Vec<String> =
            self.participants.keys().filter(|p| self.timeline.is_present(p)).cloned().collect();
        for p in present {
            self.participant_left(&p, end_us).await?;
        }
        let ended_ms = self.epoch_ms + end_us / 1000;
        self.env.catalog.set_recording_ended(&self.id, ended_ms).await?;
        self.env.catalog.end_call(&self.call_id, ended_ms).await?;
        if !close_errors.is_empty() {
            self.env
                .catalog
                .audit("mxrec", "recording.track_close_failed", Some(&self.id), serde_json::json!({ "errors": close_errors }))
                .await?;
        }
        self.env.catalog.set_recording_state(&self.id, RecordingState::Finalizing, None).await?;
        self.finalize(end_us).await
    }

    /// Joins each track's segments into one codec-copy file, stores it beside the composite and
    /// notes it in the manifest. A track that cannot be joined (its codec parameters changed
    /// mid-call) keeps only its segments; that is logged, not an error.
    async fn store_track_files(&mut self, local: &BTreeMap<String, PathBuf>) -> Result<Vec<TrackFile>> {
        let mut out = Vec::new();
        for ti in 0..self.manifest.tracks.len() {
            let t = &self.manifest.tracks[ti];
            let Some(first) = t.segments.first() else { continue };
            let ext = Path::new(&first.key).extension().and_then(|e| e.to_str()).unwrap_or("mkv").to_string();
            let paths: Vec<PathBuf> = t.segments.iter().filter_map(|s| local.get(&s.key).cloned()).collect();
            let (track_id, codec) = (t.id.clone(), t.codec.clone());
            let path = self.dir.join(format!("{track_id}.{ext}"));
            let target = path.clone();
            let joined = tokio::task::spawn_blocking(move || transcoder::join_segments(&paths, &target))
                .await
                .context("the join task panicked")?;
            let report = match joined {
                Ok(r) => r,
                Err(e) => {
                    warn!(track = %track_id, error = %e, "the track's segments cannot be joined into one file; they are stored one by one");
                    continue;
                }
            };
            let key = self.keys.output(&format!("{track_id}.{ext}"));
            let rx = self.env.uploads().enqueue(&path, &key, Some(&self.id)).await?;
            let stored = await_upload(&self.env, &self.id, &key, &path, rx).await?;
            self.manifest.tracks[ti].file =
                Some(manifest::FileInfo { key: key.to_string(), bytes: stored.size, sha256: report.sha256.clone() });
            let container = if ext == "webm" { "WebM" } else { "Matroska" };
            out.push(TrackFile {
                track_id,
                key: key.to_string(),
                bytes: stored.size,
                codec_label: format!("{container} {}", codec_from_name(&codec).map_or(codec.as_str(), |c| c.display_name())),
            });
        }
        Ok(out)
    }

    async fn finalize(&mut self, end_us: i64) -> Result<Finished> {
        // 1. Every segment stored and verified.
        for (key, local, rx) in std::mem::take(&mut self.pending_uploads) {
            await_upload(&self.env, &self.id, &key, &local, rx).await?;
        }

        // 2. The manifest's body.
        let epoch = self.epoch_ms;
        let m = &mut self.manifest;
        m.call.span = Span::from_offsets(epoch, 0, Some(end_us));
        m.pauses = self.timeline.pauses(end_us).iter().map(|s| Span::from_offsets(epoch, s.start_us, Some(s.end_us))).collect();
        m.participants = self
            .participants
            .values()
            .map(|(p, _)| manifest::ParticipantInfo {
                id: p.id.clone(),
                user_id: p.user_id.clone(),
                device_id: p.device_id.clone(),
                display_name: Some(p.display_name.clone()),
                present: self
                    .timeline
                    .presence(&p.id, end_us)
                    .iter()
                    .map(|s| Span::from_offsets(epoch, s.start_us, Some(s.end_us)))
                    .collect(),
                opted_out: self
                    .timeline
                    .opted_out(&p.id, end_us)
                    .iter()
                    .map(|s| Span::from_offsets(epoch, s.start_us, Some(s.end_us)))
                    .collect(),
            })
            .collect();
        m.tracks = self
            .tracks
            .iter()
            .map(|(id, t)| manifest::TrackInfo {
                id: id.clone(),
                participant: t.info.participant_id.clone(),
                kind: kind_of(t.info.codec.kind()),
                codec: codec_name(t.info.codec).to_string(),
                source: t.info.source,
                muted: self
                    .timeline
                    .mutes(id, end_us)
                    .iter()
                    .map(|s| Span::from_offsets(epoch, s.start_us, Some(s.end_us)))
                    .collect(),
                undecryptable: self
                    .timeline
                    .undecryptable(id, end_us)
                    .iter()
                    .map(|s| Span::from_offsets(epoch, s.start_us, Some(s.end_us)))
                    .collect(),
                file: None,
                segments: t
                    .segments
                    .iter()
                    .map(|(s, key)| manifest::SegmentInfo {
                        index: s.index,
                        start_us: s.start_us,
                        end_us: s.end_us,
                        bytes: s.bytes,
                        sha256: s.sha256.clone(),
                        key: key.to_string(),
                    })
                    .collect(),
            })
            .collect();

        // 3. Per-track files and the composite, from the segments: the spool copies where they
        //    are still there, else fetched back from the store (and checked against the manifest).
        let mut composites = Vec::new();
        let mut track_files = Vec::new();
        let has_media = self.manifest.tracks.iter().any(|t| !t.segments.is_empty());
        if has_media {
            let spooled: BTreeMap<String, PathBuf> = self
                .tracks
                .values()
                .flat_map(|t| t.segments.iter().map(|(s, k)| (k.to_string(), s.path.clone())))
                .collect();
            let work = tempfile::tempdir_in(&self.dir).context("creating a work directory")?;
            let local = crate::export::materialize(self.env.store.as_ref(), &self.manifest, &spooled, work.path()).await?;
            track_files = self.store_track_files(&local).await?;
            if self.env.config.composite.enabled {
                let out_dir = self.dir.clone();
                let output = crate::export::render_manifest(
                    self.env.store.as_ref(),
                    &self.env.config.composite,
                    &self.manifest,
                    &local,
                    &out_dir,
                    Box::new(|_| {}),
                )
                .await
                .context("rendering the composite")?;
                let key = self.keys.output(output.file_name());
                let rx = self.env.uploads().enqueue(&output.path, &key, Some(&self.id)).await?;
                let report = await_upload(&self.env, &self.id, &key, &output.path, rx).await?;
                self.manifest.outputs.push(manifest::OutputInfo {
                    kind: output.kind,
                    key: key.to_string(),
                    bytes: report.size,
                    sha256: output.sha256.clone(),
                    duration_us: output.duration_us,
                });
                composites.push(self.env.locate(&key));
            }
        }

        // 4. The manifest itself, then the catalog.
        let manifest_key = self.keys.manifest();
        let path = self.dir.join("manifest.json");
        tokio::fs::write(&path, self.manifest.to_json_pretty()?)
            .await
            .with_context(|| format!("writing {}", path.display()))?;
        let rx = self.env.uploads().enqueue(&path, &manifest_key, Some(&self.id)).await?;
        await_upload(&self.env, &self.id, &manifest_key, &path, rx).await?;
        self.env.catalog.set_manifest_key(&self.id, manifest_key.as_ref()).await?;
        self.env.catalog.set_recording_state(&self.id, RecordingState::Uploaded, None).await?;
        self.env
            .catalog
            .audit(
                "mxrec",
                "recording.uploaded",
                Some(&self.id),
                serde_json::json!({ "manifest": manifest_key.to_string(), "duration_us": end_us }),
            )
            .await?;
        info!(manifest = %manifest_key, "recording stored");
        // The recording's spool directory is empty now unless uploads keep local copies.
        let _ = remove_empty_dirs(&self.dir);
        Ok(Finished {
            recording_id: self.id.clone(),
            manifest_location: self.env.locate(&manifest_key),
            manifest_key,
            composites,
            track_files,
            manifest: self.manifest.clone(),
        })
    }
}

/// Waits for one queued upload of `recording` and records its outcome in the uploads table.
async fn await_upload(
    env: &Env,
    recording: &RecordingId,
    key: &ObjectPath,
    local: &Path,
    rx: UploadReceiver,
) -> Result<UploadReport> {
    let outcome = rx.await.map_err(|_| anyhow!("the upload queue stopped before {key} was stored"))?;
    let mut row = storage::catalog::Upload {
        object_key: key.to_string(),
        recording_id: Some(recording.clone()),
        local_path: local.display().to_string(),
        size: None,
        sha256: None,
        etag: None,
        state: storage::catalog::UploadState::Failed,
        attempts: 0,
        last_error: None,
    };
    match &outcome {
        Ok(r) => {
            row.size = Some(r.size);
            row.sha256 = Some(r.sha256.clone());
            row.etag = r.etag.clone();
            row.state = storage::catalog::UploadState::Verified;
            row.attempts = r.attempts;
        }
        Err(e) => row.last_error = Some(e.to_string()),
    }
    env.catalog.record_upload(&row).await?;
    outcome.with_context(|| format!("uploading {key}"))
}

pub fn codec_name(c: Codec) -> &'static str {
    match c {
        Codec::Opus => "opus",
        Codec::Vp8 => "vp8",
        Codec::Vp9 => "vp9",
        Codec::H264 => "h264",
        Codec::Av1 => "av1",
    }
}

pub fn codec_from_name(s: &str) -> Option<Codec> {
    [Codec::Opus, Codec::Vp8, Codec::Vp9, Codec::H264, Codec::Av1].into_iter().find(|c| codec_name(*c) == s)
}

fn remove_empty_dirs(dir: &Path) -> std::io::Result<bool> {
    let mut empty = true;
    for entry in std::fs::read_dir(dir)? {
        let p = entry?.path();
        if p.is_dir() {
            if !remove_empty_dirs(&p)? {
                empty = false;
            }
        } else {
            empty = false;
        }
    }
    if empty {
        std::fs::remove_dir(dir)?;
    }
    Ok(empty)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn urls_lose_their_password_in_messages() {
        assert_eq!(redact_url("postgres://u:secret@h:5432/db"), "postgres://u:***@h:5432/db");
        assert_eq!(redact_url("sqlite://./data/mxrec.db"), "sqlite://./data/mxrec.db");
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
    }

    /// Two participants each send 8 s of VP8 + Opus; the recording is paused 2–4 s and Bob opts
    /// out 5–6.5 s. Nothing of either span may be in the stored segments; the manifest says who
    /// asked what, when.
    #[tokio::test]
    async fn pause_and_opt_out_leave_their_spans_out_of_the_stored_tracks() {
        const S: i64 = 1_000_000;
        let dir = tempfile::tempdir().unwrap();
        let media = dir.path().join("in.webm");
        let ok = std::process::Command::new("ffmpeg")
            .args(["-v", "error", "-nostdin", "-f", "lavfi", "-i", "testsrc2=size=160x120:rate=15:duration=8"])
            .args(["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000:duration=8"])
            .args(["-c:v", "libvpx", "-deadline", "realtime", "-cpu-used", "8", "-g", "15", "-c:a", "libopus"])
            .arg(&media)
            .status()
            .unwrap();
        assert!(ok.success());
        let mut config = Config { data_dir: dir.path().join("data"), ..Config::default() };
        config.storage.backend =
            storage::store::StoreBackend::Local(storage::store::LocalStoreConfig { root: dir.path().join("store") });
        config.composite.enabled = false;
        let env = Arc::new(Env::open(&config).await.unwrap());
        let mut rec = Recording::start(env.clone(), "!room:example.org", CallFlavour::Voip1, None).await.unwrap();
        let mut tracks = Vec::new();
        for who in ["alice", "bob"] {
            let user = format!("@{who}:example.org");
            rec.participant_joined(ParticipantInfo { id: who.into(), user_id: user, device_id: None, display_name: who.into() }, 0)
                .await
                .unwrap();
            for (codec, source) in [(Codec::Vp8, TrackSource::Camera), (Codec::Opus, TrackSource::Microphone)] {
                let id = rec.add_track(TrackInfo { participant_id: who.into(), codec, source }).await.unwrap();
                tracks.push((who, codec, id));
            }
        }
        let mut file = crate::import::MediaFile::open(&media).unwrap();
        let streams: HashMap<usize, Codec> = file.streams().iter().map(|s| (s.index, s.codec)).collect();
        let mut frames = Vec::new();
        while let Some(f) = file.next_frame().unwrap() {
            frames.push((streams[&f.stream], f.frame));
        }
        frames.sort_by_key(|(_, f)| f.pts_us);
        let (mut paused, mut out, mut back) = (false, false, false);
        for (codec, frame) in frames {
            let t = frame.pts_us;
            if !paused && t >= 2 * S {
                assert!(rec.pause("@mod:example.org", 2 * S).await.unwrap());
                assert!(!rec.pause("@mod:example.org", 2 * S).await.unwrap(), "paused already");
                paused = true;
            }
            if paused && rec.is_paused() && t >= 4 * S {
                assert!(rec.resume("@mod:example.org", 4 * S).await.unwrap());
            }
            if !out && t >= 5 * S {
                assert!(rec.opt_out("@bob:example.org", "@bob:example.org", 5 * S).await.unwrap());
                assert!(rec.is_opted_out("@bob:example.org"));
                out = true;
            }
            if !back && t >= 6_500_000 {
                assert!(rec.opt_in("@bob:example.org", "@bob:example.org", 6_500_000).await.unwrap());
                back = true;
            }
            for (_, _, id) in tracks.iter().filter(|(_, c, _)| *c == codec) {
                rec.write(id, frame.clone()).await.unwrap();
            }
        }
        rec.note("stop", "@mod:example.org", 8 * S).await.unwrap();
        let done = rec.finish().await.unwrap();
        let m = &done.manifest;
        assert_eq!(m.pauses.len(), 1);
        assert_eq!((m.pauses[0].start_us, m.pauses[0].end_us), (2 * S, Some(4 * S)));
        let actions: Vec<(&str, &str)> = m.control.iter().map(|c| (c.action.as_str(), c.by.as_str())).collect();
        assert_eq!(
            actions,
            [
                ("pause", "@mod:example.org"),
                ("resume", "@mod:example.org"),
                ("optout", "@bob:example.org"),
                ("optin", "@bob:example.org"),
                ("stop", "@mod:example.org")
            ]
        );
        let bob = m.participants.iter().find(|p| p.id == "bob").unwrap();
        assert_eq!(bob.opted_out.iter().map(|s| (s.start_us, s.end_us)).collect::<Vec<_>>(), [(5 * S, Some(6_500_000))]);
        assert!(m.participants.iter().find(|p| p.id == "alice").unwrap().opted_out.is_empty());
        for t in &m.tracks {
            let who = t.participant.as_str();
            assert!(!t.segments.is_empty(), "{} has segments", t.id);
            for seg in &t.segments {
                let inside = |a: i64, b: i64| seg.start_us < b && seg.end_us > a;
                assert!(!inside(2 * S + 100_000, 4 * S), "{}: segment {}..{} reaches into the pause", t.id, seg.start_us, seg.end_us);
                if who == "bob" {
                    assert!(!inside(5 * S + 100_000, 6_500_000), "{}: segment {}..{} reaches into the opt-out", t.id, seg.start_us, seg.end_us);
                }
            }
            let covered = |at: i64| t.segments.iter().any(|s| s.start_us <= at && s.end_us > at);
            let spans: Vec<(i64, i64)> = t.segments.iter().map(|s| (s.start_us, s.end_us)).collect();
            assert!(covered(S) && covered(7_600_000), "{} records before and after: {spans:?}", t.id);
            if who == "alice" {
                assert!(covered(5_500_000), "alice is recorded while bob is opted out");
            }
        }
        let audit = env.catalog.audit_events(&done.recording_id).await.unwrap();
        assert!(audit.iter().any(|e| e.action == "recording.optout" && e.actor == "@bob:example.org"));
        assert!(audit.iter().any(|e| e.action == "recording.pause" && e.actor == "@mod:example.org"));
    }

    #[test]
    fn codec_names_round_trip() {
        for c in [Codec::Opus, Codec::Vp8, Codec::Vp9, Codec::H264, Codec::Av1] {
            assert_eq!(codec_from_name(codec_name(c)), Some(c));
        }
        assert_eq!(codec_from_name("mp3"), None);
    }
}
