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

/// Whether a frame of an unencrypted track was injected by the SFU: it ends with the join's
/// `sif_trailer`, or it is one of LiveKit's blank frames byte for byte (the 8x8 VP8 key frame, the
/// Opus silence frame: livekit-server appends the trailer only on encrypted tracks). Such frames
/// are placeholders, not media; an 8x8 key frame written into a 720p track would also split it
/// into segments of another resolution.
pub fn is_server_injected(frame: &[u8], sif_trailer: &[u8]) -> bool {
    (!sif_trailer.is_empty() && frame.len() > sif_trailer.len() && frame.ends_with(sif_trailer))
        || e2ee::is_blank_payload(frame)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// LiveKit's 8x8 VP8 key frame, as the SFU sends it to a subscriber of an unencrypted track.
    const VP8_BLANK: [u8; 31] = [
        0x10, 0x02, 0x00, 0x9d, 0x01, 0x2a, 0x08, 0x00, 0x08, 0x00, 0x00, 0x47, 0x08, 0x85, 0x85, 0x88,
        0x85, 0x84, 0x88, 0x02, 0x02, 0x00, 0x0c, 0x0d, 0x60, 0x00, 0xfe, 0xff, 0xab, 0x50, 0x80,
    ];

    #[test]
    fn server_injected_frames_of_unencrypted_tracks() {
        let trailer = [0x82, 0xc6, 0xba, 0xfc, 0xbc, 0xae, 0xbe, 0xdd];
        // Without a trailer (unencrypted tracks): the blank frames themselves, byte for byte.
        assert!(is_server_injected(&VP8_BLANK, &[]));
        assert!(is_server_injected(&VP8_BLANK, &trailer));
        let mut opus_silence = [0u8; 80];
        opus_silence[..3].copy_from_slice(&[0xf8, 0xff, 0xfe]);
        assert!(is_server_injected(&opus_silence, &[]));
        // With the trailer, whatever precedes it.
        let mut marked = b"anything".to_vec();
        marked.extend_from_slice(&trailer);
        assert!(is_server_injected(&marked, &trailer));
        // Real media is not: another 8x8 key frame, a truncated blank, the trailer alone.
        let mut other = VP8_BLANK;
        other[20] ^= 1;
        assert!(!is_server_injected(&other, &trailer));
        assert!(!is_server_injected(&VP8_BLANK[..30], &[]));
        assert!(!is_server_injected(&trailer, &trailer));
        assert!(!is_server_injected(&[], &[]));
    }
}
