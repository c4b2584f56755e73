//! Field 48 (additional data, private use) of financial messages on an upstream link: a
//! sequence of tag-length-value elements, each a 2-character tag, a 3-digit decimal length and
//! that many characters of value. The one tag the profile defines is `TP`: the W3C
//! `traceparent` of the acquirer's span that sent the request (README "Traces and logs"), e.g.
//! `TP055` `00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01`.
//!
//! A receiver skips tags it does not know; a field that does not parse as elements is ignored
//! as a whole (it never decides an answer). In 0800 messages field 48 keeps its plain meaning,
//! the key type of a key exchange.

/// Tag of the W3C `traceparent` element.
pub const TRACEPARENT: &str = "TP";

/// Length of a W3C `traceparent` of version `00`.
const TRACEPARENT_LEN: usize = 55;

/// Field 48 holding `traceparent` as its `TP` element.
pub fn encode_traceparent(traceparent: &str) -> Option<String> {
    (traceparent.len() == TRACEPARENT_LEN && traceparent.is_ascii())
        .then(|| format!("{TRACEPARENT}{:03}{traceparent}", traceparent.len()))
}

/// The value of element `tag` in a field 48 of tag-length-value elements; `None` when it is
/// absent or the field is not a well-formed sequence of elements.
pub fn find<'a>(field: &'a str, tag: &str) -> Option<&'a str> {
    let mut rest = field;
    let mut found = None;
    while !rest.is_empty() {
        let head = rest.get(..5)?;
        let (t, len) = head.split_at(2);
        if !len.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let len: usize = len.parse().ok()?;
        let value = rest.get(5..5 + len)?;
        if t == tag && found.is_none() {
            found = Some(value);
        }
        rest = &rest[5 + len..];
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn traceparent_round_trips() {
        let field = encode_traceparent(TP).unwrap();
        assert_eq!(field, format!("TP055{TP}"));
        assert_eq!(find(&field, TRACEPARENT), Some(TP));
    }

    #[test]
    fn other_tags_are_skipped() {
        let field = format!("XY003abcTP055{TP}ZZ000");
        assert_eq!(find(&field, TRACEPARENT), Some(TP));
        assert_eq!(find("XY003abc", TRACEPARENT), None);
    }

    #[test]
    fn malformed_fields_are_ignored() {
        for field in [
            "TPK", "TAK", "TP05", "TP055abc", "TPx55", "TP999", "TP003ab", "é",
        ] {
            assert_eq!(find(field, TRACEPARENT), None, "{field}");
        }
        assert_eq!(encode_traceparent("00-short"), None);
    }
}
