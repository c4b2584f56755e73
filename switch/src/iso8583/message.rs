//! ISO 8583 messages in memory: the message type indicator and the data elements 2..=128.
//!
//! A [`Message`] holds each field's *logical* content and knows nothing about the wire: text
//! fields hold their ASCII characters, binary fields (52, 55, 64, 96, 128) hold raw bytes.
//! How that goes on the wire is the job of a [`Packager`](super::Packager).

use std::fmt;
use std::str::FromStr;

use super::bitmap::Bitmap;

/// Why a string or byte sequence is not a message type indicator.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("failed to parse MTI: expected exactly 4 ASCII digits (input was {len} bytes)")]
pub struct MtiError {
    /// Length of the rejected input (the content itself is not echoed: it came off the wire).
    pub len: usize,
}

/// Message type indicator: four ASCII digits (version, class, function, origin).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mti([u8; 4]);

impl Mti {
    /// 0200 financial request (balance inquiry, cash withdrawal).
    pub const FINANCIAL_REQUEST: Mti = Mti(*b"0200");
    /// 0210 financial request response.
    pub const FINANCIAL_RESPONSE: Mti = Mti(*b"0210");
    /// 0220 financial advice (stand-in advice to the issuer).
    pub const FINANCIAL_ADVICE: Mti = Mti(*b"0220");
    /// 0221 financial advice repeat.
    pub const FINANCIAL_ADVICE_REPEAT: Mti = Mti(*b"0221");
    /// 0230 financial advice response.
    pub const FINANCIAL_ADVICE_RESPONSE: Mti = Mti(*b"0230");
    /// 0400 reversal request.
    pub const REVERSAL_REQUEST: Mti = Mti(*b"0400");
    /// 0410 reversal request response.
    pub const REVERSAL_RESPONSE: Mti = Mti(*b"0410");
    /// 0420 reversal advice.
    pub const REVERSAL_ADVICE: Mti = Mti(*b"0420");
    /// 0421 reversal advice repeat.
    pub const REVERSAL_ADVICE_REPEAT: Mti = Mti(*b"0421");
    /// 0430 reversal advice response.
    pub const REVERSAL_ADVICE_RESPONSE: Mti = Mti(*b"0430");
    /// 0800 network management request (sign-on, sign-off, echo, key change).
    pub const NETWORK_REQUEST: Mti = Mti(*b"0800");
    /// 0810 network management response.
    pub const NETWORK_RESPONSE: Mti = Mti(*b"0810");

    /// Validates four bytes as an MTI.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, MtiError> {
        match bytes {
            [a, b, c, d] if bytes.iter().all(u8::is_ascii_digit) => Ok(Self([*a, *b, *c, *d])),
            _ => Err(MtiError { len: bytes.len() }),
        }
    }

    /// Parses an MTI such as `"0200"`.
    pub fn parse(s: &str) -> Result<Self, MtiError> {
        Self::from_bytes(s.as_bytes())
    }

    /// The four digits as text.
    pub fn as_str(&self) -> &str {
        // Only ASCII digits ever get in (see `from_bytes`), so this never falls back.
        std::str::from_utf8(&self.0).unwrap_or("????")
    }

    /// The four digits as bytes, as they go on the wire.
    pub const fn as_bytes(&self) -> &[u8; 4] {
        &self.0
    }

    /// Message class digit (position 2): 2 financial, 4 reversal, 8 network management, ...
    pub const fn class(&self) -> u8 {
        self.0[1] - b'0'
    }

    /// Message function digit (position 3): 0 request, 1 request response, 2 advice,
    /// 3 advice response, 4 notification.
    pub const fn function(&self) -> u8 {
        self.0[2] - b'0'
    }

    /// Whether the origin digit marks a repeat (0221, 0421, ...).
    pub const fn is_repeat(&self) -> bool {
        (self.0[3] - b'0') % 2 == 1
    }

    /// The MTI of the response to this request or advice: 0200→0210, 0800→0810, 0400→0410,
    /// 0420/0421→0430, 0220/0221→0230.
    ///
    /// The repeat flag is cleared because a response answers the transaction, not the attempt.
    /// `None` when this MTI has no response in ISO 8583:1987 (a response itself, or a
    /// notification), so the caller cannot answer a response with another response.
    pub const fn response(&self) -> Option<Mti> {
        let function = self.0[2] - b'0';
        let origin = self.0[3] - b'0';
        if function != 0 && function != 2 {
            return None;
        }
        let origin = if origin <= 5 {
            origin - origin % 2
        } else {
            origin
        };
        Some(Mti([self.0[0], self.0[1], self.0[2] + 1, b'0' + origin]))
    }
}

impl fmt::Display for Mti {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Mti {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Mti({})", self.as_str())
    }
}

impl FromStr for Mti {
    type Err = MtiError;

    fn from_str(s: &str) -> Result<Self, MtiError> {
        Self::parse(s)
    }
}

/// Where one field's bytes sit in the message arena.
#[derive(Clone, Copy, Debug)]
struct Slot {
    start: usize,
    end: usize,
}

/// An ISO 8583 message: an MTI and data elements 2..=128.
///
/// Field 1 (the secondary bitmap) is never set by users: a packager emits it when any field
/// 65..=128 is present.
///
/// Storage is chosen for the parse + pack hot path (one 0200 in well under a microsecond):
/// every value lives in one `arena` byte vector, `slots` holds one `(start, end)` pair per
/// present field in field order, and `present` is the bitmap. A lookup is O(1) with no
/// search — the slot index is the number of present fields below `n`, one `popcount` — and
/// parsing a message costs exactly two allocations (arena and slots, both sized up front)
/// instead of one per field as a map of `Vec`s would. Replacing a value appends the new bytes
/// and leaves the old ones as garbage, compacted once garbage outweighs live data.
#[derive(Clone)]
pub struct Message {
    mti: Mti,
    present: Bitmap,
    slots: Vec<Slot>,
    arena: Vec<u8>,
    garbage: usize,
}

impl Message {
    /// An empty message of type `mti`.
    pub fn new(mti: Mti) -> Self {
        Self::with_capacity(mti, 0, 0)
    }

    /// An empty message with room for `fields` fields holding `bytes` bytes in total.
    pub fn with_capacity(mti: Mti, fields: usize, bytes: usize) -> Self {
        Self {
            mti,
            present: Bitmap::new(),
            slots: Vec::with_capacity(fields),
            arena: Vec::with_capacity(bytes),
            garbage: 0,
        }
    }

    /// The message type indicator.
    pub fn mti(&self) -> Mti {
        self.mti
    }

    /// Changes the message type, e.g. when turning a request into its response.
    pub fn set_mti(&mut self, mti: Mti) {
        self.mti = mti;
    }

    /// Which fields are present (never field 1; see [`Message`]).
    pub fn bitmap(&self) -> Bitmap {
        self.present
    }

    /// Sets field `n` to `value`, replacing any previous value. The value is the logical
    /// content (text for text fields, raw bytes for binary fields); it is checked against the
    /// field's definition when packed, not here, because the definition belongs to the packager.
    ///
    /// Takes `AsRef<[u8]>` (so `&str`, `String`, `&[u8]`, `Vec<u8>` and byte arrays all work)
    /// rather than `Into<Vec<u8>>` because the bytes are copied into the arena anyway, and an
    /// intermediate `Vec` would be one allocation per field for nothing.
    ///
    /// # Panics
    ///
    /// If `n` is not in 2..=128. Field numbers come from code, not from the network
    /// (received fields only ever enter through a packager), so a bad one is a bug.
    #[track_caller]
    pub fn set(&mut self, n: u8, value: impl AsRef<[u8]>) {
        assert!(
            (2..=128).contains(&n),
            "ISO 8583 field number must be in 2..=128, got {n}"
        );
        let value = value.as_ref();
        let rank = self.present.rank(n);
        if self.present.contains(n) {
            if let Some(slot) = self.slots.get_mut(rank) {
                let old_len = slot.end - slot.start;
                if value.len() <= old_len {
                    // Fits where the old value was: overwrite in place.
                    self.arena[slot.start..slot.start + value.len()].copy_from_slice(value);
                    slot.end = slot.start + value.len();
                    self.garbage += old_len - value.len();
                } else {
                    let start = self.arena.len();
                    self.arena.extend_from_slice(value);
                    *slot = Slot {
                        start,
                        end: self.arena.len(),
                    };
                    self.garbage += old_len;
                }
            }
        } else {
            let start = self.arena.len();
            self.arena.extend_from_slice(value);
            self.slots.insert(
                rank,
                Slot {
                    start,
                    end: self.arena.len(),
                },
            );
            self.present.insert(n);
        }
        self.compact_if_wasteful();
    }

    /// Sets field `n` to the text `value`; see [`Message::set`].
    #[track_caller]
    pub fn set_str(&mut self, n: u8, value: &str) {
        self.set(n, value.as_bytes());
    }

    /// The value of field `n`, if present.
    pub fn get(&self, n: u8) -> Option<&[u8]> {
        if !self.present.contains(n) {
            return None;
        }
        let slot = self.slots.get(self.present.rank(n))?;
        self.arena.get(slot.start..slot.end)
    }

    /// The value of field `n` as text; `None` if absent or not UTF-8.
    pub fn get_str(&self, n: u8) -> Option<&str> {
        self.get(n).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// Removes field `n`; returns whether it was present.
    pub fn remove(&mut self, n: u8) -> bool {
        if !self.present.contains(n) {
            return false;
        }
        let rank = self.present.rank(n);
        if rank < self.slots.len() {
            let slot = self.slots.remove(rank);
            self.garbage += slot.end - slot.start;
        }
        self.present.remove(n);
        self.compact_if_wasteful();
        true
    }

    /// Whether field `n` is present.
    pub fn has(&self, n: u8) -> bool {
        self.present.contains(n)
    }

    /// Number of fields present.
    pub fn len(&self) -> usize {
        self.present.len()
    }

    /// Whether no field is present.
    pub fn is_empty(&self) -> bool {
        self.present.is_empty()
    }

    /// The present fields and their values in field order.
    pub fn fields(&self) -> impl ExactSizeIterator<Item = (u8, &[u8])> + '_ {
        self.present.iter().zip(self.slots.iter()).map(|(n, slot)| {
            // Slots always lie inside the arena; the fallback only keeps this panic-free.
            (n, self.arena.get(slot.start..slot.end).unwrap_or_default())
        })
    }

    /// Bytes of field content currently held (excluding replaced values).
    pub(crate) fn content_len(&self) -> usize {
        self.arena.len() - self.garbage
    }

    /// Appends field `n`, which must be higher than every present field, letting `write`
    /// put the value's bytes at the end of the arena. Used by packagers while decoding, so
    /// a field can be hex-decoded straight into place. On error nothing is added.
    pub(crate) fn push_with<E>(
        &mut self,
        n: u8,
        write: impl FnOnce(&mut Vec<u8>) -> Result<(), E>,
    ) -> Result<(), E> {
        debug_assert!(self.present.last().is_none_or(|last| last < n));
        let start = self.arena.len();
        if let Err(e) = write(&mut self.arena) {
            self.arena.truncate(start);
            return Err(e);
        }
        self.slots.push(Slot {
            start,
            end: self.arena.len(),
        });
        self.present.insert(n);
        Ok(())
    }

    fn compact_if_wasteful(&mut self) {
        if self.garbage > 256 && self.garbage > self.arena.len() / 2 {
            let mut arena = Vec::with_capacity(self.arena.len() - self.garbage);
            for slot in &mut self.slots {
                let start = arena.len();
                arena.extend_from_slice(&self.arena[slot.start..slot.end]);
                *slot = Slot {
                    start,
                    end: arena.len(),
                };
            }
            self.arena = arena;
            self.garbage = 0;
        }
    }
}

/// Two messages are equal when they have the same MTI and the same fields with the same
/// values, however their storage happens to be laid out.
impl PartialEq for Message {
    fn eq(&self, other: &Self) -> bool {
        self.mti == other.mti
            && self.present == other.present
            && self.fields().zip(other.fields()).all(|(a, b)| a == b)
    }
}

impl Eq for Message {}

/// Fields whose content is cardholder or key data and must never reach a log: the PAN is
/// masked, these are replaced by their length.
const REDACTED_FIELDS: &[u8] = &[
    14,  // expiry date
    35,  // track 2
    36,  // track 3
    45,  // track 1
    52,  // PIN data
    55,  // ICC data
    120, // key block (wrapped, but still key material)
    123, // PIN block
];

/// Shows the fields in order with cardholder and key data redacted, so a message can be
/// logged or put in an error without leaking a PAN, track data, PIN block or key.
impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Value<'a>(u8, &'a [u8]);
        impl fmt::Debug for Value<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let Value(n, v) = *self;
                if n == 2 {
                    // First six and last four, the PCI DSS display maximum.
                    return match (v.get(..6), v.len().checked_sub(4).and_then(|i| v.get(i..))) {
                        (Some(head), Some(tail)) if v.len() >= 13 && v.is_ascii() => write!(
                            f,
                            "\"{}{}{}\"",
                            String::from_utf8_lossy(head),
                            "*".repeat(v.len() - 10),
                            String::from_utf8_lossy(tail)
                        ),
                        _ => write!(f, "<redacted, {} bytes>", v.len()),
                    };
                }
                if REDACTED_FIELDS.contains(&n) {
                    return write!(f, "<redacted, {} bytes>", v.len());
                }
                if v.iter().all(|b| b.is_ascii_graphic() || *b == b' ') {
                    write!(f, "{:?}", String::from_utf8_lossy(v))
                } else {
                    write!(f, "0x{}", hex::encode_upper(v))
                }
            }
        }
        let mut map = f.debug_map();
        map.entry(&"mti", &self.mti.as_str());
        for (n, v) in self.fields() {
            map.entry(&n, &Value(n, v));
        }
        map.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iso8583::fields;
    use rstest::rstest;

    #[rstest]
    #[case("0200", Some("0210"))]
    #[case("0800", Some("0810"))]
    #[case("0400", Some("0410"))]
    #[case("0420", Some("0430"))]
    #[case("0421", Some("0430"))]
    #[case("0220", Some("0230"))]
    #[case("0221", Some("0230"))]
    #[case("0100", Some("0110"))]
    #[case("0210", None)]
    #[case("0810", None)]
    #[case("0430", None)]
    #[case("0240", None)]
    fn response_mti(#[case] request: &str, #[case] expected: Option<&str>) {
        let mti = Mti::parse(request).unwrap();
        assert_eq!(mti.response().map(|m| m.to_string()).as_deref(), expected);
    }

    #[rstest]
    #[case("")]
    #[case("020")]
    #[case("02000")]
    #[case("02a0")]
    #[case("０２")]
    #[case(" 200")]
    fn invalid_mti_is_refused(#[case] text: &str) {
        assert_eq!(Mti::parse(text), Err(MtiError { len: text.len() }));
    }

    #[test]
    fn mti_digits() {
        let mti = Mti::parse("0421").unwrap();
        assert_eq!(mti.as_str(), "0421");
        assert_eq!(mti.class(), 4);
        assert_eq!(mti.function(), 2);
        assert!(mti.is_repeat());
        assert!(!Mti::REVERSAL_ADVICE.is_repeat());
        assert_eq!("0800".parse::<Mti>().unwrap(), Mti::NETWORK_REQUEST);
    }

    #[test]
    fn fields_come_back_in_field_order_whatever_the_insertion_order() {
        let mut msg = Message::new(Mti::FINANCIAL_REQUEST);
        msg.set_str(fields::TERMINAL_ID, "ATM00001");
        msg.set_str(fields::PROCESSING_CODE, "011000");
        msg.set(fields::MAC_SECONDARY, [1u8, 2, 3, 4, 5, 6, 7, 8]);
        msg.set_str(fields::STAN, "000001");
        msg.set_str(fields::PAN, "6011000000000004");
        let numbers: Vec<u8> = msg.fields().map(|(n, _)| n).collect();
        assert_eq!(numbers, vec![2, 3, 11, 41, 128]);
        assert_eq!(msg.get_str(fields::TERMINAL_ID), Some("ATM00001"));
        assert_eq!(
            msg.get(fields::MAC_SECONDARY),
            Some(&[1u8, 2, 3, 4, 5, 6, 7, 8][..])
        );
        assert_eq!(msg.get(fields::AMOUNT), None);
        assert!(msg.has(fields::STAN) && !msg.has(fields::LOCAL_TIME));
        assert_eq!(msg.len(), 5);
    }

    #[test]
    fn replacing_and_removing_keep_other_fields_intact() {
        let mut msg = Message::new(Mti::FINANCIAL_REQUEST);
        msg.set_str(fields::STAN, "000001");
        msg.set_str(fields::RESPONSE_CODE, "00");
        msg.set_str(fields::TERMINAL_ID, "ATM00001");
        msg.set_str(fields::RESPONSE_CODE, "5"); // shorter: in place
        msg.set_str(fields::STAN, "0000000002"); // longer: appended
        assert_eq!(msg.get_str(fields::RESPONSE_CODE), Some("5"));
        assert_eq!(msg.get_str(fields::STAN), Some("0000000002"));
        assert_eq!(msg.get_str(fields::TERMINAL_ID), Some("ATM00001"));
        assert!(msg.remove(fields::RESPONSE_CODE));
        assert!(!msg.remove(fields::RESPONSE_CODE));
        assert_eq!(msg.get(fields::RESPONSE_CODE), None);
        assert_eq!(msg.get_str(fields::TERMINAL_ID), Some("ATM00001"));
        assert_eq!(msg.fields().count(), 2);
    }

    #[test]
    fn many_replacements_compact_the_arena_without_losing_values() {
        let mut msg = Message::new(Mti::FINANCIAL_REQUEST);
        msg.set_str(fields::TERMINAL_ID, "ATM00001");
        for i in 0..1000u32 {
            msg.set(
                fields::KEY_TYPE,
                format!("{i:0>width$}", width = (i % 50) as usize + 1),
            );
        }
        assert_eq!(
            msg.get_str(fields::KEY_TYPE),
            Some(format!("{:0>50}", 999).as_str())
        );
        assert_eq!(msg.get_str(fields::TERMINAL_ID), Some("ATM00001"));
        assert!(msg.arena.len() < 1000, "arena grew to {}", msg.arena.len());
    }

    #[test]
    fn get_str_is_none_for_non_utf8() {
        let mut msg = Message::new(Mti::FINANCIAL_REQUEST);
        msg.set(fields::MAC, [0xff, 0xfe]);
        assert_eq!(msg.get_str(fields::MAC), None);
        assert_eq!(msg.get(fields::MAC), Some(&[0xff, 0xfe][..]));
    }

    #[test]
    fn equality_ignores_storage_layout() {
        let mut a = Message::new(Mti::FINANCIAL_REQUEST);
        a.set_str(fields::PROCESSING_CODE, "011000");
        a.set_str(fields::STAN, "000009");
        let mut b = Message::new(Mti::FINANCIAL_REQUEST);
        b.set_str(fields::STAN, "999999");
        b.set_str(fields::PROCESSING_CODE, "011000");
        b.set_str(fields::STAN, "000009");
        assert_eq!(a, b);
        b.set_mti(Mti::FINANCIAL_RESPONSE);
        assert_ne!(a, b);
    }

    #[rstest]
    #[case(0)]
    #[case(1)]
    #[case(129)]
    #[should_panic(expected = "field number must be in 2..=128")]
    fn setting_field_one_or_out_of_range_is_a_bug(#[case] n: u8) {
        Message::new(Mti::FINANCIAL_REQUEST).set(n, "x");
    }

    #[test]
    fn debug_redacts_cardholder_and_key_data() {
        let mut msg = Message::new(Mti::FINANCIAL_REQUEST);
        msg.set_str(fields::PAN, "6011000000000004");
        msg.set_str(fields::EXPIRY, "2812");
        msg.set_str(fields::TRACK2, "6011000000000004=2812101");
        msg.set_str(fields::TERMINAL_ID, "ATM00001");
        msg.set(fields::PIN_DATA, [0x12u8; 8]);
        msg.set_str(fields::KEY_BLOCK, "D0112P0AE00E0000SECRETKEYBLOCK");
        msg.set_str(fields::PIN_BLOCK, "4A1B2C3D4E5F60718293A4B5C6D7E8F9");
        let shown = format!("{msg:?}");
        assert!(shown.contains("601100******0004"), "{shown}");
        assert!(shown.contains("ATM00001"), "{shown}");
        for secret in [
            "6011000000000004",
            "2812",
            "1212121212121212",
            "SECRETKEYBLOCK",
            "4A1B2C3D",
        ] {
            assert!(!shown.contains(secret), "{secret} leaked in {shown}");
        }
    }
}
