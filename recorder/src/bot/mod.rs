//! The recording bot (`mxrec run`): a Matrix account that joins the rooms it is invited to (by
//! allowed inviters), answers 1:1 calls, records them and posts the links.
//!
//! - [`session`]: the matrix-sdk client, its stores under the data dir, login or restore, and
//!   cross-signing.
//! - sync handlers (here): invites go through the [`Allowlist`]; every `m.call.*` timeline event,
//!   decrypted when the room is encrypted, is cut down to a [`voip1::RoomEvent`] and queued for the
//!   runtime. Content is not parsed here: malformed events reach the call machine, which refuses
//!   them with a reason that is logged.
//! - [`runtime`]: the task owning the 1:1 call machine, which spawns one [`call`] task per call
//!   (peer connection + recording) and sends what the machine says through per-room [`outbox`]es.
//! - [`messages`]: what the bot posts.
//!
//! The HTTP server (links, `/healthz`, `/metrics`) runs in the same process, over the same store
//! and catalog, so the links the bot posts are served at once.

mod allowlist;
pub mod call;
pub mod commands;
pub mod control;
pub mod media;
pub mod mesh;
pub mod messages;
pub mod outbox;
mod recover;
pub mod rooms;
pub mod rtc;
pub mod runtime;
pub mod session;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use matrix_sdk::config::SyncSettings;
use matrix_sdk::ruma::events::room::member::{MembershipState, StrippedRoomMemberEvent};
use matrix_sdk::ruma::events::{AnySyncStateEvent, AnySyncTimelineEvent, AnyToDeviceEvent, StateEventType};
use matrix_sdk::ruma::serde::Raw;
use matrix_sdk::ruma::{OwnedDeviceId, OwnedRoomId, OwnedUserId, UserId};
use matrix_sdk::{Client, Room, RoomMemberships, RoomState};
use serde::Deserialize;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, info_span, warn, Instrument};

pub use allowlist::Allowlist;

use crate::config::Config;
use crate::http::{HttpState, Links};
use crate::pipeline::{Env, Finished};
use crate::voip1;

/// Room events waiting for the runtime; the sync handler waits when it is full.
const EVENT_QUEUE: usize = 1024;

/// A call's recording starts once every track that sends media has given its first frame, or
/// this long after the first frame at the latest, and its zero is the earliest of those frames.
/// A new track's frames are held until its first Sender Report
/// ([`crate::rtp::SENDER_REPORT_WAIT`]), so the tracks' first frames come out seconds apart; a
/// recording started by the first of them would drop the others' first frames (the first video
/// keyframe among them) as stamped before its zero.
pub(crate) const START_WAIT: std::time::Duration =
    crate::rtp::SENDER_REPORT_WAIT.saturating_add(std::time::Duration::from_secs(1));

/// Unix ms of the instant `us` µs after `epoch` (a call's media clock), for a recording whose
/// zero lies before the moment it is created.
pub(crate) fn wall_ms_at(epoch: std::time::Instant, us: i64) -> i64 {
    storage::now_ms() - (epoch.elapsed().as_micros() as i64 - us) / 1000
}

/// What every part of the bot shares.
pub struct BotContext {
    pub config: Config,
    pub env: Arc<Env>,
    pub client: Client,
    pub user_id: OwnedUserId,
    pub device_id: OwnedDeviceId,
    /// How the bot names itself in notices: its display name, else its user id.
    pub bot_name: String,
    pub links: Links,
    /// Recording control per room: running recordings, opt-outs, room settings.
    pub rooms: Arc<rooms::Rooms>,
    pub limits: commands::Limits,
}

impl BotContext {
    /// A member's display name in a room, else their user id.
    pub async fn display_name(&self, room_id: &OwnedRoomId, user: &str) -> String {
        let Ok(user_id) = <&UserId>::try_from(user) else { return user.to_string() };
        let Some(room) = self.client.get_room(room_id) else { return user.to_string() };
        match room.get_member(user_id).await {
            Ok(Some(m)) => m.display_name().map(str::to_owned).unwrap_or_else(|| user.to_string()),
            _ => user.to_string(),
        }
    }

    /// Finalizes a recording (any call flavour) and words what the room is told: the links, with
    /// `stopped_early` appended when the recording ended before the call did, or why it failed.
    pub async fn store_and_announce(&self, rec: crate::pipeline::Recording, stopped_early: Option<&str>) -> messages::Notice {
        let short = |e: &anyhow::Error| e.to_string().chars().take(200).collect::<String>();
        let recording_id = rec.id().clone();
        let finished = match rec.finish().await {
            Ok(f) => f,
            Err(e) => {
                warn!(recording = %recording_id, error = %format!("{e:#}"), "the recording could not be stored");
                return messages::recording_failed(&short(&e));
            }
        };
        match self.saved_notice(&finished).await {
            Ok(mut n) => {
                if let Some(reason) = stopped_early {
                    warn!(recording = %recording_id, %reason, "the recording stopped early; what was received until then is stored");
                    n.plain.push_str(&format!("\nThe recording stopped early: {reason}."));
                    n.html.push_str(&format!("<p><b>The recording stopped early</b>: {}.</p>", messages::escape(reason)));
                }
                n
            }
            Err(e) => {
                warn!(recording = %recording_id, error = %format!("{e:#}"), "stored, but links could not be issued");
                messages::recording_failed(&format!(
                    "the recording {recording_id} is stored, but no links could be issued ({})",
                    short(&e)
                ))
            }
        }
    }

    /// Whether links to the room's recordings open only for its members: the room's
    /// `org.mxrec.config` says so, else `control.members_only_links`.
    pub fn members_only_links(&self, room: &OwnedRoomId) -> bool {
        self.rooms.settings(room).members_only_links.unwrap_or(self.config.control.members_only_links)
    }

    /// A link to one stored object of a recording of `room`, members-only when the room wants it.
    pub async fn issue_link(
        &self,
        room: &OwnedRoomId,
        recording: &storage::RecordingId,
        key: &str,
    ) -> Result<crate::http::links::Link, crate::http::links::LinkError> {
        let ttl = self.links.default_ttl();
        if self.members_only_links(room) {
            self.links.issue_members_only(recording, key, ttl, room.as_str()).await
        } else {
            self.links.issue(recording, key, ttl).await
        }
    }

    /// Issues links to a stored recording's composite and per-track files and words the notice.
    pub async fn saved_notice(&self, finished: &Finished) -> Result<messages::Notice> {
        let ttl = self.links.default_ttl();
        let room = OwnedRoomId::try_from(finished.manifest.room.id.as_str()).context("the manifest's room id")?;
        let keys = finished.manifest.outputs.iter().map(|o| o.key.clone()).chain(finished.track_files.iter().map(|t| t.key.clone()));
        let mut links = HashMap::new();
        let mut expires_at = None;
        for key in keys {
            let link = self.issue_link(&room, &finished.recording_id, &key).await?;
            expires_at = Some(link.expires_at);
            links.insert(key, link);
        }
        let (composite, track_files) = call::saved_files(finished, &links);
        let m = &finished.manifest;
        let total_bytes = m.outputs.iter().map(|o| o.bytes).sum::<u64>()
            + m.tracks.iter().flat_map(|t| t.segments.iter().map(|s| s.bytes)).sum::<u64>();
        let duration_us = m.call.span.end_us.unwrap_or(0) - m.call.span.start_us;
        Ok(messages::recording_saved(&messages::Saved {
            duration_us,
            total_bytes,
            tracks: m.tracks.len(),
            composite,
            track_files,
            expires_at: expires_at.unwrap_or_else(|| chrono::Utc::now() + ttl),
            recording_id: finished.recording_id.as_str(),
        }))
    }
}

/// Runs the bot and the HTTP server until `shutdown` resolves; then hangs up every call, stores
/// the recordings and returns.
pub async fn run(config: Config, shutdown: impl std::future::Future<Output = ()> + Send + 'static) -> Result<()> {
    let mut problems = config.validate();
    problems.extend(config.validate_bot());
    if !problems.is_empty() {
        let list: Vec<String> = problems.iter().map(ToString::to_string).collect();
        return Err(anyhow!("invalid configuration:\n  {}", list.join("\n  ")));
    }
    let allowlist = Allowlist::new(&config.matrix.allowed_inviters)
        .map_err(|e| anyhow!("matrix.allowed_inviters: `{e}` is not a user id, a server name or `*`"))?;
    if allowlist.is_empty() {
        warn!("matrix.allowed_inviters is empty: the bot will decline every invite");
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let stop_tx = Arc::new(stop_tx);
    let on_signal = stop_tx.clone();
    tokio::spawn(async move {
        shutdown.await;
        let _ = on_signal.send(true);
    });

    let env = Arc::new(Env::open(&config).await?);

    // The Matrix session first: members-only links check room membership through it.
    let session = session::connect(&config).await?;
    let client = session.client.clone();
    // HTTP before the first sync, so links work as soon as the bot posts one.
    let signer = storage::store::build_signer(&config.storage).context("preparing URL presigning for the object store")?;
    let mut http = HttpState::new(env.catalog.clone(), env.store.clone(), signer, config.http.clone());
    http.membership = Some(Arc::new(BotMembership { client: client.clone() }));
    let whip = crate::whip::Whip::start(env.clone());
    http.whip = whip.clone();
    let links = http.links.clone();
    let listener = tokio::net::TcpListener::bind(&config.http.bind)
        .await
        .with_context(|| format!("listening on {} (http.bind)", config.http.bind))?;
    let addr = listener.local_addr()?;
    println!("listening: http://{addr}");
    let http_stop = wait_for_stop(stop_rx.clone());
    let http_task = tokio::spawn(async move { crate::http::serve(listener, http, http_stop).await });

    let bot_name = match client.account().get_display_name().await {
        Ok(Some(name)) if !name.trim().is_empty() => name,
        _ => session.user_id.to_string(),
    };
    let ctx = Arc::new(BotContext {
        config: config.clone(),
        env: env.clone(),
        client: client.clone(),
        user_id: session.user_id.clone(),
        device_id: session.device_id.clone(),
        bot_name,
        links,
        rooms: rooms::Rooms::new(),
        limits: commands::Limits::new(&config.control),
    });

    let (events_tx, events_rx) = mpsc::channel(EVENT_QUEUE);
    let (rtc_tx, rtc_rx) = mpsc::channel(EVENT_QUEUE);
    register_handlers(&client, &ctx, allowlist.clone(), events_tx, rtc_tx.clone());
    // The runtimes run before the first sync: the sync's handlers wait on their queues.
    let runtime = tokio::spawn(runtime::Runtime::new(ctx.clone()).run(events_rx, stop_rx.clone()).instrument(info_span!("voip1")));
    let rtc_runtime =
        tokio::spawn(rtc::RtcRuntime::new(ctx.clone()).run(rtc_rx, stop_rx.clone()).instrument(info_span!("matrixrtc")));
    let control = control::serve(&config, rtc_tx.clone(), stop_rx.clone()).await?;
    let first = client
        .sync_once(SyncSettings::default().timeout(Duration::from_secs(0)))
        .await
        .context("the first sync with the homeserver failed")?;
    // Invites a previous run saw but did not get to join are not in any later sync.
    for room in client.invited_rooms() {
        let inviter = match room.invite_details().await {
            Ok(d) => d.inviter_id,
            Err(e) => {
                warn!(room = %room.room_id(), error = %e, "cannot read a pending invite");
                continue;
            }
        };
        let span = info_span!("invite", room = %room.room_id(), inviter = %inviter);
        answer_invite(room, inviter.as_str(), &allowlist, &ctx.limits).instrument(span).await;
    }
    // Recordings a previous run left unfinished: their rooms' state is set right before the call
    // state is read (a MatrixRTC call still running is recorded again), then they are finished.
    let mut recovery_outboxes = outbox::Outboxes::new(client.clone());
    let unfinished = recover::prepare(&ctx, &mut recovery_outboxes, &rtc_tx).await;
    // Calls already running in the bot's rooms, from the state the first sync stored.
    for room in client.joined_rooms() {
        feed_call_state(&ctx, &room, &rtc_tx).await;
    }
    let recovery = recover::finish_all(ctx.clone(), recovery_outboxes, unfinished);
    println!("bot: {} device {}", ctx.user_id, ctx.device_id);
    info!(user = %ctx.user_id, device = %ctx.device_id, "bot ready");

    let sync_client = client.clone();
    let mut sync = tokio::spawn(async move {
        let settings = SyncSettings::default().token(first.next_batch).timeout(Duration::from_secs(30));
        keep_syncing(sync_client, settings).await
    });
    let mut stop = stop_rx.clone();
    tokio::select! {
        r = &mut sync => match r {
            Ok(Err(e)) => warn!(error = %e, "syncing with the homeserver stopped; shutting down"),
            Ok(Ok(())) => {}
            Err(e) => warn!(error = %e, "the sync task ended"),
        },
        _ = stop.wait_for(|s| *s) => {}
    }
    // Hang up and store everything; sending needs no sync, so it stops now.
    let _ = stop_tx.send(true);
    sync.abort();
    if let Err(e) = runtime.await {
        warn!(error = %e, "the call runtime ended abnormally");
    }
    drop(rtc_tx);
    if let Err(e) = rtc_runtime.await {
        warn!(error = %e, "the MatrixRTC runtime ended abnormally");
    }
    if let Some(c) = control {
        c.abort();
    }
    if let Some(w) = whip {
        w.shutdown(crate::whip::SHUTDOWN_GRACE).await;
    }
    // A recovery still running may finish; one cut short is taken up again at the next start.
    match tokio::time::timeout(RECOVERY_AT_SHUTDOWN, recovery).await {
        Ok(Err(e)) => warn!(error = %e, "the recovery task ended abnormally"),
        Err(_) => warn!("the recovery of a recording left by an earlier run is still running; the next start takes it up again"),
        Ok(Ok(())) => {}
    }
    drop(ctx);
    match http_task.await {
        Ok(Err(e)) => warn!(error = %e, "the HTTP server failed"),
        Err(e) => warn!(error = %e, "the HTTP server task ended abnormally"),
        Ok(Ok(())) => {}
    }
    match Arc::try_unwrap(env) {
        Ok(env) => env.shutdown().await,
        Err(_) => warn!("recordings still hold the environment; pending uploads resume at the next start"),
    }
    Ok(())
}

/// How long a shutdown waits for a running recovery (a long composite, a homeserver away).
const RECOVERY_AT_SHUTDOWN: Duration = Duration::from_secs(600);

/// Syncs until the homeserver rejects the session. matrix-sdk's `sync` returns on the first
/// failed request, and a request that gets no answer at all (the homeserver restarting, the
/// network down) is not retried by its HTTP layer: here such failures are logged and the sync goes
/// on with a back-off up to 30 s, so calls keep being recorded (their media does not pass the
/// homeserver) and the bot catches up once it is back. Only an answered 401 (the access token is
/// gone) ends it.
async fn keep_syncing(client: Client, settings: SyncSettings) -> matrix_sdk::Result<()> {
    let failures = std::sync::atomic::AtomicU32::new(0);
    client
        .sync_with_result_callback(settings, |result| {
            let failures = &failures;
            async move {
                let Err(e) = result else {
                    let n = failures.swap(0, std::sync::atomic::Ordering::Relaxed);
                    if n > 0 {
                        info!(failed_syncs = n, "the homeserver answers again");
                    }
                    return Ok(matrix_sdk::LoopCtrl::Continue);
                };
                if e.as_client_api_error().is_some_and(|api| api.status_code.as_u16() == 401) {
                    return Err(e);
                }
                let n = failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                let wait = Duration::from_millis(500u64.saturating_mul(1 << n.min(6))).min(Duration::from_secs(30));
                if n == 1 || n.is_power_of_two() {
                    warn!(error = %e, failed_syncs = n, retry_in_ms = wait.as_millis() as u64, "syncing with the homeserver failed; retrying");
                }
                tokio::time::sleep(wait).await;
                Ok(matrix_sdk::LoopCtrl::Continue)
            }
        })
        .await
}

/// Room membership as the bot's own Matrix session sees it (members-only links).
struct BotMembership {
    client: Client,
}

#[async_trait::async_trait]
impl crate::http::RoomMembership for BotMembership {
    async fn is_joined(&self, room_id: &str, user_id: &str) -> Result<bool> {
        let room_id = <&matrix_sdk::ruma::RoomId>::try_from(room_id).context("not a room id")?;
        let Ok(user_id) = <&UserId>::try_from(user_id) else { return Ok(false) };
        let room = self
            .client
            .get_room(room_id)
            .filter(|r| r.state() == RoomState::Joined)
            .ok_or_else(|| anyhow!("the recorder is no longer in that room and cannot check its members"))?;
        let member = room.get_member(user_id).await.context("reading the room's members")?;
        Ok(member.is_some_and(|m| *m.membership() == MembershipState::Join))
    }
}

async fn wait_for_stop(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

fn register_handlers(
    client: &Client,
    ctx: &Arc<BotContext>,
    allowlist: Allowlist,
    events: mpsc::Sender<runtime::CallRoomEvent>,
    rtc: mpsc::Sender<rtc::RtcInput>,
) {
    let me = ctx.user_id.clone();
    let invite_ctx = ctx.clone();
    client.add_event_handler(move |ev: StrippedRoomMemberEvent, room: Room| {
        let me = me.clone();
        let allowlist = allowlist.clone();
        let ctx = invite_ctx.clone();
        async move {
            if ev.state_key != me || ev.content.membership != MembershipState::Invite || room.state() != RoomState::Invited {
                return;
            }
            let span = info_span!("invite", room = %room.room_id(), inviter = %ev.sender);
            answer_invite(room, ev.sender.as_str(), &allowlist, &ctx.limits).instrument(span).await
        }
    });
    let rtc_state = rtc.clone();
    let state_ctx = ctx.clone();
    client.add_event_handler(move |raw: Raw<AnySyncStateEvent>, room: Room| {
        let rtc = rtc_state.clone();
        let ctx = state_ctx.clone();
        async move {
            if let Ok(ev) = raw.deserialize_as_unchecked::<TimelineEvent>() {
                rtc_state_event(&ctx, ev, &room, &rtc).await;
            }
        }
    });
    let rtc_keys = rtc.clone();
    client.add_event_handler(move |raw: Raw<AnyToDeviceEvent>, encryption: Option<matrix_sdk::deserialized_responses::EncryptionInfo>| {
        let rtc = rtc_keys.clone();
        async move {
            let Ok(ev) = raw.deserialize_as_unchecked::<ToDevice>() else { return };
            if ev.event_type == crate::matrixrtc::session::ENCRYPTION_KEYS_EVENT_TYPE {
                let _ = rtc.send(rtc::RtcInput::ToDeviceKeys { sender: ev.sender, content: ev.content }).await;
            } else if voip1::events::is_call_event_type(&ev.event_type) {
                // A mesh group call's peer call message (plain, or decrypted from Olm).
                let input = rtc::RtcInput::MeshToDevice {
                    sender: ev.sender,
                    event_type: ev.event_type,
                    content: ev.content,
                    encrypted: encryption.is_some(),
                };
                let _ = rtc.send(input).await;
            }
        }
    });
    let timeline_ctx = ctx.clone();
    let started_ms = storage::now_ms();
    client.add_event_handler(move |raw: Raw<AnySyncTimelineEvent>, room: Room| {
        let events = events.clone();
        let rtc = rtc.clone();
        let ctx = timeline_ctx.clone();
        async move {
            if let Ok(ev) = raw.deserialize_as_unchecked::<TimelineEvent>() {
                if room.state() == RoomState::Joined {
                    if ev.event_type == "m.room.message" {
                        room_command(&ctx, ev, room.clone(), &rtc, started_ms);
                        return;
                    }
                    rtc_timeline_event(&ctx, ev, &room, &rtc).await;
                }
            }
            let Some(mut ev) = call_event(&raw, &room) else { return };
            if ev.event_type == "m.call.invite" {
                // The sync summary's count can lag behind (0 right after joining); the member list
                // is authoritative and is fetched once per room.
                match room.members(RoomMemberships::JOIN).await {
                    Ok(members) => ev.joined_members = members.len(),
                    Err(e) => warn!(room = %room.room_id(), error = %e, "cannot list the room's members; using the sync summary"),
                }
            }
            if events.send(ev).await.is_err() {
                debug!("the call runtime has stopped; dropping a call event");
            }
        }
    });
}

/// A `!rec` command in a joined room, carried out in its own task. Commands sent before this
/// process started (a sync after a restart replays recent messages) are not carried out again.
fn room_command(ctx: &Arc<BotContext>, ev: TimelineEvent, room: Room, rtc: &mpsc::Sender<rtc::RtcInput>, started_ms: i64) {
    let body = ev.content.get("body").and_then(|b| b.as_str()).unwrap_or("");
    let Some(command) = commands::parse(body) else { return };
    if ev.sender == ctx.user_id.as_str() || ev.event_id.is_empty() {
        return;
    }
    if (ev.origin_server_ts as i64) < started_ms - 5_000 {
        debug!(room = %room.room_id(), sender = %ev.sender, "a command from before this start; not carried out again");
        return;
    }
    let relates = ev.content.get("m.relates_to");
    let thread_root = relates
        .filter(|r| r.get("rel_type").and_then(|t| t.as_str()) == Some("m.thread"))
        .and_then(|r| r.get("event_id"))
        .and_then(|e| e.as_str())
        .map(str::to_owned);
    let incoming = commands::Incoming { room, sender: ev.sender, event_id: ev.event_id, thread_root, command };
    tokio::spawn(commands::handle(ctx.clone(), incoming, rtc.clone()));
}

/// Joins (in the background, with retries) when the inviter is allowed and within the invite
/// rate limit, else declines.
async fn answer_invite(room: Room, inviter: &str, allowlist: &Allowlist, limits: &commands::Limits) {
    if !allowlist.allows(inviter) {
        info!("inviter is not in matrix.allowed_inviters; declining");
        if let Err(e) = room.leave().await {
            warn!(error = %e, "declining the invite failed");
        }
        return;
    }
    if !limits.invite(inviter) {
        warn!("too many invites from this user in the last hour (control.invites_per_user_per_hour); declining");
        if let Err(e) = room.leave().await {
            warn!(error = %e, "declining the invite failed");
        }
        return;
    }
    tokio::spawn(join_with_retries(room).in_current_span());
}

async fn join_with_retries(room: Room) {
    let mut delay = Duration::from_secs(1);
    for attempt in 1..=5 {
        match room.join().await {
            Ok(()) => {
                info!("joined");
                return;
            }
            Err(e) if attempt < 5 => {
                warn!(error = %e, attempt, "joining failed; retrying");
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            Err(e) => warn!(error = %e, "joining failed; giving up"),
        }
    }
}

/// Whether a user is joined to a room, as the store knows it.
async fn is_joined(room: &Room, user: &str) -> bool {
    let Ok(user_id) = <&UserId>::try_from(user) else { return false };
    matches!(room.get_member_no_sync(user_id).await, Ok(Some(m)) if *m.membership() == MembershipState::Join)
}

/// State events the MatrixRTC runtime follows: call memberships and room member changes; and
/// the room's `org.mxrec.config`, taken when its sender may control recordings.
async fn rtc_state_event(ctx: &BotContext, ev: TimelineEvent, room: &Room, rtc: &mpsc::Sender<rtc::RtcInput>) {
    let Some(state_key) = ev.state_key.clone() else { return };
    let room_id = room.room_id().to_owned();
    let input = match ev.event_type.as_str() {
        rooms::CONFIG_STATE_EVENT_TYPE if state_key.is_empty() => {
            let power = match <&UserId>::try_from(ev.sender.as_str()) {
                Ok(u) => room.get_member_no_sync(u).await.ok().flatten().map(|m| m.power_level()),
                Err(_) => None,
            };
            if let Err(why) = commands::authorize(&ctx.config.control, commands::Command::Start, &ev.sender, power) {
                warn!(room = %room_id, sender = %ev.sender, %why, "org.mxrec.config from a user who may not control recordings; ignored");
                return;
            }
            let settings = match rooms::RoomSettings::parse(&ev.content) {
                Ok(s) => s,
                Err(e) => {
                    warn!(room = %room_id, sender = %ev.sender, error = %e, "malformed org.mxrec.config; ignored");
                    return;
                }
            };
            info!(room = %room_id, sender = %ev.sender, ?settings, "room settings");
            ctx.rooms.set_settings(&room_id, settings);
            rtc::RtcInput::AutoRecord { room: room_id, on: settings.auto_record.unwrap_or(false), by: ev.sender }
        }
        crate::mesh::events::GROUP_CALL_EVENT_TYPE => rtc::RtcInput::MeshCall { room: room_id, state_key, content: ev.content },
        crate::matrixrtc::session::LEGACY_MEMBER_EVENT_TYPE => {
            let sender_joined = is_joined(room, &ev.sender).await;
            // One event type, two protocols: mesh members list `m.calls` under their user id;
            // MatrixRTC's legacy memberships use per-device state keys. Content under a user-id
            // state key without `m.calls` withdraws the user's mesh devices and may be an old
            // MatrixRTC membership, so both hear it.
            let mesh = ev.content.get(crate::mesh::events::CALLS_KEY).is_some();
            if mesh || state_key == ev.sender {
                let input = rtc::RtcInput::MeshMember {
                    room: room_id.clone(),
                    state_key: state_key.clone(),
                    sender: ev.sender.clone(),
                    ts: ev.origin_server_ts,
                    content: ev.content.clone(),
                    sender_joined,
                };
                if rtc.send(input).await.is_err() || mesh {
                    return;
                }
            }
            rtc::RtcInput::LegacyMember { room: room_id, state_key, sender: ev.sender, ts: ev.origin_server_ts, content: ev.content, sender_joined }
        }
        "m.room.member" => {
            let joined = ev.content.get("membership").and_then(|m| m.as_str()) == Some("join");
            rtc::RtcInput::Membership { room: room_id, user: state_key, joined }
        }
        _ => return,
    };
    if rtc.send(input).await.is_err() {
        debug!("the MatrixRTC runtime has stopped; dropping an event");
    }
}

/// Timeline events the MatrixRTC runtime follows: sticky memberships, room-event keys, and
/// state events (also delivered to the state handler; applying one twice changes nothing).
async fn rtc_timeline_event(ctx: &BotContext, ev: TimelineEvent, room: &Room, rtc: &mpsc::Sender<rtc::RtcInput>) {
    use crate::matrixrtc::session::{ENCRYPTION_KEYS_EVENT_TYPE, RTC_MEMBER_EVENT_TYPE};
    let room_id = room.room_id().to_owned();
    if ev.state_key.is_some() {
        return rtc_state_event(ctx, ev, room, rtc).await;
    }
    let input = match ev.event_type.as_str() {
        RTC_MEMBER_EVENT_TYPE => {
            let sender_joined = is_joined(room, &ev.sender).await;
            rtc::RtcInput::StickyMember { room: room_id, sender: ev.sender, ts: ev.origin_server_ts, content: ev.content, sticky_ms: None, sender_joined }
        }
        ENCRYPTION_KEYS_EVENT_TYPE => rtc::RtcInput::RoomKeys { room: room_id, sender: ev.sender, ts: ev.origin_server_ts, content: ev.content },
        _ => return,
    };
    if rtc.send(input).await.is_err() {
        debug!("the MatrixRTC runtime has stopped; dropping an event");
    }
}

/// The call memberships and room settings a room's stored state holds (at start, after the
/// first sync).
async fn feed_call_state(ctx: &BotContext, room: &Room, rtc: &mpsc::Sender<rtc::RtcInput>) {
    for ty in [rooms::CONFIG_STATE_EVENT_TYPE, crate::mesh::events::GROUP_CALL_EVENT_TYPE, crate::matrixrtc::session::LEGACY_MEMBER_EVENT_TYPE] {
        let events = match room.get_state_events(StateEventType::from(ty)).await {
            Ok(e) => e,
            Err(e) => {
                warn!(room = %room.room_id(), error = %e, "cannot read the room's {ty} state");
                continue;
            }
        };
        for raw in events {
            let json = match raw {
                matrix_sdk::deserialized_responses::RawAnySyncOrStrippedState::Sync(r) => r.json().get().to_owned(),
                matrix_sdk::deserialized_responses::RawAnySyncOrStrippedState::Stripped(_) => continue,
            };
            if let Ok(ev) = serde_json::from_str::<TimelineEvent>(&json) {
                rtc_state_event(ctx, ev, room, rtc).await;
            }
        }
    }
}

/// The fields of a to-device event the bot reads.
#[derive(Deserialize)]
struct ToDevice {
    #[serde(rename = "type")]
    event_type: String,
    sender: String,
    #[serde(default)]
    content: serde_json::Value,
}

/// The fields of a timeline event the call machine reads; content stays raw JSON.
#[derive(Deserialize)]
struct TimelineEvent {
    #[serde(rename = "type")]
    event_type: String,
    #[serde(default)]
    event_id: String,
    #[serde(default)]
    state_key: Option<String>,
    sender: String,
    #[serde(default)]
    content: serde_json::Value,
    #[serde(default)]
    origin_server_ts: u64,
    #[serde(default)]
    unsigned: Option<Unsigned>,
}

#[derive(Deserialize)]
struct Unsigned {
    age: Option<i64>,
}

/// A call event (`m.call.*` and the unstable names js-sdk still sends) of a joined room, cut down
/// for the runtime; `None` for anything else.
fn call_event(raw: &Raw<AnySyncTimelineEvent>, room: &Room) -> Option<runtime::CallRoomEvent> {
    let ev: TimelineEvent = match raw.deserialize_as_unchecked() {
        Ok(ev) => ev,
        Err(e) => {
            debug!(room = %room.room_id(), error = %e, "timeline event without type/sender; ignored");
            return None;
        }
    };
    if room.state() != RoomState::Joined {
        return None;
    }
    if !voip1::events::is_call_event_type(&ev.event_type) {
        if ev.event_type == "m.room.encrypted" {
            // Handlers do not run again when the key arrives later: a call invite lost this way
            // rings unanswered, so it is worth a warning.
            warn!(room = %room.room_id(), sender = %ev.sender, "an event could not be decrypted (no room key shared with the bot's device); if it was a call, it is not answered");
        }
        return None;
    }
    Some(voip1::RoomEvent {
        room_id: voip1::RoomId(room.room_id().to_string()),
        sender: voip1::UserId(ev.sender),
        event_type: ev.event_type,
        content: ev.content,
        origin_server_ts: voip1::UnixMs(ev.origin_server_ts),
        unsigned_age_ms: ev.unsigned.and_then(|u| u.age).and_then(|a| u64::try_from(a).ok()),
        joined_members: room.joined_members_count() as usize,
        now: runtime::now(),
    })
}
