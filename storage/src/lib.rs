//! Storage for mxrec: everything that must survive the process lives behind this crate.
//!
//! It takes finished files (track segments, manifests, composites) that the recorder has written
//! into a local [`spool::Spool`], uploads them to an object store ([`store`]) and deletes the local
//! copy only once the stored object has been verified ([`uploader`]). It keeps the catalog of rooms,
//! calls, recordings, participants, tracks, segments and uploads in SQLite or Postgres
//! ([`catalog`]), and defines the per-recording JSON manifest that describes a recording to anyone
//! reading the bucket without the database ([`manifest`]).
//!
//! Matrix is not a concept here: room, user, device and call ids are opaque strings wrapped in
//! newtypes ([`ids`]) so that one cannot be passed where another is expected.

pub mod catalog;
mod error;
pub mod ids;
pub mod manifest;
pub mod spool;
pub mod store;
pub mod uploader;

pub use catalog::{Catalog, RecordingState};
pub use error::{Error, Result};
pub use ids::*;
pub use manifest::Manifest;
pub use spool::{PendingUpload, Spool, SpoolLock};
pub use store::{build_store, key_component, ObjectKeys, StoreBackend, StoreConfig};
pub use uploader::{UploadQueue, UploadReport, Uploader, UploaderConfig};

/// Wall-clock now in unix milliseconds, the one time unit the catalog stores.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}
