//! Opus (RFC 7587): one RTP payload is exactly one Opus packet, so one frame.

use bytes::Bytes;

use super::{DepacketizedFrame, PacketInfo, PayloadError};

pub fn inspect(_payload: &[u8]) -> Result<PacketInfo, PayloadError> {
    Ok(PacketInfo { starts_frame: Some(true) })
}

pub fn assemble(payloads: &[Bytes]) -> Result<DepacketizedFrame, PayloadError> {
    match payloads {
        [one] => Ok(DepacketizedFrame { data: one.clone(), keyframe: true }),
        _ => Err(format!("{} Opus packets share one RTP timestamp", payloads.len())),
    }
}
