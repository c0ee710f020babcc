//! Newtypes for identifiers so a room id cannot be passed where a user id is expected.
//!
//! Ids that come from outside (room, user, device, protocol call id, track id) are stored verbatim;
//! ids that mxrec mints (call, recording, participant stint) are UUIDv7 strings, which sort by
//! creation time and so keep listings and object keys in chronological order.

use serde::{Deserialize, Serialize};
use std::fmt;

macro_rules! string_id {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            pub fn new(id: impl Into<String>) -> Self {
                Self(id.into())
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                Self(s.to_owned())
            }
        }

        impl From<String> for $name {
            fn from(s: String) -> Self {
                Self(s)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

macro_rules! minted_id {
    ($(#[$meta:meta])* $name:ident) => {
        string_id!($(#[$meta])* $name);

        impl $name {
            /// A fresh time-ordered id.
            pub fn generate() -> Self {
                Self(uuid::Uuid::now_v7().to_string())
            }
        }
    };
}

string_id!(
    /// A room id as the homeserver spells it, e.g. `!abc:example.org`.
    RoomId
);
string_id!(
    /// A user id, e.g. `@alice:example.org`.
    UserId
);
string_id!(
    /// A device id as reported by the participant's client.
    DeviceId
);
string_id!(
    /// A track id chosen by the recorder, unique within a recording.
    TrackId
);
minted_id!(
    /// A call as mxrec sees it; the protocol's own call id is kept alongside as `external_id`.
    CallId
);
minted_id!(
    /// One recording of a call.
    RecordingId
);
minted_id!(
    /// One stint of a participant in a recording (join to leave); a rejoin is a new stint.
    ParticipantId
);
minted_id!(
    /// One audit log entry.
    AuditEventId
);
