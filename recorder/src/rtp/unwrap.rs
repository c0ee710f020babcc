//! Extended (unwrapped) RTP sequence numbers and timestamps.
//!
//! RTP carries 16-bit sequence numbers and 32-bit timestamps that wrap around; everything past
//! the wire works on `i64` values that keep counting. A new value is placed at the extension
//! closest to the highest value seen so far, so reordering by less than half the number space
//! (32 768 packets, or ~6.6 h at 90 kHz) unwraps correctly in both directions.

/// Unwraps 16-bit RTP sequence numbers.
#[derive(Debug, Clone, Default)]
pub struct SeqUnwrapper {
    highest: Option<i64>,
}

impl SeqUnwrapper {
    pub fn unwrap(&mut self, seq: u16) -> i64 {
        let ext = match self.highest {
            None => seq as i64,
            Some(h) => h + (seq.wrapping_sub(h as u16) as i16) as i64,
        };
        if self.highest.is_none_or(|h| ext > h) {
            self.highest = Some(ext);
        }
        ext
    }

    /// Forgets the history: the next value starts a new run (a sender restart).
    pub fn reset(&mut self) {
        self.highest = None;
    }
}

/// Unwraps 32-bit RTP timestamps.
#[derive(Debug, Clone, Default)]
pub struct TimestampUnwrapper {
    highest: Option<i64>,
}

impl TimestampUnwrapper {
    pub fn unwrap(&mut self, ts: u32) -> i64 {
        let ext = self.peek(ts);
        if self.highest.is_none_or(|h| ext > h) {
            self.highest = Some(ext);
        }
        ext
    }

    /// Where `ts` would unwrap to, without moving the reference (for timestamps in RTCP).
    pub fn peek(&self, ts: u32) -> i64 {
        match self.highest {
            None => ts as i64,
            Some(h) => h + (ts.wrapping_sub(h as u32) as i32) as i64,
        }
    }

    pub fn reset(&mut self) {
        self.highest = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_wraps_forward_and_tolerates_reordering_across_the_wrap() {
        let mut u = SeqUnwrapper::default();
        assert_eq!(u.unwrap(65534), 65534);
        assert_eq!(u.unwrap(0), 65536);
        assert_eq!(u.unwrap(65535), 65535); // late, from before the wrap
        assert_eq!(u.unwrap(1), 65537);
        assert_eq!(u.unwrap(2), 65538);
        // Second wrap.
        let mut last = 0;
        for i in 0..70_000u32 {
            last = u.unwrap((3 + i) as u16);
        }
        assert_eq!(last, 65539 + 69_999);
    }

    #[test]
    fn seq_late_packet_before_first_goes_negative() {
        let mut u = SeqUnwrapper::default();
        assert_eq!(u.unwrap(0), 0);
        assert_eq!(u.unwrap(65535), -1);
        assert_eq!(u.unwrap(1), 1);
    }

    #[test]
    fn timestamps_wrap() {
        let mut u = TimestampUnwrapper::default();
        assert_eq!(u.unwrap(u32::MAX - 2999), u32::MAX as i64 - 2999);
        assert_eq!(u.unwrap(2000), u32::MAX as i64 + 2001);
        assert_eq!(u.peek(u32::MAX - 5999), u32::MAX as i64 - 5999);
        assert_eq!(u.unwrap(u32::MAX), u32::MAX as i64); // late
        assert_eq!(u.unwrap(5000), u32::MAX as i64 + 5001);
    }
}
