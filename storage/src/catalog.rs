//! The catalog: what was recorded, where its pieces are, and what state each recording is in.
//!
//! One code path serves SQLite (the default, a file next to the data) and Postgres: queries go
//! through sqlx's `Any` driver with `$N` placeholders, which both accept, and the schema uses only
//! types both understand, so there is a single migrations folder. Times are unix milliseconds;
//! media offsets are microseconds on the recording clock.
//!
//! Recording states only move along [`RecordingState::can_become`]; the check happens in Rust and
//! the update is a compare-and-set on the old state, so two tasks racing cannot both win.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, AssertSqlSafe, Row};
use tracing::info;

use crate::error::{Error, Result};
use crate::ids::*;
use crate::manifest::{CallFlavour, TrackKind, TrackSource};
use crate::now_ms;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Where a recording is in its life.
///
/// ```text
/// recording ──► finalizing ──► uploaded ──► published
///     │             │ ▲            │
///     └─────────────┴─┼────────────┴──► failed ──┐
///                     └──────────────────────────┘ (finalize retried)
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordingState {
    Recording,
    Finalizing,
    Uploaded,
    Published,
    Failed,
}

impl RecordingState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Recording => "recording",
            Self::Finalizing => "finalizing",
            Self::Uploaded => "uploaded",
            Self::Published => "published",
            Self::Failed => "failed",
        }
    }

    /// Whether `self → to` is allowed. Staying in the same state is allowed so that finalize
    /// and recovery can be re-run idempotently.
    pub fn can_become(self, to: RecordingState) -> bool {
        use RecordingState::*;
        self == to
            || matches!(
                (self, to),
                (Recording, Finalizing)
                    | (Finalizing, Uploaded)
                    | (Uploaded, Published)
                    | (Recording | Finalizing | Uploaded, Failed)
                    // A failed finalize (store down for too long, say) may be tried again; the
                    // media is still in the spool.
                    | (Failed, Finalizing)
            )
    }

    /// Not yet finished: recovery after a restart must pick these up.
    pub fn is_unfinished(self) -> bool {
        matches!(self, Self::Recording | Self::Finalizing)
    }
}

impl fmt::Display for RecordingState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RecordingState {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "recording" => Self::Recording,
            "finalizing" => Self::Finalizing,
            "uploaded" => Self::Uploaded,
            "published" => Self::Published,
            "failed" => Self::Failed,
            other => return Err(Error::Corrupt(format!("unknown recording state `{other}`"))),
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Room {
    pub id: RoomId,
    pub name: Option<String>,
    pub created_at_ms: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Call {
    pub id: CallId,
    pub room_id: RoomId,
    /// The protocol's own call id (m.call call_id, RTC session id, ...), if it has one.
    pub external_id: Option<String>,
    pub flavour: CallFlavour,
    pub started_at_ms: i64,
    pub ended_at_ms: Option<i64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recording {
    pub id: RecordingId,
    pub room_id: RoomId,
    pub call_id: CallId,
    pub state: RecordingState,
    /// Why it is in this state (always set for `failed`).
    pub state_reason: Option<String>,
    pub started_at_ms: i64,
    pub ended_at_ms: Option<i64>,
    pub manifest_key: Option<String>,
    pub updated_at_ms: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Participant {
    pub id: ParticipantId,
    pub recording_id: RecordingId,
    /// The call adapter's key for this participant (unique in the call, the same across
    /// rejoins): the manifest's participant id. `None` on rows older than the column.
    pub key: Option<String>,
    pub user_id: UserId,
    pub device_id: Option<DeviceId>,
    pub display_name: Option<String>,
    pub joined_at_ms: i64,
    pub left_at_ms: Option<i64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Track {
    pub recording_id: RecordingId,
    pub id: TrackId,
    pub participant_id: ParticipantId,
    pub kind: TrackKind,
    pub codec: String,
    pub source: TrackSource,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    pub recording_id: RecordingId,
    pub track_id: TrackId,
    pub index: u32,
    pub start_us: i64,
    pub end_us: i64,
    pub bytes: u64,
    pub sha256: String,
    pub object_key: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UploadState {
    Pending,
    Verified,
    Failed,
}

impl UploadState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Verified => "verified",
            Self::Failed => "failed",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Upload {
    pub object_key: String,
    pub recording_id: Option<RecordingId>,
    pub local_path: String,
    pub size: Option<u64>,
    pub sha256: Option<String>,
    pub etag: Option<String>,
    pub state: UploadState,
    pub attempts: u32,
    pub last_error: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditEvent {
    pub id: AuditEventId,
    pub at_ms: i64,
    pub actor: String,
    pub action: String,
    pub recording_id: Option<RecordingId>,
    pub detail: serde_json::Value,
}

/// Handle to the catalog database. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Catalog {
    pool: AnyPool,
}

/// Default catalog location: a SQLite file beside the data.
pub const DEFAULT_URL: &str = "sqlite://./data/mxrec.db";

impl Catalog {
    /// Connect and migrate. `sqlite://path` (file created if missing, WAL) or `postgres://...`.
    pub async fn connect(url: &str) -> Result<Self> {
        sqlx::any::install_default_drivers();
        let is_sqlite = url.starts_with("sqlite:");
        let url = if is_sqlite {
            prepare_sqlite_url(url)?
        } else {
            url.to_owned()
        };
        let pool = AnyPoolOptions::new()
            .max_connections(if is_sqlite { 4 } else { 8 })
            .after_connect(|conn, _| {
                Box::pin(async move {
                    if conn.backend_name().eq_ignore_ascii_case("sqlite") {
                        // WAL lets readers run during a write; busy_timeout makes concurrent
                        // writers wait instead of failing; foreign keys are off by default.
                        sqlx::raw_sql(
                            "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
                             PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 5000;",
                        )
                        .execute(&mut *conn)
                        .await?;
                    }
                    Ok(())
                })
            })
            .connect(&url)
            .await?;
        MIGRATOR.run(&pool).await?;
        info!(
            backend = if is_sqlite { "sqlite" } else { "postgres" },
            "catalog ready"
        );
        Ok(Self { pool })
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    // ---- rooms ----

    /// Create the room, or update its name if given. Returns the stored room.
    pub async fn upsert_room(&self, id: &RoomId, name: Option<&str>) -> Result<Room> {
        let now = now_ms();
        sqlx::query(
            "INSERT INTO rooms (id, name, created_at_ms, updated_at_ms) VALUES ($1, $2, $3, $3) \
             ON CONFLICT (id) DO UPDATE SET name = COALESCE(excluded.name, rooms.name), updated_at_ms = excluded.updated_at_ms",
        )
        .bind(id.as_str())
        .bind(name)
        .bind(now)
        .execute(&self.pool)
        .await?;
        self.get_room(id)
            .await?
            .ok_or_else(|| not_found("room", id))
    }

    pub async fn get_room(&self, id: &RoomId) -> Result<Option<Room>> {
        let row = sqlx::query("SELECT id, name, created_at_ms FROM rooms WHERE id = $1")
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| {
            Ok(Room {
                id: RoomId::new(r.try_get::<String, _>("id")?),
                name: r.try_get("name")?,
                created_at_ms: r.try_get("created_at_ms")?,
            })
        })
        .transpose()
    }

    // ---- calls ----

    /// Record a call in a room (the room is created if new).
    pub async fn create_call(
        &self,
        room: &RoomId,
        flavour: CallFlavour,
        external_id: Option<&str>,
        started_at_ms: i64,
    ) -> Result<Call> {
        self.upsert_room(room, None).await?;
        let id = CallId::generate();
        sqlx::query(
            "INSERT INTO calls (id, room_id, external_id, flavour, started_at_ms) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(id.as_str())
        .bind(room.as_str())
        .bind(external_id)
        .bind(flavour.as_str())
        .bind(started_at_ms)
        .execute(&self.pool)
        .await?;
        self.get_call(&id)
            .await?
            .ok_or_else(|| not_found("call", &id))
    }

    pub async fn get_call(&self, id: &CallId) -> Result<Option<Call>> {
        let row = sqlx::query(
            "SELECT id, room_id, external_id, flavour, started_at_ms, ended_at_ms FROM calls WHERE id = $1",
        )
        .bind(id.as_str())
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(call_from_row).transpose()
    }

    pub async fn end_call(&self, id: &CallId, ended_at_ms: i64) -> Result<()> {
        let r = sqlx::query("UPDATE calls SET ended_at_ms = $1 WHERE id = $2")
            .bind(ended_at_ms)
            .bind(id.as_str())
            .execute(&self.pool)
            .await?;
        expect_one(r.rows_affected(), "call", id)
    }

    // ---- recordings ----

    /// Start a recording of a call, in state `recording`.
    pub async fn create_recording(&self, call: &CallId, started_at_ms: i64) -> Result<Recording> {
        let call = self
            .get_call(call)
            .await?
            .ok_or_else(|| not_found("call", call))?;
        let id = RecordingId::generate();
        let now = now_ms();
        sqlx::query(
            "INSERT INTO recordings (id, room_id, call_id, state, started_at_ms, created_at_ms, updated_at_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $6)",
        )
        .bind(id.as_str())
        .bind(call.room_id.as_str())
        .bind(call.id.as_str())
        .bind(RecordingState::Recording.as_str())
        .bind(started_at_ms)
        .bind(now)
        .execute(&self.pool)
        .await?;
        self.audit(
            "mxrec",
            "recording.created",
            Some(&id),
            serde_json::json!({ "call_id": call.id }),
        )
        .await?;
        self.get_recording(&id)
            .await?
            .ok_or_else(|| not_found("recording", &id))
    }

    pub async fn get_recording(&self, id: &RecordingId) -> Result<Option<Recording>> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {RECORDING_COLS} FROM recordings WHERE id = $1"
        )))
        .bind(id.as_str())
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(recording_from_row).transpose()
    }

    /// Move a recording to `to`, recording why, and append an audit event. Re-setting the
    /// current state is a no-op success (idempotent finalize). Returns the updated recording.
    pub async fn set_recording_state(
        &self,
        id: &RecordingId,
        to: RecordingState,
        reason: Option<&str>,
    ) -> Result<Recording> {
        let current = self
            .get_recording(id)
            .await?
            .ok_or_else(|| not_found("recording", id))?;
        let from = current.state;
        if !from.can_become(to) {
            return Err(Error::InvalidTransition {
                recording: id.to_string(),
                from,
                to,
            });
        }
        if from == to {
            return Ok(current);
        }
        // Compare-and-set on the old state: if someone else moved it meanwhile, we lose cleanly.
        let r = sqlx::query(
            "UPDATE recordings SET state = $1, state_reason = $2, updated_at_ms = $3 WHERE id = $4 AND state = $5",
        )
        .bind(to.as_str())
        .bind(reason)
        .bind(now_ms())
        .bind(id.as_str())
        .bind(from.as_str())
        .execute(&self.pool)
        .await?;
        if r.rows_affected() != 1 {
            let now = self
                .get_recording(id)
                .await?
                .ok_or_else(|| not_found("recording", id))?;
            return Err(Error::InvalidTransition {
                recording: id.to_string(),
                from: now.state,
                to,
            });
        }
        self.audit(
            "mxrec",
            "recording.state",
            Some(id),
            serde_json::json!({ "from": from.as_str(), "to": to.as_str(), "reason": reason }),
        )
        .await?;
        self.get_recording(id)
            .await?
            .ok_or_else(|| not_found("recording", id))
    }

    pub async fn set_recording_ended(&self, id: &RecordingId, ended_at_ms: i64) -> Result<()> {
        let r =
            sqlx::query("UPDATE recordings SET ended_at_ms = $1, updated_at_ms = $2 WHERE id = $3")
                .bind(ended_at_ms)
                .bind(now_ms())
                .bind(id.as_str())
                .execute(&self.pool)
                .await?;
        expect_one(r.rows_affected(), "recording", id)
    }

    pub async fn set_manifest_key(&self, id: &RecordingId, key: &str) -> Result<()> {
        let r = sqlx::query(
            "UPDATE recordings SET manifest_key = $1, updated_at_ms = $2 WHERE id = $3",
        )
        .bind(key)
        .bind(now_ms())
        .bind(id.as_str())
        .execute(&self.pool)
        .await?;
        expect_one(r.rows_affected(), "recording", id)
    }

    /// Recordings still `recording` or `finalizing`, oldest first: what a restart must recover.
    pub async fn unfinished_recordings(&self) -> Result<Vec<Recording>> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {RECORDING_COLS} FROM recordings WHERE state IN ('recording', 'finalizing') ORDER BY started_at_ms, id"
        )))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(recording_from_row).collect()
    }

    /// Recordings in the `failed` state, oldest first.
    pub async fn failed_recordings(&self) -> Result<Vec<Recording>> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {RECORDING_COLS} FROM recordings WHERE state = 'failed' ORDER BY started_at_ms, id"
        )))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(recording_from_row).collect()
    }

    /// The most recent recordings of a room, newest first.
    pub async fn recent_recordings(&self, room: &RoomId, limit: u32) -> Result<Vec<Recording>> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {RECORDING_COLS} FROM recordings WHERE room_id = $1 ORDER BY started_at_ms DESC, id DESC LIMIT $2"
        )))
        .bind(room.as_str())
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(recording_from_row).collect()
    }

    /// The newest recordings of every room.
    pub async fn all_recent_recordings(&self, limit: u32) -> Result<Vec<Recording>> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {RECORDING_COLS} FROM recordings ORDER BY started_at_ms DESC, id DESC LIMIT $1"
        )))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(recording_from_row).collect()
    }

    // ---- participants, tracks, segments ----

    /// A participant joined (or rejoined: each stint is its own row).
    pub async fn add_participant(
        &self,
        recording: &RecordingId,
        key: &str,
        user: &UserId,
        device: Option<&DeviceId>,
        display_name: Option<&str>,
        joined_at_ms: i64,
    ) -> Result<Participant> {
        let id = ParticipantId::generate();
        sqlx::query(
            "INSERT INTO participants (id, recording_id, participant_key, user_id, device_id, display_name, joined_at_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(id.as_str())
        .bind(recording.as_str())
        .bind(key)
        .bind(user.as_str())
        .bind(device.map(|d| d.as_str()))
        .bind(display_name)
        .bind(joined_at_ms)
        .execute(&self.pool)
        .await?;
        Ok(Participant {
            id,
            recording_id: recording.clone(),
            key: Some(key.to_owned()),
            user_id: user.clone(),
            device_id: device.cloned(),
            display_name: display_name.map(str::to_owned),
            joined_at_ms,
            left_at_ms: None,
        })
    }

    pub async fn participant_left(&self, id: &ParticipantId, left_at_ms: i64) -> Result<()> {
        let r = sqlx::query("UPDATE participants SET left_at_ms = $1 WHERE id = $2")
            .bind(left_at_ms)
            .bind(id.as_str())
            .execute(&self.pool)
            .await?;
        expect_one(r.rows_affected(), "participant", id)
    }

    pub async fn participants(&self, recording: &RecordingId) -> Result<Vec<Participant>> {
        let rows = sqlx::query(
            "SELECT id, recording_id, participant_key, user_id, device_id, display_name, joined_at_ms, left_at_ms \
             FROM participants WHERE recording_id = $1 ORDER BY joined_at_ms, id",
        )
        .bind(recording.as_str())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Participant {
                    id: ParticipantId::new(r.try_get::<String, _>("id")?),
                    recording_id: RecordingId::new(r.try_get::<String, _>("recording_id")?),
                    key: r.try_get("participant_key")?,
                    user_id: UserId::new(r.try_get::<String, _>("user_id")?),
                    device_id: r
                        .try_get::<Option<String>, _>("device_id")?
                        .map(DeviceId::new),
                    display_name: r.try_get("display_name")?,
                    joined_at_ms: r.try_get("joined_at_ms")?,
                    left_at_ms: r.try_get("left_at_ms")?,
                })
            })
            .collect()
    }

    pub async fn add_track(&self, track: &Track) -> Result<()> {
        sqlx::query(
            "INSERT INTO tracks (recording_id, id, participant_id, kind, codec, source, created_at_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(track.recording_id.as_str())
        .bind(track.id.as_str())
        .bind(track.participant_id.as_str())
        .bind(track.kind.as_str())
        .bind(track.codec.as_str())
        .bind(track.source.as_str())
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn tracks(&self, recording: &RecordingId) -> Result<Vec<Track>> {
        let rows = sqlx::query(
            "SELECT recording_id, id, participant_id, kind, codec, source FROM tracks \
             WHERE recording_id = $1 ORDER BY created_at_ms, id",
        )
        .bind(recording.as_str())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let kind: String = r.try_get("kind")?;
                let source: String = r.try_get("source")?;
                Ok(Track {
                    recording_id: RecordingId::new(r.try_get::<String, _>("recording_id")?),
                    id: TrackId::new(r.try_get::<String, _>("id")?),
                    participant_id: ParticipantId::new(r.try_get::<String, _>("participant_id")?),
                    kind: TrackKind::parse(&kind)
                        .ok_or_else(|| Error::Corrupt(format!("track kind `{kind}`")))?,
                    codec: r.try_get("codec")?,
                    source: TrackSource::parse(&source)
                        .ok_or_else(|| Error::Corrupt(format!("track source `{source}`")))?,
                })
            })
            .collect()
    }

    /// Record a written segment. Re-adding the same (recording, track, index) replaces it, so a
    /// recovery that re-scans segments is harmless.
    pub async fn add_segment(&self, s: &Segment) -> Result<()> {
        sqlx::query(
            "INSERT INTO segments (recording_id, track_id, seq, start_us, end_us, bytes, sha256, object_key, created_at_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
             ON CONFLICT (recording_id, track_id, seq) DO UPDATE SET start_us = excluded.start_us, \
             end_us = excluded.end_us, bytes = excluded.bytes, sha256 = excluded.sha256, object_key = excluded.object_key",
        )
        .bind(s.recording_id.as_str())
        .bind(s.track_id.as_str())
        .bind(i64::from(s.index))
        .bind(s.start_us)
        .bind(s.end_us)
        .bind(to_i64(s.bytes)?)
        .bind(s.sha256.as_str())
        .bind(s.object_key.as_str())
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn segments(&self, recording: &RecordingId, track: &TrackId) -> Result<Vec<Segment>> {
        let rows = sqlx::query(
            "SELECT recording_id, track_id, seq, start_us, end_us, bytes, sha256, object_key FROM segments \
             WHERE recording_id = $1 AND track_id = $2 ORDER BY seq",
        )
        .bind(recording.as_str())
        .bind(track.as_str())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Segment {
                    recording_id: RecordingId::new(r.try_get::<String, _>("recording_id")?),
                    track_id: TrackId::new(r.try_get::<String, _>("track_id")?),
                    index: from_i64(r.try_get("seq")?)?,
                    start_us: r.try_get("start_us")?,
                    end_us: r.try_get("end_us")?,
                    bytes: from_i64(r.try_get("bytes")?)?,
                    sha256: r.try_get("sha256")?,
                    object_key: r.try_get("object_key")?,
                })
            })
            .collect()
    }

    // ---- uploads ----

    /// Insert or update the row for an object key.
    pub async fn record_upload(&self, u: &Upload) -> Result<()> {
        let now = now_ms();
        sqlx::query(
            "INSERT INTO uploads (object_key, recording_id, local_path, size, sha256, etag, state, attempts, last_error, created_at_ms, updated_at_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10) \
             ON CONFLICT (object_key) DO UPDATE SET recording_id = excluded.recording_id, local_path = excluded.local_path, \
             size = excluded.size, sha256 = excluded.sha256, etag = excluded.etag, state = excluded.state, \
             attempts = excluded.attempts, last_error = excluded.last_error, updated_at_ms = excluded.updated_at_ms",
        )
        .bind(u.object_key.as_str())
        .bind(u.recording_id.as_ref().map(|r| r.as_str()))
        .bind(u.local_path.as_str())
        .bind(u.size.map(to_i64).transpose()?)
        .bind(u.sha256.as_deref())
        .bind(u.etag.as_deref())
        .bind(u.state.as_str())
        .bind(i64::from(u.attempts))
        .bind(u.last_error.as_deref())
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Uploads in a given state, oldest first.
    pub async fn uploads_in_state(&self, state: UploadState) -> Result<Vec<Upload>> {
        let rows = sqlx::query(
            "SELECT object_key, recording_id, local_path, size, sha256, etag, state, attempts, last_error \
             FROM uploads WHERE state = $1 ORDER BY created_at_ms, object_key",
        )
        .bind(state.as_str())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let st: String = r.try_get("state")?;
                Ok(Upload {
                    object_key: r.try_get("object_key")?,
                    recording_id: r
                        .try_get::<Option<String>, _>("recording_id")?
                        .map(RecordingId::new),
                    local_path: r.try_get("local_path")?,
                    size: r
                        .try_get::<Option<i64>, _>("size")?
                        .map(from_i64)
                        .transpose()?,
                    sha256: r.try_get("sha256")?,
                    etag: r.try_get("etag")?,
                    state: match st.as_str() {
                        "pending" => UploadState::Pending,
                        "verified" => UploadState::Verified,
                        "failed" => UploadState::Failed,
                        other => return Err(Error::Corrupt(format!("upload state `{other}`"))),
                    },
                    attempts: from_i64(r.try_get("attempts")?)?,
                    last_error: r.try_get("last_error")?,
                })
            })
            .collect()
    }

    // ---- audit ----

    /// Append an audit event. `detail` is stored as JSON text.
    pub async fn audit(
        &self,
        actor: &str,
        action: &str,
        recording: Option<&RecordingId>,
        detail: serde_json::Value,
    ) -> Result<AuditEventId> {
        let id = AuditEventId::generate();
        sqlx::query(
            "INSERT INTO audit_events (id, at_ms, actor, action, recording_id, detail) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(id.as_str())
        .bind(now_ms())
        .bind(actor)
        .bind(action)
        .bind(recording.map(|r| r.as_str()))
        .bind(detail.to_string())
        .execute(&self.pool)
        .await?;
        Ok(id)
    }

    /// Audit events of a recording, oldest first.
    pub async fn audit_events(&self, recording: &RecordingId) -> Result<Vec<AuditEvent>> {
        let rows = sqlx::query(
            "SELECT id, at_ms, actor, action, recording_id, detail FROM audit_events \
             WHERE recording_id = $1 ORDER BY at_ms, id",
        )
        .bind(recording.as_str())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let detail: String = r.try_get("detail")?;
                Ok(AuditEvent {
                    id: AuditEventId::new(r.try_get::<String, _>("id")?),
                    at_ms: r.try_get("at_ms")?,
                    actor: r.try_get("actor")?,
                    action: r.try_get("action")?,
                    recording_id: r
                        .try_get::<Option<String>, _>("recording_id")?
                        .map(RecordingId::new),
                    detail: serde_json::from_str(&detail)
                        .map_err(|e| Error::Corrupt(format!("audit detail is not JSON: {e}")))?,
                })
            })
            .collect()
    }
}

const RECORDING_COLS: &str =
    "id, room_id, call_id, state, state_reason, started_at_ms, ended_at_ms, manifest_key, updated_at_ms";

fn recording_from_row(r: &AnyRow) -> Result<Recording> {
    Ok(Recording {
        id: RecordingId::new(r.try_get::<String, _>("id")?),
        room_id: RoomId::new(r.try_get::<String, _>("room_id")?),
        call_id: CallId::new(r.try_get::<String, _>("call_id")?),
        state: r.try_get::<String, _>("state")?.parse()?,
        state_reason: r.try_get("state_reason")?,
        started_at_ms: r.try_get("started_at_ms")?,
        ended_at_ms: r.try_get("ended_at_ms")?,
        manifest_key: r.try_get("manifest_key")?,
        updated_at_ms: r.try_get("updated_at_ms")?,
    })
}

fn call_from_row(r: &AnyRow) -> Result<Call> {
    let flavour: String = r.try_get("flavour")?;
    Ok(Call {
        id: CallId::new(r.try_get::<String, _>("id")?),
        room_id: RoomId::new(r.try_get::<String, _>("room_id")?),
        external_id: r.try_get("external_id")?,
        flavour: CallFlavour::parse(&flavour)
            .ok_or_else(|| Error::Corrupt(format!("call flavour `{flavour}`")))?,
        started_at_ms: r.try_get("started_at_ms")?,
        ended_at_ms: r.try_get("ended_at_ms")?,
    })
}

fn not_found(what: &'static str, id: impl fmt::Display) -> Error {
    Error::NotFound {
        what,
        id: id.to_string(),
    }
}

fn expect_one(rows: u64, what: &'static str, id: impl fmt::Display) -> Result<()> {
    if rows == 0 {
        Err(not_found(what, id))
    } else {
        Ok(())
    }
}

fn to_i64(v: u64) -> Result<i64> {
    i64::try_from(v).map_err(|_| Error::Corrupt(format!("{v} does not fit a BIGINT")))
}

fn from_i64<T: TryFrom<i64>>(v: i64) -> Result<T> {
    T::try_from(v)
        .map_err(|_| Error::Corrupt(format!("negative or oversized count {v} in the catalog")))
}

/// Make sure the SQLite file can be created: `mode=rwc` and an existing parent directory.
fn prepare_sqlite_url(url: &str) -> Result<String> {
    let rest = url.trim_start_matches("sqlite:").trim_start_matches("//");
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    if path.is_empty() || path.starts_with(":memory:") {
        return Ok(url.to_owned());
    }
    if let Some(parent) = std::path::Path::new(path)
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
    {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    if query.split('&').any(|kv| kv.starts_with("mode=")) {
        Ok(url.to_owned())
    } else if query.is_empty() {
        Ok(format!("{url}?mode=rwc"))
    } else {
        Ok(format!("{url}&mode=rwc"))
    }
}

#[cfg(test)]
mod tests {
    use super::RecordingState::*;
    use super::*;

    const ALL: [RecordingState; 5] = [Recording, Finalizing, Uploaded, Published, Failed];

    #[test]
    fn allowed_transitions() {
        let allowed = [
            (Recording, Finalizing),
            (Finalizing, Uploaded),
            (Uploaded, Published),
            (Recording, Failed),
            (Finalizing, Failed),
            (Uploaded, Failed),
            (Failed, Finalizing),
        ];
        for from in ALL {
            for to in ALL {
                let expect = from == to || allowed.contains(&(from, to));
                assert_eq!(from.can_become(to), expect, "{from} -> {to}");
            }
        }
    }

    #[test]
    fn published_is_final_and_states_round_trip() {
        for to in ALL.into_iter().filter(|s| *s != Published) {
            assert!(!Published.can_become(to));
        }
        assert!(!Recording.can_become(Uploaded), "cannot skip finalizing");
        assert!(!Failed.can_become(Published));
        for s in ALL {
            assert_eq!(s.as_str().parse::<RecordingState>().unwrap(), s);
        }
        assert!("paused".parse::<RecordingState>().is_err());
        assert_eq!(ALL.iter().filter(|s| s.is_unfinished()).count(), 2);
    }

    #[test]
    fn sqlite_urls_get_create_mode() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/x.db");
        let url = format!("sqlite://{}", p.display());
        assert_eq!(prepare_sqlite_url(&url).unwrap(), format!("{url}?mode=rwc"));
        assert!(p.parent().unwrap().is_dir());
        assert_eq!(
            prepare_sqlite_url("sqlite::memory:").unwrap(),
            "sqlite::memory:"
        );
        let ro = format!("{url}?mode=ro");
        assert_eq!(prepare_sqlite_url(&ro).unwrap(), ro);
    }
}

// ---- links ----
//
// Kept apart from the impl above: share links are read by the HTTP side, written by whoever
// publishes a recording. The catalog stores only a hash of each token, so a leaked database (or
// backup) cannot be turned into working links; minting and hashing tokens is the caller's job.

/// A share link as the catalog holds it: the token's hash, never the token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkRecord {
    /// Lowercase hex SHA-256 of the token.
    pub token_hash: String,
    pub recording_id: RecordingId,
    /// The object the link serves, relative to the store (the store applies its prefix).
    pub object_key: String,
    pub created_at_ms: i64,
    /// `None` never expires (mxrec always sets one; the column allows NULL).
    pub expires_at_ms: Option<i64>,
    pub revoked_at_ms: Option<i64>,
    /// A members-only link: besides the token, whoever opens it must prove they are a current
    /// member of this Matrix room (`!id:server`). `None` is a plain link. The catalog only keeps
    /// the room; checking membership is the HTTP side's job.
    #[serde(default)]
    pub members_room: Option<String>,
}

/// Why a stored link does not serve any more.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkRefusal {
    Expired,
    Revoked,
}

impl LinkRecord {
    /// `Ok` while the link may be used at `now_ms`; revocation wins over expiry.
    pub fn check(&self, now_ms: i64) -> std::result::Result<(), LinkRefusal> {
        if self.revoked_at_ms.is_some_and(|r| r <= now_ms) {
            Err(LinkRefusal::Revoked)
        } else if self.expires_at_ms.is_some_and(|e| e <= now_ms) {
            Err(LinkRefusal::Expired)
        } else {
            Ok(())
        }
    }
}

const LINK_COLS: &str =
    "token_hash, recording_id, object_key, created_at_ms, expires_at_ms, revoked_at_ms, members_room";

fn link_from_row(r: &AnyRow) -> Result<LinkRecord> {
    Ok(LinkRecord {
        token_hash: r.try_get("token_hash")?,
        recording_id: RecordingId::new(r.try_get::<String, _>("recording_id")?),
        object_key: r.try_get("object_key")?,
        created_at_ms: r.try_get("created_at_ms")?,
        expires_at_ms: r.try_get("expires_at_ms")?,
        revoked_at_ms: r.try_get("revoked_at_ms")?,
        members_room: r.try_get("members_room")?,
    })
}

impl Catalog {
    /// A trivial round trip, for health checks: fails when the database is unreachable or the
    /// pool has been closed.
    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").fetch_one(&self.pool).await?;
        Ok(())
    }

    /// Store a new link. The recording must exist (foreign key); a hash collision is an error.
    pub async fn insert_link(&self, link: &LinkRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO links (token_hash, recording_id, object_key, created_at_ms, expires_at_ms, revoked_at_ms, members_room) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(link.token_hash.as_str())
        .bind(link.recording_id.as_str())
        .bind(link.object_key.as_str())
        .bind(link.created_at_ms)
        .bind(link.expires_at_ms)
        .bind(link.revoked_at_ms)
        .bind(link.members_room.as_deref())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The link whose token hashes to `token_hash`, whatever its state.
    pub async fn link_by_token_hash(&self, token_hash: &str) -> Result<Option<LinkRecord>> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {LINK_COLS} FROM links WHERE token_hash = $1"
        )))
        .bind(token_hash)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(link_from_row).transpose()
    }

    /// Every link of a recording, oldest first.
    pub async fn links_of_recording(&self, recording: &RecordingId) -> Result<Vec<LinkRecord>> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {LINK_COLS} FROM links WHERE recording_id = $1 ORDER BY created_at_ms, token_hash"
        )))
        .bind(recording.as_str())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(link_from_row).collect()
    }

    /// Revoke one link; `false` when no unrevoked link has this hash.
    pub async fn revoke_link(&self, token_hash: &str, at_ms: i64) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE links SET revoked_at_ms = $1 WHERE token_hash = $2 AND revoked_at_ms IS NULL",
        )
        .bind(at_ms)
        .bind(token_hash)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() > 0)
    }

    /// Revoke every not yet revoked link of a recording (expired ones included, so the catalog
    /// says plainly that none may serve again). Returns how many were revoked now.
    pub async fn revoke_links_of_recording(
        &self,
        recording: &RecordingId,
        at_ms: i64,
    ) -> Result<u64> {
        let r = sqlx::query(
            "UPDATE links SET revoked_at_ms = $1 WHERE recording_id = $2 AND revoked_at_ms IS NULL",
        )
        .bind(at_ms)
        .bind(recording.as_str())
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected())
    }
}

#[cfg(test)]
mod link_tests {
    use super::*;

    fn link(expires: Option<i64>, revoked: Option<i64>) -> LinkRecord {
        LinkRecord {
            token_hash: "00".repeat(32),
            recording_id: RecordingId::new("r"),
            object_key: "k".into(),
            created_at_ms: 0,
            expires_at_ms: expires,
            revoked_at_ms: revoked,
            members_room: None,
        }
    }

    #[test]
    fn a_link_serves_until_it_expires_or_is_revoked() {
        assert_eq!(link(Some(100), None).check(99), Ok(()));
        assert_eq!(link(Some(100), None).check(100), Err(LinkRefusal::Expired));
        assert_eq!(link(None, None).check(i64::MAX), Ok(()));
        assert_eq!(
            link(Some(100), Some(50)).check(60),
            Err(LinkRefusal::Revoked)
        );
        assert_eq!(
            link(Some(100), Some(50)).check(200),
            Err(LinkRefusal::Revoked)
        );
    }

    #[tokio::test]
    async fn links_round_trip_and_revoke_per_recording() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("c.db").display());
        let cat = Catalog::connect(&url).await.unwrap();
        cat.ping().await.unwrap();
        let call = cat
            .create_call(&RoomId::new("!r:x"), CallFlavour::Import, None, 1)
            .await
            .unwrap();
        let rec = cat.create_recording(&call.id, 1).await.unwrap();
        let mut a = link(Some(now_ms() + 60_000), None);
        a.recording_id = rec.id.clone();
        let mut b = a.clone();
        b.token_hash = "11".repeat(32);
        b.members_room = Some("!room:example.org".into());
        cat.insert_link(&a).await.unwrap();
        cat.insert_link(&b).await.unwrap();
        assert_eq!(
            cat.link_by_token_hash(&b.token_hash).await.unwrap(),
            Some(b.clone()),
            "the members-only room round-trips"
        );
        assert!(cat.insert_link(&a).await.is_err(), "duplicate hash");
        assert_eq!(
            cat.link_by_token_hash(&a.token_hash).await.unwrap(),
            Some(a.clone())
        );
        assert_eq!(cat.link_by_token_hash("nope").await.unwrap(), None);
        assert!(cat.revoke_link(&b.token_hash, 5).await.unwrap());
        assert!(
            !cat.revoke_link(&b.token_hash, 6).await.unwrap(),
            "already revoked"
        );
        assert_eq!(cat.revoke_links_of_recording(&rec.id, 7).await.unwrap(), 1);
        assert_eq!(cat.revoke_links_of_recording(&rec.id, 8).await.unwrap(), 0);
        let all = cat.links_of_recording(&rec.id).await.unwrap();
        assert_eq!(all.len(), 2);
        assert!(all.iter().all(|l| l.revoked_at_ms.is_some()));
        cat.close().await;
        assert!(
            cat.ping().await.is_err(),
            "a closed catalog does not answer"
        );
    }
}
