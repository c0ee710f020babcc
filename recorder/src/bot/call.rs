//! One 1:1 call's media side: the task that owns the call's receive-only peer connection and its
//! [`Recording`].
//!
//! It executes, in order, the peer commands and recording actions the call machine emitted (via
//! the runtime), reports what the peer connection says back to the runtime, and feeds every frame
//! to the recording. When the call stops it closes the connection, drains the last frames,
//! finalizes the recording (segments verified in the store, composite, per-track files, manifest,
//! catalog) and posts the links to the room.
//!
//! The recording itself (clock, start, labels, mutes) is [`super::media::CallMedia`], shared with
//! mesh group calls; this call is its one connection, number 0.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use matrix_sdk::ruma::OwnedRoomId;
use tokio::sync::mpsc;
use tracing::{info, info_span, warn, Instrument};

use super::media::CallMedia;
use super::messages::{self, SavedFile};
use super::outbox::Outgoing;
use super::rooms::{self, next_request, Control, Registration};
use super::BotContext;
use crate::peer::{IceServer, PeerConfig, RecvPeer};
use crate::voip1::{self, PeerCommand, PeerEvent, PeerFailure, RecordAction};

/// After the connection is closed, how long the last frames may take to drain.
pub(crate) const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// What the runtime hands the call task.
#[derive(Debug)]
pub enum CallCommand {
    Peer(PeerCommand),
    Record(RecordAction),
}

/// What the call task tells the runtime.
#[derive(Debug)]
pub enum CallReport {
    Peer(PeerEvent),
    /// Someone in the room stopped the recording (`!rec stop`): the bot hangs up.
    HangUp,
    /// The task is done (recording stored or given up); the runtime forgets the call.
    Ended,
}

struct EndedGuard {
    reports: mpsc::UnboundedSender<(CallKey, CallReport)>,
    key: CallKey,
}

impl Drop for EndedGuard {
    fn drop(&mut self) {
        let _ = self.reports.send((self.key.clone(), CallReport::Ended));
    }
}

/// Identifies a call for the runtime.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CallKey {
    pub room_id: OwnedRoomId,
    pub call_id: voip1::CallId,
}

pub struct CallTask {
    pub ctx: Arc<BotContext>,
    pub key: CallKey,
    pub reports: mpsc::UnboundedSender<(CallKey, CallReport)>,
    pub outbox: mpsc::UnboundedSender<Outgoing>,
}

impl CallTask {
    pub async fn run(self, cmds: mpsc::UnboundedReceiver<CallCommand>) {
        let span = info_span!("call", room = %self.key.room_id, call_id = %self.key.call_id);
        // Reports the end even if the task panics, so the runtime never waits for it forever.
        let _ended = EndedGuard { reports: self.reports.clone(), key: self.key.clone() };
        self.run_inner(cmds).instrument(span).await;
    }

    fn report(&self, ev: PeerEvent) {
        let _ = self.reports.send((self.key.clone(), CallReport::Peer(ev)));
    }

    async fn run_inner(self, mut cmds: mpsc::UnboundedReceiver<CallCommand>) {
        let epoch = Instant::now();
        let mut cfg = PeerConfig::new(self.ctx.config.webrtc.bind_addrs.clone(), epoch);
        cfg.ice_servers = ice_servers(&self.ctx.config.webrtc);
        let (mut peer, mut out) = match RecvPeer::new(cfg).await {
            Ok(p) => p,
            Err(e) => {
                warn!(error = %e, "cannot create the peer connection");
                self.report(PeerEvent::PeerFailed { reason: PeerFailure::Other(e.to_string()) });
                // Wait for the machine's Stop so the runtime sees the call end in order.
                while let Some(cmd) = cmds.recv().await {
                    if matches!(cmd, CallCommand::Record(RecordAction::Stop { .. }) | CallCommand::Peer(PeerCommand::Close)) {
                        break;
                    }
                }
                return;
            }
        };
        let flavour = storage::manifest::CallFlavour::Voip1;
        let mut media = CallMedia::new(self.ctx.clone(), self.key.room_id.clone(), flavour, self.key.call_id.as_str(), epoch);
        let mut registered = false;
        let mut stopping = false;
        let mut drain_deadline: Option<tokio::time::Instant> = None;
        let mut reg: Option<Registration> = None;
        loop {
            if reg.is_none() && !stopping {
                // Room commands reach the call from the answer on: the caller is known then.
                if let (Some(caller), false) = (media.first_party(), registered) {
                    registered = true;
                    reg = Registration::open(&self.ctx.rooms, &self.key.room_id, "voip1", caller, &self.outbox);
                    if let Some(r) = &reg {
                        media.optouts = r.optouts.clone();
                    }
                }
            }
            if let Some(r) = reg.as_mut() {
                r.publish_recording_id(media.recording.as_ref(), &self.outbox);
            }
            tokio::select! {
                Some((c, reply)) = next_request(&mut reg), if !stopping => {
                    let at = media.now_us().max(0);
                    let Some(r) = reg.as_ref() else { continue };
                    let answer = rooms::apply(&self.ctx, &self.key.room_id, r, media.recording.as_mut(), &mut media.pending, c.clone(), at, &self.outbox).await;
                    let _ = reply.send(answer);
                    if matches!(c, Control::Stop { .. }) {
                        // The call machine hangs up and then stops this task as for any hangup.
                        let _ = self.reports.send((self.key.clone(), CallReport::HangUp));
                    }
                }
                cmd = cmds.recv(), if !stopping => match cmd {
                    Some(CallCommand::Peer(cmd)) => self.execute(&mut peer, cmd).await,
                    Some(CallCommand::Record(RecordAction::Stop { reason, .. })) => {
                        info!(?reason, "call ended; closing the connection");
                        stopping = true;
                        peer.close().await;
                        drain_deadline = Some(tokio::time::Instant::now() + DRAIN_TIMEOUT);
                    }
                    Some(CallCommand::Record(action)) => media.on_record(0, None, action).await,
                    None => {
                        stopping = true;
                        peer.close().await;
                        drain_deadline = Some(tokio::time::Instant::now() + DRAIN_TIMEOUT);
                    }
                },
                o = out.recv() => match o {
                    Some(o) => {
                        if let Some(ev) = media.on_output(0, o, Some(&peer)).await {
                            self.report(ev);
                        }
                    }
                    None => break,
                },
                () = sleep_until(drain_deadline) => {
                    warn!("tracks did not finish within {DRAIN_TIMEOUT:?} of closing; finishing with what arrived");
                    break;
                }
            }
        }
        drop(peer);
        if let Some(r) = reg.take() {
            r.close(&self.outbox);
        }
        if let Some(notice) = media.finish("no media arrived from the caller").await {
            let _ = self.outbox.send(Outgoing::Notice(notice));
        }
    }

    async fn execute(&self, peer: &mut RecvPeer, cmd: PeerCommand) {
        if let Some(ev) = super::media::execute(peer, cmd).await {
            self.report(ev);
        }
    }
}

pub(crate) async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

pub(crate) fn ice_servers(cfg: &crate::config::WebrtcConfig) -> Vec<IceServer> {
    if cfg.ice_servers.is_empty() {
        return Vec::new();
    }
    vec![IceServer {
        urls: cfg.ice_servers.clone(),
        username: cfg.turn_username.clone().unwrap_or_default(),
        credential: cfg.turn_password.clone().unwrap_or_default(),
    }]
}

/// Links and sizes of a finished recording, for the room.
pub(super) fn saved_files(
    finished: &crate::pipeline::Finished,
    links: &HashMap<String, crate::http::Link>,
) -> (Option<SavedFile>, Vec<SavedFile>) {
    let composite = finished.manifest.outputs.first().and_then(|o| {
        links.get(&o.key).map(|l| SavedFile {
            label: "Composite".into(),
            detail: format!("{}, {}", o.kind.as_str().to_uppercase(), messages::human_bytes(o.bytes)),
            url: l.url.clone(),
        })
    });
    let tracks = finished
        .track_files
        .iter()
        .filter_map(|t| {
            links.get(&t.key).map(|l| SavedFile {
                label: format!("Track {}", t.track_id),
                detail: format!("{}, {}", t.codec_label, messages::human_bytes(t.bytes)),
                url: l.url.clone(),
            })
        })
        .collect();
    (composite, tracks)
}
