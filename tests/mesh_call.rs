//! End-to-end: MSC3401 mesh group calls (matrix-js-sdk's GroupCall, to-device signalling) recorded
//! by `mxrec run`, against the Synapse and S3 of `deploy/dev/test.sh`. The participants are
//! `tests/peers/mesh_peer.py` processes: aiortc media, plain client-server HTTP, the group call
//! protocol as matrix-js-sdk speaks it, nothing of mxrec's code.
//!
//! Users sort `alice` < `bob` < `mxrec-bot` < `zoe`: Alice and Bob call the bot, the bot calls
//! Zoe, so both directions of the ordering rule are exercised. Each participant's camera has its
//! own background grey, so the composite's tiles are told apart by colour.
//!
//! - [`a_mesh_group_call_is_recorded`]: auto-record; Alice starts the call with Bob, shares her
//!   screen for a while, Zoe joins late, Alice mutes her camera and microphone for a while, Bob
//!   leaves early, Alice ends the call. Checked: who was present when (manifest), each track's
//!   recorded span covers its owner's presence, the composite's tiles over time (sampled frames),
//!   the screen share on stage, Alice's muted camera not shown, every participant's beeps in their
//!   microphone track across their presence, flash and beep together for Alice.
//! - [`room_commands_steer_a_mesh_call`]: no auto-record; `!rec start` in a running call records
//!   it, `!rec stop` ends that recording and the bot leaves the call, `!rec start` again makes a
//!   second recording, which ends with the call.
//! - [`olm_encrypted_peer_messages_are_answered_encrypted`]: a device that signals Olm-encrypted
//!   (a matrix-sdk client with an aiortc media peer) gets the bot's answer encrypted, and a
//!   malformed encrypted invite before it is refused with a log line.

// matrix-sdk's sync future is deep enough to overflow the default limit when checking `Send`.
#![recursion_limit = "256"]

mod harness;

use std::path::Path;
use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use harness::calls::*;
use harness::*;
use serde_json::{json, Value};
use storage::manifest::{CallFlavour, TrackSource};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::time::Instant;

/// Far from the placeholder tile's grey (0x3a) and the screen's blue, which a muted camera and a share show.
const ALICE_GREY: u8 = 100;
const BOB_GREY: u8 = 150;
const ZOE_GREY: u8 = 200;
/// Luma of the screen share's blue (40, 70, 170), BT.601 limited range.
const SCREEN_LUMA: f64 = 16.0 + (65.481 * 40.0 + 128.553 * 70.0 + 24.966 * 170.0) / 255.0;
const BOT_READY_TIMEOUT: Duration = Duration::from_secs(120);
const SAVED_WITHIN: Duration = Duration::from_secs(180);
const MAX_AV_OFFSET_MS: f64 = 40.0;
const MEMBER_EVENT: &str = "org.matrix.msc3401.call.member";
const CALL_EVENT: &str = "org.matrix.msc3401.call";

/// The tests load the CPU heavily while media flows; they must not overlap.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}

fn pct(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn servers(test: &str) -> Option<(Synapse, S3)> {
    let Some(hs) = synapse() else {
        skip(test, "MXREC_TEST_HOMESERVER / MXREC_TEST_SYNAPSE_SECRET are not set (deploy/dev/synapse.sh env)");
        return None;
    };
    let Some(s3) = s3() else {
        skip(test, "MXREC_S3_ENDPOINT is not set (deploy/dev/garage.sh env)");
        return None;
    };
    Some((hs, s3))
}

// -------------------------------------------------------------------------------------------------
// The Matrix side of the test itself (room set-up, commands, reading the bot's notices): a few
// client-server calls. The room is not encrypted, so plain HTTP reads everything.

struct User {
    name: &'static str,
    user_id: String,
    password: String,
    token: String,
    hs: String,
}

impl User {
    async fn register(hs: &Synapse, name: &'static str, suffix: &str) -> Self {
        let password = format!("{name}-pw-{suffix}");
        let user_id = register_user(hs, &format!("{name}-{suffix}"), &password);
        let v = http(&hs.homeserver, None, "POST", "/_matrix/client/v3/login", json!({
            "type": "m.login.password", "identifier": {"type": "m.id.user", "user": user_id}, "password": password,
            "initial_device_display_name": format!("mesh_call test {name} (controller)"),
        }))
        .await;
        let token = v["access_token"].as_str().expect("a token").to_owned();
        User { name, user_id, password, token, hs: hs.homeserver.clone() }
    }

    async fn call(&self, method: &str, path: &str, body: Value) -> Value {
        http(&self.hs, Some(&self.token), method, path, body).await
    }

    async fn put_state(&self, room: &str, ty: &str, key: &str, content: Value) {
        self.call("PUT", &format!("/_matrix/client/v3/rooms/{}/state/{}/{}", pct(room), pct(ty), pct(key)), content).await;
    }

    async fn state(&self, room: &str, ty: &str, key: &str) -> Option<Value> {
        let url = format!("{}/_matrix/client/v3/rooms/{}/state/{}/{}", self.hs, pct(room), pct(ty), pct(key));
        let r = reqwest::Client::new().get(&url).bearer_auth(&self.token).send().await.unwrap();
        if r.status() == 404 {
            return None;
        }
        let v: Value = r.json().await.unwrap();
        v.as_object().is_some_and(|o| !o.is_empty()).then_some(v)
    }

    /// Sends `!rec <cmd>` and returns the bot's threaded reply.
    async fn command(&self, room: &str, bot: &str, cmd: &str) -> String {
        let txn = format!("cmd-{}", rand::random::<u64>());
        let sent = self
            .call("PUT", &format!("/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}", pct(room)), json!({"msgtype": "m.text", "body": format!("!rec {cmd}")}))
            .await;
        let event_id = sent["event_id"].as_str().unwrap().to_owned();
        let reply = self
            .wait_message(room, Duration::from_secs(30), |ev| {
                ev["sender"] == bot && ev["content"]["m.relates_to"]["event_id"] == event_id.as_str()
            })
            .await
            .unwrap_or_else(|| panic!("no reply from the bot to {}'s `!rec {cmd}`", self.name));
        let body = reply["content"]["body"].as_str().unwrap_or_default().to_owned();
        eprintln!("{}: !rec {cmd} → {body}", self.name);
        body
    }

    /// The room's recent messages (newest first).
    async fn messages(&self, room: &str) -> Vec<Value> {
        let v = self.call("GET", &format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=100", pct(room)), Value::Null).await;
        v["chunk"].as_array().cloned().unwrap_or_default()
    }

    async fn wait_message(&self, room: &str, within: Duration, pred: impl Fn(&Value) -> bool) -> Option<Value> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(ev) = self.messages(room).await.into_iter().find(|e| pred(e)) {
                return Some(ev);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

async fn http(hs: &str, token: Option<&str>, method: &str, path: &str, body: Value) -> Value {
    let url = format!("{hs}{path}");
    let client = reqwest::Client::new();
    let mut req = match method {
        "GET" => client.get(&url),
        "PUT" => client.put(&url).json(&body),
        _ => client.post(&url).json(&body),
    };
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.timeout(Duration::from_secs(30)).send().await.unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let status = r.status();
    let v: Value = r.json().await.unwrap_or(Value::Null);
    assert!(status.is_success(), "{method} {url}: HTTP {status} {v}");
    v
}

/// `mxrec run` as the bot, recording into S3.
struct Bot {
    mxrec: MxrecRun,
    dir: tempfile::TempDir,
    prefix: String,
    user: String,
}

async fn start_bot(hs: &Synapse, s3: &S3, suffix: &str, inviter: &str) -> Bot {
    let dir = tempfile::tempdir().unwrap();
    let password = format!("bot-pw-{suffix}");
    let user = register_user(hs, &format!("mxrec-bot-{suffix}"), &password);
    let prefix = format!("mesh-{suffix}");
    let data_dir = dir.path().join("data");
    let setup = BotSetup {
        data_dir: &data_dir,
        homeserver: &hs.homeserver,
        user: &user,
        password: &password,
        allowed_inviters: &[inviter],
        http_port: free_port(),
        s3,
        prefix: &prefix,
    };
    let config = dir.path().join("mxrec.toml");
    setup.write(&config);
    eprintln!("bot {user}, objects under {prefix}/, work dir {}", dir.path().display());
    let mut mxrec = MxrecRun::start(dir.path(), &config);
    mxrec.wait_line("bot:", BOT_READY_TIMEOUT).await;
    Bot { mxrec, dir, prefix, user }
}

/// Alice's room with the bot and `members` in it: every member may publish call state (as
/// Element sets up call rooms), the bot may post the recording state.
async fn call_room(alice: &User, members: &[&User], bot: &Bot) -> String {
    let mut invite = vec![bot.user.clone()];
    invite.extend(members.iter().map(|u| u.user_id.clone()));
    let v = alice
        .call("POST", "/_matrix/client/v3/createRoom", json!({
            "preset": "private_chat",
            "name": "mesh_call",
            "invite": invite,
            "power_level_content_override": {
                "users": {bot.user.as_str(): 50},
                "events": {"m.room.name": 50, "m.room.power_levels": 100, "m.room.history_visibility": 100,
                           "m.room.encryption": 100, MEMBER_EVENT: 0, CALL_EVENT: 0},
            },
        }))
        .await;
    let room = v["room_id"].as_str().unwrap().to_owned();
    for u in members {
        u.call("POST", &format!("/_matrix/client/v3/rooms/{}/join", pct(&room)), json!({})).await;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while alice.state(&room, "m.room.member", &bot.user).await.is_none_or(|m| m["membership"] != "join") {
        assert!(Instant::now() < deadline, "the bot did not join\n{}", bot.mxrec.stderr_tail(40));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    room
}

// -------------------------------------------------------------------------------------------------
// One mesh participant process.

struct Peer {
    name: &'static str,
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    events: tokio::sync::mpsc::UnboundedReceiver<Value>,
    seen: Vec<Value>,
}

impl Peer {
    async fn start(u: &User, room: &str, group_call: &str, grey: u8, create: bool) -> Self {
        let script = repo_root().join("tests/peers/mesh_peer.py");
        let mut cmd = tokio::process::Command::new(python());
        cmd.arg(&script).args([
            "--homeserver", &u.hs, "--user", &u.user_id, "--password", &u.password, "--room", room, "--group-call", group_call,
            "--grey", &grey.to_string(),
        ]);
        if create {
            cmd.arg("--create-call");
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", script.display()));
        let stdin = child.stdin.take().unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let (tx, events) = tokio::sync::mpsc::unbounded_channel();
        let label = u.name;
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                eprintln!("peer {label}: {line}");
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    let _ = tx.send(v);
                }
            }
        });
        Peer { name: u.name, child, stdin, events, seen: Vec::new() }
    }

    async fn wait_event(&mut self, within: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        if let Some(v) = self.seen.iter().find(|v| pred(v)) {
            return v.clone();
        }
        let deadline = Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(v)) => {
                    self.seen.push(v.clone());
                    if pred(&v) {
                        return v;
                    }
                }
                Ok(None) => panic!("peer {} exited ({:?})", self.name, self.child.try_wait()),
                Err(_) => panic!("peer {}: the awaited event did not come within {within:?}; seen {:?}", self.name, self.seen),
            }
        }
    }

    /// Waits until this peer's call with the bot is connected; returns when (Unix ms).
    async fn connected_to(&mut self, bot: &str) -> i64 {
        let v = self.wait_event(Duration::from_secs(60), |v| v["event"] == "connected" && v["peer_user"] == bot).await;
        v["ts_ms"].as_i64().unwrap()
    }

    async fn send(&mut self, cmd: Value) {
        self.stdin.write_all(format!("{cmd}\n").as_bytes()).await.unwrap();
        self.stdin.flush().await.unwrap();
    }

    /// Sends a command and waits for its event; returns the event's `ts_ms`.
    async fn change(&mut self, cmd: Value, event: &str) -> i64 {
        self.seen.retain(|v| v["event"] != event);
        self.send(cmd).await;
        let v = self.wait_event(Duration::from_secs(20), |v| v["event"] == event).await;
        v["ts_ms"].as_i64().unwrap()
    }

    /// `leave` (or `end_call`) and a clean exit; returns when it left (Unix ms).
    async fn leave(mut self, cmd: &str) -> i64 {
        self.send(json!({"cmd": cmd})).await;
        let v = self.wait_event(Duration::from_secs(30), |v| v["event"] == "left").await;
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await.expect("the peer exits").unwrap();
        assert!(status.success(), "peer {} exit: {status}", self.name);
        v["ts_ms"].as_i64().unwrap()
    }
}

fn bot_notice(ev: &Value, bot: &str, prefix: &str) -> bool {
    ev["sender"] == bot && ev["content"]["body"].as_str().is_some_and(|b| b.starts_with(prefix))
}

/// The bot's links notice sent after `since` (Unix ms); panics on a failure notice.
async fn saved_notice(alice: &User, room: &str, bot: &Bot, since: i64) -> LinksNotice {
    let ev = alice
        .wait_message(room, SAVED_WITHIN, |ev| {
            ev["origin_server_ts"].as_i64() >= Some(since)
                && (bot_notice(ev, &bot.user, "Recording saved:") || bot_notice(ev, &bot.user, "Recording failed:"))
        })
        .await
        .unwrap_or_else(|| panic!("no `Recording saved:` within {SAVED_WITHIN:?}\n{}", bot.mxrec.stderr_tail(80)));
    let body = ev["content"]["body"].as_str().unwrap();
    assert!(body.starts_with("Recording saved:"), "the bot says: {body}\n{}", bot.mxrec.stderr_tail(80));
    LinksNotice::parse(body)
}

async fn wait_recording_state(alice: &User, room: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = alice.state(room, "org.mxrec.recording", "").await.unwrap_or(Value::Null);
        if pred(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "org.mxrec.recording never became {what}; last {v}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The bot's device in the group call, or none, as the room state shows it.
async fn bot_devices(alice: &User, room: &str, bot: &str) -> usize {
    let m = alice.state(room, MEMBER_EVENT, bot).await.unwrap_or(Value::Null);
    m["m.calls"].as_array().map_or(0, |calls| calls.iter().map(|c| c["m.devices"].as_array().map_or(0, Vec::len)).sum())
}

/// Seconds on the recording clock of a wall-clock instant (Unix ms).
fn rel(m: &storage::Manifest, unix_ms: i64) -> f64 {
    (unix_ms - m.epoch_unix_ms) as f64 / 1000.0
}

/// The recorded span (s) of a track: first segment start to last segment end.
fn span_s(t: &storage::manifest::TrackInfo) -> (f64, f64) {
    (t.segments.first().unwrap().start_us as f64 / 1e6, t.segments.last().unwrap().end_us as f64 / 1e6)
}

/// A track records its owner's whole presence (within `slack` s at either end).
fn check_covers(m: &storage::Manifest, user: &str, source: TrackSource, slack: f64) {
    let t = recorded_track(m, user, source);
    let (from, to) = span_s(t);
    let (p0, p1) = presence_s(m, user);
    eprintln!("{user} present {p0:.2}–{p1:.2} s, {source} recorded {from:.2}–{to:.2} s");
    assert!(from <= p0 + slack && to >= p1 - slack, "{user}'s {source} track ({from:.2}–{to:.2} s) does not cover the presence {p0:.2}–{p1:.2} s");
}

/// Beeps once a second in a microphone track across `from..to` (s on the recording clock); the
/// file's first packet is the track's first segment start (`track_from`).
fn check_beeps(name: &str, audio: &Path, track_from: f64, from: f64, to: f64) {
    let start: f64 = ffprobe(audio)["format"]["start_time"].as_str().and_then(|s| s.parse().ok()).unwrap_or(0.0);
    let (from, to) = (from - track_from + start, to - track_from + start);
    let beeps = beep_onsets(&audio_rms_per_ms(&[audio]));
    let inside = beeps.iter().filter(|&&b| b >= from && b <= to).count();
    let expect = (to - from).floor() as usize;
    eprintln!("{name}: {inside} beeps in {from:.1}–{to:.1} s of the track file ({} in all)", beeps.len());
    assert!(inside + 2 >= expect, "{name}'s microphone: {inside} beeps in {from:.1}–{to:.1} s, about {expect} expected");
}

// -------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mesh_group_call_is_recorded() {
    let Some((hs, s3)) = servers("mesh_call::a_mesh_group_call_is_recorded") else { return };
    let _turn = serial();
    let suffix = unique_suffix();
    let alice = User::register(&hs, "alice", &suffix).await;
    let bob = User::register(&hs, "bob", &suffix).await;
    let zoe = User::register(&hs, "zoe", &suffix).await;
    let mut bot = start_bot(&hs, &s3, &suffix, &alice.user_id).await;
    assert!(alice.user_id < bot.user && bob.user_id < bot.user && zoe.user_id > bot.user, "the users sort around the bot");
    let room = call_room(&alice, &[&bob, &zoe], &bot).await;
    alice.put_state(&room, "org.mxrec.config", "", json!({"auto_record": true})).await;
    let group_call = format!("gc{suffix}");

    let mut pa = Peer::start(&alice, &room, &group_call, ALICE_GREY, true).await;
    let mut pb = Peer::start(&bob, &room, &group_call, BOB_GREY, false).await;
    let state = wait_recording_state(&alice, &room, "active", |v| v["active"] == true).await;
    assert_eq!(state["flavour"], "mesh", "{state}");
    assert!(state["started_by"].as_str().unwrap().contains(&alice.user_id), "auto-record set by alice: {state}");
    let t_alice = pa.connected_to(&bot.user).await;
    let a_role = pa.wait_event(Duration::from_secs(5), |v| v["event"] == "call" && v["peer_user"] == bot.user.as_str()).await;
    assert_eq!(a_role["role"], "caller", "alice sorts below the bot: she calls it");
    let t_bob = pb.connected_to(&bot.user).await;
    let start = Instant::now();
    let at = |s: u64| start + Duration::from_secs(s);

    tokio::time::sleep_until(at(3)).await;
    let share_on = pa.change(json!({"cmd": "screen_share", "on": true}), "screen_share").await;
    tokio::time::sleep_until(at(6)).await;
    let mut pz = Peer::start(&zoe, &room, &group_call, ZOE_GREY, false).await;
    let t_zoe = pz.connected_to(&bot.user).await;
    let z_role = pz.wait_event(Duration::from_secs(5), |v| v["event"] == "call" && v["peer_user"] == bot.user.as_str()).await;
    assert_eq!(z_role["role"], "callee", "zoe sorts above the bot: the bot calls her");
    let mention = alice
        .wait_message(&room, Duration::from_secs(30), |ev| ev["sender"] == bot.user.as_str() && ev["content"]["m.mentions"]["user_ids"][0] == zoe.user_id.as_str())
        .await;
    assert!(mention.is_some(), "the bot tells Zoe, who joined late, that the call is recorded");
    tokio::time::sleep_until(at(11)).await;
    let share_off = pa.change(json!({"cmd": "screen_share", "on": false}), "screen_share").await;
    tokio::time::sleep_until(at(14)).await;
    let mute_on = pa.change(json!({"cmd": "mute", "audio": true, "video": true}), "muted").await;
    tokio::time::sleep_until(at(19)).await;
    let mute_off = pa.change(json!({"cmd": "mute", "audio": false, "video": false}), "muted").await;
    tokio::time::sleep_until(at(22)).await;
    let bob_left = pb.leave("leave").await;
    tokio::time::sleep_until(at(28)).await;
    let ended = now_ms();
    let zoe_left = pz.leave("leave").await;
    pa.leave("end_call").await;

    let notice = saved_notice(&alice, &room, &bot, t_alice).await;
    wait_recording_state(&alice, &room, "inactive", |v| v["active"] == false).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while bot_devices(&alice, &room, &bot.user).await > 0 {
        assert!(Instant::now() < deadline, "the bot did not leave the group call");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let f = fetch_recording(CallFlavour::Mesh, &bot.dir.path().join("verify"), &s3, &bot.prefix, &room, &notice).await;
    let m = &f.manifest;
    eprintln!("manifest participants: {:?}", m.participants.iter().map(|p| (&p.id, &p.present)).collect::<Vec<_>>());
    assert_eq!(m.participants.len(), 3, "three devices in the call");
    for u in [&alice, &bob, &zoe] {
        let p = person(m, &u.user_id);
        assert!(p.id.starts_with(&format!("{}:", u.user_id)), "participant ids are user:device: {}", p.id);
        assert!(p.device_id.is_some(), "{}'s device is recorded", u.name);
    }
    // Presence: Bob from the start to his leave, Zoe from her join to the end.
    let (b0, b1) = presence_s(m, &bob.user_id);
    let (z0, z1) = presence_s(m, &zoe.user_id);
    let (a0, a1) = presence_s(m, &alice.user_id);
    let near = |got: f64, want: f64, what: &str| assert!((got - want).abs() <= 3.0, "{what}: {got:.2} s on the recording clock, expected about {want:.2} s");
    near(a0, rel(m, t_alice).max(0.0), "alice joined");
    near(b0, rel(m, t_bob).max(0.0), "bob joined");
    near(b1, rel(m, bob_left), "bob left");
    near(z0, rel(m, t_zoe), "zoe joined");
    near(z1, rel(m, zoe_left), "zoe left");
    near(a1, rel(m, ended), "alice was there to the end");
    for u in [&alice, &bob, &zoe] {
        check_covers(m, &u.user_id, TrackSource::Camera, 2.5);
        check_covers(m, &u.user_id, TrackSource::Microphone, 2.5);
    }
    let screen = recorded_track(m, &alice.user_id, TrackSource::Screen);
    let (s0, s1) = span_s(screen);
    eprintln!("screen share {:.2}–{:.2} s on the call clock, recorded {s0:.2}–{s1:.2} s", rel(m, share_on), rel(m, share_off));
    assert!(s0 <= rel(m, share_on) + 2.0 && s1 >= rel(m, share_off) - 2.0, "the screen track covers the share");
    check_composite_duration(&f);

    // The composite's tiles over time.
    let tiles = |a: Option<bool>, b: bool, z: bool| [("alice", ALICE_GREY, a), ("bob", BOB_GREY, Some(b)), ("zoe", ZOE_GREY, Some(z))];
    let mid = |from: i64, to: i64| rel(m, from + (to - from) / 2);
    check_tiles(&f.composite, mid(t_bob.max(t_alice), share_on), "alice and bob", &tiles(Some(true), true, false));
    check_tiles(&f.composite, mid(share_off, mute_on), "all three", &tiles(Some(true), true, true));
    check_tiles(&f.composite, mid(mute_on, mute_off), "alice's camera muted", &tiles(Some(false), true, true));
    check_tiles(&f.composite, mid(bob_left, ended), "bob has left", &tiles(Some(true), false, true));
    let at = mid(t_zoe, share_off);
    let shares = luma_shares(&f.composite, at, &[SCREEN_LUMA]);
    eprintln!("composite at {at:.2} s (alice sharing): screen {:.2}%", shares[0] * 100.0);
    assert!(shares[0] >= 0.35, "alice's screen share is on stage at {at:.2} s: {:.2}%", shares[0] * 100.0);

    // Everyone's audio across their presence, and Alice's flash and beep together.
    for u in [&alice, &bob, &zoe] {
        let mic = recorded_track(m, &u.user_id, TrackSource::Microphone);
        let (from, to) = span_s(mic);
        let file = &f.files[&mic.id];
        if u.user_id == alice.user_id {
            // Muted (silence) between mute_on and mute_off: beeps before and after.
            check_beeps("alice before muting", file, from, from + 0.5, rel(m, mute_on) - 0.5);
            check_beeps("alice after unmuting", file, from, rel(m, mute_off) + 0.5, to - 0.5);
        } else {
            check_beeps(u.name, file, from, from + 0.5, to - 0.5);
        }
    }
    let cam = recorded_track(m, &alice.user_id, TrackSource::Camera);
    let mic = recorded_track(m, &alice.user_id, TrackSource::Microphone);
    check_av("alice", &f.files[&cam.id], &f.files[&mic.id], MAX_AV_OFFSET_MS);
    let muted = cam.muted.iter().chain(mic.muted.iter()).count();
    assert!(muted >= 2, "alice's camera and microphone carry the mute: {:?} {:?}", cam.muted, mic.muted);
    bot.mxrec.assert_running("the call");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_commands_steer_a_mesh_call() {
    let Some((hs, s3)) = servers("mesh_call::room_commands_steer_a_mesh_call") else { return };
    let _turn = serial();
    let suffix = unique_suffix();
    let alice = User::register(&hs, "alice", &suffix).await;
    let bob = User::register(&hs, "bob", &suffix).await;
    let zoe = User::register(&hs, "zoe", &suffix).await;
    let mut bot = start_bot(&hs, &s3, &suffix, &alice.user_id).await;
    let room = call_room(&alice, &[&bob, &zoe], &bot).await;
    let group_call = format!("gc{suffix}");
    let mut pa = Peer::start(&alice, &room, &group_call, ALICE_GREY, true).await;
    let mut pz = Peer::start(&zoe, &room, &group_call, ZOE_GREY, false).await;
    pa.wait_event(Duration::from_secs(60), |v| v["event"] == "connected" && v["peer_user"] == zoe.user_id.as_str()).await;
    // Without auto-record the bot stays out of the call.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(bot_devices(&alice, &room, &bot.user).await, 0, "the bot joined a call nobody asked it to record");

    let reply = alice.command(&room, &bot.user, "start").await;
    assert!(reply.starts_with("Recording the call"), "{reply}");
    let first_start = now_ms();
    pa.connected_to(&bot.user).await;
    pz.connected_to(&bot.user).await;
    let state = wait_recording_state(&alice, &room, "active", |v| v["active"] == true).await;
    assert_eq!(state["flavour"], "mesh");
    assert_eq!(state["started_by"], alice.user_id.as_str());
    tokio::time::sleep(Duration::from_secs(8)).await;
    let reply = alice.command(&room, &bot.user, "stop").await;
    assert!(reply.starts_with("Stopping"), "{reply}");
    let first = saved_notice(&alice, &room, &bot, first_start).await;
    pa.wait_event(Duration::from_secs(20), |v| v["event"] == "hangup" && v["peer_user"] == bot.user.as_str()).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while bot_devices(&alice, &room, &bot.user).await > 0 {
        assert!(Instant::now() < deadline, "the bot did not leave the group call after `!rec stop`");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let reply = alice.command(&room, &bot.user, "status").await;
    assert!(reply.starts_with("Nothing is being recorded"), "{reply}");

    // Again, in the same call: a second recording, which ends with the call.
    pa.seen.clear();
    pz.seen.clear();
    let reply = alice.command(&room, &bot.user, "start").await;
    assert!(reply.starts_with("Recording the call"), "{reply}");
    let second_start = now_ms();
    pa.connected_to(&bot.user).await;
    pz.connected_to(&bot.user).await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    pz.leave("leave").await;
    pa.leave("end_call").await;
    let second = saved_notice(&alice, &room, &bot, second_start).await;
    assert_ne!(first.recording_id, second.recording_id);
    for (n, what) in [(&first, "first"), (&second, "second")] {
        let f = fetch_recording(CallFlavour::Mesh, &bot.dir.path().join(what), &s3, &bot.prefix, &room, n).await;
        let call_s = check_composite_duration(&f);
        assert!(call_s >= 6.0, "the {what} recording lasts {call_s:.1} s");
        for u in [&alice, &zoe] {
            recorded_track(&f.manifest, &u.user_id, TrackSource::Camera);
            recorded_track(&f.manifest, &u.user_id, TrackSource::Microphone);
        }
        let control = f.manifest.control.iter().map(|a| (a.action.as_str(), a.by.as_str())).collect::<Vec<_>>();
        eprintln!("{what} recording control: {control:?}");
    }
    bot.mxrec.assert_running("two recordings");
}

/// The bot answers a device that writes to it Olm-encrypted in kind: Carol (a matrix-sdk client
/// with an aiortc media peer) joins the group call and sends her invite, and later her hangup,
/// as encrypted to-device messages (with a malformed encrypted invite before, which is refused
/// while the bot keeps going). The bot's answer must reach her encrypted, for her session, and her
/// media is recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn olm_encrypted_peer_messages_are_answered_encrypted() {
    use matrix_sdk::deserialized_responses::EncryptionInfo;
    use matrix_sdk::ruma::events::{AnyToDeviceEvent, AnyToDeviceEventContent};
    use matrix_sdk::ruma::serde::Raw;
    use matrix_sdk::ruma::{OwnedDeviceId, OwnedUserId};

    let Some((hs, s3)) = servers("mesh_call::olm_encrypted_peer_messages_are_answered_encrypted") else { return };
    let _turn = serial();
    let suffix = unique_suffix();
    let alice = User::register(&hs, "alice", &suffix).await;
    let carol = User::register(&hs, "carol", &suffix).await;
    let mut bot = start_bot(&hs, &s3, &suffix, &alice.user_id).await;
    let room = call_room(&alice, &[&carol], &bot).await;
    alice.put_state(&room, "org.mxrec.config", "", json!({"auto_record": true})).await;

    // Carol's Matrix side: matrix-sdk (Olm), syncing; call messages to her are collected with
    // whether they came encrypted.
    let client = matrix_sdk::Client::builder()
        .homeserver_url(&hs.homeserver)
        .sqlite_store(bot.dir.path().join("carol-store"), None)
        .build()
        .await
        .unwrap();
    client.matrix_auth().login_username(&carol.user_id, &carol.password).send().await.expect("carol logs in");
    client.encryption().wait_for_e2ee_initialization_tasks().await;
    let carol_device = client.device_id().unwrap().to_string();
    let (tx, mut to_carol) = tokio::sync::mpsc::unbounded_channel::<(Value, bool)>();
    client.add_event_handler(move |raw: Raw<AnyToDeviceEvent>, info: Option<EncryptionInfo>| {
        let tx = tx.clone();
        async move {
            let v: Value = serde_json::from_str(raw.json().get()).unwrap_or(Value::Null);
            if v["type"].as_str().is_some_and(|t| t.starts_with("m.call.")) {
                let _ = tx.send((v, info.is_some()));
            }
        }
    });
    let syncing = client.clone();
    let sync = tokio::spawn(async move {
        let _ = syncing.sync(matrix_sdk::config::SyncSettings::default().timeout(Duration::from_millis(1000))).await;
    });

    let group_call = format!("gc{suffix}");
    let session = format!("carol-session-{suffix}");
    carol.put_state(&room, CALL_EVENT, &group_call, json!({"m.intent": "m.room", "m.type": "m.video"})).await;
    let expires = now_ms() + 3_600_000;
    let member = json!({"m.calls": [{"m.call_id": group_call, "m.devices": [{"device_id": carol_device, "session_id": session, "expires_ts": expires, "feeds": [{"purpose": "m.usermedia"}]}]}]});
    carol.put_state(&room, MEMBER_EVENT, &carol.user_id, member).await;
    // The bot joins the call on its own (auto-record) and shows its device and session.
    let deadline = Instant::now() + Duration::from_secs(60);
    let (bot_device, bot_session) = loop {
        let m = alice.state(&room, MEMBER_EVENT, &bot.user).await.unwrap_or(Value::Null);
        let d = &m["m.calls"][0]["m.devices"][0];
        if let (Some(dev), Some(sess)) = (d["device_id"].as_str(), d["session_id"].as_str()) {
            break (dev.to_owned(), sess.to_owned());
        }
        assert!(Instant::now() < deadline, "the bot did not join the group call\n{}", bot.mxrec.stderr_tail(40));
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let bot_user = OwnedUserId::try_from(bot.user.as_str()).unwrap();
    let bot_dev = OwnedDeviceId::from(bot_device.as_str());
    let deadline = Instant::now() + Duration::from_secs(30);
    let device = loop {
        if let Ok(Some(d)) = client.encryption().get_device(&bot_user, &bot_dev).await {
            break d;
        }
        assert!(Instant::now() < deadline, "carol never learnt the bot's device");
        let _ = client.encryption().request_user_identity(&bot_user).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let call_id = format!("carolcall{suffix}");
    let common = |seq: u64| {
        json!({"call_id": call_id, "party_id": carol_device, "version": "1", "conf_id": group_call,
               "device_id": carol_device, "sender_session_id": session, "dest_session_id": bot_session, "seq": seq})
    };
    let send = |event_type: &'static str, content: Value| {
        let (client, device) = (client.clone(), device.clone());
        async move {
            let raw = Raw::<AnyToDeviceEventContent>::from_json_string(content.to_string()).unwrap();
            let failures = client.encryption().encrypt_and_send_raw_to_device(vec![&device], event_type, raw, Default::default()).await.expect("sent");
            assert!(failures.is_empty(), "not encrypted for {failures:?}");
        }
    };
    // Malformed first (an invite without an offer, for another call id): refused, nothing breaks.
    let mut bad = common(0);
    bad["call_id"] = json!(format!("bad{suffix}"));
    bad["lifetime"] = json!(60000);
    send("m.call.invite", bad).await;

    let mut sender = tokio::process::Command::new(python())
        .arg(repo_root().join("tests/peers/aiortc_sender.py"))
        .args(["--seconds", "6"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("aiortc_sender.py runs");
    let mut out = BufReader::new(sender.stdout.take().unwrap()).lines();
    let offer: Value = serde_json::from_str(&out.next_line().await.unwrap().expect("an offer")).unwrap();
    let mut invite = common(0);
    invite["offer"] = offer;
    invite["lifetime"] = json!(60000);
    invite["invitee"] = json!(bot.user);
    let invited = now_ms();
    send("m.call.invite", invite).await;
    let (answer, encrypted) = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let (v, enc) = to_carol.recv().await.expect("carol's sync runs");
            if v["type"] == "m.call.answer" && v["content"]["call_id"] == call_id.as_str() {
                return (v, enc);
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no m.call.answer to carol\n{}", bot.mxrec.stderr_tail(60)));
    eprintln!("the bot's answer (encrypted: {encrypted}): {}", answer["content"]["dest_session_id"]);
    assert!(encrypted, "the bot answered an encrypted invite unencrypted");
    let c = &answer["content"];
    assert_eq!((c["conf_id"].as_str(), c["dest_session_id"].as_str(), c["seq"].as_u64()), (Some(group_call.as_str()), Some(session.as_str()), Some(0)));
    assert_eq!(c["sender_session_id"], bot_session.as_str());
    let mut stdin = sender.stdin.take().unwrap();
    let reply = json!({"type": "answer", "sdp": c["answer"]["sdp"]});
    stdin.write_all(format!("{reply}\n").as_bytes()).await.unwrap();
    stdin.flush().await.unwrap();
    let status = tokio::time::timeout(Duration::from_secs(60), sender.wait()).await.expect("the sender ends").unwrap();
    assert!(status.success(), "aiortc_sender: {status}");
    let mut hangup = common(1);
    hangup["reason"] = json!("user_hangup");
    send("m.call.hangup", hangup).await;
    carol.put_state(&room, MEMBER_EVENT, &carol.user_id, json!({"m.calls": []})).await;

    let notice = saved_notice(&alice, &room, &bot, invited).await;
    let f = fetch_recording(CallFlavour::Mesh, &bot.dir.path().join("verify"), &s3, &bot.prefix, &room, &notice).await;
    let cam = recorded_track(&f.manifest, &carol.user_id, TrackSource::Camera);
    let mic = recorded_track(&f.manifest, &carol.user_id, TrackSource::Microphone);
    check_av("carol", &f.files[&cam.id], &f.files[&mic.id], MAX_AV_OFFSET_MS);
    let refused = bot.mxrec.log_lines_with("malformed group call message");
    assert!(!refused.is_empty(), "the malformed encrypted invite is refused with a log line");
    bot.mxrec.assert_running("encrypted signalling");
    sync.abort();
}
