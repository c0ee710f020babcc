//! The reorder buffer: packets of one track in (any order, duplicates, gaps), whole frames'
//! payloads out, in sequence order, each after at most `max_delay_us` of waiting.
//!
//! Packets are keyed by extended sequence number. The buffer releases strictly in sequence
//! order: a missing packet holds back everything after it until the first held packet has
//! waited `max_delay_us` (or more than `max_packets` are held); then it is declared lost.
//!
//! A frame is the run of packets with one RTP timestamp, from its first packet to the marker
//! bit (or to the packet before a timestamp change, for senders that forget the marker). It is
//! released only if every packet in between is there *and* its first packet is known to be the
//! first: either the packet before it was received and ended the previous frame, or the payload
//! header says "frame start" (VP8 S bit, VP9 B bit, AV1 N bit, H.264 first slice or AUD/SPS).
//! Anything else is released as `Incomplete`, never as half a frame.

use std::collections::BTreeMap;

use bytes::Bytes;

use super::depack::PacketInfo;

/// One received packet, as held.
#[derive(Debug, Clone)]
pub struct HeldPacket {
    /// Extended RTP timestamp.
    pub ts: i64,
    pub marker: bool,
    /// Empty for padding-only packets: they occupy a sequence number but carry no media.
    pub payload: Bytes,
    /// `None` when the payload was malformed; the frame it belongs to cannot be assembled.
    pub info: Option<PacketInfo>,
    pub arrival_us: i64,
}

impl HeldPacket {
    fn is_padding(&self) -> bool {
        self.payload.is_empty() && self.info.is_some()
    }
}

/// What the buffer releases, in sequence order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Released {
    /// All packets of one frame, first to last.
    Frame { ts: i64, payloads: Vec<Bytes> },
    /// A frame that cannot be assembled (its start, middle or end is missing, or one of its
    /// packets was malformed); its packets are discarded.
    Incomplete { ts: i64, packets: usize, reason: &'static str },
    /// Sequence numbers given up on.
    Lost { packets: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushOutcome {
    Held,
    Duplicate,
    /// Older than what was already released (after its loss was declared, or a duplicate of a
    /// released packet).
    Late,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Before {
    /// Nothing released yet.
    Start,
    /// The last released sequence number was the end of a frame (or padding after one).
    FrameEnd,
    /// The last released sequence number was lost or belonged to a discarded frame.
    Gap,
}

#[derive(Debug)]
pub struct ReorderBuffer {
    max_delay_us: i64,
    max_packets: usize,
    held: BTreeMap<i64, HeldPacket>,
    /// The lowest sequence number not yet released.
    next: Option<i64>,
    released_any: bool,
    before: Before,
    /// Timestamp of the last released media packet.
    last_ts: Option<i64>,
}

impl ReorderBuffer {
    pub fn new(max_delay_us: i64, max_packets: usize) -> Self {
        Self {
            max_delay_us,
            max_packets: max_packets.max(1),
            held: BTreeMap::new(),
            next: None,
            released_any: false,
            before: Before::Start,
            last_ts: None,
        }
    }

    /// Packets held (tests and the fuzz target check that the buffer drains and stays bounded).
    pub fn held(&self) -> usize {
        self.held.len()
    }

    pub fn push(&mut self, seq: i64, packet: HeldPacket) -> PushOutcome {
        match self.next {
            None => self.next = Some(seq),
            Some(next) if seq < next => {
                // Before anything is released, a packet that overtook the first one can still
                // go in front of it.
                if self.released_any || next - seq > self.max_packets as i64 {
                    return PushOutcome::Late;
                }
                self.next = Some(seq);
            }
            Some(_) => {}
        }
        if self.held.contains_key(&seq) {
            return PushOutcome::Duplicate;
        }
        self.held.insert(seq, packet);
        PushOutcome::Held
    }

    /// When waiting stops for the packet at the head, if anything is held.
    pub fn deadline(&self) -> Option<i64> {
        self.held.values().next().map(|p| p.arrival_us + self.max_delay_us)
    }

    fn expired(&self, now_us: i64) -> bool {
        self.held.len() > self.max_packets || self.deadline().is_some_and(|d| d <= now_us)
    }

    /// Releases everything that is ready at `now_us`.
    pub fn release(&mut self, now_us: i64, out: &mut Vec<Released>) {
        while let Some(next) = self.next {
            let Some((&first, _)) = self.held.first_key_value() else { return };
            if first > next {
                if !self.expired(now_us) {
                    return;
                }
                out.push(Released::Lost { packets: (first - next) as u64 });
                self.advance_to(first);
                self.before = Before::Gap;
                continue;
            }
            debug_assert_eq!(first, next);
            if self.step(now_us, next, out) {
                continue;
            }
            return;
        }
    }

    /// Releases everything held, as if every deadline had passed (end of the track).
    pub fn flush(&mut self, out: &mut Vec<Released>) {
        self.release(i64::MAX, out);
    }

    fn advance_to(&mut self, seq: i64) {
        self.next = Some(seq);
        self.released_any = true;
    }

    /// Handles the packet at the head. Returns false when it has to wait.
    fn step(&mut self, now_us: i64, head: i64, out: &mut Vec<Released>) -> bool {
        let p = &self.held[&head];
        if p.is_padding() {
            self.held.remove(&head);
            self.advance_to(head + 1);
            return true;
        }
        let ts = p.ts;
        if self.before != Before::FrameEnd && self.last_ts == Some(ts) {
            // The rest of a frame whose earlier part was lost or discarded.
            let p = self.held.remove(&head).expect("head is held");
            self.advance_to(head + 1);
            if p.marker {
                self.before = Before::FrameEnd;
            }
            return true;
        }

        // Gather the run of packets with this timestamp.
        let mut seq = head;
        let mut end = None;
        let mut malformed = false;
        loop {
            match self.held.get(&seq) {
                None => break,
                Some(q) if q.is_padding() => {}
                Some(q) if q.ts != ts => {
                    end = Some(seq - 1);
                    break;
                }
                Some(q) => {
                    malformed |= q.info.is_none();
                    if q.marker {
                        end = Some(seq);
                        break;
                    }
                }
            }
            seq += 1;
        }

        let starts = self.held[&head].info.and_then(|i| i.starts_frame);
        let start_known = starts != Some(false)
            && match self.before {
                Before::FrameEnd => self.last_ts != Some(ts) || starts == Some(true),
                Before::Start | Before::Gap => starts == Some(true) && self.last_ts != Some(ts),
            };

        let expired = self.expired(now_us);
        if self.before == Before::Start && !start_known && !expired {
            // The very first packets may have been overtaken by later ones: wait for them.
            return false;
        }
        let (last, complete) = match end {
            Some(e) => (e, true),
            None => {
                // A packet is missing inside (or at the end of) this frame. A frame already known
                // to be broken need not wait for it; a good one waits until the deadline.
                if start_known && !malformed && !expired {
                    return false;
                }
                (seq - 1, false)
            }
        };
        let packets: Vec<HeldPacket> = (head..=last).filter_map(|s| self.held.remove(&s)).collect();
        self.advance_to(last + 1);
        self.last_ts = Some(ts);
        self.before = if complete { Before::FrameEnd } else { Before::Gap };
        let media: Vec<Bytes> = packets.into_iter().filter(|p| !p.is_padding()).map(|p| p.payload).collect();
        let reason = if malformed {
            Some("a packet of the frame was malformed")
        } else if !start_known {
            Some("the start of the frame is missing")
        } else if !complete {
            Some("a packet inside or at the end of the frame is missing")
        } else {
            None
        };
        out.push(match reason {
            Some(reason) => Released::Incomplete { ts, packets: media.len(), reason },
            None => Released::Frame { ts, payloads: media },
        });
        if !complete && expired {
            // Waiting for the missing packet is over: declare it lost now rather than start a
            // new wait from the next held packet's arrival.
            if let Some((&first, _)) = self.held.first_key_value() {
                if first > last + 1 {
                    out.push(Released::Lost { packets: (first - last - 1) as u64 });
                    self.advance_to(first);
                }
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pkt(ts: i64, marker: bool, starts: Option<bool>, arrival_us: i64) -> HeldPacket {
        HeldPacket {
            ts,
            marker,
            payload: Bytes::from(vec![ts as u8, marker as u8]),
            info: Some(PacketInfo { starts_frame: starts }),
            arrival_us,
        }
    }

    fn frames(out: &[Released]) -> Vec<i64> {
        out.iter()
            .filter_map(|r| match r {
                Released::Frame { ts, .. } => Some(*ts),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn reorders_and_ignores_duplicates() {
        let mut b = ReorderBuffer::new(200_000, 100);
        let mut out = Vec::new();
        // Frame 1: seq 10,11 ; frame 2: seq 12 ; frame 3: seq 13,14. Arrival order scrambled.
        let order = [(11, pkt(1, true, None, 0)), (10, pkt(1, false, Some(true), 0)), (13, pkt(3, false, None, 0))];
        for (s, p) in order {
            b.push(s, p);
            b.release(0, &mut out);
        }
        assert_eq!(frames(&out), vec![1]);
        assert_eq!(b.push(11, pkt(1, true, None, 0)), PushOutcome::Late);
        b.push(14, pkt(3, true, None, 0));
        assert_eq!(b.push(14, pkt(3, true, None, 0)), PushOutcome::Duplicate);
        b.release(0, &mut out);
        assert_eq!(frames(&out), vec![1]); // 12 still missing
        b.push(12, pkt(2, true, None, 0));
        b.release(0, &mut out);
        assert_eq!(frames(&out), vec![1, 2, 3]);
        assert_eq!(b.held(), 0);
    }

    #[test]
    fn loss_declared_after_the_delay_and_broken_frame_dropped() {
        let mut b = ReorderBuffer::new(200_000, 100);
        let mut out = Vec::new();
        b.push(0, pkt(0, true, Some(true), 0));
        b.push(1, pkt(3000, false, None, 10));
        // seq 2 (middle of frame 3000) lost.
        b.push(3, pkt(3000, true, None, 20));
        b.push(4, pkt(6000, true, None, 30));
        b.release(100_000, &mut out);
        assert_eq!(frames(&out), vec![0]);
        b.release(200_010, &mut out);
        assert_eq!(
            out[1..3],
            [
                Released::Incomplete { ts: 3000, packets: 1, reason: "a packet inside or at the end of the frame is missing" },
                Released::Lost { packets: 1 },
            ]
        );
        // seq 3 is the rest of the dropped frame: discarded silently; seq 4 starts after a
        // marker, so it is known to be whole.
        assert_eq!(frames(&out), vec![0, 6000]);
        assert_eq!(out.len(), 4);
    }

    #[test]
    fn after_a_gap_only_a_certain_start_is_trusted() {
        let mut b = ReorderBuffer::new(100, 100);
        let mut out = Vec::new();
        b.push(0, pkt(0, true, Some(true), 0));
        b.push(2, pkt(10, true, None, 0)); // unknown start after a gap: dropped
        b.push(4, pkt(20, true, Some(true), 0)); // certain start after a gap: kept
        b.release(1000, &mut out);
        assert_eq!(
            out,
            vec![
                Released::Frame { ts: 0, payloads: vec![Bytes::from(vec![0u8, 1])] },
                Released::Lost { packets: 1 },
                Released::Incomplete { ts: 10, packets: 1, reason: "the start of the frame is missing" },
                Released::Lost { packets: 1 },
                Released::Frame { ts: 20, payloads: vec![Bytes::from(vec![20u8, 1])] },
            ]
        );
    }

    #[test]
    fn packet_cap_bounds_memory() {
        let mut b = ReorderBuffer::new(i64::MAX / 2, 8);
        let mut out = Vec::new();
        b.push(0, pkt(0, true, Some(true), 0));
        // seq 1 never comes.
        for s in 2..20 {
            b.push(s, pkt(s * 10, true, Some(true), 0));
            b.release(0, &mut out);
            assert!(b.held() <= 8);
        }
        assert!(out.contains(&Released::Lost { packets: 1 }));
    }

    #[test]
    fn frame_without_marker_ends_at_timestamp_change() {
        let mut b = ReorderBuffer::new(100, 100);
        let mut out = Vec::new();
        b.push(0, pkt(0, false, None, 0));
        b.push(1, pkt(1, true, None, 0));
        b.release(1000, &mut out);
        // Frame 0's start is not known (first packet ever); frame 1 follows a timestamp change.
        assert_eq!(frames(&out), vec![1]);
        let mut b = ReorderBuffer::new(100, 100);
        let mut out = Vec::new();
        b.push(0, pkt(0, false, Some(true), 0));
        b.push(1, pkt(1, true, None, 0));
        b.release(0, &mut out);
        assert_eq!(frames(&out), vec![0, 1]);
    }
}
