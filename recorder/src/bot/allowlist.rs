//! Who may invite the bot into a room (`matrix.allowed_inviters`).
//!
//! Entries are user ids (`@alice:example.org`), server names (`example.org`, or `:example.org`
//! as a reminder that it matches the part after the colon) and `*` for anyone. An empty list
//! allows nobody: a recorder joins no room its operator did not mean it to.

/// One parsed entry.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    Anyone,
    User(String),
    Server(String),
}

/// The parsed `matrix.allowed_inviters`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allowlist {
    entries: Vec<Entry>,
}

impl Allowlist {
    /// Parses every entry; the first one that is not an entry is returned as the error.
    pub fn new(entries: &[String]) -> Result<Self, String> {
        let entries = entries
            .iter()
            .map(|e| Self::parse_entry(e).ok_or_else(|| e.clone()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { entries: entries.into_iter().map(|p| p.0).collect() })
    }

    /// Whether `entry` is a valid entry (used by configuration validation).
    pub fn parse_entry(entry: &str) -> Option<ParsedEntry> {
        let e = entry.trim();
        if e == "*" {
            return Some(ParsedEntry(Entry::Anyone));
        }
        if let Some(rest) = e.strip_prefix('@') {
            let (local, server) = rest.split_once(':')?;
            if local.is_empty() || !valid_server(server) {
                return None;
            }
            return Some(ParsedEntry(Entry::User(e.to_string())));
        }
        let server = e.strip_prefix(':').unwrap_or(e);
        valid_server(server).then(|| ParsedEntry(Entry::Server(server.to_ascii_lowercase())))
    }

    /// Whether `user_id` (`@local:server`) may invite the bot.
    /// Localparts compare exactly, server names without regard to case.
    pub fn allows(&self, user_id: &str) -> bool {
        let (local, server) = match user_id.split_once(':') {
            Some((l, s)) => (l, s.to_ascii_lowercase()),
            None => (user_id, String::new()),
        };
        self.entries.iter().any(|e| match e {
            Entry::Anyone => true,
            Entry::User(u) => u.split_once(':').is_some_and(|(ul, us)| ul == local && us.eq_ignore_ascii_case(&server)),
            Entry::Server(s) => *s == server,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// A valid allowlist entry (opaque; see [`Allowlist::parse_entry`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedEntry(Entry);

/// A server name: a host name or IP literal with an optional port, no spaces or slashes.
fn valid_server(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'))
        && !s.starts_with(['.', '-', ':'])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(entries: &[&str]) -> Allowlist {
        Allowlist::new(&entries.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn users_servers_and_anyone() {
        let l = list(&["@alice:example.org", "corp.example", ":Partner.example:8448"]);
        assert!(l.allows("@alice:example.org"));
        assert!(l.allows("@alice:Example.ORG"));
        assert!(!l.allows("@Alice:example.org"));
        assert!(!l.allows("@bob:example.org"));
        assert!(l.allows("@bob:corp.example"));
        assert!(l.allows("@carol:partner.example:8448"));
        assert!(!l.allows("@carol:partner.example"));
        assert!(!l.allows("@eve:evil.example"));
        assert!(!l.allows("@eve:corp.example.evil"));
        assert!(list(&["*"]).allows("@anyone:anywhere"));
    }

    #[test]
    fn empty_allows_nobody() {
        let l = list(&[]);
        assert!(l.is_empty());
        assert!(!l.allows("@alice:example.org"));
    }

    #[test]
    fn bad_entries_are_named() {
        for bad in ["", "@alice", "@:example.org", "@alice:", "exa mple.org", "http://x/", "-x"] {
            assert_eq!(Allowlist::new(&[bad.to_string()]), Err(bad.to_string()), "{bad:?}");
        }
    }
}
