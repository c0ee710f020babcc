//! One recorded MatrixRTC call: the task that makes the bot a member of the call, joins every
//! SFU its members use, decrypts and records their media, and posts the links at the end.
//!
//! Order of things: publish the bot's membership (so members send it their keys) → get a token
//! for each SFU (minted with a configured API key, else from the focus' JWT service with an
//! OpenID token) → join → post "This call is being recorded" → record until told to stop (the
//! session ended, `mxrec record --stop`, shutdown) → leave the SFUs and the call → finalize →
//! post the links (or why there is nothing).
//!
//! Clock: frames carry µs since the task started; the recording's zero is the first frame that
//! can be recorded. Participants are LiveKit identities, named after their Matrix member.
//! Tracks are added at their first frame, decrypted or not; frames that cannot be decrypted are
//! never written, they are counted (metric), logged once per cause and participant, and their
//! time lands in the manifest's `undecryptable` spans.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use matrix_sdk::ruma::OwnedRoomId;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};
use transcoder::{Codec, EncodedFrame, MediaKind};

use super::matrix::{openid_token, OwnMembership};
use super::{CallCommand, RoomKeys};
use crate::bot::messages;
use crate::bot::outbox::Outgoing;
use crate::bot::rooms::{self, next_request, Control, Pending, Registration};
use crate::bot::BotContext;
use crate::http::metrics as m;
use crate::matrixrtc::access::{self, ServiceRequest, SfuGrant};
use crate::matrixrtc::livekit::{RemoteTrack, RoomEvent, SfuConfig, SfuConnection, SfuOutput, SfuTrack, TokenSource};
use crate::matrixrtc::session::{self, Member, SessionEvent};
use crate::peer::IceServer;
use crate::pipeline::{ParticipantInfo, Recording, TrackInfo, TrackSource};

/// After the SFUs are left, how long their last frames may take.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
const KEYFRAME_REQUEST_INTERVAL: Duration = Duration::from_secs(1);
/// Frames held before the recording starts: past this many payload bytes it starts at once.
const MAX_EARLY_BYTES: usize = 64 << 20;
/// How long after a member joins a recorded call the notice mentioning them is sent.
const MENTION_DELAY: Duration = Duration::from_secs(5);
/// Lifetime of a token mxrec mints itself.
const MINTED_TTL: Duration = Duration::from_secs(6 * 3600);

pub struct RtcCallTask {
    pub ctx: Arc<BotContext>,
    pub room_id: OwnedRoomId,
    pub keys: RoomKeys,
    /// The call's members when the task started.
    pub members: Vec<Member>,
    /// Who asked for the recording (a user id, `config`, `auto-record (set by …)`).
    pub started_by: String,
    /// Set once the bot has left the call (the recording is then being stored).
    pub left: Arc<std::sync::atomic::AtomicBool>,
}

/// Tokens for one SFU: minted with the API key, or asked of the JWT service each time.
enum Tokens {
    Minted { url: String, key: String, secret: String, room: String, identity: String, name: String },
    Service { ctx: Arc<BotContext>, service_url: String, room_id: String },
}

impl Tokens {
    async fn grant(&self) -> anyhow::Result<SfuGrant> {
        match self {
            Tokens::Minted { url, key, secret, room, identity, name } => {
                Ok(access::mint(url, key, secret, room, identity, name, MINTED_TTL)?)
            }
            Tokens::Service { ctx, service_url, room_id } => {
                let openid = openid_token(ctx).await?;
                let req = ServiceRequest::SfuGet { room_id: room_id.clone(), device_id: ctx.device_id.to_string() };
                let http = reqwest::Client::new();
                Ok(access::from_service(&http, service_url, &openid, &req).await?)
            }
        }
    }
}

#[async_trait::async_trait]
impl TokenSource for Tokens {
    async fn token(&self) -> anyhow::Result<String> {
        Ok(self.grant().await?.jwt)
    }
}

/// One remote track as the call task sees it.
struct Slot {
    remote: RemoteTrack,
    codec: Codec,
    conn: usize,
    track: SfuTrack,
    recording_track: Option<String>,
    /// In an undecryptable span right now (start on the recording clock).
    undecryptable: bool,
    /// Undecryptable frames before the recording started.
    undecryptable_before_start: bool,
    last_keyframe_request: Option<Instant>,
    written: u64,
    ended: bool,
}

/// A LiveKit participant, with the Matrix member it is (when known).
#[derive(Debug, Clone)]
struct Person {
    user_id: String,
    device_id: Option<String>,
    display_name: String,
}

struct Media {
    ctx: Arc<BotContext>,
    room_id: OwnedRoomId,
    keys: RoomKeys,
    epoch: Instant,
    sif: HashMap<usize, Vec<u8>>,
    recording: Option<Recording>,
    zero_us: i64,
    /// Decrypted frames held until the recording starts (see [`super::super::START_WAIT`]), with
    /// when the first came and their payload bytes.
    early: Vec<(usize, SfuTrack, EncodedFrame)>,
    early_since: Option<Instant>,
    early_bytes: usize,
    /// The slots that have a frame in `early` (checked on every held frame, so not a scan).
    early_slots: HashSet<(usize, SfuTrack)>,
    slots: HashMap<(usize, SfuTrack), Slot>,
    /// Matrix members by LiveKit identity.
    members: HashMap<String, Member>,
    /// Who is in the LiveKit room(s) now, by identity, with their LiveKit display name.
    present: HashMap<String, String>,
    /// When each of them joined, µs since `epoch` (a recording that starts later, once its
    /// tracks are up, has them present from then, not from its zero).
    joined_at: HashMap<String, i64>,
    /// Refusals already logged: (identity, cause).
    logged: HashSet<(String, &'static str)>,
    refused: BTreeMap<&'static str, u64>,
    decrypted: u64,
    first_decrypted_at: Option<Duration>,
    failed: Option<String>,
    /// Room commands given before the first frame, replayed when the recording starts.
    pending: Pending,
    /// Users of the room who had opted out when the recording was registered.
    optouts: BTreeSet<String>,
    /// Users told that the call is recorded (by the start notice or a mention).
    announced: HashSet<String>,
    outbox: mpsc::UnboundedSender<Outgoing>,
}

impl RtcCallTask {
    pub async fn run(self, mut cmds: mpsc::UnboundedReceiver<CallCommand>) {
        let started = Instant::now();
        let outbox = self.outbox();
        let transports = self.transports();
        let Some(first) = transports.first().cloned() else {
            warn!("no member of the call names a LiveKit SFU; nothing to join");
            let _ = outbox.send(Outgoing::Notice(messages::recording_failed("the call's members name no LiveKit SFU")));
            return;
        };
        let membership = match OwnMembership::publish(&self.ctx, &self.room_id, &first).await {
            Ok(m) => m,
            Err(e) => {
                warn!(error = %format!("{e:#}"), "cannot join the call");
                let _ = outbox.send(Outgoing::Notice(messages::recording_failed(&format!("the bot could not join the call: {e:#}"))));
                return;
            }
        };
        let epoch = Instant::now();
        let (merged_tx, mut merged) = mpsc::unbounded_channel::<(usize, SfuOutput)>();
        let mut conns: Vec<SfuConnection> = Vec::new();
        for (i, service_url) in transports.iter().enumerate() {
            match self.join(service_url, epoch).await {
                Ok((conn, mut out)) => {
                    let tx = merged_tx.clone();
                    tokio::spawn(async move {
                        while let Some(o) = out.recv().await {
                            if tx.send((i, o)).is_err() {
                                break;
                            }
                        }
                    });
                    conns.push(conn);
                }
                Err(e) => warn!(sfu = %service_url, error = %format!("{e:#}"), "cannot join this SFU; its participants are not recorded"),
            }
        }
        drop(merged_tx);
        if conns.is_empty() {
            membership.leave(&self.ctx).await;
            let _ = outbox.send(Outgoing::Notice(messages::recording_failed("the bot could not join the call's SFU")));
            return;
        }
        info!(sfus = conns.len(), after_ms = started.elapsed().as_millis() as u64, "in the call");
        let _ = outbox.send(Outgoing::Notice(messages::recording_started(&self.ctx.bot_name)));
        let mut reg = Registration::open(&self.ctx.rooms, &self.room_id, "matrixrtc", &self.started_by, &outbox);
        let optouts = reg.as_ref().map(|r| r.optouts.clone()).unwrap_or_default();

        let mut media = Media {
            ctx: self.ctx.clone(),
            room_id: self.room_id.clone(),
            keys: self.keys.clone(),
            epoch,
            sif: HashMap::new(),
            recording: None,
            zero_us: 0,
            early: Vec::new(),
            early_since: None,
            early_bytes: 0,
            early_slots: HashSet::new(),
            slots: HashMap::new(),
            members: self.members.iter().map(|m| (m.identity.clone(), m.clone())).collect(),
            present: HashMap::new(),
            joined_at: HashMap::new(),
            logged: HashSet::new(),
            refused: BTreeMap::new(),
            decrypted: 0,
            first_decrypted_at: None,
            failed: None,
            pending: Pending::default(),
            optouts,
            announced: self.members.iter().map(|m| m.user_id.clone()).collect(),
            outbox: outbox.clone(),
        };
        let mut keep_alive = tokio::time::interval(OwnMembership::refresh_interval(&self.ctx));
        keep_alive.tick().await;
        let reason = loop {
            tokio::select! {
                Some((c, reply)) = next_request(&mut reg) => {
                    let at = media.now_us();
                    let Some(r) = reg.as_ref() else { continue };
                    let answer = rooms::apply(&self.ctx, &self.room_id, r, media.recording.as_mut(), &mut media.pending, c.clone(), at, &outbox).await;
                    let _ = reply.send(answer);
                    if let Control::Stop { by } = c {
                        break format!("stopped by {by}");
                    }
                }
                c = cmds.recv() => match c {
                    Some(CallCommand::Stop { reason }) => break reason,
                    Some(CallCommand::Member(ev)) => media.on_member(ev).await,
                    Some(CallCommand::KeyInstalled { identity, index }) => debug!(%identity, index, "key installed"),
                    None => break "the runtime stopped".to_string(),
                },
                o = merged.recv() => match o {
                    Some((i, o)) => {
                        if let Some(stop) = media.on_output(i, o, &conns, started).await {
                            break stop;
                        }
                        if let Some(r) = reg.as_mut() {
                            r.publish_recording_id(media.recording.as_ref(), &outbox);
                        }
                    }
                    None => break "every SFU connection ended".to_string(),
                },
                _ = keep_alive.tick() => membership.keep_alive(&self.ctx).await,
            }
        };
        info!(%reason, "stopping the recording");
        // Leave the SFUs; keep taking frames while they drain.
        let closing = async {
            for c in conns.iter_mut() {
                c.close().await;
            }
        };
        let drain = async {
            let deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
            while let Ok(Some((i, o))) = tokio::time::timeout_at(deadline, merged.recv()).await {
                media.on_output(i, o, &[], started).await;
            }
        };
        tokio::join!(closing, drain);
        membership.leave(&self.ctx).await;
        self.left.store(true, std::sync::atomic::Ordering::Release);
        if let Some(r) = reg.take() {
            r.close(&outbox);
        }
        if let Some(notice) = media.finish().await {
            let _ = outbox.send(Outgoing::Notice(notice));
        }
    }

    fn outbox(&self) -> mpsc::UnboundedSender<Outgoing> {
        crate::bot::outbox::call_queue(self.ctx.client.clone(), self.room_id.clone())
    }

    /// The distinct SFUs (`livekit_service_url`s) the members use, the most used first.
    fn transports(&self) -> Vec<String> {
        let mut count: BTreeMap<String, usize> = BTreeMap::new();
        for m in &self.members {
            if let Some(t) = &m.transport {
                *count.entry(t.livekit_service_url.trim_end_matches('/').to_owned()).or_default() += 1;
            }
        }
        let mut v: Vec<(String, usize)> = count.into_iter().collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        v.into_iter().map(|(u, _)| u).collect()
    }

    async fn join(&self, service_url: &str, epoch: Instant) -> anyhow::Result<(SfuConnection, mpsc::Receiver<SfuOutput>)> {
        let ctx = &self.ctx;
        let tokens = match ctx.config.matrixrtc.credentials_for(service_url) {
            Some(c) => Tokens::Minted {
                url: c.url.clone(),
                key: c.api_key.clone(),
                secret: c.api_secret.clone(),
                room: session::livekit_room_name(self.room_id.as_str(), session::CALL_SLOT_ID),
                identity: session::legacy_identity(ctx.user_id.as_str(), ctx.device_id.as_str()),
                name: ctx.bot_name.clone(),
            },
            None => Tokens::Service { ctx: ctx.clone(), service_url: service_url.to_owned(), room_id: self.room_id.to_string() },
        };
        let grant = tokens.grant().await?;
        info!(sfu = %grant.url, room = %grant.room, identity = %grant.identity,
            via = if matches!(tokens, Tokens::Minted { .. }) { "api key" } else { "jwt service" }, "joining the SFU");
        let webrtc = &ctx.config.webrtc;
        let ice_servers = if webrtc.ice_servers.is_empty() {
            Vec::new()
        } else {
            vec![IceServer {
                urls: webrtc.ice_servers.clone(),
                username: webrtc.turn_username.clone().unwrap_or_default(),
                credential: webrtc.turn_password.clone().unwrap_or_default(),
            }]
        };
        let cfg = SfuConfig { url: grant.url.clone(), bind_addrs: webrtc.bind_addrs.clone(), ice_servers, epoch };
        // The first join uses the grant just fetched; rejoins ask again.
        let first = crate::matrixrtc::livekit::FixedToken(grant.jwt.clone());
        let source: Arc<dyn TokenSource> = Arc::new(FirstThen { first: std::sync::Mutex::new(Some(first)), then: tokens });
        Ok(SfuConnection::connect(cfg, source).await?)
    }
}

/// A token source that hands out a prefetched token once, then asks `then`.
struct FirstThen {
    first: std::sync::Mutex<Option<crate::matrixrtc::livekit::FixedToken>>,
    then: Tokens,
}

#[async_trait::async_trait]
impl TokenSource for FirstThen {
    async fn token(&self) -> anyhow::Result<String> {
        let first = self.first.lock().unwrap().take();
        match first {
            Some(t) => Ok(t.0),
            None => self.then.token().await,
        }
    }
}

/// Who a LiveKit identity is: its Matrix member when known, else what the identity says.
async fn person(
    ctx: &BotContext,
    room_id: &OwnedRoomId,
    members: &HashMap<String, Member>,
    present: &HashMap<String, String>,
    identity: &str,
) -> Person {
    if let Some(m) = members.get(identity) {
        return Person {
            user_id: m.user_id.clone(),
            device_id: Some(m.device_id.clone()),
            display_name: ctx.display_name(room_id, &m.user_id).await,
        };
    }
    // Not (or not yet) a Matrix member of the call: `@user:server:DEVICE` is still readable.
    let user = identity.rsplit_once(':').filter(|(u, _)| u.starts_with('@') && u.contains(':'));
    match user {
        Some((u, d)) => Person { user_id: u.to_owned(), device_id: Some(d.to_owned()), display_name: ctx.display_name(room_id, u).await },
        None => {
            let name = present.get(identity).filter(|n| !n.is_empty()).cloned().unwrap_or_else(|| identity.to_owned());
            Person { user_id: identity.to_owned(), device_id: None, display_name: name }
        }
    }
}

impl Media {
    fn now_us(&self) -> i64 {
        (self.epoch.elapsed().as_micros() as i64 - self.zero_us).max(0)
    }

    async fn on_member(&mut self, ev: SessionEvent) {
        match ev {
            SessionEvent::MemberJoined(m) | SessionEvent::MemberUpdated(m) => {
                if m.user_id != self.ctx.user_id.as_str() && self.announced.insert(m.user_id.clone()) {
                    // Off the media loop, and a moment after the join: in an encrypted room the
                    // message shares a room key with the newcomer's devices, and that work should
                    // not land on the first seconds of their media (their clock is set up then).
                    let (ctx, room_id, user, outbox) = (self.ctx.clone(), self.room_id.clone(), m.user_id.clone(), self.outbox.clone());
                    tokio::spawn(async move {
                        tokio::time::sleep(MENTION_DELAY).await;
                        let name = ctx.display_name(&room_id, &user).await;
                        let content = messages::being_recorded_mention(&user, &name, &ctx.bot_name);
                        let _ = outbox.send(Outgoing::Event { event_type: "m.room.message".into(), content });
                    });
                }
                self.members.insert(m.identity.clone(), m);
            }
            // Kept: its media may still be in flight, and the recording names it.
            SessionEvent::MemberLeft(_) | SessionEvent::SessionStarted | SessionEvent::SessionEnded => {}
        }
    }

    /// Handles one output of connection `conn`; returns a reason to stop.
    async fn on_output(&mut self, conn: usize, o: SfuOutput, conns: &[SfuConnection], started: Instant) -> Option<String> {
        match o {
            SfuOutput::Joined { sif_trailer, room, server_version, .. } => {
                info!(conn, %room, %server_version, "joined the LiveKit room");
                self.sif.insert(conn, sif_trailer);
            }
            SfuOutput::Room(ev) => self.on_room(ev).await,
            SfuOutput::TrackOpened { track, remote, codec, kind, .. } => {
                let Some(remote) = remote else {
                    warn!(%track, ?kind, "media of an unannounced track; not recorded");
                    return None;
                };
                info!(%track, identity = %remote.identity, source = %remote.source, %codec, encrypted = remote.encrypted, "track opened");
                metrics::gauge!(m::ACTIVE_TRACKS).increment(1.0);
                self.slots.insert(
                    (conn, track),
                    Slot {
                        remote,
                        codec,
                        conn,
                        track,
                        recording_track: None,
                        undecryptable: false,
                        undecryptable_before_start: false,
                        last_keyframe_request: None,
                        written: 0,
                        ended: false,
                    },
                );
            }
            SfuOutput::Frame { track, frame } => self.on_frame(conn, track, frame, conns, started).await,
            SfuOutput::TrackEnded { track } => {
                if let Some(slot) = self.slots.get_mut(&(conn, track)) {
                    if !slot.ended {
                        slot.ended = true;
                        metrics::gauge!(m::ACTIVE_TRACKS).decrement(1.0);
                    }
                }
            }
            SfuOutput::Stats { stats, .. } => {
                let _ = stats;
            }
            SfuOutput::Connected => info!(conn, "media connection up"),
            SfuOutput::Reconnecting { reason } => warn!(conn, %reason, "SFU connection lost; reconnecting"),
            SfuOutput::Reconnected { full_rejoin } => info!(conn, full_rejoin, "SFU connection back"),
            SfuOutput::Closed { reason } => {
                warn!(conn, %reason, "SFU connection closed");
                if conns.len() <= 1 {
                    return Some(format!("the SFU connection closed: {reason}"));
                }
            }
        }
        None
    }

    async fn on_room(&mut self, ev: RoomEvent) {
        match ev {
            RoomEvent::ParticipantJoined { identity, name, .. } => {
                self.present.insert(identity.clone(), name);
                self.joined_at.insert(identity.clone(), self.epoch.elapsed().as_micros() as i64);
                if self.recording.is_some() {
                    let p = person(&self.ctx, &self.room_id, &self.members, &self.present, &identity).await;
                    let at = self.now_us();
                    if let Some(rec) = self.recording.as_mut() {
                        let info = ParticipantInfo { id: identity.clone(), user_id: p.user_id, device_id: p.device_id, display_name: p.display_name };
                        if let Err(e) = rec.participant_joined(info, at).await {
                            warn!(error = %format!("{e:#}"), "cannot record a participant joining");
                        }
                    }
                }
            }
            RoomEvent::ParticipantLeft { identity, .. } => {
                self.present.remove(&identity);
                self.joined_at.remove(&identity);
                let at = self.now_us();
                if let Some(rec) = self.recording.as_mut() {
                    if let Err(e) = rec.participant_left(&identity, at).await {
                        warn!(error = %format!("{e:#}"), "cannot record a participant leaving");
                    }
                }
            }
            RoomEvent::TrackPublished(t) => debug!(identity = %t.identity, source = %t.source, "track published"),
            RoomEvent::TrackUnpublished(t) => {
                // webrtc-rs may not end a removed track's stream: its writer closes here.
                let at = self.now_us();
                for slot in self.slots.values_mut().filter(|s| s.remote.sid == t.sid) {
                    slot.ended = true;
                    if let (Some(rec), Some(id)) = (self.recording.as_mut(), slot.recording_track.as_ref()) {
                        if slot.undecryptable {
                            rec.set_undecryptable(id, false, at);
                        }
                        if let Err(e) = rec.end_track(id).await {
                            warn!(track = %id, error = %format!("{e:#}"), "closing an unpublished track failed");
                        }
                    }
                }
            }
            RoomEvent::TrackMuted { track_sid, muted, .. } => {
                let at = self.now_us();
                for slot in self.slots.values_mut().filter(|s| s.remote.sid == track_sid) {
                    slot.remote.muted = muted;
                    if let (Some(rec), Some(id)) = (self.recording.as_mut(), slot.recording_track.as_ref()) {
                        rec.set_muted(id, muted, at);
                    }
                }
            }
        }
    }

    async fn on_frame(&mut self, conn: usize, track: SfuTrack, frame: EncodedFrame, conns: &[SfuConnection], started: Instant) {
        let Some(slot) = self.slots.get(&(conn, track)) else { return };
        if slot.ended || self.failed.is_some() {
            return;
        }
        let (identity, codec, encrypted) = (slot.remote.identity.clone(), slot.codec, slot.remote.encrypted);
        let sif = self.sif.get(&conn).cloned().unwrap_or_default();
        let frame = if encrypted {
            let result = {
                let mut keys = self.keys.lock().unwrap();
                let k = keys.entry(identity.clone()).or_default();
                crate::matrixrtc::decrypt_frame(k, codec, frame.clone(), &sif)
            };
            match result {
                Ok(None) => return,
                Ok(Some(f)) => {
                    self.decrypted += 1;
                    metrics::counter!(m::FRAMES_DECRYPTED).increment(1);
                    if self.first_decrypted_at.is_none() {
                        let after = started.elapsed();
                        self.first_decrypted_at = Some(after);
                        info!(%identity, after_ms = after.as_millis() as u64, "first frame decrypted");
                    }
                    f
                }
                Err(e) => {
                    let cause = e.cause();
                    metrics::counter!(m::FRAMES_UNDECRYPTABLE, "cause" => cause).increment(1);
                    *self.refused.entry(cause).or_default() += 1;
                    if self.logged.insert((identity.clone(), cause)) {
                        warn!(%identity, %cause, error = %e, "a frame could not be decrypted; it is not recorded (logged once per participant and cause)");
                    }
                    self.mark_undecryptable(conn, track, frame.pts_us).await;
                    return;
                }
            }
        } else if crate::matrixrtc::is_server_injected(&frame.data, &sif) {
            return;
        } else {
            frame
        };
        if self.recording.is_none() {
            self.early_bytes += frame.data.len();
            self.early_slots.insert((conn, track));
            self.early.push((conn, track, frame));
            self.early_since.get_or_insert_with(Instant::now);
            if self.ready_to_start() {
                self.start_with_early(conns).await;
            }
            return;
        }
        self.write_frame(conn, track, frame, conns).await;
    }

    /// Every track that sends media has given its first frame, or the wait is over.
    fn ready_to_start(&self) -> bool {
        let waited = self.early_since.is_some_and(|t| t.elapsed() >= super::super::START_WAIT);
        let all_started = self.slots.iter().all(|(key, s)| {
            s.ended || s.remote.muted || s.undecryptable_before_start || self.early_slots.contains(key)
        });
        all_started || waited || self.early_bytes > MAX_EARLY_BYTES
    }

    /// Starts the recording at the earliest held frame and writes the held frames.
    async fn start_with_early(&mut self, conns: &[SfuConnection]) {
        let mut early = std::mem::take(&mut self.early);
        self.early_since = None;
        self.early_bytes = 0;
        self.early_slots.clear();
        let Some(zero) = early.iter().map(|(_, _, f)| f.pts_us).min() else { return };
        if let Err(e) = self.start_recording(zero).await {
            let reason = format!("starting the recording: {e:#}");
            warn!(error = %reason, "the recording cannot go on");
            self.failed = Some(reason);
            return;
        }
        // Stable: each track's frames keep their order.
        early.sort_by_key(|(_, _, f)| f.pts_us);
        for (c, t, f) in early {
            if self.failed.is_some() {
                break;
            }
            self.write_frame(c, t, f, conns).await;
        }
    }

    async fn write_frame(&mut self, conn: usize, track: SfuTrack, frame: EncodedFrame, conns: &[SfuConnection]) {
        let Some(rec_track) = self.ensure_track(conn, track).await else { return };
        let mut frame = frame;
        frame.pts_us -= self.zero_us;
        if frame.pts_us < 0 {
            return;
        }
        let at = frame.pts_us;
        let rec = self.recording.as_mut().expect("started above");
        let slot = self.slots.get_mut(&(conn, track)).expect("checked above");
        if slot.undecryptable {
            slot.undecryptable = false;
            rec.set_undecryptable(&rec_track, false, at);
        }
        if let Err(e) = rec.write(&rec_track, frame).await {
            let reason = format!("writing track {rec_track}: {e:#}");
            warn!(error = %reason, "the recording cannot go on; what is stored so far is kept");
            self.failed = Some(reason);
            return;
        }
        slot.written += 1;
        if rec.wants_keyframe(&rec_track) && slot.last_keyframe_request.is_none_or(|t| t.elapsed() >= KEYFRAME_REQUEST_INTERVAL) {
            slot.last_keyframe_request = Some(Instant::now());
            if let Some(c) = conns.get(slot.conn) {
                c.request_keyframe(slot.track);
            }
        }
    }

    async fn mark_undecryptable(&mut self, conn: usize, track: SfuTrack, pts_us: i64) {
        if self.recording.is_none() {
            if let Some(slot) = self.slots.get_mut(&(conn, track)) {
                slot.undecryptable_before_start = true;
            }
            return;
        }
        let Some(rec_track) = self.ensure_track(conn, track).await else { return };
        let at = (pts_us - self.zero_us).max(0);
        let slot = self.slots.get_mut(&(conn, track)).expect("ensured");
        if !slot.undecryptable {
            slot.undecryptable = true;
            if let Some(rec) = self.recording.as_mut() {
                rec.set_undecryptable(&rec_track, true, at);
            }
        }
    }

    async fn start_recording(&mut self, first_pts_us: i64) -> anyhow::Result<()> {
        self.zero_us = first_pts_us;
        let rec = Recording::start_at(
            self.ctx.env.clone(),
            self.room_id.as_str(),
            storage::manifest::CallFlavour::Matrixrtc,
            Some(&session::livekit_room_name(self.room_id.as_str(), session::CALL_SLOT_ID)),
            super::super::wall_ms_at(self.epoch, self.zero_us),
        )
        .await?;
        info!(recording = %rec.id(), "recording the call");
        metrics::gauge!(m::ACTIVE_CALLS).increment(1.0);
        let mut rec = rec;
        for user in &self.optouts {
            rec.opt_out(user, user, 0).await?;
        }
        self.pending.replay(&mut rec).await?;
        self.recording = Some(rec);
        // Everyone already in the room is present from when they joined (the start at the latest).
        let present: Vec<String> = self.present.keys().cloned().collect();
        for identity in present {
            let p = person(&self.ctx, &self.room_id, &self.members, &self.present, &identity).await;
            let at = self.joined_at.get(&identity).map_or(0, |&t| (t - self.zero_us).max(0));
            if let Some(rec) = self.recording.as_mut() {
                rec.participant_joined(ParticipantInfo { id: identity, user_id: p.user_id, device_id: p.device_id, display_name: p.display_name }, at).await?;
            }
        }
        // Tracks that had only undecryptable frames so far.
        let early: Vec<(usize, SfuTrack)> = self.slots.iter().filter(|(_, s)| s.undecryptable_before_start).map(|(k, _)| *k).collect();
        for (c, t) in early {
            if let Some(id) = self.ensure_track(c, t).await {
                if let (Some(rec), Some(slot)) = (self.recording.as_mut(), self.slots.get_mut(&(c, t))) {
                    slot.undecryptable = true;
                    rec.set_undecryptable(&id, true, 0);
                }
            }
        }
        Ok(())
    }

    /// The recording's track for a slot, added (with its participant) on first use.
    async fn ensure_track(&mut self, conn: usize, track: SfuTrack) -> Option<String> {
        let slot = self.slots.get(&(conn, track))?;
        if let Some(id) = &slot.recording_track {
            return Some(id.clone());
        }
        let (identity, source, codec, muted) = (slot.remote.identity.clone(), slot.remote.source, slot.codec, slot.remote.muted);
        let at = self.now_us();
        let person = person(&self.ctx, &self.room_id, &self.members, &self.present, &identity).await;
        let rec = self.recording.as_mut()?;
        if !rec.is_present(&identity) {
            let info = ParticipantInfo { id: identity.clone(), user_id: person.user_id, device_id: person.device_id, display_name: person.display_name };
            if let Err(e) = rec.participant_joined(info, at).await {
                warn!(error = %format!("{e:#}"), "cannot add a participant");
                return None;
            }
        }
        let source = match (source, codec.kind()) {
            (TrackSource::Unknown, MediaKind::Audio) => TrackSource::Microphone,
            (TrackSource::Unknown, MediaKind::Video) => TrackSource::Camera,
            (s, _) => s,
        };
        match rec.add_track(TrackInfo { participant_id: identity.clone(), codec, source }).await {
            Ok(id) => {
                if muted {
                    rec.set_muted(&id, true, at);
                }
                info!(%identity, recording_track = %id, %source, "track recorded");
                if let Some(slot) = self.slots.get_mut(&(conn, track)) {
                    slot.recording_track = Some(id.clone());
                }
                Some(id)
            }
            Err(e) => {
                let reason = format!("adding a track of {identity}: {e:#}");
                warn!(error = %reason, "the recording cannot go on");
                self.failed = Some(reason);
                None
            }
        }
    }

    async fn finish(mut self) -> Option<messages::Notice> {
        if self.recording.is_none() && self.failed.is_none() && !self.early.is_empty() {
            self.start_with_early(&[]).await;
        }
        for slot in self.slots.values() {
            if !slot.ended {
                metrics::gauge!(m::ACTIVE_TRACKS).decrement(1.0);
            }
        }
        if !self.refused.is_empty() {
            warn!(decrypted = self.decrypted, refused = ?self.refused, "frames dropped undecrypted in this call");
        }
        let Some(rec) = self.recording.take() else {
            let why = self.failed.clone().unwrap_or_else(|| {
                if self.refused.is_empty() {
                    "no media arrived from the call".into()
                } else {
                    "no media could be decrypted (the bot never got the members' keys)".into()
                }
            });
            return Some(messages::recording_failed(&why));
        };
        metrics::gauge!(m::ACTIVE_CALLS).decrement(1.0);
        Some(self.ctx.store_and_announce(rec, self.failed.as_deref()).await)
    }
}
