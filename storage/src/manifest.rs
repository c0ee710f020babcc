//! The per-recording JSON manifest: everything needed to understand a recording from the bucket
//! alone, without the catalog. `docs/manifest.md` documents every field.
//!
//! Parsing is strict: every field not marked optional in the docs is required, unknown fields are
//! rejected (a writer that adds a field bumps `format_version`), and [`Manifest::validate`] checks
//! the cross-references (tracks name known participants, segments are in order, digests are hex).
//! A manifest that does not pass is refused as a whole rather than half-used.

use std::collections::HashSet;
use std::path::Path;

use chrono::{DateTime, SecondsFormat, TimeZone, Utc};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The manifest format this code writes and the only one it reads.
pub const FORMAT_VERSION: u32 = 1;

/// How the call was carried. The same names are stored in the catalog.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallFlavour {
    Voip1,
    Matrixrtc,
    Mesh,
    Whip,
    /// Media files recorded as a call by `mxrec import`.
    Import,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrackKind {
    Audio,
    Video,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrackSource {
    Camera,
    Screen,
    Microphone,
    ScreenAudio,
    Unknown,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputKind {
    Mp4,
    M4a,
}

macro_rules! str_enum {
    ($t:ty { $($v:ident = $s:literal),* $(,)? }) => {
        impl $t {
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$v => $s),* }
            }
            pub fn parse(s: &str) -> Option<Self> {
                match s { $($s => Some(Self::$v),)* _ => None }
            }
        }
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}
str_enum!(CallFlavour { Voip1 = "voip1", Matrixrtc = "matrixrtc", Mesh = "mesh", Whip = "whip", Import = "import" });
str_enum!(TrackKind { Audio = "audio", Video = "video" });
str_enum!(TrackSource {
    Camera = "camera",
    Screen = "screen",
    Microphone = "microphone",
    ScreenAudio = "screen_audio",
    Unknown = "unknown",
});
str_enum!(OutputKind { Mp4 = "mp4", M4a = "m4a" });

/// A span of time, both as wall clock (RFC 3339) and as µs on the recording clock. `end` is
/// absent while the span is open (a participant still present when the manifest was written).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Span {
    pub start: DateTime<Utc>,
    pub start_us: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_us: Option<i64>,
}

impl Span {
    /// A span from offsets on the recording clock, with the wall-clock times derived from the
    /// recording epoch so the two can never disagree.
    pub fn from_offsets(epoch_unix_ms: i64, start_us: i64, end_us: Option<i64>) -> Self {
        Self {
            start: wall_clock(epoch_unix_ms, start_us),
            start_us,
            end: end_us.map(|e| wall_clock(epoch_unix_ms, e)),
            end_us,
        }
    }
}

/// Wall-clock time of an offset on the recording clock.
pub fn wall_clock(epoch_unix_ms: i64, offset_us: i64) -> DateTime<Utc> {
    let micros = epoch_unix_ms.saturating_mul(1000).saturating_add(offset_us);
    Utc.timestamp_micros(micros)
        .single()
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format_version: u32,
    pub mxrec_version: String,
    pub recording_id: String,
    /// Unix ms of offset 0 on the recording clock.
    pub epoch_unix_ms: i64,
    /// `epoch_unix_ms` as RFC 3339, for humans.
    pub epoch: DateTime<Utc>,
    pub room: RoomInfo,
    pub call: CallInfo,
    pub participants: Vec<ParticipantInfo>,
    pub tracks: Vec<TrackInfo>,
    /// Spans in which recording was paused (nothing captured).
    pub pauses: Vec<Span>,
    pub outputs: Vec<OutputInfo>,
    /// What people asked of the recording while it ran (start, pause, resume, stop, opt-out,
    /// opt-in), in order, with who asked.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub control: Vec<ControlEvent>,
    /// Set when mxrec stopped without finishing the recording (a crash, a kill) and a later
    /// start finished it from what was stored: media after the last stored segment is missing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovered: Option<Recovery>,
}

/// How a recording was finished after a restart.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recovery {
    /// When the restarted mxrec took the recording up.
    pub at: DateTime<Utc>,
    /// Open segments rebuilt from the spool (cut short by the stop, up to their last whole
    /// frame); 0 when only closed segments were stored.
    pub salvaged_segments: u32,
}

/// One request that changed what was recorded: `!rec pause` in a room, an opt-out.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlEvent {
    pub at: DateTime<Utc>,
    /// Offset on the recording clock.
    pub at_us: i64,
    /// `start`, `pause`, `resume`, `stop`, `optout` or `optin`.
    pub action: String,
    /// Who asked (a Matrix user id, or `config` / `mxrec` for automatic actions).
    pub by: String,
    /// Whom it concerns, when not everyone (the user who opted out or in).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoomInfo {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallInfo {
    pub id: String,
    pub flavour: CallFlavour,
    /// Start and end of the recorded part of the call.
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParticipantInfo {
    /// Unique within the manifest; tracks refer to it.
    pub id: String,
    pub user_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    /// Presence intervals, in order; a rejoin is a new interval.
    pub present: Vec<Span>,
    /// Spans in which the participant had opted out: none of their media was recorded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub opted_out: Vec<Span>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrackInfo {
    pub id: String,
    pub participant: String,
    pub kind: TrackKind,
    pub codec: String,
    pub source: TrackSource,
    pub muted: Vec<Span>,
    /// Spans whose media could not be decrypted and is missing from the segments.
    pub undecryptable: Vec<Span>,
    pub segments: Vec<SegmentInfo>,
    /// The whole track as one file (codec copy of its segments), when it could be joined.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<FileInfo>,
}

/// One stored file: object key, size and SHA-256.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileInfo {
    pub key: String,
    pub bytes: u64,
    pub sha256: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegmentInfo {
    pub index: u32,
    pub start_us: i64,
    pub end_us: i64,
    pub bytes: u64,
    pub sha256: String,
    pub key: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputInfo {
    pub kind: OutputKind,
    pub key: String,
    pub bytes: u64,
    pub sha256: String,
    pub duration_us: i64,
}

impl Manifest {
    /// An empty manifest for a recording, stamped with this build's version.
    pub fn new(
        recording_id: impl Into<String>,
        epoch_unix_ms: i64,
        room: RoomInfo,
        call: CallInfo,
    ) -> Self {
        Self {
            format_version: FORMAT_VERSION,
            mxrec_version: env!("CARGO_PKG_VERSION").to_owned(),
            recording_id: recording_id.into(),
            epoch_unix_ms,
            epoch: wall_clock(epoch_unix_ms, 0),
            room,
            call,
            participants: Vec::new(),
            tracks: Vec::new(),
            pauses: Vec::new(),
            outputs: Vec::new(),
            control: Vec::new(),
            recovered: None,
        }
    }

    /// Parse and validate.
    pub fn from_json(bytes: &[u8]) -> Result<Self> {
        // Peek at the version first so a newer manifest gets a clear message rather than an
        // "unknown field" from whatever it added.
        #[derive(Deserialize)]
        struct Version {
            format_version: Option<u32>,
        }
        let v: Version =
            serde_json::from_slice(bytes).map_err(|e| Error::Manifest(e.to_string()))?;
        match v.format_version {
            None => return Err(Error::Manifest("missing field `format_version`".into())),
            Some(FORMAT_VERSION) => {}
            Some(other) => {
                return Err(Error::Manifest(format!(
                    "format_version {other} is not supported (this build reads {FORMAT_VERSION})"
                )))
            }
        }
        let m: Manifest =
            serde_json::from_slice(bytes).map_err(|e| Error::Manifest(e.to_string()))?;
        m.validate()?;
        Ok(m)
    }

    pub fn to_json_pretty(&self) -> Result<String> {
        self.validate()?;
        Ok(serde_json::to_string_pretty(self).expect("manifest serializes"))
    }

    pub async fn load_file(path: &Path) -> Result<Self> {
        let bytes = tokio::fs::read(path)
            .await
            .map_err(|e| Error::io(path, e))?;
        Self::from_json(&bytes)
    }

    pub async fn load_object(store: &dyn ObjectStore, key: &ObjectPath) -> Result<Self> {
        let bytes = store
            .get(key)
            .await
            .map_err(|e| Error::store("get", key, e))?
            .bytes()
            .await
            .map_err(|e| Error::store("get", key, e))?;
        Self::from_json(&bytes)
    }

    /// Cross-field checks that serde cannot express.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Manifest(msg));
        if self.format_version != FORMAT_VERSION {
            return bad(format!(
                "format_version {} is not {FORMAT_VERSION}",
                self.format_version
            ));
        }
        if self.recording_id.is_empty() || self.room.id.is_empty() || self.call.id.is_empty() {
            return bad("recording_id, room.id and call.id must not be empty".into());
        }
        if self.epoch != wall_clock(self.epoch_unix_ms, 0) {
            return bad(format!(
                "epoch {} does not match epoch_unix_ms {}",
                self.epoch.to_rfc3339_opts(SecondsFormat::Millis, true),
                self.epoch_unix_ms
            ));
        }
        check_span("call.span", &self.call.span)?;
        for (i, p) in self.pauses.iter().enumerate() {
            check_span(&format!("pauses[{i}]"), p)?;
        }
        let mut participants = HashSet::new();
        for p in &self.participants {
            if !participants.insert(p.id.as_str()) {
                return bad(format!("participant id `{}` appears twice", p.id));
            }
            if p.user_id.is_empty() {
                return bad(format!("participant `{}` has an empty user_id", p.id));
            }
            for (i, s) in p.present.iter().enumerate() {
                check_span(&format!("participant `{}` present[{i}]", p.id), s)?;
            }
            for (i, s) in p.opted_out.iter().enumerate() {
                check_span(&format!("participant `{}` opted_out[{i}]", p.id), s)?;
            }
        }
        let mut tracks = HashSet::new();
        for t in &self.tracks {
            if !tracks.insert(t.id.as_str()) {
                return bad(format!("track id `{}` appears twice", t.id));
            }
            if !participants.contains(t.participant.as_str()) {
                return bad(format!(
                    "track `{}` names unknown participant `{}`",
                    t.id, t.participant
                ));
            }
            for (i, s) in t.muted.iter().chain(&t.undecryptable).enumerate() {
                check_span(&format!("track `{}` interval {i}", t.id), s)?;
            }
            let mut prev: Option<&SegmentInfo> = None;
            for s in &t.segments {
                let at = format!("track `{}` segment {}", t.id, s.index);
                if s.end_us < s.start_us {
                    return bad(format!(
                        "{at}: end_us {} is before start_us {}",
                        s.end_us, s.start_us
                    ));
                }
                if let Some(p) = prev {
                    if s.index <= p.index {
                        return bad(format!("{at}: index not increasing after {}", p.index));
                    }
                    if s.start_us < p.end_us {
                        return bad(format!("{at}: overlaps segment {}", p.index));
                    }
                }
                check_sha256(&at, &s.sha256)?;
                if s.key.is_empty() {
                    return bad(format!("{at}: empty key"));
                }
                prev = Some(s);
            }
        }
        for (i, o) in self.outputs.iter().enumerate() {
            check_sha256(&format!("outputs[{i}]"), &o.sha256)?;
            if o.key.is_empty() || o.duration_us < 0 {
                return bad(format!("outputs[{i}]: empty key or negative duration"));
            }
        }
        Ok(())
    }
}

fn check_span(at: &str, s: &Span) -> Result<()> {
    match (s.end, s.end_us) {
        (None, None) => Ok(()),
        (Some(_), Some(end_us)) if end_us >= s.start_us => Ok(()),
        (Some(_), Some(end_us)) => Err(Error::Manifest(format!(
            "{at}: end_us {end_us} is before start_us {}",
            s.start_us
        ))),
        _ => Err(Error::Manifest(format!(
            "{at}: `end` and `end_us` must be given together"
        ))),
    }
}

fn check_sha256(at: &str, hex: &str) -> Result<()> {
    if hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        Ok(())
    } else {
        Err(Error::Manifest(format!(
            "{at}: sha256 must be 64 lowercase hex digits, got `{hex}`"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EPOCH: i64 = 1_735_689_600_000; // 2025-01-01T00:00:00Z

    fn sample() -> Manifest {
        let mut m = Manifest::new(
            "0194-rec",
            EPOCH,
            RoomInfo {
                id: "!abc:example.org".into(),
                name: Some("Standup".into()),
            },
            CallInfo {
                id: "call-1".into(),
                flavour: CallFlavour::Matrixrtc,
                span: Span::from_offsets(EPOCH, 0, Some(60_000_000)),
            },
        );
        m.participants.push(ParticipantInfo {
            id: "p1".into(),
            user_id: "@alice:example.org".into(),
            device_id: Some("DEVICE".into()),
            display_name: Some("Alice".into()),
            present: vec![
                Span::from_offsets(EPOCH, 0, Some(30_000_000)),
                Span::from_offsets(EPOCH, 40_000_000, None),
            ],
            opted_out: vec![Span::from_offsets(EPOCH, 50_000_000, Some(55_000_000))],
        });
        m.control.push(ControlEvent {
            at: wall_clock(EPOCH, 50_000_000),
            at_us: 50_000_000,
            action: "optout".into(),
            by: "@alice:example.org".into(),
            subject: Some("@alice:example.org".into()),
        });
        m.tracks.push(TrackInfo {
            id: "t1".into(),
            participant: "p1".into(),
            kind: TrackKind::Audio,
            codec: "opus".into(),
            source: TrackSource::Microphone,
            muted: vec![Span::from_offsets(EPOCH, 1_000_000, Some(2_000_000))],
            undecryptable: vec![],
            segments: (0..3)
                .map(|i| SegmentInfo {
                    index: i,
                    start_us: i as i64 * 2_000_000,
                    end_us: (i as i64 + 1) * 2_000_000,
                    bytes: 1234,
                    sha256: "ab".repeat(32),
                    key: format!("rooms/x/recordings/r/tracks/t1/{i:06}.ogg"),
                })
                .collect(),
            file: Some(FileInfo {
                key: "rooms/x/recordings/r/t1.webm".into(),
                bytes: 3702,
                sha256: "cd".repeat(32),
            }),
        });
        m.pauses
            .push(Span::from_offsets(EPOCH, 10_000_000, Some(12_000_000)));
        m.outputs.push(OutputInfo {
            kind: OutputKind::Mp4,
            key: "k/call.mp4".into(),
            bytes: 10,
            sha256: "cd".repeat(32),
            duration_us: 60_000_000,
        });
        m
    }

    #[test]
    fn round_trip() {
        let m = sample();
        let json = m.to_json_pretty().unwrap();
        assert!(
            json.contains("\"start\": \"2025-01-01T00:00:01Z\""),
            "{json}"
        );
        assert!(json.contains("\"flavour\": \"matrixrtc\""));
        assert!(json.contains("\"source\": \"microphone\""));
        assert_eq!(Manifest::from_json(json.as_bytes()).unwrap(), m);
    }

    fn mutate(f: impl FnOnce(&mut serde_json::Value)) -> Error {
        let mut v = serde_json::to_value(sample()).unwrap();
        f(&mut v);
        Manifest::from_json(&serde_json::to_vec(&v).unwrap()).unwrap_err()
    }

    #[test]
    fn rejects_malformed_manifests() {
        let cases: Vec<(&str, Error)> = vec![
            (
                "missing field `recording_id`",
                mutate(|v| {
                    v.as_object_mut().unwrap().remove("recording_id");
                }),
            ),
            (
                "missing field `format_version`",
                mutate(|v| {
                    v.as_object_mut().unwrap().remove("format_version");
                }),
            ),
            ("not supported", mutate(|v| v["format_version"] = 2.into())),
            (
                "unknown field `colour`",
                mutate(|v| v["colour"] = "red".into()),
            ),
            (
                "unknown variant `holo`",
                mutate(|v| v["tracks"][0]["kind"] = "holo".into()),
            ),
            (
                "unknown participant",
                mutate(|v| v["tracks"][0]["participant"] = "nobody".into()),
            ),
            (
                "overlaps",
                mutate(|v| v["tracks"][0]["segments"][1]["start_us"] = 1.into()),
            ),
            (
                "sha256 must be",
                mutate(|v| v["tracks"][0]["segments"][0]["sha256"] = "xyz".into()),
            ),
            (
                "premature end|input contains invalid characters|expected",
                mutate(|v| v["epoch"] = "yesterday".into()),
            ),
            (
                "together",
                mutate(|v| {
                    v["pauses"][0].as_object_mut().unwrap().remove("end");
                }),
            ),
            (
                "appears twice",
                mutate(|v| {
                    let t = v["tracks"][0].clone();
                    v["tracks"].as_array_mut().unwrap().push(t);
                }),
            ),
        ];
        for (want, err) in cases {
            let msg = err.to_string();
            assert!(matches!(err, Error::Manifest(_)), "{msg}");
            assert!(
                want.split('|').any(|w| msg.contains(w)),
                "expected `{want}` in `{msg}`"
            );
        }
        assert!(Manifest::from_json(b"not json").is_err());
        assert!(Manifest::from_json(b"{}").is_err());
    }

    #[tokio::test]
    async fn loads_from_file_and_object_store() {
        let m = sample();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("manifest.json");
        tokio::fs::write(&path, m.to_json_pretty().unwrap())
            .await
            .unwrap();
        assert_eq!(Manifest::load_file(&path).await.unwrap(), m);

        let store = object_store::local::LocalFileSystem::new_with_prefix(dir.path()).unwrap();
        assert_eq!(
            Manifest::load_object(&store, &ObjectPath::from("manifest.json"))
                .await
                .unwrap(),
            m
        );
    }
}
