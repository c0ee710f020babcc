//! The media timeline of one recording: who was present when, which track was muted when, and
//! when the recording was paused — as intervals on the recording clock (µs since the recording's
//! epoch).
//!
//! It is a plain state machine: call adapters feed it events with the time they happened, and the
//! finalizer reads closed intervals out of it. Events arriving out of order or twice (a second
//! "joined" for someone present, a "left" for someone absent) are ignored rather than trusted, so
//! a flaky signalling path can never produce overlapping or negative intervals.

use std::collections::BTreeMap;

/// A closed-open interval on the recording clock, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub start_us: i64,
    pub end_us: i64,
}

/// Intervals of one boolean condition (present, muted, paused) built from on/off edges.
#[derive(Debug, Clone, Default)]
struct Edges {
    open_since: Option<i64>,
    closed: Vec<Span>,
}

impl Edges {
    fn on(&mut self, at: i64) {
        if self.open_since.is_none() {
            let at = at.max(self.closed.last().map_or(i64::MIN, |s| s.end_us));
            self.open_since = Some(at);
        }
    }

    fn off(&mut self, at: i64) {
        if let Some(start) = self.open_since.take() {
            // A zero-length interval carries no information; keep the list clean.
            if at > start {
                self.closed.push(Span { start_us: start, end_us: at });
            }
        }
    }

    fn is_on(&self) -> bool {
        self.open_since.is_some()
    }

    /// Intervals as of `end`: an open interval is closed there (without changing the state).
    fn spans(&self, end: i64) -> Vec<Span> {
        let mut v = self.closed.clone();
        if let Some(start) = self.open_since {
            if end > start {
                v.push(Span { start_us: start, end_us: end });
            }
        }
        v
    }
}

#[derive(Debug, Default)]
pub struct Timeline {
    presence: BTreeMap<String, Edges>,
    mutes: BTreeMap<String, Edges>,
    undecryptable: BTreeMap<String, Edges>,
    opted_out: BTreeMap<String, Edges>,
    pauses: Edges,
}

impl Timeline {
    pub fn joined(&mut self, participant: &str, at_us: i64) {
        self.presence.entry(participant.to_string()).or_default().on(at_us);
    }

    pub fn left(&mut self, participant: &str, at_us: i64) {
        if let Some(e) = self.presence.get_mut(participant) {
            e.off(at_us);
        }
    }

    pub fn is_present(&self, participant: &str) -> bool {
        self.presence.get(participant).is_some_and(Edges::is_on)
    }

    pub fn set_muted(&mut self, track: &str, muted: bool, at_us: i64) {
        let e = self.mutes.entry(track.to_string()).or_default();
        if muted {
            e.on(at_us)
        } else {
            e.off(at_us)
        }
    }

    /// A track's frames stopped (or started again) being decryptable: no media was recorded for
    /// the time it was on.
    pub fn set_undecryptable(&mut self, track: &str, undecryptable: bool, at_us: i64) {
        let e = self.undecryptable.entry(track.to_string()).or_default();
        if undecryptable {
            e.on(at_us)
        } else {
            e.off(at_us)
        }
    }

    pub fn undecryptable(&self, track: &str, end_us: i64) -> Vec<Span> {
        self.undecryptable.get(track).map(|e| e.spans(end_us)).unwrap_or_default()
    }

    /// A participant asked not to be recorded (or to be recorded again).
    pub fn set_opted_out(&mut self, participant: &str, out: bool, at_us: i64) {
        let e = self.opted_out.entry(participant.to_string()).or_default();
        if out {
            e.on(at_us)
        } else {
            e.off(at_us)
        }
    }

    pub fn is_opted_out(&self, participant: &str) -> bool {
        self.opted_out.get(participant).is_some_and(Edges::is_on)
    }

    pub fn opted_out(&self, participant: &str, end_us: i64) -> Vec<Span> {
        self.opted_out.get(participant).map(|e| e.spans(end_us)).unwrap_or_default()
    }

    pub fn set_paused(&mut self, paused: bool, at_us: i64) {
        if paused {
            self.pauses.on(at_us)
        } else {
            self.pauses.off(at_us)
        }
    }

    pub fn is_paused(&self) -> bool {
        self.pauses.is_on()
    }

    pub fn presence(&self, participant: &str, end_us: i64) -> Vec<Span> {
        self.presence.get(participant).map(|e| e.spans(end_us)).unwrap_or_default()
    }

    pub fn mutes(&self, track: &str, end_us: i64) -> Vec<Span> {
        self.mutes.get(track).map(|e| e.spans(end_us)).unwrap_or_default()
    }

    pub fn pauses(&self, end_us: i64) -> Vec<Span> {
        self.pauses.spans(end_us)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(a: i64, b: i64) -> Span {
        Span { start_us: a, end_us: b }
    }

    #[test]
    fn join_leave_rejoin_gives_two_spans_and_open_span_closes_at_end() {
        let mut t = Timeline::default();
        t.joined("a", 0);
        t.left("a", 3_000_000);
        t.joined("a", 5_000_000);
        assert!(t.is_present("a"));
        assert_eq!(t.presence("a", 9_000_000), vec![s(0, 3_000_000), s(5_000_000, 9_000_000)]);
    }

    #[test]
    fn duplicate_and_stray_events_are_ignored() {
        let mut t = Timeline::default();
        t.left("ghost", 10); // never joined
        t.joined("a", 100);
        t.joined("a", 200); // duplicate: the first join stands
        t.left("a", 300);
        t.left("a", 400); // duplicate leave
        assert_eq!(t.presence("a", 1000), vec![s(100, 300)]);
        assert!(t.presence("ghost", 1000).is_empty());
    }

    #[test]
    fn a_rejoin_stamped_before_the_last_leave_cannot_overlap_it() {
        let mut t = Timeline::default();
        t.joined("a", 0);
        t.left("a", 500);
        t.joined("a", 400); // clock skew between signalling paths
        t.left("a", 900);
        assert_eq!(t.presence("a", 1000), vec![s(0, 500), s(500, 900)]);
    }

    #[test]
    fn mutes_and_pauses_are_tracked_independently() {
        let mut t = Timeline::default();
        t.set_muted("a/cam", true, 10);
        t.set_muted("a/cam", false, 20);
        t.set_undecryptable("a/cam", true, 12);
        t.set_undecryptable("a/cam", false, 14);
        assert_eq!(t.undecryptable("a/cam", 100), vec![s(12, 14)]);
        t.set_paused(true, 15);
        assert!(t.is_paused());
        t.set_paused(false, 25);
        assert_eq!(t.mutes("a/cam", 100), vec![s(10, 20)]);
        assert_eq!(t.pauses(100), vec![s(15, 25)]);
        assert!(t.mutes("b/mic", 100).is_empty());
    }

    #[test]
    fn opt_out_spans_are_per_participant_and_close_at_the_end() {
        let mut t = Timeline::default();
        t.set_opted_out("a", true, 10);
        t.set_opted_out("a", true, 12); // twice: the first stands
        assert!(t.is_opted_out("a") && !t.is_opted_out("b"));
        t.set_opted_out("a", false, 20);
        t.set_opted_out("a", true, 30);
        assert_eq!(t.opted_out("a", 50), vec![s(10, 20), s(30, 50)]);
        assert!(t.opted_out("b", 50).is_empty());
    }
}
