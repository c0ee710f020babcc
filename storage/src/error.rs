use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in storage. Messages say what failed and on which object or
/// recording, so a log line is enough to act on.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid storage configuration: {0}")]
    Config(String),

    #[error("object store {op} of `{key}` failed: {source}")]
    ObjectStore {
        op: &'static str,
        key: String,
        #[source]
        source: object_store::Error,
    },

    #[error("local file `{}`: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("upload of `{key}` is not verified ({reason}); the spool file is kept")]
    Verification { key: String, reason: String },

    #[error("upload of `{key}` failed after {attempts} attempt(s); the spool file is kept for a later retry: {last}")]
    UploadFailed {
        key: String,
        attempts: u32,
        #[source]
        last: Box<Error>,
    },

    #[error("the upload queue has shut down; the file stays in the spool for the next start")]
    QueueClosed,

    #[error("catalog query failed: {0}")]
    Database(#[from] sqlx::Error),

    #[error("catalog migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),

    #[error("recording {recording}: cannot go from {from} to {to}")]
    InvalidTransition {
        recording: String,
        from: crate::catalog::RecordingState,
        to: crate::catalog::RecordingState,
    },

    #[error("{what} `{id}` not found in the catalog")]
    NotFound { what: &'static str, id: String },

    #[error("catalog holds an unexpected value: {0}")]
    Corrupt(String),

    #[error("manifest is invalid: {0}")]
    Manifest(String),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn store(
        op: &'static str,
        key: &object_store::path::Path,
        source: object_store::Error,
    ) -> Self {
        Error::ObjectStore {
            op,
            key: key.to_string(),
            source,
        }
    }
}
