//! The bot as a LiveKit participant that subscribes and publishes nothing: the IO edge between
//! a LiveKit SFU and the recorder.
//!
//! Signalling is `livekit-signaling` over the websocket (`/rtc`, protocol 17, the server offers
//! the subscriber peer connection); media is one receive-only webrtc-rs [`RecvPeer`]. One task
//! per connection owns both and the [`RoomState`]; it answers every subscriber offer, trickles
//! candidates both ways, keeps video at the highest layer, and reports room changes, tracks and
//! frames on one channel as [`SfuOutput`]s.
//!
//! A dropped signalling link is resumed (`reconnect=1`, the server re-offers with an ICE restart,
//! `sync_state` tells it what we had); when that fails, or the server asks for a full reconnect,
//! the task joins again with a fresh token from [`TokenSource`] and a new peer connection. Tracks
//! of the old connection end; their successors open on the new one and the consumer maps them to
//! the same participants by identity and source, so the recording goes on.
//!
//! ```text
//! let (sfu, mut out) = SfuConnection::connect(cfg, tokens).await?;
//! while let Some(o) = out.recv().await { match o { SfuOutput::Frame { track, frame } => .., .. } }
//! sfu.request_keyframe(track); sfu.close().await;
//! ```

pub mod room;

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use livekit_protocol as proto;
use livekit_signaling::{SignalClient, SignalEvent, SignalOptions};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};
use transcoder::{Codec, EncodedFrame, MediaKind};

use crate::peer::{IceServer, PeerConfig, PeerOutput, RecvPeer, TrackKey, TrackStats};
use crate::voip1::RemoteCandidate;

pub use room::{RemoteParticipant, RemoteTrack, RoomEvent, RoomState};

/// The signalling protocol mxrec speaks (the server's current one in v1.13; livekit-signaling's
/// default 18 is newer than the servers deployed).
pub const PROTOCOL_VERSION: u32 = 17;

/// How long a lost signalling link is retried as a resume before a full rejoin.
const RESUME_ATTEMPTS: u32 = 3;
/// Full rejoins tried before the connection is given up.
const REJOIN_ATTEMPTS: u32 = 5;
const RETRY_BACKOFF: Duration = Duration::from_secs(1);

/// A track of this connection; the generation changes with every full rejoin (new peer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SfuTrack {
    pub generation: u32,
    pub key: TrackKey,
}

impl fmt::Display for SfuTrack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "g{}{}", self.generation, self.key)
    }
}

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct SfuConfig {
    /// The SFU's websocket URL (`ws://…` / `wss://…`, as the JWT service or config gives it).
    pub url: String,
    pub bind_addrs: Vec<String>,
    /// Extra STUN/TURN servers (the server's own from the join are used too).
    pub ice_servers: Vec<IceServer>,
    /// Zero of the clock the frames are stamped on.
    pub epoch: Instant,
}

/// Gives a (fresh) access token for each join; resumes use the latest refreshed one.
#[async_trait::async_trait]
pub trait TokenSource: Send + Sync {
    async fn token(&self) -> anyhow::Result<String>;
}

/// A fixed token (tests, one-shot joins).
pub struct FixedToken(pub String);

#[async_trait::async_trait]
impl TokenSource for FixedToken {
    async fn token(&self) -> anyhow::Result<String> {
        Ok(self.0.clone())
    }
}

/// What the connection reports, in order.
#[derive(Debug, Clone)]
pub enum SfuOutput {
    /// Joined (also after a full rejoin). `sif_trailer` marks server-injected frames.
    Joined { room: String, identity: String, sid: String, sif_trailer: Vec<u8>, server_version: String },
    Room(RoomEvent),
    /// Media of a subscribed track started; `remote` is what the server said it is (None when
    /// the stream could not be matched to a published track).
    TrackOpened { track: SfuTrack, remote: Option<RemoteTrack>, kind: MediaKind, codec: Codec, clock_rate: u32 },
    Frame { track: SfuTrack, frame: EncodedFrame },
    TrackEnded { track: SfuTrack },
    Stats { track: SfuTrack, stats: TrackStats },
    /// The media connection is up.
    Connected,
    /// The signalling link dropped; resuming.
    Reconnecting { reason: String },
    /// Resumed or rejoined.
    Reconnected { full_rejoin: bool },
    /// The connection is over for good (left, kicked, or every retry failed).
    Closed { reason: String },
}

enum Command {
    Keyframe(SfuTrack),
    Close,
}

/// Handle to a running connection task.
pub struct SfuConnection {
    commands: mpsc::UnboundedSender<Command>,
    task: Option<tokio::task::JoinHandle<()>>,
}

#[derive(Debug, thiserror::Error)]
pub enum SfuError {
    #[error("cannot get an access token: {0}")]
    Token(String),
    #[error("joining the LiveKit room failed: {0}")]
    Signal(String),
    #[error("creating the peer connection failed: {0}")]
    Peer(String),
}

impl SfuConnection {
    /// Joins the room the token grants and starts the connection task.
    pub async fn connect(
        cfg: SfuConfig,
        tokens: Arc<dyn TokenSource>,
    ) -> Result<(SfuConnection, mpsc::Receiver<SfuOutput>), SfuError> {
        let (out_tx, out_rx) = mpsc::channel(1024);
        let joined = Joined::open(&cfg, tokens.as_ref(), 0).await?;
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let task = Task { cfg, tokens, out: out_tx, room: RoomState::new(), generation: 0 };
        let handle = tokio::spawn(task.run(joined, cmd_rx));
        Ok((SfuConnection { commands: cmd_tx, task: Some(handle) }, out_rx))
    }

    /// Asks the publisher of `track` for a keyframe (RTCP PLI through the SFU).
    pub fn request_keyframe(&self, track: SfuTrack) {
        let _ = self.commands.send(Command::Keyframe(track));
    }

    /// Leaves the room and closes the media connection; outputs end after the last frames.
    pub async fn close(&mut self) {
        let _ = self.commands.send(Command::Close);
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

/// A trickled candidate as the SFU sends it (pion's `ICECandidateInit` JSON).
#[derive(Debug, serde::Deserialize)]
struct CandidateInit {
    candidate: String,
    #[serde(rename = "sdpMid", default)]
    sdp_mid: Option<String>,
    #[serde(rename = "sdpMLineIndex", default)]
    sdp_mline_index: Option<u16>,
}

/// One joined signalling session with its peer connection.
struct Joined {
    signal: SignalClient,
    events: mpsc::UnboundedReceiver<SignalEvent>,
    join: proto::JoinResponse,
    peer: RecvPeer,
    peer_out: mpsc::Receiver<PeerOutput>,
    generation: u32,
    last_offer: Option<proto::SessionDescription>,
    last_answer: Option<proto::SessionDescription>,
}

fn signal_options() -> SignalOptions {
    let mut o = SignalOptions::default();
    o.auto_subscribe = true;
    o.adaptive_stream = false;
    o.single_peer_connection = false;
    o.region_failover = false;
    o.protocol_version = PROTOCOL_VERSION;
    // No packet trailers: the server strips them when the capability is absent.
    o.client_capabilities.retain(|c| *c != proto::client_info::Capability::CapPacketTrailer);
    o
}

fn ice_servers_of(join: &[proto::IceServer], extra: &[IceServer]) -> Vec<IceServer> {
    let mut v: Vec<IceServer> = extra.to_vec();
    for s in join {
        v.push(IceServer { urls: s.urls.clone(), username: s.username.clone(), credential: s.credential.clone() });
    }
    v
}

impl Joined {
    async fn open(cfg: &SfuConfig, tokens: &dyn TokenSource, generation: u32) -> Result<Joined, SfuError> {
        let token = tokens.token().await.map_err(|e| SfuError::Token(format!("{e:#}")))?;
        let (signal, join, events) = SignalClient::connect(&cfg.url, &token, signal_options(), None)
            .await
            .map_err(|e| SfuError::Signal(e.to_string()))?;
        let mut pc = PeerConfig::new(cfg.bind_addrs.clone(), cfg.epoch);
        pc.ice_servers = ice_servers_of(&join.ice_servers, &cfg.ice_servers);
        // The SFU takes trickled candidates: answer at once instead of waiting for gathering
        // (a STUN server that does not answer would hold every answer for the gather timeout).
        pc.gather_timeout = Duration::ZERO;
        let (peer, peer_out) = RecvPeer::new(pc).await.map_err(|e| SfuError::Peer(e.to_string()))?;
        Ok(Joined { signal, events, join, peer, peer_out, generation, last_offer: None, last_answer: None })
    }
}

struct Task {
    cfg: SfuConfig,
    tokens: Arc<dyn TokenSource>,
    out: mpsc::Sender<SfuOutput>,
    room: RoomState,
    generation: u32,
}

/// Why one joined session ended.
enum SessionEnd {
    /// We asked to leave.
    Closed,
    /// The server or the network ended it; try to get back in (`resume` first if allowed).
    Lost { reason: String, resume: bool },
    /// The server told us to go away for good.
    Left { reason: String },
}

impl Task {
    async fn emit(&self, o: SfuOutput) {
        let _ = self.out.send(o).await;
    }

    async fn run(mut self, mut joined: Joined, mut cmds: mpsc::UnboundedReceiver<Command>) {
        let mut rejoins = 0;
        loop {
            self.on_join(&joined).await;
            let end = self.session(&mut joined, &mut cmds).await;
            match end {
                SessionEnd::Closed => {
                    self.finish(joined).await;
                    self.emit(SfuOutput::Closed { reason: "left".into() }).await;
                    return;
                }
                SessionEnd::Left { reason } => {
                    self.finish(joined).await;
                    self.emit(SfuOutput::Closed { reason }).await;
                    return;
                }
                SessionEnd::Lost { reason, resume } => {
                    warn!(%reason, "LiveKit connection lost");
                    self.emit(SfuOutput::Reconnecting { reason: reason.clone() }).await;
                    if resume && self.resume(&mut joined).await {
                        self.emit(SfuOutput::Reconnected { full_rejoin: false }).await;
                        continue;
                    }
                    // Full rejoin with a new peer; the old one's tracks end.
                    joined.signal.close().await;
                    self.finish(joined).await;
                    loop {
                        rejoins += 1;
                        if rejoins > REJOIN_ATTEMPTS {
                            self.emit(SfuOutput::Closed { reason: format!("gave up after {REJOIN_ATTEMPTS} rejoins: {reason}") }).await;
                            return;
                        }
                        tokio::time::sleep(RETRY_BACKOFF * rejoins).await;
                        self.generation += 1;
                        match Joined::open(&self.cfg, self.tokens.as_ref(), self.generation).await {
                            Ok(j) => {
                                joined = j;
                                break;
                            }
                            Err(e) => warn!(error = %e, attempt = rejoins, "rejoining the LiveKit room failed"),
                        }
                    }
                    self.emit(SfuOutput::Reconnected { full_rejoin: true }).await;
                }
            }
        }
    }

    async fn on_join(&mut self, joined: &Joined) {
        let join = &joined.join;
        let me = join.participant.clone().unwrap_or_default();
        let room = join.room.as_ref().map(|r| r.name.clone()).unwrap_or_default();
        info!(%room, identity = %me.identity, sid = %me.sid, server = %join.server_version, protocol = PROTOCOL_VERSION,
            subscriber_primary = join.subscriber_primary, "joined the LiveKit room");
        self.emit(SfuOutput::Joined {
            room,
            identity: me.identity,
            sid: me.sid,
            sif_trailer: join.sif_trailer.clone(),
            server_version: join.server_version.clone(),
        })
        .await;
        for ev in self.room.on_join(join) {
            self.emit(SfuOutput::Room(ev)).await;
        }
    }

    /// Drives one joined session until it ends.
    async fn session(&mut self, j: &mut Joined, cmds: &mut mpsc::UnboundedReceiver<Command>) -> SessionEnd {
        loop {
            tokio::select! {
                ev = j.events.recv() => match ev {
                    Some(SignalEvent::Message(m)) => {
                        if let Some(end) = self.on_signal(j, *m).await {
                            return end;
                        }
                    }
                    Some(SignalEvent::Close(reason)) => return SessionEnd::Lost { reason: reason.into_owned(), resume: true },
                    None => return SessionEnd::Lost { reason: "signalling task ended".into(), resume: true },
                },
                o = j.peer_out.recv() => match o {
                    Some(o) => {
                        if let Some(end) = self.on_peer(j, o).await {
                            return end;
                        }
                    }
                    None => return SessionEnd::Lost { reason: "peer connection ended".into(), resume: false },
                },
                c = cmds.recv() => match c {
                    Some(Command::Keyframe(t)) => {
                        if t.generation == j.generation {
                            j.peer.request_keyframe(t.key);
                        }
                    }
                    Some(Command::Close) | None => {
                        j.signal
                            .send(proto::signal_request::Message::Leave(proto::LeaveRequest {
                                can_reconnect: false,
                                reason: proto::DisconnectReason::ClientInitiated as i32,
                                action: proto::leave_request::Action::Disconnect as i32,
                                regions: None,
                            }))
                            .await;
                        return SessionEnd::Closed;
                    }
                },
            }
        }
    }

    async fn on_signal(&mut self, j: &mut Joined, m: proto::signal_response::Message) -> Option<SessionEnd> {
        use proto::signal_response::Message as M;
        match m {
            M::Offer(offer) => {
                debug!(id = offer.id, tracks = offer.mid_to_track_id.len(), "subscriber offer");
                if let Err(e) = j.peer.apply_remote_offer(offer.sdp.clone()).await {
                    warn!(error = %e, "the SFU's offer was refused");
                    return Some(SessionEnd::Lost { reason: format!("offer refused: {e}"), resume: false });
                }
                let sdp = match j.peer.create_answer().await {
                    Ok(sdp) => sdp,
                    Err(e) => return Some(SessionEnd::Lost { reason: format!("cannot answer: {e}"), resume: false }),
                };
                let answer = proto::SessionDescription { r#type: "answer".into(), sdp, id: offer.id, ..Default::default() };
                j.last_offer = Some(offer);
                j.last_answer = Some(answer.clone());
                j.signal.send(proto::signal_request::Message::Answer(answer)).await;
            }
            M::Trickle(t) => {
                if t.target != proto::SignalTarget::Subscriber as i32 {
                    return None;
                }
                match serde_json::from_str::<CandidateInit>(&t.candidate_init) {
                    Ok(c) => {
                        let c = RemoteCandidate { candidate: c.candidate, sdp_mid: c.sdp_mid, sdp_mline_index: c.sdp_mline_index };
                        j.peer.add_remote_candidates(vec![c]).await
                    }
                    Err(e) => warn!(error = %e, "malformed ICE candidate from the SFU; skipping it"),
                }
            }
            M::Update(u) => {
                for ev in self.room.on_update(&u) {
                    self.emit(SfuOutput::Room(ev)).await;
                }
            }
            M::TrackUnpublished(t) => {
                for ev in self.room.on_track_unpublished(&t.track_sid) {
                    self.emit(SfuOutput::Room(ev)).await;
                }
            }
            M::Leave(l) => {
                let reason = proto::DisconnectReason::try_from(l.reason)
                    .map(|r| r.as_str_name().to_owned())
                    .unwrap_or_else(|_| l.reason.to_string());
                return Some(match proto::leave_request::Action::try_from(l.action) {
                    Ok(proto::leave_request::Action::Resume) => SessionEnd::Lost { reason, resume: true },
                    Ok(proto::leave_request::Action::Reconnect) => SessionEnd::Lost { reason, resume: false },
                    _ => SessionEnd::Left { reason: format!("the SFU ended the session: {reason}") },
                });
            }
            M::RoomUpdate(_) | M::SpeakersChanged(_) | M::ConnectionQuality(_) | M::PongResp(_) | M::Pong(_)
            | M::RefreshToken(_) | M::SubscribedQualityUpdate(_) => {}
            M::StreamStateUpdate(s) => debug!(?s, "stream state"),
            M::SubscriptionResponse(r) => warn!(track = %r.track_sid, err = r.err, "subscription failed"),
            other => debug!(message = ?std::mem::discriminant(&other), "signal message ignored"),
        }
        None
    }

    async fn on_peer(&mut self, j: &mut Joined, o: PeerOutput) -> Option<SessionEnd> {
        let g = j.generation;
        match o {
            PeerOutput::LocalCandidate { candidate, sdp_mid, sdp_mline_index } => {
                let init = serde_json::json!({
                    "candidate": candidate,
                    "sdpMid": sdp_mid,
                    "sdpMLineIndex": sdp_mline_index.unwrap_or(0),
                    "usernameFragment": null,
                });
                j.signal
                    .send(proto::signal_request::Message::Trickle(proto::TrickleRequest {
                        candidate_init: init.to_string(),
                        target: proto::SignalTarget::Subscriber as i32,
                        r#final: false,
                    }))
                    .await;
            }
            PeerOutput::GatheringComplete => {}
            PeerOutput::Connected => self.emit(SfuOutput::Connected).await,
            PeerOutput::Failed { reason } => return Some(SessionEnd::Lost { reason, resume: false }),
            PeerOutput::TrackOpened { track, stream_id, track_id, kind, codec, clock_rate } => {
                let remote = self.room.track_for_stream(&stream_id, &track_id).cloned();
                if remote.is_none() {
                    warn!(%stream_id, %track_id, "media for a track the SFU never announced");
                }
                if kind == MediaKind::Video {
                    if let Some(r) = &remote {
                        // The top simulcast layer, whatever the congestion controller starts at.
                        j.signal
                            .send(proto::signal_request::Message::TrackSetting(proto::UpdateTrackSettings {
                                track_sids: vec![r.sid.clone()],
                                disabled: false,
                                quality: proto::VideoQuality::High as i32,
                                ..Default::default()
                            }))
                            .await;
                    }
                }
                self.emit(SfuOutput::TrackOpened { track: SfuTrack { generation: g, key: track }, remote, kind, codec, clock_rate })
                    .await;
            }
            PeerOutput::Frame { track, frame } => {
                self.emit(SfuOutput::Frame { track: SfuTrack { generation: g, key: track }, frame }).await
            }
            PeerOutput::TrackEnded { track } => self.emit(SfuOutput::TrackEnded { track: SfuTrack { generation: g, key: track } }).await,
            PeerOutput::Stats { track, stats } => {
                self.emit(SfuOutput::Stats { track: SfuTrack { generation: g, key: track }, stats }).await
            }
        }
        None
    }

    /// Resumes the signalling link of `j`; true when the session goes on.
    async fn resume(&mut self, j: &mut Joined) -> bool {
        for attempt in 1..=RESUME_ATTEMPTS {
            tokio::time::sleep(RETRY_BACKOFF * attempt).await;
            match j.signal.restart(proto::ReconnectReason::RrSignalDisconnected).await {
                Ok(_) => {
                    // The server re-offers with an ICE restart; tell it what we had.
                    j.signal
                        .send(proto::signal_request::Message::SyncState(proto::SyncState {
                            answer: j.last_answer.clone(),
                            offer: j.last_offer.clone(),
                            subscription: Some(proto::UpdateSubscription {
                                track_sids: vec![],
                                subscribe: true,
                                participant_tracks: vec![],
                            }),
                            ..Default::default()
                        }))
                        .await;
                    j.signal.set_reconnected().await;
                    info!(attempt, "LiveKit signalling resumed");
                    return true;
                }
                Err(e) => {
                    warn!(error = %e, attempt, "resuming the LiveKit session failed");
                    if matches!(e, livekit_signaling::SignalError::LeaveRequest { .. }) {
                        return false;
                    }
                }
            }
        }
        false
    }

    /// Closes a session's peer and forwards its last frames (the tracks end).
    async fn finish(&mut self, mut j: Joined) {
        j.signal.close().await;
        j.peer.close().await;
        let g = j.generation;
        let drain = async {
            while let Some(o) = j.peer_out.recv().await {
                match o {
                    PeerOutput::Frame { track, frame } => {
                        self.emit(SfuOutput::Frame { track: SfuTrack { generation: g, key: track }, frame }).await
                    }
                    PeerOutput::TrackEnded { track } => {
                        self.emit(SfuOutput::TrackEnded { track: SfuTrack { generation: g, key: track } }).await
                    }
                    PeerOutput::Stats { track, stats } => {
                        self.emit(SfuOutput::Stats { track: SfuTrack { generation: g, key: track }, stats }).await
                    }
                    _ => {}
                }
            }
        };
        if tokio::time::timeout(Duration::from_secs(5), drain).await.is_err() {
            warn!("the old peer connection's tracks did not finish within 5 s");
        }
    }
}
