//! `mxrec import`: several participants' media files recorded as one call.
//!
//! Each file is a participant; its streams become that participant's tracks. Frames of all files
//! are merged in order of their time on the call's clock (file pts + the participant's join
//! offset), so the pipeline sees them as a live call would deliver them.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use transcoder::{EncodedFrame, MediaKind};

use crate::import::MediaFile;
use crate::pipeline::{Env, Finished, ParticipantInfo, Recording, TrackInfo, TrackSource};

/// One `--participant ID[#Display Name]=FILE[@JOIN_SECONDS]` argument.
#[derive(Debug, Clone, PartialEq)]
pub struct ParticipantFile {
    pub id: String,
    pub display_name: String,
    pub path: PathBuf,
    pub join_offset_us: i64,
}

impl ParticipantFile {
    pub fn parse(arg: &str) -> Result<Self> {
        let Some((who, file)) = arg.split_once('=') else {
            bail!("`{arg}`: expected ID[#Display Name]=FILE[@JOIN_SECONDS]");
        };
        let (id, display_name) = match who.split_once('#') {
            Some((id, name)) => (id.trim(), name.trim()),
            None => (who.trim(), who.trim()),
        };
        if id.is_empty() {
            bail!("`{arg}`: the participant id is empty");
        }
        // A path may itself contain '@': only a numeric suffix is an offset.
        let (path, offset) = match file.rsplit_once('@') {
            Some((p, off)) if off.parse::<f64>().is_ok() => (p, off.parse::<f64>().unwrap()),
            _ => (file, 0.0),
        };
        if !(0.0..=86_400.0).contains(&offset) {
            bail!("`{arg}`: join offset {offset} s is outside 0..=86400");
        }
        if path.is_empty() {
            bail!("`{arg}`: the file is empty");
        }
        Ok(Self {
            id: id.to_string(),
            display_name: display_name.to_string(),
            path: PathBuf::from(path),
            join_offset_us: (offset * 1e6).round() as i64,
        })
    }
}

struct Source {
    participant: String,
    file: MediaFile,
    offset_us: i64,
    /// stream index → track id in the recording
    tracks: Vec<(usize, String)>,
    pending: Option<(String, EncodedFrame)>,
    last_end_us: i64,
    done: bool,
}

impl Source {
    fn fill(&mut self) -> Result<()> {
        while self.pending.is_none() && !self.done {
            match self.file.next_frame()? {
                None => self.done = true,
                Some(f) => {
                    let Some((_, track)) = self.tracks.iter().find(|(s, _)| *s == f.stream) else {
                        continue;
                    };
                    let mut frame = f.frame;
                    frame.pts_us += self.offset_us;
                    self.last_end_us = self.last_end_us.max(frame.pts_us);
                    self.pending = Some((track.clone(), frame));
                }
            }
        }
        Ok(())
    }
}

pub async fn import(env: &std::sync::Arc<Env>, room: &str, files: Vec<ParticipantFile>) -> Result<Finished> {
    // Every file is opened (and its codecs checked) before anything is recorded, so bad input
    // leaves no half-made recording behind.
    let opened = files
        .into_iter()
        .map(|pf| MediaFile::open(&pf.path).map(|f| (pf, f)))
        .collect::<Result<Vec<_>>>()?;
    let mut recording = Recording::start(env.clone(), room, storage::manifest::CallFlavour::Import, None).await?;
    // Whatever goes wrong part-way, what was read is finished and stored, never stranded.
    let fed = feed(&mut recording, opened).await;
    let id = recording.id().clone();
    let finished = recording.finish().await;
    match fed {
        Ok(()) => finished,
        Err(e) => {
            let stored = if finished.is_ok() { "is stored" } else { "could not be stored either" };
            Err(e.context(format!("the import stopped part-way; what was read before {stored} as recording {id}")))
        }
    }
}

async fn feed(recording: &mut Recording, opened: Vec<(ParticipantFile, MediaFile)>) -> Result<()> {
    let mut sources = Vec::new();
    for (pf, file) in opened {
        recording
            .participant_joined(
                ParticipantInfo {
                    id: pf.id.clone(),
                    user_id: pf.id.clone(),
                    device_id: None,
                    display_name: pf.display_name.clone(),
                },
                pf.join_offset_us,
            )
            .await?;
        let mut tracks = Vec::new();
        for s in file.streams() {
            let source = match s.kind {
                MediaKind::Audio => TrackSource::Microphone,
                MediaKind::Video => TrackSource::Camera,
            };
            let id = recording
                .add_track(TrackInfo { participant_id: pf.id.clone(), codec: s.codec, source })
                .await
                .with_context(|| format!("adding a track for {}", pf.id))?;
            tracks.push((s.index, id));
        }
        sources.push(Source {
            participant: pf.id,
            file,
            offset_us: pf.join_offset_us,
            tracks,
            pending: None,
            last_end_us: pf.join_offset_us,
            done: false,
        });
    }

    loop {
        for s in &mut sources {
            s.fill()?;
        }
        let next = sources
            .iter_mut()
            .filter(|s| s.pending.is_some())
            .min_by_key(|s| s.pending.as_ref().map(|(_, f)| f.pts_us));
        let Some(src) = next else { break };
        let (track, frame) = src.pending.take().expect("filtered on pending");
        recording.write(&track, frame).await?;
        // A participant whose file ended has left the call.
        for s in &mut sources {
            if s.done && s.pending.is_none() && recording.is_present(&s.participant) {
                recording.participant_left(&s.participant, s.last_end_us).await?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn participant_arguments_parse() {
        let p = ParticipantFile::parse("@alice:example.org#Alice A.=/tmp/a@b/x.webm@3.5").unwrap();
        assert_eq!(p.id, "@alice:example.org");
        assert_eq!(p.display_name, "Alice A.");
        assert_eq!(p.path, PathBuf::from("/tmp/a@b/x.webm"));
        assert_eq!(p.join_offset_us, 3_500_000);

        let p = ParticipantFile::parse("bob=b.mkv").unwrap();
        assert_eq!((p.id.as_str(), p.display_name.as_str(), p.join_offset_us), ("bob", "bob", 0));

        for bad in ["nofile", "=x.webm", "a=", "a=x.webm@-1"] {
            assert!(ParticipantFile::parse(bad).is_err(), "{bad} should be refused");
        }
    }
}
