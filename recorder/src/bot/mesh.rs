//! One recorded mesh group call (MSC3401): the task that makes the bot a member of the call,
//! keeps one receive-only peer connection per device in it, records them all into one
//! recording, and posts the links at the end.
//!
//! Order of things: publish the bot's device in its `org.matrix.msc3401.call.member` state
//! (a fresh session id) → post "This call is being recorded" → place and answer peer calls as the
//! [`MeshCall`] machine says, following the devices the runtime reports → record until told to
//! stop (the call ended, `!rec stop`, shutdown) → hang up every peer call → close the connections
//! and drain them → withdraw the membership → finalize → post the links (or why there is nothing).
//!
//! To-device messages go out unencrypted to a device that writes to the bot unencrypted (as
//! matrix-js-sdk does), Olm-encrypted to one that encrypts. Each send is its own task: the
//! receiver reorders by `seq`, so a slow send holds up nothing.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use matrix_sdk::ruma::events::AnyToDeviceEventContent;
use matrix_sdk::ruma::serde::Raw;
use matrix_sdk::ruma::{OwnedRoomId, TransactionId};
use serde_json::Value;
use tokio::sync::mpsc;
use tracing::{debug, info, warn, Instrument};

use super::call::{ice_servers, sleep_until, DRAIN_TIMEOUT};
use super::runtime::sleep_until_ms;
use super::media::{self, CallMedia, ConnNo};
use super::messages;
use super::outbox::Outgoing;
use super::rooms::{self, next_request, Control, Registration};
use super::BotContext;
use crate::mesh::events::{member_content, MEMBER_EVENT_TYPE};
use crate::mesh::{MeshCall, MeshIgnore, MeshInput, MeshOutput, PeerDevice, PeerKey};
use crate::peer::{PeerConfig, PeerOutput, RecvPeer};
use crate::voip1::{CallId, PeerCommand, PeerEvent, PeerFailure, RecordAction, UnixMs};

/// How long the bot's device entry is valid; it is refreshed at 3/4 of that (as js-sdk does).
const MEMBERSHIP_TTL: Duration = Duration::from_secs(3600);
/// After the bot hangs up, how long peers may take to end their calls.
const HANGUP_WAIT: Duration = Duration::from_secs(10);
/// How long after a newcomer joins a recorded call the notice mentioning them is sent.
const MENTION_DELAY: Duration = Duration::from_secs(5);

/// What the runtime tells a mesh call task.
#[derive(Debug)]
pub enum MeshCommand {
    /// The devices in the call now.
    Devices(Vec<PeerDevice>),
    /// A to-device `m.call.*` message for this group call; `encrypted` when it came Olm-encrypted.
    ToDevice { sender: String, event_type: String, content: Value, encrypted: bool },
    Stop { reason: String },
}

pub struct MeshCallTask {
    pub ctx: Arc<BotContext>,
    pub room_id: OwnedRoomId,
    pub group_call_id: String,
    pub devices: Vec<PeerDevice>,
    /// Who asked for the recording (a user id, `config`, `auto-record (set by …)`).
    pub started_by: String,
    /// Set once the bot has left the call (the recording is then being stored).
    pub left: Arc<AtomicBool>,
}

/// One peer connection: the device at its other end and the peer call it carries.
struct Conn {
    peer: RecvPeer,
    key: PeerKey,
    call_id: CallId,
}

fn now() -> UnixMs {
    super::runtime::now()
}

impl MeshCallTask {
    pub async fn run(self, mut cmds: mpsc::UnboundedReceiver<MeshCommand>) {
        let outbox = super::outbox::call_queue(self.ctx.client.clone(), self.room_id.clone());
        let session_id = uuid::Uuid::now_v7().simple().to_string();
        if let Err(e) = self.publish_membership(Some(&session_id)).await {
            warn!(error = %format!("{e:#}"), "cannot join the group call");
            let _ = outbox.send(Outgoing::Notice(messages::recording_failed(&format!("the bot could not join the call: {e:#}"))));
            return;
        }
        info!(group_call = %self.group_call_id, session = %session_id, devices = self.devices.len(), "in the group call");
        let _ = outbox.send(Outgoing::Notice(messages::recording_started(&self.ctx.bot_name)));
        let mut reg = Registration::open(&self.ctx.rooms, &self.room_id, "mesh", &self.started_by, &outbox);
        let epoch = Instant::now();
        let flavour = storage::manifest::CallFlavour::Mesh;
        let mut media = CallMedia::new(self.ctx.clone(), self.room_id.clone(), flavour, &self.group_call_id, epoch);
        media.optouts = reg.as_ref().map(|r| r.optouts.clone()).unwrap_or_default();
        let mut machine = MeshCall::new(
            self.ctx.config.webrtc.voip1(),
            &self.group_call_id,
            self.ctx.user_id.as_str(),
            self.ctx.device_id.as_str(),
            &session_id,
        );
        let mut edge = Edge {
            ctx: self.ctx.clone(),
            room_id: self.room_id.clone(),
            epoch,
            conns: HashMap::new(),
            by_call: HashMap::new(),
            next_conn: 0,
            merged: None,
            encrypted: HashSet::new(),
            announced: self.devices.iter().map(|d| d.user_id.clone()).collect(),
            outbox: outbox.clone(),
        };
        let (merged_tx, mut merged) = mpsc::unbounded_channel::<(ConnNo, PeerOutput)>();
        edge.merged = Some(merged_tx);
        machine.handle_input(MeshInput::Devices { devices: self.devices.clone(), now: now() });

        let mut refresh = tokio::time::interval(MEMBERSHIP_TTL * 3 / 4);
        refresh.tick().await;
        let mut stopping: Option<tokio::time::Instant> = None;
        let reason = loop {
            edge.carry_out(&mut machine, &mut media).await;
            if let Some(r) = reg.as_mut() {
                r.publish_recording_id(media.recording.as_ref(), &outbox);
            }
            if stopping.is_some() && machine.is_done() {
                break None;
            }
            let deadline = machine.next_deadline();
            tokio::select! {
                Some((c, reply)) = next_request(&mut reg), if stopping.is_none() => {
                    let at = media.now_us().max(0);
                    let Some(r) = reg.as_ref() else { continue };
                    let answer = rooms::apply(&self.ctx, &self.room_id, r, media.recording.as_mut(), &mut media.pending, c.clone(), at, &outbox).await;
                    let _ = reply.send(answer);
                    if let Control::Stop { by } = c {
                        info!(%by, "recording stopped from the room; leaving the call");
                        stopping = Some(tokio::time::Instant::now() + HANGUP_WAIT);
                        machine.handle_input(MeshInput::Stop { now: now() });
                    }
                }
                c = cmds.recv(), if stopping.is_none() => match c {
                    Some(MeshCommand::Devices(devices)) => machine.handle_input(MeshInput::Devices { devices, now: now() }),
                    Some(MeshCommand::ToDevice { sender, event_type, content, encrypted }) => {
                        edge.note_encryption(&sender, &content, encrypted);
                        machine.handle_input(MeshInput::ToDevice { sender, event_type, content, now: now() });
                    }
                    Some(MeshCommand::Stop { reason }) => {
                        info!(%reason, "leaving the call");
                        stopping = Some(tokio::time::Instant::now() + HANGUP_WAIT);
                        machine.handle_input(MeshInput::Stop { now: now() });
                    }
                    None => {
                        stopping = Some(tokio::time::Instant::now() + HANGUP_WAIT);
                        machine.handle_input(MeshInput::Stop { now: now() });
                    }
                },
                Some((no, o)) = merged.recv() => edge.on_output(&mut machine, &mut media, no, o).await,
                () = sleep_until_ms(deadline) => machine.handle_input(MeshInput::Tick { now: now() }),
                _ = refresh.tick() => {
                    if let Err(e) = self.publish_membership(Some(&session_id)).await {
                        warn!(error = %format!("{e:#}"), "refreshing the bot's call membership failed; retrying at the next refresh");
                    }
                }
                () = sleep_until(stopping) => break Some("peers did not end their calls in time"),
            }
        };
        if let Some(why) = reason {
            warn!("{why}; closing the connections anyway");
        }
        // Close every connection and keep taking their last frames while they drain.
        for c in edge.conns.values_mut() {
            c.peer.close().await;
        }
        edge.merged = None;
        let deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
        while let Ok(Some((no, o))) = tokio::time::timeout_at(deadline, merged.recv()).await {
            media.on_output(no, o, None).await;
        }
        drop(edge);
        if let Err(e) = self.publish_membership(None).await {
            warn!(error = %format!("{e:#}"), "withdrawing the bot's call membership failed; it expires within the hour");
        }
        self.left.store(true, Ordering::Release);
        if let Some(r) = reg.take() {
            r.close(&outbox);
        }
        if let Some(notice) = media.finish("no media arrived from the call").await {
            let _ = outbox.send(Outgoing::Notice(notice));
        }
    }

    /// Puts the bot's device in the call (`session` given) or takes it out.
    async fn publish_membership(&self, session: Option<&str>) -> anyhow::Result<()> {
        let room = self.ctx.client.get_room(&self.room_id).ok_or_else(|| anyhow!("the bot is not in the room"))?;
        let expires = storage::now_ms().max(0) as u64 + MEMBERSHIP_TTL.as_millis() as u64;
        let content = member_content(session.map(|s| (self.group_call_id.as_str(), self.ctx.device_id.as_str(), s, expires)));
        tokio::time::timeout(Duration::from_secs(30), room.send_state_event_raw(MEMBER_EVENT_TYPE, self.ctx.user_id.as_str(), content))
            .await
            .context("the homeserver did not answer within 30 s")?
            .context("sending the call membership")?;
        debug!(joined = session.is_some(), "call membership published");
        Ok(())
    }
}

/// The task's IO side: the connections, and what carries the machine's outputs out.
struct Edge {
    ctx: Arc<BotContext>,
    room_id: OwnedRoomId,
    epoch: Instant,
    conns: HashMap<ConnNo, Conn>,
    by_call: HashMap<(PeerKey, CallId), ConnNo>,
    next_conn: ConnNo,
    /// Where every connection's outputs go, tagged; `None` once the task stops taking new ones.
    merged: Option<mpsc::UnboundedSender<(ConnNo, PeerOutput)>>,
    /// Devices that write to the bot Olm-encrypted, answered the same way.
    encrypted: HashSet<PeerKey>,
    /// Users told that the call is recorded (by the start notice or a mention).
    announced: HashSet<String>,
    outbox: mpsc::UnboundedSender<Outgoing>,
}

impl Edge {
    fn note_encryption(&mut self, sender: &str, content: &Value, encrypted: bool) {
        let Some(device) = content.get("device_id").and_then(Value::as_str) else { return };
        let key = PeerKey { user_id: sender.to_owned(), device_id: device.to_owned() };
        if encrypted {
            self.encrypted.insert(key);
        } else {
            self.encrypted.remove(&key);
        }
    }

    async fn on_output(&mut self, machine: &mut MeshCall, media: &mut CallMedia, no: ConnNo, o: PeerOutput) {
        let conn = self.conns.get(&no);
        let ev = media.on_output(no, o, conn.map(|c| &c.peer)).await;
        if let (Some(ev), Some(c)) = (ev, conn) {
            machine.handle_input(MeshInput::Peer { peer: c.key.clone(), call_id: c.call_id.clone(), event: ev, now: now() });
        }
    }

    /// Carries out everything the machine has said, feeding back what the connections answer.
    async fn carry_out(&mut self, machine: &mut MeshCall, media: &mut CallMedia) {
        while let Some(o) = machine.poll_output() {
            match o {
                MeshOutput::SendToDevice { user_id, device_id, event_type, content } => {
                    let encrypted = self.encrypted.contains(&PeerKey { user_id: user_id.clone(), device_id: device_id.clone() });
                    let ctx = self.ctx.clone();
                    let span = tracing::info_span!("to_device", to = %user_id, device = %device_id, %event_type);
                    tokio::spawn(
                        async move {
                            if let Err(e) = send_to_device(&ctx, &user_id, &device_id, event_type, content, encrypted).await {
                                warn!(error = %format!("{e:#}"), "a call message could not be sent; the peer call's timeouts take it from here");
                            }
                        }
                        .instrument(span),
                    );
                }
                MeshOutput::Peer { peer, call_id, cmd } => {
                    let Some(no) = self.conn_for(&peer, &call_id, &cmd).await else {
                        if matches!(cmd, PeerCommand::CreateOffer | PeerCommand::ApplyRemoteOffer { .. }) {
                            let reason = PeerFailure::Other("the peer connection could not be created".into());
                            machine.handle_input(MeshInput::Peer { peer, call_id, event: PeerEvent::PeerFailed { reason }, now: now() });
                        }
                        continue;
                    };
                    let closing = matches!(cmd, PeerCommand::Close);
                    let Some(conn) = self.conns.get_mut(&no) else { continue };
                    if let Some(ev) = media::execute(&mut conn.peer, cmd).await {
                        machine.handle_input(MeshInput::Peer { peer: peer.clone(), call_id: call_id.clone(), event: ev, now: now() });
                    }
                    if closing {
                        // Its last frames still drain through `merged`; a new call gets a new connection.
                        self.by_call.remove(&(peer, call_id));
                    }
                }
                MeshOutput::Record { peer, call_id, action } => {
                    let no = self.by_call.get(&(peer.clone(), call_id.clone())).copied().or_else(|| {
                        self.conns.iter().find(|(_, c)| c.key == peer && c.call_id == call_id).map(|(n, _)| *n)
                    });
                    let Some(no) = no else {
                        debug!(%peer, %call_id, "a recording action for a connection that is gone");
                        continue;
                    };
                    if let RecordAction::Start { .. } = &action {
                        info!(%peer, %call_id, "peer call up; recording it");
                        self.mention(&peer.user_id);
                    }
                    if let RecordAction::Stop { reason, .. } = &action {
                        info!(%peer, %call_id, ?reason, "peer call ended");
                    }
                    media.on_record(no, Some(&peer.participant_id()), action).await;
                }
                MeshOutput::Ignored { peer, reason } => {
                    let peer = peer.map(|p| p.to_string()).unwrap_or_default();
                    match &reason {
                        MeshIgnore::Malformed(_) | MeshIgnore::GapSkipped { .. } => warn!(%peer, "refused: {reason}"),
                        MeshIgnore::OtherSession | MeshIgnore::UnknownCall { .. } | MeshIgnore::Leaving => info!(%peer, "ignored: {reason}"),
                        _ => debug!(%peer, "ignored: {reason}"),
                    }
                }
                MeshOutput::Warn(m) => warn!("{m}"),
            }
        }
    }

    /// The connection of a peer call, created at its first command (an offer to make or apply).
    async fn conn_for(&mut self, peer: &PeerKey, call_id: &CallId, cmd: &PeerCommand) -> Option<ConnNo> {
        if let Some(no) = self.by_call.get(&(peer.clone(), call_id.clone())) {
            return Some(*no);
        }
        if !matches!(cmd, PeerCommand::CreateOffer | PeerCommand::ApplyRemoteOffer { .. }) {
            debug!(%peer, %call_id, ?cmd, "a command for a connection that is gone");
            return None;
        }
        let merged = self.merged.clone()?;
        let mut cfg = PeerConfig::new(self.ctx.config.webrtc.bind_addrs.clone(), self.epoch);
        cfg.ice_servers = ice_servers(&self.ctx.config.webrtc);
        let (rp, mut out) = match RecvPeer::new(cfg).await {
            Ok(p) => p,
            Err(e) => {
                warn!(%peer, error = %e, "cannot create the peer connection");
                return None;
            }
        };
        let no = self.next_conn;
        self.next_conn += 1;
        tokio::spawn(async move {
            while let Some(o) = out.recv().await {
                if merged.send((no, o)).is_err() {
                    break;
                }
            }
        });
        self.conns.insert(no, Conn { peer: rp, key: peer.clone(), call_id: call_id.clone() });
        self.by_call.insert((peer.clone(), call_id.clone()), no);
        Some(no)
    }

    /// Tells a user who was not in the call when the notice went out that it is recorded.
    fn mention(&mut self, user: &str) {
        if user == self.ctx.user_id.as_str() || !self.announced.insert(user.to_owned()) {
            return;
        }
        let (ctx, room_id, user, outbox) = (self.ctx.clone(), self.room_id.clone(), user.to_owned(), self.outbox.clone());
        tokio::spawn(async move {
            tokio::time::sleep(MENTION_DELAY).await;
            let name = ctx.display_name(&room_id, &user).await;
            let content = messages::being_recorded_mention(&user, &name, &ctx.bot_name);
            let _ = outbox.send(Outgoing::Event { event_type: "m.room.message".into(), content });
        });
    }
}

/// Sends one call message to one device: plain, or Olm-encrypted when `encrypted`.
async fn send_to_device(
    ctx: &BotContext,
    user_id: &str,
    device_id: &str,
    event_type: &str,
    content: Value,
    encrypted: bool,
) -> anyhow::Result<()> {
    use matrix_sdk::ruma::api::client::to_device::send_event_to_device::v3::Request;
    use matrix_sdk::ruma::to_device::DeviceIdOrAllDevices;
    use matrix_sdk::ruma::{OwnedDeviceId, OwnedUserId};
    let user = OwnedUserId::try_from(user_id).context("the peer's user id")?;
    let device = OwnedDeviceId::from(device_id);
    let raw: Raw<AnyToDeviceEventContent> = Raw::new(&content).context("serialising the message")?.cast_unchecked();
    if encrypted {
        // The bot tracks the devices of users it shares an encrypted room with; a peer in an
        // unencrypted room is looked up once (a keys query) before the first encrypted reply.
        let mut dev = None;
        for _ in 0..2 {
            dev = ctx.client.encryption().get_device(&user, &device).await.context("looking up the peer's device")?;
            if dev.is_some() {
                break;
            }
            if let Err(e) = ctx.client.encryption().request_user_identity(&user).await {
                debug!(error = %e, "keys query for a peer");
            }
        }
        let dev = dev.ok_or_else(|| anyhow!("the homeserver lists no device {device_id} of {user_id} to encrypt for"))?;
        let failed = ctx
            .client
            .encryption()
            // `Default::default()` is `CollectStrategy::AllDevices` (matrix-sdk does not re-export the type).
            .encrypt_and_send_raw_to_device(vec![&dev], event_type, raw, Default::default())
            .await
            .context("sending the encrypted message")?;
        if !failed.is_empty() {
            return Err(anyhow!("the message could not be encrypted for {user_id} {device_id}"));
        }
        return Ok(());
    }
    let mut messages = std::collections::BTreeMap::new();
    messages.entry(user).or_insert_with(std::collections::BTreeMap::new).insert(DeviceIdOrAllDevices::DeviceId(device), raw);
    // One transaction id for every attempt: the homeserver delivers a retried message once.
    let txn = TransactionId::new();
    let mut delay = Duration::from_millis(500);
    for attempt in 1..=4 {
        let req = Request::new_raw(event_type.into(), txn.clone(), messages.clone());
        match ctx.client.send(req).await {
            Ok(_) => return Ok(()),
            Err(e) if attempt < 4 => {
                debug!(error = %e, attempt, "sending a call message failed; retrying");
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            Err(e) => return Err(e).context("sending the message"),
        }
    }
    unreachable!("the last attempt returns")
}
