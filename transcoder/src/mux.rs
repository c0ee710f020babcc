//! One Matroska/WebM file with one stream, written packet by packet. The segment is written
//! under a `.partial` name and renamed only after its trailer is on disk and fsynced, so a
//! file with the final name is always complete and playable on its own, and a crash leaves at
//! most one `.partial` behind.

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::ptr;

use ffmpeg_next::ffi;

use crate::codec::Codec;
use crate::error::TranscodeError;
use crate::ff::{err_string, set_extradata};

pub(crate) struct StreamParams {
    pub codec: Codec,
    pub width: u32,
    pub height: u32,
    pub sample_rate: u32,
    pub channels: u16,
    pub extradata: Vec<u8>,
}

pub(crate) struct SegmentMuxer {
    ctx: *mut ffi::AVFormatContext,
    partial: PathBuf,
    path: PathBuf,
    trailer_written: bool,
}

// The context is owned exclusively by this value and never shared between threads.
unsafe impl Send for SegmentMuxer {}

fn ff_err(context: String, code: i32) -> TranscodeError {
    TranscodeError::Ffmpeg {
        context,
        source: ffmpeg_next::Error::from(code),
    }
}

/// Longest Matroska cluster of a live segment, in milliseconds: at most this much of an open
/// segment is only in memory.
pub const LIVE_CLUSTER_MS: i64 = 500;

/// Where a file is written until it is complete: `<path>.partial`.
pub(crate) fn partial_path(path: &Path) -> PathBuf {
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    PathBuf::from(partial)
}

impl SegmentMuxer {
    pub fn create(path: &Path, params: &StreamParams) -> Result<Self, TranscodeError> {
        Self::create_with(path, params.codec.muxer_name(), true, |par| unsafe {
            (*par).codec_id = params.codec.ff_id();
            match params.codec.kind() {
                crate::MediaKind::Audio => {
                    (*par).codec_type = ffi::AVMediaType::AVMEDIA_TYPE_AUDIO;
                    (*par).sample_rate = params.sample_rate as i32;
                    ffi::av_channel_layout_default(&mut (*par).ch_layout, params.channels as i32);
                }
                crate::MediaKind::Video => {
                    (*par).codec_type = ffi::AVMediaType::AVMEDIA_TYPE_VIDEO;
                    (*par).width = params.width as i32;
                    (*par).height = params.height as i32;
                }
            }
            set_extradata(par, &params.extradata);
            Ok(())
        })
    }

    /// A muxer whose stream takes every codec parameter of a demuxed stream, for copying that
    /// stream's packets as they are (`muxer` is `webm` or `matroska`).
    pub fn create_copy(
        path: &Path,
        muxer: &str,
        src: &ffmpeg_next::codec::Parameters,
    ) -> Result<Self, TranscodeError> {
        Self::create_with(path, muxer, false, |par| unsafe {
            let r = ffi::avcodec_parameters_copy(par, src.as_ptr());
            if r < 0 {
                return Err(ff_err("copying stream parameters".into(), r));
            }
            // The demuxer's tag belongs to the source container; the muxer picks its own.
            (*par).codec_tag = 0;
            Ok(())
        })
    }

    /// With `live` (a segment written while the call runs) the file on disk grows every
    /// [`LIVE_CLUSTER_MS`]: Matroska clusters are kept that short and flushed as they close, so a
    /// process killed mid-segment leaves a file that [`crate::salvage_segment`] can rebuild up to
    /// the last flushed cluster. Without it a whole 2 s segment could sit in the muxer's memory.
    fn create_with(
        path: &Path,
        muxer: &str,
        live: bool,
        fill: impl FnOnce(*mut ffi::AVCodecParameters) -> Result<(), TranscodeError>,
    ) -> Result<Self, TranscodeError> {
        crate::init();
        let partial = partial_path(path);
        let c_path = CString::new(partial.to_string_lossy().as_bytes()).map_err(|_| {
            TranscodeError::Unsupported(format!("path with NUL: {}", path.display()))
        })?;
        let c_fmt = CString::new(muxer)
            .map_err(|_| TranscodeError::Unsupported(format!("muxer name with NUL: {muxer:?}")))?;
        let mut ctx: *mut ffi::AVFormatContext = ptr::null_mut();
        unsafe {
            let r = ffi::avformat_alloc_output_context2(
                &mut ctx,
                ptr::null_mut(),
                c_fmt.as_ptr(),
                c_path.as_ptr(),
            );
            if r < 0 || ctx.is_null() {
                return Err(ff_err(
                    format!("allocating muxer for {}", path.display()),
                    r,
                ));
            }
            let mut mux = SegmentMuxer {
                ctx,
                partial: partial.clone(),
                path: path.to_path_buf(),
                trailer_written: false,
            };
            let st = ffi::avformat_new_stream(ctx, ptr::null());
            if st.is_null() {
                return Err(ff_err(
                    "adding segment stream".into(),
                    ffi::AVERROR(ffi::ENOMEM),
                ));
            }
            (*st).time_base = ffi::AVRational { num: 1, den: 1000 };
            fill((*st).codecpar)?;
            let r = ffi::avio_open(&mut (*ctx).pb, c_path.as_ptr(), ffi::AVIO_FLAG_WRITE);
            if r < 0 {
                return Err(ff_err(format!("opening {}", partial.display()), r));
            }
            let mut opts: *mut ffi::AVDictionary = ptr::null_mut();
            if live {
                (*ctx).flags |= ffi::AVFMT_FLAG_FLUSH_PACKETS;
                let value = CString::new(LIVE_CLUSTER_MS.to_string()).expect("digits");
                ffi::av_dict_set(&mut opts, c"cluster_time_limit".as_ptr(), value.as_ptr(), 0);
            }
            let r = ffi::avformat_write_header(ctx, &mut opts);
            ffi::av_dict_free(&mut opts);
            if r < 0 {
                return Err(ff_err(
                    format!("writing header of {}", partial.display()),
                    r,
                ));
            }
            mux.ctx = ctx;
            Ok(mux)
        }
    }

    /// Writes one packet; times are in milliseconds on the recording clock.
    pub fn write(
        &mut self,
        data: &[u8],
        pts_ms: i64,
        duration_ms: i64,
        keyframe: bool,
    ) -> Result<(), TranscodeError> {
        unsafe {
            let pkt = ffi::av_packet_alloc();
            if pkt.is_null() {
                return Err(ff_err(
                    "allocating packet".into(),
                    ffi::AVERROR(ffi::ENOMEM),
                ));
            }
            let r = ffi::av_new_packet(pkt, data.len() as i32);
            if r < 0 {
                let mut p = pkt;
                ffi::av_packet_free(&mut p);
                return Err(ff_err("allocating packet".into(), r));
            }
            ptr::copy_nonoverlapping(data.as_ptr(), (*pkt).data, data.len());
            (*pkt).pts = pts_ms;
            (*pkt).dts = pts_ms;
            (*pkt).duration = duration_ms.max(0);
            (*pkt).stream_index = 0;
            if keyframe {
                (*pkt).flags |= ffi::AV_PKT_FLAG_KEY;
            }
            let r = ffi::av_write_frame(self.ctx, pkt);
            let mut p = pkt;
            ffi::av_packet_free(&mut p);
            if r < 0 {
                return Err(ff_err(
                    format!(
                        "writing packet at {pts_ms} ms to {}",
                        self.partial.display()
                    ),
                    r,
                ));
            }
        }
        Ok(())
    }

    /// The stream's time base as the muxer settled it when writing the header.
    pub fn time_base(&self) -> ffmpeg_next::Rational {
        unsafe { (*(*(*self.ctx).streams)).time_base.into() }
    }

    /// Writes a demuxed packet as it is (side data included); its timestamps must already be
    /// in [`Self::time_base`].
    pub fn write_packet(&mut self, pkt: &mut ffmpeg_next::Packet) -> Result<(), TranscodeError> {
        pkt.set_stream(0);
        let r = unsafe { ffi::av_write_frame(self.ctx, ffmpeg_next::packet::Mut::as_mut_ptr(pkt)) };
        if r < 0 {
            return Err(ff_err(
                format!(
                    "writing packet at {:?} to {}",
                    pkt.pts(),
                    self.partial.display()
                ),
                r,
            ));
        }
        Ok(())
    }

    /// Writes the trailer, syncs the file to disk and gives it its final name.
    pub fn close(mut self) -> Result<PathBuf, TranscodeError> {
        self.finish_file()?;
        std::fs::rename(&self.partial, &self.path)
            .map_err(TranscodeError::io("renaming closed segment", &self.path))?;
        if let Some(dir) = self.path.parent() {
            // The rename is only durable once the directory entry is.
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(self.path.clone())
    }

    fn finish_file(&mut self) -> Result<(), TranscodeError> {
        unsafe {
            let r = ffi::av_write_trailer(self.ctx);
            self.trailer_written = true;
            ffi::avio_closep(&mut (*self.ctx).pb);
            if r < 0 {
                return Err(ff_err(
                    format!(
                        "writing trailer of {}: {}",
                        self.partial.display(),
                        err_string(r)
                    ),
                    r,
                ));
            }
        }
        let f = std::fs::File::open(&self.partial).map_err(TranscodeError::io(
            "reopening segment to sync it",
            &self.partial,
        ))?;
        f.sync_all()
            .map_err(TranscodeError::io("syncing segment", &self.partial))?;
        Ok(())
    }
}

impl Drop for SegmentMuxer {
    fn drop(&mut self) {
        unsafe {
            if !self.ctx.is_null() {
                if !self.trailer_written && !(*self.ctx).pb.is_null() {
                    // Abandoned (error path): close the file but leave it as .partial.
                    ffi::avio_closep(&mut (*self.ctx).pb);
                }
                ffi::avformat_free_context(self.ctx);
                self.ctx = ptr::null_mut();
            }
        }
    }
}
