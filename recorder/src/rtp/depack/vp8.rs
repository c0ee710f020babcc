//! VP8 (RFC 7741). Each packet starts with a payload descriptor:
//!
//! ```text
//!  |X|R|N|S|R| PID |        X: extensions follow; S: start of a partition; PID: partition index
//!  |I|L|T|K| RSV   |  (X)   I: picture id, L: TL0PICIDX, T/K: TID/KEYIDX byte
//!  |M| PictureID   |  (I)   M: 15-bit picture id (one more byte)
//!  |  TL0PICIDX    |  (L)
//!  |TID|Y| KEYIDX  |  (T|K)
//! ```
//!
//! A frame starts at S=1, PID=0; its first payload byte is the VP8 frame tag whose lowest bit
//! (P, inverse key frame) is 0 on key frames. The frame is the payloads after the descriptors,
//! concatenated.

use bytes::{Bytes, BytesMut};

use super::{DepacketizedFrame, PacketInfo, PayloadError};

struct Descriptor {
    start_of_frame: bool,
    header_len: usize,
}

fn descriptor(p: &[u8]) -> Result<Descriptor, PayloadError> {
    let truncated = || format!("truncated VP8 payload descriptor ({} bytes)", p.len());
    let b0 = *p.first().ok_or_else(truncated)?;
    let x = b0 & 0x80 != 0;
    let s = b0 & 0x10 != 0;
    let pid = b0 & 0x07;
    let mut i = 1;
    if x {
        let b1 = *p.get(i).ok_or_else(truncated)?;
        i += 1;
        if b1 & 0x80 != 0 {
            let pic = *p.get(i).ok_or_else(truncated)?;
            i += if pic & 0x80 != 0 { 2 } else { 1 };
        }
        if b1 & 0x40 != 0 {
            i += 1;
        }
        if b1 & 0x30 != 0 {
            i += 1;
        }
    }
    if i >= p.len() {
        return Err(format!("VP8 packet of {} bytes has no payload after its descriptor", p.len()));
    }
    Ok(Descriptor { start_of_frame: s && pid == 0, header_len: i })
}

pub fn inspect(payload: &[u8]) -> Result<PacketInfo, PayloadError> {
    let d = descriptor(payload)?;
    Ok(PacketInfo { starts_frame: Some(d.start_of_frame) })
}

pub fn assemble(payloads: &[Bytes]) -> Result<DepacketizedFrame, PayloadError> {
    let mut out = BytesMut::new();
    let mut keyframe = false;
    for (n, p) in payloads.iter().enumerate() {
        let d = descriptor(p)?;
        if (n == 0) != d.start_of_frame {
            return Err(if n == 0 {
                "VP8 frame does not begin with S=1, PID=0".into()
            } else {
                "VP8 frame start (S=1, PID=0) inside a frame".into()
            });
        }
        if n == 0 {
            keyframe = p[d.header_len] & 0x01 == 0;
        }
        out.extend_from_slice(&p[d.header_len..]);
    }
    Ok(DepacketizedFrame { data: out.freeze(), keyframe })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors() {
        // Minimal, start of frame.
        assert_eq!(inspect(&[0x10, 0x00]).unwrap().starts_frame, Some(true));
        // Partition 1 start is not a frame start.
        assert_eq!(inspect(&[0x11, 0x00]).unwrap().starts_frame, Some(false));
        // X, I with 15-bit picture id, L, T.
        let p = [0x90, 0xe0, 0x81, 0x23, 0x05, 0x40, 0x9d];
        let d = descriptor(&p).unwrap();
        assert_eq!(d.header_len, 6);
        // Truncated inside the picture id, and descriptor without payload.
        assert!(inspect(&[0x90, 0x80, 0x81]).is_err());
        assert!(inspect(&[0x90]).is_err());
        assert!(inspect(&[0x10]).is_err());
        assert!(inspect(&[]).is_err());
    }
}
