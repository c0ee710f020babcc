//! One inbound compound RTCP packet, as the recorder gets it: unmarshalled by rtc-rtcp (our
//! patched copy in vendor/, exactly as webrtc-rs calls it after SRTCP), narrowed by the
//! `SrForwarder` interceptor to its Sender Reports, each turned into the timing of its track and
//! fed, through the participant's clock, to a `TrackReceiver` that is receiving audio around the
//! report's RTP time.
//!
//! Input: the compound packet, raw.
//!
//! Checks: the forwarder passes on exactly the input's Sender Reports, marked for delivery, and
//! nothing when there are none; source description chunks (the part of rtc-rtcp that mxrec
//! patches) marshal back to what was parsed; frame timestamps stay non-negative and strictly
//! increasing by at least 1 ms whatever the report says.

#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use recorder::rtp::{ParticipantClock, ReceiverConfig, ReceiverOutput, SenderReportTiming, TrackReceiver};
use rtc_rtcp::sender_report::SenderReport;
use rtc_rtcp::source_description::SourceDescription;
use transcoder::Codec;

fuzz_target!(|data: &[u8]| {
    let mut raw = Bytes::copy_from_slice(data);
    let Ok(packets) = rtc_rtcp::packet::unmarshal(&mut raw) else { return };

    let srs: Vec<SenderReport> =
        packets.iter().filter_map(|p| p.as_any().downcast_ref::<SenderReport>()).cloned().collect();
    for sdes in packets.iter().filter_map(|p| p.as_any().downcast_ref::<SourceDescription>()) {
        let boxed: Vec<Box<dyn rtc_rtcp::packet::Packet>> = vec![Box::new(sdes.clone())];
        if let Ok(wire) = rtc_rtcp::packet::marshal(&boxed) {
            let again = rtc_rtcp::packet::unmarshal(&mut wire.freeze()).expect("a marshalled SDES parses");
            let again = again[0].as_any().downcast_ref::<SourceDescription>().expect("still an SDES");
            assert_eq!(again, sdes, "SDES changed across marshal and unmarshal");
        }
    }

    let forwarded = recorder::fuzzing::rtcp_for_application(packets);
    let Some((forwarded, delivered)) = forwarded else {
        assert!(srs.is_empty(), "{} Sender Reports stopped by the forwarder", srs.len());
        return;
    };
    assert!(delivered, "forwarded RTCP not marked for the application");
    let forwarded: Vec<SenderReport> = forwarded
        .iter()
        .map(|p| p.as_any().downcast_ref::<SenderReport>().expect("only Sender Reports are forwarded").clone())
        .collect();
    assert_eq!(forwarded, srs);

    // The track's poll loop hands each report to the receiver of its SSRC; one participant here.
    let mut clock = ParticipantClock::default();
    let mut rx = TrackReceiver::new(ReceiverConfig::new(Codec::Opus));
    let mut now_us = 5_000_000i64;
    let mut seq = 0u16;
    let mut last_pts: Option<i64> = None;
    let opus = Bytes::from_static(&[0x78, 0x01, 0x02]);
    for sr in &forwarded {
        let timing = SenderReportTiming::from(sr);
        // Packets shortly before the report, the report, packets after it.
        for k in [-3i64, -2, -1, 0, 1, 2, 3, 50] {
            if k == 0 {
                let offset = clock.offset(timing, now_us);
                rx.handle_sender_report(timing, offset);
                continue;
            }
            let mut p = rtc_rtp::Packet::default();
            p.header.version = 2;
            p.header.sequence_number = seq;
            p.header.timestamp = timing.rtp_time.wrapping_add((k * 960) as u32);
            p.header.marker = true;
            p.payload = opus.clone();
            seq = seq.wrapping_add(1);
            now_us += 20_000;
            let _ = rx.handle_rtp(now_us, p);
            while let Some(out) = rx.poll_output() {
                if let ReceiverOutput::Frame(f) = out {
                    assert!(f.pts_us >= 0, "frame at {} µs", f.pts_us);
                    if let Some(last) = last_pts {
                        assert!(f.pts_us >= last + 1000, "frame at {} µs after one at {last} µs", f.pts_us);
                    }
                    last_pts = Some(f.pts_us);
                }
            }
        }
    }
});
