//! The recorder: everything that knows about calls. It turns a call (for now: media files through
//! the import adapter; Matrix call flavours plug in the same way) into frames on one clock, feeds
//! them to `transcoder`'s segment writers, and hands the results to `storage` — spool, uploads,
//! catalog, manifest — then renders the composite when the recording ends.
//!
//! Layout: `config` (the one configuration tree), `timeline` (pure: presence, mutes, pauses),
//! `pipeline` (one recording's state: writers, timeline, uploads; the finalizer), `import` (the file
//! adapter), `export` (re-rendering a stored recording), `http` (the one HTTP server: share
//! links, /healthz, /metrics).

pub mod cli_import;
pub mod config;
pub mod export;
pub mod http;
pub mod import;
pub mod logging;
pub mod peer;
pub mod pipeline;
pub mod timeline;
pub mod voip1;
pub mod rtp;
