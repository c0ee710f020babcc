//! The 1:1 call runtime: the one task that owns the bot's [`Voip1Calls`] machine.
//!
//! Room events (from the sync handlers), peer events (from call tasks), ticks and the shutdown
//! signal go in; the machine's outputs are carried out: room events to the room's outbox, peer
//! commands and recording actions to the call's task (spawned at its first command), ignored input
//! to the log. Nothing here waits on the network, so one slow call never delays another.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use matrix_sdk::ruma::{OwnedRoomId, RoomId};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use super::call::{CallCommand, CallKey, CallReport, CallTask};
use super::messages;
use super::outbox::{Outboxes, Outgoing};
use super::BotContext;
use crate::voip1::{
    self, Action, IgnoreReason, Input, Output, PartyId, PeerCommand, RecordAction, UnixMs, Voip1Calls,
};

/// A room event of an `m.call.*` type, as the sync handler saw it (already cut down to what the
/// machine reads).
pub type CallRoomEvent = voip1::RoomEvent;

pub struct Runtime {
    ctx: Arc<BotContext>,
    calls: Voip1Calls,
    tasks: HashMap<CallKey, mpsc::UnboundedSender<CallCommand>>,
    running: JoinSet<()>,
    outboxes: Outboxes,
    reports_tx: mpsc::UnboundedSender<(CallKey, CallReport)>,
    reports_rx: mpsc::UnboundedReceiver<(CallKey, CallReport)>,
}

pub fn now() -> UnixMs {
    UnixMs(storage::now_ms().max(0) as u64)
}

impl Runtime {
    pub fn new(ctx: Arc<BotContext>) -> Self {
        let calls = Voip1Calls::new(
            ctx.config.webrtc.voip1(),
            voip1::UserId(ctx.user_id.to_string()),
            PartyId(ctx.device_id.to_string()),
        );
        let (reports_tx, reports_rx) = mpsc::unbounded_channel();
        let outboxes = Outboxes::new(ctx.client.clone());
        Self { ctx, calls, tasks: HashMap::new(), running: JoinSet::new(), outboxes, reports_tx, reports_rx }
    }

    /// Runs until `shutdown` turns true and every call has been hung up and stored, or the room
    /// event channel closes.
    pub async fn run(mut self, mut events: mpsc::Receiver<CallRoomEvent>, mut shutdown: watch::Receiver<bool>) {
        let mut stopping = false;
        loop {
            let deadline = self.calls.next_deadline();
            tokio::select! {
                ev = events.recv(), if !stopping => match ev {
                    Some(ev) => self.calls.handle_input(Input::Room(ev)),
                    None => {
                        stopping = true;
                        self.calls.handle_input(Input::StopAll { now: now() });
                    }
                },
                Some((key, report)) = self.reports_rx.recv() => match report {
                    CallReport::Peer(event) => self.calls.handle_input(Input::Peer {
                        room_id: voip1::RoomId(key.room_id.to_string()),
                        call_id: key.call_id,
                        event,
                        now: now(),
                    }),
                    CallReport::HangUp => {
                        info!(room = %key.room_id, call_id = %key.call_id, "recording stopped from the room; hanging up");
                        self.calls.handle_input(Input::Stop {
                            room_id: voip1::RoomId(key.room_id.to_string()),
                            call_id: key.call_id,
                            now: now(),
                        });
                    }
                    CallReport::Ended => {
                        self.tasks.remove(&key);
                    }
                },
                Some(done) = self.running.join_next(), if !self.running.is_empty() => {
                    if let Err(e) = done {
                        warn!(error = %e, "a call task ended abnormally; its recording may be incomplete");
                    }
                }
                () = sleep_until_ms(deadline) => self.calls.handle_input(Input::Tick { now: now() }),
                changed = shutdown.changed(), if !stopping => {
                    if changed.is_err() || *shutdown.borrow() {
                        info!(calls = self.calls.active_calls(), "shutting down: hanging up every call");
                        stopping = true;
                        self.calls.handle_input(Input::StopAll { now: now() });
                    }
                },
            }
            self.carry_out();
            if stopping && self.tasks.is_empty() && self.calls.active_calls() == 0 {
                break;
            }
        }
        while self.running.join_next().await.is_some() {}
        self.outboxes.flush_within(crate::bot::outbox::FLUSH_AT_SHUTDOWN).await;
    }

    fn carry_out(&mut self) {
        while let Some(Output { room_id, call_id, action }) = self.calls.poll_output() {
            let Ok(room) = RoomId::parse(room_id.as_str()) else {
                warn!(room = %room_id, "not a room id; dropping the call machine's output");
                continue;
            };
            match action {
                Action::SendRoomEvent { event_type, content } => {
                    self.outboxes.send(&room, Outgoing::Event { event_type: event_type.to_string(), content });
                }
                Action::Peer(cmd) => {
                    let Some(call_id) = call_id else { continue };
                    self.to_task(CallKey { room_id: room, call_id }, CallCommand::Peer(cmd));
                }
                Action::Record(action) => {
                    let Some(call_id) = call_id else { continue };
                    if let RecordAction::Start { caller, .. } = &action {
                        info!(room = %room, %call_id, %caller, "answered; recording");
                        let notice = messages::recording_started(&self.ctx.bot_name);
                        self.outboxes.send(&room, Outgoing::Notice(notice));
                    }
                    self.to_task(CallKey { room_id: room, call_id }, CallCommand::Record(action));
                }
                Action::Ignored(reason) => log_ignored(&room, call_id.as_ref(), &reason),
                Action::Warn(msg) => warn!(room = %room, call_id = ?call_id.as_ref().map(|c| c.as_str()), "{msg}"),
            }
        }
    }

    /// Hands a command to the call's task, starting the task at the call's first command.
    fn to_task(&mut self, key: CallKey, cmd: CallCommand) {
        if !self.tasks.contains_key(&key) {
            if !matches!(cmd, CallCommand::Peer(PeerCommand::ApplyRemoteOffer { .. })) {
                debug!(room = %key.room_id, call_id = %key.call_id, ?cmd, "command for a call whose task has ended");
                return;
            }
            let (tx, rx) = mpsc::unbounded_channel();
            let task = CallTask {
                ctx: self.ctx.clone(),
                key: key.clone(),
                reports: self.reports_tx.clone(),
                outbox: self.outboxes.queue(&key.room_id),
            };
            self.running.spawn(task.run(rx));
            self.tasks.insert(key.clone(), tx);
        }
        if let Some(tx) = self.tasks.get(&key) {
            let _ = tx.send(cmd);
        }
    }
}

pub(crate) async fn sleep_until_ms(deadline: Option<UnixMs>) {
    match deadline {
        Some(d) => tokio::time::sleep(Duration::from_millis(d.since(now()))).await,
        None => std::future::pending().await,
    }
}

fn log_ignored(room: &OwnedRoomId, call_id: Option<&voip1::CallId>, reason: &IgnoreReason) {
    let call_id = call_id.map(|c| c.as_str()).unwrap_or("-");
    match reason {
        IgnoreReason::Malformed(_) | IgnoreReason::NotApplicable { .. } | IgnoreReason::UnexpectedAnswerCreated => {
            warn!(%room, call_id, "refused: {reason}")
        }
        IgnoreReason::Busy { .. } | IgnoreReason::NotForUs { .. } | IgnoreReason::Expired { .. } | IgnoreReason::NotOneToOne { .. } => {
            info!(%room, call_id, "not answered: {reason}")
        }
        // An event for a call the bot never heard of (a stray hangup, say) is refused visibly;
        // candidates held for an invite that may still come are not worth a line each.
        IgnoreReason::UnknownCall => info!(%room, call_id, "refused: {reason}"),
        _ => debug!(%room, call_id, "ignored: {reason}"),
    }
}
