//! HTTP byte ranges (RFC 9110 §14), reduced to what a video player needs: one range per request.
//!
//! Pure: a `Range` header value and the object's size in, the slice to send out. Anything this
//! does not understand (another unit, several ranges, bad syntax) means "send the whole object",
//! which the RFC allows and every client handles; only a well-formed range that starts past the
//! end is unsatisfiable.

use std::ops::Range;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ByteRange {
    /// No (usable) range: 200 with the whole object.
    Full,
    /// 206 with these bytes (end exclusive, never empty).
    Partial(Range<u64>),
    /// 416.
    Unsatisfiable,
}

/// Resolves a `Range` header against an object of `size` bytes.
pub fn resolve(header: Option<&str>, size: u64) -> ByteRange {
    let Some(spec) = header.map(str::trim) else {
        return ByteRange::Full;
    };
    let Some((unit, set)) = spec.split_once('=') else {
        return ByteRange::Full;
    };
    if !unit.trim().eq_ignore_ascii_case("bytes") || set.contains(',') {
        return ByteRange::Full;
    }
    let Some((first, last)) = set.trim().split_once('-') else {
        return ByteRange::Full;
    };
    let (first, last) = (first.trim(), last.trim());
    let number = |s: &str| -> Option<u64> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            None
        } else {
            s.parse().ok()
        }
    };
    if first.is_empty() {
        // `-N`: the last N bytes.
        return match number(last) {
            None => ByteRange::Full,
            Some(0) => ByteRange::Unsatisfiable,
            Some(_) if size == 0 => ByteRange::Unsatisfiable,
            Some(n) => ByteRange::Partial(size.saturating_sub(n)..size),
        };
    }
    let Some(start) = number(first) else {
        return ByteRange::Full;
    };
    let end_inclusive = if last.is_empty() {
        None
    } else {
        match number(last) {
            Some(e) if e >= start => Some(e),
            // `5-3` or garbage: an invalid range-spec, so the header is ignored.
            _ => return ByteRange::Full,
        }
    };
    if start >= size {
        return ByteRange::Unsatisfiable;
    }
    let end = end_inclusive.map_or(size, |e| e.saturating_add(1).min(size));
    ByteRange::Partial(start..end)
}

#[cfg(test)]
mod tests {
    use super::ByteRange::*;
    use super::*;

    #[test]
    fn single_ranges_of_every_form() {
        assert_eq!(resolve(None, 10), Full);
        assert_eq!(resolve(Some("bytes=0-0"), 10), Partial(0..1));
        assert_eq!(resolve(Some("bytes=2-5"), 10), Partial(2..6));
        assert_eq!(resolve(Some("bytes=2-"), 10), Partial(2..10));
        assert_eq!(resolve(Some("bytes=-3"), 10), Partial(7..10));
        assert_eq!(resolve(Some("bytes=-30"), 10), Partial(0..10));
        assert_eq!(resolve(Some("bytes=5-999"), 10), Partial(5..10));
        assert_eq!(resolve(Some(" Bytes = 1 - 2 "), 10), Partial(1..3));
        assert_eq!(resolve(Some("bytes=9-"), 10), Partial(9..10));
    }

    #[test]
    fn past_the_end_is_unsatisfiable() {
        assert_eq!(resolve(Some("bytes=10-"), 10), Unsatisfiable);
        assert_eq!(resolve(Some("bytes=10-20"), 10), Unsatisfiable);
        assert_eq!(resolve(Some("bytes=-0"), 10), Unsatisfiable);
        assert_eq!(resolve(Some("bytes=0-"), 0), Unsatisfiable);
        assert_eq!(resolve(Some("bytes=-5"), 0), Unsatisfiable);
    }

    #[test]
    fn anything_else_is_ignored() {
        for h in [
            "",
            "bytes",
            "bytes=",
            "bytes=-",
            "items=0-1",
            "bytes=0-1,3-4",
            "bytes=5-3",
            "bytes=a-b",
            "bytes=+1-2",
            "bytes=0x1-2",
            "bytes=99999999999999999999999-",
            "bytes=--1",
        ] {
            assert_eq!(resolve(Some(h), 10), Full, "{h:?}");
        }
        assert_eq!(resolve(Some("bytes=0-18446744073709551615"), 10), Partial(0..10));
    }
}
