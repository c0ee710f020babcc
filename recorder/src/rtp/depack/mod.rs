//! Per-codec RTP payload formats: what one packet says about frame boundaries (checked when the
//! packet arrives, so a malformed packet is rejected on its own), and how the payloads of one
//! complete frame turn into the byte format the segment muxer wants.
//!
//! The reorder buffer decides *which* packets form a frame; this module only reads payloads.

mod av1;
mod h264;
mod opus;
mod vp8;
mod vp9;

use bytes::Bytes;
use transcoder::Codec;

pub use h264::ParameterSets;

/// What a packet's payload header says about its place in a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketInfo {
    /// `Some(true)`: this packet certainly starts a frame; `Some(false)`: it certainly does not;
    /// `None`: the payload format cannot tell (e.g. an H.264 single NAL unit packet).
    pub starts_frame: Option<bool>,
}

/// One depacketized frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DepacketizedFrame {
    pub data: Bytes,
    pub keyframe: bool,
}

/// A payload that does not follow its RTP payload format; the string says how.
pub type PayloadError = String;

/// The codec-specific half of the receive path. H.264 keeps the last parameter sets so that an
/// IDR sent without them can still be decoded on its own (each segment starts with one).
#[derive(Debug, Clone)]
pub enum Depacketizer {
    Opus,
    Vp8,
    Vp9,
    H264(ParameterSets),
    Av1,
}

impl Depacketizer {
    pub fn new(codec: Codec) -> Self {
        match codec {
            Codec::Opus => Depacketizer::Opus,
            Codec::Vp8 => Depacketizer::Vp8,
            Codec::Vp9 => Depacketizer::Vp9,
            Codec::H264 => Depacketizer::H264(ParameterSets::default()),
            Codec::Av1 => Depacketizer::Av1,
        }
    }

    /// Checks one non-empty payload and reads its frame-boundary hints.
    pub fn inspect(&self, payload: &[u8]) -> Result<PacketInfo, PayloadError> {
        match self {
            Depacketizer::Opus => opus::inspect(payload),
            Depacketizer::Vp8 => vp8::inspect(payload),
            Depacketizer::Vp9 => vp9::inspect(payload),
            Depacketizer::H264(_) => h264::inspect(payload),
            Depacketizer::Av1 => av1::inspect(payload),
        }
    }

    /// Turns the payloads of one complete frame (in sequence order) into a frame.
    /// `Ok(None)` means the packets carried nothing to show (H.264 parameter sets only).
    pub fn assemble(&mut self, payloads: &[Bytes]) -> Result<Option<DepacketizedFrame>, PayloadError> {
        if payloads.is_empty() {
            return Err("no packets".into());
        }
        match self {
            Depacketizer::Opus => opus::assemble(payloads).map(Some),
            Depacketizer::Vp8 => vp8::assemble(payloads).map(Some),
            Depacketizer::Vp9 => vp9::assemble(payloads).map(Some),
            Depacketizer::H264(ps) => h264::assemble(ps, payloads),
            Depacketizer::Av1 => av1::assemble(payloads).map(Some),
        }
    }
}

/// Reads an unsigned LEB128 value (AV1 sizes); `None` if truncated or longer than 8 bytes.
pub(crate) fn read_leb128(data: &[u8]) -> Option<(u64, usize)> {
    let mut value = 0u64;
    for i in 0..8 {
        let b = *data.get(i)?;
        value |= ((b & 0x7f) as u64) << (7 * i);
        if b & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

pub(crate) fn write_leb128(out: &mut Vec<u8>, mut value: u64) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}
