//! A room's mesh group calls as its state says: which group calls exist (and which ended), and
//! which devices of which members are in them. Pure: state events and `now` go in; the call to
//! record and its peers come out.
//!
//! A device counts while its `expires_ts` is in the future and its user is joined to the room.
//! The bot's own device never counts. The call worth recording is a group call that has not
//! ended and has at least one device besides the bot's (with several, the one with most devices).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use super::events::{self, MemberDevice, MeshParseError};

/// One device in the call, as the bot's peer calls need it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PeerDevice {
    pub user_id: String,
    pub device_id: String,
    pub session_id: String,
}

#[derive(Debug, Default)]
pub struct MeshSession {
    own: Option<(String, String)>,
    /// Group call id → ended.
    calls: BTreeMap<String, bool>,
    /// User → their announced devices (every group call).
    members: BTreeMap<String, Vec<MemberDevice>>,
    /// `origin_server_ts` of the member state applied per user: a sync can hand back an older
    /// state event after a newer one (two sent at once), which must not undo the newer.
    member_ts: BTreeMap<String, u64>,
    joined: BTreeSet<String>,
}

impl MeshSession {
    pub fn new() -> Self {
        Self::default()
    }

    /// The bot's own user and device, which never count as a peer.
    pub fn set_own_device(&mut self, user_id: &str, device_id: &str) {
        self.own = Some((user_id.to_owned(), device_id.to_owned()));
    }

    /// Room membership of a user; the devices of users not joined do not count.
    pub fn set_joined(&mut self, user_id: &str, joined: bool) {
        if joined {
            self.joined.insert(user_id.to_owned());
        } else {
            self.joined.remove(user_id);
        }
    }

    /// An `org.matrix.msc3401.call` state event.
    pub fn handle_call_state(&mut self, group_call_id: &str, content: &Value) -> Result<(), MeshParseError> {
        match events::parse_group_call(content) {
            Ok(s) => {
                self.calls.insert(group_call_id.to_owned(), s.terminated);
                Ok(())
            }
            Err(e) => {
                // The room's state no longer holds a usable call under that id.
                self.calls.insert(group_call_id.to_owned(), true);
                Err(e)
            }
        }
    }

    /// An `org.matrix.msc3401.call.member` state event with mesh content (`m.calls`), sent at
    /// `ts`. A refused one replaces what the user had announced by nothing, as the room state
    /// now holds it; one older than what was applied for that user changes nothing.
    pub fn handle_member_state(&mut self, state_key: &str, sender: &str, ts: u64, content: &Value) -> Result<(), MeshParseError> {
        if state_key == sender {
            match self.member_ts.get(state_key) {
                Some(&seen) if ts < seen => return Ok(()),
                _ => {
                    self.member_ts.insert(state_key.to_owned(), ts);
                }
            }
        }
        match events::parse_member(state_key, sender, content) {
            Ok(devices) => {
                if devices.is_empty() {
                    self.members.remove(state_key);
                } else {
                    self.members.insert(state_key.to_owned(), devices);
                }
                Ok(())
            }
            Err(e) => {
                if state_key == sender {
                    self.members.remove(state_key);
                }
                Err(e)
            }
        }
    }

    fn live_devices<'a>(&'a self, call_id: &'a str, now_ms: u64) -> impl Iterator<Item = (&'a str, &'a MemberDevice)> + 'a {
        self.members
            .iter()
            .filter(|(user, _)| self.joined.contains(*user))
            .flat_map(|(user, devices)| devices.iter().map(move |d| (user.as_str(), d)))
            .filter(move |(_, d)| d.call_id == call_id && d.expires_ts.is_none_or(|t| t > now_ms))
            .filter(|(user, d)| self.own.as_ref().is_none_or(|(u, dev)| !(u == user && *dev == d.device_id)))
    }

    /// The group call to record: not ended, with the most devices besides the bot's.
    pub fn active_call(&self, now_ms: u64) -> Option<String> {
        self.calls
            .iter()
            .filter(|(_, ended)| !**ended)
            .map(|(id, _)| (self.live_devices(id, now_ms).count(), id))
            .filter(|(n, _)| *n > 0)
            .max_by(|a, b| a.0.cmp(&b.0).then_with(|| b.1.cmp(a.1)))
            .map(|(_, id)| id.clone())
    }

    /// The devices in `call_id` now, besides the bot's, in a stable order.
    pub fn devices(&self, call_id: &str, now_ms: u64) -> Vec<PeerDevice> {
        let mut v: Vec<PeerDevice> = self
            .live_devices(call_id, now_ms)
            .map(|(user, d)| PeerDevice { user_id: user.to_owned(), device_id: d.device_id.clone(), session_id: d.session_id.clone() })
            .collect();
        v.sort();
        v.dedup_by(|a, b| a.user_id == b.user_id && a.device_id == b.device_id);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn member(call: &str, devices: &[(&str, &str, u64)]) -> Value {
        let d: Vec<Value> = devices
            .iter()
            .map(|(dev, sess, exp)| json!({"device_id": dev, "session_id": sess, "expires_ts": exp, "feeds": [{"purpose": "m.usermedia"}]}))
            .collect();
        json!({"m.calls": [{"m.call_id": call, "m.devices": d}]})
    }

    fn session() -> MeshSession {
        let mut s = MeshSession::new();
        s.set_own_device("@bot:x", "BOT");
        for u in ["@a:x", "@b:x", "@bot:x"] {
            s.set_joined(u, true);
        }
        s
    }

    #[test]
    fn a_call_is_active_while_someone_else_is_in_it() {
        let mut s = session();
        s.handle_call_state("g", &json!({"m.intent": "m.room", "m.type": "m.video"})).unwrap();
        assert_eq!(s.active_call(1000), None, "nobody in it");
        s.handle_member_state("@bot:x", "@bot:x", 1, &member("g", &[("BOT", "sb", 5000)])).unwrap();
        assert_eq!(s.active_call(1000), None, "the bot alone does not make a call");
        s.handle_member_state("@a:x", "@a:x", 1, &member("g", &[("A1", "sa", 5000)])).unwrap();
        assert_eq!(s.active_call(1000).as_deref(), Some("g"));
        assert_eq!(
            s.devices("g", 1000),
            vec![PeerDevice { user_id: "@a:x".into(), device_id: "A1".into(), session_id: "sa".into() }]
        );
        assert_eq!(s.active_call(5000), None, "expired");
        s.handle_member_state("@a:x", "@a:x", 1, &member("g", &[("A1", "sa", 9000)])).unwrap();
        assert_eq!(s.active_call(5000).as_deref(), Some("g"), "refreshed");
        s.handle_call_state("g", &json!({"m.intent": "m.room", "m.terminated": "call_ended"})).unwrap();
        assert_eq!(s.active_call(5000), None, "terminated");
    }

    #[test]
    fn leaving_the_room_or_the_call_removes_devices() {
        let mut s = session();
        s.handle_call_state("g", &json!({"m.type": "m.video"})).unwrap();
        s.handle_member_state("@a:x", "@a:x", 1, &member("g", &[("A1", "sa", 5000)])).unwrap();
        s.handle_member_state("@b:x", "@b:x", 1, &member("g", &[("B1", "sb", 5000), ("B2", "sb2", 5000)])).unwrap();
        assert_eq!(s.devices("g", 0).len(), 3);
        s.set_joined("@b:x", false);
        assert_eq!(s.devices("g", 0).len(), 1, "b left the room");
        s.handle_member_state("@a:x", "@a:x", 2, &json!({"m.calls": []})).unwrap();
        assert_eq!(s.active_call(0), None);
        // A malformed update withdraws what the user had announced.
        s.set_joined("@b:x", true);
        assert!(s.handle_member_state("@b:x", "@b:x", 2, &json!({"m.calls": 1})).is_err());
        assert!(s.devices("g", 0).is_empty());
        // Someone else's state key is refused and changes nothing.
        s.handle_member_state("@a:x", "@a:x", 4, &member("g", &[("A1", "sa", 5000)])).unwrap();
        assert!(s.handle_member_state("@a:x", "@b:x", 5, &json!({"m.calls": []})).is_err());
        assert_eq!(s.devices("g", 0).len(), 1);
        // A sync that hands back an older state event does not undo the newer one.
        s.handle_member_state("@a:x", "@a:x", 3, &json!({"m.calls": []})).unwrap();
        assert_eq!(s.devices("g", 0).len(), 1);
    }

    #[test]
    fn the_fuller_call_wins_and_other_calls_are_not_mixed_in() {
        let mut s = session();
        s.handle_call_state("g1", &json!({"m.type": "m.video"})).unwrap();
        s.handle_call_state("g2", &json!({"m.type": "m.video"})).unwrap();
        s.handle_member_state("@a:x", "@a:x", 1, &member("g1", &[("A1", "sa", 5000)])).unwrap();
        s.handle_member_state("@b:x", "@b:x", 1, &member("g2", &[("B1", "sb", 5000), ("B2", "sb2", 5000)])).unwrap();
        assert_eq!(s.active_call(0).as_deref(), Some("g2"));
        assert_eq!(s.devices("g1", 0).len(), 1);
        // Devices of a call with no call state event do not make a call.
        s.handle_member_state("@a:x", "@a:x", 1, &member("nocall", &[("A1", "sa", 5000)])).unwrap();
        assert_eq!(s.devices("g1", 0).len(), 0);
        assert!(s.handle_call_state("g2", &json!("junk")).is_err());
        assert_eq!(s.active_call(0), None, "a call state that does not parse ends the call");
    }
}
