//! The codecs a WebRTC call can carry, and what the containers need to know about them.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MediaKind {
    Audio,
    Video,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Codec {
    Opus,
    Vp8,
    Vp9,
    H264,
    Av1,
}

impl Codec {
    pub fn kind(&self) -> MediaKind {
        match self {
            Codec::Opus => MediaKind::Audio,
            _ => MediaKind::Video,
        }
    }

    /// Maps an SDP/WebRTC MIME type such as `video/VP8` or `audio/opus` (any case).
    pub fn from_mime(mime: &str) -> Option<Codec> {
        match mime.to_ascii_lowercase().as_str() {
            "audio/opus" => Some(Codec::Opus),
            "video/vp8" => Some(Codec::Vp8),
            "video/vp9" => Some(Codec::Vp9),
            "video/h264" => Some(Codec::H264),
            "video/av1" | "video/av1x" => Some(Codec::Av1),
            _ => None,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Codec::Opus => "opus",
            Codec::Vp8 => "vp8",
            Codec::Vp9 => "vp9",
            Codec::H264 => "h264",
            Codec::Av1 => "av1",
        }
    }

    /// The codec's usual written name, for people (`Opus`, `VP8`, `H.264`).
    pub fn display_name(&self) -> &'static str {
        match self {
            Codec::Opus => "Opus",
            Codec::Vp8 => "VP8",
            Codec::Vp9 => "VP9",
            Codec::H264 => "H.264",
            Codec::Av1 => "AV1",
        }
    }

    /// H.264 is not allowed in WebM, so it goes into plain Matroska.
    pub fn segment_extension(&self) -> &'static str {
        match self {
            Codec::H264 => "mkv",
            _ => "webm",
        }
    }

    pub(crate) fn muxer_name(&self) -> &'static str {
        match self {
            Codec::H264 => "matroska",
            _ => "webm",
        }
    }

    pub(crate) fn ff_id(&self) -> ffmpeg_next::ffi::AVCodecID {
        use ffmpeg_next::ffi::AVCodecID::*;
        match self {
            Codec::Opus => AV_CODEC_ID_OPUS,
            Codec::Vp8 => AV_CODEC_ID_VP8,
            Codec::Vp9 => AV_CODEC_ID_VP9,
            Codec::H264 => AV_CODEC_ID_H264,
            Codec::Av1 => AV_CODEC_ID_AV1,
        }
    }
}

impl std::fmt::Display for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mime_and_serde() {
        assert_eq!(Codec::from_mime("video/VP8"), Some(Codec::Vp8));
        assert_eq!(Codec::from_mime("AUDIO/OPUS"), Some(Codec::Opus));
        assert_eq!(Codec::from_mime("video/H264"), Some(Codec::H264));
        assert_eq!(Codec::from_mime("video/AV1"), Some(Codec::Av1));
        assert_eq!(Codec::from_mime("video/rtx"), None);
        assert_eq!(serde_json::to_string(&Codec::H264).unwrap(), "\"h264\"");
        assert_eq!(
            serde_json::from_str::<Codec>("\"vp9\"").unwrap(),
            Codec::Vp9
        );
        assert_eq!(
            serde_json::to_string(&MediaKind::Audio).unwrap(),
            "\"audio\""
        );
        assert_eq!(Codec::Opus.kind(), MediaKind::Audio);
        assert_eq!(Codec::Av1.kind(), MediaKind::Video);
    }
}
