//! What the bot knows per room about recording control, shared by every call flavour: the
//! recording running there (if any) and the channel to its call task, who opted out, and the
//! room's own settings (`org.mxrec.config`).
//!
//! A call task registers when it starts recording and holds a [`Registration`]; dropping it
//! unregisters. Room commands (`!rec pause`, `!rec optout`…) reach the task through
//! [`Rooms::send`] whatever the flavour, and the task answers with the line the command's reply
//! says. Opt-outs outlive a recording: they apply to every later call of the room until
//! `!rec optin` (kept in memory; a restart forgets them, which the audit table records).

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use matrix_sdk::ruma::OwnedRoomId;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use super::outbox::Outgoing;
use super::BotContext;
use crate::pipeline::Recording;

/// The state event that tells clients and bots whether a room's call is being recorded.
pub const RECORDING_STATE_EVENT_TYPE: &str = "org.mxrec.recording";
/// The state event a room sets to change how mxrec treats it.
pub const CONFIG_STATE_EVENT_TYPE: &str = "org.mxrec.config";

/// A request to a running recording.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    Pause { by: String },
    Resume { by: String },
    OptOut { user: String },
    OptIn { user: String },
    Stop { by: String },
}

/// A control request and where its outcome goes (one line for the reply).
pub type ControlRequest = (Control, oneshot::Sender<String>);

/// `org.mxrec.recording` content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RecordingStatus {
    pub active: bool,
    pub started_by: String,
    /// Unix ms.
    pub started_at: i64,
    pub paused: bool,
    pub flavour: String,
    pub recording_id: Option<String>,
}

/// A room's `org.mxrec.config`, as far as it was set by someone allowed to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RoomSettings {
    pub auto_record: Option<bool>,
    pub members_only_links: Option<bool>,
}

impl RoomSettings {
    /// Reads the keys mxrec knows; others are ignored, wrong types are an error.
    pub fn parse(content: &serde_json::Value) -> Result<Self, String> {
        let Some(obj) = content.as_object() else { return Err("the content is not a JSON object".into()) };
        let flag = |key: &str| -> Result<Option<bool>, String> {
            match obj.get(key) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(serde_json::Value::Bool(b)) => Ok(Some(*b)),
                Some(other) => Err(format!("`{key}` must be true or false, not {other}")),
            }
        };
        Ok(Self { auto_record: flag("auto_record")?, members_only_links: flag("members_only_links")? })
    }
}

struct Active {
    token: u64,
    status: RecordingStatus,
    tx: mpsc::UnboundedSender<ControlRequest>,
}

#[derive(Default)]
struct Room {
    active: Option<Active>,
    optouts: BTreeSet<String>,
    settings: RoomSettings,
}

#[derive(Default)]
pub struct Rooms {
    rooms: Mutex<HashMap<OwnedRoomId, Room>>,
    next: AtomicU64,
}

/// A call task's hold on its room's control channel; dropping it unregisters.
pub struct Registration {
    rooms: Arc<Rooms>,
    room: OwnedRoomId,
    token: u64,
    pub requests: mpsc::UnboundedReceiver<ControlRequest>,
    /// Users of the room who had opted out when the recording started.
    pub optouts: BTreeSet<String>,
    id_published: bool,
}

impl Registration {
    /// Registers the room's recording (started by `started_by`) and announces it in the state
    /// event; `None`, logged, when another recording of the room holds the registry.
    pub fn open(
        rooms: &Arc<Rooms>,
        room: &OwnedRoomId,
        flavour: &str,
        started_by: &str,
        outbox: &mpsc::UnboundedSender<Outgoing>,
    ) -> Option<Self> {
        let status = RecordingStatus {
            active: true,
            started_by: started_by.to_owned(),
            started_at: storage::now_ms(),
            paused: false,
            flavour: flavour.to_owned(),
            recording_id: None,
        };
        let reg = rooms.register(room, status.clone());
        match &reg {
            Some(_) => publish_status(outbox, &status),
            None => tracing::warn!("another recording of this room is running; room commands reach that one"),
        }
        reg
    }

    /// Puts the recording's id in the state event, once, when the recording exists.
    pub fn publish_recording_id(&mut self, rec: Option<&Recording>, outbox: &mpsc::UnboundedSender<Outgoing>) {
        let Some(rec) = rec.filter(|_| !self.id_published) else { return };
        self.id_published = true;
        if let Some(status) = self.update(|s| s.recording_id = Some(rec.id().to_string())) {
            publish_status(outbox, &status);
        }
    }

    /// Unregisters and announces that nothing is recorded any more.
    pub fn close(self, outbox: &mpsc::UnboundedSender<Outgoing>) {
        if let Some(status) = self.update(|s| {
            s.active = false;
            s.paused = false;
        }) {
            publish_status(outbox, &status);
        }
    }

    /// Updates what `!rec status` and the state event say; returns the new status.
    pub fn update(&self, f: impl FnOnce(&mut RecordingStatus)) -> Option<RecordingStatus> {
        let mut rooms = self.rooms.rooms.lock().unwrap();
        let a = rooms.get_mut(&self.room)?.active.as_mut().filter(|a| a.token == self.token)?;
        f(&mut a.status);
        Some(a.status.clone())
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut rooms = self.rooms.rooms.lock().unwrap();
        if let Some(r) = rooms.get_mut(&self.room) {
            if r.active.as_ref().is_some_and(|a| a.token == self.token) {
                r.active = None;
            }
        }
    }
}

impl Rooms {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Registers the recording of `room`'s call; `None` when another one is registered there
    /// (one recording per room).
    pub fn register(self: &Arc<Self>, room: &OwnedRoomId, status: RecordingStatus) -> Option<Registration> {
        let mut rooms = self.rooms.lock().unwrap();
        let r = rooms.entry(room.clone()).or_default();
        if r.active.is_some() {
            return None;
        }
        let token = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        r.active = Some(Active { token, status, tx });
        Some(Registration {
            rooms: self.clone(),
            room: room.clone(),
            token,
            requests: rx,
            optouts: r.optouts.clone(),
            id_published: false,
        })
    }

    /// The running recording's status.
    pub fn status(&self, room: &OwnedRoomId) -> Option<RecordingStatus> {
        self.rooms.lock().unwrap().get(room).and_then(|r| r.active.as_ref()).map(|a| a.status.clone())
    }

    /// Hands a request to the room's running recording; `None` when nothing is recorded there.
    pub fn send(&self, room: &OwnedRoomId, c: Control) -> Option<oneshot::Receiver<String>> {
        let rooms = self.rooms.lock().unwrap();
        let a = rooms.get(room)?.active.as_ref()?;
        let (tx, rx) = oneshot::channel();
        a.tx.send((c, tx)).ok()?;
        Some(rx)
    }

    /// Remembers a user's opt-out (or opt-in) for the room's later recordings; false when it
    /// was so already.
    pub fn set_opted_out(&self, room: &OwnedRoomId, user: &str, out: bool) -> bool {
        let mut rooms = self.rooms.lock().unwrap();
        let r = rooms.entry(room.clone()).or_default();
        if out {
            r.optouts.insert(user.to_owned())
        } else {
            r.optouts.remove(user)
        }
    }

    pub fn is_opted_out(&self, room: &OwnedRoomId, user: &str) -> bool {
        self.rooms.lock().unwrap().get(room).is_some_and(|r| r.optouts.contains(user))
    }

    pub fn set_settings(&self, room: &OwnedRoomId, settings: RoomSettings) {
        self.rooms.lock().unwrap().entry(room.clone()).or_default().settings = settings;
    }

    pub fn settings(&self, room: &OwnedRoomId) -> RoomSettings {
        self.rooms.lock().unwrap().get(room).map(|r| r.settings).unwrap_or_default()
    }
}

/// The next control request of a registered recording; never resolves without a registration
/// (for `select!` in the call tasks).
pub async fn next_request(reg: &mut Option<Registration>) -> Option<ControlRequest> {
    match reg {
        Some(r) => r.requests.recv().await,
        None => std::future::pending().await,
    }
}

/// Posts a recording's status as the room's `org.mxrec.recording` state event.
pub fn publish_status(outbox: &mpsc::UnboundedSender<Outgoing>, status: &RecordingStatus) {
    let content = serde_json::to_value(status).unwrap_or_default();
    let _ = outbox.send(Outgoing::State {
        event_type: RECORDING_STATE_EVENT_TYPE.into(),
        state_key: String::new(),
        content,
    });
}

/// Control requests that came before the recording had its first frame; replayed at its start.
#[derive(Debug, Default)]
pub struct Pending {
    requests: Vec<Control>,
}

impl Pending {
    fn paused(&self) -> bool {
        self.requests
            .iter()
            .rev()
            .find_map(|c| match c {
                Control::Pause { .. } => Some(true),
                Control::Resume { .. } => Some(false),
                _ => None,
            })
            .unwrap_or(false)
    }

    /// Replays the requests on the recording that has just started, at its zero.
    pub async fn replay(&mut self, rec: &mut Recording) -> anyhow::Result<()> {
        for c in std::mem::take(&mut self.requests) {
            effect(rec, &c, 0).await?;
        }
        Ok(())
    }
}

/// What a request does to a recording; false when it changed nothing (paused already…).
async fn effect(rec: &mut Recording, c: &Control, at_us: i64) -> anyhow::Result<bool> {
    match c {
        Control::Pause { by } => rec.pause(by, at_us).await,
        Control::Resume { by } => rec.resume(by, at_us).await,
        Control::OptOut { user } => rec.opt_out(user, user, at_us).await,
        Control::OptIn { user } => rec.opt_in(user, user, at_us).await,
        Control::Stop { by } => rec.note("stop", by, at_us).await.map(|()| true),
    }
}

/// Carries out a request on a running recording of any flavour (or notes it for the recording
/// about to start), announces pauses and resumptions in the room, keeps the state event up to
/// date, and returns the line the command's reply says. `Stop` only notes who stopped it: ending
/// the call task is the caller's part.
pub async fn apply(
    ctx: &BotContext,
    room: &OwnedRoomId,
    reg: &Registration,
    rec: Option<&mut Recording>,
    pending: &mut Pending,
    c: Control,
    at_us: i64,
    outbox: &mpsc::UnboundedSender<Outgoing>,
) -> String {
    let changed = match rec {
        Some(rec) => match effect(rec, &c, at_us).await {
            Ok(changed) => changed,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), request = ?c, "a recording control request failed");
                return format!("That did not work: {e:#}");
            }
        },
        None => {
            let changed = match &c {
                Control::Pause { .. } => !pending.paused(),
                Control::Resume { .. } => pending.paused(),
                _ => true,
            };
            if changed {
                pending.requests.push(c.clone());
            }
            changed
        }
    };
    match (&c, changed) {
        (Control::Pause { by } | Control::Resume { by }, true) => {
            let paused = matches!(c, Control::Pause { .. });
            let name = ctx.display_name(room, by).await;
            let word = if paused { "paused" } else { "resumed" };
            let _ = outbox.send(Outgoing::Notice(super::messages::recording_control(word, &name)));
            if let Some(status) = reg.update(|s| s.paused = paused) {
                publish_status(outbox, &status);
            }
            format!("Recording {word}.")
        }
        (Control::Pause { .. }, false) => "The recording is paused already.".into(),
        (Control::Resume { .. }, false) => "The recording is not paused.".into(),
        (Control::OptOut { .. }, true) => {
            "From now on your audio and video are left out of this recording (and later ones in this room) until you say `!rec optin`.".into()
        }
        (Control::OptOut { .. }, false) => "Your audio and video are left out already.".into(),
        (Control::OptIn { .. }, true) => "Your audio and video are recorded again from now on.".into(),
        (Control::OptIn { .. }, false) => "You had not opted out.".into(),
        (Control::Stop { by }, _) => {
            let name = ctx.display_name(room, by).await;
            let _ = outbox.send(Outgoing::Notice(super::messages::recording_control("stopped", &name)));
            "Stopping; the links follow when the recording is stored.".into()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(by: &str) -> RecordingStatus {
        RecordingStatus {
            active: true,
            started_by: by.into(),
            started_at: 1,
            paused: false,
            flavour: "voip1".into(),
            recording_id: None,
        }
    }

    #[tokio::test]
    async fn one_recording_per_room_and_requests_reach_it_until_it_is_dropped() {
        let rooms = Rooms::new();
        let room: OwnedRoomId = "!a:example.org".try_into().unwrap();
        let other: OwnedRoomId = "!b:example.org".try_into().unwrap();
        assert!(rooms.set_opted_out(&room, "@bob:example.org", true));
        assert!(!rooms.set_opted_out(&room, "@bob:example.org", true), "already out");
        let mut reg = rooms.register(&room, status("@mod:example.org")).unwrap();
        assert!(reg.optouts.contains("@bob:example.org"), "earlier opt-outs reach the new recording");
        assert!(rooms.register(&room, status("@x:example.org")).is_none(), "one per room");
        assert!(rooms.send(&other, Control::Pause { by: "@m:example.org".into() }).is_none());
        let answer = rooms.send(&room, Control::Pause { by: "@m:example.org".into() }).unwrap();
        let (c, reply) = reg.requests.recv().await.unwrap();
        assert_eq!(c, Control::Pause { by: "@m:example.org".into() });
        reply.send("paused".into()).unwrap();
        assert_eq!(answer.await.unwrap(), "paused");
        reg.update(|s| s.paused = true);
        assert!(rooms.status(&room).unwrap().paused);
        drop(reg);
        assert!(rooms.status(&room).is_none());
        assert!(rooms.send(&room, Control::Resume { by: "@m:example.org".into() }).is_none());
        assert!(rooms.register(&room, status("@x:example.org")).is_some(), "free again");
    }

    #[test]
    fn requests_before_the_first_frame_are_kept_in_order_and_pause_toggles() {
        let mut p = Pending::default();
        assert!(!p.paused());
        p.requests.push(Control::Pause { by: "@m:x".into() });
        assert!(p.paused());
        p.requests.push(Control::OptOut { user: "@b:x".into() });
        assert!(p.paused(), "an opt-out does not end the pause");
        p.requests.push(Control::Resume { by: "@m:x".into() });
        assert!(!p.paused());
    }

    #[test]
    fn room_settings_read_known_flags_and_refuse_wrong_types() {
        let s = RoomSettings::parse(&serde_json::json!({"auto_record": true, "other": 1})).unwrap();
        assert_eq!(s, RoomSettings { auto_record: Some(true), members_only_links: None });
        let s = RoomSettings::parse(&serde_json::json!({})).unwrap();
        assert_eq!(s, RoomSettings::default());
        assert!(RoomSettings::parse(&serde_json::json!({"auto_record": "yes"})).unwrap_err().contains("auto_record"));
        assert!(RoomSettings::parse(&serde_json::json!([1])).is_err());
    }
}
