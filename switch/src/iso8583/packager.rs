//! Packagers: a named field table plus the wire encoding of bitmaps and binary fields, turning
//! [`Message`]s into bytes and back, and locating the bytes a MAC covers.
//!
//! The two built-in profiles are byte-for-byte pyiso8583's `default_ascii` (`ascii`) and
//! `default` (`binary-bitmap`) specs: ASCII MTI, ASCII LL/LLL length digits, and either
//! hex-text or raw bitmaps and binary fields.

use std::borrow::Cow;
use std::fmt;

use super::bitmap::Bitmap;
use super::field::{Charset, FieldError, FieldKind, FieldSpec, ISO8583_1987};
use super::message::{Message, Mti};

/// How the primary and secondary bitmaps go on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BitmapEncoding {
    /// 16 hex characters per bitmap (uppercase when packing; either case accepted).
    Hex,
    /// 8 raw bytes per bitmap.
    Binary,
}

/// How binary fields (charset [`Charset::Binary`]) go on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinaryEncoding {
    /// Two hex characters per byte (uppercase when packing; either case accepted); a
    /// variable field's length prefix counts the hex characters, as pyiso8583 does.
    Hex,
    /// The bytes themselves; a length prefix counts bytes.
    Raw,
}

/// A packager name that is not one of the built-in profiles.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("failed to find packager {name:?}: expected \"ascii\" or \"binary-bitmap\"")]
pub struct UnknownPackager {
    /// The name asked for.
    pub name: String,
}

/// Why a field table cannot become a packager.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProfileError {
    /// A field number outside 2..=128.
    #[error("failed to build packager: field number {field} is outside 2..=128")]
    OutOfRange {
        /// The offending number.
        field: u8,
    },
    /// The same field defined twice.
    #[error("failed to build packager: field {field} is defined twice")]
    Duplicate {
        /// The offending number.
        field: u8,
    },
    /// A field without a definition.
    #[error(
        "failed to build packager: field {field} has no definition; define every field 2..=128"
    )]
    Missing {
        /// The missing number.
        field: u8,
    },
    /// A variable field whose longest wire form has more digits than its length prefix.
    #[error(
        "failed to build packager: field {field} can be {wire_max} long on the wire, which does not fit its length prefix"
    )]
    PrefixTooShort {
        /// The offending number.
        field: u8,
        /// Longest wire length of the field.
        wire_max: usize,
    },
    /// MAC fields that are not the same fixed-length binary field.
    #[error(
        "failed to build packager: fields 64 and 128 must both be fixed-length binary MAC fields of the same length"
    )]
    MacFields,
}

/// A message that cannot be packed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PackError {
    /// A field value does not fit its definition.
    #[error(transparent)]
    Field(#[from] FieldError),
    /// The MAC would not be the last field, so it could not cover the whole message.
    #[error(
        "failed to pack MAC input: field {after} follows MAC field {mac}; the MAC must be the last field"
    )]
    MacNotLast {
        /// Where the MAC goes ([`mac_field_for`]).
        mac: u8,
        /// The field after it.
        after: u8,
    },
}

/// What was wrong with received bytes; see [`UnpackError`] for where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnpackReason {
    /// The message ended before a part it announced.
    #[error("message is truncated: {needed} bytes needed, {available} left")]
    Truncated {
        /// Bytes the part needs.
        needed: usize,
        /// Bytes that were left.
        available: usize,
    },
    /// The first four bytes are not ASCII digits.
    #[error("MTI is not 4 ASCII digits")]
    InvalidMti,
    /// A hex bitmap with a non-hex character.
    #[error("bitmap is not 16 hex characters")]
    InvalidBitmap,
    /// Field 1 is set but the secondary bitmap marks nothing: not a canonical message.
    #[error("secondary bitmap is present but marks no field")]
    EmptySecondaryBitmap,
    /// A length prefix with a non-digit.
    #[error("length prefix is not {digits} ASCII digits")]
    InvalidLengthPrefix {
        /// Digits the prefix should have.
        digits: usize,
    },
    /// The field's content does not fit its definition.
    #[error("{problem}")]
    Invalid {
        /// What is wrong (never the value itself).
        problem: String,
    },
    /// Bytes left over after the last field the bitmap announces.
    #[error("{count} bytes follow the last field")]
    TrailingBytes {
        /// How many.
        count: usize,
    },
}

/// Received bytes that are not a valid message.
///
/// `partial` holds the MTI and every field decoded before the failure, so the switch can
/// still answer `30` (format error) echoing fields 11 and 41 when it got that far.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("failed to unpack {}: {reason}", location(.field))]
pub struct UnpackError {
    /// The field being decoded (1 = secondary bitmap), or `None` for the MTI, the primary
    /// bitmap and trailing bytes.
    pub field: Option<u8>,
    /// What was wrong.
    pub reason: UnpackReason,
    /// What was decoded before the failure; `None` if not even the MTI was.
    pub partial: Option<Box<Message>>,
}

fn location(field: &Option<u8>) -> Cow<'static, str> {
    match field {
        Some(1) => "field 1 (secondary bitmap)".into(),
        Some(n) => format!("field {n}").into(),
        None => "message".into(),
    }
}

/// A MAC that cannot be located in a received message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MacLayoutError {
    /// The field that must carry the MAC is absent.
    #[error("failed to find the MAC: field {field} is absent")]
    Missing {
        /// Where the MAC should be ([`mac_field_for`]).
        field: u8,
    },
    /// A field follows the MAC, so the MAC would not cover it.
    #[error("failed to locate the MAC input: field {last} follows MAC field {mac}")]
    NotLast {
        /// Where the MAC is.
        mac: u8,
        /// The last field present.
        last: u8,
    },
    /// The raw bytes are shorter than a MAC, so they cannot be the bytes `msg` came from.
    #[error("failed to locate the MAC input: the raw message is shorter than a MAC")]
    TooShort,
}

/// The field that carries a message's MAC: 128 when any field 65..=127 is present (the
/// secondary bitmap is there anyway), else 64.
pub fn mac_field_for(msg: &Message) -> u8 {
    // Fields 65..=127 are the secondary word without its lowest bit (field 128).
    if msg.bitmap().secondary() & !1 != 0 {
        128
    } else {
        64
    }
}

/// A field table with its wire encodings. Build one with [`Packager::new`] or use a built-in
/// profile through [`Packager::by_name`].
pub struct Packager {
    name: Cow<'static, str>,
    bitmap: BitmapEncoding,
    binary: BinaryEncoding,
    /// Definitions of fields 2..=128; index `n - 2`.
    fields: Cow<'static, [FieldSpec]>,
}

static ASCII: Packager = Packager {
    name: Cow::Borrowed("ascii"),
    bitmap: BitmapEncoding::Hex,
    binary: BinaryEncoding::Hex,
    fields: Cow::Borrowed(&ISO8583_1987),
};

static BINARY_BITMAP: Packager = Packager {
    name: Cow::Borrowed("binary-bitmap"),
    bitmap: BitmapEncoding::Binary,
    binary: BinaryEncoding::Raw,
    fields: Cow::Borrowed(&ISO8583_1987),
};

impl fmt::Debug for Packager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Packager")
            .field("name", &self.name)
            .field("bitmap", &self.bitmap)
            .field("binary", &self.binary)
            .finish_non_exhaustive()
    }
}

/// Longest message header: MTI and both bitmaps as hex.
const MAX_HEADER: usize = 4 + 16 + 16;

impl Packager {
    /// Builds a packager from a complete field table (one definition for each of 2..=128,
    /// in any order).
    pub fn new(
        name: impl Into<Cow<'static, str>>,
        bitmap: BitmapEncoding,
        binary: BinaryEncoding,
        fields: Vec<FieldSpec>,
    ) -> Result<Self, ProfileError> {
        let mut slots: Vec<Option<FieldSpec>> = vec![None; 127];
        for spec in fields {
            let n = spec.number;
            let Some(slot) = usize::from(n).checked_sub(2).and_then(|i| slots.get_mut(i)) else {
                return Err(ProfileError::OutOfRange { field: n });
            };
            if slot.is_some() {
                return Err(ProfileError::Duplicate { field: n });
            }
            let wire_max = wire_len(binary, &spec, spec.kind.max_len());
            let fits = match spec.kind {
                FieldKind::Fixed(_) | FieldKind::Unsupported => true,
                FieldKind::LlVar(_) => wire_max <= 99,
                FieldKind::LllVar(_) => wire_max <= 999,
            };
            if !fits {
                return Err(ProfileError::PrefixTooShort { field: n, wire_max });
            }
            *slot = Some(spec);
        }
        let mut table = Vec::with_capacity(127);
        for (i, slot) in slots.into_iter().enumerate() {
            match slot {
                Some(spec) => table.push(spec),
                // i < 127, so i + 2 <= 128 fits a u8.
                None => return Err(ProfileError::Missing { field: i as u8 + 2 }),
            }
        }
        let is_mac = |spec: &FieldSpec| {
            matches!(spec.kind, FieldKind::Fixed(n) if n > 0) && spec.charset == Charset::Binary
        };
        if !(is_mac(&table[62]) && table[62].kind == table[126].kind && is_mac(&table[126])) {
            return Err(ProfileError::MacFields);
        }
        Ok(Self {
            name: name.into(),
            bitmap,
            binary,
            fields: Cow::Owned(table),
        })
    }

    /// A built-in profile by its configuration name: `ascii` or `binary-bitmap`.
    pub fn by_name(name: &str) -> Result<&'static Packager, UnknownPackager> {
        match name {
            "ascii" => Ok(&ASCII),
            "binary-bitmap" => Ok(&BINARY_BITMAP),
            _ => Err(UnknownPackager {
                name: name.to_owned(),
            }),
        }
    }

    /// pyiso8583 `default_ascii`: hex-text bitmaps and binary fields.
    pub fn ascii() -> &'static Packager {
        &ASCII
    }

    /// pyiso8583 `default`: raw bitmaps and binary fields.
    pub fn binary_bitmap() -> &'static Packager {
        &BINARY_BITMAP
    }

    /// The profile's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How bitmaps go on the wire.
    pub fn bitmap_encoding(&self) -> BitmapEncoding {
        self.bitmap
    }

    /// How binary fields go on the wire.
    pub fn binary_encoding(&self) -> BinaryEncoding {
        self.binary
    }

    /// The definition of field `n` (2..=128).
    pub fn field(&self, n: u8) -> Option<&FieldSpec> {
        usize::from(n)
            .checked_sub(2)
            .and_then(|i| self.fields.get(i))
    }

    /// Wire length of the MAC field's data: 16 for `ascii`, 8 for `binary-bitmap`.
    pub fn mac_wire_len(&self) -> usize {
        // `new` guarantees 64 and 128 are the same fixed-length binary field.
        self.field(64)
            .map_or(0, |spec| wire_len(self.binary, spec, spec.kind.max_len()))
    }

    /// Packs `msg`, validating every field.
    pub fn pack(&self, msg: &Message) -> Result<Vec<u8>, PackError> {
        let mut out = Vec::new();
        self.pack_into(msg, &mut out)?;
        Ok(out)
    }

    /// Appends the packed `msg` to `out`; on error `out` is left as it was.
    pub fn pack_into(&self, msg: &Message, out: &mut Vec<u8>) -> Result<(), PackError> {
        let start = out.len();
        let result = self.write(msg, msg.bitmap(), None, out);
        if result.is_err() {
            out.truncate(start);
        }
        result
    }

    /// The bytes a MAC for `msg` is computed over: `msg` packed with the MAC field's bit set
    /// (see [`mac_field_for`]), from the MTI up to, not including, the MAC field's data.
    /// Any value already in the MAC field is ignored, so this works for building and for
    /// re-checking a message. After computing the MAC, `set` it and [`Packager::pack`]: the
    /// result starts with exactly these bytes.
    pub fn pack_mac_input(&self, msg: &Message) -> Result<Vec<u8>, PackError> {
        let mac = mac_field_for(msg);
        if let Some(after) = msg.bitmap().iter().find(|&n| n > mac) {
            return Err(PackError::MacNotLast { mac, after });
        }
        let mut bitmap = msg.bitmap();
        bitmap.insert(mac);
        let mut out = Vec::new();
        self.write(msg, bitmap, Some(mac), &mut out)?;
        Ok(out)
    }

    /// Packs `msg` with a MAC in one pass: packs the MAC input, asks `compute` for the MAC
    /// over it (e.g. leftmost 8 bytes of AES-CMAC under the TAK), appends the MAC field and
    /// stores the MAC in `msg` too. Equivalent to [`Packager::pack_mac_input`], `set`, then
    /// [`Packager::pack`], without packing twice.
    pub fn pack_with_mac<M, E>(
        &self,
        msg: &mut Message,
        compute: impl FnOnce(&[u8]) -> Result<M, E>,
    ) -> Result<Vec<u8>, E>
    where
        M: AsRef<[u8]>,
        E: From<PackError>,
    {
        let field = mac_field_for(msg);
        let mut out = self.pack_mac_input(msg)?;
        let mac = compute(&out)?;
        let mac = mac.as_ref();
        if let Some(spec) = self.field(field) {
            spec.validate(mac).map_err(PackError::from)?;
            if spec.is_binary() && self.binary == BinaryEncoding::Hex {
                push_hex(mac, &mut out);
            } else {
                out.extend_from_slice(mac);
            }
        }
        msg.set(field, mac);
        Ok(out)
    }

    /// For a message received as `raw` and unpacked into `msg`: the bytes its MAC covers and
    /// the MAC itself. Checks that the MAC is in the field [`mac_field_for`] says and is the
    /// last field, so no field can ride along outside the MAC.
    pub fn received_mac<'r, 'm>(
        &self,
        raw: &'r [u8],
        msg: &'m Message,
    ) -> Result<(&'r [u8], &'m [u8]), MacLayoutError> {
        let field = mac_field_for(msg);
        let mac = msg.get(field).ok_or(MacLayoutError::Missing { field })?;
        match msg.bitmap().last() {
            Some(last) if last != field => Err(MacLayoutError::NotLast { mac: field, last }),
            _ => {
                let end = raw
                    .len()
                    .checked_sub(self.mac_wire_len())
                    .ok_or(MacLayoutError::TooShort)?;
                Ok((&raw[..end], mac))
            }
        }
    }

    /// Writes the header for `bitmap` and the fields of `msg` below `stop_before`.
    fn write(
        &self,
        msg: &Message,
        bitmap: Bitmap,
        stop_before: Option<u8>,
        out: &mut Vec<u8>,
    ) -> Result<(), PackError> {
        // Hex doubles binary fields and prefixes add at most 3 bytes per field.
        out.reserve(MAX_HEADER + msg.content_len() * 2 + msg.len() * 3);
        out.extend_from_slice(msg.mti().as_bytes());
        let secondary = bitmap.secondary();
        let primary = if secondary != 0 {
            bitmap.primary() | 1 << 63
        } else {
            bitmap.primary()
        };
        self.write_bitmap(primary, out);
        if secondary != 0 {
            self.write_bitmap(secondary, out);
        }
        for (n, value) in msg.fields() {
            if stop_before.is_some_and(|stop| n >= stop) {
                break;
            }
            let Some(spec) = self.field(n) else { continue };
            spec.validate(value)?;
            let len = wire_len(self.binary, spec, value.len());
            match spec.kind.prefix_digits() {
                2 => {
                    out.extend_from_slice(&[b'0' + (len / 10 % 10) as u8, b'0' + (len % 10) as u8])
                }
                3 => out.extend_from_slice(&[
                    b'0' + (len / 100 % 10) as u8,
                    b'0' + (len / 10 % 10) as u8,
                    b'0' + (len % 10) as u8,
                ]),
                _ => {}
            }
            if spec.is_binary() && self.binary == BinaryEncoding::Hex {
                push_hex(value, out);
            } else {
                out.extend_from_slice(value);
            }
        }
        Ok(())
    }

    fn write_bitmap(&self, word: u64, out: &mut Vec<u8>) {
        match self.bitmap {
            BitmapEncoding::Hex => push_hex(&word.to_be_bytes(), out),
            BitmapEncoding::Binary => out.extend_from_slice(&word.to_be_bytes()),
        }
    }

    /// Unpacks `raw`, which must be exactly one message: every field is validated and bytes
    /// after the last field are an error.
    pub fn unpack(&self, raw: &[u8]) -> Result<Message, UnpackError> {
        let mut reader = Reader { raw, pos: 0 };
        let fail = |field, reason, partial: Option<Message>| UnpackError {
            field,
            reason,
            partial: partial.map(Box::new),
        };

        let mti = reader
            .take(4)
            .map_err(|reason| fail(None, reason, None))
            .and_then(|bytes| {
                Mti::from_bytes(bytes).map_err(|_| fail(None, UnpackReason::InvalidMti, None))
            })?;

        let primary = self
            .read_bitmap(&mut reader)
            .map_err(|reason| fail(None, reason, Some(Message::new(mti))))?;
        let secondary = if primary & 1 << 63 != 0 {
            let word = self
                .read_bitmap(&mut reader)
                .map_err(|reason| fail(Some(1), reason, Some(Message::new(mti))))?;
            if word == 0 {
                return Err(fail(
                    Some(1),
                    UnpackReason::EmptySecondaryBitmap,
                    Some(Message::new(mti)),
                ));
            }
            word
        } else {
            0
        };
        let bitmap = Bitmap::from_words(primary & !(1 << 63), secondary);

        let mut msg = Message::with_capacity(mti, bitmap.len(), raw.len());
        for n in bitmap.iter() {
            if let Err(reason) = self.read_field(n, &mut reader, &mut msg) {
                return Err(fail(Some(n), reason, Some(msg)));
            }
        }
        match reader.remaining() {
            0 => Ok(msg),
            count => Err(fail(None, UnpackReason::TrailingBytes { count }, Some(msg))),
        }
    }

    fn read_bitmap(&self, reader: &mut Reader<'_>) -> Result<u64, UnpackReason> {
        let mut word = [0u8; 8];
        match self.bitmap {
            BitmapEncoding::Binary => word.copy_from_slice(reader.take(8)?),
            BitmapEncoding::Hex => {
                let text = reader.take(16)?;
                for (byte, pair) in word.iter_mut().zip(text.chunks_exact(2)) {
                    *byte = hex_pair(pair).ok_or(UnpackReason::InvalidBitmap)?;
                }
            }
        }
        Ok(u64::from_be_bytes(word))
    }

    fn read_field(
        &self,
        n: u8,
        reader: &mut Reader<'_>,
        msg: &mut Message,
    ) -> Result<(), UnpackReason> {
        let Some(spec) = self.field(n) else {
            // Unreachable with a validated table; refuse rather than guess a length.
            return Err(UnpackReason::Invalid {
                problem: "field has no definition in this packager".to_owned(),
            });
        };
        let hex = spec.is_binary() && self.binary == BinaryEncoding::Hex;
        let len = match spec.kind {
            FieldKind::Unsupported => {
                return Err(UnpackReason::Invalid {
                    problem: super::field::UNSUPPORTED.to_owned(),
                });
            }
            FieldKind::Fixed(len) => wire_len(self.binary, spec, usize::from(len)),
            FieldKind::LlVar(_) | FieldKind::LllVar(_) => {
                let digits = spec.kind.prefix_digits();
                let prefix = reader.take(digits)?;
                let mut len = 0usize;
                for &d in prefix {
                    if !d.is_ascii_digit() {
                        return Err(UnpackReason::InvalidLengthPrefix { digits });
                    }
                    len = len * 10 + usize::from(d - b'0');
                }
                len
            }
        };
        let data = reader.take(len)?;
        let invalid = |e: FieldError| UnpackReason::Invalid { problem: e.problem };
        msg.push_with(n, |arena| {
            let start = arena.len();
            if hex {
                if data.len() % 2 != 0 {
                    return Err(UnpackReason::Invalid {
                        problem: format!(
                            "expected an even number of hex characters, got {}",
                            data.len()
                        ),
                    });
                }
                for (i, pair) in data.chunks_exact(2).enumerate() {
                    let byte = hex_pair(pair).ok_or_else(|| UnpackReason::Invalid {
                        problem: format!(
                            "expected hex characters only, found another character at position {}",
                            2 * i + usize::from(hex_pair_first_ok(pair))
                        ),
                    })?;
                    arena.push(byte);
                }
                spec.validate(&arena[start..]).map_err(invalid)
            } else {
                spec.validate(data).map_err(invalid)?;
                arena.extend_from_slice(data);
                Ok(())
            }
        })
    }
}

/// Wire length of a value of `len` logical units.
fn wire_len(binary: BinaryEncoding, spec: &FieldSpec, len: usize) -> usize {
    if spec.is_binary() && binary == BinaryEncoding::Hex {
        len * 2
    } else {
        len
    }
}

/// A cursor over received bytes that never reads past the end.
struct Reader<'a> {
    raw: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], UnpackReason> {
        let available = self.remaining();
        let end = self.pos.saturating_add(n);
        match self.raw.get(self.pos..end) {
            Some(bytes) => {
                self.pos = end;
                Ok(bytes)
            }
            None => Err(UnpackReason::Truncated {
                needed: n,
                available,
            }),
        }
    }

    fn remaining(&self) -> usize {
        self.raw.len().saturating_sub(self.pos)
    }
}

const HEX_UPPER: &[u8; 16] = b"0123456789ABCDEF";

fn push_hex(bytes: &[u8], out: &mut Vec<u8>) {
    for &b in bytes {
        out.extend_from_slice(&[
            HEX_UPPER[usize::from(b >> 4)],
            HEX_UPPER[usize::from(b & 15)],
        ]);
    }
}

const fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'A'..=b'F' => Some(c - b'A' + 10),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

fn hex_pair(pair: &[u8]) -> Option<u8> {
    match pair {
        [hi, lo] => Some(hex_digit(*hi)? << 4 | hex_digit(*lo)?),
        _ => None,
    }
}

/// Whether the first character of a bad pair is fine (so the second is the bad one).
fn hex_pair_first_ok(pair: &[u8]) -> bool {
    pair.first().and_then(|c| hex_digit(*c)).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iso8583::fields;
    use proptest::prelude::*;
    use rstest::rstest;

    /// Wire bytes produced by pyiso8583 (`switch/tests/vectors/gen_vectors.py`).
    const GOLDEN: &[(&str, &str, &str)] = &[
        (
            "ascii",
            "sign_on_0800",
            "3038303038323230303030303030383030303030303430303030303030303030303030303131323230393330313530303031323341544D3030303031303031",
        ),
        (
            "ascii",
            "withdrawal_0200",
            "3032303046323343303430303238433038303031303030303030303030303030303032303136363031313030303030303030303030343031313030303030303030303035303030303131323230393330313530303031323431363330313531313232323831323035313234363031313030303030303030303030343D3238313231303134333231303938373635343341544D3030303031535749544348594152442D30303031333630303132333435363738394142434445463033323441314232433344344535463630373138323933413442354336443745384639",
        ),
        (
            "ascii",
            "reversal_0420_secondary",
            "30343230463232303030303030323830383030303030303030303430303030303030303131363630313130303030303030303030303430313130303030303030303030353030303031313232303933313135303030313235303041544D303030303133363030323030303030313234313132323039333031353030303030303030303030303030303030303030303046454443424139383736353433323130",
        ),
        (
            "ascii",
            "binary_fields_0200",
            "303230303230323030303030303038303132303133313130303030303031323641544D3030303031303031313232333334343535363646463032323946323630384131423243334434453546363037313841304131413241334134413541364137",
        ),
        (
            "ascii",
            "key_change_0810",
            "30383130383232303030303030323831303030303034303030303030303030303031343031313232303933303135303030313237303041544D303030303130303354504B3136313036354430313132503041453030453030303042334631433245354136443739383031313232333334343535363637373838393941414242434344444545464630303131303036314132423343",
        ),
        (
            "binary-bitmap",
            "sign_on_0800",
            "30383030822000000080000004000000000000003131323230393330313530303031323341544D3030303031303031",
        ),
        (
            "binary-bitmap",
            "withdrawal_0200",
            "30323030F23C040028C0800100000000000000203136363031313030303030303030303030343031313030303030303030303035303030303131323230393330313530303031323431363330313531313232323831323035313234363031313030303030303030303030343D3238313231303134333231303938373635343341544D3030303031535749544348594152442D303030313336300123456789ABCDEF3033323441314232433344344535463630373138323933413442354336443745384639",
        ),
        (
            "binary-bitmap",
            "reversal_0420_secondary",
            "30343230F220000002808000000000400000000131363630313130303030303030303030303430313130303030303030303030353030303031313232303933313135303030313235303041544D3030303031333630303230303030303132343131323230393330313530303030303030303030303030303030303030303030FEDCBA9876543210",
        ),
        (
            "binary-bitmap",
            "binary_fields_0200",
            "30323030202000000080120133313130303030303031323641544D303030303100112233445566FF3031319F2608A1B2C3D4E5F60718A0A1A2A3A4A5A6A7",
        ),
        (
            "binary-bitmap",
            "key_change_0810",
            "303831308220000002810000040000000000014031313232303933303135303030313237303041544D303030303130303354504B3136313036354430313132503041453030453030303042334631433245354136443739383031313232333334343535363637373838393941414242434344444545464630303131303036314132423343",
        ),
    ];

    /// The same messages as `gen_vectors.py`; binary fields are written as hex there and here.
    fn golden_message(name: &str) -> Message {
        let (mti, fields): (&str, &[(u8, &str)]) = match name {
            "sign_on_0800" => (
                "0800",
                &[
                    (7, "1122093015"),
                    (11, "000123"),
                    (41, "ATM00001"),
                    (70, "001"),
                ],
            ),
            "withdrawal_0200" => (
                "0200",
                &[
                    (2, "6011000000000004"),
                    (3, "011000"),
                    (4, "000000050000"),
                    (7, "1122093015"),
                    (11, "000124"),
                    (12, "163015"),
                    (13, "1122"),
                    (14, "2812"),
                    (22, "051"),
                    (35, "6011000000000004=2812101"),
                    (37, "432109876543"),
                    (41, "ATM00001"),
                    (42, "SWITCHYARD-0001"),
                    (49, "360"),
                    (123, "4A1B2C3D4E5F60718293A4B5C6D7E8F9"),
                    (64, "0123456789ABCDEF"),
                ],
            ),
            "reversal_0420_secondary" => (
                "0420",
                &[
                    (2, "6011000000000004"),
                    (3, "011000"),
                    (4, "000000050000"),
                    (7, "1122093115"),
                    (11, "000125"),
                    (39, "00"),
                    (41, "ATM00001"),
                    (49, "360"),
                    (90, "020000012411220930150000000000000000000000"),
                    (128, "FEDCBA9876543210"),
                ],
            ),
            "binary_fields_0200" => (
                "0200",
                &[
                    (3, "311000"),
                    (11, "000126"),
                    (41, "ATM00001"),
                    (52, "00112233445566FF"),
                    (55, "9F2608A1B2C3D4E5F60718"),
                    (64, "A0A1A2A3A4A5A6A7"),
                ],
            ),
            "key_change_0810" => (
                "0810",
                &[
                    (7, "1122093015"),
                    (11, "000127"),
                    (39, "00"),
                    (41, "ATM00001"),
                    (48, "TPK"),
                    (70, "161"),
                    (
                        120,
                        "D0112P0AE00E0000B3F1C2E5A6D7980112233445566778899AABBCCDDEEFF0011",
                    ),
                    (122, "1A2B3C"),
                ],
            ),
            other => panic!("no golden message {other}"),
        };
        let mut msg = Message::new(Mti::parse(mti).unwrap());
        for &(n, value) in fields {
            if ISO8583_1987[usize::from(n) - 2].is_binary() {
                msg.set(n, hex::decode(value).unwrap());
            } else {
                msg.set_str(n, value);
            }
        }
        msg
    }

    fn golden() -> impl Iterator<Item = (&'static Packager, &'static str, Vec<u8>)> {
        GOLDEN.iter().map(|(packager, name, wire)| {
            (
                Packager::by_name(packager).unwrap(),
                *name,
                hex::decode(wire).unwrap(),
            )
        })
    }

    /// The typical 0200 of the benchmark, with MAC.
    fn withdrawal() -> Message {
        let mut msg = golden_message("withdrawal_0200");
        msg.set_str(fields::POS_CONDITION_CODE, "00");
        msg
    }

    #[test]
    fn packs_exactly_what_pyiso8583_packs() {
        for (packager, name, wire) in golden() {
            let packed = packager.pack(&golden_message(name)).unwrap();
            assert_eq!(
                hex::encode_upper(&packed),
                hex::encode_upper(&wire),
                "{} {name}",
                packager.name()
            );
        }
    }

    #[test]
    fn unpacks_what_pyiso8583_packs() {
        for (packager, name, wire) in golden() {
            let msg = packager.unpack(&wire).unwrap();
            assert_eq!(msg, golden_message(name), "{} {name}", packager.name());
        }
    }

    /// Random messages packed by pyiso8583 (`gen_vectors.py --random`): every field both
    /// sides carry, at random lengths, with and without the secondary bitmap.
    #[test]
    fn agrees_with_pyiso8583_on_random_messages() {
        let vectors = include_str!("../../tests/vectors/pyiso8583_random.txt");
        let mut seen = [0usize; 2];
        for (line_no, line) in vectors.lines().enumerate() {
            let mut parts = line.split(' ');
            let (Some(name), Some(wire), Some(values)) = (parts.next(), parts.next(), parts.next())
            else {
                panic!("line {line_no}: expected 3 columns");
            };
            let packager = Packager::by_name(name).unwrap();
            let wire = hex::decode(wire).unwrap();
            let mut values = values.split(',');
            let mti = values.next().and_then(|t| t.strip_prefix("t=")).unwrap();
            let mut expected = Message::new(Mti::parse(mti).unwrap());
            for value in values {
                let (n, v) = value.split_once('=').unwrap();
                expected.set(n.parse().unwrap(), hex::decode(v).unwrap());
            }
            let unpacked = packager
                .unpack(&wire)
                .unwrap_or_else(|e| panic!("line {line_no}: {e}"));
            assert_eq!(unpacked, expected, "line {line_no}");
            assert_eq!(packager.pack(&expected).unwrap(), wire, "line {line_no}");
            seen[usize::from(packager.binary_encoding() == BinaryEncoding::Raw)] += 1;
        }
        assert!(seen[0] >= 50 && seen[1] >= 50, "too few vectors: {seen:?}");
    }

    #[test]
    fn ascii_accepts_lowercase_hex_bitmaps_and_binary_fields() {
        let wire = hex::decode(GOLDEN[3].2).unwrap();
        let lower = String::from_utf8(wire).unwrap().to_ascii_lowercase();
        // Only the hex parts have letters: "ATM00001" is the one text field with letters.
        let lower = lower.replace("atm00001", "ATM00001");
        let msg = Packager::ascii().unpack(lower.as_bytes()).unwrap();
        assert_eq!(msg, golden_message("binary_fields_0200"));
    }

    #[test]
    fn built_in_tables_pass_profile_validation() {
        for packager in [Packager::ascii(), Packager::binary_bitmap()] {
            let rebuilt = Packager::new(
                "copy",
                packager.bitmap_encoding(),
                packager.binary_encoding(),
                ISO8583_1987.to_vec(),
            )
            .unwrap();
            let msg = withdrawal();
            assert_eq!(rebuilt.pack(&msg).unwrap(), packager.pack(&msg).unwrap());
        }
    }

    #[test]
    fn unknown_packager_name_is_refused() {
        assert_eq!(
            Packager::by_name("ebcdic").unwrap_err().to_string(),
            "failed to find packager \"ebcdic\": expected \"ascii\" or \"binary-bitmap\""
        );
        assert_eq!(
            Packager::by_name("binary-bitmap").unwrap().name(),
            "binary-bitmap"
        );
    }

    #[rstest]
    #[case::missing(ISO8583_1987[1..].to_vec(), ProfileError::Missing { field: 2 })]
    #[case::duplicate(
        [ISO8583_1987.as_slice(), &ISO8583_1987[..1]].concat(),
        ProfileError::Duplicate { field: 2 }
    )]
    #[case::out_of_range(
        [ISO8583_1987.as_slice(), &[FieldSpec::new(1, "Bitmap", FieldKind::Fixed(8), Charset::Binary)]].concat(),
        ProfileError::OutOfRange { field: 1 }
    )]
    #[case::prefix(
        with(FieldSpec::new(55, "ICC", FieldKind::LllVar(500), Charset::Binary)),
        ProfileError::PrefixTooShort { field: 55, wire_max: 1000 }
    )]
    #[case::ll_prefix(
        with(FieldSpec::new(2, "PAN", FieldKind::LlVar(100), Charset::Numeric)),
        ProfileError::PrefixTooShort { field: 2, wire_max: 100 }
    )]
    #[case::mac(
        with(FieldSpec::new(128, "MAC", FieldKind::Fixed(4), Charset::Binary)),
        ProfileError::MacFields
    )]
    fn bad_profiles_are_refused(#[case] fields: Vec<FieldSpec>, #[case] expected: ProfileError) {
        assert_eq!(
            Packager::new("bad", BitmapEncoding::Hex, BinaryEncoding::Hex, fields).unwrap_err(),
            expected
        );
    }

    fn with(spec: FieldSpec) -> Vec<FieldSpec> {
        let mut fields = ISO8583_1987.to_vec();
        let i = usize::from(spec.number) - 2;
        fields[i] = spec;
        fields
    }

    #[rstest]
    #[case::short_amount(
        4,
        "50000",
        "failed to validate field 4: expected 12 numeric characters, got 5"
    )]
    #[case::long_pan(
        2,
        "60110000000000000004",
        "failed to validate field 2: expected at most 19 numeric characters, got 20"
    )]
    #[case::alpha_stan(
        11,
        "00012A",
        "failed to validate field 11: expected numeric characters only, found another character at position 5"
    )]
    #[case::long_tid(
        41,
        "ATM000001",
        "failed to validate field 41: expected 8 printable ASCII characters, got 9"
    )]
    #[case::short_mac(64, "ABC", "failed to validate field 64: expected 8 bytes, got 3")]
    #[case::field_65(
        65,
        "ABCDEFGH",
        "failed to validate field 65: this profile does not carry the field"
    )]
    #[case::newline_in_48(
        48,
        "TPK\n",
        "failed to validate field 48: expected printable ASCII characters only, found another character at position 3"
    )]
    fn pack_refuses_invalid_fields_and_leaves_output_untouched(
        #[case] n: u8,
        #[case] value: &str,
        #[case] message: &str,
    ) {
        let mut msg = golden_message("sign_on_0800");
        msg.set_str(n, value);
        for packager in [Packager::ascii(), Packager::binary_bitmap()] {
            let mut out = b"kept".to_vec();
            let err = packager.pack_into(&msg, &mut out).unwrap_err();
            assert_eq!(err.to_string(), message);
            assert_eq!(out, b"kept");
        }
    }

    /// Header of a binary-bitmap 0200 carrying fields 3, 11 and 41 and, optionally, more.
    fn binary_header(mti: &[u8], fields: &[u8]) -> Vec<u8> {
        let mut bitmap = Bitmap::new();
        for &n in fields {
            bitmap.insert(n);
        }
        let mut out = mti.to_vec();
        let secondary = bitmap.secondary();
        out.extend_from_slice(&(bitmap.primary() | u64::from(secondary != 0) << 63).to_be_bytes());
        if secondary != 0 {
            out.extend_from_slice(&secondary.to_be_bytes());
        }
        out
    }

    fn bytes(parts: &[&[u8]]) -> Vec<u8> {
        parts.concat()
    }

    #[rstest]
    #[case::empty(Packager::ascii(), vec![], None, UnpackReason::Truncated { needed: 4, available: 0 }, None)]
    #[case::short_mti(Packager::ascii(), b"020".to_vec(), None, UnpackReason::Truncated { needed: 4, available: 3 }, None)]
    #[case::bad_mti(Packager::ascii(), b"02X0".to_vec(), None, UnpackReason::InvalidMti, None)]
    #[case::short_bitmap(Packager::ascii(), b"02007020".to_vec(), None, UnpackReason::Truncated { needed: 16, available: 4 }, Some(vec![]))]
    #[case::bad_hex_bitmap(Packager::ascii(), b"0200G020000000C00000".to_vec(), None, UnpackReason::InvalidBitmap, Some(vec![]))]
    #[case::empty_secondary(
        Packager::binary_bitmap(),
        bytes(&[b"0200", &[0x80, 0, 0, 0, 0, 0, 0, 0], &[0; 8]]),
        Some(1), UnpackReason::EmptySecondaryBitmap, Some(vec![])
    )]
    #[case::short_secondary(
        Packager::binary_bitmap(),
        bytes(&[b"0200", &[0x80, 0, 0, 0, 0, 0, 0, 0], &[0; 3]]),
        Some(1), UnpackReason::Truncated { needed: 8, available: 3 }, Some(vec![])
    )]
    #[case::bad_length_prefix(
        Packager::binary_bitmap(),
        bytes(&[&binary_header(b"0200", &[2, 11]), b"1A6011000000000004000001"]),
        Some(2), UnpackReason::InvalidLengthPrefix { digits: 2 }, Some(vec![])
    )]
    #[case::pan_too_long(
        Packager::binary_bitmap(),
        bytes(&[&binary_header(b"0200", &[2]), b"20", b"60110000000000000004"]),
        Some(2), UnpackReason::Invalid { problem: "expected at most 19 numeric characters, got 20".into() }, Some(vec![])
    )]
    #[case::bad_amount_keeps_stan_and_tid(
        Packager::binary_bitmap(),
        bytes(&[&binary_header(b"0200", &[3, 4, 11, 41]), b"011000", b"00000005000X", b"000001", b"ATM00001"]),
        Some(4), UnpackReason::Invalid { problem: "expected numeric characters only, found another character at position 11".into() }, Some(vec![3])
    )]
    #[case::bad_currency_after_stan_and_tid(
        Packager::binary_bitmap(),
        bytes(&[&binary_header(b"0200", &[11, 41, 49]), b"000001", b"ATM00001", b"US"]),
        Some(49), UnpackReason::Truncated { needed: 3, available: 2 }, Some(vec![11, 41])
    )]
    #[case::body_truncated(
        Packager::binary_bitmap(),
        bytes(&[&binary_header(b"0200", &[11, 123]), b"000001", b"032", b"4A1B2C3D"]),
        Some(123), UnpackReason::Truncated { needed: 32, available: 8 }, Some(vec![11])
    )]
    #[case::odd_hex_icc(
        Packager::ascii(),
        bytes(&[b"0200", b"0000000000000200", b"0039F2"]),
        Some(55), UnpackReason::Invalid { problem: "expected an even number of hex characters, got 3".into() }, Some(vec![])
    )]
    #[case::non_hex_mac(
        Packager::ascii(),
        bytes(&[b"0200", b"0020000000000001", b"000001", b"0123456789ABCDEG"]),
        Some(64), UnpackReason::Invalid { problem: "expected hex characters only, found another character at position 15".into() }, Some(vec![11])
    )]
    #[case::field_65_is_not_carried(
        Packager::binary_bitmap(),
        bytes(&[&binary_header(b"0200", &[11, 65, 70]), b"000001", &[0; 8], b"301"]),
        Some(65), UnpackReason::Invalid { problem: "this profile does not carry the field".into() }, Some(vec![11])
    )]
    #[case::trailing_bytes(
        Packager::binary_bitmap(),
        bytes(&[&binary_header(b"0800", &[11, 70]), b"000001", b"301", b"junk"]),
        None, UnpackReason::TrailingBytes { count: 4 }, Some(vec![11, 70])
    )]
    fn unpack_errors_say_where_and_why_and_keep_what_was_decoded(
        #[case] packager: &Packager,
        #[case] raw: Vec<u8>,
        #[case] field: Option<u8>,
        #[case] reason: UnpackReason,
        #[case] partial_fields: Option<Vec<u8>>,
    ) {
        let err = packager.unpack(&raw).unwrap_err();
        assert_eq!(err.field, field, "{err}");
        assert_eq!(err.reason, reason, "{err}");
        assert_eq!(
            err.partial
                .as_ref()
                .map(|m| m.fields().map(|(n, _)| n).collect::<Vec<_>>()),
            partial_fields,
            "{err}"
        );
        assert!(err.to_string().starts_with("failed to unpack "), "{err}");
    }

    #[test]
    fn partial_message_carries_stan_and_terminal_for_a_format_error_reply() {
        let raw = bytes(&[
            &binary_header(b"0200", &[4, 11, 41, 49]),
            b"000000050000",
            b"000777",
            b"ATM00042",
            b"3X0",
        ]);
        let err = Packager::binary_bitmap().unpack(&raw).unwrap_err();
        assert_eq!(
            err.to_string(),
            "failed to unpack field 49: expected numeric characters only, found another character at position 1"
        );
        let partial = err.partial.unwrap();
        assert_eq!(partial.mti(), Mti::FINANCIAL_REQUEST);
        assert_eq!(partial.get_str(fields::STAN), Some("000777"));
        assert_eq!(partial.get_str(fields::TERMINAL_ID), Some("ATM00042"));
        assert!(!partial.has(fields::CURRENCY));
    }

    #[test]
    fn truncation_at_every_offset_of_a_golden_message_is_an_error() {
        for (packager, name, wire) in golden() {
            for len in 0..wire.len() {
                let err = packager.unpack(&wire[..len]).unwrap_err();
                assert!(
                    matches!(err.reason, UnpackReason::Truncated { .. }),
                    "{} {name} cut at {len}: {err}",
                    packager.name()
                );
                assert_eq!(err.partial.is_some(), len >= 4, "{name} cut at {len}");
            }
        }
    }

    /// A 0200 with primary-bitmap fields only (so its MAC goes in 64).
    fn primary_only() -> Message {
        let mut msg = Message::new(Mti::FINANCIAL_REQUEST);
        msg.set_str(fields::PROCESSING_CODE, "311000");
        msg.set_str(fields::STAN, "000126");
        msg.set_str(fields::TERMINAL_ID, "ATM00001");
        msg.set(fields::PIN_DATA, [0x11u8; 8]);
        msg
    }

    #[test]
    fn mac_field_moves_to_128_with_secondary_fields() {
        let mut msg = primary_only();
        assert_eq!(mac_field_for(&msg), 64);
        msg.set(fields::MAC_SECONDARY, [0u8; 8]);
        assert_eq!(
            mac_field_for(&msg),
            64,
            "128 alone is the MAC, not a reason for it"
        );
        msg.remove(fields::MAC_SECONDARY);
        msg.set_str(fields::ORIGINAL_DATA, &"0".repeat(42));
        assert_eq!(mac_field_for(&msg), 128);
        msg.remove(fields::ORIGINAL_DATA);
        msg.set_str(fields::PRIVATE_USE, "x");
        assert_eq!(mac_field_for(&msg), 128);
        // The SPEC's PIN block lives in 123, so a 0200 with a PIN carries its MAC in 128.
        assert_eq!(mac_field_for(&withdrawal()), 128);
    }

    #[test]
    fn mac_wire_len_per_packager() {
        assert_eq!(Packager::ascii().mac_wire_len(), 16);
        assert_eq!(Packager::binary_bitmap().mac_wire_len(), 8);
    }

    /// Packs `msg` the way the switch will: MAC input, MAC, then the full message; checks the
    /// input is exactly the start of the packed message and what the receiver will see.
    fn check_mac_layout(packager: &Packager, mut msg: Message) {
        let input = packager.pack_mac_input(&msg).unwrap();
        let mac_field = mac_field_for(&msg);
        msg.set(mac_field, [0xA5, 1, 2, 3, 4, 5, 6, 0x5A]);
        let packed = packager.pack(&msg).unwrap();
        assert_eq!(packed.len(), input.len() + packager.mac_wire_len());
        assert_eq!(&packed[..input.len()], &input[..]);
        // An existing MAC value changes nothing about the input.
        assert_eq!(packager.pack_mac_input(&msg).unwrap(), input);
        let received = packager.unpack(&packed).unwrap();
        let (received_input, mac) = packager.received_mac(&packed, &received).unwrap();
        assert_eq!(received_input, &input[..]);
        assert_eq!(mac, &[0xA5, 1, 2, 3, 4, 5, 6, 0x5A]);
    }

    #[test]
    fn mac_input_is_the_packed_message_up_to_the_mac() {
        for packager in [Packager::ascii(), Packager::binary_bitmap()] {
            let mut msg = withdrawal();
            msg.remove(fields::MAC);
            check_mac_layout(packager, msg);
            check_mac_layout(packager, golden_message("reversal_0420_secondary"));
            check_mac_layout(packager, Message::new(Mti::NETWORK_REQUEST));
        }
        // The MAC bit is set in the bitmap the MAC covers.
        let input = Packager::binary_bitmap()
            .pack_mac_input(&primary_only())
            .unwrap();
        assert_eq!(input[4 + 7] & 1, 1, "bit 64 must be set in the MAC input");
        let mut msg = withdrawal();
        msg.remove(fields::MAC);
        let input = Packager::binary_bitmap().pack_mac_input(&msg).unwrap();
        assert_eq!(
            input[4 + 8 + 7] & 1,
            1,
            "bit 128 must be set in the MAC input"
        );
    }

    #[test]
    fn pack_with_mac_packs_once_what_set_then_pack_would() {
        for packager in [Packager::ascii(), Packager::binary_bitmap()] {
            for mut msg in [primary_only(), withdrawal()] {
                msg.remove(fields::MAC);
                let expected_input = packager.pack_mac_input(&msg).unwrap();
                let packed = packager
                    .pack_with_mac(&mut msg, |input| {
                        assert_eq!(input, &expected_input[..]);
                        Ok::<_, PackError>([7u8; 8])
                    })
                    .unwrap();
                assert_eq!(msg.get(mac_field_for(&msg)), Some(&[7u8; 8][..]));
                assert_eq!(packed, packager.pack(&msg).unwrap());
            }
        }
    }

    #[test]
    fn pack_with_mac_refuses_a_mac_of_the_wrong_length_and_passes_errors_through() {
        let packager = Packager::binary_bitmap();
        let mut msg = primary_only();
        assert_eq!(
            packager
                .pack_with_mac(&mut msg, |_| Ok::<_, PackError>([7u8; 4]))
                .unwrap_err()
                .to_string(),
            "failed to validate field 64: expected 8 bytes, got 4"
        );
        assert!(
            !msg.has(fields::MAC),
            "no MAC is stored when packing failed"
        );
        #[derive(Debug, PartialEq)]
        enum HsmError {
            NoKey,
            Pack,
        }
        impl From<PackError> for HsmError {
            fn from(_: PackError) -> Self {
                HsmError::Pack
            }
        }
        assert_eq!(
            packager.pack_with_mac(&mut msg, |_| Err::<[u8; 8], _>(HsmError::NoKey)),
            Err(HsmError::NoKey)
        );
    }

    #[test]
    fn mac_input_refuses_a_field_after_the_mac() {
        let mut msg = primary_only();
        msg.set(fields::MAC_SECONDARY, [0u8; 8]);
        assert_eq!(
            Packager::ascii().pack_mac_input(&msg),
            Err(PackError::MacNotLast {
                mac: 64,
                after: 128
            })
        );
    }

    #[test]
    fn received_mac_must_be_present_and_last() {
        let packager = Packager::binary_bitmap();
        let mut msg = primary_only();
        let raw = packager.pack(&msg).unwrap();
        assert_eq!(
            packager.received_mac(&raw, &msg),
            Err(MacLayoutError::Missing { field: 64 })
        );
        msg.set(fields::MAC, [0u8; 8]);
        msg.set(fields::MAC_SECONDARY, [0u8; 8]);
        let raw = packager.pack(&msg).unwrap();
        assert_eq!(
            packager.received_mac(&raw, &msg),
            Err(MacLayoutError::NotLast { mac: 64, last: 128 })
        );
        let mut msg = golden_message("reversal_0420_secondary");
        msg.remove(fields::MAC_SECONDARY);
        msg.set(fields::MAC, [0u8; 8]);
        let raw = packager.pack(&msg).unwrap();
        assert_eq!(
            packager.received_mac(&raw, &msg),
            Err(MacLayoutError::Missing { field: 128 })
        );
    }

    // ---- property tests ----

    fn value_strategy(spec: &FieldSpec) -> BoxedStrategy<Vec<u8>> {
        let (min, max) = match spec.kind {
            FieldKind::Fixed(n) => (usize::from(n), usize::from(n)),
            FieldKind::Unsupported => unreachable!("unsupported fields are not generated"),
            FieldKind::LlVar(max) | FieldKind::LllVar(max) => (0, usize::from(max)),
        };
        let alphabet: Vec<u8> = (0..=255u8).filter(|b| spec.charset.allows(*b)).collect();
        prop::collection::vec(prop::sample::select(alphabet), min..=max).boxed()
    }

    prop_compose! {
        fn mti_strategy()(digits in "[0-9]{4}") -> Mti {
            Mti::parse(&digits).unwrap()
        }
    }

    /// Random valid messages: any MTI, a random subset of fields 2..=128 but 65 (so secondary-bitmap
    /// fields appear in most cases), each value drawn from its field's definition.
    fn message_strategy(max_fields: usize) -> impl Strategy<Value = Message> {
        (
            mti_strategy(),
            prop::sample::subsequence(
                (2..=128u8).filter(|&n| n != 65).collect::<Vec<_>>(),
                0..=max_fields,
            ),
        )
            .prop_flat_map(|(mti, numbers)| {
                let values: Vec<_> = numbers
                    .into_iter()
                    .map(|n| {
                        value_strategy(&ISO8583_1987[usize::from(n) - 2]).prop_map(move |v| (n, v))
                    })
                    .collect();
                (Just(mti), values)
            })
            .prop_map(|(mti, values)| {
                let mut msg = Message::new(mti);
                for (n, v) in values {
                    msg.set(n, v);
                }
                msg
            })
    }

    fn packager_strategy() -> impl Strategy<Value = &'static Packager> {
        prop_oneof![Just(Packager::ascii()), Just(Packager::binary_bitmap())]
    }

    proptest! {
        #[test]
        fn valid_messages_round_trip(packager in packager_strategy(), msg in message_strategy(40)) {
            let packed = packager.pack(&msg).unwrap();
            let back = packager.unpack(&packed).unwrap();
            prop_assert_eq!(&back, &msg);
            prop_assert_eq!(packager.pack(&back).unwrap(), packed);
        }

        #[test]
        fn truncated_messages_are_errors(
            packager in packager_strategy(),
            msg in message_strategy(12),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 16),
        ) {
            let packed = packager.pack(&msg).unwrap();
            for cut in cuts {
                let len = cut.index(packed.len());
                prop_assert!(packager.unpack(&packed[..len]).is_err(), "cut at {}", len);
            }
        }

        #[test]
        fn mac_input_matches_the_packed_prefix(packager in packager_strategy(), msg in message_strategy(20)) {
            let mut msg = msg;
            msg.remove(fields::MAC);
            msg.remove(fields::MAC_SECONDARY);
            check_mac_layout(packager, msg);
        }

        #[test]
        fn random_bytes_never_panic(packager in packager_strategy(), raw in prop::collection::vec(any::<u8>(), 0..400)) {
            let _ = packager.unpack(&raw);
        }

        /// Garbage behind a plausible header reaches the field decoders.
        #[test]
        fn random_fields_behind_a_valid_header_never_panic(
            packager in packager_strategy(),
            primary in any::<u64>(),
            secondary in any::<u64>(),
            body in prop::collection::vec(prop_oneof![3 => 0x30..=0x39u8, 1 => any::<u8>()], 0..600),
        ) {
            let mut raw = b"0200".to_vec();
            packager.write_bitmap(primary, &mut raw);
            packager.write_bitmap(secondary, &mut raw);
            raw.extend_from_slice(&body);
            if let Ok(msg) = packager.unpack(&raw) {
                // Whatever we accept is canonical for the raw packager: it packs back identically.
                if packager.binary_encoding() == BinaryEncoding::Raw {
                    prop_assert_eq!(packager.pack(&msg).unwrap(), raw);
                }
            }
        }
    }
}
