//! MatrixRTC calls (Element Call, Element X) over a LiveKit SFU.
//!
//! Layout: `access` (LiveKit tokens: minted with an API key, or from a JWT service through a
//! Matrix OpenID token), `livekit` (the bot as a subscribe-only LiveKit participant: signalling,
//! the receive-only peer connection, the room's participants and tracks), `session` (who is in the
//! room's call, from membership events; which keys belong to which LiveKit identity), `e2ee`
//! (LiveKit frame decryption with per-participant HKDF keys).

pub mod access;
pub mod e2ee;
pub mod livekit;
pub mod session;

use bytes::Bytes;
use transcoder::{Codec, EncodedFrame};

use e2ee::{Decrypted, DecryptError, FrameCodec, ParticipantKeys};

/// The frame-cryptor codec of a recorded codec.
pub fn frame_codec(c: Codec) -> FrameCodec {
    match c {
        Codec::Opus => FrameCodec::Opus,
        Codec::Vp8 => FrameCodec::Vp8,
        Codec::Vp9 => FrameCodec::Vp9,
        Codec::H264 => FrameCodec::H264,
        Codec::Av1 => FrameCodec::Av1,
    }
}

/// Decrypts one whole frame of an encrypted LiveKit track with its participant's keys.
/// `Ok(None)` for a blank frame the SFU injected (SIF: an 8x8 VP8 key frame, silence…, sent
/// while a track is paused or switching): it is not the participant's media and is not recorded.
/// The error says why a frame cannot be recorded (it must then be dropped, never written).
pub fn decrypt_frame(
    keys: &mut ParticipantKeys,
    codec: Codec,
    frame: EncodedFrame,
    sif_trailer: &[u8],
) -> Result<Option<EncodedFrame>, DecryptError> {
    let data = match keys.decrypt_frame(frame_codec(codec), &frame.data, sif_trailer)? {
        Decrypted::Plain(v) | Decrypted::PassThrough(v) => v,
        Decrypted::InjectedBlank(_) => return Ok(None),
    };
    Ok(Some(EncodedFrame { data: Bytes::from(data), ..frame }))
}

/// Whether a frame of an unencrypted track was injected by the SFU (it ends with the join's
/// `sif_trailer`); such frames are placeholders, not media.
pub fn is_server_injected(frame: &[u8], sif_trailer: &[u8]) -> bool {
    !sif_trailer.is_empty() && frame.len() > sif_trailer.len() && frame.ends_with(sif_trailer)
}
