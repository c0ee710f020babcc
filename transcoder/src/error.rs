//! One error type for the crate. Messages say which track or file failed and what the
//! writer does next, because they end up in the recorder's logs without more context.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TranscodeError {
    /// The frame was rejected; the writer is unchanged and accepts the next frame.
    #[error("track {track}: rejected {codec} frame at {pts_us} us: {reason}; the writer goes on")]
    InvalidFrame {
        track: String,
        codec: &'static str,
        pts_us: i64,
        reason: String,
    },
    /// The frame's timestamp is not after the last accepted one; it was dropped, not written.
    #[error("track {track}: frame at {pts_us} us is not after the previous frame at {last_us} us; dropped")]
    NonMonotonicPts {
        track: String,
        pts_us: i64,
        last_us: i64,
    },
    #[error("{context}: {source}")]
    Ffmpeg {
        context: String,
        #[source]
        source: ffmpeg_next::Error,
    },
    #[error("{context} ({path}): {source}")]
    Io {
        context: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A segment given to [`crate::join_segments`] is missing, not Matroska/WebM, incomplete or
    /// unreadable.
    #[error("segment {path} cannot be joined: {reason}; no joined file was written")]
    BadSegment { path: PathBuf, reason: String },
    /// A segment's stream parameters differ from the first segment's, which one codec-copied
    /// file cannot carry; the track's segments have to be offered as they are.
    #[error("segment {index} ({path}) changes the stream's {change}; the track cannot be joined into one file, keep its segments")]
    ParametersChanged {
        index: usize,
        path: PathBuf,
        change: String,
    },
    #[error("invalid composite spec: {0}")]
    InvalidSpec(String),
    #[error("{0}")]
    Unsupported(String),
}

impl TranscodeError {
    pub(crate) fn ff(context: impl Into<String>) -> impl FnOnce(ffmpeg_next::Error) -> Self {
        let context = context.into();
        move |source| TranscodeError::Ffmpeg { context, source }
    }

    pub(crate) fn io<'a>(
        context: &'static str,
        path: &'a std::path::Path,
    ) -> impl FnOnce(std::io::Error) -> Self + 'a {
        move |source| TranscodeError::Io {
            context,
            path: path.to_path_buf(),
            source,
        }
    }
}
