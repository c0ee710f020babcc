//! Entry points for the cargo-fuzz targets in `fuzz/` (docs/dev/fuzzing.md). Not an API: mxrec
//! itself never calls this module. Each item opens up one code path that is otherwise private,
//! so that the targets drive the code the recorder runs instead of a copy of it.

use std::sync::OnceLock;
use std::time::Instant;

use rtc::interceptor::{Attribute, AttributedPacket, Packet};
use rtc::peer_connection::certificate::RTCCertificate;
use rtc::peer_connection::configuration::RTCConfigurationBuilder;
use rtc::peer_connection::transport::RTCIceCandidateInit;
use rtc::peer_connection::sdp::RTCSessionDescription;
use rtc::peer_connection::{RTCPeerConnection, RTCPeerConnectionBuilder};
use rtc::rtcp::Packet as RtcpPacket;
use rtc::sansio::Protocol;
use rtc::shared::{TransportContext, TransportMessage};

use crate::peer::sr_forwarder::SrForwarder;
use crate::peer::{connection_parts, ConnectionParts};
use crate::voip1::RemoteCandidate;

pub use crate::rtp::reorder::{HeldPacket, PushOutcome, Released, ReorderBuffer};

/// Applies a remote offer and its candidates to a sans-IO connection built from the same
/// [`connection_parts`] as every `RecvPeer`, then creates and sets the answer, and returns the
/// answer SDP. `RecvPeer` makes the same calls through webrtc-rs's async wrapper, which only
/// locks this core around each of them and wakes its driver; sockets and gathering are left out.
pub fn answer_offer(offer_sdp: &str, candidates: &[RemoteCandidate]) -> Result<String, String> {
    let now = Instant::now();
    let mut pc = connection(now)?;
    let offer = RTCSessionDescription::offer(offer_sdp.to_owned()).map_err(|e| format!("offer: {e}"))?;
    pc.set_remote_description(now, offer).map_err(|e| format!("set_remote_description: {e}"))?;
    for c in candidates.iter().filter(|c| !c.is_end_of_candidates()) {
        let init = RTCIceCandidateInit {
            candidate: c.candidate.clone(),
            sdp_mid: c.sdp_mid.clone(),
            sdp_mline_index: c.sdp_mline_index,
            ..Default::default()
        };
        // RecvPeer logs a refused candidate and goes on; so does this.
        let _ = pc.add_remote_candidate(init);
    }
    let answer = pc.create_answer(None).map_err(|e| format!("create_answer: {e}"))?;
    let sdp = answer.sdp.clone();
    pc.set_local_description(now, answer).map_err(|e| format!("set_local_description: {e}"))?;
    Ok(sdp)
}

/// A fresh core connection. The DTLS certificate of the first one is reused by the next ones:
/// generating a key pair per input would make it most of the work.
fn connection(now: Instant) -> Result<RTCPeerConnection, String> {
    static CERTIFICATES: OnceLock<Vec<RTCCertificate>> = OnceLock::new();
    let build = |certificates: Vec<RTCCertificate>| {
        let ConnectionParts { media_engine, registry, settings } =
            connection_parts().map_err(|e| format!("connection parts: {e}"))?;
        RTCPeerConnectionBuilder::new()
            .with_configuration(RTCConfigurationBuilder::new().with_certificates(certificates).build())
            .with_media_engine(media_engine)
            .with_setting_engine(settings)
            .with_interceptor_registry(registry)
            .build(now)
            .map_err(|e| format!("building the connection: {e}"))
    };
    if let Some(certificates) = CERTIFICATES.get() {
        return build(certificates.clone());
    }
    let pc = build(Vec::new())?;
    let _ = CERTIFICATES.set(pc.get_configuration().certificates().to_vec());
    Ok(pc)
}

/// What the `SrForwarder` interceptor hands on towards the application for one inbound compound
/// RTCP packet (as webrtc-rs unmarshalled it), and whether it marked it for delivery. `None` when
/// the packet stops there.
pub fn rtcp_for_application(packets: Vec<Box<dyn RtcpPacket>>) -> Option<(Vec<Box<dyn RtcpPacket>>, bool)> {
    let mut forwarder = SrForwarder::default();
    let msg = TransportMessage {
        now: Instant::now(),
        transport: TransportContext::default(),
        message: AttributedPacket::new(Packet::Rtcp(packets)),
    };
    forwarder.handle_read(msg).expect("the forwarder never fails a read");
    let out = forwarder.poll_read()?;
    let delivered = out.message.has(&Attribute::DeliverToApplication);
    let Packet::Rtcp(packets) = out.message.packet else { panic!("RTCP in, something else out") };
    Some((packets, delivered))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtc::rtcp::receiver_report::ReceiverReport;
    use rtc::rtcp::sender_report::SenderReport;

    /// What aiortc offers for one microphone (the seed of the sdp target).
    const OFFER: &str = "v=0\r\no=- 3919487412 3919487412 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n\
        a=group:BUNDLE 0\r\na=msid-semantic:WMS *\r\nm=audio 50000 UDP/TLS/RTP/SAVPF 96 0\r\n\
        c=IN IP4 127.0.0.1\r\na=sendrecv\r\na=mid:0\r\na=msid:stream0 audio0\r\na=rtcp-mux\r\n\
        a=ssrc:1001 cname:aiortc\r\na=rtpmap:96 opus/48000/2\r\na=rtpmap:0 PCMU/8000\r\n\
        a=ice-ufrag:abcd\r\na=ice-pwd:0123456789abcdefghijklmn\r\n\
        a=fingerprint:sha-256 AA:BB:CC:DD:EE:FF:00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF:00:11:22:33:44:55:66:77:88:99\r\n\
        a=setup:actpass\r\n";

    #[test]
    fn an_offer_is_answered_like_recv_peer_does() {
        let candidate = RemoteCandidate {
            candidate: "candidate:1 1 udp 2130706431 127.0.0.1 50000 typ host".into(),
            sdp_mid: Some("0".into()),
            sdp_mline_index: Some(0),
        };
        for _ in 0..2 {
            // The second connection reuses the first one's certificate.
            let answer = answer_offer(OFFER, std::slice::from_ref(&candidate)).unwrap();
            assert!(answer.contains("a=mid:0") && answer.contains("opus/48000"), "{answer}");
            assert!(answer.contains("a=recvonly"), "{answer}");
        }
        assert!(answer_offer("v=0\r\n", &[]).is_err());
    }

    #[test]
    fn rtcp_reaches_the_application_as_its_sender_reports() {
        let sr = SenderReport { ssrc: 7, ntp_time: 1 << 32, rtp_time: 90, ..Default::default() };
        let (out, delivered) =
            rtcp_for_application(vec![Box::new(ReceiverReport::default()), Box::new(sr.clone())]).unwrap();
        assert!(delivered);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].as_any().downcast_ref::<SenderReport>(), Some(&sr));
        assert!(rtcp_for_application(vec![Box::new(ReceiverReport::default())]).is_none());
    }
}
