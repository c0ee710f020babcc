//! The composite render: every segment of a recording, plus its timeline, into one MP4
//! (H.264 + AAC) or, without any video track, one M4A.
//!
//! The whole picture and mix is one libavfilter graph ([`filtergraph`]) whose inputs are
//! labelled `[N:v]` / `[N:a]` after the track's index in [`CompositeSpec::tracks`], exactly as
//! the ffmpeg CLI names the streams of its N-th input; so the same graph text can be run by the
//! CLI on the same segments to cross-check or benchmark. [`render`] decodes the segments
//! itself, feeds the graph's sources in pts order across tracks, and encodes what comes out.
//!
//! Layout changes (joins, leaves, a screen share starting) are not graph rebuilds: the graph
//! draws every layout that occurs, each enabled only during its time span (`enable=`), which
//! keeps one graph for the whole recording and keeps the CLI and in-process renders identical.

use std::collections::VecDeque;
use std::ffi::CString;
use std::path::{Path, PathBuf};

use ff::ffi;
use ffmpeg_next as ff;
use serde::{Deserialize, Serialize};

use crate::codec::{Codec, MediaKind};
use crate::error::TranscodeError;
use crate::layout::{layout, Rect, Tile, TileKind};

/// A half-open span `[start_us, end_us)` on the recording clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interval {
    pub start_us: i64,
    pub end_us: i64,
}

impl Interval {
    pub fn new(start_us: i64, end_us: i64) -> Self {
        Self { start_us, end_us }
    }

    fn contains(&self, t: i64) -> bool {
        self.start_us <= t && t < self.end_us
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrackSource {
    Camera,
    Screen,
    Microphone,
    ScreenAudio,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompositeParticipant {
    pub id: String,
    pub display_name: String,
    pub present: Vec<Interval>,
    /// Times the participant asked not to be recorded: their tracks are left out (as if muted)
    /// and their tile reads "not recorded".
    #[serde(default)]
    pub not_recorded: Vec<Interval>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompositeTrack {
    pub participant_id: String,
    pub kind: MediaKind,
    pub source: TrackSource,
    pub codec: Codec,
    /// In order; their timestamps are on the recording clock.
    pub segments: Vec<PathBuf>,
    pub muted: Vec<Interval>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompositeSpec {
    pub width: u32,
    pub height: u32,
    pub fps: u32,
    pub duration_us: i64,
    pub participants: Vec<CompositeParticipant>,
    pub tracks: Vec<CompositeTrack>,
    pub paused: Vec<Interval>,
    pub font_path: PathBuf,
    /// None: constant quality (x264 CRF 23).
    pub video_bitrate: Option<u64>,
    pub audio_bitrate: u64,
}

impl CompositeSpec {
    /// 1280×720 at 30 fps, DejaVu Sans, CRF video and 128 kb/s audio.
    pub fn new(duration_us: i64) -> Self {
        Self {
            width: 1280,
            height: 720,
            fps: 30,
            duration_us,
            participants: Vec::new(),
            tracks: Vec::new(),
            paused: Vec::new(),
            font_path: PathBuf::from("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"),
            video_bitrate: None,
            audio_bitrate: 128_000,
        }
    }

    /// True when the output is an MP4 with video, false for an audio-only M4A.
    pub fn has_video(&self) -> bool {
        self.tracks
            .iter()
            .any(|t| t.kind == MediaKind::Video && !t.segments.is_empty())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompositeReport {
    pub path: PathBuf,
    /// Length of the longer of the written streams.
    pub duration_us: i64,
    pub has_video: bool,
    /// Video frames encoded.
    pub frames: u64,
    pub audio_samples: u64,
    /// Packets or segments that failed to demux or decode and were skipped.
    pub decode_errors: u64,
    /// Indices into `spec.tracks` that were fed to the graph.
    pub tracks_used: Vec<usize>,
}

const BACKGROUND: &str = "0x101010";
const PLACEHOLDER: &str = "0x3a3a3a";
const SAMPLE_RATE: i32 = 48_000;
/// How long a source may fall behind the merge point before it is fed a stand-in frame, so
/// the graph never holds more than about this much of the other tracks in memory.
const HEARTBEAT_US: i64 = 1_000_000;

// ---------------------------------------------------------------------------------------
// Planning: which tiles are where, when.

struct Epoch {
    span: Interval,
    tiles: Vec<Tile>,
}

/// Where one video track is drawn: each rectangle it occupies, and when.
type Placements = Vec<(Rect, Vec<Interval>)>;

struct Plan {
    has_video: bool,
    epochs: Vec<Epoch>,
    /// Per video track shown: the rectangles it occupies and when.
    video: Vec<(usize, Placements)>,
    audio: Vec<usize>,
}

fn merge(mut v: Vec<Interval>) -> Vec<Interval> {
    v.retain(|i| i.end_us > i.start_us);
    v.sort_by_key(|i| i.start_us);
    let mut out: Vec<Interval> = Vec::new();
    for i in v {
        match out.last_mut() {
            Some(last) if i.start_us <= last.end_us => last.end_us = last.end_us.max(i.end_us),
            _ => out.push(i),
        }
    }
    out
}

fn intersect(a: &[Interval], b: &[Interval]) -> Vec<Interval> {
    let mut out = Vec::new();
    for x in a {
        for y in b {
            let s = x.start_us.max(y.start_us);
            let e = x.end_us.min(y.end_us);
            if e > s {
                out.push(Interval::new(s, e));
            }
        }
    }
    merge(out)
}

fn subtract(a: &[Interval], b: &[Interval]) -> Vec<Interval> {
    let mut out = Vec::new();
    for x in a {
        let mut pieces = vec![*x];
        for y in b {
            pieces = pieces
                .into_iter()
                .flat_map(|p| {
                    let mut r = Vec::new();
                    if y.start_us > p.start_us {
                        r.push(Interval::new(p.start_us, y.start_us.min(p.end_us)));
                    }
                    if y.end_us < p.end_us {
                        r.push(Interval::new(y.end_us.max(p.start_us), p.end_us));
                    }
                    r
                })
                .filter(|i| i.end_us > i.start_us)
                .collect();
        }
        out.extend(pieces);
    }
    merge(out)
}

/// The span a track's segments cover, read from the containers (start and duration).
/// Segments written back to back touch, so small gaps are bridged.
fn coverage(track: &CompositeTrack) -> Vec<Interval> {
    const BRIDGE_US: i64 = 250_000;
    let mut spans = Vec::new();
    for seg in &track.segments {
        match ff::format::input(seg) {
            Ok(ctx) => {
                let start = ctx.stream(0).map(|s| {
                    let tb = s.time_base();
                    if s.start_time() == ffi::AV_NOPTS_VALUE {
                        0
                    } else {
                        s.start_time() * 1_000_000 * tb.numerator() as i64 / tb.denominator() as i64
                    }
                });
                let (Some(start), d) = (start, ctx.duration()) else {
                    continue;
                };
                // FFmpeg's Matroska muxer writes the Duration element as the end timestamp
                // (counted from 0, not from the first frame), and TrackWriter keeps
                // recording-clock timestamps, so the duration is the absolute end here.
                if d > start {
                    spans.push(Interval::new(start, d));
                }
            }
            Err(e) => {
                tracing::warn!(path = %seg.display(), error = %e, "segment unreadable; left out of the layout")
            }
        }
    }
    let bridged: Vec<Interval> = spans
        .into_iter()
        .map(|i| Interval::new(i.start_us, i.end_us + BRIDGE_US))
        .collect();
    merge(bridged)
        .into_iter()
        .map(|i| Interval::new(i.start_us, i.end_us - BRIDGE_US))
        .collect()
}

/// When a track must not be seen or heard: muted by its sender, or its participant not recorded.
fn hidden(spec: &CompositeSpec, t: &CompositeTrack) -> Vec<Interval> {
    let mut v = t.muted.clone();
    if let Some(p) = spec.participants.iter().find(|p| p.id == t.participant_id) {
        v.extend(p.not_recorded.iter().copied());
    }
    merge(v)
}

fn plan(spec: &CompositeSpec) -> Plan {
    crate::init();
    let whole = [Interval::new(0, spec.duration_us)];
    let has_video = spec.has_video();
    let covered: Vec<Vec<Interval>> = spec
        .tracks
        .iter()
        .map(|t| {
            if t.kind == MediaKind::Video {
                coverage(t)
            } else {
                Vec::new()
            }
        })
        .collect();
    // When a track's picture can be shown: covered by segments and not muted.
    let visible: Vec<Vec<Interval>> = spec
        .tracks
        .iter()
        .zip(&covered)
        .map(|(t, c)| intersect(&subtract(c, &hidden(spec, t)), &whole))
        .collect();
    let present = |pid: &str| -> Vec<Interval> {
        spec.participants
            .iter()
            .find(|p| p.id == pid)
            .map(|p| merge(p.present.clone()))
            .unwrap_or_default()
    };
    let screens: Vec<usize> = (0..spec.tracks.len())
        .filter(|&i| {
            spec.tracks[i].kind == MediaKind::Video && spec.tracks[i].source == TrackSource::Screen
        })
        .collect();
    let screen_active: Vec<(usize, Vec<Interval>)> = screens
        .iter()
        .map(|&i| {
            (
                i,
                intersect(&visible[i], &present(&spec.tracks[i].participant_id)),
            )
        })
        .collect();

    let mut cuts = vec![0, spec.duration_us];
    for p in &spec.participants {
        for i in &p.present {
            cuts.extend([i.start_us, i.end_us]);
        }
    }
    for (_, act) in &screen_active {
        for i in act {
            cuts.extend([i.start_us, i.end_us]);
        }
    }
    cuts.retain(|&c| (0..=spec.duration_us).contains(&c));
    cuts.sort();
    cuts.dedup();

    let mut epochs: Vec<Epoch> = Vec::new();
    if has_video {
        for w in cuts.windows(2) {
            let span = Interval::new(w[0], w[1]);
            let mid = midpoint(w[0], w[1]);
            let here: Vec<&str> = spec
                .participants
                .iter()
                .filter(|p| p.present.iter().any(|i| i.contains(mid)))
                .map(|p| p.id.as_str())
                .collect();
            let screen = screen_active
                .iter()
                .find(|(_, act)| act.iter().any(|i| i.contains(mid)))
                .map(|(i, _)| spec.tracks[*i].participant_id.as_str());
            let tiles = layout(spec.width, spec.height, &here, screen);
            match epochs.last_mut() {
                Some(last) if last.tiles == tiles && last.span.end_us == span.start_us => {
                    last.span.end_us = span.end_us
                }
                _ => epochs.push(Epoch { span, tiles }),
            }
        }
    }

    let mut video = Vec::new();
    for (ti, t) in spec.tracks.iter().enumerate() {
        if t.kind != MediaKind::Video || t.segments.is_empty() {
            continue;
        }
        let want = if t.source == TrackSource::Screen {
            TileKind::Screen
        } else {
            TileKind::Camera
        };
        // A participant's first camera track owns the camera tile.
        if want == TileKind::Camera {
            let first = spec.tracks.iter().position(|o| {
                o.kind == MediaKind::Video
                    && o.source != TrackSource::Screen
                    && o.participant_id == t.participant_id
                    && !o.segments.is_empty()
            });
            if first != Some(ti) {
                continue;
            }
        }
        let mut rects: Placements = Vec::new();
        for e in &epochs {
            let Some(tile) = e
                .tiles
                .iter()
                .find(|tile| tile.participant_id == t.participant_id && tile.kind == want)
            else {
                continue;
            };
            // The screen tile belongs to one sharer's track; skip other screen tracks.
            if want == TileKind::Screen
                && !screen_active.iter().any(|(i, act)| {
                    *i == ti
                        && act
                            .iter()
                            .any(|a| a.contains(midpoint(e.span.start_us, e.span.end_us)))
                })
            {
                continue;
            }
            let when = intersect(&visible[ti], &[e.span]);
            if when.is_empty() {
                continue;
            }
            match rects.iter_mut().find(|(r, _)| *r == tile.rect) {
                Some((_, w)) => {
                    w.extend(when);
                    *w = merge(std::mem::take(w));
                }
                None => rects.push((tile.rect, when)),
            }
        }
        if !rects.is_empty() {
            video.push((ti, rects));
        }
    }
    let audio = (0..spec.tracks.len())
        .filter(|&i| spec.tracks[i].kind == MediaKind::Audio && !spec.tracks[i].segments.is_empty())
        .collect();
    Plan {
        has_video,
        epochs,
        video,
        audio,
    }
}

/// The middle of `[a, b]` (`a <= b`) without overflowing: spans come from manifests, whose
/// offsets can be anything up to `i64::MAX`.
fn midpoint(a: i64, b: i64) -> i64 {
    a + (b - a) / 2
}

// ---------------------------------------------------------------------------------------
// The graph text.

fn secs(us: i64) -> String {
    format!("{:.3}", us as f64 / 1e6)
}

fn enable_expr(when: &[Interval]) -> String {
    let terms: Vec<String> = when
        .iter()
        .map(|i| format!("gte(t,{})*lt(t,{})", secs(i.start_us), secs(i.end_us)))
        .collect();
    format!("enable='{}'", terms.join("+"))
}

/// Escapes a value for an option (first level) and then for the graph description (second
/// level), as FFmpeg's filtergraph escaping rules require for free text like display names.
fn escape_value(v: &str) -> String {
    let mut first = String::new();
    for c in v.chars() {
        if matches!(c, '\\' | '\'' | ':') {
            first.push('\\');
        }
        first.push(c);
    }
    let mut second = String::new();
    for c in first.chars() {
        if matches!(c, '\\' | '\'' | '[' | ']' | ',' | ';') {
            second.push('\\');
        }
        second.push(c);
    }
    second
}

fn display_name<'a>(spec: &'a CompositeSpec, pid: &'a str) -> &'a str {
    spec.participants
        .iter()
        .find(|p| p.id == pid)
        .map(|p| p.display_name.as_str())
        .unwrap_or(pid)
}

/// The libavfilter graph [`render`] runs. Inputs are `[N:v]`/`[N:a]` for `spec.tracks[N]`;
/// outputs are `[vout]` (absent for audio-only) and `[aout]`.
pub fn filtergraph(spec: &CompositeSpec) -> String {
    graph_text(spec, &plan(spec))
}

fn graph_text(spec: &CompositeSpec, plan: &Plan) -> String {
    let dur = secs(spec.duration_us);
    let mut chains: Vec<String> = Vec::new();
    let font = escape_value(&spec.font_path.to_string_lossy());
    if plan.has_video {
        let (w, h) = (spec.width, spec.height);
        let mut base = vec![
            format!("color=c={BACKGROUND}:s={w}x{h}:r={}:d={dur}", spec.fps),
            "format=yuv420p".to_string(),
        ];
        for e in &plan.epochs {
            for t in &e.tiles {
                let r = t.rect;
                base.push(format!(
                    "drawbox=x={}:y={}:w={}:h={}:color={PLACEHOLDER}:t=fill:{}",
                    r.x,
                    r.y,
                    r.w,
                    r.h,
                    enable_expr(&[e.span])
                ));
            }
        }
        chains.push(format!("{}[bg]", base.join(",")));
        let mut cur = "bg".to_string();
        let mut n = 0;
        for (ti, rects) in &plan.video {
            let copies: Vec<String> = (0..rects.len()).map(|k| format!("t{ti}c{k}")).collect();
            let split_src = if rects.len() > 1 {
                let outs: String = copies.iter().map(|c| format!("[{c}s]")).collect();
                chains.push(format!("[{ti}:v]split={}{outs}", rects.len()));
                copies.iter().map(|c| format!("[{c}s]")).collect::<Vec<_>>()
            } else {
                vec![format!("[{ti}:v]")]
            };
            for (k, (r, when)) in rects.iter().enumerate() {
                // Letterbox into the tile in placeholder grey, so a tile of any aspect ratio
                // looks like the placeholder it replaces. The graph is built from each track's
                // first frame, yet a track's picture size can change (a new segment, an SFU's
                // 8x8 blank key frame): scale refits every size to the tile, and pad has to
                // re-place it per frame (eval=frame). With pad's default eval=init, a picture
                // taller than the first was copied at the first one's offset, past the end of
                // pad's output buffer.
                chains.push(format!(
                    "{}scale=w={}:h={}:force_original_aspect_ratio=decrease:force_divisible_by=2,pad=w={}:h={}:x=(ow-iw)/2:y=(oh-ih)/2:color={PLACEHOLDER}:eval=frame,format=yuv420p[{}]",
                    split_src[k], r.w, r.h, r.w, r.h, copies[k]
                ));
                let next = format!("o{n}");
                n += 1;
                chains.push(format!(
                    "[{cur}][{}]overlay=x={}:y={}:eof_action=pass:{}[{next}]",
                    copies[k],
                    r.x,
                    r.y,
                    enable_expr(when)
                ));
                cur = next;
            }
        }
        let mut top = Vec::new();
        for e in &plan.epochs {
            for t in &e.tiles {
                let r = t.rect;
                let mut name = display_name(spec, &t.participant_id).to_string();
                if t.kind == TileKind::Screen {
                    name.push_str(" (screen)");
                }
                let size = (r.h / 14).clamp(12, 32);
                top.push(format!(
                    "drawtext=fontfile={font}:expansion=none:text={}:fontsize={size}:fontcolor=white:box=1:boxcolor=black@0.55:boxborderw=6:x={}+({}-tw)/2:y={}-line_h-{}:{}",
                    escape_value(&name), r.x, r.w, r.y + r.h, size / 2 + 6, enable_expr(&[e.span])
                ));
                let not_recorded = spec
                    .participants
                    .iter()
                    .find(|p| p.id == t.participant_id)
                    .map(|p| intersect(&merge(p.not_recorded.clone()), &[e.span]))
                    .unwrap_or_default();
                if t.kind != TileKind::Screen && !not_recorded.is_empty() {
                    top.push(format!(
                        "drawtext=fontfile={font}:expansion=none:text={}:fontsize={size}:fontcolor=white:x={}+({}-tw)/2:y={}+({}-th)/2:{}",
                        escape_value("not recorded"), r.x, r.w, r.y, r.h, enable_expr(&not_recorded)
                    ));
                }
            }
        }
        if !spec.paused.is_empty() {
            let when = enable_expr(&merge(spec.paused.clone()));
            top.push(format!(
                "drawbox=x=0:y=0:w=iw:h=ih:color=0x000000:t=fill:{when}"
            ));
            top.push(format!(
                "drawtext=fontfile={font}:expansion=none:text={}:fontsize={}:fontcolor=white:x=(w-tw)/2:y=(h-th)/2:{when}",
                escape_value("Recording paused"),
                (spec.height / 14).max(16)
            ));
        }
        top.push("format=yuv420p".into());
        chains.push(format!("[{cur}]{}[vout]", top.join(",")));
    }

    let fmt = format!("aformat=sample_fmts=fltp:sample_rates={SAMPLE_RATE}:channel_layouts=stereo");
    let mut mix_in = String::new();
    for &ti in &plan.audio {
        let t = &spec.tracks[ti];
        // A timestamp gap or overlap of 20 ms or more becomes silence or is cut (min_hard_comp);
        // first_pts=0 also pads a late start from the recording start. Smaller steps are left
        // alone (async=1: no soft stretching): FFmpeg 5.1's soft compensation combined with
        // first_pts restarts the output timestamps at 0 after a gap of a few ms, which live
        // tracks have whenever a sender report re-anchors their clock.
        let mut chain =
            format!("[{ti}:a]aresample=async=1:min_hard_comp=0.02:first_pts=0,{fmt}");
        let muted = intersect(
            &hidden(spec, t),
            &[Interval::new(0, spec.duration_us)],
        );
        if !muted.is_empty() {
            chain.push_str(&format!(",volume=0:{}", enable_expr(&muted)));
        }
        chain.push_str(&format!("[a{ti}]"));
        chains.push(chain);
        mix_in.push_str(&format!("[a{ti}]"));
    }
    let mut tail = if plan.audio.is_empty() {
        format!("anullsrc=r={SAMPLE_RATE}:cl=stereo")
    } else {
        // normalize=0: a participant is as loud in the mix as in the call, whoever else talks.
        format!(
            "{mix_in}amix=inputs={}:duration=longest:dropout_transition=0:normalize=0",
            plan.audio.len()
        )
    };
    tail.push_str(&format!(",apad=whole_dur={dur},atrim=duration={dur}"));
    if !spec.paused.is_empty() {
        tail.push_str(&format!(
            ",volume=0:{}",
            enable_expr(&merge(spec.paused.clone()))
        ));
    }
    tail.push_str(&format!(",{fmt}[aout]"));
    chains.push(tail);
    chains.join(";\n")
}

// ---------------------------------------------------------------------------------------
// Rendering.

struct SegmentDecoder {
    input: ff::format::context::Input,
    stream: usize,
    time_base: ff::Rational,
    decoder: ff::decoder::Opened,
    eof_sent: bool,
}

/// Decodes one track's segments in order into frames with pts in the graph's time base.
struct TrackReader {
    track: usize,
    kind: MediaKind,
    codec: Codec,
    segments: VecDeque<PathBuf>,
    current: Option<SegmentDecoder>,
    queue: VecDeque<ff::Frame>,
    ended: bool,
    errors: u64,
    /// Graph time base denominator: 1000 for video, the sample rate for audio.
    tb_den: i64,
    last_pts: Option<i64>,
    /// End of the last pushed frame (audio) or last pushed pts (video), in µs.
    pushed_until_us: Option<i64>,
    last_video: Option<ff::Frame>,
    closed: bool,
}

fn open_segment(path: &Path, codec: Codec) -> Result<SegmentDecoder, TranscodeError> {
    let input = ff::format::input(path).map_err(TranscodeError::ff(format!(
        "opening segment {}",
        path.display()
    )))?;
    let stream = input
        .streams()
        .best(match codec.kind() {
            MediaKind::Audio => ff::media::Type::Audio,
            MediaKind::Video => ff::media::Type::Video,
        })
        .ok_or_else(|| {
            TranscodeError::Unsupported(format!(
                "segment {} has no {} stream",
                path.display(),
                codec
            ))
        })?;
    let index = stream.index();
    let time_base = stream.time_base();
    let mut ctx = ff::codec::Context::from_parameters(stream.parameters())
        .map_err(TranscodeError::ff("decoder parameters"))?;
    unsafe {
        (*ctx.as_mut_ptr()).pkt_timebase = time_base.into();
        (*ctx.as_mut_ptr()).thread_count = 0;
    }
    let dec = ctx.decoder();
    let found = if codec == Codec::Av1 {
        // The native AV1 decoder needs a hardware accelerator; libdav1d is the software one.
        ff::decoder::find_by_name("libdav1d").or_else(|| ff::decoder::find_by_name("libaom-av1"))
    } else {
        ff::decoder::find(codec.ff_id().into())
    };
    let found = found
        .ok_or_else(|| TranscodeError::Unsupported(format!("no {codec} decoder in this FFmpeg")))?;
    let decoder = dec.open_as(found).map_err(TranscodeError::ff(format!(
        "opening {codec} decoder for {}",
        path.display()
    )))?;
    Ok(SegmentDecoder {
        input,
        stream: index,
        time_base,
        decoder,
        eof_sent: false,
    })
}

impl TrackReader {
    fn new(track: usize, t: &CompositeTrack) -> Self {
        TrackReader {
            track,
            kind: t.kind,
            codec: t.codec,
            segments: t.segments.iter().cloned().collect(),
            current: None,
            queue: VecDeque::new(),
            ended: false,
            errors: 0,
            tb_den: if t.kind == MediaKind::Video {
                1000
            } else {
                SAMPLE_RATE as i64
            },
            last_pts: None,
            pushed_until_us: None,
            last_video: None,
            closed: false,
        }
    }

    fn label(&self) -> String {
        format!(
            "{}:{}",
            self.track,
            if self.kind == MediaKind::Video {
                "v"
            } else {
                "a"
            }
        )
    }

    fn to_us(&self, pts: i64) -> i64 {
        pts * 1_000_000 / self.tb_den
    }

    fn next_us(&mut self) -> Result<Option<i64>, TranscodeError> {
        self.fill()?;
        Ok(self
            .queue
            .front()
            .and_then(|f| f.pts())
            .map(|p| self.to_us(p)))
    }

    fn fill(&mut self) -> Result<(), TranscodeError> {
        while self.queue.is_empty() && !self.ended {
            if self.current.is_none() {
                let Some(path) = self.segments.pop_front() else {
                    self.ended = true;
                    break;
                };
                match open_segment(&path, self.codec) {
                    Ok(d) => self.current = Some(d),
                    Err(e) => {
                        self.errors += 1;
                        tracing::warn!(error = %e, "segment skipped");
                    }
                }
                continue;
            }
            let seg = self.current.as_mut().unwrap();
            let mut frame = unsafe { ff::Frame::empty() };
            match seg.decoder.receive_frame(&mut frame) {
                Ok(()) => {
                    let tb = seg.time_base;
                    self.accept(frame, tb);
                    continue;
                }
                Err(ff::Error::Eof) => {
                    self.current = None;
                    continue;
                }
                Err(ff::Error::Other { errno }) if errno == ffi::EAGAIN => {}
                Err(e) => {
                    self.errors += 1;
                    tracing::warn!(error = %e, track = self.track, "decode error");
                    if seg.eof_sent {
                        self.current = None;
                    }
                    continue;
                }
            }
            if seg.eof_sent {
                self.current = None;
                continue;
            }
            loop {
                let mut pkt = ff::Packet::empty();
                match pkt.read(&mut seg.input) {
                    Ok(()) => {
                        if pkt.stream() != seg.stream {
                            continue;
                        }
                        if let Err(e) = seg.decoder.send_packet(&pkt) {
                            self.errors += 1;
                            tracing::debug!(error = %e, track = self.track, "packet not decodable");
                        }
                        break;
                    }
                    Err(ff::Error::Eof) => {
                        let _ = seg.decoder.send_eof();
                        seg.eof_sent = true;
                        break;
                    }
                    Err(e) => {
                        self.errors += 1;
                        tracing::warn!(error = %e, track = self.track, "demux error; rest of segment skipped");
                        let _ = seg.decoder.send_eof();
                        seg.eof_sent = true;
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    fn accept(&mut self, mut frame: ff::Frame, tb: ff::Rational) {
        let ts = frame.timestamp().or(frame.pts());
        let pts = match ts {
            Some(p) => unsafe {
                ffi::av_rescale_q(
                    p,
                    tb.into(),
                    ffi::AVRational {
                        num: 1,
                        den: self.tb_den as i32,
                    },
                )
            },
            None => self.last_pts.map_or(0, |l| l + 1),
        };
        if let Some(last) = self.last_pts {
            if pts <= last {
                // Decoders can repeat a timestamp across a segment boundary; the graph wants
                // strictly increasing pts, and a duplicate adds nothing.
                return;
            }
        }
        self.last_pts = Some(pts);
        frame.set_pts(Some(pts));
        self.queue.push_back(frame);
    }
}

/// A new reference to the same frame data (no copy).
fn frame_ref(f: &ff::Frame) -> ff::Frame {
    unsafe {
        let p = ffi::av_frame_clone(f.as_ptr());
        assert!(!p.is_null(), "out of memory");
        ff::Frame::wrap(p)
    }
}

fn nb_samples(f: &ff::Frame) -> i64 {
    unsafe { (*f.as_ptr()).nb_samples as i64 }
}

struct Graph {
    graph: ff::filter::Graph,
}

fn buffer_args(frame: &ff::Frame, kind: MediaKind) -> String {
    unsafe {
        let p = frame.as_ptr();
        match kind {
            MediaKind::Video => format!(
                "video_size={}x{}:pix_fmt={}:time_base=1/1000:pixel_aspect=1/1",
                (*p).width,
                (*p).height,
                (*p).format
            ),
            MediaKind::Audio => {
                let mut buf = [0 as std::ffi::c_char; 64];
                ffi::av_channel_layout_describe(&(*p).ch_layout, buf.as_mut_ptr(), buf.len());
                let layout = std::ffi::CStr::from_ptr(buf.as_ptr())
                    .to_string_lossy()
                    .into_owned();
                let fmt =
                    std::ffi::CStr::from_ptr(ffi::av_get_sample_fmt_name(std::mem::transmute::<
                        i32,
                        ffi::AVSampleFormat,
                    >(
                        (*p).format
                    )))
                    .to_string_lossy()
                    .into_owned();
                format!(
                    "time_base=1/{}:sample_rate={}:sample_fmt={fmt}:channel_layout={layout}",
                    (*p).sample_rate,
                    (*p).sample_rate
                )
            }
        }
    }
}

/// Parses `text` into `graph`, connecting labelled inputs to `sources` and outputs to `sinks`
/// by name. (ffmpeg-next's own parser helper only links up to two of each.)
unsafe fn parse_linked(
    graph: &mut ff::filter::Graph,
    text: &str,
    sources: &[String],
    sinks: &[String],
) -> Result<(), TranscodeError> {
    unsafe fn list(graph: &mut ff::filter::Graph, names: &[String]) -> *mut ffi::AVFilterInOut {
        let mut head: *mut ffi::AVFilterInOut = std::ptr::null_mut();
        for name in names.iter().rev() {
            let mut ctx = graph.get(name).expect("filter added above");
            let io = ffi::avfilter_inout_alloc();
            assert!(!io.is_null(), "out of memory");
            let c = CString::new(name.as_str()).unwrap();
            (*io).name = ffi::av_strdup(c.as_ptr());
            (*io).filter_ctx = ctx.as_mut_ptr();
            (*io).pad_idx = 0;
            (*io).next = head;
            head = io;
        }
        head
    }
    let mut outputs = list(graph, sources);
    let mut inputs = list(graph, sinks);
    let c = CString::new(text)
        .map_err(|_| TranscodeError::InvalidSpec("NUL in filter graph".into()))?;
    let r = ffi::avfilter_graph_parse_ptr(
        graph.as_mut_ptr(),
        c.as_ptr(),
        &mut inputs,
        &mut outputs,
        std::ptr::null_mut(),
    );
    ffi::avfilter_inout_free(&mut inputs);
    ffi::avfilter_inout_free(&mut outputs);
    if r < 0 {
        return Err(TranscodeError::Ffmpeg {
            context: "parsing the composite filter graph".into(),
            source: ff::Error::from(r),
        });
    }
    Ok(())
}

/// Pulls every frame the sink `label` has ready and hands it to `take`. Returns whether any frame
/// came and whether the sink reached its end.
fn drain_sink(
    graph: &mut ff::filter::Graph,
    label: &str,
    what: &str,
    take: &mut dyn FnMut(ff::Frame, ff::Rational) -> Result<(), TranscodeError>,
) -> Result<(bool, bool), TranscodeError> {
    let mut sink = graph.get(label).expect("the graph has its output sinks");
    let tb = sink.sink().time_base();
    let mut progressed = false;
    loop {
        let mut f = unsafe { ff::Frame::empty() };
        match sink.sink().frame(&mut f) {
            Ok(()) => {
                progressed = true;
                take(f, tb)?;
            }
            Err(ff::Error::Eof) => return Ok((progressed, true)),
            Err(e) if is_eagain(&e) => return Ok((progressed, false)),
            Err(e) => {
                return Err(TranscodeError::Ffmpeg { context: format!("pulling composite {what}"), source: e })
            }
        }
    }
}

/// Reports the share of the output done, in steps of at least 1 %.
fn report_progress(
    f: &ff::Frame,
    tb: ff::Rational,
    spec: &CompositeSpec,
    last: &mut f64,
    progress: &mut dyn FnMut(f64),
) {
    if let Some(p) = f.pts() {
        let frac = (p.rescale(tb, ff::Rational::new(1, 1_000_000)) as f64 / spec.duration_us as f64).clamp(0.0, 1.0);
        if frac - *last >= 0.01 {
            *last = frac;
            progress(frac);
        }
    }
}

fn is_eagain(e: &ff::Error) -> bool {
    matches!(e, ff::Error::Other { errno } if *errno == ffi::EAGAIN)
}

struct Output {
    octx: ff::format::context::Output,
    video: Option<(ff::encoder::Video, usize, ff::Rational)>,
    audio: (ff::encoder::Audio, usize, ff::Rational),
    frames: u64,
    samples: u64,
    last_video_pts: i64,
}

impl Output {
    fn open(spec: &CompositeSpec, out: &Path, has_video: bool) -> Result<Self, TranscodeError> {
        let muxer = if has_video { "mp4" } else { "ipod" };
        let mut octx = ff::format::output_as(out, muxer)
            .map_err(TranscodeError::ff(format!("creating {}", out.display())))?;
        let global = octx
            .format()
            .flags()
            .contains(ff::format::Flags::GLOBAL_HEADER);
        let video = if has_video {
            let codec = ff::encoder::find_by_name("libx264")
                .ok_or_else(|| TranscodeError::Unsupported("FFmpeg has no libx264".into()))?;
            let mut enc = ff::codec::Context::new_with_codec(codec)
                .encoder()
                .video()
                .map_err(TranscodeError::ff("x264 context"))?;
            enc.set_width(spec.width);
            enc.set_height(spec.height);
            enc.set_format(ff::format::Pixel::YUV420P);
            enc.set_time_base(ff::Rational::new(1, spec.fps as i32));
            enc.set_frame_rate(Some(ff::Rational::new(spec.fps as i32, 1)));
            enc.set_gop(spec.fps * 2);
            if global {
                enc.set_flags(ff::codec::Flags::GLOBAL_HEADER);
            }
            // libavcodec defaults to one thread; the CLI uses all cores, and so do we.
            unsafe {
                (*enc.as_mut_ptr()).thread_count = 0;
            }
            let mut opts = ff::Dictionary::new();
            opts.set("preset", "veryfast");
            match spec.video_bitrate {
                Some(b) => enc.set_bit_rate(b as usize),
                None => opts.set("crf", "23"),
            }
            let enc = enc
                .open_with(opts)
                .map_err(TranscodeError::ff("opening libx264"))?;
            let mut st = octx
                .add_stream(codec)
                .map_err(TranscodeError::ff("adding video stream"))?;
            st.set_parameters(&enc);
            st.set_time_base(ff::Rational::new(1, spec.fps as i32));
            let idx = st.index();
            Some((enc, idx, ff::Rational::new(1, spec.fps as i32)))
        } else {
            None
        };
        let codec = ff::encoder::find_by_name("aac")
            .ok_or_else(|| TranscodeError::Unsupported("FFmpeg has no aac encoder".into()))?;
        let mut enc = ff::codec::Context::new_with_codec(codec)
            .encoder()
            .audio()
            .map_err(TranscodeError::ff("aac context"))?;
        enc.set_rate(SAMPLE_RATE);
        enc.set_format(ff::format::Sample::F32(ff::format::sample::Type::Planar));
        unsafe {
            ffi::av_channel_layout_default(&mut (*enc.as_mut_ptr()).ch_layout, 2);
        }
        enc.set_time_base(ff::Rational::new(1, SAMPLE_RATE));
        enc.set_bit_rate(spec.audio_bitrate as usize);
        if global {
            enc.set_flags(ff::codec::Flags::GLOBAL_HEADER);
        }
        let enc = enc
            .open()
            .map_err(TranscodeError::ff("opening the aac encoder"))?;
        let mut st = octx
            .add_stream(codec)
            .map_err(TranscodeError::ff("adding audio stream"))?;
        st.set_parameters(&enc);
        st.set_time_base(ff::Rational::new(1, SAMPLE_RATE));
        let aidx = st.index();
        let mut opts = ff::Dictionary::new();
        opts.set("movflags", "+faststart");
        octx.write_header_with(opts)
            .map_err(TranscodeError::ff(format!(
                "writing header of {}",
                out.display()
            )))?;
        Ok(Output {
            octx,
            video,
            audio: (enc, aidx, ff::Rational::new(1, SAMPLE_RATE)),
            frames: 0,
            samples: 0,
            last_video_pts: -1,
        })
    }

    fn drain_video(&mut self) -> Result<(), TranscodeError> {
        let Some((enc, idx, tb)) = self.video.as_mut() else {
            return Ok(());
        };
        let mut pkt = ff::Packet::empty();
        while enc.receive_packet(&mut pkt).is_ok() {
            pkt.set_stream(*idx);
            let st_tb = self.octx.stream(*idx).unwrap().time_base();
            pkt.rescale_ts(*tb, st_tb);
            pkt.write_interleaved(&mut self.octx)
                .map_err(TranscodeError::ff("writing video packet"))?;
        }
        Ok(())
    }

    fn drain_audio(&mut self) -> Result<(), TranscodeError> {
        let (enc, idx, tb) = &mut self.audio;
        let mut pkt = ff::Packet::empty();
        while enc.receive_packet(&mut pkt).is_ok() {
            pkt.set_stream(*idx);
            let st_tb = self.octx.stream(*idx).unwrap().time_base();
            pkt.rescale_ts(*tb, st_tb);
            pkt.write_interleaved(&mut self.octx)
                .map_err(TranscodeError::ff("writing audio packet"))?;
        }
        Ok(())
    }

    fn video_frame(
        &mut self,
        mut f: ff::Frame,
        sink_tb: ff::Rational,
    ) -> Result<(), TranscodeError> {
        let Some((enc, _, tb)) = self.video.as_mut() else {
            return Ok(());
        };
        let pts = f
            .pts()
            .map(|p| p.rescale(sink_tb, *tb))
            .unwrap_or(self.last_video_pts + 1);
        if pts <= self.last_video_pts {
            return Ok(());
        }
        self.last_video_pts = pts;
        f.set_pts(Some(pts));
        unsafe {
            (*f.as_mut_ptr()).pict_type = ffi::AVPictureType::AV_PICTURE_TYPE_NONE;
        }
        enc.send_frame(&f)
            .map_err(TranscodeError::ff("encoding video"))?;
        self.frames += 1;
        self.drain_video()
    }

    fn audio_frame(
        &mut self,
        mut f: ff::Frame,
        sink_tb: ff::Rational,
    ) -> Result<(), TranscodeError> {
        let (enc, _, tb) = &mut self.audio;
        let pts = f.pts().map(|p| p.rescale(sink_tb, *tb));
        f.set_pts(pts);
        enc.send_frame(&f)
            .map_err(TranscodeError::ff("encoding audio"))?;
        self.samples += nb_samples(&f) as u64;
        self.drain_audio()
    }

    fn finish(mut self) -> Result<(u64, u64), TranscodeError> {
        if let Some((enc, _, _)) = self.video.as_mut() {
            enc.send_eof()
                .map_err(TranscodeError::ff("flushing video"))?;
        }
        self.drain_video()?;
        self.audio
            .0
            .send_eof()
            .map_err(TranscodeError::ff("flushing audio"))?;
        self.drain_audio()?;
        self.octx
            .write_trailer()
            .map_err(TranscodeError::ff("writing trailer"))?;
        Ok((self.frames, self.samples))
    }
}

use ff::Rescale;

/// Renders the composite. `progress` gets the fraction done (0..1) now and then.
pub fn render(
    spec: &CompositeSpec,
    out: &Path,
    progress: &mut dyn FnMut(f64),
) -> Result<CompositeReport, TranscodeError> {
    crate::init();
    if spec.width < 16 || spec.height < 16 || spec.width % 2 == 1 || spec.height % 2 == 1 {
        return Err(TranscodeError::InvalidSpec(format!(
            "output size {}x{} must be even and at least 16x16",
            spec.width, spec.height
        )));
    }
    if spec.fps == 0 || spec.duration_us <= 0 {
        return Err(TranscodeError::InvalidSpec(format!(
            "fps {} and duration {} us must be positive",
            spec.fps, spec.duration_us
        )));
    }
    if spec.tracks.iter().any(|t| t.kind != t.codec.kind()) {
        return Err(TranscodeError::InvalidSpec(
            "a track's kind does not match its codec".into(),
        ));
    }
    let _span = tracing::info_span!("composite", out = %out.display()).entered();
    let plan = plan(spec);
    let text = graph_text(spec, &plan);
    tracing::debug!(graph = %text, "composite filter graph");

    let mut readers: Vec<TrackReader> = plan
        .video
        .iter()
        .map(|(ti, _)| *ti)
        .chain(plan.audio.iter().copied())
        .map(|ti| TrackReader::new(ti, &spec.tracks[ti]))
        .collect();

    let mut g = Graph {
        graph: ff::filter::Graph::new(),
    };
    let mut sources = Vec::new();
    for r in readers.iter_mut() {
        r.fill()?;
        let args = match r.queue.front() {
            Some(f) => buffer_args(f, r.kind),
            None if r.kind == MediaKind::Video => "video_size=16x16:pix_fmt=0:time_base=1/1000:pixel_aspect=1/1".into(),
            None => format!("time_base=1/{SAMPLE_RATE}:sample_rate={SAMPLE_RATE}:sample_fmt=fltp:channel_layout=stereo"),
        };
        if r.kind == MediaKind::Audio {
            if let Some(f) = r.queue.front() {
                r.tb_den = unsafe { (*f.as_ptr()).sample_rate } as i64;
            }
        }
        let filter = ff::filter::find(if r.kind == MediaKind::Video {
            "buffer"
        } else {
            "abuffer"
        })
        .unwrap();
        g.graph
            .add(&filter, &r.label(), &args)
            .map_err(TranscodeError::ff(format!(
                "creating source {} ({args})",
                r.label()
            )))?;
        sources.push(r.label());
    }
    let mut sinks = Vec::new();
    if plan.has_video {
        g.graph
            .add(&ff::filter::find("buffersink").unwrap(), "vout", "")
            .map_err(TranscodeError::ff("creating video sink"))?;
        sinks.push("vout".to_string());
    }
    g.graph
        .add(&ff::filter::find("abuffersink").unwrap(), "aout", "")
        .map_err(TranscodeError::ff("creating audio sink"))?;
    sinks.push("aout".to_string());
    unsafe { parse_linked(&mut g.graph, &text, &sources, &sinks)? };
    g.graph
        .validate()
        .map_err(TranscodeError::ff("configuring the composite filter graph"))?;
    let output = Output::open(spec, out, plan.has_video)?;
    let mut output = output;
    let aac_frame = output.audio.0.frame_size().max(1024);
    g.graph
        .get("aout")
        .unwrap()
        .sink()
        .set_frame_size(aac_frame);

    let mut v_eof = !plan.has_video;
    let mut a_eof = false;
    let mut last_progress = -1.0;
    let mut stalls = 0u32;
    loop {
        // Feed the source whose next frame is earliest.
        let mut best: Option<(usize, i64)> = None;
        for (i, r) in readers.iter_mut().enumerate() {
            if r.closed {
                continue;
            }
            match r.next_us()? {
                Some(t) => {
                    if best.is_none_or(|(_, bt)| t < bt) {
                        best = Some((i, t));
                    }
                }
                None => {
                    let label = r.label();
                    let mut ctx = g.graph.get(&label).unwrap();
                    ctx.source()
                        .flush()
                        .map_err(TranscodeError::ff(format!("closing source {label}")))?;
                    r.closed = true;
                }
            }
        }
        if let Some((i, t)) = best {
            heartbeat(&mut readers, &mut g.graph, i, t)?;
            let r = &mut readers[i];
            let frame = r.queue.pop_front().unwrap();
            let label = r.label();
            let end_us = if r.kind == MediaKind::Audio {
                r.to_us(frame.pts().unwrap() + nb_samples(&frame))
            } else {
                t
            };
            if r.kind == MediaKind::Video {
                r.last_video = Some(frame_ref(&frame));
            }
            r.pushed_until_us = Some(end_us);
            let mut ctx = g.graph.get(&label).unwrap();
            if let Err(e) = ctx.source().add(&frame) {
                if e != ff::Error::Eof {
                    r.errors += 1;
                    tracing::debug!(error = %e, source = %label, "frame refused by the graph");
                }
            }
        }

        let mut progressed = false;
        if !v_eof {
            let (got, eof) = drain_sink(&mut g.graph, "vout", "video", &mut |f, tb| {
                report_progress(&f, tb, spec, &mut last_progress, progress);
                output.video_frame(f, tb)
            })?;
            progressed |= got;
            v_eof = eof;
        }
        if !a_eof {
            let (got, eof) = drain_sink(&mut g.graph, "aout", "audio", &mut |f, tb| {
                // Video drives the progress bar when there is any.
                if !plan.has_video {
                    report_progress(&f, tb, spec, &mut last_progress, progress);
                }
                output.audio_frame(f, tb)
            })?;
            progressed |= got;
            a_eof = eof;
        }
        if v_eof && a_eof {
            break;
        }
        if best.is_none() && readers.iter().all(|r| r.closed) && !progressed {
            // Every source is closed, so the graph cannot be waiting for input; give the
            // self-timed sources a few more pulls before declaring it stuck.
            stalls += 1;
            if stalls > 1000 {
                return Err(TranscodeError::Unsupported(
                    "composite filter graph stalled with all inputs closed".into(),
                ));
            }
        }
    }
    let (frames, samples) = output.finish()?;
    progress(1.0);
    let video_us = frames as i64 * 1_000_000 / spec.fps as i64;
    let audio_us = samples as i64 * 1_000_000 / SAMPLE_RATE as i64;
    let report = CompositeReport {
        path: out.to_path_buf(),
        duration_us: video_us.max(audio_us),
        has_video: plan.has_video,
        frames,
        audio_samples: samples,
        decode_errors: readers.iter().map(|r| r.errors).sum(),
        tracks_used: readers.iter().map(|r| r.track).collect(),
    };
    tracing::info!(
        frames,
        samples,
        decode_errors = report.decode_errors,
        "composite written"
    );
    Ok(report)
}

/// Keeps every source within [`HEARTBEAT_US`] of the merge point `t`: a track with nothing to
/// say right now (not started yet, muted, between segments) gets a stand-in frame just before
/// `t`, so overlay and amix can move on instead of queueing every other track's frames. The
/// stand-ins are never seen or heard: video overlays are disabled outside the track's visible
/// spans, and audio stand-ins are silence.
fn heartbeat(
    readers: &mut [TrackReader],
    graph: &mut ff::filter::Graph,
    picked: usize,
    t: i64,
) -> Result<(), TranscodeError> {
    for (j, r) in readers.iter_mut().enumerate() {
        if j == picked || r.closed {
            continue;
        }
        let behind = r.pushed_until_us.is_none_or(|u| u < t - HEARTBEAT_US);
        if !behind {
            continue;
        }
        let label = r.label();
        let stand_in = match r.kind {
            MediaKind::Video => {
                let Some(src) = r.last_video.as_ref().or(r.queue.front()).map(frame_ref) else {
                    continue;
                };
                let mut f = src;
                // After everything pushed so far (that is at least 1 s back) and before the
                // track's next real frame (which is at or after `t`, the merge point).
                let pts = t * r.tb_den / 1_000_000 - 1;
                f.set_pts(Some(pts));
                r.pushed_until_us = Some(t - 1000);
                f
            }
            MediaKind::Audio => {
                let Some(tmpl) = r.queue.front() else {
                    continue;
                };
                let n = 480;
                let (fmt, layout) = unsafe {
                    let p = tmpl.as_ptr();
                    ((*p).format, &(*p).ch_layout as *const ffi::AVChannelLayout)
                };
                let mut f = unsafe { ff::Frame::empty() };
                unsafe {
                    let p = f.as_mut_ptr();
                    (*p).format = fmt;
                    (*p).nb_samples = n;
                    (*p).sample_rate = r.tb_den as i32;
                    ffi::av_channel_layout_copy(&mut (*p).ch_layout, layout);
                    if ffi::av_frame_get_buffer(p, 0) < 0 {
                        continue;
                    }
                    ffi::av_samples_set_silence(
                        (*p).extended_data,
                        0,
                        n,
                        (*p).ch_layout.nb_channels,
                        std::mem::transmute::<i32, ffi::AVSampleFormat>(fmt),
                    );
                }
                let pts = t * r.tb_den / 1_000_000 - n as i64;
                if r.pushed_until_us.is_some_and(|u| r.to_us(pts) < u) {
                    continue;
                }
                f.set_pts(Some(pts));
                r.pushed_until_us = Some(r.to_us(pts + n as i64));
                f
            }
        };
        let mut ctx = graph.get(&label).unwrap();
        if let Err(e) = ctx.source().add(&stand_in) {
            tracing::debug!(error = %e, source = %label, "stand-in frame refused");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interval_algebra() {
        let a = [Interval::new(0, 10)];
        let b = [Interval::new(2, 4), Interval::new(6, 8)];
        assert_eq!(
            subtract(&a, &b),
            vec![
                Interval::new(0, 2),
                Interval::new(4, 6),
                Interval::new(8, 10)
            ]
        );
        assert_eq!(intersect(&a, &b), b.to_vec());
        assert_eq!(
            merge(vec![Interval::new(5, 7), Interval::new(0, 5)]),
            vec![Interval::new(0, 7)]
        );
    }

    #[test]
    fn escaping_survives_both_levels() {
        assert_eq!(escape_value("a:b"), "a\\\\:b");
        assert_eq!(escape_value("O'Neil, [x]"), "O\\\\\\'Neil\\, \\[x\\]");
    }

    #[test]
    fn spans_near_the_end_of_the_clock_do_not_overflow() {
        // Seen while writing the manifest fuzz target and confirmed with it: a manifest whose
        // call ends past 4.6e18 µs, with a presence after that point, overflowed the midpoint of
        // an epoch (a panic in debug builds, a misplaced layout in release ones).
        let mut spec = CompositeSpec::new(9_000_000_000_000_000_000);
        spec.participants.push(CompositeParticipant {
            id: "a".into(),
            display_name: "A".into(),
            present: vec![Interval::new(8_000_000_000_000_000_000, 9_000_000_000_000_000_000)],
            not_recorded: vec![],
        });
        spec.tracks.push(CompositeTrack {
            participant_id: "a".into(),
            kind: MediaKind::Video,
            source: TrackSource::Camera,
            codec: Codec::Vp8,
            segments: vec!["/nonexistent.webm".into()],
            muted: vec![],
        });
        let g = filtergraph(&spec);
        assert!(g.contains("[vout]") && g.contains("[aout]"));
        assert_eq!(midpoint(i64::MAX - 1, i64::MAX), i64::MAX - 1);
    }

    #[test]
    fn graph_for_audio_only_has_no_video_chain() {
        let mut spec = CompositeSpec::new(5_000_000);
        spec.tracks.push(CompositeTrack {
            participant_id: "a".into(),
            kind: MediaKind::Audio,
            source: TrackSource::Microphone,
            codec: Codec::Opus,
            segments: vec!["/nonexistent.webm".into()],
            muted: vec![],
        });
        let g = filtergraph(&spec);
        assert!(!g.contains("vout"));
        assert!(g.contains("[0:a]aresample"));
        assert!(g.contains("[aout]"));
    }
}
