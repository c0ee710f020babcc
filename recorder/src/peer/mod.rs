//! The WebRTC edge: one webrtc-rs peer connection used receive-only ([`RecvPeer`]). It executes
//! the signalling machines' peer commands (apply the remote offer, add remote candidates, create
//! the answer, close) and turns everything the connection reports into [`PeerOutput`]s on one
//! channel: local candidates, gathering/connection state, and for every remote track its opening,
//! its whole frames on the recording clock, its end and periodic stats.
//!
//! Inside, one task per remote track (see `track`) polls webrtc-rs for RTP and Sender Reports and
//! hands them to a second task that owns the track's [`crate::rtp::TrackReceiver`]; that split
//! keeps the poll loop free of any await that could stall (webrtc-rs drops events beyond 256 per
//! track). Sender Reports reach the application only through the `sr_forwarder` interceptor, and
//! are routed by SSRC through one [`crate::rtp::ParticipantClock`] per peer, so all tracks of the
//! remote party share one NTP→recording offset.
//!
//! Shutdown: [`RecvPeer::close`] closes the connection; every track then flushes and reports
//! `TrackEnded`, and the output channel ends (`recv()` → `None`) once all of them have. Callers
//! keep draining it until then to get every frame.
//!
//! ```text
//! let (mut peer, mut out) = RecvPeer::new(cfg).await?;
//! peer.apply_remote_offer(offer_sdp).await?;      // PeerCommand::ApplyRemoteOffer
//! peer.add_remote_candidates(cands).await;        // buffered until the offer is applied
//! let answer_sdp = peer.create_answer().await?;   // PeerEvent::AnswerCreated
//! while let Some(o) = out.recv().await { /* LocalCandidate, Connected, TrackOpened, Frame, .. */ }
//! ```

mod handler;
pub(crate) mod sr_forwarder;
mod track;

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rtc::ice::mdns::MulticastDnsMode;
use rtc::interceptor::Slot;
use tokio::sync::{mpsc, watch};
use transcoder::{Codec, EncodedFrame, MediaKind};
use webrtc::peer_connection::{
    register_default_interceptors, MediaEngine, PeerConnection, PeerConnectionBuilder,
    PeerConnectionEventHandler, RTCConfigurationBuilder, RTCIceCandidateInit,
    RTCIceGatheringState, RTCSessionDescription, Registry, SettingEngine, SettingEngineBuilder,
};

pub use webrtc::peer_connection::RTCIceServer as IceServer;

use crate::rtp::{ParticipantClock, ReceiverStats};
use crate::voip1::{PeerFailure, RemoteCandidate};

use handler::Handler;
use track::TrackCommand;

/// Settings of one receive-only peer connection.
#[derive(Debug, Clone)]
pub struct PeerConfig {
    /// UDP addresses to bind, one host candidate each. A concrete address (`127.0.0.1:0` in
    /// tests) is used as given; a wildcard (`0.0.0.0:0`) expands to every non-loopback interface.
    pub bind_addrs: Vec<String>,
    /// STUN/TURN servers; none means host candidates only.
    pub ice_servers: Vec<IceServer>,
    /// How long `create_answer` waits for ICE gathering before answering with what it has
    /// (anything later is trickled as `LocalCandidate`).
    pub gather_timeout: Duration,
    /// Zero of the recording clock: frames carry µs since this instant.
    pub epoch: Instant,
    /// Capacity of the output channel. Track tasks wait when it is full; a stalled consumer
    /// therefore shows up as dropped packets in the track stats, never as a blocked connection.
    pub output_capacity: usize,
    /// Packets (and SRs) buffered between a track's poll loop and its receiver; beyond this
    /// they are dropped and counted in [`TrackStats::queue_dropped`].
    pub track_queue_capacity: usize,
    /// How often each track reports [`PeerOutput::Stats`].
    pub stats_interval: Duration,
}

impl PeerConfig {
    /// Defaults: 2 s gather wait, 1024 outputs, 2048 packets per track queue, stats every 5 s.
    pub fn new(bind_addrs: Vec<String>, epoch: Instant) -> Self {
        Self {
            bind_addrs,
            ice_servers: Vec::new(),
            gather_timeout: Duration::from_secs(2),
            epoch,
            output_capacity: 1024,
            track_queue_capacity: 2048,
            stats_interval: Duration::from_secs(5),
        }
    }
}

/// One remote track of this peer connection, numbered in order of first media (0, 1, …).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TrackKey(pub u32);

impl fmt::Display for TrackKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "t{}", self.0)
    }
}

/// Counters of one remote track.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TrackStats {
    pub receiver: ReceiverStats,
    /// Events dropped because the track's queue to its receiver was full.
    pub queue_dropped: u64,
    pub sender_reports: u64,
    pub plis_sent: u64,
}

/// What the peer connection reports, in the order it happened (per track).
#[derive(Debug, Clone)]
pub enum PeerOutput {
    /// A gathered local candidate; `sdp_mid` is already the answer's first mid (webrtc-rs says
    /// `""`), `sdp_mline_index` 0 (everything is bundled).
    LocalCandidate { candidate: String, sdp_mid: Option<String>, sdp_mline_index: Option<u16> },
    GatheringComplete,
    /// ICE and DTLS are up.
    Connected,
    /// The connection failed (ICE or DTLS) and will not recover by itself.
    Failed { reason: String },
    /// First media of a remote track. `stream_id`/`track_id` are its `a=msid` ids (empty when
    /// the offer had none); the stream id is the MSC3077 metadata key.
    TrackOpened {
        track: TrackKey,
        stream_id: String,
        track_id: String,
        kind: MediaKind,
        codec: Codec,
        clock_rate: u32,
    },
    /// A whole frame of `track` on the recording clock.
    Frame { track: TrackKey, frame: EncodedFrame },
    /// The track ended (remote stopped it or the connection closed); no more frames follow.
    TrackEnded { track: TrackKey },
    /// Periodic counters of one track (and a last one when it ends).
    Stats { track: TrackKey, stats: TrackStats },
}

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("building the peer connection failed: {0}")]
    Build(String),
    #[error("the remote offer was refused: {0}; the call cannot be answered")]
    SetRemoteDescription(String),
    #[error("creating the answer failed: {0}")]
    CreateAnswer(String),
    #[error("creating the offer failed: {0}")]
    CreateOffer(String),
    #[error("setting the local description failed: {0}")]
    SetLocalDescription(String),
    #[error("no remote offer has been applied yet; apply it before answering")]
    NoRemoteOffer,
    #[error("the peer connection is closed")]
    Closed,
}

impl PeerError {
    /// The call-level failure this error means (decides the hangup reason sent to the caller).
    pub fn failure(&self) -> PeerFailure {
        match self {
            PeerError::SetRemoteDescription(e) => PeerFailure::SetRemoteDescription(e.clone()),
            PeerError::CreateAnswer(e) => PeerFailure::CreateAnswer(e.clone()),
            PeerError::CreateOffer(e) => PeerFailure::CreateOffer(e.clone()),
            PeerError::SetLocalDescription(e) => PeerFailure::SetLocalDescription(e.clone()),
            other => PeerFailure::Other(other.to_string()),
        }
    }
}

/// State the connection's handler and track tasks share with [`RecvPeer`]. Every lock here is
/// held for a map lookup or insert only.
pub(crate) struct Shared {
    cfg: PeerConfig,
    /// Control outputs (candidates, states) go through an unbounded hop so handler callbacks,
    /// which webrtc-rs awaits inside its driver loop, never wait on the consumer. `None` after
    /// close, so the output channel can end.
    control: Mutex<Option<mpsc::UnboundedSender<PeerOutput>>>,
    /// Media outputs (bounded; track tasks wait). `None` after close.
    media: Mutex<Option<mpsc::Sender<PeerOutput>>>,
    /// The answer's first `a=mid`, for local candidates.
    first_mid: Mutex<Option<String>>,
    gathering: watch::Sender<RTCIceGatheringState>,
    /// One NTP→recording offset per sender (see [`clock_group`]): senders' NTP clocks differ, so
    /// one participant's first Sender Report must not place another's tracks.
    clocks: Mutex<HashMap<String, ParticipantClock>>,
    /// Media SSRC → that track's receiver queue, so an SR reaches its track whichever track
    /// webrtc-rs delivered it on.
    by_ssrc: Mutex<HashMap<u32, mpsc::Sender<track::TrackInput>>>,
    commands: Mutex<HashMap<TrackKey, mpsc::UnboundedSender<TrackCommand>>>,
    next_track: Mutex<u32>,
}

impl Shared {
    fn now_us(&self) -> i64 {
        Instant::now().saturating_duration_since(self.cfg.epoch).as_micros() as i64
    }

    fn control(&self, out: PeerOutput) {
        if let Some(tx) = self.control.lock().unwrap().as_ref() {
            let _ = tx.send(out);
        }
    }

    fn media_sender(&self) -> Option<mpsc::Sender<PeerOutput>> {
        self.media.lock().unwrap().clone()
    }
}

/// One receive-only peer connection. Owned by the task that owns the call; its methods mirror
/// the voip1 `PeerCommand`s and must be called in the order the call machine emits them.
pub struct RecvPeer {
    pc: Arc<dyn PeerConnection>,
    shared: Arc<Shared>,
    remote_set: bool,
    pending_candidates: Vec<RemoteCandidate>,
    /// Whether the receive-only transceivers of an offer of ours exist.
    offered: bool,
    closed: bool,
}

impl RecvPeer {
    /// Builds the connection (binds its sockets). Outputs arrive on the returned receiver.
    pub async fn new(cfg: PeerConfig) -> Result<(RecvPeer, mpsc::Receiver<PeerOutput>), PeerError> {
        let (media_tx, media_rx) = mpsc::channel(cfg.output_capacity.max(1));
        let (control_tx, control_rx) = mpsc::unbounded_channel();
        let (gathering, _) = watch::channel(RTCIceGatheringState::New);
        let shared = Arc::new(Shared {
            cfg: cfg.clone(),
            control: Mutex::new(Some(control_tx)),
            media: Mutex::new(Some(media_tx.clone())),
            first_mid: Mutex::new(None),
            gathering,
            clocks: Mutex::new(HashMap::new()),
            by_ssrc: Mutex::new(HashMap::new()),
            commands: Mutex::new(HashMap::new()),
            next_track: Mutex::new(0),
        });
        tokio::spawn(forward_control(control_rx, media_tx));

        let build = |e: webrtc::error::Error| PeerError::Build(e.to_string());
        let ConnectionParts { media_engine, registry, settings } = connection_parts().map_err(build)?;
        let handler: Arc<dyn PeerConnectionEventHandler> = Arc::new(Handler::new(shared.clone()));
        let pc = PeerConnectionBuilder::new()
            .with_configuration(
                RTCConfigurationBuilder::new().with_ice_servers(cfg.ice_servers.clone()).build(),
            )
            .with_media_engine(media_engine)
            .with_setting_engine(settings)
            .with_interceptor_registry(registry)
            .with_handler(handler)
            .with_udp_addrs(cfg.bind_addrs.clone())
            .build()
            .await
            .map_err(build)?;
        let peer = RecvPeer {
            pc: Arc::new(pc),
            shared,
            remote_set: false,
            pending_candidates: Vec::new(),
            offered: false,
            closed: false,
        };
        Ok((peer, media_rx))
    }

    /// Applies an offer (the invite's, or a renegotiation's), then any candidates that were
    /// waiting for it. Transceivers for the offered m-lines are created receive-only.
    pub async fn apply_remote_offer(&mut self, sdp: String) -> Result<(), PeerError> {
        self.apply_remote(RTCSessionDescription::offer(sdp)).await
    }

    /// Sets a remote description, then adds the candidates that were waiting for one.
    async fn apply_remote(
        &mut self,
        desc: Result<RTCSessionDescription, webrtc::error::Error>,
    ) -> Result<(), PeerError> {
        self.check_open()?;
        let desc = desc.map_err(|e| PeerError::SetRemoteDescription(e.to_string()))?;
        self.pc
            .set_remote_description(desc)
            .await
            .map_err(|e| PeerError::SetRemoteDescription(e.to_string()))?;
        self.remote_set = true;
        let pending = std::mem::take(&mut self.pending_candidates);
        self.add_remote_candidates(pending).await;
        Ok(())
    }

    /// Adds the caller's candidates; before the offer is applied they are kept until it is.
    /// End-of-candidates markers are skipped; a refused candidate is logged and skipped (one
    /// bad candidate must not end a call that other candidates can carry).
    pub async fn add_remote_candidates(&mut self, candidates: Vec<RemoteCandidate>) {
        if !self.remote_set {
            self.pending_candidates.extend(candidates);
            return;
        }
        for c in candidates {
            if c.is_end_of_candidates() {
                continue;
            }
            let init = RTCIceCandidateInit {
                candidate: c.candidate.clone(),
                sdp_mid: c.sdp_mid.clone(),
                sdp_mline_index: c.sdp_mline_index,
                ..Default::default()
            };
            if let Err(e) = self.pc.add_ice_candidate(init).await {
                tracing::warn!(candidate = %c.candidate, error = %e, "remote ICE candidate refused; skipping it");
            }
        }
    }

    /// Creates the answer, sets it as local description, waits (at most `gather_timeout`) for
    /// ICE gathering and returns the local description then — with the gathered candidates and,
    /// when gathering finished, `a=end-of-candidates`.
    pub async fn create_answer(&mut self) -> Result<String, PeerError> {
        self.check_open()?;
        if !self.remote_set {
            return Err(PeerError::NoRemoteOffer);
        }
        let answer =
            self.pc.create_answer(None).await.map_err(|e| PeerError::CreateAnswer(e.to_string()))?;
        self.set_local_and_gather(answer).await
    }

    /// For a call the bot places (a mesh group call peer whose user id sorts above the bot's):
    /// the first offer asks for one audio and one video track, receive-only; later offers (an
    /// ICE restart) keep the transceivers. Returns the local description after gathering, as
    /// [`create_answer`](Self::create_answer) does.
    pub async fn create_offer(&mut self) -> Result<String, PeerError> {
        use rtc::rtp_transceiver::rtp_sender::RtpCodecKind;
        use rtc::rtp_transceiver::{RTCRtpTransceiverDirection, RTCRtpTransceiverInit};
        self.check_open()?;
        if !self.offered {
            for kind in [RtpCodecKind::Audio, RtpCodecKind::Video] {
                let init = RTCRtpTransceiverInit {
                    direction: RTCRtpTransceiverDirection::Recvonly,
                    streams: Vec::new(),
                    send_encodings: Vec::new(),
                };
                self.pc
                    .add_transceiver_from_kind(kind, Some(init))
                    .await
                    .map_err(|e| PeerError::CreateOffer(e.to_string()))?;
            }
            self.offered = true;
        }
        let offer = self.pc.create_offer(None).await.map_err(|e| PeerError::CreateOffer(e.to_string()))?;
        self.set_local_and_gather(offer).await
    }

    /// Applies the answer to the bot's offer, then any candidates that were waiting for it.
    pub async fn apply_remote_answer(&mut self, sdp: String) -> Result<(), PeerError> {
        self.apply_remote(RTCSessionDescription::answer(sdp)).await
    }

    async fn set_local_and_gather(&mut self, local: RTCSessionDescription) -> Result<String, PeerError> {
        // Known before gathering starts, so every local candidate can carry it.
        if let Some(mid) = first_mid(&local.sdp) {
            *self.shared.first_mid.lock().unwrap() = Some(mid);
        }
        self.pc
            .set_local_description(local)
            .await
            .map_err(|e| PeerError::SetLocalDescription(e.to_string()))?;
        let mut gathering = self.shared.gathering.subscribe();
        // The watch guard must not live across the awaits below (it is not `Send`).
        let complete = tokio::time::timeout(
            self.shared.cfg.gather_timeout,
            gathering.wait_for(|s| *s == RTCIceGatheringState::Complete),
        )
        .await
        .is_ok_and(|r| r.is_ok());
        if !complete && !self.shared.cfg.gather_timeout.is_zero() {
            tracing::warn!(
                timeout = ?self.shared.cfg.gather_timeout,
                "ICE gathering not complete; sending the candidates gathered so far, the rest will be trickled"
            );
        }
        let local = self.pc.local_description().await.ok_or_else(|| {
            PeerError::SetLocalDescription("no local description after setting it".into())
        })?;
        Ok(local.sdp)
    }

    /// Asks the sender of `track` for a keyframe (e.g. the segment writer wants one); the
    /// track's receiver rate-limits the PLIs. Unknown or ended tracks are ignored.
    pub fn request_keyframe(&self, track: TrackKey) {
        if let Some(tx) = self.shared.commands.lock().unwrap().get(&track) {
            let _ = tx.send(TrackCommand::RequestKeyframe);
        }
    }

    /// Closes the connection. Tracks flush what they hold and end; the output channel ends when
    /// the last of them has. Idempotent.
    pub async fn close(&mut self) {
        if self.closed {
            return;
        }
        self.closed = true;
        if let Err(e) = self.pc.close().await {
            tracing::warn!(error = %e, "closing the peer connection failed; dropping it anyway");
        }
        // Let the output channel end once the tasks holding senders are done.
        self.shared.control.lock().unwrap().take();
        self.shared.media.lock().unwrap().take();
        self.shared.by_ssrc.lock().unwrap().clear();
        self.shared.commands.lock().unwrap().clear();
    }

    fn check_open(&self) -> Result<(), PeerError> {
        if self.closed {
            Err(PeerError::Closed)
        } else {
            Ok(())
        }
    }
}

impl Drop for RecvPeer {
    fn drop(&mut self) {
        if !self.closed {
            self.shared.control.lock().unwrap().take();
            self.shared.media.lock().unwrap().take();
            let pc = self.pc.clone();
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    let _ = pc.close().await;
                });
            }
        }
    }
}

/// What every receive-only connection is built from: the default codecs, the default
/// interceptors plus [`sr_forwarder::SrForwarder`], and the settings. One function, so that the
/// fuzz target applies offers to a connection configured exactly like the real ones.
pub(crate) struct ConnectionParts {
    pub media_engine: MediaEngine,
    pub registry: Registry,
    pub settings: SettingEngine,
}

pub(crate) fn connection_parts() -> Result<ConnectionParts, webrtc::error::Error> {
    let mut media_engine = MediaEngine::default();
    media_engine.register_default_codecs()?;
    let registry = register_default_interceptors(Registry::new(), &mut media_engine)?
        .with(Slot::from(sr_forwarder::SLOT), sr_forwarder::SrForwarder::default());
    // mDNS off: the default binds port 5353 per connection (two peers collide), and a server
    // cannot resolve a browser's `.local` candidates anyway.
    let settings = SettingEngineBuilder::new().with_multicast_dns_mode(MulticastDnsMode::Disabled).build();
    Ok(ConnectionParts { media_engine, registry, settings })
}

/// Moves control outputs onto the (bounded) output channel, in order.
async fn forward_control(mut rx: mpsc::UnboundedReceiver<PeerOutput>, tx: mpsc::Sender<PeerOutput>) {
    while let Some(out) = rx.recv().await {
        if tx.send(out).await.is_err() {
            return;
        }
    }
}

/// The first `a=mid:` of an SDP (the bundle's transport lives on it).
fn first_mid(sdp: &str) -> Option<String> {
    sdp.lines().find_map(|l| l.trim_end().strip_prefix("a=mid:")).map(str::to_owned)
}

/// The tracks that share one sender's clock, from a track's msid stream id: a LiveKit SFU names
/// streams `PA_<participant>|TR_<track>`, so the part before `|` is the participant; a plain peer
/// (a 1:1 caller) sends its camera and microphone in one stream.
pub(crate) fn clock_group(stream_id: &str) -> &str {
    stream_id.split_once('|').map_or(stream_id, |(participant, _)| participant)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_groups_are_senders() {
        assert_eq!(clock_group("PA_xwf6PoNbCoj3|TR_VCzzmKPYAGw6au"), "PA_xwf6PoNbCoj3");
        assert_eq!(clock_group("PA_xwf6PoNbCoj3|TR_AMLrtiPqamzVqp"), "PA_xwf6PoNbCoj3");
        assert_eq!(clock_group("b242ce31-3246-4da5-a1b2-14f962cd4c48"), "b242ce31-3246-4da5-a1b2-14f962cd4c48");
        assert_eq!(clock_group(""), "");
    }

    #[test]
    fn first_mid_is_found() {
        let sdp = "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 97\r\na=mid:0\r\nm=audio 9 X 96\r\na=mid:1\r\n";
        assert_eq!(first_mid(sdp).as_deref(), Some("0"));
        assert_eq!(first_mid("v=0\r\n"), None);
    }
}
