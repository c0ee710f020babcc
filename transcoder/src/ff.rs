//! Small safe wrappers over the few libav* calls ffmpeg-next does not expose.

use ff::ffi;
use ffmpeg_next as ff;

/// Copies `data` into freshly av_malloc'ed, padded extradata of `par`.
///
/// # Safety
/// `par` must point to valid codec parameters.
pub(crate) unsafe fn set_extradata(par: *mut ffi::AVCodecParameters, data: &[u8]) {
    if !(*par).extradata.is_null() {
        ffi::av_freep(&mut (*par).extradata as *mut *mut u8 as *mut std::ffi::c_void);
        (*par).extradata_size = 0;
    }
    if data.is_empty() {
        return;
    }
    let pad = ffi::AV_INPUT_BUFFER_PADDING_SIZE as usize;
    let buf = ffi::av_mallocz(data.len() + pad) as *mut u8;
    assert!(!buf.is_null(), "out of memory");
    std::ptr::copy_nonoverlapping(data.as_ptr(), buf, data.len());
    (*par).extradata = buf;
    (*par).extradata_size = data.len() as i32;
}

/// Decodes one key frame to learn its dimensions. Used where parsing the dimensions out of the
/// bitstream would mean a full SPS or AV1 sequence/frame header parser; a single decode per
/// segment is cheap next to the network receive it sits behind.
pub(crate) fn decoded_size(
    codec: ffi::AVCodecID,
    extradata: &[u8],
    frame: &[u8],
) -> Option<(u32, u32)> {
    let decoder = if codec == ffi::AVCodecID::AV_CODEC_ID_AV1 {
        // The native AV1 decoder needs a hardware accelerator; libdav1d is the software one.
        ff::decoder::find_by_name("libdav1d").or_else(|| ff::decoder::find_by_name("libaom-av1"))?
    } else {
        ff::decoder::find(codec.into())?
    };
    let mut ctx = ff::codec::Context::new_with_codec(decoder);
    unsafe {
        let raw = ctx.as_mut_ptr();
        if !extradata.is_empty() {
            let pad = ffi::AV_INPUT_BUFFER_PADDING_SIZE as usize;
            let buf = ffi::av_mallocz(extradata.len() + pad) as *mut u8;
            std::ptr::copy_nonoverlapping(extradata.as_ptr(), buf, extradata.len());
            (*raw).extradata = buf;
            (*raw).extradata_size = extradata.len() as i32;
        }
        (*raw).thread_count = 1;
    }
    let mut dec = ctx.decoder().video().ok()?;
    let mut pkt = ff::Packet::copy(frame);
    pkt.set_pts(Some(0));
    pkt.set_flags(ff::packet::Flags::KEY);
    dec.send_packet(&pkt).ok()?;
    let _ = dec.send_eof();
    let mut out = ff::frame::Video::empty();
    while dec.receive_frame(&mut out).is_ok() {
        if out.width() > 0 && out.height() > 0 {
            return Some((out.width(), out.height()));
        }
    }
    None
}

pub(crate) fn err_string(code: i32) -> String {
    ff::Error::from(code).to_string()
}
