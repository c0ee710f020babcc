//! Finishing a recording that a previous run left unfinished (mxrec was killed, crashed or lost
//! power mid-call, or during the finalize).
//!
//! What survives a stop is on disk: the catalog (call, recording, participants with their join and
//! leave times, tracks, every closed segment, the audit trail with each pause, resume, opt-out and
//! opt-in) and the spool (segments not uploaded yet, with their sidecars, and each track's open
//! segment as `<segment>.partial`). [`Recording::recover`] rebuilds a [`Recording`] from them:
//! the open segments are salvaged up to their last flushed cluster, the spool's uploads (queued
//! again by [`Env::open`]) are waited for, and [`Recording::finish`] then runs the same
//! finalizer as a normal end. Running it twice is harmless: a salvaged segment is catalogued
//! before its partial file is removed, and the finalizer's uploads overwrite what a previous
//! attempt stored.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use storage::catalog::Segment;
use storage::manifest::{self, Span};
use storage::{key_component, ObjectKeys, RecordingState};
use tracing::{info, info_span, warn};
use transcoder::SegmentInfo;

use super::{codec_from_name, Env, ParticipantInfo, Recording, TrackInfo, TrackState};
use crate::timeline::Timeline;

/// One step of the rebuilt timeline, replayed in time order.
enum Step {
    Joined(String),
    Left(String),
    Control { action: String, by: String, subject: Option<String> },
}

impl Recording {
    /// Rebuilds an unfinished recording from the catalog and the spool, ready for
    /// [`Recording::finish`]. `Ok(None)` when nothing of its media was stored: the recording is
    /// marked failed (with why) and there is nothing to finish.
    pub async fn recover(env: Arc<Env>, row: storage::catalog::Recording) -> Result<Option<Self>> {
        let id = row.id.clone();
        let call = env.catalog.get_call(&row.call_id).await?.ok_or_else(|| anyhow!("the call of recording {id} is missing"))?;
        let room = call.room_id.as_str().to_owned();
        let span = info_span!("recording", room = %room, recording = %id, recovered = true);
        let epoch_ms = row.started_at_ms;
        let dir = env
            .spool
            .path_for(&format!("{}/{}/.keep", key_component(&room), key_component(id.as_str())))
            .await?
            .parent()
            .expect("spool path has a parent")
            .to_path_buf();
        let keys = ObjectKeys::new(&call.room_id, &id);

        // Participants: one per adapter key, a catalog row per stint in the call.
        let rows = env.catalog.participants(&id).await?;
        let mut participants: BTreeMap<String, (ParticipantInfo, Vec<storage::ParticipantId>)> = BTreeMap::new();
        let mut key_of_row = BTreeMap::new();
        let mut steps: Vec<(i64, Step)> = Vec::new();
        for p in &rows {
            let key = p.key.clone().unwrap_or_else(|| match &p.device_id {
                Some(d) => format!("{}:{}", p.user_id.as_str(), d.as_str()),
                None => p.user_id.as_str().to_owned(),
            });
            key_of_row.insert(p.id.clone(), key.clone());
            let entry = participants.entry(key.clone()).or_insert_with(|| {
                let info = ParticipantInfo {
                    id: key.clone(),
                    user_id: p.user_id.as_str().to_owned(),
                    device_id: p.device_id.as_ref().map(|d| d.as_str().to_owned()),
                    display_name: p.display_name.clone().unwrap_or_else(|| p.user_id.as_str().to_owned()),
                };
                (info, Vec::new())
            });
            entry.1.push(p.id.clone());
            steps.push(((p.joined_at_ms - epoch_ms) * 1000, Step::Joined(key.clone())));
            if let Some(left) = p.left_at_ms {
                steps.push(((left - epoch_ms) * 1000, Step::Left(key)));
            }
        }
        for e in env.catalog.audit_events(&id).await? {
            let Some(action) = e.action.strip_prefix("recording.") else { continue };
            if !matches!(action, "start" | "stop" | "pause" | "resume" | "optout" | "optin") {
                continue;
            }
            let at_us = e.detail["at_us"].as_i64().unwrap_or((e.at_ms - epoch_ms) * 1000);
            let subject = e.detail["subject"].as_str().map(str::to_owned);
            steps.push((at_us, Step::Control { action: action.to_owned(), by: e.actor, subject }));
        }
        // Stable: a join and a control step at the same time keep catalog order (joins first).
        steps.sort_by_key(|(at, _)| *at);

        // Tracks and their stored segments, plus what each open segment left on disk.
        let mut tracks = BTreeMap::new();
        let mut pending_uploads = Vec::new();
        let mut salvaged_segments = 0u32;
        let mut last_us = 0i64;
        for t in env.catalog.tracks(&id).await? {
            let track_id = t.id.as_str().to_owned();
            let participant_id = key_of_row
                .get(&t.participant_id)
                .cloned()
                .ok_or_else(|| anyhow!("track {track_id} belongs to no participant of the recording"))?;
            let codec = codec_from_name(&t.codec).ok_or_else(|| anyhow!("track {track_id} has codec {:?}", t.codec))?;
            let track_dir = dir.join(&track_id);
            let mut segments = Vec::new();
            for s in env.catalog.segments(&id, &t.id).await? {
                let ext = Path::new(&s.object_key).extension().and_then(|e| e.to_str()).unwrap_or("mkv").to_owned();
                let path = track_dir.join(format!("{track_id}-{:05}.{ext}", s.index));
                if let Some(rx) = env.take_resumed(&s.object_key) {
                    pending_uploads.push((object_store::path::Path::from(s.object_key.as_str()), path.clone(), rx));
                }
                segments.push((segment_info(&s, path), object_store::path::Path::from(s.object_key.as_str())));
            }
            let next_index = segments.last().map_or(0, |(s, _)| s.index + 1);
            for partial in partial_files(&track_dir) {
                let Some((index, ext)) = partial_index(&partial, &track_id) else { continue };
                if index < next_index {
                    // Catalogued already (a recovery interrupted after the salvage).
                    let _ = std::fs::remove_file(&partial);
                    continue;
                }
                let out = track_dir.join(format!("{track_id}-{index:05}.{ext}"));
                let (from, to) = (partial.clone(), out.clone());
                let salvaged = tokio::task::spawn_blocking(move || transcoder::salvage_segment(&from, &to))
                    .await
                    .context("the salvage task panicked")?;
                let s = match salvaged {
                    Ok(Some(s)) => s,
                    Ok(None) => {
                        span.in_scope(|| info!(track = %track_id, file = %partial.display(), "the open segment held no whole frame"));
                        let _ = std::fs::remove_file(&partial);
                        continue;
                    }
                    Err(e) => {
                        span.in_scope(|| warn!(track = %track_id, file = %partial.display(), error = %e, "the open segment cannot be salvaged; it is kept"));
                        continue;
                    }
                };
                let key = keys.segment(&t.id, index, &ext);
                // The container counts in milliseconds: the salvaged start may fall a fraction of
                // one before the previous segment's end (kept in µs).
                let prev_end = segments.last().map_or(0, |(p, _): &(SegmentInfo, _)| p.end_us);
                let start_us = s.start_us.max(prev_end);
                let seg = Segment {
                    recording_id: id.clone(),
                    track_id: t.id.clone(),
                    index,
                    start_us,
                    end_us: s.end_us.max(start_us),
                    bytes: s.bytes,
                    sha256: s.sha256.clone(),
                    object_key: key.to_string(),
                };
                let rx = env.uploads().enqueue(&out, &key, Some(&id)).await?;
                env.catalog.add_segment(&seg).await?;
                let _ = std::fs::remove_file(&partial);
                span.in_scope(|| {
                    info!(track = %track_id, index, start_us, end_us = seg.end_us, frames = s.packets, "open segment salvaged")
                });
                salvaged_segments += 1;
                pending_uploads.push((key.clone(), out.clone(), rx));
                segments.push((segment_info(&seg, out), key));
            }
            last_us = segments.iter().map(|(s, _)| s.end_us).fold(last_us, i64::max);
            let info = TrackInfo { participant_id, codec, source: t.source };
            tracks.insert(track_id, TrackState { info, writer: None, segments, rejected_frames: 0 });
        }

        if tracks.values().all(|t| t.segments.is_empty()) {
            let reason = "mxrec stopped before any media of the recording was stored";
            span.in_scope(|| warn!(reason, "nothing to recover"));
            env.catalog.set_recording_state(&id, RecordingState::Failed, Some(reason)).await?;
            env.catalog.audit("mxrec", "recording.recovery_failed", Some(&id), serde_json::json!({ "reason": reason })).await?;
            return Ok(None);
        }

        // The timeline and the control list, replayed in order up to the last stored frame.
        let mut manifest = manifest::Manifest::new(
            id.as_str(),
            epoch_ms,
            manifest::RoomInfo { id: room.clone(), name: None },
            manifest::CallInfo { id: call.id.to_string(), flavour: call.flavour, span: Span::from_offsets(epoch_ms, 0, None) },
        );
        let mut timeline = Timeline::default();
        let mut opted_out_users = std::collections::BTreeSet::new();
        let mut resumed_at_us = 0;
        let mut opted_in_at_us = BTreeMap::new();
        for (at_us, step) in steps {
            let at_us = at_us.clamp(0, last_us);
            match step {
                Step::Joined(p) => {
                    timeline.joined(&p, at_us);
                    let user = &participants[&p].0.user_id;
                    if opted_out_users.contains(user) {
                        timeline.set_opted_out(&p, true, at_us);
                    }
                }
                Step::Left(p) => {
                    timeline.left(&p, at_us);
                    timeline.set_opted_out(&p, false, at_us);
                }
                Step::Control { action, by, subject } => {
                    let theirs: Vec<String> = participants
                        .iter()
                        .filter(|(_, (p, _))| Some(&p.user_id) == subject.as_ref())
                        .map(|(k, _)| k.clone())
                        .collect();
                    match action.as_str() {
                        "pause" => timeline.set_paused(true, at_us),
                        "resume" => {
                            timeline.set_paused(false, at_us);
                            resumed_at_us = at_us;
                        }
                        "optout" => {
                            opted_out_users.extend(subject.clone());
                            for p in &theirs {
                                if timeline.is_present(p) {
                                    timeline.set_opted_out(p, true, at_us);
                                }
                            }
                        }
                        "optin" => {
                            if let Some(u) = &subject {
                                opted_out_users.remove(u);
                            }
                            for p in theirs {
                                timeline.set_opted_out(&p, false, at_us);
                                opted_in_at_us.insert(p, at_us);
                            }
                        }
                        _ => {}
                    }
                    manifest.control.push(manifest::ControlEvent {
                        at: manifest::wall_clock(epoch_ms, at_us),
                        at_us,
                        action,
                        by,
                        subject,
                    });
                }
            }
        }
        manifest.recovered = Some(manifest::Recovery { at: chrono::Utc::now(), salvaged_segments });
        let stored_us = last_us;
        span.in_scope(|| {
            info!(
                tracks = tracks.len(),
                salvaged_segments,
                stored_s = stored_us as f64 / 1e6,
                uploads_waiting = pending_uploads.len(),
                "recovering a recording left unfinished by a previous run"
            )
        });
        env.catalog
            .audit(
                "mxrec",
                "recording.recovered",
                Some(&id),
                serde_json::json!({ "salvaged_segments": salvaged_segments, "stored_us": stored_us, "state": row.state.as_str() }),
            )
            .await?;
        Ok(Some(Self {
            env: env.clone(),
            id,
            call_id: call.id,
            keys,
            epoch_ms,
            dir,
            participants,
            tracks,
            timeline,
            pending_uploads,
            last_us,
            manifest,
            opted_out_users,
            resumed_at_us,
            opted_in_at_us,
            span,
        }))
    }

    /// Unix ms of the end of the last stored media.
    pub fn stored_until_ms(&self) -> i64 {
        self.epoch_ms + self.last_us / 1000
    }
}

fn segment_info(s: &Segment, path: PathBuf) -> SegmentInfo {
    SegmentInfo {
        index: s.index,
        path,
        start_us: s.start_us,
        end_us: s.end_us,
        frames: 0,
        bytes: s.bytes,
        sha256: s.sha256.clone(),
        width: None,
        height: None,
    }
}

/// The `*.partial` files of a track's spool directory, in name order.
fn partial_files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut v: Vec<PathBuf> =
        entries.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|e| e == "partial")).collect();
    v.sort();
    v
}

/// `<track>-<index>.<ext>.partial` → (index, ext).
fn partial_index(path: &Path, track_id: &str) -> Option<(u32, String)> {
    let name = path.file_name()?.to_str()?.strip_suffix(".partial")?;
    let (stem, ext) = name.rsplit_once('.')?;
    let index = stem.strip_prefix(track_id)?.strip_prefix('-')?.parse().ok()?;
    matches!(ext, "webm" | "mkv").then(|| (index, ext.to_owned()))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use storage::manifest::{CallFlavour, TrackSource};
    use transcoder::Codec;

    use super::*;
    use crate::config::Config;
    use crate::pipeline::{FINALIZE_ATTEMPTS, FINALIZE_FAILED};

    /// Alice and Bob send VP8 + Opus; the recording is paused 2–3 s and Bob opts out at 4 s; at
    /// 6 s the process "dies": no writer is closed, no finalize runs. A new environment on the same
    /// data finds the recording, salvages the open segments and finishes it: the manifest is
    /// marked recovered, holds media up to the cut (less at most a cluster), and keeps the pause,
    /// the opt-out and who asked.
    #[tokio::test]
    async fn a_recording_cut_by_a_kill_is_finished_by_the_next_run() {
        const S: i64 = 1_000_000;
        let dir = tempfile::tempdir().unwrap();
        let frames = test_frames(dir.path(), 6);
        let mut config = Config { data_dir: dir.path().join("data"), ..Config::default() };
        config.storage.backend =
            storage::store::StoreBackend::Local(storage::store::LocalStoreConfig { root: dir.path().join("store") });

        // The first run, killed at 6 s.
        let env = Arc::new(Env::open(&config).await.unwrap());
        let mut rec = Recording::start(env.clone(), "!room:example.org", CallFlavour::Voip1, None).await.unwrap();
        let id = rec.id().clone();
        let mut tracks = Vec::new();
        for who in ["alice", "bob"] {
            let user = format!("@{who}:example.org");
            let p = ParticipantInfo { id: format!("{who}|DEV"), user_id: user, device_id: Some("DEV".into()), display_name: who.into() };
            rec.participant_joined(p, 0).await.unwrap();
            for (codec, source) in [(Codec::Vp8, TrackSource::Camera), (Codec::Opus, TrackSource::Microphone)] {
                let id = rec.add_track(TrackInfo { participant_id: format!("{who}|DEV"), codec, source }).await.unwrap();
                tracks.push((codec, id));
            }
        }
        for (codec, frame) in frames {
            let t = frame.pts_us;
            if t >= 2 * S && !rec.is_paused() && rec.timeline.pauses(t).is_empty() {
                rec.pause("@mod:example.org", 2 * S).await.unwrap();
            }
            if t >= 3 * S && rec.is_paused() {
                rec.resume("@mod:example.org", 3 * S).await.unwrap();
            }
            if t >= 4 * S && !rec.is_opted_out("@bob:example.org") {
                rec.opt_out("@bob:example.org", "@bob:example.org", 4 * S).await.unwrap();
            }
            for (_, id) in tracks.iter().filter(|(c, _)| *c == codec) {
                rec.write(id, frame.clone()).await.unwrap();
            }
        }
        // The kill: open segments stay `.partial`, nothing of the finalize happens.
        for t in rec.tracks.values_mut() {
            if let Some(w) = t.writer.take() {
                std::mem::forget(w);
            }
        }
        drop(rec);
        Arc::try_unwrap(env).ok().expect("nothing else holds the environment").shutdown().await;

        // The next run.
        let env = Arc::new(Env::open(&config).await.unwrap());
        let unfinished = env.catalog.unfinished_recordings().await.unwrap();
        assert_eq!(unfinished.iter().map(|r| &r.id).collect::<Vec<_>>(), [&id]);
        let rec = Recording::recover(env.clone(), unfinished[0].clone()).await.unwrap().expect("media to recover");
        let done = rec.finish().await.unwrap();
        let m = &done.manifest;
        let recovered = m.recovered.as_ref().expect("marked recovered");
        assert!(recovered.salvaged_segments >= 2, "open segments salvaged: {}", recovered.salvaged_segments);
        assert_eq!(m.pauses.iter().map(|s| (s.start_us, s.end_us)).collect::<Vec<_>>(), [(2 * S, Some(3 * S))]);
        let actions: Vec<(&str, &str, Option<&str>)> =
            m.control.iter().map(|c| (c.action.as_str(), c.by.as_str(), c.subject.as_deref())).collect();
        assert_eq!(
            actions,
            [
                ("pause", "@mod:example.org", None),
                ("resume", "@mod:example.org", None),
                ("optout", "@bob:example.org", Some("@bob:example.org"))
            ]
        );
        let end = m.call.span.end_us.unwrap();
        assert!(end >= 5 * S && end <= 6 * S, "the recording ends at the cut, less a cluster: {end} µs");
        let bob = m.participants.iter().find(|p| p.id == "bob|DEV").expect("bob under his adapter key");
        assert_eq!(bob.opted_out.iter().map(|s| (s.start_us, s.end_us)).collect::<Vec<_>>(), [(4 * S, Some(end))]);
        assert_eq!(bob.present.len(), 1);
        for t in &m.tracks {
            let last = t.segments.last().unwrap();
            if t.participant == "alice|DEV" {
                assert!(last.end_us >= 5 * S, "{} holds media up to the cut: {} µs", t.id, last.end_us);
            }
            for seg in &t.segments {
                assert!(seg.end_us <= 2 * S + 100_000 || seg.start_us >= 3 * S, "{}: a segment inside the pause", t.id);
            }
        }
        assert_eq!(m.outputs.len(), 1, "the composite was rendered");
        assert_eq!(
            env.catalog.get_recording(&id).await.unwrap().unwrap().state,
            RecordingState::Uploaded
        );
        assert!(env.catalog.unfinished_recordings().await.unwrap().is_empty());
        let audit = env.catalog.audit_events(&id).await.unwrap();
        assert!(audit.iter().any(|e| e.action == "recording.recovered"));
        let left: Vec<PathBuf> = walk(&dir.path().join("data/spool"));
        assert!(!left.iter().any(|p| p.to_string_lossy().ends_with(".partial")), "no partial file is left: {left:?}");
    }

    /// `seconds` of VP8 (160×120, 15 fps) and Opus from FFmpeg, as frames in time order.
    fn test_frames(dir: &Path, seconds: u32) -> Vec<(Codec, transcoder::EncodedFrame)> {
        let media = dir.join("in.webm");
        let ok = std::process::Command::new("ffmpeg")
            .args(["-v", "error", "-nostdin", "-f", "lavfi", "-i"])
            .arg(format!("testsrc2=size=160x120:rate=15:duration={seconds}"))
            .args(["-f", "lavfi", "-i"])
            .arg(format!("sine=frequency=440:sample_rate=48000:duration={seconds}"))
            .args(["-c:v", "libvpx", "-deadline", "realtime", "-cpu-used", "8", "-g", "15", "-c:a", "libopus"])
            .arg(&media)
            .status()
            .unwrap();
        assert!(ok.success());
        let mut file = crate::import::MediaFile::open(&media).unwrap();
        let streams: HashMap<usize, Codec> = file.streams().iter().map(|s| (s.index, s.codec)).collect();
        let mut frames = Vec::new();
        while let Some(f) = file.next_frame().unwrap() {
            frames.push((streams[&f.stream], f.frame));
        }
        frames.sort_by_key(|(_, f)| f.pts_us);
        frames
    }

    /// A finalize that fails (the store refuses every upload: its directory became a file) leaves
    /// the recording failed with its files in the spool; the next start, with the store back,
    /// retries it and stores everything. A recording that failed its finalize
    /// [`FINALIZE_ATTEMPTS`] times, or failed without a finalize (nothing stored), is not retried.
    #[tokio::test]
    async fn a_failed_finalize_is_retried_at_the_next_start() {
        let dir = tempfile::tempdir().unwrap();
        let frames = test_frames(dir.path(), 3);
        let store_root = dir.path().join("store");
        let mut config = Config { data_dir: dir.path().join("data"), ..Config::default() };
        config.storage.backend =
            storage::store::StoreBackend::Local(storage::store::LocalStoreConfig { root: store_root.clone() });
        config.upload.max_attempts = 1;

        let env = Arc::new(Env::open(&config).await.unwrap());
        let mut rec = Recording::start(env.clone(), "!room:example.org", CallFlavour::Voip1, None).await.unwrap();
        let id = rec.id().clone();
        let p = ParticipantInfo { id: "alice".into(), user_id: "@alice:example.org".into(), device_id: None, display_name: "Alice".into() };
        rec.participant_joined(p, 0).await.unwrap();
        let mut tracks = HashMap::new();
        for (codec, source) in [(Codec::Vp8, TrackSource::Camera), (Codec::Opus, TrackSource::Microphone)] {
            tracks.insert(codec, rec.add_track(TrackInfo { participant_id: "alice".into(), codec, source }).await.unwrap());
        }
        for (codec, frame) in frames {
            rec.write(&tracks[&codec], frame).await.unwrap();
        }
        // The store goes away (what it holds is kept aside) for longer than the upload attempts:
        // every upload of the finalize fails.
        let away = dir.path().join("store-away");
        std::fs::rename(&store_root, &away).unwrap();
        std::fs::write(&store_root, b"not a directory").unwrap();
        let err = rec.finish().await.expect_err("the finalize cannot store anything");
        eprintln!("first finalize: {err:#}");
        assert_eq!(env.catalog.get_recording(&id).await.unwrap().unwrap().state, RecordingState::Failed);
        Arc::try_unwrap(env).ok().expect("nothing else holds the environment").shutdown().await;

        // The next start, with the store back.
        std::fs::remove_file(&store_root).unwrap();
        std::fs::rename(&away, &store_root).unwrap();
        let env = Arc::new(Env::open(&config).await.unwrap());
        let todo = env.recordings_to_finish().await.unwrap();
        assert_eq!(todo.iter().map(|r| &r.id).collect::<Vec<_>>(), [&id], "the failed recording is retried");
        let rec = Recording::recover(env.clone(), todo[0].clone()).await.unwrap().expect("its media is in the spool");
        let done = rec.finish().await.unwrap();
        assert_eq!(env.catalog.get_recording(&id).await.unwrap().unwrap().state, RecordingState::Uploaded);
        assert_eq!(done.manifest.outputs.len(), 1, "the composite was rendered");
        for t in &done.manifest.tracks {
            assert!(!t.segments.is_empty(), "track {} has segments", t.id);
            for s in &t.segments {
                let bytes = std::fs::read(store_root.join(&s.key)).unwrap_or_else(|e| panic!("segment {}: {e}", s.key));
                use sha2::Digest;
                assert_eq!(hex::encode(sha2::Sha256::digest(&bytes)), s.sha256, "segment {} stored whole", s.key);
            }
        }
        assert!(env.recordings_to_finish().await.unwrap().is_empty(), "nothing left to finish");

        // Out of attempts, or failed with nothing to finalize: left failed.
        let spent = Recording::start(env.clone(), "!room:example.org", CallFlavour::Voip1, None).await.unwrap();
        let empty = Recording::start(env.clone(), "!room:example.org", CallFlavour::Voip1, None).await.unwrap();
        for r in [&spent, &empty] {
            env.catalog.set_recording_state(r.id(), RecordingState::Failed, Some("test")).await.unwrap();
        }
        for _ in 0..FINALIZE_ATTEMPTS {
            env.catalog.audit("mxrec", FINALIZE_FAILED, Some(spent.id()), serde_json::json!({})).await.unwrap();
        }
        assert!(env.recordings_to_finish().await.unwrap().is_empty(), "neither is retried");
    }

    fn walk(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
        out
    }

    #[test]
    fn partial_names() {
        let p = Path::new("/spool/r/t/alice-camera-00003.webm.partial");
        assert_eq!(partial_index(p, "alice-camera"), Some((3, "webm".into())));
        assert_eq!(partial_index(p, "alice"), None, "another track's prefix");
        assert_eq!(partial_index(Path::new("/x/alice-camera-00003.webm"), "alice-camera"), None);
        assert_eq!(partial_index(Path::new("/x/alice-camera-00003.txt.partial"), "alice-camera"), None);
    }
}
