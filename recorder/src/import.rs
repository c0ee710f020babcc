//! The file adapter: reads media files and hands their encoded frames to the recording pipeline as
//! if they had arrived from a call, codec copy, on the recording clock.
//!
//! It exists so the whole path after "frames on a wall clock" (segment writer, spool, upload,
//! catalog, manifest, composite) can be driven without a homeserver: `make demo` uses it, and so
//! can anyone who wants an archive of media recorded elsewhere. Only the codecs a WebRTC call
//! carries are accepted (Opus, VP8, VP9, H.264, AV1); H.264 stored in MP4/Matroska form (length
//! prefixed NAL units, parameter sets in `avcC`) is turned into the Annex B form WebRTC gives.

use std::path::Path;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use ffmpeg_next as ffmpeg;
use transcoder::{Codec, EncodedFrame, MediaKind};

/// One elementary stream found in an input file.
#[derive(Debug, Clone)]
pub struct InputStream {
    pub index: usize,
    pub codec: Codec,
    pub kind: MediaKind,
}

/// A frame read from an input file, with its stream and pts in µs from the file's start.
pub struct InputFrame {
    pub stream: usize,
    pub frame: EncodedFrame,
}

/// Demuxes one file, stream by stream, in file order.
pub struct MediaFile {
    input: ffmpeg::format::context::Input,
    streams: Vec<InputStream>,
    h264: std::collections::HashMap<usize, AvcConfig>,
    /// The file's time origin: the earliest stream start, so no stream gets negative times.
    origin_us: Option<i64>,
    /// Packets that could not be turned into a frame (skipped, counted, logged).
    pub bad_packets: u64,
}

fn codec_of(id: ffmpeg::codec::Id) -> Option<Codec> {
    use ffmpeg::codec::Id;
    Some(match id {
        Id::OPUS => Codec::Opus,
        Id::VP8 => Codec::Vp8,
        Id::VP9 => Codec::Vp9,
        Id::H264 => Codec::H264,
        Id::AV1 => Codec::Av1,
        _ => return None,
    })
}

impl MediaFile {
    pub fn open(path: &Path) -> Result<Self> {
        ffmpeg::init().context("initialising FFmpeg")?;
        let input = ffmpeg::format::input(&path)
            .with_context(|| format!("opening media file {}", path.display()))?;
        let mut streams = Vec::new();
        let mut h264 = std::collections::HashMap::new();
        for s in input.streams() {
            let par = s.parameters();
            let Some(codec) = codec_of(par.id()) else {
                bail!(
                    "{}: stream {} has codec {:?}; a call carries only Opus, VP8, VP9, H.264 or AV1",
                    path.display(),
                    s.index(),
                    par.id()
                );
            };
            if codec == Codec::H264 {
                // SAFETY: extradata pointer/size come from libavformat and live as long as `input`.
                let extra = unsafe {
                    let p = *par.as_ptr();
                    if p.extradata.is_null() || p.extradata_size <= 0 {
                        &[][..]
                    } else {
                        std::slice::from_raw_parts(p.extradata, p.extradata_size as usize)
                    }
                };
                if let Some(cfg) = AvcConfig::parse(extra) {
                    h264.insert(s.index(), cfg);
                }
            }
            streams.push(InputStream { index: s.index(), codec, kind: codec.kind() });
        }
        if streams.is_empty() {
            bail!("{} has no audio or video stream", path.display());
        }
        let origin_us = input
            .streams()
            .filter(|s| s.start_time() != ffmpeg::ffi::AV_NOPTS_VALUE)
            .filter_map(|s| to_us(s.start_time(), s.time_base()))
            .min();
        Ok(Self { input, streams, h264, origin_us, bad_packets: 0 })
    }

    pub fn streams(&self) -> &[InputStream] {
        &self.streams
    }

    /// The next frame, or None at the end of the file.
    pub fn next_frame(&mut self) -> Result<Option<InputFrame>> {
        loop {
            let mut packet = ffmpeg::Packet::empty();
            match packet.read(&mut self.input) {
                Ok(()) => {}
                Err(ffmpeg::Error::Eof) => return Ok(None),
                Err(e) => return Err(e).context("reading a packet"),
            }
            let idx = packet.stream();
            let Some(stream) = self.input.stream(idx) else { continue };
            let Some(ts) = packet.pts().or(packet.dts()) else { continue };
            let Some(pts_us) = to_us(ts, stream.time_base()) else {
                self.bad_packet(idx, "a timestamp out of range");
                continue;
            };
            let origin = *self.origin_us.get_or_insert(pts_us);
            let Some(raw) = packet.data() else { continue };
            let keyframe = packet.is_key();
            let data = match self.h264.get(&idx) {
                Some(cfg) => match cfg.to_annex_b(raw, keyframe) {
                    Ok(d) => Bytes::from(d),
                    Err(e) => {
                        self.bad_packet(idx, &e.to_string());
                        continue;
                    }
                },
                None => Bytes::copy_from_slice(raw),
            };
            return Ok(Some(InputFrame {
                stream: idx,
                frame: EncodedFrame { data, pts_us: (pts_us - origin).max(0), keyframe },
            }));
        }
    }
}

impl MediaFile {
    fn bad_packet(&mut self, stream: usize, why: &str) {
        self.bad_packets += 1;
        if self.bad_packets <= 5 || self.bad_packets.is_power_of_two() {
            tracing::warn!(stream, bad_packets = self.bad_packets, "skipping a packet with {why}");
        }
    }
}

/// A timestamp in `tb` units as µs, or None when it does not fit (a crafted file).
fn to_us(ts: i64, tb: ffmpeg::Rational) -> Option<i64> {
    let den = i128::from(tb.denominator());
    if den == 0 {
        return None;
    }
    i64::try_from(i128::from(ts) * 1_000_000 * i128::from(tb.numerator()) / den).ok()
}

/// The parts of an `avcC` record needed to rebuild Annex B access units.
#[derive(Debug, Clone)]
struct AvcConfig {
    nal_length_size: usize,
    parameter_sets: Vec<Vec<u8>>,
}

impl AvcConfig {
    /// Parses ISO/IEC 14496-15 `AVCDecoderConfigurationRecord`; None when the extradata is already
    /// Annex B (starts with a start code) or absent.
    fn parse(b: &[u8]) -> Option<Self> {
        if b.len() < 7 || b[0] != 1 {
            return None;
        }
        let nal_length_size = usize::from(b[4] & 0x03) + 1;
        let mut sets = Vec::new();
        let mut pos = 5;
        let n_sps = usize::from(*b.get(pos)? & 0x1f);
        pos += 1;
        for _ in 0..n_sps {
            let len = usize::from(u16::from_be_bytes([*b.get(pos)?, *b.get(pos + 1)?]));
            sets.push(b.get(pos + 2..pos + 2 + len)?.to_vec());
            pos += 2 + len;
        }
        let n_pps = usize::from(*b.get(pos)?);
        pos += 1;
        for _ in 0..n_pps {
            let len = usize::from(u16::from_be_bytes([*b.get(pos)?, *b.get(pos + 1)?]));
            sets.push(b.get(pos + 2..pos + 2 + len)?.to_vec());
            pos += 2 + len;
        }
        Some(Self { nal_length_size, parameter_sets: sets })
    }

    /// Length-prefixed NAL units → start-code-prefixed, with the parameter sets in front of every
    /// keyframe (as a WebRTC sender puts them) so each segment can start decoding on its own.
    fn to_annex_b(&self, data: &[u8], keyframe: bool) -> Result<Vec<u8>> {
        const START: [u8; 4] = [0, 0, 0, 1];
        let mut out = Vec::with_capacity(data.len() + 64);
        if keyframe {
            for ps in &self.parameter_sets {
                out.extend_from_slice(&START);
                out.extend_from_slice(ps);
            }
        }
        let mut pos = 0;
        while pos < data.len() {
            let n = self.nal_length_size;
            let Some(len_bytes) = data.get(pos..pos + n) else {
                bail!("truncated H.264 NAL length at byte {pos}");
            };
            let len = len_bytes.iter().fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
            let Some(nal) = data.get(pos + n..pos + n + len) else {
                bail!("H.264 NAL of {len} bytes overruns its packet at byte {pos}");
            };
            out.extend_from_slice(&START);
            out.extend_from_slice(nal);
            pos += n + len;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn avcc() -> Vec<u8> {
        // version 1, profile/compat/level, 4-byte lengths, 1 SPS [0x67,0xaa], 1 PPS [0x68,0xbb]
        vec![1, 0x42, 0, 0x1e, 0xff, 0xe1, 0, 2, 0x67, 0xaa, 1, 0, 2, 0x68, 0xbb]
    }

    #[test]
    fn avcc_is_parsed_and_keyframes_get_parameter_sets() {
        let cfg = AvcConfig::parse(&avcc()).unwrap();
        assert_eq!(cfg.nal_length_size, 4);
        let pkt = [0, 0, 0, 3, 0x65, 1, 2, 0, 0, 0, 1, 0x06];
        let out = cfg.to_annex_b(&pkt, true).unwrap();
        assert_eq!(
            out,
            [0, 0, 0, 1, 0x67, 0xaa, 0, 0, 0, 1, 0x68, 0xbb, 0, 0, 0, 1, 0x65, 1, 2, 0, 0, 0, 1, 0x06]
        );
        let out = cfg.to_annex_b(&pkt, false).unwrap();
        assert_eq!(out, [0, 0, 0, 1, 0x65, 1, 2, 0, 0, 0, 1, 0x06]);
    }

    #[test]
    fn timestamps_convert_without_overflow() {
        let tb = ffmpeg::Rational::new(1, 90_000);
        assert_eq!(to_us(90_000, tb), Some(1_000_000));
        assert_eq!(to_us(i64::MAX, ffmpeg::Rational::new(1, 1)), None);
        assert_eq!(to_us(5, ffmpeg::Rational::new(1, 0)), None);
    }

    #[test]
    fn truncated_packets_and_annex_b_extradata_are_refused() {
        let cfg = AvcConfig::parse(&avcc()).unwrap();
        assert!(cfg.to_annex_b(&[0, 0, 0, 9, 0x65], false).is_err());
        assert!(cfg.to_annex_b(&[0, 0], false).is_err());
        assert!(AvcConfig::parse(&[0, 0, 0, 1, 0x67]).is_none());
        assert!(AvcConfig::parse(&[1, 2, 3]).is_none());
    }
}
