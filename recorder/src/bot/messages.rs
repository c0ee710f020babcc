//! What the bot says in a room, as plain text and Matrix HTML (`m.notice` bodies). Pure
//! functions, so the wording is tested without a homeserver. The first words of each message are
//! stable (tests and scripts look for them): `This call is being recorded by `, `Recording saved:`,
//! `Recording failed:`.

use chrono::{DateTime, Utc};

/// A plain body and its `org.matrix.custom.html` twin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    pub plain: String,
    pub html: String,
}

/// One downloadable file of a saved recording.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedFile {
    /// `Composite` or `Track <track id>`.
    pub label: String,
    /// Format and size, e.g. `MP4, 1.2 MB`.
    pub detail: String,
    pub url: String,
}

/// Posted when the bot starts recording a call.
pub fn recording_started(bot_name: &str) -> Notice {
    let plain = format!("This call is being recorded by {bot_name}.");
    let html = format!("This call is being recorded by <b>{}</b>.", escape(bot_name));
    Notice { plain, html }
}

/// Posted when someone pauses, resumes or stops a recording (`action`: `paused`, `resumed`,
/// `stopped`). Stable first words: `Recording paused by `, `Recording resumed by `,
/// `Recording stopped by `.
pub fn recording_control(action: &str, by_name: &str) -> Notice {
    let tail = match action {
        "paused" => " Nothing is recorded until `!rec resume`.",
        "stopped" => " The links follow when it is stored.",
        _ => "",
    };
    let plain = format!("Recording {action} by {by_name}.{tail}");
    let html = format!("Recording <b>{action}</b> by {}.{}", escape(by_name), escape(tail));
    Notice { plain, html }
}

/// The `m.room.message` content that tells a participant who joined a recorded call that it is
/// being recorded, mentioning them (a pill and `m.mentions`, so their client notifies them).
pub fn being_recorded_mention(user_id: &str, display_name: &str, bot_name: &str) -> serde_json::Value {
    let plain = format!(
        "{display_name}: this call is being recorded by {bot_name}. Say `!rec optout` to keep your audio and video out of it."
    );
    let html = format!(
        "<a href=\"https://matrix.to/#/{}\">{}</a>: this call is being recorded by <b>{}</b>. Say <code>!rec optout</code> to keep your audio and video out of it.",
        escape(user_id),
        escape(display_name),
        escape(bot_name)
    );
    serde_json::json!({
        "msgtype": "m.notice",
        "body": plain,
        "format": "org.matrix.custom.html",
        "formatted_body": html,
        "m.mentions": { "user_ids": [user_id] },
    })
}

/// A notice in the thread of `event_id` (or of the thread it is in), as a reply to it.
pub fn threaded_notice(text: &str, event_id: &str, thread_root: Option<&str>) -> serde_json::Value {
    serde_json::json!({
        "msgtype": "m.notice",
        "body": text,
        "format": "org.matrix.custom.html",
        "formatted_body": escape(text).replace('\n', "<br>"),
        "m.relates_to": {
            "rel_type": "m.thread",
            "event_id": thread_root.unwrap_or(event_id),
            "is_falling_back": thread_root.is_none(),
            "m.in_reply_to": { "event_id": event_id },
        },
        "m.mentions": {},
    })
}

/// What `!rec help` says.
pub fn help_text(cfg: &crate::config::ControlConfig) -> String {
    format!(
        "Recording commands:\n\
         !rec start: record this room's call (or the next one)\n\
         !rec stop: stop recording; the links follow when it is stored\n\
         !rec pause / !rec resume: leave a stretch out of the recording\n\
         !rec status: what is being recorded right now\n\
         !rec list: the room's recent recordings, with links\n\
         !rec optout / !rec optin: keep your own audio and video out of recordings, or let them in again\n\
         start, stop, pause, resume and list need power level {} in the room; status, help, optout and optin are open to everyone.",
        cfg.power_level
    )
}

/// `14:05 UTC` for a Unix ms time.
pub fn hhmm(unix_ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(unix_ms).map(|d| d.format("%H:%M UTC").to_string()).unwrap_or_default()
}

/// Everything [`recording_saved`] reports.
#[derive(Debug, Clone)]
pub struct Saved<'a> {
    pub duration_us: i64,
    pub total_bytes: u64,
    pub tracks: usize,
    pub composite: Option<SavedFile>,
    pub track_files: Vec<SavedFile>,
    pub expires_at: DateTime<Utc>,
    pub recording_id: &'a str,
}

/// Posted when a recording is stored: duration, size, one line per link.
pub fn recording_saved(s: &Saved<'_>) -> Notice {
    let head = format!(
        "Recording saved: {}, {} track{}, {}",
        seconds(s.duration_us),
        s.tracks,
        if s.tracks == 1 { "" } else { "s" },
        human_bytes(s.total_bytes)
    );
    let files: Vec<&SavedFile> = s.composite.iter().chain(s.track_files.iter()).collect();
    let tail = format!(
        "Links expire {}. Recording {}.",
        s.expires_at.format("%Y-%m-%d %H:%M UTC"),
        s.recording_id
    );
    let mut plain = vec![head.clone()];
    plain.extend(files.iter().map(|f| format!("{} ({}): {}", f.label, f.detail, f.url)));
    plain.push(tail.clone());
    let items: String = files
        .iter()
        .map(|f| {
            format!(
                "<li><a href=\"{}\">{}</a> ({})</li>",
                escape(&f.url),
                escape(&f.label),
                escape(&f.detail)
            )
        })
        .collect();
    let html = format!("<p>{}</p><ul>{items}</ul><p>{}</p>", escape(&head), escape(&tail));
    Notice { plain: plain.join("\n"), html }
}

/// Posted when a call was recorded but could not be stored; what is on disk stays for a retry.
pub fn recording_failed(reason: &str) -> Notice {
    let plain = format!(
        "Recording failed: {reason}. The media received so far is kept on the recorder for a retry."
    );
    let html = format!(
        "<b>Recording failed</b>: {}. The media received so far is kept on the recorder for a retry.",
        escape(reason)
    );
    Notice { plain, html }
}

/// `10.1 s`, `1 min 05 s`, `1 h 02 min`.
pub fn seconds(us: i64) -> String {
    let s = us.max(0) as f64 / 1e6;
    if s < 60.0 {
        format!("{s:.1} s")
    } else if s < 3600.0 {
        let s = s.round() as u64;
        format!("{} min {:02} s", s / 60, s % 60)
    } else {
        let m = (s / 60.0).round() as u64;
        format!("{} h {:02} min", m / 60, m % 60)
    }
}

/// `512 B`, `12.3 kB`, `1.9 MB`, `2.0 GB` (powers of 1000, as file managers show).
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 4] = ["kB", "MB", "GB", "TB"];
    if b < 1000 {
        return format!("{b} B");
    }
    let mut v = b as f64 / 1000.0;
    let mut unit = 0;
    while v >= 999.95 && unit + 1 < UNITS.len() {
        v /= 1000.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// Escapes text for the HTML body.
pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_message_lists_every_link_under_a_summary() {
        let file = |label: &str, url: &str| SavedFile {
            label: label.into(),
            detail: "MP4, 1.2 MB".into(),
            url: url.into(),
        };
        let n = recording_saved(&Saved {
            duration_us: 10_080_000,
            total_bytes: 1_900_000,
            tracks: 2,
            composite: Some(file("Composite", "http://h/r/a")),
            track_files: vec![file("Track t<1>", "http://h/r/b"), file("Track t2", "http://h/r/c")],
            expires_at: DateTime::from_timestamp(1_800_000_000, 0).unwrap(),
            recording_id: "rec1",
        });
        let lines: Vec<&str> = n.plain.lines().collect();
        assert_eq!(lines[0], "Recording saved: 10.1 s, 2 tracks, 1.9 MB");
        assert_eq!(lines[1], "Composite (MP4, 1.2 MB): http://h/r/a");
        assert_eq!(lines[2], "Track t<1> (MP4, 1.2 MB): http://h/r/b");
        assert_eq!(lines[4], "Links expire 2027-01-15 08:00 UTC. Recording rec1.");
        assert!(n.html.contains("<a href=\"http://h/r/b\">Track t&lt;1&gt;</a>"), "{}", n.html);
    }

    #[test]
    fn notices_start_with_their_stable_words() {
        assert!(recording_started("@rec:x").plain.starts_with("This call is being recorded by @rec:x"));
        assert!(recording_failed("no space").plain.starts_with("Recording failed: no space."));
    }

    #[test]
    fn control_notices_mentions_and_threaded_replies() {
        assert!(recording_control("paused", "Mo").plain.starts_with("Recording paused by Mo."));
        let m = being_recorded_mention("@bob:x", "Bob <b>", "mxrec");
        assert_eq!(m["m.mentions"]["user_ids"][0], "@bob:x");
        assert!(m["formatted_body"].as_str().unwrap().contains("https://matrix.to/#/@bob:x\">Bob &lt;b&gt;</a>"));
        let r = threaded_notice("a\nb", "$cmd", None);
        assert_eq!(r["m.relates_to"]["event_id"], "$cmd");
        assert_eq!(r["m.relates_to"]["m.in_reply_to"]["event_id"], "$cmd");
        assert_eq!(r["formatted_body"], "a<br>b");
        let r = threaded_notice("x", "$cmd", Some("$root"));
        assert_eq!(r["m.relates_to"]["event_id"], "$root");
        assert_eq!(r["m.relates_to"]["is_falling_back"], false);
    }

    #[test]
    fn sizes_and_durations_read_like_a_person_wrote_them() {
        assert_eq!(human_bytes(999), "999 B");
        assert_eq!(human_bytes(12_345), "12.3 kB");
        assert_eq!(human_bytes(999_999), "1.0 MB");
        assert_eq!(human_bytes(2_000_000_000), "2.0 GB");
        assert_eq!(seconds(9_960_000), "10.0 s");
        assert_eq!(seconds(65_000_000), "1 min 05 s");
        assert_eq!(seconds(3_720_000_000), "1 h 02 min");
    }
}

/// Appended to the notice of a recording that a restart finished: it ends where the stop cut it.
pub fn add_recovered_note(n: &mut Notice, stored_until_ms: i64) {
    let at = hhmm(stored_until_ms);
    n.plain.push_str(&format!(
        "\nThe recorder stopped unexpectedly during this recording; it was finished after the restart and holds the call up to {at}."
    ));
    n.html.push_str(&format!(
        "<p>The recorder stopped unexpectedly during this recording; it was finished after the restart and holds the call up to {}.</p>",
        escape(&at)
    ));
}
