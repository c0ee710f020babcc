//! Prometheus metrics: one recorder per process, rendered on `GET /metrics`.
//!
//! Code everywhere emits through the `metrics` facade (`metrics::counter!(NAME)`), so a library
//! crate never depends on the exporter. This module installs the Prometheus recorder once, gives
//! every metric mxrec emits its HELP text, and registers each at zero so a scrape shows the full set
//! (and a rate over a counter that has not moved yet is 0, not absent) from the first request on.
//! The names are constants here so emitters and dashboards spell them the same way.

use std::sync::OnceLock;

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing::warn;

/// Calls being recorded right now.
pub const ACTIVE_CALLS: &str = "mxrec_active_calls";
/// Media tracks being received right now, over all calls.
pub const ACTIVE_TRACKS: &str = "mxrec_active_tracks";
/// RTP payload bytes received.
pub const RTP_BYTES_RECEIVED: &str = "mxrec_rtp_bytes_received_total";
/// RTP packets received.
pub const RTP_PACKETS_RECEIVED: &str = "mxrec_rtp_packets_received_total";
/// RTP packets never received (sequence gaps left after retransmission).
pub const RTP_PACKETS_LOST: &str = "mxrec_rtp_packets_lost_total";
/// Time to write one frame into its track's segment file (closing the segment when the frame
/// starts a new one), in seconds: a Prometheus summary.
pub const FRAME_WRITE_SECONDS: &str = "mxrec_frame_write_seconds";
/// Segments closed by the track writers.
pub const SEGMENTS_WRITTEN: &str = "mxrec_segments_written_total";
/// Emitted by the storage crate's uploader.
pub const UPLOADS_PENDING: &str = "mxrec_uploads_pending";
pub const UPLOADS: &str = "mxrec_uploads_total";
pub const UPLOADS_FAILED: &str = "mxrec_uploads_failed_total";
pub const UPLOAD_RETRIES: &str = "mxrec_upload_retries_total";
pub const UPLOAD_BYTES: &str = "mxrec_upload_bytes_total";
/// E2EE media frames decrypted (MatrixRTC).
pub const FRAMES_DECRYPTED: &str = "mxrec_e2ee_frames_decrypted_total";
/// E2EE media frames that could not be decrypted and were dropped, labelled by `cause`.
pub const FRAMES_UNDECRYPTABLE: &str = "mxrec_e2ee_frames_undecryptable_total";
/// Causes of [`FRAMES_UNDECRYPTABLE`] (`DecryptError::cause`).
pub const UNDECRYPTABLE_CAUSES: [&str; 6] =
    ["missing_key", "key_invalid", "auth_failed", "malformed", "unsupported_codec", "server_injected"];
/// Requests on share links, labelled by `outcome`.
pub const LINK_FETCHES: &str = "mxrec_link_fetches_total";

/// Outcomes of [`LINK_FETCHES`].
/// `challenged`: a members-only link answered with its sign-in page; `granted`: a membership proof
/// was accepted.
pub const LINK_OUTCOMES: [&str; 7] =
    ["served", "redirected", "refused", "unsatisfiable", "failed", "challenged", "granted"];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the Prometheus recorder as the process's `metrics` recorder, the first time only, and
/// returns the handle that renders it. Safe to call from every server and test in a process.
///
/// If some other recorder was installed first, the handle still renders, but only what is sent
/// to it: nothing. That is logged, not fatal, since metrics are not worth refusing to start over.
pub fn install_metrics_recorder() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                warn!("another metrics recorder is installed; /metrics will show nothing");
            }
            describe_metrics();
            handle
        })
        .clone()
}

/// HELP text and a zero value for every metric mxrec emits.
fn describe_metrics() {
    let gauges = [
        (ACTIVE_CALLS, Unit::Count, "Calls being recorded right now."),
        (ACTIVE_TRACKS, Unit::Count, "Media tracks being received right now, over all calls."),
        (UPLOADS_PENDING, Unit::Count, "Files queued or being uploaded to the object store."),
    ];
    for (name, unit, help) in gauges {
        describe_gauge!(name, unit, help);
        metrics::gauge!(name).increment(0.0);
    }
    let counters = [
        (RTP_BYTES_RECEIVED, Unit::Bytes, "RTP payload bytes received from all peers."),
        (RTP_PACKETS_RECEIVED, Unit::Count, "RTP packets received from all peers."),
        (RTP_PACKETS_LOST, Unit::Count, "RTP packets never received, after retransmission requests."),
        (SEGMENTS_WRITTEN, Unit::Count, "Media segments closed by the track writers."),
        (UPLOADS, Unit::Count, "Files uploaded and verified in the object store."),
        (UPLOADS_FAILED, Unit::Count, "Uploads that failed every attempt; their files stay in the spool."),
        (UPLOAD_RETRIES, Unit::Count, "Upload attempts that were retried after a failure."),
        (UPLOAD_BYTES, Unit::Bytes, "Bytes uploaded and verified in the object store."),
        (FRAMES_DECRYPTED, Unit::Count, "End-to-end encrypted media frames decrypted."),
    ];
    for (name, unit, help) in counters {
        describe_counter!(name, unit, help);
        metrics::counter!(name).increment(0);
    }
    describe_histogram!(FRAME_WRITE_SECONDS, Unit::Seconds, "Time to write one frame into its segment file (closing a segment included).");
    describe_counter!(FRAMES_UNDECRYPTABLE, Unit::Count, "Encrypted media frames dropped undecrypted, by cause.");
    for cause in UNDECRYPTABLE_CAUSES {
        metrics::counter!(FRAMES_UNDECRYPTABLE, "cause" => cause).increment(0);
    }
    describe_counter!(LINK_FETCHES, Unit::Count, "Requests on share links, by outcome.");
    for outcome in LINK_OUTCOMES {
        metrics::counter!(LINK_FETCHES, "outcome" => outcome).increment(0);
    }
}

/// Adds what a track received since its last stats (`old`) to the RTP counters.
pub(crate) fn count_track_stats(new: &crate::peer::TrackStats, old: &crate::peer::TrackStats) {
    let (new, old) = (new.receiver, old.receiver);
    metrics::counter!(RTP_PACKETS_RECEIVED).increment(new.packets_received.saturating_sub(old.packets_received));
    metrics::counter!(RTP_BYTES_RECEIVED).increment(new.payload_bytes.saturating_sub(old.payload_bytes));
    metrics::counter!(RTP_PACKETS_LOST).increment(new.lost.saturating_sub(old.lost));
}

/// Counts one request on a share link.
pub(crate) fn link_fetch(outcome: &'static str) {
    metrics::counter!(LINK_FETCHES, "outcome" => outcome).increment(1);
}

/// `GET /metrics`.
pub(crate) async fn render(
    axum::extract::State(state): axum::extract::State<std::sync::Arc<super::HttpState>>,
) -> impl axum::response::IntoResponse {
    state.metrics.run_upkeep();
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], state.metrics.render())
}
