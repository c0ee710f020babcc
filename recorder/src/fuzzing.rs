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
