//! The webrtc-rs event handler of a [`super::RecvPeer`]. webrtc-rs awaits these callbacks inside
//! its driver loop, so each one only translates the event into a [`PeerOutput`] on an unbounded
//! hop, or spawns the track's tasks, and returns.

use std::sync::Arc;

use webrtc::media_stream::track_remote::TrackRemote;
use webrtc::peer_connection::{
    PeerConnectionEventHandler, RTCIceGatheringState, RTCPeerConnectionIceEvent,
    RTCPeerConnectionState,
};

use super::{PeerOutput, Shared, TrackKey};

pub(super) struct Handler {
    shared: Arc<Shared>,
}

impl Handler {
    pub(super) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for Handler {
    async fn on_ice_candidate(&self, event: RTCPeerConnectionIceEvent) {
        let init = match event.candidate.to_json() {
            Ok(init) => init,
            Err(e) => {
                tracing::warn!(error = %e, "local ICE candidate not serialisable; not sending it");
                return;
            }
        };
        // webrtc-rs reports sdpMid "" for every candidate; peers match on the bundle's mid.
        let sdp_mid = match init.sdp_mid {
            Some(mid) if !mid.is_empty() => Some(mid),
            _ => self.shared.first_mid.lock().unwrap().clone(),
        };
        self.shared.control(PeerOutput::LocalCandidate {
            candidate: init.candidate,
            sdp_mid,
            sdp_mline_index: Some(0),
        });
    }

    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        tracing::debug!(?state, "ICE gathering state");
        self.shared.gathering.send_replace(state);
        if state == RTCIceGatheringState::Complete {
            self.shared.control(PeerOutput::GatheringComplete);
        }
    }

    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        tracing::debug!(?state, "peer connection state");
        match state {
            RTCPeerConnectionState::Connected => self.shared.control(PeerOutput::Connected),
            RTCPeerConnectionState::Failed => self.shared.control(PeerOutput::Failed {
                reason: "ICE/DTLS connection failed".into(),
            }),
            _ => {}
        }
    }

    async fn on_track(&self, track: Arc<dyn TrackRemote>) {
        let key = {
            let mut next = self.shared.next_track.lock().unwrap();
            let key = TrackKey(*next);
            *next += 1;
            key
        };
        tokio::spawn(super::track::run(self.shared.clone(), key, track));
    }
}
