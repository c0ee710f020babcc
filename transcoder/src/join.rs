//! [`join_segments`]: the closed segments of one track in, one codec-copied file out — the
//! per-track download offered next to the composite. Packets are copied as they are, on the
//! recording clock the segments already share, so a gap between segments stays a gap and the
//! file lines up with the other tracks of the recording.
//!
//! Everything that can be checked before writing is checked first (every segment whole and
//! Matroska, every segment's stream shaped like the first's), so a join that cannot succeed
//! fails before it creates a file. The output is written under `<out>.partial` and renamed once
//! its trailer is on disk, like a segment; on any error the `.partial` is removed, because a
//! join is redone from its segments rather than resumed.

use std::ffi::CString;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::ptr;

use ffmpeg_next as ff;
use ffmpeg_next::ffi;
use ffmpeg_next::Rescale;
use serde::{Deserialize, Serialize};

use crate::error::TranscodeError;
use crate::ff::err_string;
use crate::mux::{partial_path, SegmentMuxer};
use crate::track_writer::hash_file;

/// What [`join_segments`] wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinReport {
    pub path: PathBuf,
    pub bytes: u64,
    /// Hex SHA-256 of the file.
    pub sha256: String,
    /// Packets written.
    pub packets: u64,
    /// Packets left out because their DTS was not after the previous packet's by more than a
    /// small nudge (overlapping segments), and video packets after them up to the next
    /// keyframe, which would not decode without them.
    pub dropped_packets: u64,
    /// Packets kept but moved a few milliseconds later so their DTS increases, as where
    /// millisecond rounding puts two segments' boundary packets on the same tick.
    pub nudged_packets: u64,
    /// From the first packet's pts to the end of the last packet.
    pub duration_us: i64,
}

/// A packet whose DTS is at most this much before (or at) the previous packet's is moved
/// just after it; one further back is dropped. Rounding to Matroska's milliseconds at a
/// segment boundary needs one or two; segments overlapping in content need far more.
const MAX_NUDGE_US: i64 = 10_000;

/// How much of a segment's start is read to find its EBML header and Segment size.
const HEAD_BYTES: u64 = 4096;

/// Joins the segments of one track, in the given order, into `out` by codec copy.
///
/// The container is the segments' own, chosen by the first segment's extension (`.webm` →
/// WebM, `.mkv`/`.mka` → Matroska), whatever `out` is called. Timestamps are kept as the
/// segments have them; only a packet whose DTS would not increase is nudged or dropped and
/// counted in the report.
///
/// A track whose stream parameters change between segments (codec, video size, audio sample
/// rate or channel count, or codec private data such as new H.264 parameter sets) is not
/// split: the join fails with [`TranscodeError::ParametersChanged`] naming the first segment
/// that differs, before anything is written, and the caller offers the segments as they are.
/// A missing, cut short or unreadable segment fails with [`TranscodeError::BadSegment`]
/// naming it. On every error `<out>.partial` is removed and `out` is untouched (an `out` from
/// an earlier join stays as it was), except when hashing the finished file fails after its
/// rename: then the complete new file is in place.
pub fn join_segments(segments: &[PathBuf], out: &Path) -> Result<JoinReport, TranscodeError> {
    crate::init();
    let _span =
        tracing::info_span!("join", out = %out.display(), segments = segments.len()).entered();
    let first = segments.first().ok_or_else(|| {
        TranscodeError::Unsupported(format!("no segments to join into {}", out.display()))
    })?;
    let muxer = muxer_for(first)?;
    let mut reference: Option<StreamShape> = None;
    for (index, path) in segments.iter().enumerate() {
        let input = open_checked(path)?;
        let shape = StreamShape::of(&input.stream(0).expect("checked on open").parameters());
        match &reference {
            None => reference = Some(shape),
            Some(r) => {
                if let Some(change) = r.change_to(&shape) {
                    return Err(TranscodeError::ParametersChanged {
                        index,
                        path: path.clone(),
                        change,
                    });
                }
            }
        }
    }

    let copied = copy(segments, out, muxer, false);
    if copied.is_err() {
        let _ = std::fs::remove_file(partial_path(out));
    }
    let copied = copied?;
    let (bytes, sha256) = hash_file(out)?;
    if copied.guard.dropped > 0 {
        tracing::warn!(
            dropped = copied.guard.dropped,
            "packets dropped where segments overlap"
        );
    }
    tracing::info!(
        packets = copied.packets,
        nudged = copied.guard.nudged,
        bytes,
        "track joined"
    );
    Ok(JoinReport {
        path: out.to_path_buf(),
        bytes,
        sha256,
        packets: copied.packets,
        dropped_packets: copied.guard.dropped,
        nudged_packets: copied.guard.nudged,
        duration_us: copied.duration_us,
    })
}

fn muxer_for(first: &Path) -> Result<&'static str, TranscodeError> {
    let ext = first
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase());
    match ext.as_deref() {
        Some("webm") => Ok("webm"),
        Some("mkv") | Some("mka") => Ok("matroska"),
        _ => Err(TranscodeError::BadSegment {
            path: first.to_path_buf(),
            reason:
                "its name ends in neither .webm nor .mkv, so the container to join into is unknown"
                    .into(),
        }),
    }
}

/// Opens a segment for reading after checking that it is a whole Matroska file. libavformat
/// reads a file cut short up to the cut and reports a clean end, so the check compares the
/// file's length with the Segment size its header declares.
fn open_checked(path: &Path) -> Result<ff::format::context::Input, TranscodeError> {
    open_segment(path, true)
}

/// [`open_checked`], or with `require_complete` false, a file whose muxer never finished it
/// (only its EBML header is checked).
fn open_segment(
    path: &Path,
    require_complete: bool,
) -> Result<ff::format::context::Input, TranscodeError> {
    let bad = |reason: String| TranscodeError::BadSegment {
        path: path.to_path_buf(),
        reason,
    };
    let mut file = std::fs::File::open(path).map_err(|e| bad(format!("opening it: {e}")))?;
    let len = file
        .metadata()
        .map_err(|e| bad(format!("reading its metadata: {e}")))?
        .len();
    let mut head = Vec::new();
    file.by_ref()
        .take(HEAD_BYTES)
        .read_to_end(&mut head)
        .map_err(|e| bad(format!("reading its header: {e}")))?;
    match segment_end(&head) {
        Err(reason) => return Err(bad(reason.into())),
        Ok(_) if !require_complete => {}
        Ok(None) => {
            return Err(bad(
                "its Segment size was never written, so its muxer did not finish it".into(),
            ))
        }
        Ok(Some(end)) if end > len => {
            return Err(bad(format!(
                "it is cut short: {len} bytes where its header declares {end}"
            )))
        }
        Ok(Some(_)) => {}
    }
    drop(file);

    let c_path =
        CString::new(path.to_string_lossy().as_bytes()).map_err(|_| bad("path with NUL".into()))?;
    let mut ctx: *mut ffi::AVFormatContext = ptr::null_mut();
    // Without avformat_find_stream_info: the Matroska header already carries every parameter a
    // copy needs, and skipping it spares decoding frames of every segment twice.
    let r = unsafe {
        ffi::avformat_open_input(&mut ctx, c_path.as_ptr(), ptr::null(), ptr::null_mut())
    };
    if r < 0 {
        return Err(bad(format!(
            "libavformat cannot open it: {}",
            err_string(r)
        )));
    }
    let input = unsafe { ff::format::context::Input::wrap(ctx) };
    if !input.format().name().contains("matroska") {
        return Err(bad(format!(
            "it is {}, not Matroska/WebM",
            input.format().name()
        )));
    }
    if input.nb_streams() == 0 {
        return Err(bad("it has no stream".into()));
    }
    Ok(input)
}

/// An EBML variable-length number at `at`: its value (IDs keep their length marker), its
/// length in bytes, and whether every value bit is set (an "unknown" size).
fn vint(buf: &[u8], at: usize, keep_marker: bool) -> Option<(u64, usize, bool)> {
    let first = *buf.get(at)?;
    if first == 0 {
        return None;
    }
    let len = first.leading_zeros() as usize + 1;
    let bytes = buf.get(at..at + len)?;
    let mut v = if keep_marker {
        first as u64
    } else {
        (first as u64) & (0xffu64 >> len)
    };
    for b in &bytes[1..] {
        v = (v << 8) | *b as u64;
    }
    let unknown = !keep_marker && v == (1u64 << (7 * len)) - 1;
    Some((v, len, unknown))
}

/// The byte offset where the file's Matroska Segment ends according to its header, or `None`
/// when the size was left unknown (a muxer that never wrote its trailer).
fn segment_end(head: &[u8]) -> Result<Option<u64>, &'static str> {
    const EBML_ID: u64 = 0x1A45_DFA3;
    const SEGMENT_ID: u64 = 0x1853_8067;
    let (id, id_len, _) = vint(head, 0, true).ok_or("it does not start with an EBML header")?;
    if id != EBML_ID {
        return Err("it does not start with an EBML header");
    }
    let (size, size_len, unknown) =
        vint(head, id_len, false).ok_or("its EBML header is cut short")?;
    if unknown {
        return Err("its EBML header has no size");
    }
    let at = (id_len + size_len) as u64 + size;
    let at = usize::try_from(at)
        .ok()
        .filter(|a| *a < head.len())
        .ok_or("its EBML header is cut short")?;
    let (id, id_len, _) = vint(head, at, true).ok_or("no Segment follows its EBML header")?;
    if id != SEGMENT_ID {
        return Err("no Segment follows its EBML header");
    }
    let (size, size_len, unknown) =
        vint(head, at + id_len, false).ok_or("its Segment header is cut short")?;
    if unknown {
        return Ok(None);
    }
    Ok(Some((at + id_len + size_len) as u64 + size))
}

/// The parameters that must not change for a codec copy into one file to be faithful.
#[derive(Debug, Clone, PartialEq, Eq)]
struct StreamShape {
    codec: ffi::AVCodecID,
    kind: ffi::AVMediaType,
    width: i32,
    height: i32,
    sample_rate: i32,
    channels: i32,
    extradata: Vec<u8>,
}

impl StreamShape {
    fn of(par: &ff::codec::Parameters) -> Self {
        unsafe {
            let p = &*par.as_ptr();
            let extradata = if p.extradata.is_null() || p.extradata_size <= 0 {
                Vec::new()
            } else {
                std::slice::from_raw_parts(p.extradata, p.extradata_size as usize).to_vec()
            };
            StreamShape {
                codec: p.codec_id,
                kind: p.codec_type,
                width: p.width,
                height: p.height,
                sample_rate: p.sample_rate,
                channels: p.ch_layout.nb_channels,
                extradata,
            }
        }
    }

    /// What differs in `other`, in words; `None` when one file can carry both.
    fn change_to(&self, other: &Self) -> Option<String> {
        if self.codec != other.codec || self.kind != other.kind {
            return Some(format!(
                "codec from {} to {}",
                ff::codec::Id::from(self.codec).name(),
                ff::codec::Id::from(other.codec).name()
            ));
        }
        if (self.width, self.height) != (other.width, other.height) {
            return Some(format!(
                "size from {}x{} to {}x{}",
                self.width, self.height, other.width, other.height
            ));
        }
        if self.sample_rate != other.sample_rate {
            return Some(format!(
                "sample rate from {} to {} Hz",
                self.sample_rate, other.sample_rate
            ));
        }
        if self.channels != other.channels {
            return Some(format!(
                "channel count from {} to {}",
                self.channels, other.channels
            ));
        }
        if self.extradata != other.extradata {
            return Some(format!(
                "codec private data ({} bytes, then {} different bytes)",
                self.extradata.len(),
                other.extradata.len()
            ));
        }
        None
    }
}

/// Keeps DTS strictly increasing across segment boundaries, in the output time base.
#[derive(Debug, Default)]
struct DtsGuard {
    last_dts: Option<i64>,
    max_nudge: i64,
    video: bool,
    /// A video packet was dropped: its successors up to the next keyframe would not decode.
    skip_to_key: bool,
    nudged: u64,
    dropped: u64,
}

impl DtsGuard {
    fn new(max_nudge: i64, video: bool) -> Self {
        DtsGuard {
            max_nudge: max_nudge.max(1),
            video,
            ..Default::default()
        }
    }

    /// Where a packet goes: `Some((pts, dts))` to write it there, `None` to drop it.
    fn place(&mut self, pts: Option<i64>, dts: Option<i64>, key: bool) -> Option<(i64, i64)> {
        let Some(dts0) = dts.or(pts) else {
            return self.drop_packet();
        };
        if self.skip_to_key && !key {
            return self.drop_packet();
        }
        let dts = match self.last_dts {
            Some(last) if dts0 <= last => {
                if last + 1 - dts0 > self.max_nudge {
                    return self.drop_packet();
                }
                self.nudged += 1;
                last + 1
            }
            _ => dts0,
        };
        self.skip_to_key = false;
        self.last_dts = Some(dts);
        Some((pts.unwrap_or(dts0).max(dts), dts))
    }

    fn drop_packet(&mut self) -> Option<(i64, i64)> {
        self.dropped += 1;
        self.skip_to_key |= self.video;
        None
    }
}

struct Copied {
    packets: u64,
    guard: DtsGuard,
    duration_us: i64,
    /// First packet's pts and last packet's end, in microseconds.
    span_us: Option<(i64, i64)>,
}

/// Copies every segment's packets into `<out>.partial` and renames it to `out`. With `salvage`,
/// the (single) input is a file its muxer never finished: it is read up to the first error, and
/// its last packet, which the stop may have cut, is left out.
fn copy(
    segments: &[PathBuf],
    out: &Path,
    muxer: &str,
    salvage: bool,
) -> Result<Copied, TranscodeError> {
    let mut mux: Option<SegmentMuxer> = None;
    let mut guard = DtsGuard::default();
    let mut packets = 0u64;
    let mut span: Option<(i64, i64)> = None;
    let mut out_tb = ff::Rational::new(1, 1000);
    for path in segments {
        let bad = |reason: String| TranscodeError::BadSegment {
            path: path.clone(),
            reason,
        };
        let mut input = open_segment(path, !salvage)?;
        let (in_tb, par) = {
            let st = input.stream(0).expect("checked on open");
            (st.time_base(), st.parameters())
        };
        if mux.is_none() {
            let m = SegmentMuxer::create_copy(out, muxer, &par)?;
            out_tb = m.time_base();
            let video = par.medium() == ff::media::Type::Video;
            guard = DtsGuard::new(MAX_NUDGE_US.rescale((1, 1_000_000), out_tb), video);
            mux = Some(m);
        }
        let mux = mux.as_mut().expect("created above");
        // The segment's Duration counts from the recording epoch, so it is where its last
        // packet ends: demuxed Matroska packets carry no duration of their own.
        let seg_end = match input.duration() {
            // In AV_TIME_BASE units.
            d if d > 0 => Some(d.rescale((1, 1_000_000), out_tb)),
            _ => None,
        };
        // One packet is held back so the segment's last one can be given its duration.
        let mut held: Option<ff::Packet> = None;
        loop {
            let mut pkt = ff::Packet::empty();
            match pkt.read(&mut input) {
                Ok(()) => {}
                Err(ff::Error::Eof) => break,
                Err(_) if salvage => break,
                Err(e) => return Err(bad(format!("reading its packets: {e}"))),
            }
            if pkt.stream() != 0 {
                continue;
            }
            pkt.rescale_ts(in_tb, out_tb);
            let Some((pts, dts)) = guard.place(pkt.pts(), pkt.dts(), pkt.is_key()) else {
                continue;
            };
            pkt.set_pts(Some(pts));
            pkt.set_dts(Some(dts));
            if let Some(mut prev) = held.replace(pkt) {
                write(mux, &mut prev, &mut span)?;
                packets += 1;
            }
        }
        if let Some(mut last) = held.filter(|_| !salvage) {
            let pts = last.pts().expect("placed packets have a pts");
            if let Some(end) = seg_end.filter(|e| *e > pts) {
                last.set_duration(end - pts);
            }
            write(mux, &mut last, &mut span)?;
            packets += 1;
        }
    }
    let mux = mux.expect("at least one segment");
    mux.close()?;
    let span_us = span.map(|(first, end)| {
        (
            first.rescale(out_tb, (1, 1_000_000)),
            end.rescale(out_tb, (1, 1_000_000)),
        )
    });
    Ok(Copied {
        packets,
        guard,
        duration_us: span_us.map_or(0, |(first, end)| end - first),
        span_us,
    })
}

/// What [`salvage_segment`] kept of a segment its writer never closed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Salvaged {
    pub path: PathBuf,
    pub bytes: u64,
    /// Hex SHA-256 of the file.
    pub sha256: String,
    pub packets: u64,
    /// First packet's pts on the recording clock.
    pub start_us: i64,
    /// Where the last kept packet ends.
    pub end_us: i64,
}

/// Rebuilds a whole segment at `out` from `partial`, a segment file its writer never closed
/// (the process was killed mid-segment): every packet up to the cut is copied with its
/// timestamps, except the last one read, which the cut may have truncated. `Ok(None)` when
/// nothing usable is left (fewer than two packets, or not even a header); `partial` is kept.
pub fn salvage_segment(partial: &Path, out: &Path) -> Result<Option<Salvaged>, TranscodeError> {
    crate::init();
    let _span = tracing::info_span!("salvage", file = %partial.display()).entered();
    let muxer = muxer_for(out)?;
    match open_segment(partial, false) {
        Ok(_) => {}
        Err(TranscodeError::BadSegment { reason, .. }) => {
            tracing::warn!(%reason, "nothing to salvage");
            return Ok(None);
        }
        Err(e) => return Err(e),
    }
    let copied = match copy(&[partial.to_path_buf()], out, muxer, true) {
        Ok(c) => c,
        Err(e) => {
            let _ = std::fs::remove_file(partial_path(out));
            return Err(e);
        }
    };
    let Some((start_us, end_us)) = copied.span_us.filter(|_| copied.packets > 0) else {
        let _ = std::fs::remove_file(out);
        return Ok(None);
    };
    let (bytes, sha256) = hash_file(out)?;
    tracing::info!(packets = copied.packets, start_us, end_us, bytes, "segment salvaged");
    Ok(Some(Salvaged {
        path: out.to_path_buf(),
        bytes,
        sha256,
        packets: copied.packets,
        start_us,
        end_us,
    }))
}

fn write(
    mux: &mut SegmentMuxer,
    pkt: &mut ff::Packet,
    span: &mut Option<(i64, i64)>,
) -> Result<(), TranscodeError> {
    let pts = pkt.pts().expect("placed packets have a pts");
    let end = pts + pkt.duration().max(0);
    *span = Some(match *span {
        None => (pts, end),
        Some((first, e)) => (first.min(pts), e.max(end)),
    });
    mux.write_packet(pkt)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_end_from_header() {
        // EBML header of 3 payload bytes, then a Segment of 0x0102 bytes with a 2-byte size.
        let mut head = vec![0x1A, 0x45, 0xDF, 0xA3, 0x83, 1, 2, 3];
        head.extend_from_slice(&[0x18, 0x53, 0x80, 0x67, 0x41, 0x02]);
        assert_eq!(segment_end(&head), Ok(Some(14 + 0x0102)));
        // As the Matroska muxer leaves it until its trailer: an 8-byte all-ones size.
        let mut open = head[..12].to_vec();
        open.extend_from_slice(&[0x01, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(segment_end(&open), Ok(None));
        assert!(segment_end(&head[..10]).is_err());
        assert!(segment_end(b"RIFF....WAVE").is_err());
        assert!(segment_end(&[]).is_err());
    }

    #[test]
    fn dts_guard_nudges_rounding_and_drops_overlap() {
        let mut g = DtsGuard::new(10, true);
        assert_eq!(g.place(Some(100), Some(100), true), Some((100, 100)));
        assert_eq!(g.place(Some(133), Some(133), false), Some((133, 133)));
        // A boundary packet on the same millisecond: one tick later.
        assert_eq!(g.place(Some(133), Some(133), true), Some((134, 134)));
        assert_eq!(g.nudged, 1);
        // Content from far back: dropped, and the delta frames that lean on it too.
        assert_eq!(g.place(Some(50), Some(50), true), None);
        assert_eq!(g.place(Some(200), Some(200), false), None);
        assert_eq!(g.dropped, 2);
        assert_eq!(g.place(Some(233), None, true), Some((233, 233)));
        assert_eq!(g.place(None, None, false), None);

        // Audio has no keyframe dependency: only the overlapping packet goes.
        let mut a = DtsGuard::new(10, false);
        a.place(Some(100), Some(100), true);
        assert_eq!(a.place(Some(20), Some(20), true), None);
        assert_eq!(a.place(Some(120), Some(120), true), Some((120, 120)));
    }

    #[test]
    fn shape_changes_are_named() {
        let a = StreamShape {
            codec: ffi::AVCodecID::AV_CODEC_ID_VP8,
            kind: ffi::AVMediaType::AVMEDIA_TYPE_VIDEO,
            width: 640,
            height: 360,
            sample_rate: 0,
            channels: 0,
            extradata: Vec::new(),
        };
        assert_eq!(a.change_to(&a.clone()), None);
        let b = StreamShape {
            width: 320,
            height: 240,
            ..a.clone()
        };
        assert_eq!(a.change_to(&b).unwrap(), "size from 640x360 to 320x240");
        let c = StreamShape {
            extradata: vec![1, 2, 3],
            ..a.clone()
        };
        assert!(a.change_to(&c).unwrap().contains("codec private data"));
    }
}
