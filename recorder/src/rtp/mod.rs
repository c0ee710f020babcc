//! The receive side of one remote media track, sans-IO: RTP packets (as webrtc-rs hands them
//! over in `TrackRemoteEvent::OnRtpPacket`) and RTCP Sender Reports in, whole encoded frames on
//! the recording clock plus keyframe requests out. No sockets, tasks or clocks: the caller
//! passes `now` (µs on the recording clock) and polls for output, so every rule here is tested
//! with hand-made packets and deterministic time.
//!
//! Layout: `unwrap` (16/32-bit wraparound), `reorder` (jitter buffer: which packets make a
//! whole frame), `depack` (per-codec payload formats → Annex B H.264, low-overhead AV1, raw
//! VP8/VP9/Opus), `clock` (RTP time → recording clock through Sender Reports), `receiver`
//! ([`TrackReceiver`], which ties them together and decides when to ask for a keyframe).
//!
//! ```text
//! let mut rx = TrackReceiver::new(ReceiverConfig::new(Codec::Vp8));
//! rx.handle_rtp(now_us, packet)?;                     // or log the MalformedPacket and go on
//! let off = participant_clock.offset(sr_timing, now_us);
//! rx.handle_sender_report(sr_timing, off);
//! while let Some(out) = rx.poll_output() { match out { Frame(f) => writer.write(f), NeedKeyframe => send PLI, .. } }
//! if writer.wants_keyframe() { rx.request_keyframe(now_us) }
//! // wake up at rx.poll_timeout() and call rx.handle_timeout(now_us)
//! ```

mod clock;
mod depack;
mod receiver;
pub(crate) mod reorder;
mod unwrap;

#[cfg(test)]
mod tests;

pub use clock::{ntp_to_us, NtpOffset, ParticipantClock, SenderReportTiming};
pub use depack::{DepacketizedFrame, Depacketizer, PacketInfo, ParameterSets};
pub use receiver::{
    DropReason, MalformedPacket, ReceiverConfig, ReceiverOutput, ReceiverStats, TrackReceiver, SENDER_REPORT_WAIT,
};
pub use unwrap::{SeqUnwrapper, TimestampUnwrapper};
