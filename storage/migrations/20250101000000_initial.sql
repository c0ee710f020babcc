-- One schema for SQLite and Postgres: only TEXT and BIGINT columns, ids minted by mxrec (UUIDv7
-- strings), times as unix milliseconds, media offsets as microseconds on the recording clock.
-- Allowed values of the enum-like columns are also checked in Rust (RecordingState and friends);
-- the CHECKs here guard against writers that bypass it.

CREATE TABLE rooms (
    id            TEXT PRIMARY KEY,
    name          TEXT,
    created_at_ms BIGINT NOT NULL,
    updated_at_ms BIGINT NOT NULL
);

CREATE TABLE calls (
    id            TEXT PRIMARY KEY,
    room_id       TEXT NOT NULL REFERENCES rooms (id),
    external_id   TEXT,
    flavour       TEXT NOT NULL CHECK (flavour IN ('voip1', 'matrixrtc', 'mesh', 'whip', 'import')),
    started_at_ms BIGINT NOT NULL,
    ended_at_ms   BIGINT
);
CREATE INDEX calls_by_room ON calls (room_id, started_at_ms);

CREATE TABLE recordings (
    id            TEXT PRIMARY KEY,
    room_id       TEXT NOT NULL REFERENCES rooms (id),
    call_id       TEXT NOT NULL REFERENCES calls (id),
    state         TEXT NOT NULL CHECK (state IN ('recording', 'finalizing', 'uploaded', 'published', 'failed')),
    state_reason  TEXT,
    started_at_ms BIGINT NOT NULL,
    ended_at_ms   BIGINT,
    manifest_key  TEXT,
    created_at_ms BIGINT NOT NULL,
    updated_at_ms BIGINT NOT NULL
);
CREATE INDEX recordings_by_room ON recordings (room_id, started_at_ms);
CREATE INDEX recordings_by_state ON recordings (state);

CREATE TABLE participants (
    id            TEXT PRIMARY KEY,
    recording_id  TEXT NOT NULL REFERENCES recordings (id),
    user_id       TEXT NOT NULL,
    device_id     TEXT,
    display_name  TEXT,
    joined_at_ms  BIGINT NOT NULL,
    left_at_ms    BIGINT
);
CREATE INDEX participants_by_recording ON participants (recording_id, joined_at_ms);

CREATE TABLE tracks (
    recording_id   TEXT NOT NULL REFERENCES recordings (id),
    id             TEXT NOT NULL,
    participant_id TEXT NOT NULL REFERENCES participants (id),
    kind           TEXT NOT NULL CHECK (kind IN ('audio', 'video')),
    codec          TEXT NOT NULL,
    source         TEXT NOT NULL CHECK (source IN ('camera', 'screen', 'microphone', 'screen_audio', 'unknown')),
    created_at_ms  BIGINT NOT NULL,
    PRIMARY KEY (recording_id, id)
);

CREATE TABLE segments (
    recording_id  TEXT NOT NULL,
    track_id      TEXT NOT NULL,
    seq           BIGINT NOT NULL,
    start_us      BIGINT NOT NULL,
    end_us        BIGINT NOT NULL,
    bytes         BIGINT NOT NULL,
    sha256        TEXT NOT NULL,
    object_key    TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    PRIMARY KEY (recording_id, track_id, seq),
    FOREIGN KEY (recording_id, track_id) REFERENCES tracks (recording_id, id)
);

CREATE TABLE uploads (
    object_key    TEXT PRIMARY KEY,
    recording_id  TEXT REFERENCES recordings (id),
    local_path    TEXT NOT NULL,
    size          BIGINT,
    sha256        TEXT,
    etag          TEXT,
    state         TEXT NOT NULL CHECK (state IN ('pending', 'verified', 'failed')),
    attempts      BIGINT NOT NULL DEFAULT 0,
    last_error    TEXT,
    created_at_ms BIGINT NOT NULL,
    updated_at_ms BIGINT NOT NULL
);
CREATE INDEX uploads_by_state ON uploads (state);

-- No foreign key on recording_id: the audit trail must outlive a deleted recording.
CREATE TABLE audit_events (
    id           TEXT PRIMARY KEY,
    at_ms        BIGINT NOT NULL,
    actor        TEXT NOT NULL,
    action       TEXT NOT NULL,
    recording_id TEXT,
    detail       TEXT NOT NULL
);
CREATE INDEX audit_events_by_recording ON audit_events (recording_id, at_ms);

-- Share links (used by the publisher later). Only a hash of the token is stored.
CREATE TABLE links (
    token_hash    TEXT PRIMARY KEY,
    recording_id  TEXT NOT NULL REFERENCES recordings (id),
    object_key    TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    expires_at_ms BIGINT,
    revoked_at_ms BIGINT
);
CREATE INDEX links_by_recording ON links (recording_id);
