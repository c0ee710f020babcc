//! A MatrixRTC call (Element Call's `compatibility` mode over a LiveKit SFU) recorded end to end
//! through real servers: Synapse (with MSC4140 delayed events), Garage (S3), LiveKit with the JWT
//! service stand-in (tests/peers/lk_jwt_standin.py), and `mxrec run` as the bot. The call's
//! members are real Matrix devices (matrix-sdk clients in this process) that do what Element Call
//! does on the Matrix side: a legacy `org.matrix.msc3401.call.member` state event per device, a
//! LiveKit grant from the JWT service with a Matrix OpenID token, and, in encrypted rooms, their
//! media key sent Olm-encrypted to the bot's device as `io.element.call.encryption_keys`, rotated
//! when someone leaves. Their media and frame encryption are LiveKit's own client code
//! (tests/peers/livekit_publisher.py: the LiveKit Python SDK, libwebrtc, the native frame
//! cryptor), so nothing of mxrec's stack is on the sending side. The bot is asked to record with
//! `mxrec record --room` before the call starts.
//!
//! - `encrypted_call_api_key_path` / `encrypted_call_openid_path`: an encrypted room, the bot
//!   minting its own LiveKit token from a configured API key / asking the JWT service stand-in
//!   with its OpenID token. Alice and Bob start the call; Dave joins 2 s later and publishes
//!   encrypted media but never gives the bot his key; Carol joins at 6 s, in Element Call's
//!   `matrix_2_0` mode (a sticky `org.matrix.msc4143.rtc.member` membership sent as plain HTTP,
//!   her grant from `/get_token`, a hashed LiveKit identity) while the others use the default
//!   `compatibility` mode (legacy state, `/sfu/get`, `user:device`); Bob leaves at 12 s,
//!   after which Alice and Carol rotate their keys; Alice shares her screen for 5 s early on;
//!   everyone leaves at 22 s. Proven: the bot's call membership is visible to the members while
//!   it records and withdrawn after; the room gets "This call is being recorded by" and then
//!   "Recording saved:" with links; every per-track file decodes without an error; the manifest
//!   has Alice's camera, microphone and screen, Bob's and Carol's camera and microphone, with
//!   segments, Dave's tracks (if any) with no segment and an undecryptable span, and presence
//!   spans that show Carol joining late and Bob leaving early; each of Alice, Bob and Carol has
//!   flash and beep within 40 ms between their camera and microphone files, across the key
//!   rotation; the composite lasts as long as the call, and its tiles (found by each member's
//!   camera background grey) come and go as the members did.
//! - `unencrypted_call_openid_path`: the same call in an unencrypted room, the bot's grant from
//!   the JWT service stand-in through OpenID. Nobody sends keys, so there is no Dave and no
//!   rotation; everything else above is proven the same way, and no track has an undecryptable
//!   span.
//!
//! Needs the servers of `deploy/dev/test.sh`: `MXREC_TEST_HOMESERVER`/`MXREC_TEST_SYNAPSE_SECRET`
//! (deploy/dev/synapse.sh env, a Synapse with `max_event_delay_duration`), the S3 env of
//! deploy/dev/garage.sh, `MXREC_TEST_LIVEKIT_URL`/`_KEY`/`_SECRET` and `MXREC_TEST_RTC_SERVICE_URL`
//! (deploy/dev/livekit.sh env, the stand-in mapping this homeserver for OpenID), and the venv of
//! deploy/dev/pyenv.sh with the `livekit` Python SDK. The tests take turns (four publishers,
//! the bot and the servers share two cores).

#![recursion_limit = "256"]

mod harness;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use harness::calls::*;
use harness::*;
use matrix_sdk::config::SyncSettings;
use matrix_sdk::encryption::identities::Device;
use matrix_sdk::ruma::api::client::account::request_openid_token;
use matrix_sdk::ruma::api::client::room::create_room::v3::{Request as CreateRoomRequest, RoomPreset};
use matrix_sdk::ruma::events::room::encryption::RoomEncryptionEventContent;
use matrix_sdk::ruma::events::{AnyToDeviceEventContent, InitialStateEvent};
use matrix_sdk::ruma::serde::Raw;
use matrix_sdk::ruma::{OwnedDeviceId, OwnedRoomId, OwnedUserId};
use matrix_sdk::{Client, LoopCtrl, Room};
use serde_json::{json, Value};
use storage::manifest::{CallFlavour, TrackInfo, TrackSource};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::time::Instant;

const CALL_MEMBER_EVENT: &str = "org.matrix.msc3401.call.member";
const KEYS_EVENT: &str = "io.element.call.encryption_keys";
/// The bot's `matrixrtc.delayed_leave_ms`: short, so a withdrawn membership is seen quickly.
const DELAYED_LEAVE_MS: u64 = 4000;
/// First login, key upload and first sync of a fresh bot.
const BOT_READY_TIMEOUT: Duration = Duration::from_secs(120);
/// The links notice must be in the room this soon after the last member left.
const SAVED_WITHIN: Duration = Duration::from_secs(90);
/// Element Call's `useKeyDelay`: a rotated key reaches the others this long before it is used.
const USE_KEY_DELAY: Duration = Duration::from_secs(1);
const MAX_AV_OFFSET_MS: f64 = 40.0;

// Camera backgrounds (`--background GREY`), far from each other and from what the compositor
// draws itself (transcoder/src/compositor.rs: canvas 0x101010 → Y≈30, placeholder 0x3a3a3a →
// Y≈66; the screen share's blue → Y≈78; flashes and counter blocks 235/16). Carol's stays well
// below white so her flashes still stand out for `flash_times`.
const ALICE_GREY: u8 = 90;
const BOB_GREY: u8 = 150;
const CAROL_GREY: u8 = 200;
const DAVE_GREY: u8 = 40;
/// Luma of the publisher's screen-share blue (40, 70, 170), BT.601 limited range.
const SCREEN_LUMA: f64 = 16.0 + (65.481 * 40.0 + 128.553 * 70.0 + 24.966 * 170.0) / 255.0;
/// A screen share on stage covers at least this share of the frame.
const STAGE_SHARE: f64 = 0.35;

/// Both tests load the CPU heavily while media flows; they must not overlap.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}

/// Percent-encodes a path segment (room ids, user ids, state keys).
fn pct(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The servers, or a skip.
fn servers(test: &str) -> Option<(Synapse, S3, LiveKit)> {
    let Some(hs) = synapse() else {
        skip(test, "MXREC_TEST_HOMESERVER / MXREC_TEST_SYNAPSE_SECRET are not set (deploy/dev/synapse.sh env)");
        return None;
    };
    let Some(s3) = s3() else {
        skip(test, "MXREC_S3_ENDPOINT is not set (deploy/dev/garage.sh env)");
        return None;
    };
    let Some(lk) = livekit() else {
        skip(
            test,
            "MXREC_TEST_LIVEKIT_URL / _KEY / _SECRET / MXREC_TEST_RTC_SERVICE_URL are not set (deploy/dev/livekit.sh env)",
        );
        return None;
    };
    Some((hs, s3, lk))
}

/// A registered user and its password.
struct Account {
    user: String,
    password: String,
}

fn account(hs: &Synapse, name: &str, suffix: &str) -> Account {
    let password = format!("{name}-pw-{suffix}");
    let user = register_user(hs, &format!("{name}-{suffix}"), &password);
    Account { user, password }
}

// -------------------------------------------------------------------------------------------------
// The bot.

/// `mxrec run`, ready: its user and device as it printed them.
struct Bot {
    // Fields drop in order: mxrec is stopped before its work dir is deleted.
    mxrec: MxrecRun,
    dir: tempfile::TempDir,
    config: PathBuf,
    prefix: String,
    user: String,
    device: String,
}

/// The `[matrixrtc]` section: a short delayed leave and, for the API-key path, the SFU's key.
fn matrixrtc_toml(lk: &LiveKit, api_key: bool) -> String {
    let mut s = format!("\n[matrixrtc]\ndelayed_leave_ms = {DELAYED_LEAVE_MS}\n");
    if api_key {
        s.push_str(&format!(
            "\n[[matrixrtc.livekit]]\nservice_url = {:?}\nurl = {:?}\napi_key = {:?}\napi_secret = {:?}\n",
            lk.service_url, lk.url, lk.key, lk.secret
        ));
    }
    s
}

async fn start_bot(hs: &Synapse, s3: &S3, lk: &LiveKit, suffix: &str, inviter: &str, api_key: bool) -> Bot {
    let dir = tempfile::tempdir().unwrap();
    let bot = account(hs, "mxrec-bot", suffix);
    let prefix = format!("matrixrtc-{suffix}");
    let data_dir = dir.path().join("data");
    let setup = BotSetup {
        data_dir: &data_dir,
        homeserver: &hs.homeserver,
        user: &bot.user,
        password: &bot.password,
        allowed_inviters: &[inviter],
        http_port: free_port(),
        s3,
        prefix: &prefix,
    };
    let config = dir.path().join("mxrec.toml");
    setup.write(&config);
    let mut toml = std::fs::read_to_string(&config).unwrap();
    toml.push_str(&matrixrtc_toml(lk, api_key));
    std::fs::write(&config, toml).unwrap();
    eprintln!("bot {}, objects under {prefix}/, work dir {}", bot.user, dir.path().display());

    let mut mxrec = MxrecRun::start(dir.path(), &config);
    // `bot: @rec:localhost device ABCDEFGH`
    let line = mxrec.wait_line("bot:", BOT_READY_TIMEOUT).await;
    let (who, device) = line.split_once(" device ").unwrap_or_else(|| panic!("odd bot line: {line:?}"));
    assert_eq!(who.trim(), bot.user, "the bot logged in as the configured user");
    let device = device.trim().to_owned();
    assert!(!device.is_empty(), "the bot line names a device: {line:?}");
    Bot { mxrec, dir, config, prefix, user: bot.user, device }
}

/// `mxrec record --room` against the running bot (retried while the bot has not taken in its
/// join yet); returns the one line it printed.
async fn ask_to_record(bot: &Bot, room: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (cwd, config, room_arg) = (bot.dir.path().to_owned(), bot.config.clone(), room.to_owned());
        let out = tokio::task::spawn_blocking(move || mxrec(&cwd, &config, &["record", "--room", &room_arg]))
            .await
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        if out.status.success() {
            assert_eq!(stdout.lines().count(), 1, "`mxrec record` prints one line: {stdout:?}");
            return stdout;
        }
        assert!(
            Instant::now() < deadline,
            "`mxrec record --room {room}` failed ({}): {stdout} {stderr}\n{}",
            out.status,
            bot.mxrec.stderr_tail(60)
        );
        eprintln!("`mxrec record` failed ({}), retrying: {stderr}", out.status);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

// -------------------------------------------------------------------------------------------------
// One LiveKit publisher process (tests/peers/livekit_publisher.py).

struct Publisher {
    name: String,
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    events: tokio::sync::mpsc::UnboundedReceiver<Value>,
}

impl Publisher {
    async fn start(python: &Path, name: &str, url: &str, jwt: &str, grey: u8, key: Option<&MediaKey>, extra: &[&str]) -> Self {
        let script = repo_root().join("tests/peers/livekit_publisher.py");
        let mut cmd = tokio::process::Command::new(python);
        cmd.arg(&script).args(["--url", url, "--token", jwt, "--background", &grey.to_string()]).args(extra);
        if let Some(k) = key {
            cmd.args(["--key", &k.base64(), "--key-index", &k.index.to_string()]);
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
        let label = name.to_owned();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                eprintln!("publisher {label}: {line}");
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    let _ = tx.send(v);
                }
            }
        });
        Publisher { name: name.to_owned(), child, stdin, events }
    }

    async fn wait_event(&mut self, event: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(v)) if v["event"] == event => return v,
                Ok(Some(v)) if v["event"] == "disconnected" => {
                    panic!("publisher {} was disconnected by the server while waiting for `{event}`: {v}", self.name)
                }
                Ok(Some(_)) => {}
                Ok(None) => panic!("publisher {} exited before `{event}` ({:?})", self.name, self.child.try_wait()),
                Err(_) => panic!("no `{event}` from publisher {} within {timeout:?}", self.name),
            }
        }
    }

    async fn send(&mut self, cmd: Value) {
        self.stdin.write_all(format!("{cmd}\n").as_bytes()).await.unwrap();
        self.stdin.flush().await.unwrap();
    }

    /// Unpublishes, disconnects and waits for the process to exit 0.
    async fn leave(mut self) {
        self.send(json!({"cmd": "leave"})).await;
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("publisher {} did not exit within 30 s of `leave`", self.name))
            .unwrap();
        assert!(status.success(), "publisher {} exit: {status}", self.name);
    }
}

/// A member's current media key: 16 random bytes at an index, as Element Call makes them.
#[derive(Clone)]
struct MediaKey {
    index: u8,
    bytes: [u8; 16],
}

impl MediaKey {
    fn random(index: u8) -> Self {
        MediaKey { index, bytes: rand::random() }
    }

    /// Std base64 with padding, as matrix-js-sdk sends it.
    fn base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.bytes)
    }
}

// -------------------------------------------------------------------------------------------------
// Call members: matrix-sdk clients doing what Element Call does on the Matrix side.

/// What every member needs to know about the call.
struct Call {
    homeserver: String,
    room: OwnedRoomId,
    /// The JWT service every member advertises (`livekit_service_url`).
    service_url: String,
    python: PathBuf,
    bot_user: String,
    bot_device: String,
}

impl Call {
    fn bot_state_key(&self) -> String {
        format!("_{}_{}_m.call", self.bot_user, self.bot_device)
    }
}

/// Timeline events (decrypted where they were encrypted) delivered by a member's sync, by room.
struct Timeline {
    rx: tokio::sync::mpsc::UnboundedReceiver<(String, Value)>,
    seen: Vec<(String, Value)>,
}

impl Timeline {
    fn pull(&mut self) {
        while let Ok(ev) = self.rx.try_recv() {
            self.seen.push(ev);
        }
    }

    /// The first event (already seen or arriving before `deadline`) matching `pred(room, event)`.
    async fn wait_for(&mut self, deadline: Instant, pred: impl Fn(&str, &Value) -> bool) -> Option<Value> {
        self.pull();
        if let Some((_, ev)) = self.seen.iter().find(|(r, e)| pred(r.as_str(), e)) {
            return Some(ev.clone());
        }
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some((room, ev))) => {
                    let hit = pred(room.as_str(), &ev);
                    self.seen.push((room, ev.clone()));
                    if hit {
                        return Some(ev);
                    }
                }
                Ok(None) => panic!("the member's sync loop ended"),
                Err(_) => return None,
            }
        }
    }

    fn all(&mut self, pred: impl Fn(&str, &Value) -> bool) -> Vec<Value> {
        self.pull();
        self.seen.iter().filter(|(r, e)| pred(r.as_str(), e)).map(|(_, e)| e.clone()).collect()
    }
}

struct Participant {
    name: &'static str,
    user_id: String,
    device_id: String,
    client: Client,
    token: String,
    grey: u8,
    sync: tokio::task::JoinHandle<()>,
    timeline: Timeline,
    room: Option<Room>,
    publisher: Option<Publisher>,
    key: Option<MediaKey>,
    /// `Some(member id)` for a member in Element Call's `matrix_2_0` mode: a sticky
    /// `org.matrix.msc4143.rtc.member` membership, a grant from `/get_token`, a hashed identity.
    sticky: Option<String>,
}

impl Drop for Participant {
    fn drop(&mut self) {
        self.sync.abort();
    }
}

impl Participant {
    /// Logs in with its own SQLite store and syncs in the background.
    async fn login(hs: &Synapse, name: &'static str, acct: &Account, grey: u8, store: &Path) -> Self {
        let client = Client::builder()
            .homeserver_url(&hs.homeserver)
            .sqlite_store(store, None)
            .build()
            .await
            .expect("matrix-sdk client");
        client
            .matrix_auth()
            .login_username(&acct.user, &acct.password)
            .initial_device_display_name(&format!("matrixrtc_call test {name}"))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{name} logs in: {e}"));
        client.encryption().wait_for_e2ee_initialization_tasks().await;
        let device_id = client.device_id().unwrap().to_string();
        let token = client.access_token().unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let syncing = client.clone();
        let sync = tokio::spawn(async move {
            let settings = SyncSettings::default().timeout(Duration::from_millis(1000));
            let result = syncing
                .sync_with_callback(settings, move |response| {
                    let tx = tx.clone();
                    async move {
                        for (room_id, update) in &response.rooms.joined {
                            for ev in &update.timeline.events {
                                let event: Value = serde_json::from_str(ev.raw().json().get()).unwrap_or(Value::Null);
                                // Nobody may be listening (only Alice's timeline is read); the sync
                                // must go on regardless, for keys and devices.
                                let _ = tx.send((room_id.to_string(), event));
                            }
                        }
                        LoopCtrl::Continue
                    }
                })
                .await;
            if let Err(e) = result {
                eprintln!("{name}'s sync loop failed: {e}");
            }
        });
        eprintln!("{name}: {} device {device_id}", acct.user);
        Participant {
            name,
            user_id: acct.user.clone(),
            device_id,
            client,
            token,
            grey,
            sync,
            timeline: Timeline { rx, seen: vec![] },
            room: None,
            publisher: None,
            key: None,
            sticky: None,
        }
    }

    /// Element Call's `matrix_2_0` mode for this member, with a fresh member id.
    fn use_sticky_membership(&mut self) {
        self.sticky = Some(format!("{:032x}", rand::random::<u128>()));
    }

    /// The LiveKit identity the JWT service gives this device: `user:device` from `/sfu/get`
    /// (also the legacy membership's id); from `/get_token` the unpadded base64 SHA-256 of the
    /// JSON array `[user, device, member id]`.
    fn identity(&self) -> String {
        match &self.sticky {
            None => format!("{}:{}", self.user_id, self.device_id),
            Some(member) => {
                use sha2::Digest;
                let raw = serde_json::to_string(&[&self.user_id, &self.device_id, member]).unwrap();
                base64::engine::general_purpose::STANDARD_NO_PAD.encode(sha2::Sha256::digest(raw.as_bytes()))
            }
        }
    }

    /// The key event's `member.id`: the membership's id (`membershipID` / the sticky member id).
    fn member_id(&self) -> String {
        self.sticky.clone().unwrap_or_else(|| self.identity())
    }

    /// Sends a sticky `org.matrix.msc4143.rtc.member` event (MSC4354). matrix-sdk cannot add the
    /// sticky query parameter, so it goes as plain HTTP, unencrypted even in an encrypted room
    /// (Element Call would Megolm-encrypt it; the bot reads both).
    async fn send_sticky(&self, call: &Call, content: Value) {
        let txn = format!("sticky-{}", rand::random::<u64>());
        let url = format!(
            "{}/_matrix/client/v3/rooms/{}/send/org.matrix.msc4143.rtc.member/{txn}?org.matrix.msc4354.sticky_duration_ms=3600000",
            call.homeserver.trim_end_matches('/'),
            pct(call.room.as_str())
        );
        let r = reqwest::Client::new()
            .put(&url)
            .bearer_auth(&self.token)
            .json(&content)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{} sends its sticky membership: {e}", self.name));
        let status = r.status();
        let body = r.text().await.unwrap_or_default();
        assert!(status.is_success(), "{} sends its sticky membership: HTTP {status} {body}", self.name);
    }

    /// The sticky membership Element Call writes in `matrix_2_0` mode.
    fn sticky_content(&self, call: &Call, member: &str) -> Value {
        json!({
            "application": {"type": "m.call", "m.call.intent": "video"},
            "slot_id": "m.call#ROOM",
            "rtc_transports": [{"type": "livekit", "livekit_service_url": call.service_url}],
            "member": {"user_id": self.user_id, "device_id": self.device_id, "id": member},
            "versions": [],
            "msc4354_sticky_key": member,
        })
    }

    /// A room with `invite`d users whose power levels let every member publish its call
    /// membership (as Element Web sets them up for calls), encrypted or not.
    async fn create_room(&mut self, invite: &[&str], encrypted: bool) -> OwnedRoomId {
        let mut req = CreateRoomRequest::new();
        req.invite = invite.iter().map(|u| OwnedUserId::try_from(*u).unwrap()).collect();
        req.preset = Some(RoomPreset::PrivateChat);
        req.name = Some(format!("matrixrtc_call {}", if encrypted { "encrypted" } else { "plain" }));
        if encrypted {
            req.initial_state =
                vec![InitialStateEvent::with_empty_state_key(RoomEncryptionEventContent::with_recommended_defaults())
                    .to_raw_any()];
        }
        // Synapse merges the override shallowly, so `events` is given whole.
        let power_levels = json!({"events": {
            "m.room.name": 50, "m.room.power_levels": 100, "m.room.history_visibility": 100,
            "m.room.canonical_alias": 50, "m.room.avatar": 50, "m.room.tombstone": 100,
            "m.room.server_acl": 100, "m.room.encryption": 100, CALL_MEMBER_EVENT: 0,
        }});
        req.power_level_content_override =
            Some(Raw::from_json_string(power_levels.to_string()).expect("power levels are JSON"));
        let room = self.client.create_room(req).await.unwrap_or_else(|e| panic!("{} creates the room: {e}", self.name));
        let id = room.room_id().to_owned();
        self.room = Some(room);
        id
    }

    async fn join(&mut self, room: &OwnedRoomId) {
        let joined =
            self.client.join_room_by_id(room).await.unwrap_or_else(|e| panic!("{} joins {room}: {e}", self.name));
        self.room = Some(joined);
    }

    async fn set_membership(&self, content: Value) {
        let room = self.room.as_ref().expect("in the room");
        let state_key = format!("_{}_{}_m.call", self.user_id, self.device_id);
        room.send_state_event_raw(CALL_MEMBER_EVENT, &state_key, content)
            .await
            .unwrap_or_else(|e| panic!("{} sends its call membership: {e}", self.name));
    }

    /// The legacy membership Element Call writes in `compatibility` mode.
    fn membership_content(&self, call: &Call) -> Value {
        json!({
            "application": "m.call",
            "call_id": "",
            "scope": "m.room",
            "device_id": self.device_id,
            "membershipID": self.identity(),
            "expires": 14_400_000,
            "m.call.intent": "video",
            "focus_active": {"type": "livekit", "focus_selection": "multi_sfu"},
            "foci_preferred": [{
                "type": "livekit",
                "livekit_service_url": call.service_url,
                "livekit_alias": call.room.as_str(),
            }],
            "created_ts": now_ms(),
        })
    }

    /// The LiveKit URL and token from the JWT service (`/sfu/get` with a Matrix OpenID token).
    async fn sfu_grant(&self, call: &Call) -> (String, String) {
        let user = OwnedUserId::try_from(self.user_id.as_str()).unwrap();
        let openid = self
            .client
            .send(request_openid_token::v3::Request::new(user))
            .await
            .unwrap_or_else(|e| panic!("{} gets an OpenID token: {e}", self.name));
        let openid_token = json!({
            "access_token": openid.access_token,
            "token_type": openid.token_type.to_string(),
            "matrix_server_name": openid.matrix_server_name.to_string(),
            "expires_in": openid.expires_in.as_secs(),
        });
        let (endpoint, body) = match &self.sticky {
            None => ("sfu/get", json!({"room": call.room.as_str(), "openid_token": openid_token, "device_id": self.device_id})),
            Some(member) => (
                "get_token",
                json!({
                    "room_id": call.room.as_str(),
                    "slot_id": "m.call#ROOM",
                    "openid_token": openid_token,
                    "member": {"id": member, "claimed_user_id": self.user_id, "claimed_device_id": self.device_id},
                }),
            ),
        };
        let url = format!("{}/{endpoint}", call.service_url.trim_end_matches('/'));
        let r = reqwest::Client::new()
            .post(&url)
            .json(&body)
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {url} for {}: {e}", self.name));
        let status = r.status();
        let v: Value = r.json().await.unwrap_or(Value::Null);
        assert!(status.is_success(), "POST {url} for {}: HTTP {status} {v}", self.name);
        let sfu = v["url"].as_str().unwrap_or_else(|| panic!("no url in {v}")).to_owned();
        let jwt = v["jwt"].as_str().unwrap_or_else(|| panic!("no jwt in {v}")).to_owned();
        (sfu, jwt)
    }

    /// Joins the call: membership, grant, publisher connected with camera and microphone
    /// published. Returns when it connected (Unix ms).
    async fn join_call(&mut self, call: &Call, encrypted: bool, extra: &[&str]) -> i64 {
        match &self.sticky {
            None => self.set_membership(self.membership_content(call)).await,
            Some(member) => self.send_sticky(call, self.sticky_content(call, member)).await,
        }
        let (url, jwt) = self.sfu_grant(call).await;
        let key = encrypted.then(|| MediaKey::random(0));
        let mut p = Publisher::start(&call.python, self.name, &url, &jwt, self.grey, key.as_ref(), extra).await;
        let connected = p.wait_event("connected", Duration::from_secs(60)).await;
        let connected_at = now_ms();
        assert_eq!(connected["identity"], self.identity().as_str(), "{}'s LiveKit identity", self.name);
        for _ in 0..2 {
            let published = p.wait_event("published", Duration::from_secs(30)).await;
            let expected = if encrypted { "GCM" } else { "NONE" };
            assert_eq!(published["encryption"], expected, "{}'s {} track encryption", self.name, published["source"]);
        }
        self.publisher = Some(p);
        self.key = key;
        connected_at
    }

    /// The bot's device as this client's crypto store knows it, after a keys query if needed.
    async fn bot_device(&self, call: &Call) -> Device {
        let user = OwnedUserId::try_from(call.bot_user.as_str()).unwrap();
        let device = OwnedDeviceId::from(call.bot_device.as_str());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.client.encryption().get_device(&user, &device).await {
                Ok(Some(d)) => return d,
                Ok(None) => {}
                Err(e) => eprintln!("{}: looking up the bot's device: {e}", self.name),
            }
            assert!(Instant::now() < deadline, "{} never learnt the bot's device {device} within 30 s", self.name);
            // A keys query for the bot (the sync may not have tracked it yet).
            if let Err(e) = self.client.encryption().request_user_identity(&user).await {
                eprintln!("{}: keys query for the bot: {e}", self.name);
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// Sends the current key to the bot's device, Olm-encrypted, exactly as Element Call does.
    async fn send_key(&self, call: &Call) {
        let key = self.key.as_ref().expect("an encrypted member has a key");
        let device = self.bot_device(call).await;
        let content = json!({
            "keys": {"index": key.index, "key": key.base64()},
            "room_id": call.room.as_str(),
            "member": {"claimed_device_id": self.device_id, "id": self.member_id()},
            "session": {"call_id": "", "application": "m.call", "scope": "m.room"},
            "sent_ts": now_ms(),
        });
        let raw = Raw::<AnyToDeviceEventContent>::from_json_string(content.to_string()).unwrap();
        // `Default::default()` is `CollectStrategy::AllDevices` (matrix-sdk does not re-export
        // the type), what Element X's widget host uses for these keys.
        let failures = self
            .client
            .encryption()
            .encrypt_and_send_raw_to_device(vec![&device], KEYS_EVENT, raw, Default::default())
            .await
            .unwrap_or_else(|e| panic!("{} sends its key to the bot: {e}", self.name));
        assert!(failures.is_empty(), "{}'s key did not reach {failures:?}", self.name);
        eprintln!("{} sent key index {} to the bot's device", self.name, key.index);
    }

    /// A new key at the next index: to the bot first, then (after Element Call's delay) used.
    async fn rotate_key(&mut self, call: &Call) {
        let next = self.key.as_ref().expect("an encrypted member has a key").index.wrapping_add(1);
        let key = MediaKey::random(next);
        self.key = Some(key.clone());
        self.send_key(call).await;
        tokio::time::sleep(USE_KEY_DELAY).await;
        let p = self.publisher.as_mut().expect("publishing");
        p.send(json!({"cmd": "set_key", "index": key.index, "key": key.base64()})).await;
        let ev = p.wait_event("key", Duration::from_secs(15)).await;
        assert_eq!(ev["index"], key.index, "{} switched to the rotated key", self.name);
    }

    /// Leaves the SFU, then withdraws the membership.
    async fn leave_call(&mut self, call: &Call) {
        if let Some(p) = self.publisher.take() {
            p.leave().await;
        }
        match &self.sticky {
            None => self.set_membership(json!({})).await,
            Some(member) => self.send_sticky(call, json!({"msc4354_sticky_key": member})).await,
        }
        eprintln!("{} left the call", self.name);
    }
}

// -------------------------------------------------------------------------------------------------
// What other clients see.

/// GET a room state event as `token`'s user; `None` when it is missing or empty (`{}`).
async fn room_state(hs: &str, token: &str, room: &str, ty: &str, state_key: &str) -> Option<Value> {
    let url = format!("{hs}/_matrix/client/v3/rooms/{}/state/{}/{}", pct(room), pct(ty), pct(state_key));
    let r = reqwest::Client::new()
        .get(&url)
        .bearer_auth(token)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = r.status();
    if status == 404 {
        return None;
    }
    let v: Value = r.json().await.unwrap_or(Value::Null);
    assert!(status.is_success(), "GET {url}: HTTP {status} {v}");
    v.as_object().is_some_and(|o| !o.is_empty()).then_some(v)
}

/// Waits until `user` has joined the room, as seen by `token`'s user.
async fn wait_joined(hs: &str, token: &str, room: &str, user: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let member = room_state(hs, token, room, "m.room.member", user).await;
        if member.as_ref().is_some_and(|m| m["membership"] == "join") {
            return;
        }
        assert!(Instant::now() < deadline, "{user} did not join {room} within {within:?} (state: {member:?})");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Waits until the bot's call membership is (`shown`) or is no longer (`!shown`) in the room
/// state as `token`'s user sees it; returns the content when shown.
async fn wait_bot_membership(call: &Call, token: &str, shown: bool, deadline: Instant, bot: &Bot) -> Option<Value> {
    loop {
        let m = room_state(&call.homeserver, token, call.room.as_str(), CALL_MEMBER_EVENT, &call.bot_state_key()).await;
        if m.is_some() == shown {
            return m;
        }
        assert!(
            Instant::now() < deadline,
            "the bot's call membership {} (last seen: {m:?})\n{}",
            if shown { "never became visible" } else { "was not withdrawn in time" },
            bot.mxrec.stderr_tail(60)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The bot's membership as Element Call would read it: this device, the room call, a LiveKit focus.
fn check_bot_membership(m: &Value, call: &Call) {
    assert_eq!(m["application"], "m.call", "the bot's membership: {m}");
    assert_eq!(m["call_id"], "", "the bot's membership is for the room call: {m}");
    assert_eq!(m["device_id"], call.bot_device.as_str(), "the bot's membership names its device: {m}");
    assert_eq!(m["focus_active"]["type"], "livekit", "the bot's membership: {m}");
}

fn bot_notice(ev: &Value, bot: &str, prefix: &str) -> bool {
    ev["sender"] == bot
        && ev["type"] == "m.room.message"
        && ev["content"]["body"].as_str().is_some_and(|b| b.starts_with(prefix))
}

/// The bot's "recording" and "saved" notices as `reader` sees them; panics on a failure notice.
async fn wait_notices(reader: &mut Participant, room: &str, bot: &Bot) -> (Value, Value) {
    let deadline = Instant::now() + SAVED_WITHIN;
    let user = bot.user.as_str();
    let saved = reader
        .timeline
        .wait_for(deadline, |r, ev| {
            r == room && (bot_notice(ev, user, "Recording saved:") || bot_notice(ev, user, "Recording failed:"))
        })
        .await
        .unwrap_or_else(|| {
            panic!("no `Recording saved:` within {SAVED_WITHIN:?} of the last leave\n{}", bot.mxrec.stderr_tail(80))
        });
    let failed = reader.timeline.all(|r, ev| r == room && bot_notice(ev, user, "Recording failed:"));
    assert!(
        failed.is_empty(),
        "the bot says: {:?}\n{}",
        failed.iter().map(|f| &f["content"]["body"]).collect::<Vec<_>>(),
        bot.mxrec.stderr_tail(80)
    );
    let started = reader.timeline.all(|r, ev| r == room && bot_notice(ev, user, "This call is being recorded by "));
    assert!(!started.is_empty(), "the room holds the bot's `This call is being recorded by` notice");
    assert!(
        started[0]["origin_server_ts"].as_i64() <= saved["origin_server_ts"].as_i64(),
        "the recording notice comes before the links"
    );
    for n in started.iter().chain([&saved]) {
        assert_eq!(n["content"]["msgtype"], "m.notice", "the bot posts notices: {n}");
    }
    eprintln!("bot notices:\n{}\n{}", started[0]["content"]["body"], saved["content"]["body"]);
    (started[0].clone(), saved)
}

/// After the links notice, the bot's membership goes within the delayed leave + 10 s.
async fn assert_membership_withdrawn(call: &Call, token: &str, saved: &Value, bot: &Bot) {
    let saved_ts = saved["origin_server_ts"].as_i64().expect("notice timestamp");
    let left_ms = (saved_ts + DELAYED_LEAVE_MS as i64 + 10_000 - now_ms()).max(500) as u64;
    wait_bot_membership(call, token, false, Instant::now() + Duration::from_millis(left_ms), bot).await;
    eprintln!("the bot's call membership is withdrawn");
}

// -------------------------------------------------------------------------------------------------
// The recording, as a user and an auditor get it.

/// While a screen is shared it fills the stage: in the middle of the screen track's recorded span
/// its blue covers most of the composite, and the cameras are thumbnails beside it.
fn check_screen_on_stage(f: &Fetched, screen: &TrackInfo) {
    let (first, last) = (screen.segments.first().unwrap(), screen.segments.last().unwrap());
    let (from, to) = (first.start_us as f64 / 1e6, last.end_us as f64 / 1e6);
    assert!(to - from >= 3.0, "the 5 s screen share was recorded for {:.2} s ({from:.2}–{to:.2})", to - from);
    let at = (from + to) / 2.0;
    let lumas = [SCREEN_LUMA, luma_of_grey(ALICE_GREY), luma_of_grey(BOB_GREY)];
    let shares = luma_shares(&f.composite, at, &lumas);
    eprintln!(
        "composite at {at:.2} s (screen share {from:.2}–{to:.2}): screen {:.2}%, alice {:.2}%, bob {:.2}%",
        shares[0] * 100.0,
        shares[1] * 100.0,
        shares[2] * 100.0
    );
    assert!(shares[0] >= STAGE_SHARE, "the screen share is not on stage at {at:.2} s: {:.2}%", shares[0] * 100.0);
    for (name, share) in [("alice", shares[1]), ("bob", shares[2])] {
        assert!(
            (PRESENT_SHARE..shares[0] / 4.0).contains(&share),
            "{name}'s camera is not a thumbnail beside the screen at {at:.2} s: {:.2}%",
            share * 100.0
        );
    }
}

/// The middle of [from, to] (Unix ms); the span must be at least a second long, or the call's
/// schedule slipped too far to tell who was shown when.
fn middle(from: i64, to: i64, what: &str) -> i64 {
    assert!(to - from >= 1000, "the call's schedule slipped: {what} lasted only {} ms", to - from);
    from + (to - from) / 2
}

// -------------------------------------------------------------------------------------------------
// Test 1: encrypted room, once with the bot's own LiveKit token (API key), once with a token
// from the JWT service (OpenID).

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_call_api_key_path() {
    whole_call("matrixrtc_call::encrypted_call_api_key_path", true, true).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_call_openid_path() {
    whole_call("matrixrtc_call::encrypted_call_openid_path", true, false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unencrypted_call_openid_path() {
    whole_call("matrixrtc_call::unencrypted_call_openid_path", false, false).await
}

/// The call of the module docs. In an unencrypted room nobody sends keys, so there is no Dave
/// (whose point is a key that never arrives) and no rotation; the rest is the same call.
async fn whole_call(test: &str, encrypted: bool, api_key: bool) {
    let Some((hs, s3, lk)) = servers(test) else { return };
    let _turn = serial();
    let python = python();
    let suffix = unique_suffix();
    let accounts = ["alice", "bob", "carol", "dave"].map(|n| account(&hs, n, &suffix));
    let mut bot = start_bot(&hs, &s3, &lk, &suffix, &accounts[0].user, api_key).await;
    let store = |n: &str| bot.dir.path().join(format!("{n}-store"));
    let mut alice = Participant::login(&hs, "alice", &accounts[0], ALICE_GREY, &store("alice")).await;
    let mut bob = Participant::login(&hs, "bob", &accounts[1], BOB_GREY, &store("bob")).await;
    let mut carol = Participant::login(&hs, "carol", &accounts[2], CAROL_GREY, &store("carol")).await;
    // Carol's client runs Element Call's `matrix_2_0` mode, the others `compatibility`: a room
    // in the middle of that migration, which the bot must record as one call.
    carol.use_sticky_membership();
    let mut dave = match encrypted {
        true => Some(Participant::login(&hs, "dave", &accounts[3], DAVE_GREY, &store("dave")).await),
        false => None,
    };

    let mut invite = vec![bot.user.as_str(), &bob.user_id, &carol.user_id];
    invite.extend(dave.as_ref().map(|d| d.user_id.as_str()));
    let room = alice.create_room(&invite, encrypted).await;
    eprintln!("{} room {room}", if encrypted { "encrypted" } else { "unencrypted" });
    for p in [Some(&mut bob), Some(&mut carol), dave.as_mut()].into_iter().flatten() {
        p.join(&room).await;
    }
    wait_joined(&hs.homeserver, &alice.token, room.as_str(), &bot.user, Duration::from_secs(60)).await;
    let answer = ask_to_record(&bot, room.as_str()).await;
    assert!(answer.contains("will be recorded when one starts"), "`mxrec record` before the call: {answer:?}");

    let call = Call {
        homeserver: hs.homeserver.clone(),
        room: room.clone(),
        service_url: lk.service_url.clone(),
        python,
        bot_user: bot.user.clone(),
        bot_device: bot.device.clone(),
    };

    // Alice and Bob start the call; each keys the bot once its membership is visible.
    alice.join_call(&call, encrypted, &["--screen-share-at", "3", "--screen-share-for", "5"]).await;
    let shown = wait_bot_membership(&call, &alice.token, true, Instant::now() + Duration::from_secs(60), &bot)
        .await
        .expect("shown");
    eprintln!("the bot's call membership, as Alice sees it: {shown}");
    check_bot_membership(&shown, &call);
    if encrypted {
        alice.send_key(&call).await;
    }
    bob.join_call(&call, encrypted, &[]).await;
    wait_bot_membership(&call, &bob.token, true, Instant::now() + Duration::from_secs(10), &bot).await;
    if encrypted {
        bob.send_key(&call).await;
    }
    let t0 = now_ms();
    let start = Instant::now();
    let at = |s: u64| start + Duration::from_secs(s);

    if let Some(dave) = dave.as_mut() {
        tokio::time::sleep_until(at(2)).await;
        dave.join_call(&call, true, &[]).await; // and never sends the bot his key
    }

    tokio::time::sleep_until(at(6)).await;
    let carol_start = now_ms();
    let carol_connected = carol.join_call(&call, encrypted, &[]).await;
    if encrypted {
        carol.send_key(&call).await;
    }
    let carol_keyed = now_ms();
    bot.mxrec.assert_running("Carol joined");

    // Bob leaves at 12 s (later if Carol's join ran late: she must be seen with him first).
    let carol_seen = Instant::now() + Duration::from_millis((carol_keyed + 4000 - now_ms()).max(0) as u64);
    tokio::time::sleep_until(at(12).max(carol_seen)).await;
    let bob_leave_start = now_ms();
    bob.leave_call(&call).await;
    let bob_left = now_ms();
    if encrypted {
        tokio::join!(alice.rotate_key(&call), carol.rotate_key(&call));
    }
    bot.mxrec.assert_running("Bob left");

    tokio::time::sleep_until(at(22).max(Instant::now() + Duration::from_secs(4))).await;
    let final_leave_start = now_ms();
    tokio::join!(alice.leave_call(&call), carol.leave_call(&call), async {
        if let Some(d) = dave.as_mut() {
            d.leave_call(&call).await
        }
    });
    eprintln!(
        "schedule (ms after t0): dave joined, carol start {} / connected {} / keyed {}, bob leave {}..{}, all leave {}..{}",
        carol_start - t0,
        carol_connected - t0,
        carol_keyed - t0,
        bob_leave_start - t0,
        bob_left - t0,
        final_leave_start - t0,
        now_ms() - t0
    );

    let (_, saved) = wait_notices(&mut alice, room.as_str(), &bot).await;
    assert_membership_withdrawn(&call, &alice.token, &saved, &bot).await;
    let via = bot.mxrec.log_lines_with("joining the SFU");
    let expected = if api_key { "api key" } else { "jwt service" };
    assert!(via.iter().any(|l| l.contains(expected)), "the bot got its token by {expected}: {via:?}");
    // From the call task's start (the call seen, recording wanted) to the first decrypted frame.
    for l in bot.mxrec.log_lines_with("first frame decrypted") {
        eprintln!("mxrec: {l}");
    }

    let notice = LinksNotice::parse(saved["content"]["body"].as_str().unwrap());
    let f = fetch_recording(CallFlavour::Matrixrtc, &bot.dir.path().join("verify"), &s3, &bot.prefix, room.as_str(), &notice).await;
    let m = &f.manifest;
    let rel = |wall: i64| (wall - m.epoch_unix_ms) as f64 / 1000.0;

    // Tracks: everyone but Dave recorded; Dave's media never decrypted.
    let mut av = vec![];
    for (who, user, sources) in [
        ("alice", &alice.user_id, &[TrackSource::Camera, TrackSource::Microphone, TrackSource::Screen][..]),
        ("bob", &bob.user_id, &[TrackSource::Camera, TrackSource::Microphone][..]),
        ("carol", &carol.user_id, &[TrackSource::Camera, TrackSource::Microphone][..]),
    ] {
        for s in sources {
            recorded_track(m, user, *s);
        }
        let file = |s: TrackSource| {
            let t = recorded_track(m, user, s);
            f.files.get(&t.id).unwrap_or_else(|| panic!("no file link for {who}'s {s} track {}", t.id)).clone()
        };
        av.push((who, file(TrackSource::Camera), file(TrackSource::Microphone)));
    }
    if !encrypted {
        for t in &m.tracks {
            assert!(t.undecryptable.is_empty(), "track {} of an unencrypted call has undecryptable spans", t.id);
        }
    }
    let dave_user = dave.as_ref().map(|d| d.user_id.clone()).unwrap_or_default();
    if let Some(d) = m.participants.iter().find(|p| p.user_id == dave_user) {
        for t in m.tracks.iter().filter(|t| t.participant == d.id) {
            eprintln!("dave's {} track {}: {} segments, undecryptable {:?}", t.source, t.id, t.segments.len(), t.undecryptable);
            assert!(t.segments.is_empty(), "dave's {} track {} was recorded without his key", t.source, t.id);
            assert!(!t.undecryptable.is_empty(), "dave's {} track {} has no undecryptable span", t.source, t.id);
        }
    }

    // Presence: Carol came late, Bob left early, and they overlapped.
    let (a0, a1) = presence_s(m, &alice.user_id);
    let (b0, b1) = presence_s(m, &bob.user_id);
    let (c0, c1) = presence_s(m, &carol.user_id);
    eprintln!(
        "present (s): alice {a0:.2}–{a1:.2}, bob {b0:.2}–{b1:.2}, carol {c0:.2}–{c1:.2}; \
         carol connected at {:.2}, bob left at {:.2}–{:.2}",
        rel(carol_connected),
        rel(bob_leave_start),
        rel(bob_left)
    );
    assert!(c0 - a0 >= 4.0, "carol's presence starts ≥ 4 s after alice's");
    assert!((c0 - rel(carol_connected)).abs() <= 3.0, "carol's presence starts when she connected");
    assert!(b1 >= rel(bob_leave_start) - 1.0 && b1 <= rel(bob_left) + 3.0, "bob's presence ends when he left");
    assert!(b1 >= c0 + 2.0, "bob and carol were in the call together");
    assert!(b1 <= c1 - 5.0, "bob left well before carol");

    for (who, video, audio) in &av {
        check_av(who, video, audio, MAX_AV_OFFSET_MS);
    }

    // The composite: as long as the call, tiles as the members came and went.
    let call_s = check_composite_duration(&f);
    assert!((call_s - rel(final_leave_start)).abs() <= 3.0, "the call ends when the last members left");
    let tiles = |alice_: bool, bob_: bool, carol_: bool| {
        [
            ("alice", ALICE_GREY, Some(alice_)),
            ("bob", BOB_GREY, Some(bob_)),
            ("carol", CAROL_GREY, Some(carol_)),
            ("dave", DAVE_GREY, None),
        ]
    };
    let early = middle(t0, carol_start, "the call before carol");
    check_tiles(&f.composite, rel(early), "alice and bob", &tiles(true, true, false));
    check_screen_on_stage(&f, recorded_track(m, &alice.user_id, TrackSource::Screen));
    let all = middle(carol_keyed + 1500, bob_leave_start, "the call with all three");
    check_tiles(&f.composite, rel(all), "all three", &tiles(true, true, true));
    let late = middle(bob_left + 2000, final_leave_start, "the call after bob");
    check_tiles(&f.composite, rel(late), "alice and carol", &tiles(true, false, true));

    bot.mxrec.assert_running("the recording was verified");
    drop((alice, bob, carol, dave));
    let status = bot.mxrec.stop(Duration::from_secs(30));
    assert!(status.success(), "mxrec exits 0 on SIGTERM, not {status}");
}

// -------------------------------------------------------------------------------------------------
// Room control of a MatrixRTC call.

/// Sends `!rec <cmd>` as `who` and returns the bot's threaded reply (as `who` sees it).
async fn command(who: &mut Participant, room: &str, bot: &str, cmd: &str) -> Value {
    use matrix_sdk::ruma::events::room::message::RoomMessageEventContent;
    let id = who
        .room
        .as_ref()
        .expect("in the room")
        .send(RoomMessageEventContent::text_plain(format!("!rec {cmd}")))
        .await
        .unwrap_or_else(|e| panic!("{} sends !rec {cmd}: {e}", who.name))
        .response
        .event_id
        .to_string();
    let reply = who
        .timeline
        .wait_for(Instant::now() + Duration::from_secs(30), |r, ev| {
            r == room && ev["sender"] == bot && ev["content"]["m.relates_to"]["m.in_reply_to"]["event_id"] == id.as_str()
        })
        .await
        .unwrap_or_else(|| panic!("no reply to {}'s `!rec {cmd}` within 30 s", who.name));
    assert_eq!(reply["content"]["m.relates_to"]["rel_type"], "m.thread", "threaded: {reply}");
    eprintln!("{}: `!rec {cmd}` → {}", who.name, reply["content"]["body"]);
    reply
}

fn body(ev: &Value) -> &str {
    ev["content"]["body"].as_str().unwrap_or_default()
}

/// Waits until the room's `org.mxrec.recording` satisfies `pred`.
async fn wait_recording_state(hs: &str, token: &str, room: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = room_state(hs, token, room, "org.mxrec.recording", "").await.unwrap_or(Value::Null);
        if pred(&v) {
            eprintln!("org.mxrec.recording {what}: {v}");
            return v;
        }
        assert!(Instant::now() < deadline, "org.mxrec.recording never became {what}; last {v}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// A room set to auto-record (`org.mxrec.config` by its moderator Alice): Alice's call is
/// recorded with no command. Bob, joining later, is mentioned in a notice; he opts out for a few
/// seconds and back in; his `!rec pause` is refused (power level 0); Alice pauses, resumes and
/// stops. In that recording Bob's tracks hold nothing of his opt-out and his tile is there without
/// his picture; nobody's media is in the pause, which the composite shows as the pause card; the
/// state event follows each step. Alice's `!rec start` in the still running call begins a second
/// recording; `!rec list` gives both with links.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_commands_steer_a_matrixrtc_call() {
    let Some((hs, s3, lk)) = servers("matrixrtc_call::room_commands_steer_a_matrixrtc_call") else { return };
    let _turn = serial();
    let suffix = unique_suffix();
    let accounts = ["alice", "bob"].map(|n| account(&hs, n, &suffix));
    let bot = start_bot(&hs, &s3, &lk, &suffix, &accounts[0].user, true).await;
    let store = |n: &str| bot.dir.path().join(format!("{n}-store"));
    let mut alice = Participant::login(&hs, "alice", &accounts[0], ALICE_GREY, &store("alice")).await;
    let mut bob = Participant::login(&hs, "bob", &accounts[1], BOB_GREY, &store("bob")).await;
    let room = alice.create_room(&[bot.user.as_str(), &bob.user_id], false).await;
    let r = room.as_str();
    bob.join(&room).await;
    wait_joined(&hs.homeserver, &alice.token, r, &bot.user, Duration::from_secs(60)).await;
    let alice_room = alice.room.clone().unwrap();
    // The bot may post the room's recording state.
    let mut levels = room_state(&hs.homeserver, &alice.token, r, "m.room.power_levels", "").await.expect("power levels");
    levels["users"][bot.user.as_str()] = json!(50);
    alice_room.send_state_event_raw("m.room.power_levels", "", levels).await.expect("alice raises the bot to 50");
    alice_room
        .send_state_event_raw("org.mxrec.config", "", json!({"auto_record": true}))
        .await
        .expect("alice turns auto-record on");
    let call = Call {
        homeserver: hs.homeserver.clone(),
        room: room.clone(),
        service_url: lk.service_url.clone(),
        python: python(),
        bot_user: bot.user.clone(),
        bot_device: bot.device.clone(),
    };

    alice.join_call(&call, false, &[]).await;
    let state = wait_recording_state(&hs.homeserver, &alice.token, r, "active", |v| v["active"] == true).await;
    assert_eq!(state["flavour"], "matrixrtc");
    assert!(state["started_by"].as_str().unwrap().contains(&alice.user_id), "auto-record set by alice: {state}");
    let start = Instant::now();
    let at = |s: u64| start + Duration::from_secs(s);
    tokio::time::sleep_until(at(2)).await;
    bob.join_call(&call, false, &[]).await;
    let bob_id = bob.user_id.clone();
    let mention = alice
        .timeline
        .wait_for(Instant::now() + Duration::from_secs(20), |rm, ev| {
            rm == r && ev["sender"] == bot.user.as_str() && ev["content"]["m.mentions"]["user_ids"][0] == bob_id.as_str()
        })
        .await
        .expect("a notice mentioning Bob once he joined the recorded call");
    assert!(body(&mention).contains("!rec optout"), "{mention}");

    tokio::time::sleep_until(at(6)).await;
    let reply = command(&mut bob, r, &bot.user, "optout").await;
    assert!(body(&reply).contains("left out"), "{reply}");
    tokio::time::sleep_until(at(10)).await;
    let reply = command(&mut bob, r, &bot.user, "optin").await;
    assert!(body(&reply).contains("recorded again"), "{reply}");
    tokio::time::sleep_until(at(13)).await;
    let reply = command(&mut bob, r, &bot.user, "pause").await;
    assert!(body(&reply).contains("needs power level 50"), "{reply}");
    let reply = command(&mut alice, r, &bot.user, "pause").await;
    assert_eq!(body(&reply), "Recording paused.");
    wait_recording_state(&hs.homeserver, &alice.token, r, "paused", |v| v["paused"] == true).await;
    tokio::time::sleep_until(at(17)).await;
    let reply = command(&mut alice, r, &bot.user, "resume").await;
    assert_eq!(body(&reply), "Recording resumed.");
    tokio::time::sleep_until(at(21)).await;
    let reply = command(&mut alice, r, &bot.user, "stop").await;
    assert!(body(&reply).starts_with("Stopping"), "{reply}");
    let (_, saved) = wait_notices(&mut alice, r, &bot).await;
    wait_recording_state(&hs.homeserver, &alice.token, r, "inactive", |v| v["active"] == false).await;
    let reply = command(&mut alice, r, &bot.user, "status").await;
    assert!(body(&reply).starts_with("Nothing is being recorded"), "stopped for the rest of this call: {reply}");
    // `!rec start` in the running call: a second recording, started by Alice, stopped again.
    let first = LinksNotice::parse(body(&saved)).recording_id;
    let reply = command(&mut alice, r, &bot.user, "start").await;
    assert!(body(&reply).starts_with("Recording the call"), "{reply}");
    let state = wait_recording_state(&hs.homeserver, &alice.token, r, "active again", |v| v["active"] == true).await;
    assert_eq!(state["started_by"], alice.user_id.as_str());
    tokio::time::sleep(Duration::from_secs(4)).await;
    let reply = command(&mut alice, r, &bot.user, "stop").await;
    assert!(body(&reply).starts_with("Stopping"), "{reply}");
    let second = alice
        .timeline
        .wait_for(Instant::now() + SAVED_WITHIN, |rm, ev| {
            rm == r && bot_notice(ev, &bot.user, "Recording saved:") && !body(ev).contains(first.as_str())
        })
        .await
        .expect("the second recording is saved");
    eprintln!("second recording: {}", body(&second));
    tokio::join!(alice.leave_call(&call), bob.leave_call(&call));

    let notice = LinksNotice::parse(body(&saved));
    let reply = command(&mut alice, r, &bot.user, "list").await;
    assert_eq!(body(&reply).matches("http://127.0.0.1:").count(), 2, "`!rec list` gives both with links: {reply}");
    let f = fetch_recording(CallFlavour::Matrixrtc, &bot.dir.path().join("verify"), &s3, &bot.prefix, r, &notice).await;
    let m = &f.manifest;
    let saved_count = alice.timeline.all(|rm, ev| rm == r && bot_notice(ev, &bot.user, "Recording saved:")).len();
    assert_eq!(saved_count, 2, "the auto-recorded one (with the pause) and the one `!rec start` began");

    let actions: Vec<(&str, &str, Option<&str>)> =
        m.control.iter().map(|c| (c.action.as_str(), c.by.as_str(), c.subject.as_deref())).collect();
    let (a, b) = (alice.user_id.as_str(), bob.user_id.as_str());
    assert_eq!(
        actions,
        [("optout", b, Some(b)), ("optin", b, Some(b)), ("pause", a, None), ("resume", a, None), ("stop", a, None)],
        "the manifest's control events"
    );
    let at_s = |action: &str| m.control.iter().find(|c| c.action == action).unwrap().at_us;
    let (out0, out1, p0, p1) = (at_s("optout"), at_s("optin"), at_s("pause"), at_s("resume"));
    let bob_p = person(m, b);
    eprintln!("control (µs): {:?}", m.control.iter().map(|c| (c.action.as_str(), c.at_us)).collect::<Vec<_>>());
    for p in &m.participants {
        eprintln!("participant {} ({}): present {:?}, opted out {:?}", p.id, p.user_id, p.present, p.opted_out);
    }
    for t in &m.tracks {
        let spans: Vec<(i64, i64)> = t.segments.iter().map(|x| (x.start_us, x.end_us)).collect();
        eprintln!("track {} of {}: segments {spans:?}", t.id, t.participant);
    }
    assert_eq!(bob_p.opted_out.len(), 1, "one opt-out span for Bob: {:?}", bob_p.opted_out);
    assert_eq!((bob_p.opted_out[0].start_us, bob_p.opted_out[0].end_us), (out0, Some(out1)));
    assert_eq!(m.pauses.len(), 1);
    assert_eq!((m.pauses[0].start_us, m.pauses[0].end_us), (p0, Some(p1)));
    let inside = |seg: &storage::manifest::SegmentInfo, from: i64, to: i64| seg.start_us < to && seg.end_us > from + 100_000;
    for t in &m.tracks {
        for seg in &t.segments {
            assert!(!inside(seg, p0, p1), "track {} segment {}–{} reaches into the pause", t.id, seg.start_us, seg.end_us);
            if t.participant == bob_p.id {
                assert!(!inside(seg, out0, out1), "Bob's track {} segment {}–{} reaches into his opt-out", t.id, seg.start_us, seg.end_us);
            }
        }
    }
    let covers = |user: &str, s: TrackSource, t_us: i64| {
        recorded_track(m, user, s).segments.iter().any(|x| x.start_us <= t_us && x.end_us > t_us)
    };
    let mid_out = (out0 + out1) / 2;
    assert!(covers(a, TrackSource::Camera, mid_out) && covers(a, TrackSource::Microphone, mid_out), "Alice is recorded while Bob is out");
    assert!(covers(b, TrackSource::Microphone, out1 + 1_500_000), "Bob's audio is back after his opt-in");

    // The composite: Bob's tile without his picture while out; the pause card; both after.
    let s = |us: i64| us as f64 / 1e6;
    check_tiles(&f.composite, s(mid_out), "Bob opted out", &[("alice", ALICE_GREY, Some(true)), ("bob", BOB_GREY, Some(false))]);
    check_tiles(&f.composite, s((p0 + p1) / 2), "paused", &[("alice", ALICE_GREY, Some(false)), ("bob", BOB_GREY, Some(false))]);
    check_tiles(&f.composite, s(p1) + 1.5, "resumed", &[("alice", ALICE_GREY, Some(true)), ("bob", BOB_GREY, Some(true))]);
    bot.mxrec.log_lines_with("recording control").iter().for_each(|l| eprintln!("mxrec: {l}"));
}

#[test]
fn greys_are_told_apart() {
    // The publisher's lumas, and the compositor's own colours, must not fall within each
    // other's tolerance, or a tile would be "seen" where there is none.
    let compositor = [30.0, 66.0, 78.0, 16.0, 235.0];
    let members = [ALICE_GREY, BOB_GREY, CAROL_GREY, DAVE_GREY].map(luma_of_grey);
    for (i, a) in members.iter().enumerate() {
        for b in members.iter().skip(i + 1).chain(&compositor) {
            assert!((a - b).abs() > 2.0 * LUMA_TOLERANCE, "luma {a:.1} is too close to {b:.1}");
        }
    }
    assert!((luma_of_grey(128) - 126.0).abs() < 1.0, "mid-grey's luma (BT.601 limited range)");
    assert!((SCREEN_LUMA - 78.2).abs() < 0.1, "the screen blue's luma: {SCREEN_LUMA}");
    assert_eq!(pct("!a:b.c"), "%21a%3Ab.c");
    assert_eq!(MediaKey { index: 0, bytes: [0; 16] }.base64(), "AAAAAAAAAAAAAAAAAAAAAA==");
}

/// mxrec SIGKILLed in the middle of an auto-recorded MatrixRTC call and started again: the
/// recording the kill cut is finished from what was stored (its notice says so, its manifest is
/// marked recovered and holds Alice's media up to the kill, less at most a segment), and the bot
/// joins the still running call again and records it anew until Alice stops it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_matrixrtc_call_is_recorded_again_after_a_kill() {
    let Some((hs, s3, lk)) = servers("matrixrtc_call::a_matrixrtc_call_is_recorded_again_after_a_kill") else { return };
    let _turn = serial();
    let suffix = unique_suffix();
    let alice_account = account(&hs, "alice", &suffix);
    let mut bot = start_bot(&hs, &s3, &lk, &suffix, &alice_account.user, true).await;
    let mut alice = Participant::login(&hs, "alice", &alice_account, ALICE_GREY, &bot.dir.path().join("alice-store")).await;
    let room = alice.create_room(&[bot.user.as_str()], false).await;
    let r = room.as_str();
    wait_joined(&hs.homeserver, &alice.token, r, &bot.user, Duration::from_secs(60)).await;
    let alice_room = alice.room.clone().unwrap();
    let mut levels = room_state(&hs.homeserver, &alice.token, r, "m.room.power_levels", "").await.expect("power levels");
    levels["users"][bot.user.as_str()] = json!(50);
    alice_room.send_state_event_raw("m.room.power_levels", "", levels).await.expect("alice raises the bot to 50");
    alice_room
        .send_state_event_raw("org.mxrec.config", "", json!({"auto_record": true}))
        .await
        .expect("alice turns auto-record on");
    let call = Call {
        homeserver: hs.homeserver.clone(),
        room: room.clone(),
        service_url: lk.service_url.clone(),
        python: python(),
        bot_user: bot.user.clone(),
        bot_device: bot.device.clone(),
    };

    alice.join_call(&call, false, &[]).await;
    let first = wait_recording_state(&hs.homeserver, &alice.token, r, "active", |v| {
        v["active"] == true && v["recording_id"].is_string()
    })
    .await;
    let first_id = first["recording_id"].as_str().expect("the state names the recording").to_owned();
    tokio::time::sleep(Duration::from_secs(8)).await;
    let killed_at = now_ms();
    let status = bot.mxrec.kill();
    eprintln!("mxrec killed ({status}) 8 s into the recording {first_id}");

    bot.mxrec = MxrecRun::start(bot.dir.path(), &bot.config);
    bot.mxrec.wait_line("bot:", BOT_READY_TIMEOUT).await;
    let recovered = alice
        .timeline
        .wait_for(Instant::now() + SAVED_WITHIN, |rm, ev| {
            rm == r && bot_notice(ev, &bot.user, "Recording saved:") && body(ev).contains(first_id.as_str())
        })
        .await
        .unwrap_or_else(|| panic!("no links for the cut recording after the restart\n{}", bot.mxrec.stderr_tail(80)));
    eprintln!("recovered: {} ({} ms after the kill)", body(&recovered), now_ms() - killed_at);
    assert!(body(&recovered).contains("stopped unexpectedly"), "marked as recovered: {recovered}");
    let second = wait_recording_state(&hs.homeserver, &alice.token, r, "active with a new recording", |v| {
        v["active"] == true && v["recording_id"].as_str().is_some_and(|id| id != first_id)
    })
    .await;
    let second_id = second["recording_id"].as_str().unwrap().to_owned();
    tokio::time::sleep(Duration::from_secs(6)).await;
    let reply = command(&mut alice, r, &bot.user, "stop").await;
    assert!(body(&reply).starts_with("Stopping"), "{reply}");
    let saved = alice
        .timeline
        .wait_for(Instant::now() + SAVED_WITHIN, |rm, ev| {
            rm == r && bot_notice(ev, &bot.user, "Recording saved:") && body(ev).contains(second_id.as_str())
        })
        .await
        .unwrap_or_else(|| panic!("the second recording is not saved\n{}", bot.mxrec.stderr_tail(80)));
    alice.leave_call(&call).await;
    let failed = alice.timeline.all(|rm, ev| rm == r && bot_notice(ev, &bot.user, "Recording failed:"));
    assert!(failed.is_empty(), "the bot says: {:?}", failed.iter().map(|f| body(f)).collect::<Vec<_>>());

    let a = alice.user_id.clone();
    let cut = fetch_recording(CallFlavour::Matrixrtc, &bot.dir.path().join("cut"), &s3, &bot.prefix, r, &LinksNotice::parse(body(&recovered))).await;
    let m = &cut.manifest;
    assert!(m.recovered.is_some(), "the cut recording's manifest is marked recovered");
    for source in [TrackSource::Camera, TrackSource::Microphone] {
        let end = recorded_track(m, &a, source).segments.last().unwrap().end_us;
        eprintln!("cut recording: Alice's {source} up to {:.1} s", end as f64 / 1e6);
        assert!(end >= 4_000_000, "Alice's {source} holds at least the first 4 s of 8: {end} µs");
    }
    let again = fetch_recording(CallFlavour::Matrixrtc, &bot.dir.path().join("again"), &s3, &bot.prefix, r, &LinksNotice::parse(body(&saved))).await;
    assert!(again.manifest.recovered.is_none(), "the new recording is a normal one");
    check_composite_duration(&again);
    let (video, audio) = (recorded_track(&again.manifest, &a, TrackSource::Camera), recorded_track(&again.manifest, &a, TrackSource::Microphone));
    check_av("alice (recorded again)", &again.files[&video.id], &again.files[&audio.id], MAX_AV_OFFSET_MS);
    let status = bot.mxrec.stop(Duration::from_secs(30));
    assert!(status.success(), "mxrec exits 0 on SIGTERM, not {status}");
}
