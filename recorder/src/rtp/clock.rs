//! RTP timestamps → microseconds on the recording clock.
//!
//! Without a Sender Report, a track is anchored at the arrival of its first packet and runs at its
//! clock rate ([`super::TrackReceiver`] holds a new track's frames a few seconds for the first
//! report, so this fallback only times senders that send none). A Sender Report pairs an RTP timestamp with the sender's
//! NTP wall clock; all tracks of one sender share that NTP clock, so mapping every track
//! through its latest SR and one NTP→recording offset per participant ([`ParticipantClock`])
//! puts a participant's audio and video on the same time line, whatever their arrival skew.
//!
//! Output is strictly increasing per track, at least [`MIN_SPACING_US`] apart (the segment writer
//! rejects anything else, and containers count in milliseconds): a timestamp closer to or before
//! the previous one — reordering, a sender clock step, an SFU's layer switch — is clamped to one
//! millisecond after it and counted.

/// A Sender Report's timing pair (RTCP SR, RFC 3550 §6.4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SenderReportTiming {
    /// NTP timestamp, 32.32 fixed point seconds since 1900.
    pub ntp_time: u64,
    pub rtp_time: u32,
}

impl From<&rtc_rtcp::sender_report::SenderReport> for SenderReportTiming {
    fn from(sr: &rtc_rtcp::sender_report::SenderReport) -> Self {
        Self { ntp_time: sr.ntp_time, rtp_time: sr.rtp_time }
    }
}

/// NTP 32.32 → microseconds since 1900.
pub fn ntp_to_us(ntp: u64) -> i64 {
    let secs = (ntp >> 32) as i64;
    let frac = ((ntp & 0xffff_ffff) * 1_000_000) >> 32;
    secs * 1_000_000 + frac as i64
}

/// `recording_us = ntp_us + offset_us` for every track of one participant (one sender).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NtpOffset(pub i64);

/// Fixes a participant's [`NtpOffset`] from the first Sender Report of any of its tracks: that
/// report's NTP time is taken to be "now" on the recording clock. Later reports reuse it, so
/// the participant's tracks stay in step with each other (network delay of that first report
/// shifts the whole participant a little, never one track against another).
#[derive(Debug, Clone, Default)]
pub struct ParticipantClock {
    offset: Option<NtpOffset>,
}

impl ParticipantClock {
    pub fn offset(&mut self, sr: SenderReportTiming, now_us: i64) -> NtpOffset {
        *self.offset.get_or_insert(NtpOffset(now_us - ntp_to_us(sr.ntp_time)))
    }

    pub fn known_offset(&self) -> Option<NtpOffset> {
        self.offset
    }
}

/// Maps extended RTP timestamps of one track to the recording clock.
#[derive(Debug, Clone)]
pub struct TrackClock {
    clock_rate: i64,
    /// (extended RTP timestamp, recording µs) of the first packet.
    arrival_anchor: Option<(i64, i64)>,
    /// (recording µs of the SR's NTP time, SR RTP timestamp).
    sr_anchor: Option<(i64, u32)>,
    last_us: Option<i64>,
    /// (extended RTP timestamp, pts) of the newest frame placed.
    last: Option<(i64, i64)>,
    clamped: u64,
    slewed: u64,
}

/// Frames are at least this far apart: the containers count in milliseconds, and two frames on
/// one millisecond (an SFU's layer switch can put the next frame one RTP tick after the last) make
/// a file whose timestamps do not increase.
pub const MIN_SPACING_US: i64 = 1000;
/// A mapping move larger than this is a step of the sender's clock, not drift.
pub const CLOCK_STEP_US: i64 = 2_000_000;

impl TrackClock {
    pub fn new(clock_rate: u32) -> Self {
        Self {
            clock_rate: clock_rate.max(1) as i64,
            arrival_anchor: None,
            sr_anchor: None,
            last_us: None,
            last: None,
            clamped: 0,
            slewed: 0,
        }
    }

    /// The first packet of the track arrived at `now_us` carrying `ts`.
    pub fn on_first_packet(&mut self, ts: i64, now_us: i64) {
        self.arrival_anchor.get_or_insert((ts, now_us));
    }

    pub fn on_sender_report(&mut self, sr: SenderReportTiming, offset: NtpOffset) {
        self.sr_anchor = Some((ntp_to_us(sr.ntp_time) + offset.0, sr.rtp_time));
    }

    pub fn has_sender_report(&self) -> bool {
        self.sr_anchor.is_some()
    }

    fn ticks_to_us(&self, ticks: i64) -> i64 {
        // Rounded to the nearest µs; i128 keeps hours of ticks exact.
        let num = ticks as i128 * 1_000_000;
        let den = self.clock_rate as i128;
        (if num >= 0 { (num + den / 2) / den } else { (num - den / 2) / den }) as i64
    }

    /// Where the frame with extended timestamp `ts` sits, before the monotonic clamp.
    pub fn map(&self, ts: i64) -> Option<i64> {
        if let Some((sr_us, sr_rtp)) = self.sr_anchor {
            // SRs come every few seconds, so the distance fits in an i32 of ticks.
            let ticks = (ts as u32).wrapping_sub(sr_rtp) as i32 as i64;
            return Some(sr_us + self.ticks_to_us(ticks));
        }
        let (anchor_ts, anchor_us) = self.arrival_anchor?;
        Some(anchor_us + self.ticks_to_us(ts - anchor_ts))
    }

    /// Maps and applies the monotonic clamp (never below 0).
    ///
    /// When the mapping moves under a running track (its first Sender Report replaces the
    /// arrival anchor, or a later one corrects drift), the track does not jump: each frame goes
    /// where the previous one plus its RTP duration puts it, corrected an eighth of the way
    /// towards the new mapping (at most half a frame, at least a tenth), so timestamps never step
    /// back or pile onto one millisecond, and the track is on its sender's clock within a few
    /// dozen frames. A move over [`CLOCK_STEP_US`] is a step of the sender's clock, taken at once.
    pub fn pts(&mut self, ts: i64) -> i64 {
        let target = self.map(ts).unwrap_or(0).max(0);
        let placed = match self.last {
            Some((last_ts, last_us)) if ts > last_ts => {
                let natural = last_us + self.ticks_to_us(ts - last_ts);
                let diff = target - natural;
                let frame = natural - last_us;
                if diff.abs() > CLOCK_STEP_US {
                    target
                } else {
                    let floor = diff.abs().min((frame / 10).max(1));
                    let step = (diff / 8).clamp(-frame / 2, frame / 2);
                    let step = if step.abs() < floor { diff.signum() * floor } else { step };
                    if step != 0 {
                        self.slewed += 1;
                    }
                    natural + step
                }
            }
            _ => target,
        };
        let pts = match self.last_us {
            Some(last) if placed < last + MIN_SPACING_US => {
                self.clamped += 1;
                last + MIN_SPACING_US
            }
            _ => placed,
        };
        if self.last.is_none_or(|(last_ts, _)| ts > last_ts) {
            self.last = Some((ts, pts));
        }
        self.last_us = Some(pts);
        pts
    }

    /// Frames placed off their mapping while the track converged onto a moved one.
    pub fn slewed(&self) -> u64 {
        self.slewed
    }

    pub fn clamped(&self) -> u64 {
        self.clamped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ntp_conversion() {
        assert_eq!(ntp_to_us(0x0000_0001_8000_0000), 1_500_000);
        assert_eq!(ntp_to_us(0xe000_0000_4000_0000), 0xe000_0000i64 * 1_000_000 + 250_000);
    }

    #[test]
    fn arrival_anchor_extrapolates_across_timestamp_wrap() {
        let mut c = TrackClock::new(90_000);
        let first = u32::MAX as i64 - 8999; // 0.1 s before the wrap
        c.on_first_packet(first, 5_000_000);
        assert_eq!(c.pts(first), 5_000_000);
        assert_eq!(c.pts(first + 9000), 5_100_000); // ts wrapped to 0
        assert_eq!(c.pts(first + 18_000), 5_200_000);
        // A backwards step is clamped, one millisecond on.
        assert_eq!(c.pts(first + 9000), 5_201_000);
        // So is a frame one RTP tick after the last (an SFU's layer switch).
        assert_eq!(c.pts(first + 18_001), 5_202_000);
        assert_eq!(c.clamped(), 2);
    }

    #[test]
    fn a_moved_mapping_is_converged_on_without_stepping_back() {
        // 20 ms audio frames timed by arrival; the first Sender Report puts the sender 87 ms
        // earlier. Frames keep their order and spacing > half a frame, and end on the SR mapping.
        let mut c = TrackClock::new(48_000);
        c.on_first_packet(0, 1_000_000);
        let mut last = 0;
        for k in 0..50 {
            last = c.pts(k * 960);
        }
        assert_eq!(last, 1_000_000 + 49 * 20_000);
        let sr = SenderReportTiming { ntp_time: 100 << 32, rtp_time: 49 * 960 };
        c.on_sender_report(sr, NtpOffset(1_000_000 + 49 * 20_000 - 87_000 - 100_000_000));
        let mut prev = last;
        for k in 50..120 {
            let p = c.pts(k * 960);
            assert!(p - prev >= 10_000 && p - prev <= 20_000, "frame {k}: {} µs after the previous", p - prev);
            prev = p;
        }
        assert_eq!(Some(prev), c.map(119 * 960), "on the SR mapping after 70 frames");
        assert_eq!(c.clamped(), 0);
        assert!(c.slewed() > 5);
        // A step of the sender's clock (5 s) is taken at once.
        let sr = SenderReportTiming { ntp_time: 105 << 32, rtp_time: 119 * 960 };
        c.on_sender_report(sr, NtpOffset(1_000_000 + 49 * 20_000 - 87_000 - 100_000_000));
        assert_eq!(Some(c.pts(120 * 960)), c.map(120 * 960));
    }

    #[test]
    fn sender_report_across_wrap() {
        let mut c = TrackClock::new(48_000);
        c.on_first_packet(u32::MAX as i64, 0);
        let sr = SenderReportTiming { ntp_time: 10 << 32, rtp_time: u32::MAX - 479 }; // 10 ms before the wrap
        c.on_sender_report(sr, NtpOffset(-9_000_000)); // NTP 10 s ⇒ recording 1 s
        assert_eq!(c.map(u32::MAX as i64 + 1 + 480), Some(1_020_000)); // 20 ms after the SR
    }
}
