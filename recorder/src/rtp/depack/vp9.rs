//! VP9 (RFC 9628, formerly draft-ietf-payload-vp9). Payload descriptor:
//!
//! ```text
//!  |I|P|L|F|B|E|V|Z|         P: inter-picture predicted; F: flexible mode;
//!  |M| PICTURE ID  |  (I)    B/E: beginning/end of a layer frame; V: scalability structure
//!  | PICTURE ID    |  (M)
//!  |  TID|U| SID|D|  (L)
//!  |   TL0PICIDX   |  (L, F=0)
//!  |  P_DIFF     |N|  (F, P; up to 3)
//!  |  SS ...       |  (V)
//! ```
//!
//! One RTP timestamp is one picture; with spatial scalability it holds one layer frame per
//! spatial layer. A single layer frame is the frame as is; several are packed into a VP9
//! superframe (frames + index), which is what a VP9 decoder and the WebM muxer expect.
//! A picture is a keyframe when its first (lowest) spatial layer frame is not inter-predicted.

use bytes::{Bytes, BytesMut};

use super::{DepacketizedFrame, PacketInfo, PayloadError};

#[derive(Debug)]
struct Descriptor {
    inter_predicted: bool,
    begin: bool,
    end: bool,
    spatial_id: Option<u8>,
    header_len: usize,
}

fn descriptor(p: &[u8]) -> Result<Descriptor, PayloadError> {
    let truncated = || format!("truncated VP9 payload descriptor ({} bytes)", p.len());
    let at = |i: usize| p.get(i).copied().ok_or_else(truncated);
    let b0 = at(0)?;
    let (i_bit, p_bit, l_bit, f_bit) = (b0 & 0x80 != 0, b0 & 0x40 != 0, b0 & 0x20 != 0, b0 & 0x10 != 0);
    let (b_bit, e_bit, v_bit) = (b0 & 0x08 != 0, b0 & 0x04 != 0, b0 & 0x02 != 0);
    let mut i = 1;
    if i_bit {
        i += if at(i)? & 0x80 != 0 { 2 } else { 1 };
    }
    let mut spatial_id = None;
    if l_bit {
        spatial_id = Some((at(i)? >> 1) & 0x07);
        i += 1;
        if !f_bit {
            at(i)?; // TL0PICIDX
            i += 1;
        }
    }
    if f_bit && p_bit {
        let mut diffs = 0;
        loop {
            let d = at(i)?;
            i += 1;
            diffs += 1;
            if d & 0x01 == 0 {
                break;
            }
            if diffs == 3 {
                return Err("VP9 descriptor with more than 3 reference indices".into());
            }
        }
    }
    if v_bit {
        let ss = at(i)?;
        i += 1;
        let n_s = ((ss >> 5) & 0x07) as usize + 1;
        if ss & 0x10 != 0 {
            i += 4 * n_s;
        }
        if ss & 0x08 != 0 {
            let n_g = at(i)? as usize;
            i += 1;
            for _ in 0..n_g {
                let r = ((at(i)? >> 2) & 0x03) as usize;
                i += 1 + r;
            }
        }
    }
    if i >= p.len() {
        return Err(format!("VP9 packet of {} bytes has no payload after its descriptor", p.len()));
    }
    Ok(Descriptor { inter_predicted: p_bit, begin: b_bit, end: e_bit, spatial_id, header_len: i })
}

pub fn inspect(payload: &[u8]) -> Result<PacketInfo, PayloadError> {
    let d = descriptor(payload)?;
    let first_layer = d.spatial_id.unwrap_or(0) == 0;
    Ok(PacketInfo { starts_frame: Some(d.begin && first_layer) })
}

pub fn assemble(payloads: &[Bytes]) -> Result<DepacketizedFrame, PayloadError> {
    let mut layers: Vec<BytesMut> = Vec::new();
    let mut open = false;
    let mut keyframe = false;
    for (n, p) in payloads.iter().enumerate() {
        let d = descriptor(p)?;
        if n == 0 {
            if !d.begin {
                return Err("VP9 picture does not begin with B=1".into());
            }
            // P=0 on the base layer; the frame header must agree where it can be read (some
            // packetizers, webrtc-rs's own among them, never set P).
            keyframe = !d.inter_predicted
                && d.spatial_id.unwrap_or(0) == 0
                && header_says_key(&p[d.header_len..]).unwrap_or(true);
        }
        if d.begin {
            // A missing E bit before the next B is tolerated: B is what delimits layer frames.
            layers.push(BytesMut::new());
            open = true;
        } else if !open {
            return Err("VP9 packet continues a layer frame that already ended (E=1)".into());
        }
        layers.last_mut().expect("a layer frame is open").extend_from_slice(&p[d.header_len..]);
        if d.end {
            open = false;
        }
    }
    let data = match layers.len() {
        1 => layers.pop().expect("one layer").freeze(),
        _ => superframe(&layers)?,
    };
    Ok(DepacketizedFrame { data, keyframe })
}

/// The VP9 uncompressed header's frame_type (0 = key frame), if the first byte shows it.
fn header_says_key(frame: &[u8]) -> Option<bool> {
    let b = *frame.first()?;
    if b >> 6 != 2 {
        return None; // not a frame marker
    }
    let profile = ((b >> 5) & 1) | (((b >> 4) & 1) << 1);
    let shift = if profile == 3 { 1 } else { 0 };
    let show_existing = (b >> (3 - shift)) & 1;
    if show_existing == 1 {
        return Some(false);
    }
    Some((b >> (2 - shift)) & 1 == 0)
}

/// Packs layer frames into a superframe (VP9 bitstream spec, Annex B): the frames, then an
/// index `110 mm fff`, `fff+1` little-endian sizes of `mm+1` bytes, and the marker byte again.
fn superframe(frames: &[BytesMut]) -> Result<Bytes, PayloadError> {
    if frames.len() > 8 {
        return Err(format!("VP9 picture with {} layer frames (a superframe holds 8)", frames.len()));
    }
    let largest = frames.iter().map(|f| f.len()).max().unwrap_or(0);
    let size_bytes = match largest {
        0..=0xff => 1,
        0x100..=0xffff => 2,
        0x1_0000..=0xff_ffff => 3,
        _ => 4,
    };
    let marker = 0xc0 | ((size_bytes as u8 - 1) << 3) | (frames.len() as u8 - 1);
    let mut out = BytesMut::with_capacity(frames.iter().map(|f| f.len()).sum::<usize>() + 2 + 4 * 8);
    for f in frames {
        out.extend_from_slice(f);
    }
    out.extend_from_slice(&[marker]);
    for f in frames {
        out.extend_from_slice(&(f.len() as u32).to_le_bytes()[..size_bytes]);
    }
    out.extend_from_slice(&[marker]);
    Ok(out.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flexible_descriptor_with_reference_indices() {
        // I (15-bit), P, L, F, B, E; TID/SID byte; two P_DIFFs.
        let p = [0xfc, 0x81, 0x02, 0x22, 0x03, 0x04, 0xaa];
        let d = descriptor(&p).unwrap();
        assert_eq!(d.header_len, 6);
        assert_eq!(d.spatial_id, Some(1));
        assert!(d.inter_predicted && d.begin && d.end);
        // Four P_DIFFs are not allowed.
        assert!(descriptor(&[0xdc, 0x01, 0x03, 0x03, 0x03, 0x02, 0xaa]).is_err());
    }

    #[test]
    fn scalability_structure_is_skipped() {
        // B, E, V; SS: N_S=1 (two layers), Y, G; sizes; N_G=1 with R=1.
        let mut p = vec![0x0e, 0x38];
        p.extend_from_slice(&[0x01, 0x40, 0x00, 0xb4, 0x02, 0x80, 0x01, 0x68]);
        p.extend_from_slice(&[0x01, 0x04, 0x01]);
        p.push(0x82); // payload
        let d = descriptor(&p).unwrap();
        assert_eq!(d.header_len, p.len() - 1);
        // Truncated inside the SS.
        assert!(descriptor(&p[..6]).is_err());
    }

    #[test]
    fn non_flexible_key_and_delta() {
        // I (7-bit), L + TL0PICIDX, B, E, not predicted, SID 0.
        let key = Bytes::from_static(&[0xac, 0x05, 0x00, 0x07, 0x82, 0x49]);
        let f = assemble(&[key]).unwrap();
        assert!(f.keyframe);
        assert_eq!(&f.data[..], &[0x82, 0x49]);
        let delta = Bytes::from_static(&[0xec, 0x06, 0x00, 0x07, 0x86]);
        assert!(!assemble(&[delta]).unwrap().keyframe);
    }

    #[test]
    fn two_spatial_layers_become_a_superframe() {
        let l0 = Bytes::from_static(&[0xac, 0x05, 0x00, 0x07, 1, 2, 3]); // SID 0, B, E
        let l1 = Bytes::from_static(&[0xac, 0x05, 0x02, 0x07, 4, 5]); // SID 1, B, E
        let f = assemble(&[l0, l1]).unwrap();
        assert!(f.keyframe);
        assert_eq!(&f.data[..], &[1, 2, 3, 4, 5, 0xc1, 3, 2, 0xc1]);
    }
}
