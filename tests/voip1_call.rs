//! A 1:1 Matrix call recorded end to end through real servers: Synapse, Garage (S3), `mxrec run`
//! as the bot, and aiortc (an independent WebRTC implementation) sending the media. A fresh bot
//! and caller are registered per test; the caller makes a DM with the bot, calls it, sends 10 s of
//! synthetic video (a frame counter, a white flash every second) and audio (a beep at every
//! flash), and hangs up. Then, as a user and an auditor would: the room holds the "being recorded"
//! notice and, within 10 s of the hangup, a notice with links; the composite link serves an
//! H.264 + AAC MP4 of 10 ± 0.5 s with moving video, audible audio and flashes on beeps (≤ 40 ms);
//! every track link serves a decodable file; the manifest in the bucket lists segments whose
//! SHA-256 match the stored objects.
//!
//! - `plain_room_call`: the caller is `tests/peers/matrix_caller.py` (plain HTTP + aiortc), in an
//!   unencrypted room.
//! - `encrypted_room_call_and_malformed_input`: the caller is a matrix-sdk client in this test,
//!   in an encrypted room, relaying SDP between the bot and `tests/peers/aiortc_sender.py`. Before
//!   the call it sends malformed call events (bad SDP, an invite for someone else, a flood of
//!   candidates, a hangup for an unknown call); the bot must refuse them and stay up.
//! - `room_commands_steer_a_call_and_links_are_members_only`: `!rec` pause/resume/stop, the
//!   `org.mxrec.recording` state and members-only links.
//! - `a_call_cut_by_sigkill_is_recovered_at_restart`: mxrec is SIGKILLed 6 s into a 12 s call and
//!   started again; it finishes the recording from the catalog and the spool (open segments
//!   salvaged) and posts the links, marked as recovered.
//! - `the_store_away_for_a_minute_twice_loses_nothing`: Garage is stopped for 60 s from 3 s into
//!   the call and again during the finalize; the uploads are retried (and counted in /metrics)
//!   and the recording arrives whole, every segment matching its manifest's SHA-256.
//! - `a_homeserver_restart_mid_call_loses_nothing`: Synapse is stopped from 3 s into the call for
//!   20 s; the media (peer to peer) is recorded whole, the bot keeps syncing and posts the links
//!   after the hangup that follows its return.
//!
//! Needs `MXREC_TEST_HOMESERVER`/`MXREC_TEST_SYNAPSE_SECRET` (deploy/dev/synapse.sh env) and the
//! S3 env of deploy/dev/garage.sh; `make test` (deploy/dev/test.sh) provides both. The two tests
//! take turns (A/V timing on two cores, and one of them stops the shared Garage).

#![recursion_limit = "256"]

mod harness;

use std::path::Path;
use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use harness::*;
use matrix_sdk::config::SyncSettings;
use matrix_sdk::ruma::api::client::room::create_room::v3::{Request as CreateRoomRequest, RoomPreset};
use matrix_sdk::ruma::events::room::encryption::RoomEncryptionEventContent;
use matrix_sdk::ruma::events::InitialStateEvent;
use matrix_sdk::ruma::OwnedUserId;
use matrix_sdk::{Client, LoopCtrl, Room};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::time::Instant;

/// How long the caller sends media after connecting, and so the composite's length.
const CALL_SECONDS: f64 = 10.0;
/// Flash and beep must coincide this closely in the composite.
const MAX_AV_OFFSET_MS: f64 = 40.0;
/// How long the tests wait for the links notice after the hangup. This bounds a hang, it is not a
/// speed check: the time from hangup to links is printed (server timestamps) and kept as a figure,
/// since a timed assertion fails on a slower or busier machine for no fault of the code (CI did).
const LINKS_WITHIN_MS: i64 = 120_000;
/// First login, key upload and first sync of a fresh bot.
const BOT_READY_TIMEOUT: Duration = Duration::from_secs(120);

/// Both tests use the CPU heavily while media flows; they must not overlap.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}

/// The servers, or a skip.
fn servers(test: &str) -> Option<(Synapse, S3)> {
    match (synapse(), s3()) {
        (Some(hs), Some(s3)) => Some((hs, s3)),
        (None, _) => {
            skip(test, "MXREC_TEST_HOMESERVER / MXREC_TEST_SYNAPSE_SECRET are not set (deploy/dev/synapse.sh env)");
            None
        }
        (_, None) => {
            skip(test, "MXREC_S3_ENDPOINT is not set (deploy/dev/garage.sh env)");
            None
        }
    }
}

/// A fresh bot and caller on the homeserver, and `mxrec run` as the bot, ready for invites.
struct Setup {
    // Fields drop in order: mxrec is stopped before its work dir is deleted.
    mxrec: MxrecRun,
    dir: tempfile::TempDir,
    suffix: String,
    prefix: String,
    bot: String,
    bot_device: String,
    caller: String,
    caller_password: String,
    http_base: String,
}

async fn setup(hs: &Synapse, s3: &S3) -> Setup {
    setup_with(hs, s3, "").await
}

/// [`setup`] with `extra` appended to the bot's config file (tables the harness does not write).
async fn setup_with(hs: &Synapse, s3: &S3, extra: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let suffix = unique_suffix();
    let bot_password = format!("bot-pw-{suffix}");
    let caller_password = format!("caller-pw-{suffix}");
    let bot = register_user(hs, &format!("mxrec-bot-{suffix}"), &bot_password);
    let caller = register_user(hs, &format!("caller-{suffix}"), &caller_password);
    let prefix = format!("voip1-{suffix}");
    let data_dir = dir.path().join("data");
    let bot_setup = BotSetup {
        data_dir: &data_dir,
        homeserver: &hs.homeserver,
        user: &bot,
        password: &bot_password,
        allowed_inviters: &[caller.as_str()],
        http_port: free_port(),
        s3,
        prefix: &prefix,
    };
    let config = dir.path().join("mxrec.toml");
    bot_setup.write(&config);
    if !extra.is_empty() {
        let mut text = std::fs::read_to_string(&config).unwrap();
        text.push('\n');
        text.push_str(extra);
        std::fs::write(&config, text).unwrap();
    }
    let http_base = bot_setup.http_base();
    eprintln!("bot {bot}, caller {caller}, objects under {prefix}/, work dir {}", dir.path().display());

    let mut mxrec = MxrecRun::start(dir.path(), &config);
    let listening = mxrec.wait_line("listening:", BOT_READY_TIMEOUT).await;
    assert_eq!(listening.trim_end_matches('/'), http_base, "mxrec listens where the config says");
    let bot_line = mxrec.wait_line("bot:", BOT_READY_TIMEOUT).await;
    // `bot: @rec:localhost device ABCDEFGH`
    let (who, device) = bot_line.split_once(" device ").unwrap_or_else(|| panic!("odd bot line: {bot_line:?}"));
    assert_eq!(who.trim(), bot, "the bot logged in as the configured user");
    let bot_device = device.trim().to_owned();
    assert!(!bot_device.is_empty(), "the bot line names a device: {bot_line:?}");
    Setup { mxrec, dir, suffix, prefix, bot, bot_device, caller, caller_password, http_base }
}

/// `/healthz` of the bot's HTTP server answers 200.
async fn assert_healthy(http_base: &str, after: &str) {
    let r = reqwest::Client::new()
        .get(format!("{http_base}/healthz"))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{http_base}/healthz after {after}: {e}"));
    assert_eq!(r.status(), 200, "{http_base}/healthz after {after}");
}

/// Whether every m-section of an answer is receive-only (or inactive): the bot sends nothing.
fn sdp_is_recvonly(sdp: &str) -> bool {
    let dirs: Vec<&str> = sdp
        .lines()
        .map(str::trim)
        .filter(|l| matches!(*l, "a=recvonly" | "a=sendrecv" | "a=sendonly" | "a=inactive"))
        .collect();
    !dirs.is_empty() && dirs.iter().all(|d| *d == "a=recvonly" || *d == "a=inactive") && dirs.contains(&"a=recvonly")
}

/// A notice's body / timestamp / id from `{body, origin_server_ts, event_id}` JSON.
struct Notice {
    body: String,
    ts: i64,
    event_id: String,
}

impl Notice {
    fn from_json(v: &Value) -> Option<Self> {
        Some(Notice {
            body: v.get("body")?.as_str()?.to_owned(),
            ts: v.get("origin_server_ts")?.as_i64()?,
            event_id: v.get("event_id").and_then(Value::as_str).unwrap_or_default().to_owned(),
        })
    }
}

/// Checks both notices (the recording notice may come before the hangup; the links notice after
/// it, its delay printed), then the recording itself.
async fn verify_notices_and_recording(
    s: &Setup,
    s3: &S3,
    room_id: &str,
    hangup_ts: i64,
    recording: Option<Notice>,
    links: Option<Notice>,
) {
    let recording = recording.expect("the room holds the bot's `This call is being recorded by` notice");
    assert!(
        recording.body.starts_with("This call is being recorded by "),
        "recording notice body: {:?}",
        recording.body
    );
    let links =
        links.unwrap_or_else(|| panic!("no links notice from the bot within {LINKS_WITHIN_MS} ms of the hangup"));
    assert!(!links.body.starts_with("Recording failed:"), "the bot says: {}", links.body);
    let delay = links.ts - hangup_ts;
    eprintln!("links notice {} came {delay} ms after the hangup:\n{}", links.event_id, links.body);
    assert!(delay >= 0, "the links notice ({}) predates the hangup ({hangup_ts})", links.ts);
    let notice = LinksNotice::parse(&links.body);
    assert!(notice.tracks.len() >= 2, "a Track link per track (audio + video): {:?}", notice.tracks);
    let work = s.dir.path().join("verify");
    std::fs::create_dir_all(&work).unwrap();
    let manifest =
        verify_call_recording(&work, s3, &s.prefix, room_id, &s.caller, &notice, CALL_SECONDS, MAX_AV_OFFSET_MS).await;
    assert_eq!(manifest.call.flavour, storage::manifest::CallFlavour::Voip1, "a 1:1 VoIP call in the manifest");
}

// -------------------------------------------------------------------------------------------------
// Test 1: tests/peers/matrix_caller.py (plain HTTP + aiortc) calls the bot in an unencrypted DM.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_room_call() {
    let Some((hs, s3)) = servers("voip1_call::plain_room_call") else { return };
    let _turn = serial();
    let mut s = setup(&hs, &s3).await;

    let script = repo_root().join("tests/peers/matrix_caller.py");
    let child = tokio::process::Command::new(python())
        .arg(&script)
        .args(["--homeserver", &hs.homeserver, "--user", &s.caller, "--password", &s.caller_password])
        .args(["--bot", &s.bot, "--seconds", &CALL_SECONDS.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", script.display()));
    let out = tokio::time::timeout(Duration::from_secs(240), child.wait_with_output())
        .await
        .expect("matrix_caller.py finished within 240 s")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let result: Value = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<Value>(l.trim()).ok().filter(|v| v.get("room_id").is_some()))
        .unwrap_or_else(|| panic!("matrix_caller.py ({}) printed no result JSON line:\n{stdout}", out.status));
    eprintln!("matrix_caller.py ({}): {result}", out.status);
    assert_eq!(result["error"], Value::Null, "matrix_caller.py reports an error");
    assert!(out.status.success(), "matrix_caller.py failed ({})", out.status);
    s.mxrec.assert_running("the call");

    let room_id = result["room_id"].as_str().expect("room_id").to_owned();
    assert_eq!(result["caller"].as_str(), Some(s.caller.as_str()), "the caller is who we registered");
    assert!(result["call_id"].as_str().is_some_and(|c| !c.is_empty()), "a call id");
    assert_eq!(result["answer_sdp_recvonly"], json!(true), "the bot's answer is receive-only");
    assert_eq!(result["hangup_by"], json!("caller"), "the caller hung up, not the bot");
    let connected = result["connected_ts_ms"].as_i64().expect("connected_ts_ms");
    let hangup = result["hangup_ts_ms"].as_i64().expect("hangup_ts_ms");
    let sent_ms = hangup - connected;
    assert!(
        (sent_ms as f64 - CALL_SECONDS * 1000.0).abs() < 2000.0,
        "the caller sent for {sent_ms} ms, not ~{CALL_SECONDS} s"
    );
    let recording = Notice::from_json(&result["recording_notice"]);
    let links = Notice::from_json(&result["links_notice"]);
    verify_notices_and_recording(&s, &s3, &room_id, hangup, recording, links).await;

    s.mxrec.assert_running("the recording was verified");
    let status = s.mxrec.stop(Duration::from_secs(30));
    assert!(status.success(), "mxrec exits 0 on SIGTERM, not {status}");
}

/// Percent-encodes a path segment (room and event ids).
fn pct(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

// -------------------------------------------------------------------------------------------------
// Test 2: a matrix-sdk caller in an encrypted DM; malformed input first, then a real call.

/// A timeline event the caller's client saw, as the sync delivered it (decrypted when it was
/// encrypted: then `encrypted` is true, from the client's `EncryptionInfo`).
#[derive(Clone, Debug)]
struct Seen {
    room_id: String,
    event: Value,
    encrypted: bool,
}

impl Seen {
    fn ty(&self) -> &str {
        self.event["type"].as_str().unwrap_or_default()
    }
    fn sender(&self) -> &str {
        self.event["sender"].as_str().unwrap_or_default()
    }
    fn content(&self) -> &Value {
        &self.event["content"]
    }
    fn call_id(&self) -> &str {
        self.content()["call_id"].as_str().unwrap_or_default()
    }
    fn ts(&self) -> i64 {
        self.event["origin_server_ts"].as_i64().unwrap_or_default()
    }
    fn event_id(&self) -> &str {
        self.event["event_id"].as_str().unwrap_or_default()
    }
    fn body(&self) -> &str {
        self.content()["body"].as_str().unwrap_or_default()
    }
    fn notice(&self) -> Notice {
        Notice { body: self.body().to_owned(), ts: self.ts(), event_id: self.event_id().to_owned() }
    }
}

/// Everything the caller's sync loop delivered, in order, with waiting.
struct Inbox {
    rx: tokio::sync::mpsc::UnboundedReceiver<Seen>,
    seen: Vec<Seen>,
    room_id: String,
    /// The caller's user id.
    me: String,
}

impl Inbox {
    /// Moves what has arrived into `seen` (events of other rooms are dropped).
    fn pull(&mut self) {
        while let Ok(ev) = self.rx.try_recv() {
            self.keep(ev);
        }
    }

    fn keep(&mut self, ev: Seen) {
        if ev.room_id == self.room_id {
            let interesting =
                ev.ty().starts_with("m.call.") || ev.ty() == "m.room.message" || ev.ty() == "m.room.encrypted";
            // Our own candidate flood is not worth a line per event.
            if interesting && !(ev.sender() == self.me && ev.ty() == "m.call.candidates") {
                eprintln!(
                    "caller sees {} from {} (call {:?}, encrypted: {}){}",
                    ev.ty(),
                    ev.sender(),
                    ev.call_id(),
                    ev.encrypted,
                    if ev.ty() == "m.room.message" { format!(": {:?}", ev.body()) } else { String::new() }
                );
            }
            self.seen.push(ev);
        }
    }

    /// The first event (already seen or arriving before `deadline`) matching `pred`.
    async fn wait_for(&mut self, deadline: Instant, pred: impl Fn(&Seen) -> bool) -> Option<Seen> {
        self.pull();
        if let Some(ev) = self.seen.iter().find(|e| pred(e)) {
            return Some(ev.clone());
        }
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(ev)) => {
                    let hit = ev.room_id == self.room_id && pred(&ev);
                    self.keep(ev.clone());
                    if hit {
                        return Some(ev);
                    }
                }
                Ok(None) => panic!("the caller's sync loop ended"),
                Err(_) => return None,
            }
        }
    }

    /// Events already seen that match `pred`.
    fn all(&mut self, pred: impl Fn(&Seen) -> bool) -> Vec<Seen> {
        self.pull();
        self.seen.iter().filter(|e| pred(e)).cloned().collect()
    }
}

/// The matrix-sdk caller: logged in, syncing in the background into an [`Inbox`].
struct Caller {
    client: Client,
    party_id: String,
    token: String,
    sync: tokio::task::JoinHandle<()>,
    rx: Option<tokio::sync::mpsc::UnboundedReceiver<Seen>>,
}

impl Drop for Caller {
    fn drop(&mut self) {
        self.sync.abort();
    }
}

impl Caller {
    async fn login(hs: &Synapse, user: &str, password: &str, store: &Path) -> Self {
        let client = Client::builder()
            .homeserver_url(&hs.homeserver)
            .sqlite_store(store, None)
            .build()
            .await
            .expect("matrix-sdk client");
        client
            .matrix_auth()
            .login_username(user, password)
            .initial_device_display_name("voip1_call test caller")
            .send()
            .await
            .expect("the caller logs in");
        client.encryption().wait_for_e2ee_initialization_tasks().await;
        let party_id = client.device_id().unwrap().to_string();
        let token = client.access_token().unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let syncing = client.clone();
        let sync = tokio::spawn(async move {
            let settings = SyncSettings::default().timeout(Duration::from_millis(1000));
            // Failed syncs (the homeserver restarting in one test) are retried, as a client does.
            let result = syncing
                .sync_with_result_callback(settings, move |response| {
                    let tx = tx.clone();
                    async move {
                        let response = match response {
                            Ok(r) => r,
                            Err(e) => {
                                eprintln!("the caller's sync failed ({e}); retrying");
                                tokio::time::sleep(Duration::from_secs(1)).await;
                                return Ok(LoopCtrl::Continue);
                            }
                        };
                        for (room_id, update) in &response.rooms.joined {
                            for ev in &update.timeline.events {
                                let event: Value = serde_json::from_str(ev.raw().json().get()).unwrap_or(Value::Null);
                                let seen = Seen {
                                    room_id: room_id.to_string(),
                                    event,
                                    encrypted: ev.encryption_info().is_some(),
                                };
                                if tx.send(seen).is_err() {
                                    return Ok(LoopCtrl::Break);
                                }
                            }
                        }
                        Ok(LoopCtrl::Continue)
                    }
                })
                .await;
            if let Err(e) = result {
                eprintln!("the caller's sync loop failed: {e}");
            }
        });
        Caller { client, party_id, token, sync, rx: Some(rx) }
    }

    /// An encrypted DM with `bot` (`is_direct`, invited), and the inbox of that room.
    async fn create_encrypted_dm(&mut self, bot: &str) -> (Room, Inbox) {
        let mut req = CreateRoomRequest::new();
        req.invite = vec![OwnedUserId::try_from(bot).unwrap()];
        req.is_direct = true;
        req.preset = Some(RoomPreset::TrustedPrivateChat);
        req.name = Some("voip1_call encrypted".into());
        req.initial_state =
            vec![InitialStateEvent::with_empty_state_key(RoomEncryptionEventContent::with_recommended_defaults())
                .to_raw_any()];
        let room = self.client.create_room(req).await.expect("the caller creates the DM");
        let inbox = Inbox {
            rx: self.rx.take().unwrap(),
            seen: vec![],
            room_id: room.room_id().to_string(),
            me: self.client.user_id().unwrap().to_string(),
        };
        (room, inbox)
    }

    /// Sends a call event (adding `version` "1" and our `party_id`), checks it left encrypted,
    /// and returns its event id.
    async fn send_call(&self, room: &Room, ty: &str, mut content: Value) -> String {
        content["version"] = json!("1");
        content["party_id"] = json!(self.party_id);
        let sent = room.send_raw(ty, content).await.unwrap_or_else(|e| panic!("sending {ty}: {e}"));
        assert!(sent.encryption_info.is_some(), "{ty} was sent encrypted");
        sent.response.event_id.to_string()
    }

    /// The event's type as the homeserver stores it (not decrypted).
    async fn server_event_type(&self, hs: &Synapse, room_id: &str, event_id: &str) -> String {
        let url = format!("{}/_matrix/client/v3/rooms/{}/event/{}", hs.homeserver, pct(room_id), pct(event_id));
        let r = reqwest::Client::new().get(&url).bearer_auth(&self.token).send().await.unwrap();
        let status = r.status();
        let body: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap_or(Value::Null);
        assert!(status.is_success(), "GET {url}: {status} {body}");
        body["type"].as_str().unwrap_or_default().to_owned()
    }
}

/// The caller logged in, in an encrypted DM with the bot, which has joined it.
async fn dm_with_bot(hs: &Synapse, s: &Setup) -> (Caller, Room, Inbox) {
    let mut caller = Caller::login(hs, &s.caller, &s.caller_password, &s.dir.path().join("caller-store")).await;
    let (room, mut inbox) = caller.create_encrypted_dm(&s.bot).await;
    let bot = s.bot.as_str();
    let joined = inbox
        .wait_for(Instant::now() + Duration::from_secs(60), |e| {
            e.ty() == "m.room.member" && e.event["state_key"] == bot && e.content()["membership"] == "join"
        })
        .await;
    assert!(joined.is_some(), "the bot joined the DM within 60 s");
    (caller, room, inbox)
}

/// The bot's "being recorded" notice (within 5 s, it comes early) and its links notice (saved or
/// failed, within [`LINKS_WITHIN_MS`]) of the call invited at `invite_ts`.
async fn bot_notices(inbox: &mut Inbox, bot: &str, invite_ts: i64) -> (Option<Seen>, Option<Seen>) {
    let from_bot = |e: &Seen| e.sender() == bot && e.ts() >= invite_ts && e.ty() == "m.room.message";
    let recording = inbox
        .wait_for(Instant::now() + Duration::from_secs(5), |e| {
            from_bot(e) && e.body().starts_with("This call is being recorded by ")
        })
        .await;
    let links = inbox
        .wait_for(Instant::now() + Duration::from_millis(LINKS_WITHIN_MS as u64), |e| {
            from_bot(e) && (e.body().starts_with("Recording saved:") || e.body().starts_with("Recording failed:"))
        })
        .await;
    (recording, links)
}

/// Runs `deploy/dev/<server>.sh <what>` on the servers of this run (Garage, Synapse): the voip1
/// tests take turns, and the other suites run in other test binaries, one after the other.
fn dev_server(server: &str, what: &str) {
    let status = std::process::Command::new("bash")
        .arg(repo_root().join(format!("deploy/dev/{server}.sh")))
        .arg(what)
        .status()
        .unwrap_or_else(|e| panic!("{server}.sh {what}: {e}"));
    assert!(status.success(), "{server}.sh {what}: {status}");
}

/// Starts the server again when dropped, however the test ends, so the next tests have it.
struct StartsAgain(&'static str);

impl Drop for StartsAgain {
    fn drop(&mut self) {
        let script = repo_root().join(format!("deploy/dev/{}.sh", self.0));
        let _ = std::process::Command::new("bash").arg(script).arg("start").status();
    }
}

/// aiortc_sender.py, started: its offer has been read.
struct Aiortc {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    offer_sdp: String,
}

async fn start_aiortc(seconds: f64) -> Aiortc {
    let script = repo_root().join("tests/peers/aiortc_sender.py");
    let mut child = tokio::process::Command::new(python())
        .arg(&script)
        .args(["--seconds", &seconds.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", script.display()));
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let stdin = child.stdin.take().unwrap();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("aiortc printed no offer within 30 s")
        .unwrap()
        .expect("aiortc exited before printing its offer");
    let offer: Value = serde_json::from_str(&line).expect("the offer is JSON");
    assert_eq!(offer["type"], "offer");
    Aiortc { child, stdin, offer_sdp: offer["sdp"].as_str().unwrap().to_owned() }
}

/// The msid stream id of an SDP (`a=msid:<stream> <track>`), the key of `sdp_stream_metadata`.
fn msid_stream(sdp: &str) -> String {
    sdp.lines()
        .find_map(|l| l.trim().strip_prefix("a=msid:"))
        .and_then(|rest| rest.split_whitespace().next())
        .expect("the offer has an a=msid line")
        .to_owned()
}

fn invite(call_id: &str, sdp: &str, stream: Option<&str>) -> Value {
    let mut metadata = serde_json::Map::new();
    if let Some(stream) = stream {
        metadata.insert(stream.into(), json!({"purpose": "m.usermedia", "audio_muted": false, "video_muted": false}));
    }
    json!({
        "call_id": call_id,
        "lifetime": 60000,
        "offer": {"type": "offer", "sdp": sdp},
        "capabilities": {"m.call.transferee": false, "m.call.dtmf": false},
        "sdp_stream_metadata": metadata,
    })
}

/// Places a call from `caller` to the bot: aiortc's offer in an (encrypted) invite, the bot's
/// answer checked and handed back to aiortc, `select_answer` and the end of candidates. Returns
/// aiortc (sending for `seconds` once connected), the invite's server time and the answer.
async fn place_call(s: &Setup, caller: &Caller, room: &Room, inbox: &mut Inbox, call_id: &str, seconds: f64) -> (Aiortc, i64, Seen) {
    let bot = s.bot.clone();
    let from_bot = |e: &Seen| e.sender() == bot;
    let mut aiortc = start_aiortc(seconds).await;
    let stream = msid_stream(&aiortc.offer_sdp);
    let invite_id = caller.send_call(room, "m.call.invite", invite(call_id, &aiortc.offer_sdp, Some(&stream))).await;
    let invite_ts = inbox
        .wait_for(Instant::now() + Duration::from_secs(20), |e| e.event_id() == invite_id)
        .await
        .expect("our invite comes back in the sync")
        .ts();
    let answer = inbox
        .wait_for(Instant::now() + Duration::from_secs(30), |e| {
            from_bot(e)
                && e.call_id() == call_id
                && matches!(e.ty(), "m.call.answer" | "m.call.reject" | "m.call.hangup")
        })
        .await
        .expect("the bot answered within 30 s");
    assert_eq!(answer.ty(), "m.call.answer", "the bot answers the valid invite: {}", answer.content());
    assert!(answer.encrypted, "the bot's answer in the encrypted room was encrypted");
    let answer_sdp = answer.content()["answer"]["sdp"].as_str().expect("answer.sdp").to_owned();
    assert_eq!(answer.content()["answer"]["type"], "answer");
    assert_eq!(answer.content()["party_id"], s.bot_device.as_str(), "the answer's party_id is the bot's device");
    assert!(sdp_is_recvonly(&answer_sdp), "the answer is receive-only:\n{answer_sdp}");
    assert!(answer_sdp.contains("a=candidate:"), "the answer carries candidates:\n{answer_sdp}");
    let line = json!({"type": "answer", "sdp": answer_sdp}).to_string() + "\n";
    aiortc.stdin.write_all(line.as_bytes()).await.unwrap();
    aiortc.stdin.flush().await.unwrap();
    let bot_party = answer.content()["party_id"].as_str().unwrap_or_default().to_owned();
    caller.send_call(room, "m.call.select_answer", json!({"call_id": call_id, "selected_party_id": bot_party})).await;
    // As matrix-js-sdk does once gathering completes (aiortc's candidates are all in its offer).
    caller.send_call(room, "m.call.candidates", json!({"call_id": call_id, "candidates": [{"candidate": ""}]})).await;
    (aiortc, invite_ts, answer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_room_call_and_malformed_input() {
    let Some((hs, s3)) = servers("voip1_call::encrypted_room_call_and_malformed_input") else { return };
    let _turn = serial();
    let mut s = setup(&hs, &s3).await;
    let (caller, room, mut inbox) = dm_with_bot(&hs, &s).await;
    let room_id = room.room_id().to_string();
    eprintln!("encrypted DM {room_id}; caller device (party id) {}", caller.party_id);
    let bot = s.bot.clone();
    let from_bot = |e: &Seen| e.sender() == bot;

    // 1. An invite whose SDP is not SDP: refused with m.call.reject (or hangup), with a reason.
    let bad_sdp = format!("bad-sdp-{}", s.suffix);
    caller.send_call(&room, "m.call.invite", invite(&bad_sdp, "this is not SDP\r\nm=nonsense\r\n", None)).await;
    let refusal = inbox
        .wait_for(Instant::now() + Duration::from_secs(20), |e| {
            from_bot(e)
                && e.call_id() == bad_sdp
                && matches!(e.ty(), "m.call.reject" | "m.call.hangup" | "m.call.answer")
        })
        .await
        .expect("the bot refused the bad-SDP invite within 20 s");
    assert_ne!(refusal.ty(), "m.call.answer", "the bot answered an invite with a bad SDP: {:?}", refusal.event);
    eprintln!("bad SDP refused with {}: {}", refusal.ty(), refusal.content());
    assert!(refusal.encrypted, "the bot's {} in the encrypted room was encrypted", refusal.ty());
    s.mxrec.assert_running("a bad-SDP invite");
    assert_healthy(&s.http_base, "a bad-SDP invite").await;

    // 2. An invite for someone else (`invitee`), with a real offer: ignored.
    let other = format!("other-invitee-{}", s.suffix);
    {
        let throwaway = start_aiortc(1.0).await;
        let mut content = invite(&other, &throwaway.offer_sdp, Some(&msid_stream(&throwaway.offer_sdp)));
        content["invitee"] = json!(format!("@nobody-{}:{}", s.suffix, bot.split_once(':').unwrap().1));
        caller.send_call(&room, "m.call.invite", content).await;
    } // aiortc is killed on drop
    let reply = inbox.wait_for(Instant::now() + Duration::from_secs(5), |e| from_bot(e) && e.call_id() == other).await;
    assert!(reply.is_none(), "the bot reacted to an invite for someone else: {:?}", reply.map(|r| r.event));
    s.mxrec.assert_running("an invite for someone else");

    // 3. A flood of candidates: 200 events for an unknown call, then one event of 300 candidates
    // for the ignored call.
    let flood = format!("flood-{}", s.suffix);
    let candidate = |i: usize| {
        json!({"candidate": format!("candidate:{i} 1 udp 2130706431 10.{}.{}.{} {} typ host", i / 65536 % 256, i / 256 % 256, i % 256, 10000 + i % 50000),
               "sdpMid": "0", "sdpMLineIndex": 0})
    };
    {
        use futures::StreamExt;
        let sends = futures::stream::iter(0..200)
            .map(|n| {
                let content =
                    json!({"call_id": flood, "candidates": (0..10).map(|i| candidate(n * 10 + i)).collect::<Vec<_>>()});
                caller.send_call(&room, "m.call.candidates", content)
            })
            .buffer_unordered(8);
        let started = Instant::now();
        let sent: Vec<String> = sends.collect().await;
        assert_eq!(sent.len(), 200);
        eprintln!("sent 200 m.call.candidates events (2000 candidates) for {flood} in {:?}", started.elapsed());
    }
    caller
        .send_call(
            &room,
            "m.call.candidates",
            json!({"call_id": other, "candidates": (0..300).map(candidate).collect::<Vec<_>>()}),
        )
        .await;
    s.mxrec.assert_running("a flood of candidates");
    assert_healthy(&s.http_base, "a flood of candidates").await;

    // 4. A hangup for a call that does not exist.
    let unknown = format!("unknown-{}", s.suffix);
    caller.send_call(&room, "m.call.hangup", json!({"call_id": unknown, "reason": "user_hangup"})).await;
    s.mxrec.assert_running("a hangup for an unknown call");
    assert_healthy(&s.http_base, "a hangup for an unknown call").await;

    // 5. The real call: aiortc's offer in an encrypted invite, the bot's answer back to aiortc.
    let call_id = format!("call-{}", s.suffix);
    let (mut aiortc, invite_ts, answer) = place_call(&s, &caller, &room, &mut inbox, &call_id, CALL_SECONDS).await;

    let status = tokio::time::timeout(Duration::from_secs(CALL_SECONDS as u64 + 60), aiortc.child.wait())
        .await
        .expect("aiortc finished sending")
        .unwrap();
    assert!(status.success(), "aiortc sender failed ({status}): not connected, or the answer was refused");
    let hangup_id =
        caller.send_call(&room, "m.call.hangup", json!({"call_id": call_id, "reason": "user_hangup"})).await;
    let hangup_ts = inbox
        .wait_for(Instant::now() + Duration::from_secs(20), |e| e.event_id() == hangup_id)
        .await
        .expect("our hangup comes back in the sync")
        .ts();

    // The notices, decrypted by the caller's client.
    let failed = |e: &Seen| from_bot(e) && e.ty() == "m.room.message" && e.body().starts_with("Recording failed:");
    let recording = inbox
        .wait_for(Instant::now() + Duration::from_secs(5), |e| {
            from_bot(e) && e.ts() >= invite_ts && e.body().starts_with("This call is being recorded by ")
        })
        .await;
    let deadline =
        Instant::now() + Duration::from_millis((hangup_ts + LINKS_WITHIN_MS + 3000 - now_ms()).max(0) as u64);
    let links = inbox
        .wait_for(deadline, |e| {
            from_bot(e) && e.ts() >= invite_ts && (e.body().starts_with("Recording saved:") || failed(e))
        })
        .await;
    for n in recording.iter().chain(&links) {
        assert!(n.encrypted, "the bot's notice {:?} was encrypted", n.body());
        assert_eq!(n.content()["msgtype"], "m.notice", "the bot posts notices");
    }
    s.mxrec.assert_running("the call");
    for (what, ev) in [("answer", Some(&answer)), ("links notice", links.as_ref())] {
        if let Some(ev) = ev {
            let ty = caller.server_event_type(&hs, &room_id, ev.event_id()).await;
            assert_eq!(ty, "m.room.encrypted", "the bot's {what} is stored encrypted on the server");
        }
    }
    verify_notices_and_recording(
        &s,
        &s3,
        &room_id,
        hangup_ts,
        recording.map(|e| e.notice()),
        links.map(|e| e.notice()),
    )
    .await;

    // Nothing was ever done about the malformed input.
    for id in [&other, &flood, &unknown] {
        let replies = inbox.all(|e| from_bot(e) && e.call_id() == id.as_str());
        assert!(
            replies.is_empty(),
            "the bot reacted to call {id}: {:?}",
            replies.iter().map(|r| &r.event).collect::<Vec<_>>()
        );
    }
    let answers = inbox.all(|e| from_bot(e) && e.call_id() == bad_sdp && e.ty() == "m.call.answer");
    assert!(answers.is_empty(), "the bot answered the bad-SDP invite");
    for id in [&bad_sdp, &other, &flood, &unknown] {
        let lines = s.mxrec.log_lines_with(id);
        eprintln!("mxrec logged {} line(s) about {id}; the first: {:?}", lines.len(), lines.first());
    }

    s.mxrec.assert_running("the recording was verified");
    drop(caller);
    let status = s.mxrec.stop(Duration::from_secs(30));
    assert!(status.success(), "mxrec exits 0 on SIGTERM, not {status}");
}

// -------------------------------------------------------------------------------------------------
// Test 3: room control of a 1:1 call, consent state, and members-only links.

/// The room's `org.mxrec.recording` state, as the homeserver has it.
async fn recording_state(hs: &Synapse, token: &str, room_id: &str) -> Value {
    let url = format!("{}/_matrix/client/v3/rooms/{}/state/org.mxrec.recording/", hs.homeserver, pct(room_id));
    let r = reqwest::Client::new().get(&url).bearer_auth(token).send().await.unwrap();
    if r.status() == 404 {
        return Value::Null;
    }
    r.json().await.unwrap()
}

/// Waits until the room's recording state satisfies `pred` (state events travel through the
/// bot's outbox, a moment after the reply).
async fn wait_state(hs: &Synapse, token: &str, room_id: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = recording_state(hs, token, room_id).await;
        if pred(&v) {
            eprintln!("org.mxrec.recording {what}: {v}");
            return v;
        }
        assert!(Instant::now() < deadline, "org.mxrec.recording never became {what}; last {v}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Sends `!rec <cmd>` as `who` and returns the bot's threaded reply to it.
async fn command(who: &Caller, room: &Room, inbox: &mut Inbox, bot: &str, cmd: &str) -> Seen {
    use matrix_sdk::ruma::events::room::message::RoomMessageEventContent;
    let id = who
        .client
        .get_room(room.room_id())
        .expect("in the room")
        .send(RoomMessageEventContent::text_plain(format!("!rec {cmd}")))
        .await
        .unwrap_or_else(|e| panic!("sending !rec {cmd}: {e}"))
        .response
        .event_id
        .to_string();
    let reply = inbox
        .wait_for(Instant::now() + Duration::from_secs(30), |e| {
            e.sender() == bot && e.content()["m.relates_to"]["m.in_reply_to"]["event_id"] == id.as_str()
        })
        .await
        .unwrap_or_else(|| panic!("no reply to `!rec {cmd}` within 30 s"));
    let rel = &reply.content()["m.relates_to"];
    assert_eq!(rel["rel_type"], "m.thread", "the reply to `!rec {cmd}` is threaded: {}", reply.content());
    assert_eq!(rel["event_id"], id.as_str(), "the thread is the command's");
    assert!(reply.encrypted, "the reply in the encrypted room was encrypted");
    eprintln!("`!rec {cmd}` → {:?}", reply.body());
    reply
}

/// A Matrix OpenID token of `token`'s user, as the link page would get it.
async fn openid(hs: &Synapse, user: &str, token: &str) -> Value {
    let url = format!("{}/_matrix/client/v3/user/{}/openid/request_token", hs.homeserver, pct(user));
    let r = reqwest::Client::new().post(&url).bearer_auth(token).json(&json!({})).send().await.unwrap();
    assert!(r.status().is_success(), "openid token for {user}: {}", r.status());
    r.json().await.unwrap()
}

/// POSTs an OpenID proof to a members-only link: the status and the answer.
async fn prove(link: &str, proof: &Value) -> (u16, Value) {
    let r = reqwest::Client::new().post(format!("{link}/openid")).json(proof).send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// In an encrypted DM the caller (the room's creator, so a moderator) calls the bot and steers
/// the recording from the room: pause ~4 s in, resume ~4 s later, stop ~4 s after that (the bot
/// hangs up). Bob, invited after the answer with power level 0, is refused. The room asks for
/// members-only links (`org.mxrec.config`). One recording results: a pause span in the manifest
/// with no segment inside it, the pause card in the composite with no flash and no beep, the
/// state event following each step; the composite opens for the caller with an OpenID token and
/// is refused to a non-member and to a forged token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_commands_steer_a_call_and_links_are_members_only() {
    let Some((hs, s3)) = servers("voip1_call::room_commands_steer_a_call_and_links_are_members_only") else { return };
    let _turn = serial();
    let extra = format!("[http.openid_homeservers]\nlocalhost = \"{}\"\n", hs.homeserver);
    let mut s = setup_with(&hs, &s3, &extra).await;
    let (caller, room, mut inbox) = dm_with_bot(&hs, &s).await;
    let room_id = room.room_id().to_string();
    let bot = s.bot.clone();
    room.send_state_event_raw("org.mxrec.config", "", json!({"members_only_links": true}))
        .await
        .expect("the caller sets org.mxrec.config");
    let bob_password = format!("bob-pw-{}", s.suffix);
    let bob_id = register_user(&hs, &format!("bob-{}", s.suffix), &bob_password);
    let carol_password = format!("carol-pw-{}", s.suffix);
    let carol_id = register_user(&hs, &format!("carol-{}", s.suffix), &carol_password);
    let bob = Caller::login(&hs, &bob_id, &bob_password, &s.dir.path().join("bob-store")).await;
    let carol = Caller::login(&hs, &carol_id, &carol_password, &s.dir.path().join("carol-store")).await;

    // Before any call: nothing to pause.
    let r = command(&caller, &room, &mut inbox, &bot, "pause").await;
    assert!(r.body().contains("Nothing is being recorded"), "{}", r.body());

    let call_id = format!("steered-{}", s.suffix);
    let (mut aiortc, invite_ts, answer) = place_call(&s, &caller, &room, &mut inbox, &call_id, 30.0).await;
    let started = wait_state(&hs, &caller.token, &room_id, "active", |v| v["active"] == true).await;
    assert_eq!(started["started_by"], s.caller.as_str());
    assert_eq!(started["flavour"], "voip1");
    assert_eq!(started["paused"], false);

    // Bob joins the (already answered) call's room.
    room.invite_user_by_id(&OwnedUserId::try_from(bob_id.as_str()).unwrap()).await.expect("invite bob");
    bob.client.join_room_by_id(room.room_id()).await.expect("bob joins");
    let bob_room = bob.client.get_room(room.room_id()).unwrap();

    tokio::time::sleep_until(Instant::now() + Duration::from_millis((answer.ts() + 4000 - now_ms()).max(0) as u64)).await;
    let r = command(&caller, &room, &mut inbox, &bot, "pause").await;
    assert_eq!(r.body(), "Recording paused.");
    let paused_at = r.ts();
    wait_state(&hs, &caller.token, &room_id, "paused", |v| v["paused"] == true && v["active"] == true).await;
    let r = command(&caller, &room, &mut inbox, &bot, "pause").await;
    assert!(r.body().contains("paused already"), "{}", r.body());
    let r = command(&bob, &bob_room, &mut inbox, &bot, "resume").await;
    assert!(r.body().contains("needs power level 50") && r.body().contains("yours is 0"), "{}", r.body());

    tokio::time::sleep_until(Instant::now() + Duration::from_millis((paused_at + 4000 - now_ms()).max(0) as u64)).await;
    let r = command(&caller, &room, &mut inbox, &bot, "resume").await;
    assert_eq!(r.body(), "Recording resumed.");
    let resumed_at = r.ts();
    wait_state(&hs, &caller.token, &room_id, "resumed", |v| v["paused"] == false && v["active"] == true).await;
    let r = command(&bob, &bob_room, &mut inbox, &bot, "status").await;
    assert!(r.body().starts_with("Recording since"), "status is open to everyone: {}", r.body());
    let r = command(&caller, &room, &mut inbox, &bot, "start").await;
    assert!(r.body().contains("already being recorded"), "{}", r.body());

    tokio::time::sleep_until(Instant::now() + Duration::from_millis((resumed_at + 4000 - now_ms()).max(0) as u64)).await;
    let r = command(&caller, &room, &mut inbox, &bot, "stop").await;
    assert!(r.body().starts_with("Stopping"), "{}", r.body());
    let from_bot = |e: &Seen| e.sender() == bot;
    let hangup = inbox
        .wait_for(Instant::now() + Duration::from_secs(20), |e| from_bot(e) && e.ty() == "m.call.hangup" && e.call_id() == call_id)
        .await
        .expect("the bot hangs up on `!rec stop`");
    let _ = aiortc.child.start_kill();
    for words in ["Recording paused by ", "Recording resumed by ", "Recording stopped by "] {
        assert!(
            !inbox.all(|e| from_bot(e) && e.ts() >= invite_ts && e.body().starts_with(words)).is_empty(),
            "the room was told `{words}…`"
        );
    }
    let links = inbox
        .wait_for(Instant::now() + Duration::from_millis(LINKS_WITHIN_MS as u64), |e| {
            from_bot(e) && e.ts() >= invite_ts && (e.body().starts_with("Recording saved:") || e.body().starts_with("Recording failed:"))
        })
        .await
        .expect("a links notice after the stop");
    eprintln!("links notice {} ms after the bot's hangup:\n{}", links.ts() - hangup.ts(), links.body());
    let notice = LinksNotice::parse(links.body());
    wait_state(&hs, &caller.token, &room_id, "inactive", |v| v["active"] == false).await;
    let recordings = inbox.all(|e| from_bot(e) && e.ts() >= invite_ts && e.body().starts_with("Recording saved:"));
    assert_eq!(recordings.len(), 1, "one recording for the whole call");

    // Members-only: no proof, a forged token and a non-member are refused; the caller gets in.
    let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let r = http.get(&notice.composite_url).send().await.unwrap();
    assert_eq!(r.status(), 401, "a members-only link without proof");
    let (status, answer) = prove(&notice.composite_url, &json!({"access_token": "forged-token-0123456789", "matrix_server_name": "localhost"})).await;
    assert_eq!(status, 403, "a forged OpenID token: {answer}");
    let (status, answer) = prove(&notice.composite_url, &openid(&hs, &carol_id, &carol.token).await).await;
    assert_eq!(status, 403, "a non-member: {answer}");
    assert!(answer.to_string().contains("member"), "the refusal says why: {answer}");
    let (status, granted) = prove(&notice.composite_url, &openid(&hs, &s.caller, &caller.token).await).await;
    assert_eq!(status, 200, "the caller, a member: {granted}");
    let grant = granted["grant"].as_str().expect("a grant");
    let (composite, _) = fetch_link(&reqwest::Client::new(), &format!("{}?grant={grant}", notice.composite_url)).await;
    let work = s.dir.path().join("verify");
    std::fs::create_dir_all(&work).unwrap();
    let composite_path = work.join("composite.mp4");
    std::fs::write(&composite_path, &composite).unwrap();

    // The manifest: one pause, who asked what, and no media inside the pause.
    let m = load_manifest(&s3, &s.prefix, &room_id, &notice.recording_id).await;
    assert_eq!(m.pauses.len(), 1, "one pause: {:?}", m.pauses);
    let (p0, p1) = (m.pauses[0].start_us, m.pauses[0].end_us.expect("the pause ended"));
    let pause_s = (p1 - p0) as f64 / 1e6;
    eprintln!("pause on the recording clock: {:.2}–{:.2} s ({pause_s:.2} s)", p0 as f64 / 1e6, p1 as f64 / 1e6);
    assert!((3.0..=6.0).contains(&pause_s), "the pause lasted {pause_s} s, not about 4");
    let actions: Vec<(&str, &str)> = m.control.iter().map(|c| (c.action.as_str(), c.by.as_str())).collect();
    assert_eq!(actions, [("pause", s.caller.as_str()), ("resume", s.caller.as_str()), ("stop", s.caller.as_str())]);
    for t in &m.tracks {
        for seg in &t.segments {
            assert!(
                seg.end_us <= p0 + 100_000 || seg.start_us >= p1,
                "track {} segment {}–{} µs reaches into the pause {p0}–{p1}",
                t.id,
                seg.start_us,
                seg.end_us
            );
        }
        let before = t.segments.iter().any(|x| x.start_us < p0);
        let after = t.segments.iter().any(|x| x.end_us > p1);
        assert!(before && after, "track {} has media before and after the pause", t.id);
    }

    // The composite: the pause card (dark, no flash) and silence (no beep) inside the pause;
    // flashes and beeps around it.
    let (a, b) = (p0 as f64 / 1e6 + 0.3, p1 as f64 / 1e6 - 0.3);
    let luma = luma_per_frame(&[&composite_path]);
    let inside: Vec<f64> = luma.iter().filter(|(t, _)| (a..b).contains(t)).map(|(_, y)| *y).collect();
    assert!(!inside.is_empty(), "composite frames inside the pause");
    let brightest = inside.iter().cloned().fold(0.0, f64::max);
    assert!(brightest < 30.0, "the pause card is dark with a line of text; brightest frame YAVG {brightest}");
    let flashes = flash_times(&luma);
    assert!(flashes.iter().any(|t| *t < a) && flashes.iter().any(|t| *t > b), "flashes before and after the pause: {flashes:?}");
    let beeps = beep_onsets(&audio_rms_per_ms(&[&composite_path]));
    assert!(!beeps.iter().any(|t| (a..b).contains(t)), "no beep inside the pause: {beeps:?}");
    assert!(beeps.iter().any(|t| *t > b), "beeps after the pause: {beeps:?}");

    s.mxrec.assert_running("the recording was verified");
    drop((caller, bob, carol));
    let status = s.mxrec.stop(Duration::from_secs(30));
    assert!(status.success(), "mxrec exits 0 on SIGTERM, not {status}");

    // The audit table: the refusal, the commands and the grant, with who.
    let db = format!("sqlite://{}", s.dir.path().join("data/mxrec.db").display());
    let catalog = storage::Catalog::connect(&db).await.unwrap();
    let rec = storage::RecordingId::new(notice.recording_id.as_str());
    let audit: Vec<(String, String)> = catalog.audit_events(&rec).await.unwrap().into_iter().map(|e| (e.actor, e.action)).collect();
    eprintln!("audit of {}: {audit:?}", notice.recording_id);
    for (actor, action) in [(s.caller.as_str(), "recording.pause"), (s.caller.as_str(), "recording.resume"), (s.caller.as_str(), "command.pause")] {
        assert!(audit.iter().any(|(a, x)| a == actor && x == action), "audit has {action} by {actor}");
    }
    assert!(audit.iter().any(|(_, x)| x.starts_with("link.")), "link events are audited");
}

// -------------------------------------------------------------------------------------------------
// Test 4: mxrec is SIGKILLed mid-call; started again, it finishes the recording from what was
// stored and posts the links, marked as recovered.

/// Segment length the recovery test states its bound in.
const SEGMENT_S: f64 = 2.0;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_cut_by_sigkill_is_recovered_at_restart() {
    let Some((hs, s3)) = servers("voip1_call::a_call_cut_by_sigkill_is_recovered_at_restart") else { return };
    let _turn = serial();
    let mut s = setup(&hs, &s3).await;
    let (caller, room, mut inbox) = dm_with_bot(&hs, &s).await;
    let room_id = room.room_id().to_string();
    let bot = s.bot.clone();
    let from_bot = |e: &Seen| e.sender() == bot;

    // A 12 s call, killed 6 s after the answer.
    let call_id = format!("killed-{}", s.suffix);
    let (mut aiortc, invite_ts, answer) = place_call(&s, &caller, &room, &mut inbox, &call_id, 12.0).await;
    wait_state(&hs, &caller.token, &room_id, "active", |v| v["active"] == true).await;
    tokio::time::sleep_until(Instant::now() + Duration::from_millis((answer.ts() + 6000 - now_ms()).max(0) as u64)).await;
    let status = s.mxrec.kill();
    let killed_at = now_ms();
    eprintln!("mxrec SIGKILLed {} ms after the answer ({status})", killed_at - answer.ts());
    let _ = aiortc.child.start_kill();
    let spool = s.dir.path().join("data/spool");
    let left: Vec<String> = files_under(&spool).iter().map(|p| p.display().to_string()).collect();
    eprintln!("the spool after the kill: {left:#?}");
    assert!(left.iter().any(|p| p.ends_with(".partial")), "the kill left open segments behind: {left:?}");

    // The same config again: the recording is finished and announced.
    let config = s.dir.path().join("mxrec.toml");
    s.mxrec = MxrecRun::start(s.dir.path(), &config);
    s.mxrec.wait_line("bot:", BOT_READY_TIMEOUT).await;
    let links = inbox
        .wait_for(Instant::now() + Duration::from_millis(LINKS_WITHIN_MS as u64), |e| {
            from_bot(e) && e.ts() >= invite_ts && (e.body().starts_with("Recording saved:") || e.body().starts_with("Recording failed:"))
        })
        .await
        .expect("a links notice after the restart");
    eprintln!("links notice {} ms after the kill:\n{}", links.ts() - killed_at, links.body());
    assert!(links.body().starts_with("Recording saved:"), "{}", links.body());
    assert!(links.body().contains("stopped unexpectedly"), "the notice says the recording was cut: {}", links.body());
    let notice = LinksNotice::parse(links.body());
    assert!(notice.tracks.len() >= 2, "a link per track: {:?}", notice.tracks);
    wait_state(&hs, &caller.token, &room_id, "inactive", |v| v["active"] == false).await;

    // The manifest: marked recovered; every track holds at least the first 2 segments' worth of
    // media, from its start and without holes; every segment in the bucket matches it.
    let m = load_manifest(&s3, &s.prefix, &room_id, &notice.recording_id).await;
    let recovered = m.recovered.as_ref().expect("the manifest says the recording was recovered");
    eprintln!("recovered at {}, {} open segment(s) salvaged", recovered.at, recovered.salvaged_segments);
    let store = s3_store(&s3, &s.prefix);
    for t in &m.tracks {
        let first = t.segments.first().unwrap_or_else(|| panic!("track {} has no segment", t.id));
        let mut covered_to = first.start_us;
        for seg in &t.segments {
            assert!(seg.start_us <= covered_to + 100_000, "track {}: a hole before segment {} at {} µs", t.id, seg.index, seg.start_us);
            covered_to = covered_to.max(seg.end_us);
            let key = object_store::path::Path::from(seg.key.as_str());
            let bytes = object_store::ObjectStoreExt::get(store.as_ref(), &key).await.unwrap_or_else(|e| panic!("segment {}: {e}", seg.key)).bytes().await.unwrap();
            assert_eq!(sha256_hex(&bytes), seg.sha256, "segment {} matches the manifest", seg.key);
        }
        let held_s = (covered_to - first.start_us) as f64 / 1e6;
        eprintln!("track {} ({}): {} segments, {held_s:.2} s from {:.2} s", t.id, t.kind.as_str(), t.segments.len(), first.start_us as f64 / 1e6);
        assert!(held_s >= 2.0 * SEGMENT_S, "track {} holds {held_s:.2} s, not the first {} s", t.id, 2.0 * SEGMENT_S);
    }
    // The composite the link serves holds it too.
    let (composite, _) = fetch_link(&reqwest::Client::new(), &notice.composite_url).await;
    let work = s.dir.path().join("verify");
    std::fs::create_dir_all(&work).unwrap();
    let path = work.join("composite.mp4");
    std::fs::write(&path, &composite).unwrap();
    let duration: f64 = ffprobe(&path)["format"]["duration"].as_str().and_then(|d| d.parse().ok()).unwrap_or(0.0);
    eprintln!("composite: {duration:.2} s");
    assert!(duration >= 2.0 * SEGMENT_S, "the composite lasts {duration:.2} s");
    assert!(decode_errors(&path).is_empty(), "the composite decodes: {}", decode_errors(&path));
    assert!(s.mxrec.log_lines_with("recovering a recording left unfinished").len() == 1, "one recovery in the log");

    s.mxrec.assert_running("the recovery");
    drop(caller);
    let status = s.mxrec.stop(Duration::from_secs(30));
    assert!(status.success(), "mxrec exits 0 on SIGTERM, not {status}");
    let db = format!("sqlite://{}", s.dir.path().join("data/mxrec.db").display());
    let catalog = storage::Catalog::connect(&db).await.unwrap();
    let rec = catalog.get_recording(&storage::RecordingId::new(notice.recording_id.as_str())).await.unwrap().unwrap();
    assert_eq!(rec.state, storage::RecordingState::Uploaded, "the catalog has it stored");
    assert!(catalog.unfinished_recordings().await.unwrap().is_empty(), "nothing is left unfinished");
    let audit: Vec<String> = catalog.audit_events(&rec.id).await.unwrap().into_iter().map(|e| e.action).collect();
    assert!(audit.iter().any(|a| a == "recording.recovered"), "the recovery is audited: {audit:?}");
}

// -------------------------------------------------------------------------------------------------
// Test 5: the S3 server is stopped for 60 s during the call and again during the finalize.

/// A counter of the bot's /metrics (summed over its labels), 0 when absent.
async fn metric(http_base: &str, name: &str) -> f64 {
    let text = reqwest::get(format!("{http_base}/metrics")).await.unwrap().text().await.unwrap();
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Stopped S3 for this long, twice.
const OUTAGE: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_away_for_a_minute_twice_loses_nothing() {
    let Some((hs, s3)) = servers("voip1_call::the_store_away_for_a_minute_twice_loses_nothing") else { return };
    let _turn = serial();
    let mut s = setup(&hs, &s3).await;
    let _restart = StartsAgain("garage");
    let (caller, room, mut inbox) = dm_with_bot(&hs, &s).await;
    let room_id = room.room_id().to_string();
    let bot = s.bot.clone();
    let retries_before = metric(&s.http_base, "mxrec_upload_retries_total").await;

    // Outage 1: from 3 s into the call until well after it ended.
    let call_id = format!("outage-{}", s.suffix);
    let (mut aiortc, invite_ts, answer) = place_call(&s, &caller, &room, &mut inbox, &call_id, CALL_SECONDS).await;
    tokio::time::sleep_until(Instant::now() + Duration::from_millis((answer.ts() + 3000 - now_ms()).max(0) as u64)).await;
    dev_server("garage", "stop");
    let stopped = Instant::now();
    let status = tokio::time::timeout(Duration::from_secs(CALL_SECONDS as u64 + 60), aiortc.child.wait())
        .await
        .expect("aiortc finished sending")
        .unwrap();
    assert!(status.success(), "aiortc sender failed ({status})");
    let hangup_id = caller.send_call(&room, "m.call.hangup", json!({"call_id": call_id, "reason": "user_hangup"})).await;
    let hangup_ts = inbox
        .wait_for(Instant::now() + Duration::from_secs(20), |e| e.event_id() == hangup_id)
        .await
        .expect("our hangup comes back in the sync")
        .ts();
    tokio::time::sleep_until(stopped + OUTAGE).await;
    let retries_1 = metric(&s.http_base, "mxrec_upload_retries_total").await - retries_before;
    eprintln!("store away {:?} from 3 s into the call; upload retries meanwhile: {retries_1}", stopped.elapsed());
    dev_server("garage", "start");

    // Outage 2: from the finalize's first joined track (the segments are stored by then).
    let deadline = Instant::now() + Duration::from_secs(300);
    while s.mxrec.log_lines_with("track joined").is_empty() {
        assert!(Instant::now() < deadline, "the finalize never joined a track");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    dev_server("garage", "stop");
    let stopped = Instant::now();
    tokio::time::sleep_until(stopped + OUTAGE).await;
    let retries_2 = metric(&s.http_base, "mxrec_upload_retries_total").await - retries_before - retries_1;
    eprintln!("store away {:?} during the finalize; upload retries meanwhile: {retries_2}", stopped.elapsed());
    dev_server("garage", "start");
    assert!(retries_1 >= 1.0 && retries_2 >= 1.0, "the retries show in the metrics: {retries_1} and {retries_2}");

    // Everything arrives: the links, and a recording whose every object matches its manifest.
    let (recording, links) = bot_notices(&mut inbox, &bot, invite_ts).await;
    verify_notices_and_recording(&s, &s3, &room_id, hangup_ts, recording.map(|e| e.notice()), links.map(|e| e.notice()))
        .await;
    let failures = metric(&s.http_base, "mxrec_uploads_failed_total").await;
    assert_eq!(failures, 0.0, "no upload gave up");
    s.mxrec.assert_running("the outages");
}

// -------------------------------------------------------------------------------------------------
// Test 6: the homeserver is stopped mid-call and started again.

/// The homeserver is away this long, from 3 s into the call until after the media ended.
const HOMESERVER_AWAY: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_homeserver_restart_mid_call_loses_nothing() {
    let Some((hs, s3)) = servers("voip1_call::a_homeserver_restart_mid_call_loses_nothing") else { return };
    let _turn = serial();
    let mut s = setup(&hs, &s3).await;
    let _restart = StartsAgain("synapse");
    let (caller, room, mut inbox) = dm_with_bot(&hs, &s).await;
    let room_id = room.room_id().to_string();
    let bot = s.bot.clone();

    let call_id = format!("hs-restart-{}", s.suffix);
    let (mut aiortc, invite_ts, answer) = place_call(&s, &caller, &room, &mut inbox, &call_id, CALL_SECONDS).await;
    tokio::time::sleep_until(Instant::now() + Duration::from_millis((answer.ts() + 3000 - now_ms()).max(0) as u64)).await;
    dev_server("synapse", "stop");
    let stopped = Instant::now();
    // The media does not pass the homeserver: the whole call is sent while it is away.
    let status = tokio::time::timeout(Duration::from_secs(CALL_SECONDS as u64 + 60), aiortc.child.wait())
        .await
        .expect("aiortc finished sending")
        .unwrap();
    assert!(status.success(), "aiortc sender failed ({status})");
    tokio::time::sleep_until(stopped + HOMESERVER_AWAY).await;
    s.mxrec.assert_running("the homeserver went away");
    dev_server("synapse", "start");
    eprintln!("homeserver away for {:?}", stopped.elapsed());

    let hangup_id = caller.send_call(&room, "m.call.hangup", json!({"call_id": call_id, "reason": "user_hangup"})).await;
    let hangup_ts = inbox
        .wait_for(Instant::now() + Duration::from_secs(60), |e| e.event_id() == hangup_id)
        .await
        .expect("our hangup comes back in the sync")
        .ts();
    let (recording, links) = bot_notices(&mut inbox, &bot, invite_ts).await;
    verify_notices_and_recording(&s, &s3, &room_id, hangup_ts, recording.map(|e| e.notice()), links.map(|e| e.notice()))
        .await;
    let retried = s.mxrec.log_lines_with("syncing with the homeserver failed; retrying");
    let back = s.mxrec.log_lines_with("the homeserver answers again");
    eprintln!("bot: {} sync-failure line(s), {} back line(s)", retried.len(), back.len());
    assert!(!retried.is_empty() && !back.is_empty(), "the bot saw the homeserver go and come back");
    s.mxrec.assert_running("the homeserver came back");
}

#[test]
fn links_notice_parses_and_recvonly_is_recognised() {
    let token = "A".repeat(42) + "_";
    let body = format!(
        "Recording saved: 10.1 s, 2 tracks, 1.9 MB\n\
         Composite (MP4, 1.2 MB): http://127.0.0.1:8080/r/{token}\n\
         Track t1 (WebM VP8, 600 kB): http://127.0.0.1:8080/r/{token}\n\
         Track t2 (opus, 80 kB): https://rec.example.org/r/{token}\n\
         Links expire 2025-01-08 00:00 UTC. Recording 01943f5e-8a1c-7b2d-9e4f-0a1b2c3d4e5f."
    );
    let n = LinksNotice::parse(&body);
    assert_eq!(n.composite_url, format!("http://127.0.0.1:8080/r/{token}"));
    assert_eq!(n.tracks.len(), 2);
    assert_eq!((n.tracks[0].track_id.as_str(), n.tracks[0].format.as_str()), ("t1", "WebM VP8"));
    assert!(n.tracks[0].names_codec("vp8") && !n.tracks[0].names_codec("opus"));
    assert_eq!(n.tracks[1].format, "opus");
    let s3 = S3 { endpoint: "http://127.0.0.1:3900".into(), bucket: "b".into(), region: "garage".into() };
    assert_eq!(
        presigned_key(&s3, "p1", "http://127.0.0.1:3900/b/p1/rooms/x/t.webm?X-Amz-Signature=1").as_deref(),
        Some("rooms/x/t.webm")
    );
    assert_eq!(presigned_key(&s3, "p1", "http://127.0.0.1:8080/r/abc"), None);
    assert_eq!(n.recording_id, "01943f5e-8a1c-7b2d-9e4f-0a1b2c3d4e5f");
    assert!(!is_share_link("http://127.0.0.1:8080/r/short"));
    assert!(!is_share_link(&format!("ftp://x/r/{token}")));

    assert!(sdp_is_recvonly(
        "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=recvonly\r\nm=video 9 x 96\r\na=recvonly\r\n"
    ));
    assert!(!sdp_is_recvonly("v=0\r\nm=audio 9 x 111\r\na=recvonly\r\nm=video 9 x 96\r\na=sendrecv\r\n"));
    assert!(!sdp_is_recvonly("v=0\r\nm=audio 9 x 111\r\n"));
    assert_eq!(pct("!a:b.c"), "%21a%3Ab.c");
}

/// The A/V measurement on a composite-like MP4 made by FFmpeg: 10 s of H.264 + AAC, a white frame
/// and a 100 ms beep at every whole second, the flash drawn in a tile on a dark canvas (as a
/// composite shows a caller). Checks the ruler itself, so a failure of the call tests is the
/// recording's: in sync it passes; audio 60 ms late reads as −60 ms; a frozen tile is seen.
#[test]
fn av_measurement_finds_flashes_on_beeps() {
    let dir = tempfile::tempdir().unwrap();
    let make = |name: &str, audio_delay_ms: u32, tile: &str| {
        let out = dir.path().join(name);
        let video = format!(
            "color=c=0x202020:s=640x360:r=30:d=10[bg];\
             {tile},format=yuv420p,\
             geq=lum='if(lt(mod(N\\,30)\\,1)\\,235\\,lum(X\\,Y))':cb='cb(X\\,Y)':cr='cr(X\\,Y)'[tile];\
             [bg][tile]overlay=160:90:shortest=1,format=yuv420p[v]"
        );
        let audio = format!(
            "aevalsrc='if(lt(mod(t-{delay}\\,1)\\,0.1)\\,0.4*sin(2*PI*1000*t)\\,0)':s=48000:d=10[a]",
            delay = audio_delay_ms as f64 / 1000.0
        );
        ffmpeg(&[
            "-filter_complex",
            &format!("{video};{audio}"),
            "-map",
            "[v]",
            "-map",
            "[a]",
            "-t",
            "10",
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-pix_fmt",
            "yuv420p",
            "-c:a",
            "aac",
            "-b:a",
            "96k",
            out.to_str().unwrap(),
        ]);
        out
    };
    let moving = "testsrc2=s=320x180:r=30:d=10";
    let good = make("good.mp4", 0, moving);
    let report = check_call_composite(&good, 10.0, MAX_AV_OFFSET_MS);
    assert!(report.flashes.len() >= 9, "{report:?}");

    let late = make("late.mp4", 60, moving);
    let beeps = beep_onsets(&audio_rms_per_ms(&[&late]));
    let offsets = av_offsets_ms(&flash_times(&luma_per_frame(&[&late])), &beeps);
    assert!(offsets.len() >= 8, "{offsets:?}");
    let mean = offsets.iter().sum::<f64>() / offsets.len() as f64;
    assert!((mean + 60.0).abs() < 10.0, "audio 60 ms late reads as video − audio ≈ −60 ms: {offsets:.1?}");

    let frozen = make("frozen.mp4", 0, "color=c=gray:s=320x180:r=30:d=10");
    let changed = frame_changes(&frozen).iter().filter(|c| c.1 > 40.0).count();
    assert!(changed <= 25, "only the flashes change a frozen tile: {changed} changed frames");
}
