//! Just enough bitstream parsing to write codec-copy segments: is this frame a keyframe, what
//! are its dimensions, which parameter sets does the container need as extradata. Each parser
//! also rejects frames that cannot be what they claim to be (truncated, wrong framing), so a
//! garbage frame is refused before it reaches a segment.

use crate::Codec;

/// What the writer needs from one frame of a given codec.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct FrameFacts {
    /// A frame a decoder can start from (VP8/VP9 key frame, H.264 IDR; AV1: the caller's flag
    /// plus a sequence header).
    pub keyframe: bool,
    /// Dimensions, when the frame header states them (VP8/VP9 key frames).
    pub size: Option<(u32, u32)>,
    /// H.264 SPS/PPS NAL units (without start codes) carried in this frame.
    pub sps: Vec<Vec<u8>>,
    pub pps: Vec<Vec<u8>>,
    /// AV1 sequence header OBU (header, size field and payload) carried in this frame.
    pub av1_sequence_header: Option<Vec<u8>>,
    /// Audio: duration of the frame in microseconds.
    pub duration_us: Option<i64>,
}

pub(crate) type ParseResult = Result<FrameFacts, String>;

/// Reads one frame of `codec`; `keyframe` is the sender's flag, which only AV1 needs.
pub(crate) fn parse(codec: Codec, data: &[u8], keyframe: bool) -> ParseResult {
    match codec {
        Codec::Opus => opus(data),
        Codec::Vp8 => vp8(data),
        Codec::Vp9 => vp9(data),
        Codec::H264 => h264(data),
        Codec::Av1 => av1(data, keyframe),
    }
}

pub(crate) fn vp8(data: &[u8]) -> ParseResult {
    if data.len() < 3 {
        return Err(format!(
            "{} bytes is shorter than a VP8 frame tag",
            data.len()
        ));
    }
    let keyframe = data[0] & 1 == 0;
    let first_part =
        ((data[0] as usize) >> 5) | ((data[1] as usize) << 3) | ((data[2] as usize) << 11);
    let header = if keyframe { 10 } else { 3 };
    if data.len() < header || first_part > data.len() - header {
        return Err(format!(
            "truncated VP8 frame: first partition of {first_part} bytes in a {}-byte frame",
            data.len()
        ));
    }
    let mut facts = FrameFacts {
        keyframe,
        ..Default::default()
    };
    if keyframe {
        if data[3..6] != [0x9d, 0x01, 0x2a] {
            return Err("VP8 key frame without the start code 9d 01 2a".into());
        }
        let w = u16::from_le_bytes([data[6], data[7]]) & 0x3fff;
        let h = u16::from_le_bytes([data[8], data[9]]) & 0x3fff;
        if w == 0 || h == 0 {
            return Err("VP8 key frame with a zero dimension".into());
        }
        facts.size = Some((w as u32, h as u32));
    }
    Ok(facts)
}

pub(crate) fn vp9(data: &[u8]) -> ParseResult {
    let mut r = BitReader::new(data);
    let err = || "truncated VP9 frame header".to_string();
    if r.bits(2).ok_or_else(err)? != 2 {
        return Err("not a VP9 frame (bad frame marker)".into());
    }
    let low = r.bits(1).ok_or_else(err)?;
    let high = r.bits(1).ok_or_else(err)?;
    let profile = (high << 1) | low;
    if profile == 3 {
        r.bits(1).ok_or_else(err)?;
    }
    if r.bits(1).ok_or_else(err)? == 1 {
        // show_existing_frame: a one-byte "show that earlier frame" command.
        return Ok(FrameFacts::default());
    }
    let keyframe = r.bits(1).ok_or_else(err)? == 0;
    r.bits(2).ok_or_else(err)?; // show_frame, error_resilient_mode
    let mut facts = FrameFacts {
        keyframe,
        ..Default::default()
    };
    if keyframe {
        if r.bits(24).ok_or_else(err)? != 0x49_83_42 {
            return Err("VP9 key frame without its sync code".into());
        }
        if profile >= 2 {
            r.bits(1).ok_or_else(err)?;
        }
        let color_space = r.bits(3).ok_or_else(err)?;
        if color_space != 7 {
            r.bits(1).ok_or_else(err)?;
            if profile == 1 || profile == 3 {
                r.bits(3).ok_or_else(err)?;
            }
        } else if profile == 1 || profile == 3 {
            r.bits(1).ok_or_else(err)?;
        }
        let w = r.bits(16).ok_or_else(err)? + 1;
        let h = r.bits(16).ok_or_else(err)? + 1;
        facts.size = Some((w, h));
    }
    Ok(facts)
}

/// Splits an Annex B byte stream into NAL units (without start codes).
pub(crate) fn annexb_nals(data: &[u8]) -> Result<Vec<&[u8]>, String> {
    let starts_with_code = data.starts_with(&[0, 0, 1]) || data.starts_with(&[0, 0, 0, 1]);
    if !starts_with_code {
        return Err("H.264 frame is not Annex B (no leading start code)".into());
    }
    let mut nals = Vec::new();
    let mut i = 0;
    let mut nal_start: Option<usize> = None;
    while i + 3 <= data.len() {
        if data[i] == 0 && data[i + 1] == 0 && data[i + 2] == 1 {
            if let Some(s) = nal_start {
                nals.push(trim_trailing_zeros(&data[s..i]));
            }
            i += 3;
            nal_start = Some(i);
        } else {
            i += 1;
        }
    }
    if let Some(s) = nal_start {
        nals.push(&data[s..]);
    }
    Ok(nals)
}

fn trim_trailing_zeros(nal: &[u8]) -> &[u8] {
    let mut end = nal.len();
    while end > 0 && nal[end - 1] == 0 {
        end -= 1;
    }
    &nal[..end]
}

pub(crate) fn h264(data: &[u8]) -> ParseResult {
    let nals = annexb_nals(data)?;
    let mut facts = FrameFacts::default();
    let mut has_slice = false;
    for nal in nals {
        let Some(&hdr) = nal.first() else {
            return Err("empty H.264 NAL unit".into());
        };
        if hdr & 0x80 != 0 {
            return Err("H.264 NAL unit with the forbidden bit set".into());
        }
        match hdr & 0x1f {
            1 => has_slice = true,
            5 => {
                has_slice = true;
                facts.keyframe = true;
            }
            7 => {
                if nal.len() < 4 {
                    return Err("truncated H.264 SPS".into());
                }
                facts.sps.push(nal.to_vec());
            }
            8 => {
                if nal.len() < 2 {
                    return Err("truncated H.264 PPS".into());
                }
                facts.pps.push(nal.to_vec());
            }
            _ => {}
        }
    }
    if !has_slice {
        return Err("H.264 frame without a coded slice".into());
    }
    Ok(facts)
}

/// Walks the OBUs of an AV1 temporal unit (low-overhead format: every OBU has a size field,
/// except that the last one may run to the end of the buffer).
pub(crate) fn av1(data: &[u8], keyframe_flag: bool) -> ParseResult {
    let mut facts = FrameFacts::default();
    let mut pos = 0;
    let mut has_frame = false;
    while pos < data.len() {
        let start = pos;
        let hdr = data[pos];
        if hdr & 0x80 != 0 {
            return Err("AV1 OBU with the forbidden bit set".into());
        }
        let obu_type = (hdr >> 3) & 0x0f;
        let has_ext = hdr & 0x04 != 0;
        let has_size = hdr & 0x02 != 0;
        pos += 1 + has_ext as usize;
        if pos > data.len() {
            return Err("truncated AV1 OBU header".into());
        }
        let size = if has_size {
            let (v, n) = leb128(&data[pos..]).ok_or("truncated AV1 OBU size field")?;
            pos += n;
            v as usize
        } else {
            data.len() - pos
        };
        if size > data.len() - pos {
            return Err(format!(
                "truncated AV1 OBU: {size} bytes announced, {} left",
                data.len() - pos
            ));
        }
        pos += size;
        match obu_type {
            1 => {
                if !has_size {
                    return Err("AV1 sequence header without a size field".into());
                }
                facts.av1_sequence_header = Some(data[start..pos].to_vec());
            }
            3 | 4 | 6 => has_frame = true,
            _ => {}
        }
    }
    if !has_frame {
        return Err("AV1 temporal unit without a frame or tile group OBU".into());
    }
    facts.keyframe = keyframe_flag;
    Ok(facts)
}

fn leb128(data: &[u8]) -> Option<(u64, usize)> {
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

/// Opus frames carry their duration in the TOC byte (RFC 6716 §3.1).
pub(crate) fn opus(data: &[u8]) -> ParseResult {
    let Some(&toc) = data.first() else {
        return Err("empty Opus packet".into());
    };
    let config = toc >> 3;
    let frame_us: i64 = match config {
        0..=11 => [10_000, 20_000, 40_000, 60_000][(config % 4) as usize],
        12..=15 => [10_000, 20_000][(config % 2) as usize],
        _ => [2_500, 5_000, 10_000, 20_000][(config % 4) as usize],
    };
    let frames = match toc & 3 {
        0 => 1,
        1 | 2 => 2,
        _ => {
            let Some(&count) = data.get(1) else {
                return Err("truncated Opus packet: code 3 without a frame count".into());
            };
            let n = (count & 0x3f) as i64;
            if n == 0 {
                return Err("Opus packet with zero frames".into());
            }
            n
        }
    };
    let duration = frame_us * frames;
    if duration > 120_000 {
        return Err(format!(
            "Opus packet of {duration} us exceeds the 120 ms maximum"
        ));
    }
    Ok(FrameFacts {
        keyframe: true,
        duration_us: Some(duration),
        ..Default::default()
    })
}

/// The `OpusHead` Matroska wants as CodecPrivate. Pre-skip is 0: a WebRTC stream has no
/// encoder priming at the start of a segment, and a non-zero value would make every segment
/// drop its first few milliseconds when played.
pub(crate) fn opus_head(channels: u16, sample_rate: u32) -> Vec<u8> {
    let mut v = b"OpusHead".to_vec();
    v.push(1);
    v.push(channels as u8);
    v.extend_from_slice(&0u16.to_le_bytes());
    v.extend_from_slice(&sample_rate.to_le_bytes());
    v.extend_from_slice(&0i16.to_le_bytes());
    v.push(0);
    v
}

pub(crate) struct BitReader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> BitReader<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { data, pos: 0 }
    }

    pub fn bits(&mut self, n: u32) -> Option<u32> {
        let mut v = 0u32;
        for _ in 0..n {
            let byte = *self.data.get(self.pos / 8)?;
            let bit = (byte >> (7 - (self.pos % 8))) & 1;
            v = (v << 1) | bit as u32;
            self.pos += 1;
        }
        Some(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opus_toc_durations() {
        // config 31 (CELT FB 20 ms), code 0
        assert_eq!(opus(&[31 << 3, 0]).unwrap().duration_us, Some(20_000));
        // config 1 (SILK NB 20 ms), code 1: two frames
        assert_eq!(opus(&[(1 << 3) | 1]).unwrap().duration_us, Some(40_000));
        // code 3 with 3 frames of 20 ms
        assert_eq!(opus(&[(31 << 3) | 3, 3]).unwrap().duration_us, Some(60_000));
        assert!(opus(&[]).is_err());
        assert!(opus(&[(31 << 3) | 3]).is_err());
    }

    #[test]
    fn vp8_keyframe_header() {
        let mut f = vec![0u8; 32];
        // key frame, first partition 1 byte
        f[0] = 0x10;
        f[3..6].copy_from_slice(&[0x9d, 0x01, 0x2a]);
        f[6..8].copy_from_slice(&640u16.to_le_bytes());
        f[8..10].copy_from_slice(&360u16.to_le_bytes());
        let facts = vp8(&f).unwrap();
        assert!(facts.keyframe);
        assert_eq!(facts.size, Some((640, 360)));
        f[3] = 0;
        assert!(vp8(&f).is_err());
        assert!(vp8(&[0x10]).is_err());
    }

    #[test]
    fn annexb_split() {
        let data = [
            0, 0, 0, 1, 0x67, 1, 2, 3, 0, 0, 1, 0x68, 4, 0, 0, 1, 0x65, 9, 9,
        ];
        let nals = annexb_nals(&data).unwrap();
        assert_eq!(
            nals,
            vec![&[0x67, 1, 2, 3][..], &[0x68, 4][..], &[0x65, 9, 9][..]]
        );
        let facts = h264(&data).unwrap();
        assert!(facts.keyframe);
        assert_eq!(facts.sps.len(), 1);
        assert_eq!(facts.pps.len(), 1);
        assert!(h264(&[0x65, 1, 2]).is_err());
        assert!(h264(&[0, 0, 1, 0x67, 1, 2, 3]).is_err(), "no slice");
    }

    #[test]
    fn av1_obus() {
        // temporal delimiter, sequence header (2 bytes payload), frame (3 bytes)
        let tu = [0x12, 0x00, 0x0a, 0x02, 0xaa, 0xbb, 0x32, 0x03, 1, 2, 3];
        let facts = av1(&tu, true).unwrap();
        assert!(facts.keyframe);
        assert_eq!(
            facts.av1_sequence_header.as_deref(),
            Some(&[0x0a, 0x02, 0xaa, 0xbb][..])
        );
        assert!(av1(&tu[..9], true).is_err(), "truncated frame OBU");
        assert!(av1(&[0x12, 0x00], false).is_err(), "no frame");
    }
}
