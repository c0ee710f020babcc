//! One remote track: two tasks.
//!
//! - The **poll loop** drains webrtc-rs's per-track event queue (which drops beyond 256 events)
//!   and does nothing that can wait: it stamps each packet with its arrival time on the recording
//!   clock and `try_send`s it to the track's receiver queue (bounded; overflow is counted), and
//!   routes Sender Reports by their SSRC.
//! - The **receiver task** owns the track's [`TrackReceiver`]: it feeds packets and SRs in,
//!   drives its timeouts, answers `NeedKeyframe` with an RTCP PLI, and sends frames and stats to
//!   the peer's output channel (waiting there when the consumer is slow).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtcp::sender_report::SenderReport;
use rtc::rtp_transceiver::rtp_sender::RTCRtpCodec;
use tokio::sync::mpsc;
use tracing::Instrument;
use tokio::sync::mpsc::error::TrySendError;
use transcoder::Codec;
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};

use super::{PeerOutput, Shared, TrackKey, TrackStats};
use crate::rtp::{ReceiverConfig, ReceiverOutput, SenderReportTiming, TrackReceiver};

/// What the poll loop hands the receiver task.
pub(super) enum TrackInput {
    Rtp { packet: rtc::rtp::Packet, at_us: i64 },
    SenderReport { sr: SenderReportTiming, at_us: i64 },
    Ended,
}

pub(super) enum TrackCommand {
    RequestKeyframe,
}

/// A PLI must not hold the receiver up for long if the connection is going away.
const RTCP_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// Runs a track from `on_track` to its end.
pub(super) async fn run(shared: Arc<Shared>, key: TrackKey, track: Arc<dyn TrackRemote>) {
    let ssrc = track.ssrcs().await.first().copied().unwrap_or_default();
    let stream_id = track.stream_id().await;
    let track_id = track.track_id().await;
    let rtp_codec = track.codec(ssrc).await;
    let span = tracing::info_span!("track", track = %key, ssrc, %stream_id, %track_id);
    let info = TrackInfo { key, ssrc, stream_id, track_id };
    open_and_receive(shared, info, rtp_codec, track).instrument(span).await;
}

struct TrackInfo {
    key: TrackKey,
    ssrc: u32,
    stream_id: String,
    track_id: String,
}

async fn open_and_receive(
    shared: Arc<Shared>,
    info: TrackInfo,
    rtp_codec: Option<RTCRtpCodec>,
    track: Arc<dyn TrackRemote>,
) {
    let TrackInfo { key, ssrc, stream_id, track_id } = info;
    let codec = rtp_codec.as_ref().and_then(|c| Codec::from_mime(&c.mime_type));
    let (Some(codec), Some(out)) = (codec, shared.media_sender()) else {
        let mime = rtp_codec.map(|c| c.mime_type).unwrap_or_default();
        tracing::warn!(%mime, "remote track not recorded (unsupported codec or peer closed); discarding its media");
        while let Some(ev) = track.poll().await {
            if matches!(ev, TrackRemoteEvent::OnEnded) {
                break;
            }
        }
        return;
    };
    let mut cfg = ReceiverConfig::new(codec);
    if let Some(rate) = rtp_codec.as_ref().map(|c| c.clock_rate).filter(|r| *r > 0) {
        cfg.clock_rate = rate;
    }
    let clock_rate = cfg.clock_rate;

    let (in_tx, in_rx) = mpsc::channel(shared.cfg.track_queue_capacity.max(1));
    let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
    shared.by_ssrc.lock().unwrap().insert(ssrc, in_tx.clone());
    shared.commands.lock().unwrap().insert(key, cmd_tx);
    let dropped = Arc::new(AtomicU64::new(0));

    tracing::info!(%codec, clock_rate, "remote track opened");
    let clock_group = super::clock_group(&stream_id).to_owned();
    let opened = PeerOutput::TrackOpened { track: key, stream_id, track_id, kind: codec.kind(), codec, clock_rate };
    if out.send(opened).await.is_ok() {
        tokio::spawn(
            poll_loop(shared.clone(), track.clone(), in_tx, dropped.clone()).in_current_span(),
        );
        let task = ReceiverTask {
            shared: shared.clone(),
            clock_group,
            key,
            ssrc,
            track,
            out,
            dropped,
            receiver: TrackReceiver::new(cfg),
            stats: TrackStats::default(),
        };
        task.run(in_rx, cmd_rx).await;
    }
    shared.by_ssrc.lock().unwrap().remove(&ssrc);
    shared.commands.lock().unwrap().remove(&key);
}

/// Never awaits anything but the next event.
async fn poll_loop(
    shared: Arc<Shared>,
    track: Arc<dyn TrackRemote>,
    in_tx: mpsc::Sender<TrackInput>,
    dropped: Arc<AtomicU64>,
) {
    let forward = |tx: &mpsc::Sender<TrackInput>, input: TrackInput| match tx.try_send(input) {
        Ok(()) => {}
        Err(TrySendError::Full(_)) | Err(TrySendError::Closed(_)) => {
            dropped.fetch_add(1, Ordering::Relaxed);
        }
    };
    while let Some(ev) = track.poll().await {
        let at_us = shared.now_us();
        match ev {
            TrackRemoteEvent::OnRtpPacket(packet) => forward(&in_tx, TrackInput::Rtp { packet, at_us }),
            TrackRemoteEvent::OnRtcpPacket(packets) => {
                for p in &packets {
                    let Some(sr) = p.as_any().downcast_ref::<SenderReport>() else { continue };
                    let input = TrackInput::SenderReport { sr: sr.into(), at_us };
                    // webrtc-rs routes a compound packet by its first report block; the SR's own
                    // SSRC says which track it times.
                    let target = shared.by_ssrc.lock().unwrap().get(&sr.ssrc).cloned();
                    match target {
                        Some(tx) => forward(&tx, input),
                        None => tracing::debug!(ssrc = sr.ssrc, "sender report for an SSRC with no track; ignored"),
                    }
                }
            }
            TrackRemoteEvent::OnEnded => break,
            _ => {}
        }
    }
    // The loop is over, so waiting here stalls nothing.
    let _ = in_tx.send(TrackInput::Ended).await;
}

struct ReceiverTask {
    shared: Arc<Shared>,
    /// Whose NTP clock this track's Sender Reports use.
    clock_group: String,
    key: TrackKey,
    ssrc: u32,
    track: Arc<dyn TrackRemote>,
    out: mpsc::Sender<PeerOutput>,
    dropped: Arc<AtomicU64>,
    receiver: TrackReceiver,
    stats: TrackStats,
}

impl ReceiverTask {
    async fn run(
        mut self,
        mut inputs: mpsc::Receiver<TrackInput>,
        mut commands: mpsc::UnboundedReceiver<TrackCommand>,
    ) {
        let mut stats_tick = tokio::time::interval(self.shared.cfg.stats_interval);
        stats_tick.tick().await; // the first tick is immediate
        let mut commands_open = true;
        loop {
            let wake = self.receiver.poll_timeout().map(|us| {
                self.shared.cfg.epoch + Duration::from_micros(us.max(0) as u64)
            });
            tokio::select! {
                input = inputs.recv() => match input {
                    Some(TrackInput::Rtp { packet, at_us }) => {
                        if let Err(e) = self.receiver.handle_rtp(at_us, packet) {
                            tracing::debug!(error = %e, "malformed RTP packet");
                        }
                    }
                    Some(TrackInput::SenderReport { sr, at_us }) => {
                        let offset = self
                            .shared
                            .clocks
                            .lock()
                            .unwrap()
                            .entry(self.clock_group.clone())
                            .or_default()
                            .offset(sr, at_us);
                        self.receiver.handle_sender_report(sr, offset);
                        self.stats.sender_reports += 1;
                    }
                    Some(TrackInput::Ended) | None => break,
                },
                cmd = commands.recv(), if commands_open => match cmd {
                    Some(TrackCommand::RequestKeyframe) => self.receiver.request_keyframe(self.shared.now_us()),
                    None => commands_open = false,
                },
                _ = sleep_until(wake) => self.receiver.handle_timeout(self.shared.now_us()),
                _ = stats_tick.tick() => {
                    if !self.send(PeerOutput::Stats { track: self.key, stats: self.stats() }).await {
                        return;
                    }
                }
            }
            if !self.drain().await {
                return;
            }
        }
        self.receiver.flush();
        if self.drain().await {
            let stats = self.stats();
            tracing::info!(?stats, "remote track ended");
            self.send(PeerOutput::Stats { track: self.key, stats }).await;
            self.send(PeerOutput::TrackEnded { track: self.key }).await;
        }
    }

    /// Handles what the receiver produced. False when the consumer is gone.
    async fn drain(&mut self) -> bool {
        while let Some(output) = self.receiver.poll_output() {
            match output {
                ReceiverOutput::Frame(frame) => {
                    if !self.send(PeerOutput::Frame { track: self.key, frame }).await {
                        return false;
                    }
                }
                ReceiverOutput::NeedKeyframe => self.send_pli().await,
                ReceiverOutput::FrameDropped { .. } => {}
            }
        }
        true
    }

    async fn send_pli(&mut self) {
        let pli = PictureLossIndication { sender_ssrc: 0, media_ssrc: self.ssrc };
        match tokio::time::timeout(RTCP_WRITE_TIMEOUT, self.track.write_rtcp(vec![Box::new(pli)])).await {
            Ok(Ok(())) => {
                self.stats.plis_sent += 1;
                tracing::debug!("PLI sent");
            }
            Ok(Err(e)) => tracing::debug!(error = %e, "PLI not sent"),
            Err(_) => tracing::debug!("PLI not sent: the connection did not take it within 1 s"),
        }
    }

    async fn send(&self, output: PeerOutput) -> bool {
        self.out.send(output).await.is_ok()
    }

    fn stats(&self) -> TrackStats {
        TrackStats {
            receiver: self.receiver.stats(),
            queue_dropped: self.dropped.load(Ordering::Relaxed),
            ..self.stats
        }
    }
}

async fn sleep_until(at: Option<std::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
