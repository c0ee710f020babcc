//! What the bot sends to a room, sent in order by one task per room.
//!
//! Order matters in a call: `m.call.answer` must reach the caller before the candidates that
//! follow it, and the "being recorded" notice should not overtake the answer. Each room therefore
//! has one queue drained by one task. A send that fails is retried with back-off under the same
//! transaction id (the homeserver deduplicates it), then logged and dropped: a call event that
//! cannot be delivered ends in the call machine's timeouts, never in a stuck queue.

use std::collections::HashMap;
use std::time::Duration;

use matrix_sdk::ruma::events::room::message::RoomMessageEventContent;
use matrix_sdk::ruma::{OwnedRoomId, TransactionId};
use matrix_sdk::Client;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{debug, info_span, warn, Instrument};

use super::messages::Notice;

/// Attempts per message the homeserver refuses (the first send and its retries).
const ATTEMPTS: u32 = 4;
/// How long a message waits for a homeserver that does not answer (restarting, unreachable).
const UNREACHABLE_FOR: Duration = Duration::from_secs(15 * 60);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How long a shutdown waits for queued messages.
pub const FLUSH_AT_SHUTDOWN: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub enum Outgoing {
    /// A room event of any type (the call machine's `m.call.*`), encrypted if the room is.
    Event { event_type: String, content: Value },
    /// An `m.notice` with an HTML body.
    Notice(Notice),
    /// A state event (`org.mxrec.recording`); needs the power to send it, else it is logged.
    State { event_type: String, state_key: String, content: Value },
}

/// One call task's own ordered queue to its room: its notices go out in order, with retries, and
/// what is queued when the task ends is still sent.
pub fn call_queue(client: Client, room_id: OwnedRoomId) -> mpsc::UnboundedSender<Outgoing> {
    let (tx, mut rx) = mpsc::unbounded_channel::<Outgoing>();
    tokio::spawn(async move {
        let mut boxes = Outboxes::new(client);
        while let Some(msg) = rx.recv().await {
            boxes.send(&room_id, msg);
        }
        boxes.flush().await;
    });
    tx
}

/// The per-room queues of one bot.
pub struct Outboxes {
    client: Client,
    rooms: HashMap<OwnedRoomId, mpsc::UnboundedSender<Outgoing>>,
    tasks: JoinSet<()>,
}

impl Outboxes {
    pub fn new(client: Client) -> Self {
        Self { client, rooms: HashMap::new(), tasks: JoinSet::new() }
    }

    /// The queue of `room_id` (created on first use); clones may be handed to other tasks.
    pub fn queue(&mut self, room_id: &OwnedRoomId) -> mpsc::UnboundedSender<Outgoing> {
        if let Some(tx) = self.rooms.get(room_id).filter(|tx| !tx.is_closed()) {
            return tx.clone();
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let span = info_span!("outbox", room = %room_id);
        self.tasks.spawn(drain(self.client.clone(), room_id.clone(), rx).instrument(span));
        self.rooms.insert(room_id.clone(), tx.clone());
        tx
    }

    pub fn send(&mut self, room_id: &OwnedRoomId, msg: Outgoing) {
        let _ = self.queue(room_id).send(msg);
    }

    /// Closes every queue and waits until what was queued has been sent (or given up on). Queues
    /// handed out with [`Outboxes::queue`] keep their task alive until they are dropped too.
    pub async fn flush(mut self) {
        self.rooms.clear();
        while self.tasks.join_next().await.is_some() {}
    }

    /// [`Outboxes::flush`] for a shutdown: waits at most `within`, as a homeserver that is away
    /// must not hold the process for the quarter of an hour a message would otherwise wait for
    /// it; what is left is logged and dropped.
    pub async fn flush_within(mut self, within: Duration) {
        self.rooms.clear();
        let drained = tokio::time::timeout(within, async { while self.tasks.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            warn!(rooms = self.tasks.len(), "the homeserver did not take every queued message in time; dropping the rest");
            self.tasks.abort_all();
        }
    }
}

async fn drain(client: Client, room_id: OwnedRoomId, mut rx: mpsc::UnboundedReceiver<Outgoing>) {
    while let Some(msg) = rx.recv().await {
        let Some(room) = client.get_room(&room_id) else {
            warn!("the bot is not in this room; dropping a message for it");
            continue;
        };
        let txn = TransactionId::new();
        let mut backoff = Duration::from_millis(500);
        let mut refused = 0;
        let since = tokio::time::Instant::now();
        loop {
            let sent = match &msg {
                Outgoing::Event { event_type, content } => room
                    .send_raw(event_type, content.clone())
                    .with_transaction_id(&txn)
                    .await
                    .map(|r| r.response.event_id),
                Outgoing::Notice(n) => room
                    .send(RoomMessageEventContent::notice_html(n.plain.clone(), n.html.clone()))
                    .with_transaction_id(txn.clone())
                    .await
                    .map(|r| r.response.event_id),
                Outgoing::State { event_type, state_key, content } => {
                    room.send_state_event_raw(event_type, state_key, content.clone()).await.map(|r| r.event_id)
                }
            };
            let e = match sent {
                Ok(event_id) => {
                    debug!(%event_id, kind = kind(&msg), "sent");
                    break;
                }
                Err(e) => e,
            };
            // The homeserver answered no (a refusal, a rate limit): a few tries. It did not answer
            // at all (restarting, unreachable): keep the message until it is back.
            let answered = e.as_client_api_error().is_some();
            if answered {
                refused += 1;
            }
            if refused >= ATTEMPTS || since.elapsed() >= UNREACHABLE_FOR {
                warn!(error = %e, kind = kind(&msg), "sending failed; giving up on this message");
                break;
            }
            warn!(error = %e, answered, retry_in_ms = backoff.as_millis() as u64, kind = kind(&msg), "sending failed; retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
}

fn kind(msg: &Outgoing) -> &str {
    match msg {
        Outgoing::Event { event_type, .. } => event_type,
        Outgoing::Notice(_) => "m.notice",
        Outgoing::State { event_type, .. } => event_type,
    }
}
