//! Group calls in the bot's rooms: the runtime that follows every room's MatrixRTC call session
//! and its media keys, and its MSC3401 mesh group calls, and starts one [`call::RtcCallTask`]
//! (MatrixRTC) or [`crate::bot::mesh::MeshCallTask`] (mesh) per recorded call. Whether a room's
//! call is recorded (config, auto-record, `!rec start|stop`) is decided here the same way for
//! both; a MatrixRTC session wins when a room has both at once.
//!
//! Inputs come from the sync handlers (membership state events, sticky membership events, room
//! member changes, `io.element.call.encryption_keys` to-device and room events) and from the
//! control socket (`mxrec record`). Per room it keeps an [`RtcSession`] (who is in the call,
//! with which LiveKit identity, on which SFU) and a [`KeyRouter`] (which key belongs to which
//! identity); routed keys go into the room's [`RoomKeys`], which the call task decrypts with.
//!
//! A room's call is recorded while it is wanted (listed in `matrixrtc.record_rooms`, or asked for
//! with `mxrec record`) and its session is active (anyone but the bot is in it). Mesh messages
//! to the bot (to-device) reach the task of the room whose recorded group call they name. It stops when
//! the session ends, on `mxrec record --stop`, or at shutdown.

pub mod call;
pub mod matrix;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use matrix_sdk::ruma::{OwnedRoomId, RoomId};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tracing::{debug, info, info_span, warn, Instrument};

use super::BotContext;
use crate::matrixrtc::e2ee::ParticipantKeys;
use crate::matrixrtc::session::{self, KeyRouter, Member, RtcSession, SessionEvent};
use crate::mesh::{MeshSession, PeerDevice};

use super::mesh::{MeshCallTask, MeshCommand};

/// Keys of one room's call, by LiveKit identity; written by the runtime, read by the call task.
pub type RoomKeys = Arc<Mutex<HashMap<String, ParticipantKeys>>>;

/// What the sync handlers and the control socket tell the runtime.
#[derive(Debug)]
pub enum RtcInput {
    /// An `org.matrix.msc3401.call.member` state event.
    LegacyMember { room: OwnedRoomId, state_key: String, sender: String, ts: u64, content: Value, sender_joined: bool },
    /// An `org.matrix.msc4143.rtc.member` sticky event.
    StickyMember { room: OwnedRoomId, sender: String, ts: u64, content: Value, sticky_ms: Option<u64>, sender_joined: bool },
    /// A room member's join state changed.
    Membership { room: OwnedRoomId, user: String, joined: bool },
    /// `io.element.call.encryption_keys` as a decrypted to-device event.
    ToDeviceKeys { sender: String, content: Value },
    /// The older room-event variant.
    RoomKeys { room: OwnedRoomId, sender: String, ts: u64, content: Value },
    /// `mxrec record` or `!rec start|stop`: start (or stop) recording the room's call; `by` is who
    /// asked (a user id, or `mxrec record`).
    Record { room: OwnedRoomId, stop: bool, by: String, reply: oneshot::Sender<Result<String, String>> },
    /// The room's `org.mxrec.config` turned auto-record on or off.
    AutoRecord { room: OwnedRoomId, on: bool, by: String },
    /// An `org.matrix.msc3401.call` state event (a mesh group call).
    MeshCall { room: OwnedRoomId, state_key: String, content: Value },
    /// An `org.matrix.msc3401.call.member` state event with mesh content (`m.calls`), or one that
    /// withdraws a user's mesh devices.
    MeshMember { room: OwnedRoomId, state_key: String, sender: String, ts: u64, content: Value, sender_joined: bool },
    /// A to-device `m.call.*` message (a mesh peer call's).
    MeshToDevice { sender: String, event_type: String, content: Value, encrypted: bool },
}

/// What the runtime tells a call task.
#[derive(Debug)]
pub enum CallCommand {
    Member(SessionEvent),
    /// A key for an identity was installed (the task may retry what it could not decrypt).
    KeyInstalled { identity: String, index: u8 },
    Stop { reason: String },
}

/// The channel to a room's call task, by flavour.
enum CallChannel {
    Rtc(mpsc::UnboundedSender<CallCommand>),
    Mesh { group_call_id: String, commands: mpsc::UnboundedSender<MeshCommand> },
}

impl CallChannel {
    fn stop(&self, reason: &str) {
        match self {
            CallChannel::Rtc(tx) => {
                let _ = tx.send(CallCommand::Stop { reason: reason.into() });
            }
            CallChannel::Mesh { commands, .. } => {
                let _ = commands.send(MeshCommand::Stop { reason: reason.into() });
            }
        }
    }

    fn rtc(&self, cmd: CallCommand) {
        if let CallChannel::Rtc(tx) = self {
            let _ = tx.send(cmd);
        }
    }
}

struct RoomCall {
    commands: CallChannel,
    /// Tells this task from a later one of the same room.
    token: u64,
    /// Set by the task once it has left the call; it may still be storing the recording, and a
    /// new recording of the room may start meanwhile.
    left: Arc<AtomicBool>,
}

impl RoomRtc {
    /// Forgets a call task that has left the call (it finishes storing on its own).
    fn forget_left_call(&mut self) {
        if self.call.as_ref().is_some_and(|c| c.left.load(Ordering::Acquire)) {
            self.call = None;
            self.wanted_once = false;
        }
    }
}

struct RoomRtc {
    session: RtcSession,
    mesh: MeshSession,
    /// The mesh group call last seen running, and the devices last sent to its task.
    mesh_active: Option<String>,
    mesh_sent: Vec<PeerDevice>,
    router: KeyRouter,
    keys: RoomKeys,
    /// Recording requested for the next (or current) call: by config, by the room's
    /// `org.mxrec.config`, or until it ends by `mxrec record` / `!rec start`.
    wanted_by_config: bool,
    wanted_by_state: bool,
    wanted_once: bool,
    /// Stopped (`!rec stop`) while the call runs: not recorded again until it ends.
    stopped: bool,
    /// Who asked for the recording that starts next.
    wanted_by: String,
    call: Option<RoomCall>,
}

pub struct RtcRuntime {
    ctx: Arc<BotContext>,
    next_token: u64,
    rooms: HashMap<OwnedRoomId, RoomRtc>,
    running: JoinSet<(OwnedRoomId, u64)>,
}

fn now_ms() -> u64 {
    storage::now_ms().max(0) as u64
}

impl RtcRuntime {
    pub fn new(ctx: Arc<BotContext>) -> Self {
        Self { ctx, next_token: 0, rooms: HashMap::new(), running: JoinSet::new() }
    }

    fn room(&mut self, room: &OwnedRoomId) -> &mut RoomRtc {
        let ctx = &self.ctx;
        self.rooms.entry(room.clone()).or_insert_with(|| {
            let now = now_ms();
            let mut session = RtcSession::new(room.as_str());
            session.set_own_device(ctx.user_id.as_str(), ctx.device_id.as_str(), now);
            session.set_joined(ctx.user_id.as_str(), true, now);
            let mut router = KeyRouter::new(room.as_str());
            router.set_own_device(ctx.user_id.as_str(), ctx.device_id.as_str());
            let wanted_by_config = ctx.config.matrixrtc.record_rooms.iter().any(|r| r == room.as_str());
            let mut mesh = MeshSession::new();
            mesh.set_own_device(ctx.user_id.as_str(), ctx.device_id.as_str());
            RoomRtc {
                session,
                mesh,
                mesh_active: None,
                mesh_sent: Vec::new(),
                router,
                keys: Arc::new(Mutex::new(HashMap::new())),
                wanted_by_config,
                wanted_by_state: false,
                wanted_once: false,
                stopped: false,
                wanted_by: if wanted_by_config { "config".into() } else { String::new() },
                call: None,
            }
        })
    }

    pub async fn run(mut self, mut inputs: mpsc::Receiver<RtcInput>, mut shutdown: watch::Receiver<bool>) {
        let mut stopping = false;
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                input = inputs.recv(), if !stopping => match input {
                    Some(i) => self.handle(i),
                    None => {
                        stopping = true;
                        self.stop_all("the bot is shutting down");
                    }
                },
                _ = tick.tick() => {
                    let now = now_ms();
                    for r in self.rooms.values_mut() {
                        r.session.tick(now);
                    }
                }
                Some(done) = self.running.join_next(), if !self.running.is_empty() => match done {
                    Ok((room, token)) => {
                        if let Some(r) = self.rooms.get_mut(&room) {
                            if r.call.as_ref().is_some_and(|c| c.token == token) {
                                r.call = None;
                                r.wanted_once = false;
                            }
                        }
                    }
                    Err(e) => warn!(error = %e, "a MatrixRTC call task ended abnormally; its recording may be incomplete"),
                },
                changed = shutdown.changed(), if !stopping => {
                    if changed.is_err() || *shutdown.borrow() {
                        stopping = true;
                        self.stop_all("the bot is shutting down");
                    }
                }
            }
            self.carry_out(stopping);
            if stopping && self.running.is_empty() {
                break;
            }
        }
    }

    fn stop_all(&mut self, reason: &str) {
        for r in self.rooms.values_mut() {
            r.stopped = true;
            if let Some(c) = &r.call {
                c.commands.stop(reason);
            }
        }
    }

    fn handle(&mut self, input: RtcInput) {
        let now = now_ms();
        match input {
            RtcInput::LegacyMember { room, state_key, sender, ts, content, sender_joined } => {
                let r = self.room(&room);
                r.session.set_joined(&sender, sender_joined, now);
                if let Err(e) = r.session.handle_legacy_state_event(&state_key, &sender, ts, &content, now) {
                    warn!(room = %room, %sender, error = %e, "call membership event refused");
                }
            }
            RtcInput::StickyMember { room, sender, ts, content, sticky_ms, sender_joined } => {
                let r = self.room(&room);
                r.session.set_joined(&sender, sender_joined, now);
                if let Err(e) = r.session.handle_sticky_event(&sender, ts, &content, sticky_ms, now) {
                    warn!(room = %room, %sender, error = %e, "sticky call membership event refused");
                }
            }
            RtcInput::Membership { room, user, joined } => {
                if let Some(r) = self.rooms.get_mut(&room) {
                    r.session.set_joined(&user, joined, now);
                    r.mesh.set_joined(&user, joined);
                }
            }
            RtcInput::MeshCall { room, state_key, content } => {
                if let Err(e) = self.room(&room).mesh.handle_call_state(&state_key, &content) {
                    warn!(room = %room, group_call = %state_key, error = %e, "group call state refused; the call counts as ended");
                }
            }
            RtcInput::MeshMember { room, state_key, sender, ts, content, sender_joined } => {
                let r = self.room(&room);
                r.mesh.set_joined(&sender, sender_joined);
                if let Err(e) = r.mesh.handle_member_state(&state_key, &sender, ts, &content) {
                    warn!(room = %room, %sender, error = %e, "group call membership refused");
                }
            }
            RtcInput::MeshToDevice { sender, event_type, content, encrypted } => {
                let conf_id = content.get("conf_id").and_then(Value::as_str).unwrap_or_default();
                let task = self.rooms.values().filter_map(|r| r.call.as_ref()).find_map(|c| match &c.commands {
                    CallChannel::Mesh { group_call_id, commands } if group_call_id == conf_id => Some(commands),
                    _ => None,
                });
                match task {
                    Some(tx) => {
                        let _ = tx.send(MeshCommand::ToDevice { sender, event_type, content, encrypted });
                    }
                    None => debug!(%sender, %event_type, conf_id, "a call message for a group call the bot is not in; ignored"),
                }
            }
            RtcInput::ToDeviceKeys { sender, content } => match session::parse_to_device_keys(&sender, &content) {
                Ok(ev) => {
                    let Ok(room) = RoomId::parse(&ev.room_id) else {
                        warn!(%sender, room = %ev.room_id, "media key for an invalid room id; ignored");
                        return;
                    };
                    self.take_keys(room, ev, now);
                }
                Err(e) => warn!(%sender, error = %e, "malformed io.element.call.encryption_keys to-device event; ignored"),
            },
            RtcInput::RoomKeys { room, sender, ts, content } => {
                match session::parse_room_keys(room.as_str(), &sender, ts, &content) {
                    Ok(ev) => self.take_keys(room, ev, now),
                    Err(e) => warn!(room = %room, %sender, error = %e, "malformed io.element.call.encryption_keys room event; ignored"),
                }
            }
            RtcInput::AutoRecord { room, on, by } => {
                let r = self.room(&room);
                r.wanted_by_state = on;
                if on && !r.wanted_once {
                    r.wanted_by = format!("auto-record (set by {by})");
                }
            }
            RtcInput::Record { room, stop, by, reply } => {
                let joined = self.ctx.client.get_room(&room).is_some_and(|r| r.state() == matrix_sdk::RoomState::Joined);
                let answer = if !joined {
                    Err(format!("the bot is not in {room}; invite it first"))
                } else {
                    let r = self.room(&room);
                    r.forget_left_call();
                    let running = r.session.is_active() || r.mesh.active_call(now).is_some();
                    if stop {
                        // Until the call ends: auto-record starts again with the next call.
                        r.wanted_once = false;
                        r.stopped = running;
                        match &r.call {
                            Some(c) => {
                                c.commands.stop(&format!("stopped by {by}"));
                                Ok(format!("stopping the recording of the call in {room}"))
                            }
                            None => Ok(format!("no call is being recorded in {room}")),
                        }
                    } else {
                        r.wanted_once = true;
                        r.stopped = false;
                        r.wanted_by = by;
                        if r.call.is_some() {
                            Ok(format!("the call in {room} is already being recorded"))
                        } else if running {
                            Ok(format!("recording the call in {room}"))
                        } else {
                            Ok(format!("no call is running in {room}; it will be recorded when one starts"))
                        }
                    }
                };
                let _ = reply.send(answer);
            }
        }
    }

    fn take_keys(&mut self, room: OwnedRoomId, ev: session::EncryptionKeysEvent, now: u64) {
        let sender = ev.sender.clone();
        let r = self.room(&room);
        match r.router.handle_keys(ev, now) {
            Ok(intake) => debug!(room = %room, %sender, ?intake, "media keys received"),
            Err(e) => warn!(room = %room, %sender, error = %e, "media keys refused"),
        }
    }

    /// Moves session events and keys on, and starts/stops call tasks.
    fn carry_out(&mut self, stopping: bool) {
        let mut to_start = Vec::new();
        for (room_id, r) in self.rooms.iter_mut() {
            r.forget_left_call();
            while let Some(ev) = r.session.poll_event() {
                r.router.handle_session_event(&ev);
                match &ev {
                    SessionEvent::MemberJoined(m) => info!(room = %room_id, user = %m.user_id, device = %m.device_id, identity = %m.identity, "joined the call"),
                    SessionEvent::MemberLeft(m) => info!(room = %room_id, user = %m.user_id, device = %m.device_id, "left the call"),
                    SessionEvent::SessionStarted => info!(room = %room_id, "a call started"),
                    SessionEvent::SessionEnded => {
                        info!(room = %room_id, "the call ended");
                        // A stop lasts for the call it stopped; auto-record takes the next one.
                        r.stopped = false;
                    }
                    SessionEvent::MemberUpdated(_) => {}
                }
                if let Some(c) = &r.call {
                    if matches!(ev, SessionEvent::SessionEnded) {
                        c.commands.rtc(CallCommand::Stop { reason: "the call ended".into() });
                    } else {
                        c.commands.rtc(CallCommand::Member(ev));
                    }
                }
            }
            while let Some(k) = r.router.poll_update() {
                let installed = r.keys.lock().unwrap().entry(k.identity.clone()).or_default().set_key(k.index, &k.key);
                match installed {
                    Ok(()) => {
                        debug!(room = %room_id, identity = %k.identity, index = k.index, "media key installed");
                        if let Some(c) = &r.call {
                            c.commands.rtc(CallCommand::KeyInstalled { identity: k.identity.clone(), index: k.index });
                        }
                    }
                    Err(e) => warn!(room = %room_id, identity = %k.identity, error = %e, "media key refused"),
                }
            }
            follow_mesh(room_id, r, now_ms());
            let wanted = !r.stopped && (r.wanted_by_config || r.wanted_by_state || r.wanted_once);
            if !stopping && wanted && r.call.is_none() && (r.session.is_active() || r.mesh_active.is_some()) {
                to_start.push(room_id.clone());
            }
        }
        for room_id in to_start {
            self.start_call(room_id);
        }
    }

    fn start_call(&mut self, room_id: OwnedRoomId) {
        let ctx = self.ctx.clone();
        let Some(r) = self.rooms.get_mut(&room_id) else { return };
        let token = self.next_token;
        self.next_token += 1;
        let left = Arc::new(AtomicBool::new(false));
        let started_by = if r.wanted_once || r.wanted_by_state {
            r.wanted_by.clone()
        } else {
            "config".to_owned()
        };
        if let (false, Some(group_call_id)) = (r.session.is_active(), r.mesh_active.clone()) {
            let (tx, rx) = mpsc::unbounded_channel();
            r.call = Some(RoomCall { commands: CallChannel::Mesh { group_call_id: group_call_id.clone(), commands: tx }, token, left: left.clone() });
            let devices = r.mesh.devices(&group_call_id, now_ms());
            r.mesh_sent = devices.clone();
            let task = MeshCallTask { ctx, room_id: room_id.clone(), group_call_id: group_call_id.clone(), devices, started_by, left };
            let span = info_span!("mesh_call", room = %room_id, group_call = %group_call_id);
            info!(parent: &span, "recording the group call");
            self.running.spawn(
                async move {
                    task.run(rx).await;
                    (room_id, token)
                }
                .instrument(span),
            );
            return;
        }
        let members: Vec<Member> = r.session.members().into_iter().cloned().collect();
        let (tx, rx) = mpsc::unbounded_channel();
        r.call = Some(RoomCall { commands: CallChannel::Rtc(tx), token, left: left.clone() });
        let task = call::RtcCallTask { ctx, room_id: room_id.clone(), keys: r.keys.clone(), members, started_by, left };
        let span = info_span!("rtc_call", room = %room_id);
        info!(parent: &span, "recording the call");
        self.running.spawn(
            async move {
                task.run(rx).await;
                (room_id, token)
            }
            .instrument(span),
        );
    }
}

/// Follows a room's mesh group call: tells a recording task who is in the call now, stops it
/// when its call ends, and lifts a `!rec stop` once the call it stopped is over.
fn follow_mesh(room_id: &OwnedRoomId, r: &mut RoomRtc, now: u64) {
    let active = r.mesh.active_call(now);
    if active != r.mesh_active {
        match (&r.mesh_active, &active) {
            (None, Some(id)) => info!(room = %room_id, group_call = %id, "a group call started"),
            (Some(id), None) => info!(room = %room_id, group_call = %id, "the group call ended"),
            (Some(old), Some(new)) => info!(room = %room_id, %old, %new, "another group call is the room's call now"),
            (None, None) => {}
        }
        if r.mesh_active.is_some() && !r.session.is_active() {
            // A stop lasts for the call it stopped; auto-record takes the next one.
            r.stopped = false;
        }
        r.mesh_active = active.clone();
    }
    let Some(RoomCall { commands: CallChannel::Mesh { group_call_id, commands }, .. }) = &r.call else { return };
    if active.as_deref() != Some(group_call_id.as_str()) {
        let _ = commands.send(MeshCommand::Stop { reason: "the call ended".into() });
        return;
    }
    let devices = r.mesh.devices(group_call_id, now);
    if devices != r.mesh_sent {
        r.mesh_sent = devices.clone();
        let _ = commands.send(MeshCommand::Devices(devices));
    }
}
