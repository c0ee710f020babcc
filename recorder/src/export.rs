//! From a manifest to a composite file: the one place that turns a stored recording (manifest +
//! segments) into the compositor's input. The finalizer uses it at the end of every recording, and
//! `mxrec export` uses it to re-render a recording later, from the store alone.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt};
use sha2::{Digest, Sha256};
use storage::manifest::{Manifest, OutputKind, TrackKind};
use transcoder::{CompositeParticipant, CompositeSpec, CompositeTrack, Interval, MediaKind};

use crate::config::{CompositeConfig, Config};
use crate::pipeline::codec_from_name;

/// A rendered composite, before upload.
#[derive(Debug, Clone)]
pub struct RenderedOutput {
    pub path: PathBuf,
    pub kind: OutputKind,
    pub sha256: String,
    pub duration_us: i64,
}

impl RenderedOutput {
    pub fn file_name(&self) -> &str {
        match self.kind {
            OutputKind::Mp4 => "composite.mp4",
            OutputKind::M4a => "composite.m4a",
        }
    }
}

fn interval(s: &storage::manifest::Span, end_default: i64) -> Interval {
    Interval { start_us: s.start_us, end_us: s.end_us.unwrap_or(end_default) }
}

/// The compositor's input for a manifest whose segment files are at `files` (object key → path).
pub fn composite_spec(
    manifest: &Manifest,
    files: &BTreeMap<String, PathBuf>,
    cfg: &CompositeConfig,
) -> Result<CompositeSpec> {
    let duration_us = manifest
        .call
        .span
        .end_us
        .or_else(|| manifest.tracks.iter().flat_map(|t| t.segments.last()).map(|s| s.end_us).max())
        .ok_or_else(|| anyhow!("the manifest has neither a call end nor any segment"))?;
    let participants = manifest
        .participants
        .iter()
        .map(|p| CompositeParticipant {
            id: p.id.clone(),
            display_name: p.display_name.clone().unwrap_or_else(|| p.user_id.clone()),
            present: p.present.iter().map(|s| interval(s, duration_us)).collect(),
            not_recorded: p.opted_out.iter().map(|s| interval(s, duration_us)).collect(),
        })
        .collect();
    let mut tracks = Vec::new();
    for t in &manifest.tracks {
        if t.segments.is_empty() {
            continue;
        }
        let codec = codec_from_name(&t.codec)
            .ok_or_else(|| anyhow!("track {} has codec `{}`, which mxrec cannot render", t.id, t.codec))?;
        let segments = t
            .segments
            .iter()
            .map(|s| files.get(&s.key).cloned().ok_or_else(|| anyhow!("segment {} has no local file", s.key)))
            .collect::<Result<Vec<_>>>()?;
        tracks.push(CompositeTrack {
            participant_id: t.participant.clone(),
            kind: match t.kind {
                TrackKind::Audio => MediaKind::Audio,
                TrackKind::Video => MediaKind::Video,
            },
            source: match t.source {
                storage::manifest::TrackSource::Screen => transcoder::TrackSource::Screen,
                storage::manifest::TrackSource::ScreenAudio => transcoder::TrackSource::ScreenAudio,
                storage::manifest::TrackSource::Microphone => transcoder::TrackSource::Microphone,
                storage::manifest::TrackSource::Camera | storage::manifest::TrackSource::Unknown => {
                    match t.kind {
                        TrackKind::Audio => transcoder::TrackSource::Microphone,
                        TrackKind::Video => transcoder::TrackSource::Camera,
                    }
                }
            },
            codec,
            segments,
            muted: t
                .muted
                .iter()
                .chain(&t.undecryptable)
                .map(|s| interval(s, duration_us))
                .collect(),
        });
    }
    let mut spec = CompositeSpec::new(duration_us);
    spec.width = cfg.width;
    spec.height = cfg.height;
    spec.fps = cfg.fps;
    spec.participants = participants;
    spec.tracks = tracks;
    spec.paused = manifest.pauses.iter().map(|s| interval(s, duration_us)).collect();
    spec.font_path = cfg.font_path.clone();
    Ok(spec)
}

/// Makes every segment of `manifest` available as a local file: the path in `local` when that
/// file still exists with the recorded size, otherwise a download from the store into `dir`
/// (checked against the manifest's SHA-256).
pub async fn materialize(
    store: &dyn ObjectStore,
    manifest: &Manifest,
    local: &BTreeMap<String, PathBuf>,
    dir: &Path,
) -> Result<BTreeMap<String, PathBuf>> {
    let mut out = BTreeMap::new();
    for (ti, t) in manifest.tracks.iter().enumerate() {
        for s in &t.segments {
            if let Some(p) = local.get(&s.key) {
                if std::fs::metadata(p).map(|m| m.len() == s.bytes).unwrap_or(false) {
                    out.insert(s.key.clone(), p.clone());
                    continue;
                }
            }
            let key = ObjectPath::parse(&s.key).with_context(|| format!("segment key {}", s.key))?;
            let bytes = store
                .get(&key)
                .await
                .with_context(|| format!("fetching segment {}", s.key))?
                .bytes()
                .await
                .with_context(|| format!("reading segment {}", s.key))?;
            let digest = hex::encode(Sha256::digest(&bytes));
            if digest != s.sha256 {
                bail!("segment {} does not match the manifest (SHA-256 {digest}, expected {})", s.key, s.sha256);
            }
            let ext = Path::new(&s.key).extension().and_then(|e| e.to_str()).unwrap_or("mkv");
            let path = dir.join(format!("t{ti:03}-{:06}.{ext}", s.index));
            tokio::fs::write(&path, &bytes).await.with_context(|| format!("writing {}", path.display()))?;
            out.insert(s.key.clone(), path);
        }
    }
    Ok(out)
}

/// Renders the composite of `manifest` into `out_dir` (named by [`RenderedOutput::file_name`]).
pub async fn render_manifest(
    store: &dyn ObjectStore,
    cfg: &CompositeConfig,
    manifest: &Manifest,
    local: &BTreeMap<String, PathBuf>,
    out_dir: &Path,
    progress: Box<dyn FnMut(f64) + Send>,
) -> Result<RenderedOutput> {
    let tmp = tempfile::tempdir_in(out_dir).context("creating a work directory")?;
    let files = materialize(store, manifest, local, tmp.path()).await?;
    let spec = composite_spec(manifest, &files, cfg)?;
    let has_video = spec.has_video();
    let kind = if has_video { OutputKind::Mp4 } else { OutputKind::M4a };
    let out = out_dir.join(if has_video { "composite.mp4" } else { "composite.m4a" });
    let out2 = out.clone();
    let report = tokio::task::spawn_blocking(move || {
        let mut progress = progress;
        transcoder::render(&spec, &out2, &mut *progress)
    })
    .await
    .context("the compositor task panicked")??;
    let sha256 = sha256_file(&out).await?;
    drop(tmp);
    Ok(RenderedOutput { path: out, kind, sha256, duration_us: report.duration_us })
}

async fn sha256_file(path: &Path) -> Result<String> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || -> Result<String> {
        let mut f = std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        let mut h = Sha256::new();
        std::io::copy(&mut f, &mut h)?;
        Ok(hex::encode(h.finalize()))
    })
    .await?
}

/// `mxrec export`: the manifest from a local path or an object key, the composite to `out`.
pub async fn export(config: &Config, manifest_arg: &str, out: &Path) -> Result<()> {
    let store = storage::build_store(&config.storage).context("opening the object store")?;
    let manifest = if Path::new(manifest_arg).is_file() {
        Manifest::load_file(Path::new(manifest_arg)).await?
    } else {
        let key = ObjectPath::parse(manifest_arg).with_context(|| format!("`{manifest_arg}` as an object key"))?;
        Manifest::load_object(store.as_ref(), &key)
            .await
            .with_context(|| format!("`{manifest_arg}` is neither a local file nor a readable manifest object"))?
    };
    let out_dir = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(out_dir)?;
    // Rendered beside the target (same filesystem, so the final rename is atomic) but inside a
    // directory of its own, so no other file there is touched.
    let work = tempfile::tempdir_in(out_dir).context("creating a work directory")?;
    let bar = indicatif::ProgressBar::new(1000);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} rendering [{bar:40}] {percent:>3}% eta {eta}")
            .expect("static template")
            .progress_chars("=> "),
    );
    let b2 = bar.clone();
    let rendered = render_manifest(
        store.as_ref(),
        &config.composite,
        &manifest,
        &BTreeMap::new(),
        work.path(),
        Box::new(move |f| b2.set_position((f.clamp(0.0, 1.0) * 1000.0) as u64)),
    )
    .await?;
    bar.finish_and_clear();
    std::fs::rename(&rendered.path, out).with_context(|| format!("moving the composite to {}", out.display()))?;
    Ok(())
}
