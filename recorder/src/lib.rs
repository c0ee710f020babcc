//! The recorder: everything that knows about calls. It turns a call (a Matrix 1:1 call answered by
//! the bot, or media files through the import adapter) into frames on one clock, feeds
//! them to `transcoder`'s segment writers, and hands the results to `storage` — spool, uploads,
//! catalog, manifest — then renders the composite when the recording ends.
//!
//! Layout: `config` (the one configuration tree), `timeline` (pure: presence, mutes, pauses),
//! `pipeline` (one recording's state: writers, timeline, uploads; the finalizer), `import` (the file
//! adapter), `export` (re-rendering a stored recording), `http` (the one HTTP server: share
//! links, /healthz, /metrics), `voip1` (pure 1:1 signalling machines, also the peer calls of
//! mesh group calls), `mesh` (pure MSC3401 group call machines), `rtp` (the receive path),
//! `peer` (the WebRTC edge), `bot` (the Matrix account, call runtime and per-call tasks), `whip`
//! (WHIP ingest: a publisher recorded like a call's participant);
//! `fuzzing` (hidden) opens private paths to the fuzz targets in `fuzz/`.

// matrix-sdk's sync future is deep enough to overflow the default limit when checking `Send`.
#![recursion_limit = "256"]

pub mod bot;
pub mod cli_import;
pub mod config;
pub mod export;
#[doc(hidden)]
pub mod fuzzing;
pub mod http;
pub mod import;
pub mod logging;
pub mod matrixrtc;
pub mod mesh;
pub mod peer;
pub mod pipeline;
pub mod timeline;
pub mod voip1;
pub mod whip;
pub mod rtp;
