//! At start, the recordings a previous run left unfinished (it was killed, crashed or lost power
//! mid-call): each is finished from what was stored ([`crate::pipeline::Recording::recover`]) and
//! its room gets the links as after a normal end, marked as recovered. A MatrixRTC call that was
//! being recorded and is still running is joined again and recorded anew; a 1:1 call cannot be
//! (its peer connection died with the process and only the caller can place it again).

use std::sync::Arc;

use matrix_sdk::ruma::events::StateEventType;
use matrix_sdk::ruma::OwnedRoomId;
use serde::Deserialize;
use storage::catalog::Recording as RecordingRow;
use storage::manifest::CallFlavour;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, info_span, warn, Instrument};

use super::outbox::{Outboxes, Outgoing};
use super::{messages, rooms, rtc, BotContext};
use crate::pipeline::Recording;

/// An unfinished recording and its room.
pub struct Unfinished {
    row: RecordingRow,
    room: OwnedRoomId,
}

/// The part of a stale `org.mxrec.recording` that matters here.
#[derive(Default, Deserialize)]
struct StaleStatus {
    #[serde(default)]
    active: bool,
    #[serde(default)]
    started_by: String,
    #[serde(default)]
    recording_id: Option<String>,
}

/// Finds the unfinished recordings and, for each room whose `org.mxrec.recording` still says one
/// of them is running, withdraws that state; a MatrixRTC call that was being recorded is asked to
/// be recorded again (the runtime starts once the call state shows it still runs). Call before
/// the call state is fed to the runtimes.
pub async fn prepare(ctx: &BotContext, outboxes: &mut Outboxes, rtc: &mpsc::Sender<rtc::RtcInput>) -> Vec<Unfinished> {
    let rows = match ctx.env.recordings_to_finish().await {
        Ok(r) => r,
        Err(e) => {
            warn!(error = %e, "cannot list the recordings a previous run left unfinished");
            return Vec::new();
        }
    };
    let mut out = Vec::new();
    for row in rows {
        let call = match ctx.env.catalog.get_call(&row.call_id).await {
            Ok(Some(c)) => c,
            Ok(None) => {
                warn!(recording = %row.id, "an unfinished recording without its call; left as it is");
                continue;
            }
            Err(e) => {
                warn!(recording = %row.id, error = %e, "cannot read the call of an unfinished recording");
                continue;
            }
        };
        if call.flavour == CallFlavour::Whip {
            // No room to tell: the WHIP side finishes these itself (`crate::whip`).
            continue;
        }
        let Ok(room) = OwnedRoomId::try_from(call.room_id.as_str()) else {
            warn!(recording = %row.id, room = %call.room_id, "an unfinished recording of a room id Matrix rejects; left as it is");
            continue;
        };
        info!(recording = %row.id, room = %room, state = %row.state.as_str(), flavour = %call.flavour, "a previous run left this recording unfinished");
        if let Some(mut content) = status_content(ctx, &room).await {
            let stale: StaleStatus = serde_json::from_value(content.clone()).unwrap_or_default();
            let ours = stale.recording_id.as_deref().is_none_or(|id| id == row.id.as_str());
            if stale.active && ours {
                content["active"] = false.into();
                content["paused"] = false.into();
                outboxes.send(
                    &room,
                    Outgoing::State { event_type: rooms::RECORDING_STATE_EVENT_TYPE.into(), state_key: String::new(), content },
                );
                if matches!(call.flavour, CallFlavour::Matrixrtc | CallFlavour::Mesh) && row.state == storage::RecordingState::Recording {
                    let by = if stale.started_by.is_empty() { "mxrec".to_owned() } else { stale.started_by };
                    let (reply, answer) = oneshot::channel();
                    let input = rtc::RtcInput::Record { room: room.clone(), stop: false, by: format!("{by}, again after a restart"), reply };
                    if rtc.send(input).await.is_ok() {
                        if let Ok(Ok(a)) = answer.await {
                            info!(room = %room, "{a}");
                        }
                    }
                }
            }
        }
        out.push(Unfinished { row, room });
    }
    out
}

/// Finishes the unfinished recordings one after the other, in a task of its own, and posts each
/// room's notice (after what [`prepare`] queued in `outboxes`).
pub fn finish_all(ctx: Arc<BotContext>, mut outboxes: Outboxes, unfinished: Vec<Unfinished>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(
        async move {
            for u in unfinished {
                let id = u.row.id.clone();
                let notice = match Recording::recover(ctx.env.clone(), u.row).await {
                    Ok(Some(rec)) => {
                        let until = rec.stored_until_ms();
                        let mut n = ctx.store_and_announce(rec, None).await;
                        if n.plain.starts_with("Recording saved") {
                            messages::add_recovered_note(&mut n, until);
                        }
                        n
                    }
                    Ok(None) => messages::recording_failed("the recorder stopped before any media of the call was stored"),
                    Err(e) => {
                        warn!(recording = %id, error = %format!("{e:#}"), "recovering the recording failed");
                        messages::recording_failed(&format!("the recorder restarted and could not finish the recording {id}"))
                    }
                };
                info!(recording = %id, room = %u.room, "recovered recording announced");
                outboxes.send(&u.room, Outgoing::Notice(notice));
            }
            outboxes.flush().await;
        }
        .instrument(info_span!("recovery")),
    )
}

/// The content of the room's `org.mxrec.recording`, if it has one.
async fn status_content(ctx: &BotContext, room: &OwnedRoomId) -> Option<serde_json::Value> {
    let r = ctx.client.get_room(room)?;
    let raw = match r.get_state_event(StateEventType::from(rooms::RECORDING_STATE_EVENT_TYPE), "").await {
        Ok(raw) => raw?,
        Err(e) => {
            warn!(room = %room, error = %e, "cannot read the room's org.mxrec.recording");
            return None;
        }
    };
    let json = match raw {
        matrix_sdk::deserialized_responses::RawAnySyncOrStrippedState::Sync(r) => r.json().get().to_owned(),
        matrix_sdk::deserialized_responses::RawAnySyncOrStrippedState::Stripped(_) => return None,
    };
    let v: serde_json::Value = serde_json::from_str(&json).ok()?;
    Some(v["content"].clone()).filter(serde_json::Value::is_object)
}
