//! MSC3401 mesh group calls (matrix-js-sdk's GroupCall), as pure state machines: a room's group
//! calls and their members ([`session`]), and the bot's peer calls inside the one it records
//! ([`call`]), with the wire format in [`events`]. Nothing here touches a socket or a clock.
//!
//! In a mesh call every participant calls every other over to-device messages; the bot joins as
//! one more participant that sends no media, so every participant sends it their tracks.

pub mod call;
pub mod events;
pub mod session;

pub use call::{MeshCall, MeshIgnore, MeshInput, MeshOutput, PeerKey};
pub use session::{MeshSession, PeerDevice};
