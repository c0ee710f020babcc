//! Frame decryption throughput (LiveKit E2EE as Element Call uses it: AES-128-GCM, HKDF keys):
//! decrypts 20 000 VP8 delta frames of 4 KiB and 20 000 Opus frames of 120 B on one core and
//! prints frames/s. `cargo bench -p recorder --bench e2ee_decrypt` (release), or
//! `cargo test -p recorder --bench e2ee_decrypt` (the dev profile: dependencies at opt-level 2).
//! Frames come from `encrypt_frame`, the sender side of the same format.

use std::hint::black_box;
use std::time::Instant;

use recorder::matrixrtc::e2ee::{encrypt_frame, Decrypted, FrameCodec, ParticipantKeys};

const FRAMES: usize = 20_000;

fn main() {
    let key = [0x5a_u8; 16];
    let mut keys = ParticipantKeys::new();
    keys.set_key(0, &key).expect("key");
    println!("{:<12} {:>8} {:>12} {:>14} {:>10}", "frames", "count", "ms", "frames/s", "MiB/s");
    for (name, codec, len) in [("vp8 4 KiB", FrameCodec::Vp8, 4096), ("opus 120 B", FrameCodec::Opus, 120)] {
        // 64 distinct frames (distinct IVs), cycled; VP8 delta frames (bit 0 of byte 0 set).
        let frames: Vec<Vec<u8>> = (0..64u32)
            .map(|i| {
                let mut plain: Vec<u8> = (0..len).map(|b| (b as u32 * 31 + i) as u8).collect();
                plain[0] = if codec == FrameCodec::Vp8 { 0x31 } else { 0x78 };
                let mut iv = [0u8; 12];
                iv[8..].copy_from_slice(&i.to_be_bytes());
                encrypt_frame(&key, 0, codec, &plain, iv).expect("encrypt")
            })
            .collect();
        let start = Instant::now();
        let mut bytes = 0usize;
        for i in 0..FRAMES {
            match keys.decrypt_frame(codec, &frames[i % frames.len()], &[]) {
                Ok(Decrypted::Plain(clear)) => bytes += black_box(clear).len(),
                other => panic!("{name}: unexpected {other:?}"),
            }
        }
        let secs = start.elapsed().as_secs_f64();
        println!(
            "{name:<12} {FRAMES:>8} {:>12.1} {:>14.0} {:>10.1}",
            secs * 1e3,
            FRAMES as f64 / secs,
            bytes as f64 / secs / (1024.0 * 1024.0)
        );
    }
}
