//! Room commands: `!rec start|stop|pause|resume|status|list|help|optout|optin`, sent as plain
//! messages in any room the bot is in (encrypted rooms too: matrix-sdk hands the handler the
//! decrypted event).
//!
//! [`parse`], [`authorize`] and [`Limits`] are pure and unit-tested; [`handle`] carries a
//! command out: rate limits, then the power check, then the flavour-independent [`Rooms`]
//! registry (pause, resume, opt-out, status) or the MatrixRTC runtime (start, stop). Every
//! command, allowed or refused, lands in the audit table; the answer is a threaded reply.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use matrix_sdk::ruma::events::room::power_levels::UserPowerLevel;
use matrix_sdk::ruma::{OwnedRoomId, UserId};
use matrix_sdk::Room;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use super::messages;
use super::rooms::Control;
use super::rtc::RtcInput;
use super::BotContext;
use crate::config::ControlConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Start,
    Stop,
    Pause,
    Resume,
    Status,
    List,
    Help,
    OptOut,
    OptIn,
}

impl Command {
    pub fn name(self) -> &'static str {
        match self {
            Command::Start => "start",
            Command::Stop => "stop",
            Command::Pause => "pause",
            Command::Resume => "resume",
            Command::Status => "status",
            Command::List => "list",
            Command::Help => "help",
            Command::OptOut => "optout",
            Command::OptIn => "optin",
        }
    }

    /// Commands that change or reveal recordings for everyone need the power level; status,
    /// help and a participant's own opt-out/opt-in do not.
    pub fn needs_power(self) -> bool {
        matches!(self, Command::Start | Command::Stop | Command::Pause | Command::Resume | Command::List)
    }
}

/// `None` for any message that is not a `!rec` command; `Err` (the reply) for a `!rec` command
/// mxrec does not know.
pub fn parse(body: &str) -> Option<Result<Command, String>> {
    let mut words = body.split_whitespace();
    if !words.next()?.eq_ignore_ascii_case("!rec") {
        return None;
    }
    let Some(word) = words.next() else { return Some(Ok(Command::Help)) };
    let cmd = match word.to_ascii_lowercase().as_str() {
        "start" => Command::Start,
        "stop" => Command::Stop,
        "pause" => Command::Pause,
        "resume" => Command::Resume,
        "status" => Command::Status,
        "list" => Command::List,
        "help" => Command::Help,
        "optout" | "opt-out" => Command::OptOut,
        "optin" | "opt-in" => Command::OptIn,
        _ => {
            let shown: String = word.chars().take(32).collect();
            return Some(Err(format!("`{shown}` is not a command I know. Say `!rec help` for the list.")));
        }
    };
    Some(Ok(cmd))
}

/// Whether `user`, with `power` in the room, may give `cmd`; the refusal says why.
pub fn authorize(cfg: &ControlConfig, cmd: Command, user: &str, power: Option<UserPowerLevel>) -> Result<(), String> {
    if !cmd.needs_power() || cfg.admins.iter().any(|a| a == user) {
        return Ok(());
    }
    let level = match power {
        Some(UserPowerLevel::Infinite) => return Ok(()),
        Some(UserPowerLevel::Int(i)) => i64::from(i),
        // A kind of power level ruma adds later is not trusted.
        Some(_) | None => 0,
    };
    if level >= cfg.power_level {
        Ok(())
    } else {
        Err(format!(
            "Sorry, `!rec {}` needs power level {} in this room (yours is {level}). Ask a moderator.",
            cmd.name(),
            cfg.power_level
        ))
    }
}

/// Why a command or an invite was not taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Limited {
    User,
    Room,
}

/// Per-user and per-room command limits and per-user invite limits.
pub struct Limits {
    users: DefaultKeyedRateLimiter<String>,
    rooms: DefaultKeyedRateLimiter<String>,
    invites: DefaultKeyedRateLimiter<String>,
    /// When a user was last told they are limited: one such reply per minute at most, so the
    /// limit cannot be turned into a way to make the bot talk.
    told: Mutex<HashMap<String, Instant>>,
}

fn per_minute(n: u32) -> Quota {
    Quota::per_minute(NonZeroU32::new(n.max(1)).expect("at least 1"))
}

impl Limits {
    pub fn new(cfg: &ControlConfig) -> Self {
        let hourly = Quota::per_hour(NonZeroU32::new(cfg.invites_per_user_per_hour.max(1)).expect("at least 1"));
        Self {
            users: RateLimiter::keyed(per_minute(cfg.commands_per_user_per_minute)),
            rooms: RateLimiter::keyed(per_minute(cfg.commands_per_room_per_minute)),
            invites: RateLimiter::keyed(hourly),
            told: Mutex::new(HashMap::new()),
        }
    }

    pub fn command(&self, user: &str, room: &str) -> Result<(), Limited> {
        if self.users.check_key(&user.to_owned()).is_err() {
            return Err(Limited::User);
        }
        if self.rooms.check_key(&room.to_owned()).is_err() {
            return Err(Limited::Room);
        }
        Ok(())
    }

    pub fn invite(&self, inviter: &str) -> bool {
        self.invites.check_key(&inviter.to_owned()).is_ok()
    }

    /// Whether a limited user should be told so now.
    fn tell(&self, user: &str) -> bool {
        let mut told = self.told.lock().unwrap();
        let now = Instant::now();
        told.retain(|_, at| now.duration_since(*at) < Duration::from_secs(60));
        match told.get(user) {
            Some(_) => false,
            None => {
                told.insert(user.to_owned(), now);
                true
            }
        }
    }
}

/// A `!rec` message as the sync handler saw it.
pub struct Incoming {
    pub room: Room,
    pub sender: String,
    pub event_id: String,
    /// The thread the command was sent in, if any (replies go there too).
    pub thread_root: Option<String>,
    pub command: Result<Command, String>,
}

/// Carries out one command and replies in its thread.
pub async fn handle(ctx: Arc<BotContext>, inc: Incoming, rtc: mpsc::Sender<RtcInput>) {
    let room_id = inc.room.room_id().to_owned();
    let sender = inc.sender.clone();
    if let Err(which) = ctx.limits.command(&sender, room_id.as_str()) {
        warn!(room = %room_id, %sender, ?which, "command refused: rate limit");
        audit(&ctx, &sender, "command.refused", None, serde_json::json!({"room": room_id.as_str(), "why": format!("rate limit ({which:?})")})).await;
        if ctx.limits.tell(&sender) {
            let why = match which {
                Limited::User => "you have given too many commands in the last minute",
                Limited::Room => "this room has given too many commands in the last minute",
            };
            reply(&inc, &format!("Not now: {why}. Try again in a minute.")).await;
        }
        return;
    }
    let cmd = match inc.command {
        Ok(c) => c,
        Err(ref e) => {
            reply(&inc, e).await;
            return;
        }
    };
    let power = match <&UserId>::try_from(sender.as_str()) {
        Ok(u) => match inc.room.get_member(u).await {
            Ok(Some(m)) => Some(m.power_level()),
            _ => None,
        },
        Err(_) => None,
    };
    if let Err(why) = authorize(&ctx.config.control, cmd, &sender, power) {
        info!(room = %room_id, %sender, command = cmd.name(), "command refused: power level");
        audit(&ctx, &sender, "command.refused", None, serde_json::json!({"room": room_id.as_str(), "command": cmd.name(), "why": "power level"})).await;
        reply(&inc, &why).await;
        return;
    }
    info!(room = %room_id, %sender, command = cmd.name(), "command");
    let answer = run(&ctx, cmd, &room_id, &sender, &rtc).await;
    let recording = ctx.rooms.status(&room_id).and_then(|s| s.recording_id);
    audit(
        &ctx,
        &sender,
        &format!("command.{}", cmd.name()),
        recording.as_deref(),
        serde_json::json!({"room": room_id.as_str(), "answer": answer}),
    )
    .await;
    reply(&inc, &answer).await;
}

async fn run(ctx: &Arc<BotContext>, cmd: Command, room: &OwnedRoomId, sender: &str, rtc: &mpsc::Sender<RtcInput>) -> String {
    let ask = |c: Control| async move {
        match ctx.rooms.send(room, c) {
            None => None,
            Some(rx) => Some(match tokio::time::timeout(Duration::from_secs(15), rx).await {
                Ok(Ok(a)) => a,
                _ => "The recording did not answer; it may be ending.".to_string(),
            }),
        }
    };
    match cmd {
        Command::Help => messages::help_text(&ctx.config.control),
        Command::Status => status_line(ctx, room),
        Command::List => list(ctx, room).await,
        Command::Start => {
            if let Some(s) = ctx.rooms.status(room) {
                return format!("This call is already being recorded (since {}).", messages::hhmm(s.started_at));
            }
            let (tx, rx) = oneshot::channel();
            if rtc.send(RtcInput::Record { room: room.clone(), stop: false, by: sender.to_owned(), reply: tx }).await.is_err() {
                return "The bot is shutting down.".into();
            }
            match tokio::time::timeout(Duration::from_secs(15), rx).await {
                Ok(Ok(Ok(m))) => capitalise(&m),
                Ok(Ok(Err(e))) => capitalise(&e),
                _ => "The bot did not answer.".into(),
            }
        }
        Command::Stop => {
            // The recording notes who stopped it and ends; then a standing wish to record this
            // room's call (auto-record, an earlier start) is withdrawn until the call ends.
            let answer = ask(Control::Stop { by: sender.to_owned() }).await;
            let (tx, rx) = oneshot::channel();
            let _ = rtc.send(RtcInput::Record { room: room.clone(), stop: true, by: sender.to_owned(), reply: tx }).await;
            let _ = tokio::time::timeout(Duration::from_secs(15), rx).await;
            answer.unwrap_or_else(|| "Nothing is being recorded in this room.".into())
        }
        Command::Pause => ask(Control::Pause { by: sender.to_owned() }).await.unwrap_or_else(|| "Nothing is being recorded in this room.".into()),
        Command::Resume => ask(Control::Resume { by: sender.to_owned() }).await.unwrap_or_else(|| "Nothing is being recorded in this room.".into()),
        Command::OptOut => {
            let changed = ctx.rooms.set_opted_out(room, sender, true);
            match ask(Control::OptOut { user: sender.to_owned() }).await {
                Some(a) => a,
                None if changed => "You will not be recorded in this room's calls until you say `!rec optin`.".into(),
                None => "You had opted out already.".into(),
            }
        }
        Command::OptIn => {
            let changed = ctx.rooms.set_opted_out(room, sender, false);
            match ask(Control::OptIn { user: sender.to_owned() }).await {
                Some(a) => a,
                None if changed => "You will be recorded again when this room's calls are recorded.".into(),
                None => "You had not opted out.".into(),
            }
        }
    }
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect::<String>() + if s.ends_with('.') { "" } else { "." },
        None => String::new(),
    }
}

fn status_line(ctx: &BotContext, room: &OwnedRoomId) -> String {
    match ctx.rooms.status(room) {
        None => {
            let auto = ctx.rooms.settings(room).auto_record.unwrap_or(false)
                || ctx.config.matrixrtc.record_rooms.iter().any(|r| r == room.as_str());
            if auto {
                "Nothing is being recorded right now. Calls in this room are recorded automatically.".into()
            } else {
                "Nothing is being recorded right now.".into()
            }
        }
        Some(s) => format!(
            "Recording since {} (started by {}){}.{}",
            messages::hhmm(s.started_at),
            s.started_by,
            if s.paused { ", paused right now" } else { "" },
            s.recording_id.map(|id| format!(" Recording {id}.")).unwrap_or_default()
        ),
    }
}

/// The room's recent recordings, with fresh links to the stored ones.
async fn list(ctx: &BotContext, room: &OwnedRoomId) -> String {
    let recs = match ctx.env.catalog.recent_recordings(&storage::RoomId::new(room.as_str()), 5).await {
        Ok(r) => r,
        Err(e) => {
            warn!(error = %e, "listing recordings failed");
            return "The catalog could not be read; try again later.".into();
        }
    };
    if recs.is_empty() {
        return "This room has no recordings yet.".into();
    }
    let mut lines = vec![format!("The last {} recording{} of this room:", recs.len(), if recs.len() == 1 { "" } else { "s" })];
    for r in recs {
        let when = messages::hhmm(r.started_at_ms);
        let date = chrono::DateTime::from_timestamp_millis(r.started_at_ms).map(|d| d.format("%Y-%m-%d").to_string()).unwrap_or_default();
        if r.state != storage::RecordingState::Uploaded {
            lines.push(format!("- {date} {when}: {} ({})", r.id, r.state));
            continue;
        }
        let objects =
            crate::http::links::shareable_objects(&ctx.env.catalog, ctx.env.store.as_ref(), &r.id, crate::http::links::What::Composite).await;
        let link = match objects {
            Ok(o) => match o.first() {
                Some(obj) => ctx.issue_link(room, &r.id, &obj.key).await.map(|l| l.url).map_err(|e| e.to_string()),
                None => Err("no composite".into()),
            },
            Err(e) => Err(e.to_string()),
        };
        match link {
            Ok(url) => lines.push(format!("- {date} {when}: {url}")),
            Err(e) => lines.push(format!("- {date} {when}: {} (no link: {e})", r.id)),
        }
    }
    lines.join("\n")
}

async fn audit(ctx: &BotContext, actor: &str, action: &str, recording: Option<&str>, detail: serde_json::Value) {
    let rec = recording.map(storage::RecordingId::new);
    if let Err(e) = ctx.env.catalog.audit(actor, action, rec.as_ref(), detail).await {
        warn!(error = %e, action, "cannot write the audit event");
    }
}

/// A notice threaded to the command (in the command's own thread when it was sent in one).
async fn reply(inc: &Incoming, text: &str) {
    let content = messages::threaded_notice(text, &inc.event_id, inc.thread_root.as_deref());
    let mut delay = Duration::from_millis(500);
    for attempt in 1..=3 {
        match inc.room.send_raw("m.room.message", content.clone()).await {
            Ok(_) => return,
            Err(e) if attempt < 3 => {
                warn!(error = %e, attempt, "sending a command reply failed; retrying");
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            Err(e) => warn!(error = %e, "sending a command reply failed; giving up"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use matrix_sdk::ruma::Int;

    #[test]
    fn parse_knows_the_commands_and_ignores_other_messages() {
        assert_eq!(parse("!rec start"), Some(Ok(Command::Start)));
        assert_eq!(parse("  !REC   Pause  now"), Some(Ok(Command::Pause)));
        assert_eq!(parse("!rec"), Some(Ok(Command::Help)));
        assert_eq!(parse("!rec opt-out"), Some(Ok(Command::OptOut)));
        assert_eq!(parse("!rec optin"), Some(Ok(Command::OptIn)));
        for other in ["hello", "", "!record start", "> <@a:b> !rec stop", "please !rec stop"] {
            assert_eq!(parse(other), None, "{other:?}");
        }
        let err = parse("!rec destroy").unwrap().unwrap_err();
        assert!(err.contains("`destroy`") && err.contains("!rec help"), "{err}");
        let long = format!("!rec {}", "x".repeat(500));
        assert!(parse(&long).unwrap().unwrap_err().len() < 120, "an unknown word is not echoed whole");
    }

    #[test]
    fn power_is_needed_for_control_but_not_for_status_help_or_opting_out() {
        let mut cfg = ControlConfig::default();
        cfg.admins = vec!["@root:example.org".into()];
        let p = |n: i64| Some(UserPowerLevel::Int(Int::new(n).unwrap()));
        assert!(authorize(&cfg, Command::Start, "@mod:example.org", p(50)).is_ok());
        assert!(authorize(&cfg, Command::Pause, "@creator:example.org", Some(UserPowerLevel::Infinite)).is_ok());
        let why = authorize(&cfg, Command::Stop, "@user:example.org", p(0)).unwrap_err();
        assert!(why.contains("power level 50") && why.contains("yours is 0"), "{why}");
        assert!(authorize(&cfg, Command::List, "@user:example.org", None).is_err());
        assert!(authorize(&cfg, Command::Start, "@root:example.org", p(0)).is_ok(), "admins");
        for open in [Command::Status, Command::Help, Command::OptOut, Command::OptIn] {
            assert!(authorize(&cfg, open, "@user:example.org", p(0)).is_ok(), "{open:?}");
        }
        cfg.power_level = 100;
        assert!(authorize(&cfg, Command::Start, "@mod:example.org", p(50)).is_err());
    }

    #[test]
    fn limits_count_per_user_and_per_room() {
        let cfg = ControlConfig { commands_per_user_per_minute: 2, commands_per_room_per_minute: 3, invites_per_user_per_hour: 1, ..ControlConfig::default() };
        let l = Limits::new(&cfg);
        assert_eq!(l.command("@a:x", "!r:x"), Ok(()));
        assert_eq!(l.command("@a:x", "!r:x"), Ok(()));
        assert_eq!(l.command("@a:x", "!r:x"), Err(Limited::User));
        assert_eq!(l.command("@a:x", "!other:x"), Err(Limited::User), "the user limit spans rooms");
        assert_eq!(l.command("@b:x", "!r:x"), Ok(()));
        assert_eq!(l.command("@c:x", "!r:x"), Err(Limited::Room));
        assert!(l.tell("@a:x") && !l.tell("@a:x"), "told once a minute");
        assert!(l.invite("@a:x") && !l.invite("@a:x") && l.invite("@b:x"));
    }
}
