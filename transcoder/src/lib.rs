//! The media layer of mxrec: it turns encoded frames on a recording's common clock into
//! codec-copy Matroska/WebM segments ([`TrackWriter`]), and turns all the segments of a
//! recording plus its timeline (who was present, muted, paused) into one composed MP4 or M4A
//! ([`render`]), or one track's segments into one file ([`join_segments`]). It takes frames,
//! paths and intervals and gives files and their metadata; it knows nothing of Matrix, WebRTC
//! signalling or object storage, so everything upstream of "frames on a wall clock" and
//! downstream of "files on disk" lives in other crates.

mod bitstream;
mod codec;
mod compositor;
mod error;
mod ff;
mod join;
mod layout;
mod mux;
mod track_writer;

pub use codec::{Codec, MediaKind};
pub use compositor::{
    filtergraph, render, CompositeParticipant, CompositeReport, CompositeSpec, CompositeTrack,
    Interval, TrackSource,
};
pub use error::TranscodeError;
pub use join::{join_segments, salvage_segment, JoinReport, Salvaged};
pub use layout::{layout, Rect, Tile, TileKind};
pub use track_writer::{
    EncodedFrame, SegmentInfo, TrackWriter, TrackWriterConfig, TrackWriterStats,
};

/// Entry points for the fuzz targets in `fuzz/` (docs/dev/fuzzing.md); not an API.
#[doc(hidden)]
pub mod fuzzing {
    use crate::{bitstream, Codec};

    /// What a segment writer's frame check makes of one frame: `Ok(keyframe)` as the bitstream
    /// says, or why the writer refuses the frame.
    pub fn check_frame(codec: Codec, data: &[u8], keyframe: bool) -> Result<bool, String> {
        bitstream::parse(codec, data, keyframe).map(|facts| facts.keyframe)
    }
}

/// Initialises libav* once; every public entry point calls it, so callers never have to.
pub fn init() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if let Err(e) = ffmpeg_next::init() {
            tracing::error!(error = %e, "ffmpeg initialisation failed");
        }
        // libav* prints to stderr by default; our own errors carry the context instead.
        ffmpeg_next::util::log::set_level(ffmpeg_next::util::log::Level::Error);
    });
}
