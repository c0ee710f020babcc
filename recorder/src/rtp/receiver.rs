//! [`TrackReceiver`]: the whole receive path of one remote track as a state machine. RTP packets
//! and Sender Reports go in with the caller's `now`; whole frames on the recording clock and
//! keyframe requests come out of [`TrackReceiver::poll_output`]. It never blocks, sleeps or
//! reads a clock: the caller drives time through `now_us` and [`TrackReceiver::poll_timeout`].

use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;
use transcoder::{Codec, EncodedFrame, MediaKind};

use super::clock::{NtpOffset, SenderReportTiming, TrackClock};
use super::depack::{Depacketizer, PacketInfo};
use super::reorder::{HeldPacket, PushOutcome, ReorderBuffer, Released};
use super::unwrap::{SeqUnwrapper, TimestampUnwrapper};

/// Settings of one track's receive path.
#[derive(Debug, Clone)]
pub struct ReceiverConfig {
    pub codec: Codec,
    /// RTP clock rate: 48 000 for Opus, 90 000 for video (what the SDP says).
    pub clock_rate: u32,
    /// How long a missing packet is waited for before it is declared lost.
    pub max_delay: Duration,
    /// At most this many packets are held; past it the oldest gap is given up at once.
    pub max_packets: usize,
    /// At most one keyframe request per this interval.
    pub keyframe_request_interval: Duration,
    /// After a loss, drop video frames until the next keyframe instead of recording frames that
    /// reference a picture the decoder never got (which shows as smeared garbage).
    pub drop_until_keyframe_after_loss: bool,
    /// Frames are held from the first packet until the track's first Sender Report, at most this
    /// long, so even the first second of a call is placed on the sender's clock (lip sync) rather
    /// than on the arrival of each track's first packet, which can be 100 ms apart between audio
    /// and video. Without a report by then they go out timed by arrival. Zero: no holding.
    pub sender_report_wait: Duration,
    /// Holding stops early (frames go out timed by arrival) past this many payload bytes.
    pub max_held_bytes: usize,
}

/// How long a new track's frames wait for its first Sender Report by default.
pub const SENDER_REPORT_WAIT: Duration = Duration::from_secs(6);

impl ReceiverConfig {
    /// Defaults: the codec's standard clock rate, 200 ms / 512 packets of reordering, one
    /// keyframe request per 500 ms, drop until keyframe after a loss, frames held up to 6 s /
    /// 16 MiB for the first Sender Report (a LiveKit SFU sends them every 3 s, and only once the
    /// publisher's own first report has reached it).
    pub fn new(codec: Codec) -> Self {
        Self {
            codec,
            clock_rate: match codec {
                Codec::Opus => 48_000,
                _ => 90_000,
            },
            max_delay: Duration::from_millis(200),
            max_packets: 512,
            keyframe_request_interval: Duration::from_millis(500),
            drop_until_keyframe_after_loss: true,
            sender_report_wait: SENDER_REPORT_WAIT,
            max_held_bytes: 16 << 20,
        }
    }
}

/// Why a frame was not emitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DropReason {
    /// Packets of it were lost (or it was cut by the reorder bound).
    Incomplete(&'static str),
    /// Its packets were all there but do not form a valid frame.
    Malformed(String),
}

/// What the receiver asks its caller to do.
#[derive(Debug, Clone)]
pub enum ReceiverOutput {
    /// A whole frame, on the recording clock, for the track's segment writer.
    Frame(EncodedFrame),
    /// Ask the sender for a keyframe: send an RTCP PLI for this track's SSRC.
    NeedKeyframe,
    /// A frame was dropped (already counted in the stats).
    FrameDropped { rtp_timestamp: u32, reason: DropReason },
}

/// Counters of one track, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReceiverStats {
    /// Every packet handed in, duplicates and malformed ones included.
    pub packets_received: u64,
    /// RTP payload bytes of those packets.
    pub payload_bytes: u64,
    pub duplicates: u64,
    /// Arrived after its sequence number was released or given up on.
    pub late: u64,
    /// Padding-only packets (no payload).
    pub padding: u64,
    /// Sequence numbers never received within the reorder bound.
    pub lost: u64,
    pub malformed_packets: u64,
    pub frames_emitted: u64,
    pub keyframes_emitted: u64,
    pub frames_dropped_incomplete: u64,
    /// Complete frames whose payloads did not assemble.
    pub frames_dropped_malformed: u64,
    /// Video delta frames dropped while waiting for a keyframe (at the start or after a loss).
    pub frames_dropped_waiting_keyframe: u64,
    pub keyframe_requests: u64,
    /// Frames whose timestamp was moved forward to keep the output strictly increasing.
    pub pts_clamped: u64,
    /// Frames placed off their mapping while converging onto a moved one (a new Sender Report).
    pub pts_slewed: u64,
    /// Frames held at the start until the first Sender Report (or the wait's end).
    pub frames_held_for_sender_report: u64,
    /// 1 when the track's first frames went out timed by arrival: no Sender Report came within
    /// the wait (or the hold grew past its byte bound).
    pub sender_report_wait_expired: u64,
}

/// A packet that breaks its payload format. It is counted, and its frame will be dropped.
#[derive(Debug, Clone, thiserror::Error)]
#[error("malformed {codec} RTP packet (seq {seq}, ts {rtp_timestamp}): {reason}; its frame will be dropped")]
pub struct MalformedPacket {
    pub codec: Codec,
    pub seq: u16,
    pub rtp_timestamp: u32,
    pub reason: String,
}

#[derive(Debug)]
pub struct TrackReceiver {
    cfg: ReceiverConfig,
    depack: Depacketizer,
    seqs: SeqUnwrapper,
    timestamps: TimestampUnwrapper,
    reorder: ReorderBuffer,
    clock: TrackClock,
    started: bool,
    /// Video: delta frames are useless until the next keyframe.
    awaiting_keyframe: bool,
    /// A keyframe request is outstanding (repeated each interval until a keyframe comes).
    want_keyframe: bool,
    last_request_us: Option<i64>,
    outputs: VecDeque<ReceiverOutput>,
    stats: ReceiverStats,
    released: Vec<Released>,
    /// Frames waiting for the first Sender Report: (extended RTP timestamp, data, keyframe).
    held: Vec<(i64, Bytes, bool)>,
    held_bytes: usize,
    /// Until when frames are held (set by the first packet; `None` once released).
    hold_until_us: Option<i64>,
}

impl TrackReceiver {
    pub fn new(cfg: ReceiverConfig) -> Self {
        Self {
            depack: Depacketizer::new(cfg.codec),
            seqs: SeqUnwrapper::default(),
            timestamps: TimestampUnwrapper::default(),
            reorder: ReorderBuffer::new(cfg.max_delay.as_micros() as i64, cfg.max_packets),
            clock: TrackClock::new(cfg.clock_rate),
            started: false,
            awaiting_keyframe: false,
            want_keyframe: false,
            last_request_us: None,
            outputs: VecDeque::new(),
            stats: ReceiverStats::default(),
            released: Vec::new(),
            held: Vec::new(),
            held_bytes: 0,
            hold_until_us: None,
            cfg,
        }
    }

    pub fn config(&self) -> &ReceiverConfig {
        &self.cfg
    }

    fn is_video(&self) -> bool {
        self.cfg.codec.kind() == MediaKind::Video
    }

    /// Takes one RTP packet of this track, received at `now_us` on the recording clock.
    /// A malformed payload is reported (and counted) but never stops the track.
    pub fn handle_rtp(&mut self, now_us: i64, packet: rtc_rtp::Packet) -> Result<(), MalformedPacket> {
        self.stats.packets_received += 1;
        self.stats.payload_bytes += packet.payload.len() as u64;
        let h = &packet.header;
        let seq = self.seqs.unwrap(h.sequence_number);
        let ts = self.timestamps.unwrap(h.timestamp);
        if !self.started {
            self.started = true;
            self.clock.on_first_packet(ts, now_us);
            if !self.clock.has_sender_report() && !self.cfg.sender_report_wait.is_zero() {
                self.hold_until_us = Some(now_us + self.cfg.sender_report_wait.as_micros() as i64);
            }
            if self.is_video() {
                self.awaiting_keyframe = true;
                self.want_keyframe = true;
            }
        }
        let mut result = Ok(());
        let info = if packet.payload.is_empty() {
            self.stats.padding += 1;
            Some(PacketInfo { starts_frame: None })
        } else {
            match self.depack.inspect(&packet.payload) {
                Ok(info) => Some(info),
                Err(reason) => {
                    self.stats.malformed_packets += 1;
                    result = Err(MalformedPacket {
                        codec: self.cfg.codec,
                        seq: h.sequence_number,
                        rtp_timestamp: h.timestamp,
                        reason,
                    });
                    None
                }
            }
        };
        let held = HeldPacket { ts, marker: h.marker, payload: packet.payload, info, arrival_us: now_us };
        match self.reorder.push(seq, held) {
            PushOutcome::Held => {}
            PushOutcome::Duplicate => self.stats.duplicates += 1,
            PushOutcome::Late => self.stats.late += 1,
        }
        self.process(now_us);
        result
    }

    /// Takes the timing of a Sender Report for this track's SSRC. `offset` is the participant's
    /// NTP→recording offset (see [`super::ParticipantClock`]).
    /// Frames held for it go out now, on the sender's clock.
    pub fn handle_sender_report(&mut self, sr: SenderReportTiming, offset: NtpOffset) {
        self.clock.on_sender_report(sr, offset);
        self.release_held(false);
    }

    /// Asks for a keyframe (e.g. when the segment writer `wants_keyframe()`), rate-limited.
    pub fn request_keyframe(&mut self, now_us: i64) {
        if self.is_video() {
            self.want_keyframe = true;
            self.maybe_request(now_us);
        }
    }

    /// Lets time pass: releases what waited long enough, repeats an unanswered keyframe request.
    pub fn handle_timeout(&mut self, now_us: i64) {
        self.process(now_us);
    }

    /// When `handle_timeout` should be called next, if anything is pending.
    pub fn poll_timeout(&self) -> Option<i64> {
        let retry = match (self.want_keyframe, self.last_request_us) {
            (true, Some(t)) => Some(t + self.cfg.keyframe_request_interval.as_micros() as i64),
            _ => None,
        };
        [self.reorder.deadline(), retry, self.hold_until_us].into_iter().flatten().min()
    }

    pub fn poll_output(&mut self) -> Option<ReceiverOutput> {
        self.outputs.pop_front()
    }

    /// The track ended: releases every complete frame still held and drops the rest.
    pub fn flush(&mut self) {
        let mut released = std::mem::take(&mut self.released);
        self.reorder.flush(&mut released);
        self.handle_released(&mut released);
        self.released = released;
        self.release_held(true);
    }

    pub fn stats(&self) -> ReceiverStats {
        ReceiverStats { pts_clamped: self.clock.clamped(), pts_slewed: self.clock.slewed(), ..self.stats }
    }

    fn process(&mut self, now_us: i64) {
        let mut released = std::mem::take(&mut self.released);
        self.reorder.release(now_us, &mut released);
        self.handle_released(&mut released);
        self.released = released;
        if self.hold_until_us.is_some_and(|until| now_us >= until) {
            self.release_held(true);
        }
        self.maybe_request(now_us);
    }

    /// Ends the hold: every held frame goes out, mapped by the Sender Report if one came, else by
    /// arrival (`expired`).
    fn release_held(&mut self, expired: bool) {
        if self.hold_until_us.take().is_none() {
            return;
        }
        let held = std::mem::take(&mut self.held);
        self.held_bytes = 0;
        if expired && !self.clock.has_sender_report() {
            self.stats.sender_report_wait_expired = 1;
        }
        tracing::debug!(
            codec = %self.cfg.codec,
            frames = held.len(),
            on_sender_report = self.clock.has_sender_report(),
            "frames held for the first Sender Report released"
        );
        for (ts, data, keyframe) in held {
            self.place(ts, data, keyframe);
        }
    }

    fn handle_released(&mut self, released: &mut Vec<Released>) {
        for r in released.drain(..) {
            match r {
                Released::Lost { packets } => {
                    self.stats.lost += packets;
                    self.on_break();
                }
                Released::Incomplete { ts, reason, .. } => {
                    self.stats.frames_dropped_incomplete += 1;
                    self.dropped(ts, DropReason::Incomplete(reason));
                }
                Released::Frame { ts, payloads } => match self.depack.assemble(&payloads) {
                    Err(reason) => {
                        self.stats.frames_dropped_malformed += 1;
                        self.dropped(ts, DropReason::Malformed(reason));
                    }
                    Ok(None) => {}
                    Ok(Some(frame)) => self.emit(ts, frame.data, frame.keyframe),
                },
            }
        }
    }

    fn emit(&mut self, ts: i64, data: Bytes, keyframe: bool) {
        if self.is_video() {
            if self.awaiting_keyframe && !keyframe {
                self.stats.frames_dropped_waiting_keyframe += 1;
                return;
            }
            if keyframe {
                self.awaiting_keyframe = false;
                self.want_keyframe = false;
                self.stats.keyframes_emitted += 1;
            }
        }
        if self.hold_until_us.is_some() {
            self.stats.frames_held_for_sender_report += 1;
            self.held_bytes += data.len();
            self.held.push((ts, data, keyframe));
            if self.held_bytes > self.cfg.max_held_bytes {
                self.release_held(true);
            }
            return;
        }
        self.place(ts, data, keyframe);
    }

    fn place(&mut self, ts: i64, data: Bytes, keyframe: bool) {
        let pts_us = self.clock.pts(ts);
        self.stats.frames_emitted += 1;
        self.outputs.push_back(ReceiverOutput::Frame(EncodedFrame { data, pts_us, keyframe }));
    }

    fn dropped(&mut self, ts: i64, reason: DropReason) {
        tracing::debug!(codec = %self.cfg.codec, rtp_timestamp = ts as u32, ?reason, "frame dropped");
        self.outputs.push_back(ReceiverOutput::FrameDropped { rtp_timestamp: ts as u32, reason });
        self.on_break();
    }

    /// Something the decoder needed is gone: video needs a fresh keyframe.
    fn on_break(&mut self) {
        if self.is_video() {
            self.want_keyframe = true;
            if self.cfg.drop_until_keyframe_after_loss {
                self.awaiting_keyframe = true;
            }
        }
    }

    fn maybe_request(&mut self, now_us: i64) {
        if !self.want_keyframe {
            return;
        }
        let interval = self.cfg.keyframe_request_interval.as_micros() as i64;
        if self.last_request_us.is_none_or(|t| now_us - t >= interval) {
            self.last_request_us = Some(now_us);
            self.stats.keyframe_requests += 1;
            self.outputs.push_back(ReceiverOutput::NeedKeyframe);
        }
    }
}
