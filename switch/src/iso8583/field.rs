//! ISO 8583 field definitions as data (length kind and character set per field) and the
//! validation every value goes through on pack and on unpack.

use std::borrow::Cow;

/// How a field's length is determined. Lengths are in *logical* units: characters for text
/// fields, bytes for binary fields (a packager that hex-encodes binary fields doubles them on
/// the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldKind {
    /// Exactly this many characters or bytes, no length prefix.
    Fixed(u16),
    /// Up to this many, preceded by a 2-digit length.
    LlVar(u16),
    /// Up to this many, preceded by a 3-digit length.
    LllVar(u16),
    /// Not carried by the profile: refused on pack and on unpack. Used for field 65, whose
    /// bit pyiso8583 1.x treats as an 8-byte field but 2.x and later as the tertiary bitmap
    /// indicator; refusing it is the only reading both agree on.
    Unsupported,
}

impl FieldKind {
    /// Number of length-prefix digits on the wire: 0, 2 or 3.
    pub const fn prefix_digits(&self) -> usize {
        match self {
            FieldKind::Fixed(_) | FieldKind::Unsupported => 0,
            FieldKind::LlVar(_) => 2,
            FieldKind::LllVar(_) => 3,
        }
    }

    /// The fixed length, or the maximum for a variable field.
    pub const fn max_len(&self) -> usize {
        match self {
            FieldKind::Fixed(n) | FieldKind::LlVar(n) | FieldKind::LllVar(n) => *n as usize,
            FieldKind::Unsupported => 0,
        }
    }
}

/// The characters a field may hold (ISO 8583:1987 attribute letters in brackets).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Charset {
    /// `n`: digits `0-9`.
    Numeric,
    /// `a`: letters, and space because fixed `a` fields are right-padded with spaces.
    Alpha,
    /// `an`: letters, digits and the padding space.
    AlphaNum,
    /// `ans`: any printable ASCII character, space included (0x20..=0x7E).
    AlphaNumSpecial,
    /// `z`: track 2/3 characters: digits, the ABA separators and sentinels `:;<=>?`, and `D`,
    /// which many terminals send as the field separator instead of `=`.
    Track2,
    /// `b`: any byte; the value is raw bytes in memory.
    Binary,
}

impl Charset {
    /// Whether `byte` belongs to this character set.
    pub const fn allows(&self, byte: u8) -> bool {
        match self {
            Charset::Numeric => byte.is_ascii_digit(),
            Charset::Alpha => byte.is_ascii_alphabetic() || byte == b' ',
            Charset::AlphaNum => byte.is_ascii_alphanumeric() || byte == b' ',
            Charset::AlphaNumSpecial => matches!(byte, 0x20..=0x7e),
            Charset::Track2 => matches!(byte, b'0'..=b'?' | b'D'),
            Charset::Binary => true,
        }
    }

    /// Whether every byte of `value` is in the set. Written branch-free per byte (range
    /// checks OR-ed together, no early exit) so the compiler vectorises it: validation was
    /// the largest single cost of parse + pack when it went a byte at a time.
    fn all_allowed(&self, value: &[u8]) -> bool {
        let outside = |b: u8, lo: u8, hi: u8| b.wrapping_sub(lo) > hi - lo;
        let bad = match self {
            Charset::Numeric => value
                .iter()
                .fold(false, |bad, &b| bad | outside(b, b'0', b'9')),
            Charset::Alpha => value.iter().fold(false, |bad, &b| {
                let letter = b | 0x20; // folds A-Z onto a-z
                bad | (outside(letter, b'a', b'z') & (b != b' '))
            }),
            Charset::AlphaNum => value.iter().fold(false, |bad, &b| {
                let letter = b | 0x20;
                bad | (outside(letter, b'a', b'z') & outside(b, b'0', b'9') & (b != b' '))
            }),
            Charset::AlphaNumSpecial => value
                .iter()
                .fold(false, |bad, &b| bad | outside(b, 0x20, 0x7e)),
            Charset::Track2 => value.iter().fold(false, |bad, &b| {
                bad | (outside(b, b'0', b'?') & (b != b'D'))
            }),
            Charset::Binary => false,
        };
        !bad
    }

    /// Membership of every byte value, for locating the first bad byte in an error.
    const fn table(&self) -> &'static [bool; 256] {
        match self {
            Charset::Numeric => &NUMERIC,
            Charset::Alpha => &ALPHA,
            Charset::AlphaNum => &ALPHA_NUM,
            Charset::AlphaNumSpecial => &ALPHA_NUM_SPECIAL,
            Charset::Track2 => &TRACK2,
            Charset::Binary => &BINARY,
        }
    }

    /// What the characters are called in an error message.
    pub const fn unit(&self) -> &'static str {
        match self {
            Charset::Numeric => "numeric characters",
            Charset::Alpha => "alphabetic characters",
            Charset::AlphaNum => "alphanumeric characters",
            Charset::AlphaNumSpecial => "printable ASCII characters",
            Charset::Track2 => "track 2 characters",
            Charset::Binary => "bytes",
        }
    }
}

const fn membership(charset: Charset) -> [bool; 256] {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        table[b] = charset.allows(b as u8);
        b += 1;
    }
    table
}

static NUMERIC: [bool; 256] = membership(Charset::Numeric);
static ALPHA: [bool; 256] = membership(Charset::Alpha);
static ALPHA_NUM: [bool; 256] = membership(Charset::AlphaNum);
static ALPHA_NUM_SPECIAL: [bool; 256] = membership(Charset::AlphaNumSpecial);
static TRACK2: [bool; 256] = membership(Charset::Track2);
static BINARY: [bool; 256] = membership(Charset::Binary);

/// Problem reported for a field of kind [`FieldKind::Unsupported`].
pub(crate) const UNSUPPORTED: &str = "this profile does not carry the field";

/// A value that does not fit its field's definition.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("failed to validate field {field}: {problem}")]
pub struct FieldError {
    /// The field number.
    pub field: u8,
    /// What is wrong, e.g. "expected 12 numeric characters, got 5". Never contains the value:
    /// it may be cardholder data.
    pub problem: String,
}

/// The definition of one data element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldSpec {
    /// Field number, 2..=128.
    pub number: u8,
    /// Human name, for error messages and documentation.
    pub name: Cow<'static, str>,
    /// Fixed or variable length.
    pub kind: FieldKind,
    /// Allowed characters.
    pub charset: Charset,
}

impl FieldSpec {
    /// A field definition with a static name (usable in `const` tables).
    pub const fn new(number: u8, name: &'static str, kind: FieldKind, charset: Charset) -> Self {
        Self {
            number,
            name: Cow::Borrowed(name),
            kind,
            charset,
        }
    }

    /// Whether values of this field are raw bytes rather than text.
    pub const fn is_binary(&self) -> bool {
        matches!(self.charset, Charset::Binary)
    }

    /// Checks a logical value: length within the field's limits (exact for fixed fields) and
    /// every byte in the field's character set.
    pub fn validate(&self, value: &[u8]) -> Result<(), FieldError> {
        let unit = self.charset.unit();
        let len = value.len();
        match self.kind {
            FieldKind::Unsupported => {
                return Err(self.error(UNSUPPORTED.to_owned()));
            }
            FieldKind::Fixed(n) if len != n as usize => {
                return Err(self.error(format!("expected {n} {unit}, got {len}")));
            }
            FieldKind::LlVar(max) | FieldKind::LllVar(max) if len > max as usize => {
                return Err(self.error(format!("expected at most {max} {unit}, got {len}")));
            }
            _ => {}
        }
        if self.charset.all_allowed(value) {
            return Ok(());
        }
        let allowed = self.charset.table();
        if let Some(position) = value.iter().position(|b| !allowed[usize::from(*b)]) {
            return Err(self.error(format!(
                "expected {unit} only, found another character at position {position}"
            )));
        }
        Ok(())
    }

    pub(crate) fn error(&self, problem: String) -> FieldError {
        FieldError {
            field: self.number,
            problem,
        }
    }
}

use Charset::{AlphaNum as AN, AlphaNumSpecial as ANS, Binary as B, Numeric as N, Track2 as Z};
use FieldKind::{Fixed, LlVar, LllVar, Unsupported};

const fn spec(number: u8, name: &'static str, kind: FieldKind, charset: Charset) -> FieldSpec {
    FieldSpec::new(number, name, kind, charset)
}

/// ISO 8583:1987 data elements 2..=128 with the lengths of pyiso8583's `default` and
/// `default_ascii` specs (identical apart from how binary fields go on the wire).
///
/// Character sets follow ISO 8583:1987, with two deliberate choices: the `x+n` signed amounts
/// (28–31, 97) are `an` because the set has no sign-then-digits class, and the reserved and
/// private fields (46–48, 56–63, 104–127) and track 1 (45) are `ans` because that is what
/// they carry in practice (TR-31 key blocks, separators like `^`). Field 53 is 16 characters
/// (`n`), not binary: pyiso8583 encodes it as text in both specs. Field 65 is not carried:
/// see [`FieldKind::Unsupported`].
pub static ISO8583_1987: [FieldSpec; 127] = [
    spec(2, "Primary Account Number (PAN)", LlVar(19), N),
    spec(3, "Processing Code", Fixed(6), N),
    spec(4, "Amount, Transaction", Fixed(12), N),
    spec(5, "Amount, Settlement", Fixed(12), N),
    spec(6, "Amount, Cardholder Billing", Fixed(12), N),
    spec(7, "Transmission Date and Time", Fixed(10), N),
    spec(8, "Amount, Cardholder Billing Fee", Fixed(8), N),
    spec(9, "Conversion Rate, Settlement", Fixed(8), N),
    spec(10, "Conversion Rate, Cardholder Billing", Fixed(8), N),
    spec(11, "System Trace Audit Number", Fixed(6), N),
    spec(12, "Time, Local Transaction", Fixed(6), N),
    spec(13, "Date, Local Transaction", Fixed(4), N),
    spec(14, "Date, Expiration", Fixed(4), N),
    spec(15, "Date, Settlement", Fixed(4), N),
    spec(16, "Date, Conversion", Fixed(4), N),
    spec(17, "Date, Capture", Fixed(4), N),
    spec(18, "Merchant Type", Fixed(4), N),
    spec(19, "Acquiring Institution Country Code", Fixed(3), N),
    spec(20, "PAN Country Code", Fixed(3), N),
    spec(21, "Forwarding Institution Country Code", Fixed(3), N),
    spec(22, "Point-of-Service Entry Mode", Fixed(3), N),
    spec(23, "PAN Sequence Number", Fixed(3), N),
    spec(24, "Network International ID (NII)", Fixed(3), N),
    spec(25, "Point-of-Service Condition Code", Fixed(2), N),
    spec(26, "Point-of-Service Capture Code", Fixed(2), N),
    spec(27, "Authorizing ID Response Length", Fixed(1), N),
    spec(28, "Amount, Transaction Fee", Fixed(9), AN),
    spec(29, "Amount, Settlement Fee", Fixed(9), AN),
    spec(30, "Amount, Transaction Processing Fee", Fixed(9), AN),
    spec(31, "Amount, Settlement Processing Fee", Fixed(9), AN),
    spec(32, "Acquiring Institution ID Code", LlVar(11), N),
    spec(33, "Forwarding Institution ID Code", LlVar(11), N),
    spec(34, "Primary Account Number, Extended", LlVar(28), ANS),
    spec(35, "Track 2 Data", LlVar(37), Z),
    spec(36, "Track 3 Data", LllVar(104), Z),
    spec(37, "Retrieval Reference Number", Fixed(12), AN),
    spec(38, "Authorization ID Response", Fixed(6), AN),
    spec(39, "Response Code", Fixed(2), AN),
    spec(40, "Service Restriction Code", Fixed(3), AN),
    spec(41, "Card Acceptor Terminal ID", Fixed(8), ANS),
    spec(42, "Card Acceptor ID Code", Fixed(15), ANS),
    spec(43, "Card Acceptor Name/Location", Fixed(40), ANS),
    spec(44, "Additional Response Data", LlVar(25), AN),
    spec(45, "Track 1 Data", LlVar(76), ANS),
    spec(46, "Additional Data - ISO", LllVar(999), ANS),
    spec(47, "Additional Data - National", LllVar(999), ANS),
    spec(48, "Additional Data - Private", LllVar(999), ANS),
    spec(49, "Currency Code, Transaction", Fixed(3), N),
    spec(50, "Currency Code, Settlement", Fixed(3), N),
    spec(51, "Currency Code, Cardholder Billing", Fixed(3), N),
    spec(52, "PIN Data", Fixed(8), B),
    spec(53, "Security-Related Control Information", Fixed(16), N),
    spec(54, "Additional Amounts", LllVar(240), AN),
    spec(55, "ICC Data", LllVar(255), B),
    spec(56, "Reserved ISO", LllVar(999), ANS),
    spec(57, "Reserved National", LllVar(999), ANS),
    spec(58, "Reserved National", LllVar(999), ANS),
    spec(59, "Reserved National", LllVar(999), ANS),
    spec(60, "Reserved National", LllVar(999), ANS),
    spec(61, "Reserved Private", LllVar(999), ANS),
    spec(62, "Reserved Private", LllVar(999), ANS),
    spec(63, "Reserved Private", LllVar(999), ANS),
    spec(64, "Message Authentication Code (MAC)", Fixed(8), B),
    spec(65, "Bitmap, Extended (not carried)", Unsupported, B),
    spec(66, "Settlement Code", Fixed(1), N),
    spec(67, "Extended Payment Code", Fixed(2), N),
    spec(68, "Receiving Institution Country Code", Fixed(3), N),
    spec(69, "Settlement Institution Country Code", Fixed(3), N),
    spec(70, "Network Management Information Code", Fixed(3), N),
    spec(71, "Message Number", Fixed(4), N),
    spec(72, "Message Number, Last", Fixed(4), N),
    spec(73, "Date, Action", Fixed(6), N),
    spec(74, "Credits, Number", Fixed(10), N),
    spec(75, "Credits, Reversal Number", Fixed(10), N),
    spec(76, "Debits, Number", Fixed(10), N),
    spec(77, "Debits, Reversal Number", Fixed(10), N),
    spec(78, "Transfer, Number", Fixed(10), N),
    spec(79, "Transfer, Reversal Number", Fixed(10), N),
    spec(80, "Inquiries, Number", Fixed(10), N),
    spec(81, "Authorizations, Number", Fixed(10), N),
    spec(82, "Credits, Processing Fee Amount", Fixed(12), N),
    spec(83, "Credits, Transaction Fee Amount", Fixed(12), N),
    spec(84, "Debits, Processing Fee Amount", Fixed(12), N),
    spec(85, "Debits, Transaction Fee Amount", Fixed(12), N),
    spec(86, "Credits, Amount", Fixed(16), N),
    spec(87, "Credits, Reversal Amount", Fixed(16), N),
    spec(88, "Debits, Amount", Fixed(16), N),
    spec(89, "Debits, Reversal Amount", Fixed(16), N),
    spec(90, "Original Data Elements", Fixed(42), N),
    spec(91, "File Update Code", Fixed(1), AN),
    spec(92, "File Security Code", Fixed(2), AN),
    spec(93, "Response Indicator", Fixed(5), AN),
    spec(94, "Service Indicator", Fixed(7), AN),
    spec(95, "Replacement Amounts", Fixed(42), AN),
    spec(96, "Message Security Code", Fixed(8), B),
    spec(97, "Amount, Net Settlement", Fixed(17), AN),
    spec(98, "Payee", Fixed(25), ANS),
    spec(99, "Settlement Institution ID Code", LlVar(11), N),
    spec(100, "Receiving Institution ID Code", LlVar(11), N),
    spec(101, "File Name", LlVar(17), ANS),
    spec(102, "Account ID 1", LlVar(28), ANS),
    spec(103, "Account ID 2", LlVar(28), ANS),
    spec(104, "Transaction Description", LllVar(100), ANS),
    spec(105, "Reserved for ISO Use", LllVar(999), ANS),
    spec(106, "Reserved for ISO Use", LllVar(999), ANS),
    spec(107, "Reserved for ISO Use", LllVar(999), ANS),
    spec(108, "Reserved for ISO Use", LllVar(999), ANS),
    spec(109, "Reserved for ISO Use", LllVar(999), ANS),
    spec(110, "Reserved for ISO Use", LllVar(999), ANS),
    spec(111, "Reserved for ISO Use", LllVar(999), ANS),
    spec(112, "Reserved for National Use", LllVar(999), ANS),
    spec(113, "Reserved for National Use", LllVar(999), ANS),
    spec(114, "Reserved for National Use", LllVar(999), ANS),
    spec(115, "Reserved for National Use", LllVar(999), ANS),
    spec(116, "Reserved for National Use", LllVar(999), ANS),
    spec(117, "Reserved for National Use", LllVar(999), ANS),
    spec(118, "Reserved for National Use", LllVar(999), ANS),
    spec(119, "Reserved for National Use", LllVar(999), ANS),
    spec(
        120,
        "Reserved for Private Use (key block)",
        LllVar(999),
        ANS,
    ),
    spec(121, "Reserved for Private Use", LllVar(999), ANS),
    spec(
        122,
        "Reserved for Private Use (key check value)",
        LllVar(999),
        ANS,
    ),
    spec(
        123,
        "Reserved for Private Use (PIN block)",
        LllVar(999),
        ANS,
    ),
    spec(124, "Reserved for Private Use", LllVar(999), ANS),
    spec(125, "Reserved for Private Use", LllVar(999), ANS),
    spec(126, "Reserved for Private Use", LllVar(999), ANS),
    spec(127, "Reserved for Private Use", LllVar(999), ANS),
    spec(128, "Message Authentication Code (MAC)", Fixed(8), B),
];

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    fn field(n: u8) -> &'static FieldSpec {
        &ISO8583_1987[usize::from(n) - 2]
    }

    #[test]
    fn table_covers_fields_2_to_128_in_order() {
        for (i, spec) in ISO8583_1987.iter().enumerate() {
            assert_eq!(usize::from(spec.number), i + 2);
        }
    }

    #[rstest]
    #[case(4, b"50000".as_slice(), "expected 12 numeric characters, got 5")]
    #[case(4, b"0000000500000".as_slice(), "expected 12 numeric characters, got 13")]
    #[case(4, b"00000005000A".as_slice(), "expected numeric characters only, found another character at position 11")]
    #[case(2, b"60110000000000000004".as_slice(), "expected at most 19 numeric characters, got 20")]
    #[case(2, b"6011 000".as_slice(), "expected numeric characters only, found another character at position 4")]
    #[case(35, b"6011000000000004^2812".as_slice(), "expected track 2 characters only, found another character at position 16")]
    #[case(39, b"0".as_slice(), "expected 2 alphanumeric characters, got 1")]
    #[case(39, b"0-".as_slice(), "expected alphanumeric characters only, found another character at position 1")]
    #[case(41, b"ATM\x0001".as_slice(), "expected 8 printable ASCII characters, got 6")]
    #[case(41, b"ATM\x7f0001".as_slice(), "expected printable ASCII characters only, found another character at position 3")]
    #[case(64, [0u8; 7].as_slice(), "expected 8 bytes, got 7")]
    #[case(55, [0u8; 256].as_slice(), "expected at most 255 bytes, got 256")]
    #[case(123, [b'A'; 1000].as_slice(), "expected at most 999 printable ASCII characters, got 1000")]
    #[case(123, "PIN\u{e9}".as_bytes(), "expected printable ASCII characters only, found another character at position 3")]
    #[case(65, [0u8; 8].as_slice(), "this profile does not carry the field")]
    fn invalid_values_name_the_field_and_the_problem(
        #[case] n: u8,
        #[case] value: &[u8],
        #[case] problem: &str,
    ) {
        assert_eq!(
            field(n).validate(value),
            Err(FieldError {
                field: n,
                problem: problem.to_owned()
            })
        );
    }

    #[rstest]
    #[case(2, b"".as_slice())]
    #[case(2, b"6011000000000004".as_slice())]
    #[case(35, b"6011000000000004=2812101".as_slice())]
    #[case(35, b";6011000000000004D2812101?".as_slice())]
    #[case(37, b"RRN 1       ".as_slice())]
    #[case(41, b"ATM-01  ".as_slice())]
    #[case(48, b"TPK".as_slice())]
    #[case(64, [0xffu8; 8].as_slice())]
    #[case(90, b"020000012411220930150000000000000000000000".as_slice())]
    fn valid_values_pass(#[case] n: u8, #[case] value: &[u8]) {
        assert_eq!(field(n).validate(value), Ok(()));
    }

    #[test]
    fn charset_tables_agree_with_the_definitions() {
        use Charset::*;
        for charset in [Numeric, Alpha, AlphaNum, AlphaNumSpecial, Track2, Binary] {
            for b in 0..=255u8 {
                assert_eq!(
                    charset.table()[usize::from(b)],
                    charset.allows(b),
                    "{charset:?} {b}"
                );
                // The vectorised check agrees, alone and in the middle of valid bytes.
                let filler = (0..=255u8).find(|&f| charset.allows(f)).unwrap();
                let mut long = vec![filler; 37];
                long[20] = b;
                assert_eq!(
                    charset.all_allowed(&[b]),
                    charset.allows(b),
                    "{charset:?} {b}"
                );
                assert_eq!(
                    charset.all_allowed(&long),
                    charset.allows(b),
                    "{charset:?} {b}"
                );
            }
        }
        assert!(Track2.allows(b'=') && Track2.allows(b'D') && !Track2.allows(b'^'));
        assert!(AlphaNum.allows(b' ') && !AlphaNum.allows(b'-'));
        assert!(!AlphaNumSpecial.allows(0x7f) && !AlphaNumSpecial.allows(0xe9));
    }

    #[test]
    fn error_message_says_what_failed() {
        let err = field(4).validate(b"5").unwrap_err();
        assert_eq!(
            err.to_string(),
            "failed to validate field 4: expected 12 numeric characters, got 1"
        );
    }
}
