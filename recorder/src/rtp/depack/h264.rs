//! H.264 (RFC 6184, non-interleaved mode as WebRTC uses it): single NAL unit packets (types
//! 1–23), STAP-A aggregates (24) and FU-A fragments (28). STAP-B, MTAP and FU-B belong to the
//! interleaved mode and are rejected.
//!
//! Output is Annex B with 4-byte start codes. A frame is a keyframe when it holds an IDR slice;
//! the latest SPS/PPS are remembered and put in front of an IDR that arrives without them, so
//! every keyframe (and so every segment) can be decoded on its own.

use bytes::{Bytes, BytesMut};

use super::{DepacketizedFrame, PacketInfo, PayloadError};

const STAP_A: u8 = 24;
const FU_A: u8 = 28;
const IDR: u8 = 5;
const SPS: u8 = 7;
const PPS: u8 = 8;
const START_CODE: [u8; 4] = [0, 0, 0, 1];

/// The last sequence and picture parameter sets the sender sent.
#[derive(Debug, Clone, Default)]
pub struct ParameterSets {
    pub sps: Option<Bytes>,
    pub pps: Option<Bytes>,
}

fn nal_type(b: u8) -> u8 {
    b & 0x1f
}

fn check_nal_header(b: u8) -> Result<(), PayloadError> {
    if b & 0x80 != 0 {
        return Err("H.264 NAL unit header with the forbidden_zero_bit set".into());
    }
    Ok(())
}

/// Walks a STAP-A payload and returns where its NAL units are.
fn stap_a_units(p: &[u8]) -> Result<Vec<std::ops::Range<usize>>, PayloadError> {
    let mut units = Vec::new();
    let mut i = 1;
    while i < p.len() {
        if i + 2 > p.len() {
            return Err("STAP-A truncated inside a NAL unit size".into());
        }
        let size = u16::from_be_bytes([p[i], p[i + 1]]) as usize;
        i += 2;
        if size == 0 || i + size > p.len() {
            return Err(format!("STAP-A NAL unit of {size} bytes does not fit the {}-byte packet", p.len()));
        }
        check_nal_header(p[i])?;
        units.push(i..i + size);
        i += size;
    }
    if units.is_empty() {
        return Err("STAP-A without NAL units".into());
    }
    Ok(units)
}

/// Whether a NAL unit (by its header and first payload byte) begins a picture: an access unit
/// delimiter or SPS does; a slice does when `first_mb_in_slice` is 0 (its ue(v) code is the
/// single bit 1), and certainly does not otherwise. Losing what came before such a slice in the
/// same access unit (SEI, parameter sets) leaves a decodable picture.
fn nal_starts_picture(header: u8, first_payload_byte: Option<u8>) -> Option<bool> {
    match nal_type(header) {
        9 | SPS => Some(true),
        1 | IDR => first_payload_byte.map(|b| b & 0x80 != 0),
        _ => None,
    }
}

pub fn inspect(payload: &[u8]) -> Result<PacketInfo, PayloadError> {
    let b0 = *payload.first().ok_or("empty H.264 payload")?;
    check_nal_header(b0)?;
    match nal_type(b0) {
        1..=23 => Ok(PacketInfo { starts_frame: nal_starts_picture(b0, payload.get(1).copied()) }),
        STAP_A => {
            let units = stap_a_units(payload)?;
            let first = &payload[units[0].clone()];
            Ok(PacketInfo { starts_frame: nal_starts_picture(first[0], first.get(1).copied()) })
        }
        FU_A => {
            if payload.len() < 3 {
                return Err(format!("FU-A packet of {} bytes carries no fragment", payload.len()));
            }
            let start = payload[1] & 0x80 != 0;
            // A fragment that does not start its NAL unit cannot start the frame.
            let starts_frame = if start { nal_starts_picture(payload[1], Some(payload[2])) } else { Some(false) };
            Ok(PacketInfo { starts_frame })
        }
        t => Err(format!("H.264 packetization type {t} is not allowed in non-interleaved mode")),
    }
}

pub fn assemble(ps: &mut ParameterSets, payloads: &[Bytes]) -> Result<Option<DepacketizedFrame>, PayloadError> {
    let mut nals: Vec<Bytes> = Vec::new();
    let mut fragment: Option<BytesMut> = None;
    for p in payloads {
        inspect(p)?;
        match nal_type(p[0]) {
            STAP_A => {
                if fragment.is_some() {
                    return Err("STAP-A inside an unfinished FU-A".into());
                }
                nals.extend(stap_a_units(p)?.into_iter().map(|r| p.slice(r)));
            }
            FU_A => {
                let (start, end) = (p[1] & 0x80 != 0, p[1] & 0x40 != 0);
                if start {
                    if fragment.is_some() {
                        return Err("FU-A start inside an unfinished FU-A".into());
                    }
                    let mut nal = BytesMut::with_capacity(p.len() * 4);
                    nal.extend_from_slice(&[(p[0] & 0xe0) | (p[1] & 0x1f)]);
                    fragment = Some(nal);
                }
                let Some(nal) = fragment.as_mut() else {
                    return Err("FU-A fragment without its start (S=1) fragment".into());
                };
                nal.extend_from_slice(&p[2..]);
                if end {
                    nals.push(fragment.take().expect("fragment is open").freeze());
                }
            }
            _ => {
                if fragment.is_some() {
                    return Err("single NAL unit packet inside an unfinished FU-A".into());
                }
                nals.push(p.clone());
            }
        }
    }
    if fragment.is_some() {
        return Err("FU-A without its end (E=1) fragment".into());
    }

    let (mut has_sps, mut has_pps, mut has_idr, mut has_slice) = (false, false, false, false);
    for nal in &nals {
        match nal_type(nal[0]) {
            SPS => {
                has_sps = true;
                ps.sps = Some(nal.clone());
            }
            PPS => {
                has_pps = true;
                ps.pps = Some(nal.clone());
            }
            IDR => {
                has_idr = true;
                has_slice = true;
            }
            1..=4 => has_slice = true,
            _ => {}
        }
    }
    if !has_slice {
        return Ok(None);
    }
    let mut out = BytesMut::with_capacity(nals.iter().map(|n| n.len() + 4).sum::<usize>() + 64);
    if has_idr {
        // Parameter sets go before the first NAL of the access unit (after an AUD if any would
        // be nicer, but decoders and the muxer accept them first).
        if !has_sps {
            if let Some(sps) = &ps.sps {
                out.extend_from_slice(&START_CODE);
                out.extend_from_slice(sps);
            }
        }
        if !has_pps {
            if let Some(pps) = &ps.pps {
                out.extend_from_slice(&START_CODE);
                out.extend_from_slice(pps);
            }
        }
    }
    for nal in &nals {
        out.extend_from_slice(&START_CODE);
        out.extend_from_slice(nal);
    }
    Ok(Some(DepacketizedFrame { data: out.freeze(), keyframe: has_idr }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(v: &[u8]) -> Bytes {
        Bytes::copy_from_slice(v)
    }

    const SPS_NAL: &[u8] = &[0x67, 0x42, 0xc0, 0x1f, 0xda];
    const PPS_NAL: &[u8] = &[0x68, 0xce, 0x3c, 0x80];

    #[test]
    fn stap_a_parameter_sets_then_fu_a_idr_gives_annex_b() {
        let mut stap = vec![0x78];
        for n in [SPS_NAL, PPS_NAL] {
            stap.extend_from_slice(&(n.len() as u16).to_be_bytes());
            stap.extend_from_slice(n);
        }
        let idr: Vec<u8> = std::iter::once(0x65).chain((0..50u8).map(|i| i.wrapping_mul(7))).collect();
        let fu1: Vec<u8> = [0x7c, 0x80 | 5].iter().chain(&idr[1..20]).copied().collect();
        let fu2: Vec<u8> = [0x7c, 5].iter().chain(&idr[20..40]).copied().collect();
        let fu3: Vec<u8> = [0x7c, 0x40 | 5].iter().chain(&idr[40..]).copied().collect();
        let mut ps = ParameterSets::default();
        let f = assemble(&mut ps, &[b(&stap), b(&fu1), b(&fu2), b(&fu3)]).unwrap().unwrap();
        assert!(f.keyframe);
        let mut want = Vec::new();
        for n in [SPS_NAL, PPS_NAL, &idr[..]] {
            want.extend_from_slice(&START_CODE);
            want.extend_from_slice(n);
        }
        assert_eq!(&f.data[..], &want[..]);

        // The next IDR comes alone: the remembered parameter sets are put in front.
        let f2 = assemble(&mut ps, &[b(&idr)]).unwrap().unwrap();
        assert_eq!(&f2.data[..], &want[..]);
        // A P slice gets nothing extra.
        let f3 = assemble(&mut ps, &[b(&[0x41, 0x9a, 0x01])]).unwrap().unwrap();
        assert!(!f3.keyframe);
        assert_eq!(&f3.data[..], &[0, 0, 0, 1, 0x41, 0x9a, 0x01]);
    }

    #[test]
    fn parameter_sets_alone_are_remembered_not_emitted() {
        let mut ps = ParameterSets::default();
        assert_eq!(assemble(&mut ps, &[b(SPS_NAL), b(PPS_NAL)]).unwrap(), None);
        let f = assemble(&mut ps, &[b(&[0x65, 0x88, 0x84])]).unwrap().unwrap();
        assert!(f.keyframe);
        assert!(f.data.starts_with(&[0, 0, 0, 1, 0x67]));
    }

    #[test]
    fn malformed() {
        let mut ps = ParameterSets::default();
        // FU-A middle and end without a start.
        let err = assemble(&mut ps, &[b(&[0x7c, 0x05, 1, 2]), b(&[0x7c, 0x45, 3])]).unwrap_err();
        assert!(err.contains("without its start"), "{err}");
        // FU-A start without an end.
        assert!(assemble(&mut ps, &[b(&[0x7c, 0x85, 1, 2])]).is_err());
        // Inspect-level rejections.
        assert!(inspect(&[0x7c, 0x85]).is_err()); // no fragment bytes
        assert!(inspect(&[0x78, 0x00]).is_err()); // STAP-A truncated size
        assert!(inspect(&[0x78, 0x00, 0x09, 0x67]).is_err()); // STAP-A unit overruns
        assert!(inspect(&[0x78, 0x00, 0x00]).is_err()); // zero-size unit
        assert!(inspect(&[0x79, 0x00]).is_err()); // STAP-B
        assert!(inspect(&[0x7d, 0x85, 0x01]).is_err()); // FU-B
        assert!(inspect(&[0xe5, 0x00]).is_err()); // forbidden bit
        assert!(inspect(&[]).is_err());
        assert_eq!(inspect(&[0x7c, 0x05, 1]).unwrap().starts_frame, Some(false));
    }
}
