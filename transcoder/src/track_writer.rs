//! [`TrackWriter`]: encoded frames of one track on the recording clock in, closed codec-copy
//! segments out. A segment starts on a keyframe (audio: on any frame), lasts about
//! `segment_duration`, and keeps the recording-clock timestamps, so a segment's first pts is
//! where it sits in the recording and segments of different tracks line up without a sidecar.
//!
//! Video frames are held back by one frame: a frame's duration is only known when the next one
//! arrives, and Matroska players use the block duration for the last frame of a file.

use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::bitstream::{self, FrameFacts};
use crate::codec::{Codec, MediaKind};
use crate::error::TranscodeError;
use crate::mux::{SegmentMuxer, StreamParams};

/// One encoded frame as the receive path hands it over.
#[derive(Debug, Clone)]
pub struct EncodedFrame {
    /// H.264 in Annex B, AV1 as a temporal unit of OBUs with size fields, VP8/VP9/Opus raw.
    pub data: Bytes,
    /// Microseconds since the recording's epoch (the common wall clock).
    pub pts_us: i64,
    /// The sender's keyframe flag. For VP8, VP9 and H.264 the bitstream is authoritative and
    /// this is only cross-checked; for AV1 it is trusted (together with a sequence header).
    pub keyframe: bool,
}

#[derive(Debug, Clone)]
pub struct TrackWriterConfig {
    pub dir: PathBuf,
    /// File stem; the caller has already made it safe for a file name.
    pub track_id: String,
    pub codec: Codec,
    pub segment_duration: Duration,
    pub audio_sample_rate: u32,
    pub audio_channels: u16,
}

impl TrackWriterConfig {
    /// Defaults: 2 s segments, 48 kHz stereo audio (Opus as WebRTC negotiates it).
    pub fn new(dir: impl Into<PathBuf>, track_id: impl Into<String>, codec: Codec) -> Self {
        Self {
            dir: dir.into(),
            track_id: track_id.into(),
            codec,
            segment_duration: Duration::from_secs(2),
            audio_sample_rate: 48_000,
            audio_channels: 2,
        }
    }
}

/// A closed segment, ready to upload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentInfo {
    pub index: u32,
    pub path: PathBuf,
    /// First frame's pts on the recording clock.
    pub start_us: i64,
    /// Last frame's pts plus that frame's duration.
    pub end_us: i64,
    pub frames: u64,
    pub bytes: u64,
    /// Hex SHA-256 of the file.
    pub sha256: String,
    pub width: Option<u32>,
    pub height: Option<u32>,
}

/// Counters for the recorder's metrics and the manifest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrackWriterStats {
    pub frames_written: u64,
    /// Video frames that arrived before the first usable keyframe.
    pub dropped_before_keyframe: u64,
    /// Frames whose pts was not after the previous frame's.
    pub dropped_backwards: u64,
    /// Frames refused as malformed (empty, truncated, wrong framing).
    pub rejected: u64,
    pub segments_closed: u32,
}

struct OpenSegment {
    mux: SegmentMuxer,
    index: u32,
    start_us: i64,
    end_us: i64,
    frames: u64,
    size: Option<(u32, u32)>,
    extradata: Vec<u8>,
    /// Last timestamp written, in the file's millisecond units: two frames less than a
    /// millisecond apart (distinct in µs) must still reach the muxer strictly increasing.
    last_ms: Option<i64>,
}

struct Pending {
    data: Bytes,
    pts_us: i64,
    keyframe: bool,
}

/// Writes one track's frames into numbered segments `{track_id}-{index:05}.{webm|mkv}`.
pub struct TrackWriter {
    cfg: TrackWriterConfig,
    stats: TrackWriterStats,
    open: Option<OpenSegment>,
    pending: Option<Pending>,
    last_pts_us: Option<i64>,
    last_interval_us: Option<i64>,
    next_index: u32,
    // In-band parameter sets as last seen, so a keyframe that does not repeat them still
    // starts a segment with the right extradata.
    sps: Vec<Vec<u8>>,
    pps: Vec<Vec<u8>>,
    av1_sequence_header: Option<Vec<u8>>,
    // Dimensions learnt by decoding, keyed by the extradata they were learnt for.
    decoded_size: Option<(Vec<u8>, (u32, u32))>,
    closed: bool,
}

/// Used for the last video frame when there is no earlier interval to copy.
const DEFAULT_VIDEO_FRAME_US: i64 = 33_333;

impl TrackWriter {
    pub fn new(cfg: TrackWriterConfig) -> Result<Self, TranscodeError> {
        crate::init();
        if cfg.track_id.is_empty() || cfg.track_id.contains('/') {
            return Err(TranscodeError::Unsupported(format!(
                "track id {:?} is not usable as a file stem",
                cfg.track_id
            )));
        }
        if cfg.segment_duration.is_zero() {
            return Err(TranscodeError::Unsupported(
                "segment duration must be positive".into(),
            ));
        }
        std::fs::create_dir_all(&cfg.dir)
            .map_err(TranscodeError::io("creating segment directory", &cfg.dir))?;
        Ok(Self {
            cfg,
            stats: TrackWriterStats::default(),
            open: None,
            pending: None,
            last_pts_us: None,
            last_interval_us: None,
            next_index: 0,
            sps: Vec::new(),
            pps: Vec::new(),
            av1_sequence_header: None,
            decoded_size: None,
            closed: false,
        })
    }

    pub fn stats(&self) -> TrackWriterStats {
        self.stats
    }

    pub fn config(&self) -> &TrackWriterConfig {
        &self.cfg
    }

    /// True while video is waiting for its first keyframe, or a segment is due and only a
    /// keyframe can close it; the receive path answers by sending a PLI.
    pub fn wants_keyframe(&self) -> bool {
        if self.cfg.codec.kind() == MediaKind::Audio {
            return false;
        }
        match (&self.open, self.last_pts_us) {
            (None, _) => true,
            (Some(seg), Some(last)) => last - seg.start_us >= self.segment_us(),
            (Some(_), None) => false,
        }
    }

    /// Accepts one frame. Returns the segments this frame closed. A rejected frame leaves the
    /// writer as it was.
    pub fn write(&mut self, frame: EncodedFrame) -> Result<Vec<SegmentInfo>, TranscodeError> {
        let _span = tracing::debug_span!("track_writer", track = %self.cfg.track_id).entered();
        let facts = match self.check(&frame) {
            Ok(f) => f,
            Err(e) => {
                self.stats.rejected += 1;
                return Err(e);
            }
        };
        if let Some(last) = self.last_pts_us {
            if frame.pts_us <= last {
                self.stats.dropped_backwards += 1;
                return Err(TranscodeError::NonMonotonicPts {
                    track: self.cfg.track_id.clone(),
                    pts_us: frame.pts_us,
                    last_us: last,
                });
            }
        }
        match self.cfg.codec.kind() {
            MediaKind::Audio => self.write_audio(frame, facts),
            MediaKind::Video => self.write_video(frame, facts),
        }
    }

    /// Ends the open segment here because frames will be left out for a while (a pause, an
    /// opt-out): the segment is closed and returned, and the next one starts with the next
    /// frame written (for video, the next keyframe), so no file spans the gap.
    pub fn interrupt(&mut self) -> Result<Vec<SegmentInfo>, TranscodeError> {
        if self.closed {
            return Ok(Vec::new());
        }
        if let Some(p) = self.pending.take() {
            let d = self.last_interval_us.unwrap_or(DEFAULT_VIDEO_FRAME_US);
            self.put(&p.data, p.pts_us, d, p.keyframe)?;
        }
        Ok(self.close_open()?.into_iter().collect())
    }

    /// Closes the open segment and returns it (and nothing more can be written).
    pub fn finish(mut self) -> Result<Vec<SegmentInfo>, TranscodeError> {
        self.close_all()
    }

    fn segment_us(&self) -> i64 {
        self.cfg.segment_duration.as_micros() as i64
    }

    fn invalid(&self, pts_us: i64, reason: impl Into<String>) -> TranscodeError {
        TranscodeError::InvalidFrame {
            track: self.cfg.track_id.clone(),
            codec: self.cfg.codec.name(),
            pts_us,
            reason: reason.into(),
        }
    }

    fn check(&self, frame: &EncodedFrame) -> Result<FrameFacts, TranscodeError> {
        if self.closed {
            return Err(TranscodeError::Unsupported(format!(
                "track {}: writer already finished",
                self.cfg.track_id
            )));
        }
        if frame.data.is_empty() {
            return Err(self.invalid(frame.pts_us, "empty frame"));
        }
        if frame.pts_us < 0 {
            return Err(self.invalid(frame.pts_us, "pts before the recording epoch"));
        }
        let parsed = bitstream::parse(self.cfg.codec, &frame.data, frame.keyframe);
        let facts = parsed.map_err(|reason| self.invalid(frame.pts_us, reason))?;
        if facts.keyframe != frame.keyframe && self.cfg.codec != Codec::Opus {
            tracing::debug!(
                pts_us = frame.pts_us,
                bitstream = facts.keyframe,
                "keyframe flag disagrees with the bitstream; using the bitstream"
            );
        }
        Ok(facts)
    }

    fn write_audio(
        &mut self,
        frame: EncodedFrame,
        facts: FrameFacts,
    ) -> Result<Vec<SegmentInfo>, TranscodeError> {
        let duration = facts.duration_us.unwrap_or(20_000);
        let mut closed = Vec::new();
        let due = self
            .open
            .as_ref()
            .is_some_and(|seg| frame.pts_us - seg.start_us >= self.segment_us());
        if due {
            // A live track's clock can step back a few ms (a sender report re-anchors it), so
            // the last frame's nominal end may lie after this frame: segments must not overlap.
            if let Some(seg) = self.open.as_mut() {
                seg.end_us = seg.end_us.min(frame.pts_us);
            }
            closed.extend(self.close_open()?);
        }
        if self.open.is_none() {
            self.open_segment(frame.pts_us, None, Vec::new())?;
        }
        self.last_pts_us = Some(frame.pts_us);
        self.put(&frame.data, frame.pts_us, duration, true)?;
        Ok(closed)
    }

    fn write_video(
        &mut self,
        frame: EncodedFrame,
        facts: FrameFacts,
    ) -> Result<Vec<SegmentInfo>, TranscodeError> {
        // Work out everything that can fail before touching any state.
        let mut sps = self.sps.clone();
        let mut pps = self.pps.clone();
        let mut av1_seq = self.av1_sequence_header.clone();
        if !facts.sps.is_empty() {
            sps = facts.sps.clone();
        }
        if !facts.pps.is_empty() {
            pps = facts.pps.clone();
        }
        if facts.av1_sequence_header.is_some() {
            av1_seq = facts.av1_sequence_header.clone();
        }
        let mut start = None;
        if facts.keyframe {
            let extradata = match self.cfg.codec {
                Codec::H264 if !sps.is_empty() && !pps.is_empty() => {
                    Some(annexb_parameter_sets(&sps, &pps))
                }
                Codec::Av1 => av1_seq.clone(),
                Codec::Vp8 | Codec::Vp9 => Some(Vec::new()),
                _ => None,
            };
            match extradata {
                None => tracing::debug!(
                    pts_us = frame.pts_us,
                    "keyframe without known parameter sets; treated as a delta frame"
                ),
                Some(extradata) => {
                    let size = match facts.size {
                        Some(s) => s,
                        None => match &self.decoded_size {
                            Some((key, s)) if *key == extradata => *s,
                            _ => crate::ff::decoded_size(
                                self.cfg.codec.ff_id(),
                                &extradata,
                                &frame.data,
                            )
                            .ok_or_else(|| self.invalid(frame.pts_us, "keyframe does not decode"))
                            .inspect_err(|_| self.stats.rejected += 1)?,
                        },
                    };
                    start = Some((extradata, size));
                }
            }
        }
        self.last_pts_us = Some(frame.pts_us);
        self.sps = sps;
        self.pps = pps;
        self.av1_sequence_header = av1_seq;

        let mut closed = Vec::new();
        if let Some(p) = self.pending.take() {
            let interval = frame.pts_us - p.pts_us;
            self.last_interval_us = Some(interval);
            self.put(&p.data, p.pts_us, interval, p.keyframe)?;
        }
        if let Some((extradata, size)) = start {
            if facts.size.is_none() {
                self.decoded_size = Some((extradata.clone(), size));
            }
            let cut = match &self.open {
                None => true,
                Some(seg) => {
                    let changed = seg.extradata != extradata || seg.size != Some(size);
                    if changed {
                        tracing::info!(
                            pts_us = frame.pts_us,
                            ?size,
                            "codec parameters changed; starting a new segment"
                        );
                    }
                    changed || frame.pts_us - seg.start_us >= self.segment_us()
                }
            };
            if cut {
                closed.extend(self.close_open()?);
                self.open_segment(frame.pts_us, Some(size), extradata)?;
            }
        }
        if self.open.is_none() {
            self.stats.dropped_before_keyframe += 1;
            return Ok(closed);
        }
        self.pending = Some(Pending {
            data: frame.data,
            pts_us: frame.pts_us,
            keyframe: facts.keyframe,
        });
        Ok(closed)
    }

    fn put(
        &mut self,
        data: &[u8],
        pts_us: i64,
        duration_us: i64,
        keyframe: bool,
    ) -> Result<(), TranscodeError> {
        let seg = self.open.as_mut().expect("put without an open segment");
        let pts_ms = match seg.last_ms {
            Some(last) => pts_us.div_euclid(1000).max(last + 1),
            None => pts_us.div_euclid(1000),
        };
        let end_ms = (pts_us + duration_us).div_euclid(1000).max(pts_ms);
        seg.mux.write(data, pts_ms, end_ms - pts_ms, keyframe)?;
        seg.last_ms = Some(pts_ms);
        seg.frames += 1;
        seg.end_us = pts_us + duration_us;
        self.stats.frames_written += 1;
        Ok(())
    }

    fn open_segment(
        &mut self,
        start_us: i64,
        size: Option<(u32, u32)>,
        extradata: Vec<u8>,
    ) -> Result<(), TranscodeError> {
        let index = self.next_index;
        let path = self.cfg.dir.join(format!(
            "{}-{:05}.{}",
            self.cfg.track_id,
            index,
            self.cfg.codec.segment_extension()
        ));
        let container_extradata = match self.cfg.codec {
            Codec::Opus => {
                bitstream::opus_head(self.cfg.audio_channels, self.cfg.audio_sample_rate)
            }
            _ => extradata.clone(),
        };
        let (width, height) = size.unwrap_or((0, 0));
        let mux = SegmentMuxer::create(
            &path,
            &StreamParams {
                codec: self.cfg.codec,
                width,
                height,
                sample_rate: self.cfg.audio_sample_rate,
                channels: self.cfg.audio_channels,
                extradata: container_extradata,
            },
        )?;
        tracing::debug!(index, start_us, ?size, "segment opened");
        self.next_index += 1;
        self.open = Some(OpenSegment {
            mux,
            index,
            start_us,
            end_us: start_us,
            frames: 0,
            size,
            extradata,
            last_ms: None,
        });
        Ok(())
    }

    fn close_open(&mut self) -> Result<Option<SegmentInfo>, TranscodeError> {
        let Some(seg) = self.open.take() else {
            return Ok(None);
        };
        let path = seg.mux.close()?;
        let (bytes, sha256) = hash_file(&path)?;
        self.stats.segments_closed += 1;
        let info = SegmentInfo {
            index: seg.index,
            path,
            start_us: seg.start_us,
            end_us: seg.end_us,
            frames: seg.frames,
            bytes,
            sha256,
            width: seg.size.map(|s| s.0),
            height: seg.size.map(|s| s.1),
        };
        tracing::debug!(
            index = info.index,
            start_us = info.start_us,
            end_us = info.end_us,
            frames = info.frames,
            "segment closed"
        );
        Ok(Some(info))
    }

    fn close_all(&mut self) -> Result<Vec<SegmentInfo>, TranscodeError> {
        if self.closed {
            return Ok(Vec::new());
        }
        self.closed = true;
        if let Some(p) = self.pending.take() {
            let d = self.last_interval_us.unwrap_or(DEFAULT_VIDEO_FRAME_US);
            self.put(&p.data, p.pts_us, d, p.keyframe)?;
        }
        Ok(self.close_open()?.into_iter().collect())
    }
}

impl Drop for TrackWriter {
    fn drop(&mut self) {
        if self.closed {
            return;
        }
        match self.close_all() {
            Ok(segs) => {
                for s in segs {
                    tracing::warn!(track = %self.cfg.track_id, path = %s.path.display(), "track writer dropped without finish(); closed its open segment");
                }
            }
            Err(e) => {
                tracing::error!(track = %self.cfg.track_id, error = %e, "closing the open segment on drop failed; it stays .partial")
            }
        }
    }
}

/// H.264 extradata in Annex B form; the Matroska muxer turns it into an avcC record.
fn annexb_parameter_sets(sps: &[Vec<u8>], pps: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for nal in sps.iter().chain(pps) {
        out.extend_from_slice(&[0, 0, 0, 1]);
        out.extend_from_slice(nal);
    }
    out
}

pub(crate) fn hash_file(path: &std::path::Path) -> Result<(u64, String), TranscodeError> {
    let mut f = std::fs::File::open(path).map_err(TranscodeError::io("hashing segment", path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut n = 0u64;
    loop {
        let r = f
            .read(&mut buf)
            .map_err(TranscodeError::io("hashing segment", path))?;
        if r == 0 {
            break;
        }
        n += r as u64;
        h.update(&buf[..r]);
    }
    Ok((n, hex::encode(h.finalize())))
}
