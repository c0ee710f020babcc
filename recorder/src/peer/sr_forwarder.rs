//! [`SrForwarder`]: the interceptor that lets RTCP Sender Reports reach the application.
//!
//! webrtc-rs 0.21 ends its inbound RTCP path in a stage that drops every packet no interceptor
//! marked with [`Attribute::DeliverToApplication`], so with the default chain
//! `TrackRemoteEvent::OnRtcpPacket` never carries an SR. The receive path needs SRs to put a
//! participant's tracks on one clock, so this interceptor sits last (application-most, after the
//! report interceptors have read everything) and marks compound packets down to their SRs. Other
//! RTCP (receiver reports, NACKs, TWCC) has already been acted on upstream and stops here.

use std::collections::VecDeque;
use std::time::Instant;

use rtc::interceptor::{Attribute, Interceptor, Packet, StreamInfo, TaggedPacket};
use rtc::rtcp::sender_report::SenderReport;
use rtc::sansio::Protocol;

/// Application-most position in the interceptor chain (the named slots end at 13 000).
pub(super) const SLOT: usize = 14_000;

#[derive(Default)]
pub(crate) struct SrForwarder {
    read_queue: VecDeque<TaggedPacket>,
    write_queue: VecDeque<TaggedPacket>,
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for SrForwarder {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = rtc::shared::error::Error;
    type Time = Instant;

    fn handle_read(&mut self, mut msg: TaggedPacket) -> Result<(), Self::Error> {
        if let Packet::Rtcp(packets) = &msg.message.packet {
            // An empty compound packet is the chain's attribute carrier: pass it on untouched.
            if !packets.is_empty() {
                let srs: Vec<_> =
                    packets.iter().filter(|p| p.as_any().is::<SenderReport>()).cloned().collect();
                if srs.is_empty() {
                    return Ok(());
                }
                msg.message.packet = Packet::Rtcp(srs);
                msg.message.add(Attribute::DeliverToApplication);
            }
        }
        self.read_queue.push_back(msg);
        Ok(())
    }

    fn poll_read(&mut self) -> Option<TaggedPacket> {
        self.read_queue.pop_front()
    }

    fn handle_write(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        self.write_queue.push_back(msg);
        Ok(())
    }

    fn poll_write(&mut self) -> Option<TaggedPacket> {
        self.write_queue.pop_front()
    }
}

impl Interceptor for SrForwarder {
    fn bind_local_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_local_stream(&mut self, _info: &StreamInfo) {}
    fn bind_remote_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_remote_stream(&mut self, _info: &StreamInfo) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtc::interceptor::AttributedPacket;
    use rtc::rtcp::receiver_report::ReceiverReport;
    use rtc::shared::{TransportContext, TransportMessage};

    fn tagged(packet: Packet) -> TaggedPacket {
        TransportMessage {
            now: Instant::now(),
            transport: TransportContext::default(),
            message: AttributedPacket::new(packet),
        }
    }

    #[test]
    fn compound_rtcp_is_narrowed_to_its_sender_reports_and_marked() {
        let mut f = SrForwarder::default();
        let sr = SenderReport { ssrc: 7, ntp_time: 1 << 32, rtp_time: 90, ..Default::default() };
        f.handle_read(tagged(Packet::Rtcp(vec![
            Box::new(ReceiverReport { ssrc: 1, ..Default::default() }),
            Box::new(sr.clone()),
        ])))
        .unwrap();
        let out = f.poll_read().expect("the SR goes on");
        assert!(out.message.has(&Attribute::DeliverToApplication));
        let Packet::Rtcp(pkts) = &out.message.packet else { panic!("RTCP stays RTCP") };
        assert_eq!(pkts.len(), 1);
        assert_eq!(pkts[0].as_any().downcast_ref::<SenderReport>(), Some(&sr));
    }

    #[test]
    fn other_rtcp_stops_here_and_rtp_and_carriers_pass() {
        let mut f = SrForwarder::default();
        f.handle_read(tagged(Packet::Rtcp(vec![Box::new(ReceiverReport::default())]))).unwrap();
        assert!(f.poll_read().is_none());
        f.handle_read(tagged(Packet::Rtcp(vec![]))).unwrap();
        let carrier = f.poll_read().expect("attribute carrier passes");
        assert!(!carrier.message.has(&Attribute::DeliverToApplication));
        f.handle_read(tagged(Packet::Rtp(rtc::rtp::Packet::default()))).unwrap();
        assert!(matches!(f.poll_read().unwrap().message.packet, Packet::Rtp(_)));
    }
}
