//! The local spool: the directory where every finished file waits until its upload is verified.
//!
//! Until then the spool file may be the only copy of a recording, so nothing here deletes a data
//! file except [`Spool::complete`], which the uploader calls only after verification. Each file
//! meant for upload has a sidecar `<file>.pending.json` naming its object key; the sidecar is what
//! makes the intent durable, so after a crash or restart [`Spool::scan`] finds every upload that
//! has not been verified yet without needing the catalog.

use std::path::{Path, PathBuf};

use object_store::path::Path as ObjectPath;
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use crate::error::{Error, Result};
use crate::ids::RecordingId;

const SIDECAR_SUFFIX: &str = ".pending.json";

/// A spool file waiting for upload, as recorded in its sidecar.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingUpload {
    /// Absolute path of the data file.
    pub local_path: PathBuf,
    /// Object key relative to the store (the store applies its prefix).
    pub key: String,
    /// Recording the file belongs to, if any; lets recovery attribute it.
    #[serde(default)]
    pub recording: Option<RecordingId>,
    /// When the file was handed to the uploader, unix ms.
    pub created_at_ms: i64,
}

impl PendingUpload {
    pub fn object_key(&self) -> Result<ObjectPath> {
        ObjectPath::parse(&self.key).map_err(|e| {
            Error::Config(format!(
                "pending upload for `{}` has a bad key: {e}",
                self.local_path.display()
            ))
        })
    }

    fn sidecar_path(&self) -> PathBuf {
        sidecar_for(&self.local_path)
    }
}

fn sidecar_for(data: &Path) -> PathBuf {
    let mut s = data.as_os_str().to_owned();
    s.push(SIDECAR_SUFFIX);
    PathBuf::from(s)
}

/// A spool directory. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Spool {
    root: PathBuf,
}

/// Exclusive ownership of a spool by one process, held while the guard lives. Two processes
/// uploading from one spool would race on its files (one deletes what the other still sends).
#[derive(Debug)]
pub struct SpoolLock {
    _file: std::fs::File,
}

impl Spool {
    /// Takes the spool for this process, or fails at once naming the spool when another process
    /// holds it. The lock is released when the guard is dropped or the process dies.
    pub fn lock_exclusive(&self) -> Result<SpoolLock> {
        let path = self.root.join(".lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        match file.try_lock() {
            Ok(()) => Ok(SpoolLock { _file: file }),
            Err(std::fs::TryLockError::WouldBlock) => Err(Error::Config(format!(
                "the spool `{}` is in use by another mxrec process; give each process its own spool_dir",
                self.root.display()
            ))),
            Err(std::fs::TryLockError::Error(e)) => Err(Error::io(&path, e)),
        }
    }

    /// Open (and create) the spool directory.
    pub async fn open(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        tokio::fs::create_dir_all(&root)
            .await
            .map_err(|e| Error::io(&root, e))?;
        // Absolute, so sidecars stay valid whatever the working directory of the next run.
        let root = tokio::fs::canonicalize(&root)
            .await
            .map_err(|e| Error::io(&root, e))?;
        Ok(Self { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A path inside the spool for a file about to be written, creating parent directories.
    /// `relative` is split on `/` and each part sanitized, so it cannot leave the spool.
    pub async fn path_for(&self, relative: &str) -> Result<PathBuf> {
        let mut p = self.root.clone();
        for part in relative.split('/').filter(|s| !s.is_empty()) {
            p.push(crate::store::key_component(part));
        }
        if let Some(parent) = p.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|e| Error::io(parent, e))?;
        }
        Ok(p)
    }

    /// Record durably that `local` is to be uploaded to `key`. The data file must be complete and
    /// inside the spool.
    pub async fn mark_pending(
        &self,
        local: &Path,
        key: &ObjectPath,
        recording: Option<&RecordingId>,
    ) -> Result<PendingUpload> {
        let local_path = tokio::fs::canonicalize(local)
            .await
            .map_err(|e| Error::io(local, e))?;
        if !local_path.starts_with(&self.root) {
            return Err(Error::Config(format!(
                "`{}` is outside the spool `{}`; only spool files can be queued for upload",
                local_path.display(),
                self.root.display()
            )));
        }
        let pending = PendingUpload {
            local_path,
            key: key.to_string(),
            recording: recording.cloned(),
            created_at_ms: crate::now_ms(),
        };
        let sidecar = pending.sidecar_path();
        let tmp = sidecar.with_extension("tmp");
        let json = serde_json::to_vec_pretty(&pending).expect("PendingUpload serializes");
        // Write-then-rename so a crash never leaves a half-written sidecar.
        write_synced(&tmp, &json).await?;
        tokio::fs::rename(&tmp, &sidecar)
            .await
            .map_err(|e| Error::io(&sidecar, e))?;
        Ok(pending)
    }

    /// The upload of `pending` is verified: drop the sidecar, and the data file unless `keep_local`.
    pub async fn complete(&self, pending: &PendingUpload, keep_local: bool) -> Result<()> {
        // Data file first: a crash between the two leaves a sidecar without data, which scan()
        // recognises as finished. The reverse order could leave an unreferenced data file.
        if !keep_local {
            match tokio::fs::remove_file(&pending.local_path).await {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(&pending.local_path, e)),
            }
        }
        let sidecar = pending.sidecar_path();
        match tokio::fs::remove_file(&sidecar).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(sidecar, e)),
        }
    }

    /// Every upload not yet verified, oldest first. Sidecars whose data file is gone (a crash
    /// after verification) are cleaned up; unreadable sidecars are reported and skipped, never
    /// deleted, so a human can look at them.
    pub async fn scan(&self) -> Result<Vec<PendingUpload>> {
        let root = self.root.clone();
        let sidecars = tokio::task::spawn_blocking(move || find_sidecars(&root))
            .await
            .expect("spool scan task panicked")?;
        let mut pending = Vec::new();
        for sidecar in sidecars {
            let bytes = tokio::fs::read(&sidecar)
                .await
                .map_err(|e| Error::io(&sidecar, e))?;
            let p: PendingUpload = match serde_json::from_slice(&bytes) {
                Ok(p) => p,
                Err(e) => {
                    warn!(sidecar = %sidecar.display(), error = %e, "unreadable spool sidecar; skipping it");
                    continue;
                }
            };
            if tokio::fs::try_exists(&p.local_path)
                .await
                .map_err(|e| Error::io(&p.local_path, e))?
            {
                pending.push(p);
            } else {
                debug!(sidecar = %sidecar.display(), "data file already gone; upload finished before a crash");
                let _ = tokio::fs::remove_file(&sidecar).await;
            }
        }
        pending.sort_by(|a, b| {
            a.created_at_ms
                .cmp(&b.created_at_ms)
                .then(a.key.cmp(&b.key))
        });
        Ok(pending)
    }
}

async fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    use tokio::io::AsyncWriteExt;
    let mut f = tokio::fs::File::create(path)
        .await
        .map_err(|e| Error::io(path, e))?;
    f.write_all(bytes).await.map_err(|e| Error::io(path, e))?;
    f.sync_all().await.map_err(|e| Error::io(path, e))?;
    Ok(())
}

fn find_sidecars(root: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let entries = std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(&dir, e))?;
            let ty = entry.file_type().map_err(|e| Error::io(entry.path(), e))?;
            let path = entry.path();
            if ty.is_dir() {
                dirs.push(path);
            } else if ty.is_file() && path.to_string_lossy().ends_with(SIDECAR_SUFFIX) {
                out.push(path);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_process_owns_a_spool_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).await.unwrap();
        let held = spool.lock_exclusive().unwrap();
        // A second owner (another process in real life; flock-style locks also conflict between
        // two open file descriptions in one process) is refused with a message naming the spool.
        let err = spool.lock_exclusive().unwrap_err().to_string();
        assert!(err.contains("in use by another mxrec process"), "{err}");
        drop(held);
        spool.lock_exclusive().expect("free again once the owner is gone");
        assert!(spool.scan().await.unwrap().is_empty(), "the lock file is not an upload");
    }

    #[tokio::test]
    async fn pending_files_survive_a_restart_and_complete_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).await.unwrap();
        let a = spool.path_for("rec1/../a.webm").await.unwrap();
        assert!(a.starts_with(spool.root()));
        tokio::fs::write(&a, b"aaa").await.unwrap();
        let b = spool.path_for("rec1/b.webm").await.unwrap();
        tokio::fs::write(&b, b"bbb").await.unwrap();
        let pa = spool
            .mark_pending(&a, &ObjectPath::from("x/a.webm"), None)
            .await
            .unwrap();
        spool
            .mark_pending(&b, &ObjectPath::from("x/b.webm"), Some(&"r".into()))
            .await
            .unwrap();

        // A fresh handle, as after a restart.
        let again = Spool::open(dir.path()).await.unwrap();
        let found = again.scan().await.unwrap();
        assert_eq!(found.len(), 2);
        assert!(found
            .iter()
            .any(|p| p.key == "x/b.webm" && p.recording == Some("r".into())));

        again.complete(&pa, false).await.unwrap();
        assert!(!a.exists());
        let found = again.scan().await.unwrap();
        assert_eq!(
            found.iter().map(|p| p.key.as_str()).collect::<Vec<_>>(),
            ["x/b.webm"]
        );

        // Sidecar without data (crash after delete) is cleaned up by scan.
        tokio::fs::remove_file(&b).await.unwrap();
        assert!(again.scan().await.unwrap().is_empty());
        assert!(!sidecar_for(&b).exists());
    }

    #[tokio::test]
    async fn files_outside_the_spool_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let other = tempfile::NamedTempFile::new().unwrap();
        let spool = Spool::open(dir.path().join("spool")).await.unwrap();
        let err = spool
            .mark_pending(other.path(), &ObjectPath::from("k"), None)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Config(_)), "{err}");
    }
}
