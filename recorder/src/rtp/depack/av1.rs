//! AV1 (the AOMedia "RTP Payload Format for AV1"). Each packet has a one-byte aggregation header
//!
//! ```text
//!  |Z|Y| W |N|-|-|-|   Z: the first OBU element continues the previous packet's last one
//!                      Y: the last OBU element continues in the next packet
//!                      W: number of OBU elements (0: every element has a LEB128 length;
//!                         1–3: all but the last have one)
//!                      N: first packet of a coded video sequence
//! ```
//!
//! followed by OBU elements. OBUs travel without size fields; the Matroska/WebM muxer wants the
//! low-overhead format, so every OBU is rebuilt with `obu_has_size_field` = 1. Temporal
//! delimiters and tile lists, which must not be stored, are dropped. N=1 starts a new coded
//! video sequence, so it marks a keyframe.

use bytes::Bytes;

use super::{read_leb128, write_leb128, DepacketizedFrame, PacketInfo, PayloadError};

const OBU_TEMPORAL_DELIMITER: u8 = 2;
const OBU_TILE_LIST: u8 = 8;

struct Aggregation<'a> {
    z: bool,
    y: bool,
    n: bool,
    elements: Vec<&'a [u8]>,
}

fn parse(p: &[u8]) -> Result<Aggregation<'_>, PayloadError> {
    let h = *p.first().ok_or("empty AV1 payload")?;
    let (z, y, w, n) = (h & 0x80 != 0, h & 0x40 != 0, (h >> 4) & 0x03, h & 0x08 != 0);
    if z && n {
        return Err("AV1 aggregation header with both Z and N set".into());
    }
    let mut elements = Vec::new();
    let mut i = 1;
    while i < p.len() {
        let last_without_length = w != 0 && elements.len() + 1 == w as usize;
        let len = if last_without_length {
            p.len() - i
        } else {
            let (len, n) = read_leb128(&p[i..]).ok_or("truncated AV1 OBU element length")?;
            i += n;
            if len as usize > p.len() - i {
                return Err(format!("AV1 OBU element of {len} bytes does not fit the {}-byte packet", p.len()));
            }
            len as usize
        };
        if len == 0 {
            return Err("empty AV1 OBU element".into());
        }
        elements.push(&p[i..i + len]);
        i += len;
        if last_without_length {
            break;
        }
    }
    if elements.is_empty() {
        return Err("AV1 packet without OBU elements".into());
    }
    if w != 0 && elements.len() != w as usize {
        return Err(format!("AV1 aggregation header announces {w} OBU elements, packet holds {}", elements.len()));
    }
    Ok(Aggregation { z, y, n, elements })
}

pub fn inspect(payload: &[u8]) -> Result<PacketInfo, PayloadError> {
    let a = parse(payload)?;
    let starts_frame = if a.z {
        Some(false)
    } else if a.n {
        Some(true)
    } else {
        None
    };
    Ok(PacketInfo { starts_frame })
}

pub fn assemble(payloads: &[Bytes]) -> Result<DepacketizedFrame, PayloadError> {
    let mut out = Vec::with_capacity(payloads.iter().map(|p| p.len()).sum::<usize>() + 16);
    let mut open: Option<Vec<u8>> = None;
    let mut keyframe = false;
    for (pn, p) in payloads.iter().enumerate() {
        let a = parse(p)?;
        if pn == 0 {
            keyframe = a.n;
        }
        if a.z != open.is_some() {
            return Err(if a.z {
                "AV1 packet continues an OBU fragment that was not started".into()
            } else {
                "AV1 OBU fragment not continued by the next packet".into()
            });
        }
        let count = a.elements.len();
        for (en, el) in a.elements.into_iter().enumerate() {
            let mut obu = if en == 0 && a.z { open.take().expect("checked above") } else { Vec::new() };
            obu.extend_from_slice(el);
            if en + 1 == count && a.y {
                open = Some(obu);
            } else {
                push_obu(&mut out, &obu)?;
            }
        }
    }
    if open.is_some() {
        return Err("AV1 frame ends inside a fragmented OBU (Y=1 on its last packet)".into());
    }
    if out.is_empty() {
        return Err("AV1 temporal unit without OBUs to store".into());
    }
    Ok(DepacketizedFrame { data: Bytes::from(out), keyframe })
}

/// Appends one OBU in low-overhead format (header, LEB128 size, payload).
fn push_obu(out: &mut Vec<u8>, obu: &[u8]) -> Result<(), PayloadError> {
    let h = obu[0];
    if h & 0x80 != 0 {
        return Err("AV1 OBU header with the forbidden bit set".into());
    }
    let obu_type = (h >> 3) & 0x0f;
    let header_len = 1 + ((h & 0x04 != 0) as usize);
    if obu.len() < header_len {
        return Err("truncated AV1 OBU extension header".into());
    }
    let payload = if h & 0x02 != 0 {
        // The sender kept the size field; trust it only if it fits.
        let (size, n) = read_leb128(&obu[header_len..]).ok_or("truncated AV1 OBU size field")?;
        let start = header_len + n;
        if size as usize > obu.len() - start {
            return Err(format!("AV1 OBU announces {size} bytes, {} present", obu.len() - start));
        }
        &obu[start..start + size as usize]
    } else {
        &obu[header_len..]
    };
    if matches!(obu_type, OBU_TEMPORAL_DELIMITER | OBU_TILE_LIST) {
        return Ok(());
    }
    out.push(h | 0x02);
    out.extend_from_slice(&obu[1..header_len]);
    write_leb128(out, payload.len() as u64);
    out.extend_from_slice(payload);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// OBU as carried in RTP: header without size field, payload.
    fn obu(obu_type: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![obu_type << 3];
        v.extend_from_slice(payload);
        v
    }
    fn sized(obu_type: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![(obu_type << 3) | 0x02];
        write_leb128(&mut v, payload.len() as u64);
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn w_field_n_bit_and_fragmentation() {
        let seq_hdr: Vec<u8> = (0..12u8).collect();
        let frame: Vec<u8> = (0..200u8).collect();
        let td = obu(OBU_TEMPORAL_DELIMITER, &[]);
        // Packet 1: N=1, W=3: TD (len), sequence header (len), first part of the frame OBU
        // (last element, no length), Y=1.
        let mut p1 = vec![0x40 | 0x30 | 0x08];
        let f = obu(6, &frame);
        for el in [&td[..], &obu(1, &seq_hdr)[..]] {
            write_leb128(&mut p1, el.len() as u64);
            p1.extend_from_slice(el);
        }
        p1.extend_from_slice(&f[..100]);
        // Packet 2: Z=1, W=0 (every element with a length): rest of the frame OBU.
        let mut p2 = vec![0x80];
        write_leb128(&mut p2, (f.len() - 100) as u64);
        p2.extend_from_slice(&f[100..]);
        let got = assemble(&[Bytes::from(p1.clone()), Bytes::from(p2.clone())]).unwrap();
        assert!(got.keyframe);
        let mut want = sized(1, &seq_hdr);
        want.extend(sized(6, &frame));
        assert_eq!(&got.data[..], &want[..]);
        assert_eq!(inspect(&p1).unwrap().starts_frame, Some(true));
        assert_eq!(inspect(&p2).unwrap().starts_frame, Some(false));

        // Without N it is a delta frame; the sender's own size field is accepted too.
        let mut p = vec![0x10];
        p.extend(sized(6, &[9, 9, 9]));
        let got = assemble(&[Bytes::from(p)]).unwrap();
        assert!(!got.keyframe);
        assert_eq!(&got.data[..], &sized(6, &[9, 9, 9])[..]);

        // Missing continuation: packet 1 alone, or packet 2 alone.
        assert!(assemble(&[Bytes::from(p1)]).is_err());
        assert!(assemble(&[Bytes::from(p2)]).is_err());
    }

    #[test]
    fn malformed_aggregation() {
        assert!(inspect(&[]).is_err());
        assert!(inspect(&[0x00]).is_err()); // no elements
        assert!(inspect(&[0x00, 0x05, 0x30]).is_err()); // length overruns
        assert!(inspect(&[0x00, 0x80]).is_err()); // truncated LEB128
        assert!(inspect(&[0x20, 0x02, 0x30, 0x00]).is_err()); // W=2 but one element
        assert!(inspect(&[0x88, 0x30]).is_err()); // Z and N
        assert!(inspect(&[0x10, 0x30]).is_ok());
    }
}
