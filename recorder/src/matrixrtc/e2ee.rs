//! LiveKit frame end-to-end encryption, receiver side, as Element Call uses it.
//!
//! Element Call encrypts every encoded media frame in the browser (insertable streams) with a
//! per-participant AES-128-GCM key before it reaches the SFU. To record such a call, mxrec has
//! to undo that on each reassembled frame (a whole Opus packet, a whole VP8 frame without its RTP
//! payload descriptor, a whole H.264 access unit in Annex-B) before the frame goes to a decoder
//! or muxer. This module is that step and nothing else: it is sans-IO (no sockets, no clocks, no
//! tasks), so the caller owns one [`ParticipantKeys`] per LiveKit participant identity, feeds it
//! the keys that arrive over Matrix (`set_key`) and the frames that arrive over RTP
//! (`decrypt_frame`), and decides what to do with errors.
//!
//! The format, as livekit-client-js 2.21 (`src/e2ee/worker/FrameCryptor.ts`, `naluUtils.ts`,
//! `sifPayload.ts`) writes and reads it:
//!
//! ```text
//! | clear header, N bytes (= AAD) | AES-GCM ciphertext | tag (16) | IV (12) | 0x0C | key index |
//! ```
//!
//! N depends on the codec ([`FrameCodec`]); for H.264/H.265 everything after the header is
//! additionally RBSP-escaped so that the ciphertext cannot fake a start code. Keys are derived
//! with HKDF-SHA256 from the raw Matrix key ([`derive_aes_key`]); a "ratchet" step
//! ([`ratchet`]) derives the next key of a chain. Element Call never ratchets on the sending
//! side, so ratcheting here is only a fallback that costs nothing when it is not needed.
//!
//! Receiver decision order, per frame: empty → pass through; SFU-injected frame (SIF
//! trailer) → pass through only if it is one of the five known blank payloads, else drop;
//! native SDK "LK-ROCKS" suffix → strip and pass through; otherwise parse the trailer and
//! decrypt with the key at the frame's key index, ratcheting on authentication failure.
//!
//! Where this deliberately differs from the JS receiver:
//! - Frames are parsed before the key is looked up, so garbage reports [`DecryptError::Malformed`]
//!   rather than a key problem, and malformed frames do not count towards invalidating a key.
//! - A frame at an index that has no key yet does not count as a failure of that index: a
//!   recorder routinely sees frames before the key's to-device message, and counting them would
//!   only turn `MissingKey` into `KeyInvalid` until the key arrives.
//! - The ratchet fallback walks the chain (material, ratchet(material), ratchet²(material), …)
//!   as the native implementation does, not the JS quirk of retrying one step.
//! - An IV length other than 12 is rejected (as native does).
//!
//! Key material never appears in `Debug`/`Display` output or logs. The material and derived key
//! bytes this module holds are zeroized on drop; the AES round keys inside `aes_gcm`'s cipher are
//! zeroized only if the `aes` crate's `zeroize` feature is enabled somewhere in the build.

use std::borrow::Cow;
use std::fmt;

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes128Gcm, Nonce, Tag};
use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::Zeroizing;

/// HKDF salt (LiveKit's default `ratchetSalt`, which Element Call keeps).
pub const KEY_DERIVATION_SALT: &[u8] = b"LKFrameEncryptionKey";
/// Length of the IV carried in every encrypted frame.
pub const IV_LENGTH: usize = IV_LENGTH_BYTE as usize;
/// The IV length as written in the trailer.
const IV_LENGTH_BYTE: u8 = 12;
/// Length of the AES-GCM authentication tag.
pub const TAG_LENGTH: usize = 16;
/// Suffix with which native LiveKit SDKs mark frames they sent unencrypted.
pub const UNENCRYPTED_MAGIC: &[u8] = b"LK-ROCKS";
/// Consecutive failures a key index tolerates before it is marked invalid (Element Call: 10).
pub const DEFAULT_FAILURE_TOLERANCE: u32 = 10;
/// How many ratchet steps to try on authentication failure (Element Call: 10).
pub const DEFAULT_RATCHET_WINDOW: u8 = 10;

/// HKDF `info`: 128 zero bytes, as WebCrypto gets `new ArrayBuffer(128)`.
const HKDF_INFO: [u8; 128] = [0; 128];
/// Bytes after the ciphertext: tag, IV, IV length, key index.
const SEALED_SUFFIX_LEN: usize = TAG_LENGTH + IV_LENGTH + 2;
/// Clear bytes of a VP8 key frame / delta frame (LiveKit `UNENCRYPTED_BYTES`).
const VP8_KEY_FRAME_HEADER: usize = 10;
const VP8_DELTA_FRAME_HEADER: usize = 3;

/// The blank frames a LiveKit SFU injects (e.g. to start a subscriber's decoder before the
/// publisher's first key frame). livekit-client-js `sifPayload.ts` compares SHA-256 digests of
/// exactly these payloads; comparing the bytes is the same test. The digests are checked against
/// the upstream constants in the tests.
const SIF_BLANK_PAYLOADS: [&[u8]; 5] = [
    // VP8 8x8 key frame (31 bytes).
    &[
        0x10, 0x02, 0x00, 0x9d, 0x01, 0x2a, 0x08, 0x00, 0x08, 0x00, 0x00, 0x47, 0x08, 0x85, 0x85,
        0x88, 0x85, 0x84, 0x88, 0x02, 0x02, 0x00, 0x0c, 0x0d, 0x60, 0x00, 0xfe, 0xff, 0xab, 0x50,
        0x80,
    ],
    // H.264 2x2 SPS.
    &[
        0x67, 0x42, 0xc0, 0x1f, 0x0f, 0xd9, 0x1f, 0x88, 0x88, 0x84, 0x00, 0x00, 0x03, 0x00, 0x04,
        0x00, 0x00, 0x03, 0x00, 0xc8, 0x3c, 0x60, 0xc9, 0x20,
    ],
    // H.264 2x2 PPS.
    &[0x68, 0x87, 0xcb, 0x83, 0xcb, 0x20],
    // H.264 2x2 IDR slice.
    &[0x65, 0x88, 0x84, 0x0a, 0xf2, 0x62, 0x80, 0x00, 0xa7, 0xbe],
    // Opus silence: TOC 0xf8, then 0xff 0xfe and 77 zero bytes (80 bytes).
    &OPUS_SILENCE,
];

/// Whether `payload` is exactly one of the blank frames a LiveKit SFU injects. To tracks that are
/// not encrypted it sends them without the SIF trailer (livekit-server only appends it for
/// encrypted tracks), so the bytes are all there is to recognise them by.
pub fn is_blank_payload(payload: &[u8]) -> bool {
    SIF_BLANK_PAYLOADS.contains(&payload)
}

const OPUS_SILENCE: [u8; 80] = {
    let mut frame = [0u8; 80];
    frame[0] = 0xf8;
    frame[1] = 0xff;
    frame[2] = 0xfe;
    frame
};

/// The codec of a track, which decides how many leading bytes of a frame stay in clear.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FrameCodec {
    /// Audio; the TOC byte stays clear.
    Opus,
    /// 10 clear bytes on key frames, 3 on delta frames.
    Vp8,
    /// Entirely encrypted.
    Vp9,
    /// Annex-B; start codes and non-slice NALUs stay clear, ciphertext is RBSP-escaped.
    H264,
    /// As H.264 with H.265 NALU types.
    H265,
    /// Not supported by the JS SDK (and the native SDK's AV1 framing differs).
    Av1,
}

impl FrameCodec {
    /// Lower-case codec name, as in SDP and LiveKit's `VideoCodec`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            FrameCodec::Opus => "opus",
            FrameCodec::Vp8 => "vp8",
            FrameCodec::Vp9 => "vp9",
            FrameCodec::H264 => "h264",
            FrameCodec::H265 => "h265",
            FrameCodec::Av1 => "av1",
        }
    }
}

impl fmt::Display for FrameCodec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What `decrypt_frame` made of a frame; every variant carries a frame ready for the decoder.
#[derive(Clone, PartialEq, Eq)]
pub enum Decrypted {
    /// The frame was encrypted; this is the clear header followed by the plaintext.
    Plain(Vec<u8>),
    /// The frame was never encrypted: empty (DTX), or sent by a native SDK with the
    /// "LK-ROCKS" suffix (stripped here).
    PassThrough(Vec<u8>),
    /// A blank frame injected by the SFU, SIF trailer stripped.
    InjectedBlank(Vec<u8>),
}

impl Decrypted {
    /// The frame bytes, whatever the variant.
    #[must_use]
    pub fn frame(&self) -> &[u8] {
        match self {
            Decrypted::Plain(f) | Decrypted::PassThrough(f) | Decrypted::InjectedBlank(f) => f,
        }
    }

    /// Consumes `self` and returns the frame bytes.
    #[must_use]
    pub fn into_frame(self) -> Vec<u8> {
        match self {
            Decrypted::Plain(f) | Decrypted::PassThrough(f) | Decrypted::InjectedBlank(f) => f,
        }
    }
}

impl fmt::Debug for Decrypted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Decrypted::Plain(_) => "Plain",
            Decrypted::PassThrough(_) => "PassThrough",
            Decrypted::InjectedBlank(_) => "InjectedBlank",
        };
        write!(f, "{name}({} bytes)", self.frame().len())
    }
}

/// Why a frame could not be turned into a clear frame. Every variant means "drop this frame";
/// none of them is fatal for the track.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecryptError {
    /// No key has been set at the frame's key index (yet); frames are dropped until it arrives.
    #[error("no media key at index {index} yet; frame dropped until the key arrives")]
    MissingKey {
        /// Key index from the frame trailer.
        index: u8,
    },
    /// The key at this index failed more than the tolerated number of consecutive frames.
    #[error(
        "media key at index {index} is marked invalid after repeated failures; \
         frames dropped until a key is set there again"
    )]
    KeyInvalid {
        /// Key index from the frame trailer.
        index: u8,
    },
    /// AES-GCM authentication failed with the key (and every ratchet step tried).
    #[error("frame failed authentication with the media key at index {index}; frame dropped")]
    AuthFailed {
        /// Key index from the frame trailer.
        index: u8,
    },
    /// The frame cannot be an encrypted LiveKit frame (too short, bad IV length, …).
    #[error("malformed encrypted frame ({0}); frame dropped")]
    Malformed(&'static str),
    /// The codec has no defined frame encryption (AV1).
    #[error("{0} frames cannot be decrypted (no LiveKit frame encryption defined); frame dropped")]
    Unsupported(FrameCodec),
    /// The frame carries the SFU's SIF trailer but is not one of the known blank payloads.
    #[error("server-injected frame with an unknown payload; frame dropped")]
    ServerInjected,
}

impl DecryptError {
    /// A short, stable label for metrics and log de-duplication.
    #[must_use]
    pub fn cause(&self) -> &'static str {
        match self {
            DecryptError::MissingKey { .. } => "missing_key",
            DecryptError::KeyInvalid { .. } => "key_invalid",
            DecryptError::AuthFailed { .. } => "auth_failed",
            DecryptError::Malformed(_) => "malformed",
            DecryptError::Unsupported(_) => "unsupported_codec",
            DecryptError::ServerInjected => "server_injected",
        }
    }
}

/// Errors of [`ParticipantKeys::set_key`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// A zero-length key cannot be HKDF input keying material in WebCrypto; it is ignored.
    #[error("empty media key for index {index}; ignored")]
    Empty {
        /// Index the key was meant for.
        index: u8,
    },
}

/// Errors of [`encrypt_frame`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncryptError {
    /// See [`KeyError::Empty`].
    #[error("empty key material")]
    EmptyKey,
    /// The codec has no defined frame encryption (AV1).
    #[error("{0} frames cannot be encrypted")]
    Unsupported(FrameCodec),
    /// The frame is shorter than its codec's clear header (the JS sender drops such frames).
    #[error("frame of {len} bytes is shorter than its {header}-byte clear header")]
    ShorterThanHeader {
        /// Frame length.
        len: usize,
        /// Clear header length for the codec and frame.
        header: usize,
    },
    /// Beyond AES-GCM's message size limit (64 GiB).
    #[error("frame of {len} bytes is too long for AES-GCM")]
    TooLong {
        /// Frame length.
        len: usize,
    },
}

/// AES-128 key from key material: HKDF-SHA256(IKM = material, salt "LKFrameEncryptionKey",
/// info = 128 zero bytes, L = 16). `material` is the raw Matrix key (16 bytes in Element Call)
/// or a ratchet output.
#[must_use]
pub fn derive_aes_key(material: &[u8]) -> [u8; 16] {
    let mut key = [0u8; 16];
    hkdf_expand(material, &mut key);
    key
}

/// One ratchet step: the next key material of the chain, HKDF-SHA256 as in
/// [`derive_aes_key`] with L = 32. (Its first 16 bytes equal `derive_aes_key(material)`.)
#[must_use]
pub fn ratchet(material: &[u8]) -> [u8; 32] {
    let mut next = [0u8; 32];
    hkdf_expand(material, &mut next);
    next
}

fn hkdf_expand(material: &[u8], out: &mut [u8]) {
    let hk = Hkdf::<Sha256>::new(Some(KEY_DERIVATION_SALT), material);
    // `expand` fails only for outputs longer than 255 * 32 bytes; ours are 16 or 32.
    if hk.expand(&HKDF_INFO, out).is_err() {
        unreachable!(
            "HKDF-SHA256 output of {} bytes is within 255 * 32",
            out.len()
        );
    }
}

fn cipher_for(material: &[u8]) -> Aes128Gcm {
    let key = Zeroizing::new(derive_aes_key(material));
    Aes128Gcm::new((&*key).into())
}

/// One key index of a participant: the material (kept for ratcheting) and its cipher.
struct KeySlot {
    material: Zeroizing<Vec<u8>>,
    cipher: Aes128Gcm,
    /// Consecutive failed frames at this index; reset by a success or a new key.
    failures: u32,
}

impl KeySlot {
    fn new(material: &[u8]) -> Self {
        Self {
            material: Zeroizing::new(material.to_vec()),
            cipher: cipher_for(material),
            failures: 0,
        }
    }
}

impl fmt::Debug for KeySlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeySlot")
            .field(
                "material",
                &format_args!("<{} bytes redacted>", self.material.len()),
            )
            .field("failures", &self.failures)
            .finish()
    }
}

/// The media keys of one LiveKit participant (one Matrix device in a call) and the per-index
/// failure bookkeeping; decrypts that participant's frames.
///
/// Element Call configures 256 key slots (every key index has its own), a ratchet window of 10
/// and a failure tolerance of 10; [`ParticipantKeys::new`] uses those.
pub struct ParticipantKeys {
    slots: Box<[Option<Box<KeySlot>>; 256]>,
    ratchet_window: u8,
    failure_tolerance: Option<u32>,
}

impl Default for ParticipantKeys {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for ParticipantKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let keys: Vec<(usize, u32)> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|s| (i, s.failures)))
            .collect();
        f.debug_struct("ParticipantKeys")
            .field("keys (index, failures)", &keys)
            .field("ratchet_window", &self.ratchet_window)
            .field("failure_tolerance", &self.failure_tolerance)
            .finish()
    }
}

impl ParticipantKeys {
    /// Element Call's settings: ratchet window 10, failure tolerance 10.
    #[must_use]
    pub fn new() -> Self {
        Self::with_options(DEFAULT_RATCHET_WINDOW, Some(DEFAULT_FAILURE_TOLERANCE))
    }

    /// `ratchet_window` = ratchet steps tried after an authentication failure (0 = none);
    /// `failure_tolerance` = consecutive failures after which an index is invalid
    /// (`None` = never, as LiveKit's -1).
    #[must_use]
    pub fn with_options(ratchet_window: u8, failure_tolerance: Option<u32>) -> Self {
        Self {
            slots: Box::new(std::array::from_fn(|_| None)),
            ratchet_window,
            failure_tolerance,
        }
    }

    /// Sets (or replaces) the raw key at `index`, as received from Matrix, and clears the
    /// index's failure count and invalid mark. Any non-empty length is accepted.
    ///
    /// # Errors
    /// [`KeyError::Empty`] for a zero-length key; the slot is left as it was.
    pub fn set_key(&mut self, index: u8, raw: &[u8]) -> Result<(), KeyError> {
        if raw.is_empty() {
            return Err(KeyError::Empty { index });
        }
        self.slots[usize::from(index)] = Some(Box::new(KeySlot::new(raw)));
        tracing::debug!(key_index = index, "media key set");
        Ok(())
    }

    /// Whether a key is set at `index`.
    #[must_use]
    pub fn has_key(&self, index: u8) -> bool {
        self.slots[usize::from(index)].is_some()
    }

    /// Whether the key at `index` is set but marked invalid after repeated failures.
    #[must_use]
    pub fn is_key_invalid(&self, index: u8) -> bool {
        self.slots[usize::from(index)]
            .as_ref()
            .is_some_and(|s| over_tolerance(self.failure_tolerance, s.failures))
    }

    /// Turns one received frame into a clear frame, following LiveKit's receiver order (see
    /// the module docs). `sif_trailer` is `JoinResponse.sif_trailer` of the SFU connection the
    /// frame came from (empty if none). Never panics on any input.
    ///
    /// # Errors
    /// Every [`DecryptError`] means the frame is to be dropped; see the variants. Only
    /// `AuthFailed` counts towards marking the key index invalid.
    pub fn decrypt_frame(
        &mut self,
        codec: FrameCodec,
        frame: &[u8],
        sif_trailer: &[u8],
    ) -> Result<Decrypted, DecryptError> {
        if frame.is_empty() {
            return Ok(Decrypted::PassThrough(Vec::new()));
        }
        if !sif_trailer.is_empty() {
            if let Some(payload) = frame.strip_suffix(sif_trailer) {
                return if SIF_BLANK_PAYLOADS.contains(&payload) {
                    Ok(Decrypted::InjectedBlank(payload.to_vec()))
                } else {
                    Err(DecryptError::ServerInjected)
                };
            }
        }
        if let Some(clear) = frame.strip_suffix(UNENCRYPTED_MAGIC) {
            return Ok(Decrypted::PassThrough(clear.to_vec()));
        }

        let sealed = SealedFrame::parse(codec, frame)?;
        let index = sealed.key_index;
        let ratchet_window = self.ratchet_window;
        let tolerance = self.failure_tolerance;
        let Some(slot) = self.slots[usize::from(index)].as_deref_mut() else {
            return Err(DecryptError::MissingKey { index });
        };
        if over_tolerance(tolerance, slot.failures) {
            return Err(DecryptError::KeyInvalid { index });
        }

        if let Some(clear) = sealed.open(&slot.cipher) {
            slot.failures = 0;
            return Ok(Decrypted::Plain(clear));
        }

        // The sender may have ratcheted: walk the chain from the stored material.
        let mut material = Zeroizing::new(slot.material.to_vec());
        for step in 1..=ratchet_window {
            let next = Zeroizing::new(ratchet(&material));
            material = Zeroizing::new(next.to_vec());
            let cipher = cipher_for(&material);
            if let Some(clear) = sealed.open(&cipher) {
                slot.material = material;
                slot.cipher = cipher;
                slot.failures = 0;
                tracing::debug!(key_index = index, step, "media key ratcheted forward");
                return Ok(Decrypted::Plain(clear));
            }
        }

        slot.failures = slot.failures.saturating_add(1);
        let newly_invalid = over_tolerance(tolerance, slot.failures)
            && !over_tolerance(tolerance, slot.failures - 1);
        if newly_invalid {
            tracing::warn!(
                key_index = index,
                failures = slot.failures,
                "media key marked invalid; its frames are dropped until it is set again"
            );
        }
        Err(DecryptError::AuthFailed { index })
    }
}

/// LiveKit marks an index invalid after *more than* `tolerance` consecutive failures.
fn over_tolerance(tolerance: Option<u32>, failures: u32) -> bool {
    tolerance.is_some_and(|t| failures > t)
}

/// An encrypted frame split into its parts; `body` is unescaped for H.264/H.265.
struct SealedFrame<'a> {
    header: &'a [u8],
    /// ciphertext | tag | IV | IV length | key index
    body: Cow<'a, [u8]>,
    key_index: u8,
}

impl<'a> SealedFrame<'a> {
    fn parse(codec: FrameCodec, frame: &'a [u8]) -> Result<Self, DecryptError> {
        let clear = clear_header(codec, frame).map_err(|_| DecryptError::Unsupported(codec))?;
        let Some((header, rest)) = frame.split_at_checked(clear.len) else {
            return Err(DecryptError::Malformed("shorter than its clear header"));
        };
        let body = if clear.rbsp && needs_rbsp_unescaping(rest) {
            Cow::Owned(unescape_rbsp(rest))
        } else {
            Cow::Borrowed(rest)
        };
        let Some(ciphertext_len) = body.len().checked_sub(SEALED_SUFFIX_LEN) else {
            return Err(DecryptError::Malformed("too short for tag, IV and trailer"));
        };
        let iv_length = body[ciphertext_len + TAG_LENGTH + IV_LENGTH];
        if iv_length != IV_LENGTH_BYTE {
            return Err(DecryptError::Malformed("IV length is not 12"));
        }
        let key_index = body[body.len() - 1];
        Ok(Self {
            header,
            body,
            key_index,
        })
    }

    /// Decrypts with one cipher; `None` if authentication fails.
    fn open(&self, cipher: &Aes128Gcm) -> Option<Vec<u8>> {
        let ciphertext_len = self.body.len() - SEALED_SUFFIX_LEN;
        let (ciphertext, suffix) = self.body.split_at(ciphertext_len);
        let (tag, rest) = suffix.split_at(TAG_LENGTH);
        let iv: [u8; IV_LENGTH] = rest[..IV_LENGTH].try_into().ok()?;
        let tag: [u8; TAG_LENGTH] = tag.try_into().ok()?;

        let mut out = Vec::with_capacity(self.header.len() + ciphertext_len);
        out.extend_from_slice(self.header);
        out.extend_from_slice(ciphertext);
        let (aad, buffer) = out.split_at_mut(self.header.len());
        cipher
            .decrypt_in_place_detached(&Nonce::from(iv), aad, buffer, &Tag::from(tag))
            .ok()?;
        Some(out)
    }
}

/// The clear (and authenticated) header of a frame and whether the rest is RBSP-escaped.
struct ClearHeader {
    len: usize,
    rbsp: bool,
}

struct UnsupportedCodec;

/// Clear-header length per codec (LiveKit `getUnencryptedBytes`). The same function serves
/// sender and receiver: the header bytes are identical in the clear and the encrypted frame,
/// and the escaped ciphertext cannot contain a start code, so both sides find the same first
/// slice.
fn clear_header(codec: FrameCodec, frame: &[u8]) -> Result<ClearHeader, UnsupportedCodec> {
    let len = match codec {
        FrameCodec::Opus => 1,
        FrameCodec::Vp9 => 0,
        FrameCodec::Vp8 => vp8_header_len(frame),
        FrameCodec::H264 | FrameCodec::H265 => {
            let is_slice = if codec == FrameCodec::H264 {
                is_h264_slice
            } else {
                is_h265_slice
            };
            match first_slice_header_end(frame, is_slice) {
                Some(len) => return Ok(ClearHeader { len, rbsp: true }),
                // LiveKit falls back to the VP8 rule (by the WebRTC frame type, which a
                // recorder does not have; bit 0 of byte 0 stands in for it). Real encoders
                // always emit a slice, so this only matters for odd frames.
                None => vp8_header_len(frame),
            }
        }
        FrameCodec::Av1 => return Err(UnsupportedCodec),
    };
    Ok(ClearHeader { len, rbsp: false })
}

/// VP8: bit 0 of byte 0 is the inverse key-frame flag (RFC 6386 §9.1).
fn vp8_header_len(frame: &[u8]) -> usize {
    match frame.first() {
        Some(b) if b & 1 == 0 => VP8_KEY_FRAME_HEADER,
        _ => VP8_DELTA_FRAME_HEADER,
    }
}

fn is_h264_slice(nalu_header: u8) -> bool {
    matches!(nalu_header & 0x1f, 1 | 5)
}

fn is_h265_slice(nalu_header: u8) -> bool {
    matches!((nalu_header >> 1) & 0x3f, 0..=9 | 16..=21)
}

/// Offset of the first slice NALU's header byte plus 2, scanning Annex-B start codes the way
/// livekit-client-js `findNALUIndices` does (including its limits near the end of the buffer
/// and its refusal of data before the first start code), so that both sides agree.
fn first_slice_header_end(data: &[u8], is_slice: fn(u8) -> bool) -> Option<usize> {
    let len = data.len();
    let search_len = len.checked_sub(3)?;
    let (mut start, mut pos) = (0usize, 0usize);
    while pos < search_len {
        while pos < search_len {
            if pos + 1 < search_len && data[pos..pos + 4] == [0, 0, 0, 1] {
                break;
            }
            if data[pos..pos + 3] == [0, 0, 1] {
                break;
            }
            pos += 1;
        }
        if pos >= search_len {
            pos = len;
        }
        if start == 0 {
            // Anything but zeros before the first start code: not Annex-B.
            if data[..pos].iter().any(|&b| b != 0) {
                return None;
            }
        } else if is_slice(data[start]) {
            return Some(start + 2);
        }
        let start_code_len = if pos + 3 < len && data[pos..pos + 4] == [0, 0, 0, 1] {
            4
        } else {
            3
        };
        pos += start_code_len;
        start = pos;
    }
    None
}

/// LiveKit `needsRbspUnescaping`: a `00 00 03` anywhere but in the last three bytes.
fn needs_rbsp_unescaping(data: &[u8]) -> bool {
    data.windows(3)
        .take(data.len().saturating_sub(3))
        .any(|w| w == [0, 0, 3])
}

/// Removes emulation-prevention bytes (`00 00 03` → `00 00`).
fn unescape_rbsp(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len());
    let mut i = 0;
    while i < data.len() {
        if data.len() - i >= 3 && data[i] == 0 && data[i + 1] == 0 && data[i + 2] == 3 {
            out.extend_from_slice(&[0, 0]);
            i += 3;
        } else {
            out.push(data[i]);
            i += 1;
        }
    }
    out
}

/// Inserts emulation-prevention bytes: after two zeros, a byte ≤ 3 is preceded by 0x03.
fn escape_rbsp(data: &[u8], out: &mut Vec<u8>) {
    let mut zeros = 0;
    for &byte in data {
        if byte <= 3 && zeros >= 2 {
            out.push(3);
            zeros = 0;
        }
        out.push(byte);
        zeros = if byte == 0 { zeros + 1 } else { 0 };
    }
}

/// The sender side of the format: encrypts one frame as a LiveKit JS sender would, with the
/// given key material (raw Matrix key), key index and IV.
///
/// Not used on the recording path; it exists for the tests and the decrypt benchmark. Empty
/// frames are returned empty, as the JS sender passes them through.
///
/// # Errors
/// See [`EncryptError`]: empty key, AV1, a frame shorter than its clear header.
pub fn encrypt_frame(
    key_material: &[u8],
    index: u8,
    codec: FrameCodec,
    frame: &[u8],
    iv: [u8; IV_LENGTH],
) -> Result<Vec<u8>, EncryptError> {
    if key_material.is_empty() {
        return Err(EncryptError::EmptyKey);
    }
    if frame.is_empty() {
        return Ok(Vec::new());
    }
    let clear = clear_header(codec, frame).map_err(|_| EncryptError::Unsupported(codec))?;
    let Some((header, plaintext)) = frame.split_at_checked(clear.len) else {
        return Err(EncryptError::ShorterThanHeader {
            len: frame.len(),
            header: clear.len,
        });
    };

    let mut body = Vec::with_capacity(plaintext.len() + SEALED_SUFFIX_LEN);
    body.extend_from_slice(plaintext);
    let tag = cipher_for(key_material)
        .encrypt_in_place_detached(&Nonce::from(iv), header, &mut body)
        .map_err(|_| EncryptError::TooLong { len: frame.len() })?;
    body.extend_from_slice(&tag);
    body.extend_from_slice(&iv);
    body.extend_from_slice(&[IV_LENGTH_BYTE, index]);

    let mut out = Vec::with_capacity(header.len() + body.len() + body.len() / 64);
    out.extend_from_slice(header);
    if clear.rbsp {
        escape_rbsp(&body, &mut out);
    } else {
        out.extend_from_slice(&body);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::Digest;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("fixture hex"))
            .collect()
    }

    fn to_hex(b: &[u8]) -> String {
        b.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Deterministic xorshift64*, so that failures reproduce.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next() as u8).collect()
        }
        /// Bytes that are often 0..=3, to hit start codes and escapes.
        fn zeroish(&mut self, n: usize) -> Vec<u8> {
            (0..n)
                .map(|_| {
                    if self.next().is_multiple_of(3) {
                        self.next() as u8
                    } else {
                        (self.next() % 4) as u8
                    }
                })
                .collect()
        }
    }

    const ALL_CODECS: [FrameCodec; 6] = [
        FrameCodec::Opus,
        FrameCodec::Vp8,
        FrameCodec::Vp9,
        FrameCodec::H264,
        FrameCodec::H265,
        FrameCodec::Av1,
    ];

    // ---- HKDF vectors (MATRIXRTC notes, Part 2 A8) -------------------------------------

    #[test]
    fn hkdf_vectors_match_a8() {
        let raw: Vec<u8> = (0u8..16).collect();
        assert_eq!(
            to_hex(&derive_aes_key(&raw)),
            "4086b4641064e1ae8b63d4eb83ad3e7e"
        );
        let chain = ratchet(&raw);
        assert_eq!(
            to_hex(&chain),
            "4086b4641064e1ae8b63d4eb83ad3e7e878c21ab850a1f6b36c5954be5919e3a"
        );
        assert_eq!(
            to_hex(&derive_aes_key(&chain)),
            "af61b566e2c6adff55bf8c20f94b4765"
        );

        let mut buf: Vec<u8> = (0u8..=0x10).collect();
        let tag = cipher_for(&raw)
            .encrypt_in_place_detached(&Nonce::from([0; 12]), b"", &mut buf)
            .expect("encrypt");
        buf.extend_from_slice(&tag);
        assert_eq!(
            to_hex(&buf),
            "8656abcc8c42ff62bcd7f57b81859e671a56b0c8916216e93f4c07a7a34bdb72ed"
        );
    }

    #[test]
    fn sif_payloads_hash_to_upstream_digests() {
        let upstream = [
            "ef0161653d8b2b23aad46624b420af1d03ce48950e9fc85718028f91b50f9219",
            "f0a0e09647d891d6d50aa898bce7108090375d0d55e50a2bb21147afee558e44",
            "61d9665eed71b6d424ae9539330a3bdd5cb386d4d781c808219a6e36750493a7",
            "faffc26b68a2fc09096fa20f3351e706398b6f838a7500c8063472c2e476e90d",
            "aad8d31fc56b2802ca500e58c2fb9d0b29ad71bb7cb52cd6530251eade188988",
        ];
        for (payload, digest) in SIF_BLANK_PAYLOADS.iter().zip(upstream) {
            assert_eq!(to_hex(&Sha256::digest(payload)), digest);
        }
    }

    // ---- Frames encrypted by the independent Python implementation (source at the bottom) ---

    const FIXTURE_KEY: &str = "5ca1ab1e00112233445566778899aabb";

    const OPUS_PLAIN: &str = "78030a11181f262d343b424950575e656c737a81888f969da4abb2b9c0c7ced5dce3eaf1f8ff060d141b222930373e454c535a61686f767d848b9299";
    const OPUS_ENC: &str = "78ea0794d267af5996f6e3a26d6be7edfae128c646ccbbe64a6227985b52851725b621a52c8b2800c8b88079e4f21404fa590fb9a9f2fe0fc9aadbafb1abbbc0f76558beae339e6cb0dfa3371a2b3c4d000ea600000e75c70c00";
    const VP8_KEY_PLAIN: &str = "5004009d012a8002e001010e1b2835424f5c697683909daab7c4d1deebf805121f2c394653606d7a8794a1aebbc8d5e2effc091623303d4a5764717e8b98a5b2bfccd9e6f3000d1a2734414e5b6875828f9ca9b6c3d0ddeaf704111e2b3845525f6c7986";
    const VP8_KEY_ENC: &str = "5004009d012a8002e001262458f8fd5dd5b6175e2c8d3408e0a60dfe3e614574f97aad4b03d3f3704b75c2653ab2a466ea54e6579b8afb4886c898d1d0ed45f5253768cc6108b5aa51341acc77d63122f2871fdf5961662b5d26614c63dc985414d41a64a0d6e05c234efab4db619d41273cf2221a2b3c4d00099cf000098c5e0c01";
    const VP8_DELTA_PLAIN: &str = "b1020005223f5c7996b3d0ed0a2744617e9bb8d5f20f2c496683a0bddaf714314e6b88a5c2dffc193653708daac7e4011e3b587592afcce90623405d7a97b4d1";
    const VP8_DELTA_ENC: &str = "b102006b4e2cfa43f033e48f3e1ed09d817a847867d9e827f6ac26867dfa0da3595eff8349deccabdbdff80f4c6b6b3b64b0be66efef9d4946ef8112de6d76078d50dcd1818a444ebaf0fc25ee7f746a1a2b3c4d0009a8a8000998150c01";
    const H264_PLAIN: &str = "000000016742c01f0fd91f888884000003000400000300c83c60c920000000016887cb83cb20000000016588840b2a496887a6c5e4032241607f9ebddcfb1a39587796b5d4f31231506f8eadcceb0a29486786a5c4e30221405f7e9dbcdbfa1938577695b4d3f211304f6e8daccbea0928476685a4c3e201203f5e7d9cbbdaf91837567594b3d2f1102f4e6d8cabcae90827466584a3c2e1001f3e5d7c9bbad9f81736557493b2d1f00f2e4d6c8baac9e80726456483a2c1e0ff1e3d5c7b9ab9d8f71635547392b1d0ef0e2d4c6b8aa9c8e70625446382a1c0dffe1d3c5b7a99b8d7f61534537291b0cfee0d2c4b6a89a8c7e60524";
    const H264_ENC: &str = "000000016742c01f0fd91f888884000003000400000300c83c60c920000000016887cb83cb2000000001658807aff20de23aa70527b638739ca894af8e0645be66404daf266fc984cd34284e27f4236998ab3cf3f72ca2e3f2453a8cc5dbf1d398b4abfeaa68125056474859e033b4471d42032021669d6da7b7dcf76f0d857df971b7e28f959c39be0089cfeab1b2c8fc517ba47e43152128f708a7052dc4162f7fa4e70f2d4bcb0000030206b0654ed0a7d51dfdfddc734f4c3509dc4b5ff32e54066c6c0c4cc6bb130f2dcb44ead3b402a0a3f9f532b33cbbf9d0192cc07919fe3084d9774ebf4eb5b5a8abc153369d078064c4354d6720ccbeae305af79cc138ce7e8c281a2b3c4d0117b1900117ae870c03";
    /// VP8_DELTA_PLAIN encrypted at index 2 with ratchet(ratchet(FIXTURE_KEY)).
    const VP8_RATCHET2_ENC: &str = "b1020056c0d3127d03de9176bc9d241c9c3366387d2d7c79712f04dc5b4439d0e16a2667acf2bf6ab5f39d4c07a8100c2b2c61ce3b33f5c47c8a2c1ae261db04d6edcf43cb6e0c4abe5bf3af363f258c1a2b3c4d000c5c10000c5bad0c02";

    /// IV of a fixture, read from its unescaped tail (none of the fixture IVs needed escaping).
    fn fixture_iv(enc: &[u8]) -> [u8; 12] {
        let n = enc.len();
        enc[n - 14..n - 2].try_into().expect("12 bytes")
    }

    fn fixture_keys() -> ParticipantKeys {
        let mut keys = ParticipantKeys::new();
        for index in [0, 1, 3] {
            keys.set_key(index, &hex(FIXTURE_KEY)).expect("key");
        }
        keys
    }

    fn check_fixture(codec: FrameCodec, plain: &str, enc: &str, index: u8) {
        let (plain, enc) = (hex(plain), hex(enc));
        let mut keys = fixture_keys();
        assert_eq!(enc[enc.len() - 1], index);
        assert_eq!(
            keys.decrypt_frame(codec, &enc, &[]),
            Ok(Decrypted::Plain(plain.clone()))
        );
        // And our sender produces the same bytes as the independent one.
        let ours = encrypt_frame(&hex(FIXTURE_KEY), index, codec, &plain, fixture_iv(&enc));
        assert_eq!(ours.map(|o| to_hex(&o)), Ok(to_hex(&enc)));
    }

    #[test]
    fn python_opus_frame() {
        check_fixture(FrameCodec::Opus, OPUS_PLAIN, OPUS_ENC, 0);
    }

    #[test]
    fn python_vp8_key_frame() {
        check_fixture(FrameCodec::Vp8, VP8_KEY_PLAIN, VP8_KEY_ENC, 1);
    }

    #[test]
    fn python_vp8_delta_frame() {
        check_fixture(FrameCodec::Vp8, VP8_DELTA_PLAIN, VP8_DELTA_ENC, 1);
    }

    #[test]
    fn python_h264_idr_with_rbsp_escaping() {
        let (plain, enc) = (hex(H264_PLAIN), hex(H264_ENC));
        // Header: three 4-byte start codes, SPS (24), PPS (6), 2 bytes of the IDR slice.
        let header = 4 + 24 + 4 + 6 + 4 + 2;
        assert_eq!(first_slice_header_end(&plain, is_h264_slice), Some(header));
        // The SPS's own emulation prevention stays in the clear header; the sealed part needed
        // at least one escape of its own.
        assert_eq!(plain[..header], enc[..header]);
        assert!(needs_rbsp_unescaping(&enc[header..]));
        let unescaped = unescape_rbsp(&enc[header..]);
        assert!(unescaped.len() < enc.len() - header);
        assert_eq!(unescaped.len(), plain.len() - header + SEALED_SUFFIX_LEN);
        check_fixture(FrameCodec::H264, H264_PLAIN, H264_ENC, 3);
    }

    #[test]
    fn python_ratcheted_frame_decrypts_and_slot_keeps_ratcheted_key() {
        let key = hex(FIXTURE_KEY);
        let mut keys = ParticipantKeys::new();
        keys.set_key(2, &key).expect("key");
        let enc = hex(VP8_RATCHET2_ENC);
        assert_eq!(
            keys.decrypt_frame(FrameCodec::Vp8, &enc, &[]),
            Ok(Decrypted::Plain(hex(VP8_DELTA_PLAIN)))
        );
        let stored = keys.slots[2].as_ref().expect("slot").material.to_vec();
        assert_eq!(stored, ratchet(&ratchet(&key)).to_vec());
    }

    // ---- Round trips ------------------------------------------------------------------------

    fn sample_frame(codec: FrameCodec, rng: &mut Rng, key_frame: bool) -> Vec<u8> {
        let mut payload = rng.zeroish(500);
        match codec {
            FrameCodec::Opus => {
                payload[0] = 0x78;
                payload
            }
            FrameCodec::Vp8 => {
                payload[0] = if key_frame { 0x50 } else { 0x31 };
                payload
            }
            FrameCodec::Vp9 | FrameCodec::Av1 => payload,
            FrameCodec::H264 => {
                let mut f = hex(concat!(
                    "00000001 6742c01f0fd91f888884000003000400000300c83c60c920",
                    "00000001 6887cb83cb20"
                ));
                f.extend_from_slice(&[0, 0, 1, if key_frame { 0x65 } else { 0x41 }]);
                f.extend(payload.iter().map(|&b| b | 0x80)); // no start codes inside the slice
                f
            }
            FrameCodec::H265 => {
                // VPS, then an IDR_W_RADL (19) or TRAIL_R (1) slice; 3-byte start codes.
                let mut f = hex("000001 40010c01ffff");
                let nal_type: u8 = if key_frame { 19 } else { 1 };
                f.extend_from_slice(&[0, 0, 1, nal_type << 1, 0x01]);
                f.extend(payload.iter().map(|&b| b | 0x80));
                f
            }
        }
    }

    #[test]
    fn round_trip_every_supported_codec() {
        let mut rng = Rng(0x5eed);
        let key = rng.bytes(16);
        let mut keys = ParticipantKeys::new();
        keys.set_key(7, &key).expect("key");
        for codec in ALL_CODECS {
            for key_frame in [true, false] {
                let frame = sample_frame(codec, &mut rng, key_frame);
                // An IV with zero runs so that H.264/H.265 escaping always happens.
                let iv = [0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 3];
                let enc = encrypt_frame(&key, 7, codec, &frame, iv);
                if codec == FrameCodec::Av1 {
                    assert_eq!(enc, Err(EncryptError::Unsupported(FrameCodec::Av1)));
                    assert_eq!(
                        keys.decrypt_frame(codec, &frame, &[]),
                        Err(DecryptError::Unsupported(FrameCodec::Av1))
                    );
                    continue;
                }
                let enc = enc.expect("encrypt");
                if matches!(codec, FrameCodec::H264 | FrameCodec::H265) {
                    assert!(
                        enc.len() > frame.len() + SEALED_SUFFIX_LEN,
                        "{codec}: escaped"
                    );
                } else {
                    assert_eq!(enc.len(), frame.len() + SEALED_SUFFIX_LEN);
                }
                let clear = match codec {
                    FrameCodec::Opus => 1,
                    FrameCodec::Vp8 if key_frame => 10,
                    FrameCodec::Vp8 => 3,
                    FrameCodec::Vp9 => 0,
                    // start code, SPS, start code, PPS, 3-byte start code, 2 slice bytes
                    FrameCodec::H264 => 4 + 24 + 4 + 6 + 3 + 2,
                    // 3-byte start code, VPS, 3-byte start code, 2 slice bytes
                    _ => 3 + 6 + 3 + 2,
                };
                assert_eq!(enc[..clear], frame[..clear], "{codec}: clear header");
                assert_ne!(
                    enc[clear..clear + 8],
                    frame[clear..clear + 8],
                    "{codec}: encrypted"
                );
                assert_eq!(
                    keys.decrypt_frame(codec, &enc, &[]),
                    Ok(Decrypted::Plain(frame)),
                    "{codec} key_frame={key_frame}"
                );
            }
        }
    }

    #[test]
    fn h264_without_slice_falls_back_to_vp8_rule() {
        let frame = hex("00000001 6742c01f0fd91f88 00000001 6887cb83cb20");
        let header = clear_header(FrameCodec::H264, &frame)
            .ok()
            .expect("supported");
        assert_eq!((header.len, header.rbsp), (10, false));
        // Data before the first start code is not Annex-B either.
        let frame = hex("ff 00000001 65888400112233");
        assert_eq!(first_slice_header_end(&frame, is_h264_slice), None);
        // 3-byte start codes and H.265 slice types.
        let frame = hex("000001 4001 000001 2601aabbccdd");
        assert_eq!(first_slice_header_end(&frame, is_h265_slice), Some(10)); // 0x26: IDR_W_RADL
        assert_eq!(first_slice_header_end(&frame, is_h264_slice), None); // 0x26 & 0x1f: SEI
    }

    // ---- Key handling -----------------------------------------------------------------------

    fn opus_frame_with(key: &[u8], index: u8) -> (Vec<u8>, Vec<u8>) {
        let plain = hex("78aabbccddeeff00112233");
        let enc = encrypt_frame(key, index, FrameCodec::Opus, &plain, [9; 12]).expect("encrypt");
        (plain, enc)
    }

    #[test]
    fn wrong_key_is_auth_failure() {
        let (_, enc) = opus_frame_with(&[1; 16], 0);
        let mut keys = ParticipantKeys::new();
        keys.set_key(0, &[2; 16]).expect("key");
        let err = keys.decrypt_frame(FrameCodec::Opus, &enc, &[]);
        assert_eq!(err, Err(DecryptError::AuthFailed { index: 0 }));
        assert_eq!(err.err().map(|e| e.cause()), Some("auth_failed"));
        let mut no_ratchet = ParticipantKeys::with_options(0, Some(10));
        no_ratchet.set_key(0, &[2; 16]).expect("key");
        assert_eq!(
            no_ratchet.decrypt_frame(FrameCodec::Opus, &enc, &[]),
            Err(DecryptError::AuthFailed { index: 0 })
        );
    }

    #[test]
    fn missing_index_is_missing_key() {
        let (_, enc) = opus_frame_with(&[1; 16], 5);
        let mut keys = ParticipantKeys::new();
        keys.set_key(4, &[1; 16]).expect("key");
        for _ in 0..20 {
            assert_eq!(
                keys.decrypt_frame(FrameCodec::Opus, &enc, &[]),
                Err(DecryptError::MissingKey { index: 5 })
            );
        }
        assert!(!keys.has_key(5));
        keys.set_key(5, &[1; 16]).expect("key");
        assert!(keys.has_key(5));
        assert!(matches!(
            keys.decrypt_frame(FrameCodec::Opus, &enc, &[]),
            Ok(Decrypted::Plain(_))
        ));
    }

    #[test]
    fn empty_key_is_refused() {
        let mut keys = ParticipantKeys::new();
        assert_eq!(keys.set_key(3, &[]), Err(KeyError::Empty { index: 3 }));
        assert!(!keys.has_key(3));
        assert_eq!(
            encrypt_frame(&[], 0, FrameCodec::Opus, b"x", [0; 12]),
            Err(EncryptError::EmptyKey)
        );
    }

    #[test]
    fn eleven_failures_invalidate_until_key_is_set_again() {
        let key = [1u8; 16];
        let (plain, good) = opus_frame_with(&key, 0);
        let (_, bad) = opus_frame_with(&[2; 16], 0);
        let mut keys = ParticipantKeys::new();
        keys.set_key(0, &key).expect("key");
        for _ in 0..11 {
            assert_eq!(
                keys.decrypt_frame(FrameCodec::Opus, &bad, &[]),
                Err(DecryptError::AuthFailed { index: 0 })
            );
        }
        assert!(keys.is_key_invalid(0));
        // Even a good frame is dropped now, without trying.
        let err = keys.decrypt_frame(FrameCodec::Opus, &good, &[]);
        assert_eq!(err, Err(DecryptError::KeyInvalid { index: 0 }));
        assert_eq!(err.err().map(|e| e.cause()), Some("key_invalid"));
        keys.set_key(0, &key).expect("key");
        assert!(!keys.is_key_invalid(0));
        assert_eq!(
            keys.decrypt_frame(FrameCodec::Opus, &good, &[]),
            Ok(Decrypted::Plain(plain))
        );
    }

    #[test]
    fn success_resets_failure_count() {
        let key = [1u8; 16];
        let (_, good) = opus_frame_with(&key, 0);
        let (_, bad) = opus_frame_with(&[2; 16], 0);
        let mut keys = ParticipantKeys::with_options(0, Some(10));
        keys.set_key(0, &key).expect("key");
        for _ in 0..3 {
            for _ in 0..10 {
                assert!(keys.decrypt_frame(FrameCodec::Opus, &bad, &[]).is_err());
            }
            assert!(matches!(
                keys.decrypt_frame(FrameCodec::Opus, &good, &[]),
                Ok(Decrypted::Plain(_))
            ));
        }
        assert!(!keys.is_key_invalid(0));
        // No tolerance: never invalid.
        let mut lenient = ParticipantKeys::with_options(0, None);
        lenient.set_key(0, &key).expect("key");
        for _ in 0..50 {
            assert_eq!(
                lenient.decrypt_frame(FrameCodec::Opus, &bad, &[]),
                Err(DecryptError::AuthFailed { index: 0 })
            );
        }
        assert!(matches!(
            lenient.decrypt_frame(FrameCodec::Opus, &good, &[]),
            Ok(Decrypted::Plain(_))
        ));
    }

    #[test]
    fn ratchet_fallback_walks_the_chain_and_keeps_the_result() {
        let material = [0x42u8; 16];
        let mut chain = vec![material.to_vec()];
        for _ in 0..11 {
            let next = ratchet(chain.last().expect("chain")).to_vec();
            chain.push(next);
        }
        // One step and the full window of ten both work.
        for steps in [1usize, 10] {
            let (plain, enc) = opus_frame_with(&chain[steps], 0);
            let mut keys = ParticipantKeys::new();
            keys.set_key(0, &material).expect("key");
            assert_eq!(
                keys.decrypt_frame(FrameCodec::Opus, &enc, &[]),
                Ok(Decrypted::Plain(plain.clone()))
            );
            assert_eq!(
                keys.slots[0].as_ref().expect("slot").material.to_vec(),
                chain[steps]
            );
            // The next frame decrypts directly, and frames under the old key no longer do.
            assert_eq!(
                keys.decrypt_frame(FrameCodec::Opus, &enc, &[]),
                Ok(Decrypted::Plain(plain))
            );
            let (_, old) = opus_frame_with(&material, 0);
            assert!(keys.decrypt_frame(FrameCodec::Opus, &old, &[]).is_err());
        }
        // Eleven steps is outside the window; the stored key is untouched.
        let (_, enc) = opus_frame_with(&chain[11], 0);
        let mut keys = ParticipantKeys::new();
        keys.set_key(0, &material).expect("key");
        assert_eq!(
            keys.decrypt_frame(FrameCodec::Opus, &enc, &[]),
            Err(DecryptError::AuthFailed { index: 0 })
        );
        assert_eq!(
            keys.slots[0].as_ref().expect("slot").material.to_vec(),
            material.to_vec()
        );
        // With the window off, one step is already too far.
        let (_, enc) = opus_frame_with(&chain[1], 0);
        let mut keys = ParticipantKeys::with_options(0, Some(10));
        keys.set_key(0, &material).expect("key");
        assert_eq!(
            keys.decrypt_frame(FrameCodec::Opus, &enc, &[]),
            Err(DecryptError::AuthFailed { index: 0 })
        );
    }

    // ---- Pass-through, SIF, malformed -------------------------------------------------------

    #[test]
    fn empty_and_lk_rocks_frames_pass_through() {
        let mut keys = ParticipantKeys::new();
        for codec in ALL_CODECS {
            assert_eq!(
                keys.decrypt_frame(codec, &[], b"SIF!"),
                Ok(Decrypted::PassThrough(vec![]))
            );
            let mut frame = hex("5004009d012a");
            frame.extend_from_slice(UNENCRYPTED_MAGIC);
            assert_eq!(
                keys.decrypt_frame(codec, &frame, &[]),
                Ok(Decrypted::PassThrough(hex("5004009d012a")))
            );
        }
        assert_eq!(
            encrypt_frame(&[1], 0, FrameCodec::Vp8, &[], [0; 12]),
            Ok(vec![])
        );
    }

    #[test]
    fn server_injected_frames() {
        let trailer = hex("82c6bafcbcaebedd"); // "gsa6/Lyuvt0=" from the SDK comment
        let mut keys = ParticipantKeys::new();
        for payload in SIF_BLANK_PAYLOADS {
            let mut frame = payload.to_vec();
            frame.extend_from_slice(&trailer);
            assert_eq!(
                keys.decrypt_frame(FrameCodec::Vp8, &frame, &trailer),
                Ok(Decrypted::InjectedBlank(payload.to_vec()))
            );
        }
        let mut unknown = hex("1002009d012a");
        unknown.extend_from_slice(&trailer);
        let err = keys.decrypt_frame(FrameCodec::Vp8, &unknown, &trailer);
        assert_eq!(err, Err(DecryptError::ServerInjected));
        assert_eq!(err.err().map(|e| e.cause()), Some("server_injected"));
        // The trailer alone is an (empty) unknown payload; without a trailer there is no SIF.
        assert_eq!(
            keys.decrypt_frame(FrameCodec::Vp8, &trailer, &trailer),
            Err(DecryptError::ServerInjected)
        );
        let mut opus = OPUS_SILENCE.to_vec();
        opus.extend_from_slice(&trailer);
        assert!(matches!(
            keys.decrypt_frame(FrameCodec::Opus, &opus, &[]),
            Err(DecryptError::Malformed(_))
        ));
    }

    #[test]
    fn truncated_and_bad_trailer_frames_are_malformed() {
        let key = [1u8; 16];
        let mut keys = ParticipantKeys::with_options(0, None);
        keys.set_key(0, &key).expect("key");
        let (_, enc) = opus_frame_with(&key, 0);
        // Every prefix that keeps the trailer shape but loses bytes is too short or fails.
        for len in 1..enc.len() {
            let mut cut = enc[..len].to_vec();
            if len >= 2 {
                cut[len - 2] = 12;
                cut[len - 1] = 0;
            }
            let got = keys.decrypt_frame(FrameCodec::Opus, &cut, &[]);
            if len < 1 + SEALED_SUFFIX_LEN {
                assert_eq!(
                    got,
                    Err(DecryptError::Malformed("too short for tag, IV and trailer")),
                    "len {len}"
                );
            } else {
                assert_eq!(got, Err(DecryptError::AuthFailed { index: 0 }), "len {len}");
            }
        }
        keys.set_key(0, &key).expect("reset failures");
        let mut bad_iv = enc.clone();
        let n = bad_iv.len();
        bad_iv[n - 2] = 16;
        assert_eq!(
            keys.decrypt_frame(FrameCodec::Opus, &bad_iv, &[]),
            Err(DecryptError::Malformed("IV length is not 12"))
        );
        assert_eq!(
            keys.decrypt_frame(FrameCodec::Vp8, &hex("5004009d012a80"), &[]),
            Err(DecryptError::Malformed("shorter than its clear header"))
        );
        assert_eq!(DecryptError::Malformed("x").cause(), "malformed");
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = Rng(0xdead_beef);
        let mut with_key = ParticipantKeys::with_options(2, Some(3));
        for index in 0..=255u8 {
            with_key.set_key(index, &[index; 16]).expect("key");
        }
        let mut without_key = ParticipantKeys::new();
        for round in 0..4000usize {
            let len = round % 64;
            let mut frame = if round % 2 == 0 {
                rng.bytes(len)
            } else {
                rng.zeroish(len)
            };
            if round % 5 == 0 && len >= 2 {
                frame[len - 2] = 12;
            }
            let trailer: &[u8] = if round % 7 == 0 { &[0, 1] } else { &[] };
            for codec in ALL_CODECS {
                for keys in [&mut with_key, &mut without_key] {
                    let got = keys.decrypt_frame(codec, &frame, trailer);
                    assert!(
                        !matches!(got, Ok(Decrypted::Plain(_))),
                        "random bytes decrypted"
                    );
                }
            }
        }
        // Longer H.264/H.265 shapes with many start codes and escapes.
        for round in 0..2000usize {
            let frame = rng.zeroish(round % 400);
            for codec in [FrameCodec::H264, FrameCodec::H265] {
                assert!(!matches!(
                    with_key.decrypt_frame(codec, &frame, &[]),
                    Ok(Decrypted::Plain(_))
                ));
            }
        }
    }

    #[test]
    fn rbsp_escape_round_trip() {
        let mut rng = Rng(7);
        for n in 0..300 {
            let data = rng.zeroish(n);
            let mut escaped = Vec::new();
            escape_rbsp(&data, &mut escaped);
            assert!(!escaped
                .windows(3)
                .any(|w| w[0] == 0 && w[1] == 0 && w[2] <= 2));
            assert_eq!(unescape_rbsp(&escaped), data);
        }
    }

    #[test]
    fn key_material_stays_out_of_debug_output() {
        let key = [0xabu8; 16];
        let mut keys = ParticipantKeys::new();
        keys.set_key(9, &key).expect("key");
        let shown = format!("{keys:?} {:?}", keys.slots[9]);
        assert!(shown.contains("redacted"), "{shown}");
        assert!(!shown.contains("171"), "{shown}"); // 0xab in decimal
        assert!(!shown.to_lowercase().contains("abab"), "{shown}");
        let err = DecryptError::AuthFailed { index: 9 };
        assert!(!format!("{err} {err:?}").contains("171"));
    }

    /* Fixture generator (Python 3, `pip install cryptography`); its output is the *_ENC
       constants above. It is an independent implementation of MATRIXRTC.md Part 2 A2–A5,
       written from the spec rather than from this module.

    import struct
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    SALT = b"LKFrameEncryptionKey"
    INFO = bytes(128)

    def hkdf(ikm, length):
        return HKDF(algorithm=hashes.SHA256(), length=length, salt=SALT, info=INFO).derive(ikm)

    def aes_key(material):
        return hkdf(material, 16)

    def ratchet(material):
        return hkdf(material, 32)

    def make_iv(ssrc, ts, send_count):
        return struct.pack(">III", ssrc, ts, (ts - (send_count % 0xFFFF)) & 0xFFFFFFFF)

    def nalu_starts(d):
        # Indices just after 3- or 4-byte Annex-B start codes.
        out, i = [], 0
        while i + 3 <= len(d):
            if d[i:i + 3] == b"\x00\x00\x01":
                out.append(i + 3); i += 3
            else:
                i += 1
        return out

    def header_len(codec, frame):
        if codec == "opus":
            return 1, False
        if codec == "vp8":
            return (10 if frame[0] & 1 == 0 else 3), False
        if codec == "h264":
            for s in nalu_starts(frame):
                if frame[s] & 0x1F in (1, 5):
                    return s + 2, True
            raise ValueError("no slice")
        raise ValueError(codec)

    def write_rbsp(data):
        out, zeros = bytearray(), 0
        for b in data:
            if b <= 3 and zeros >= 2:
                out.append(3); zeros = 0
            out.append(b)
            zeros = zeros + 1 if b == 0 else 0
        return bytes(out)

    def encrypt(material, kid, codec, frame, iv):
        n, rbsp = header_len(codec, frame)
        header = frame[:n]
        ct = AESGCM(aes_key(material)).encrypt(iv, frame[n:], header)
        body = ct + iv + bytes([12, kid])
        return header + (write_rbsp(body) if rbsp else body), len(write_rbsp(body)) != len(body)

    # A8 HKDF vectors.
    raw = bytes(range(16))
    print("aes_key", aes_key(raw).hex())
    print("chain1 ", ratchet(raw).hex())
    print("aes1   ", aes_key(ratchet(raw)).hex())
    print("ct     ", AESGCM(aes_key(raw)).encrypt(bytes(12), bytes(range(17)), b"").hex())

    KEY = bytes.fromhex("5ca1ab1e00112233445566778899aabb")
    SSRC = 0x1A2B3C4D

    opus = bytes([0x78]) + bytes((i * 7 + 3) & 0xFF for i in range(59))
    vp8_key = bytes.fromhex("5004009d012a8002e001") + bytes((i * 13 + 1) & 0xFF for i in range(90))
    vp8_delta = bytes.fromhex("b10200") + bytes((i * 29 + 5) & 0xFF for i in range(61))
    sps = bytes.fromhex("6742c01f0fd91f888884000003000400000300c83c60c920")
    pps = bytes.fromhex("6887cb83cb20")
    idr = bytes.fromhex("658884") + bytes((i * 31 + 11) & 0xFF for i in range(200))
    sc = b"\x00\x00\x00\x01"
    h264 = sc + sps + sc + pps + sc + idr

    def emit(name, codec, frame, kid, ts, count, material=KEY):
        iv = make_iv(SSRC, ts, count)
        enc, escaped = encrypt(material, kid, codec, frame, iv)
        print(f"{name}_plain", frame.hex())
        print(f"{name}_enc  ", enc.hex(), "(rbsp escaped)" if escaped else "")
        return escaped

    emit("opus", "opus", opus, 0, 960 * 1000, 12345)
    emit("vp8key", "vp8", vp8_key, 1, 90000 * 7, 4242)
    emit("vp8delta", "vp8", vp8_delta, 1, 90000 * 7 + 3000, 4243)

    # H.264: advance the RTP timestamp (as a sender would) until the ciphertext part itself,
    # not only the IV, needs emulation prevention.
    ts = 90000 * 11
    while True:
        iv = make_iv(SSRC, ts, 777)
        n, _ = header_len("h264", h264)
        ct = AESGCM(aes_key(KEY)).encrypt(iv, h264[n:], h264[:n])
        if len(write_rbsp(ct)) != len(ct):
            break
        ts += 3000
    assert emit("h264", "h264", h264, 3, ts, 777)
    print("h264_ts", ts)

    # Ratchet fallback fixture: encrypted with the key ratcheted twice, at index 2.
    emit("vp8ratchet2", "vp8", vp8_delta, 2, 90000 * 9, 99, material=ratchet(ratchet(KEY)))
    */
}
