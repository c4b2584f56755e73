//! Payment vocabulary shared by every layer: identifiers, key types and states, response codes.
//!
//! These are newtypes over bare strings so that a terminal id can never be passed where a PAN
//! token or an account id is expected, and so that validation happens once, at the edge.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Why a value could not become one of the domain types.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what}: {problem}")]
pub struct InvalidValue {
    /// Which kind of value was refused, e.g. "terminal id".
    pub what: &'static str,
    /// What is wrong with it, phrased for the person who sent it.
    pub problem: String,
}

impl InvalidValue {
    fn new(what: &'static str, problem: impl Into<String>) -> Self {
        Self {
            what,
            problem: problem.into(),
        }
    }
}

/// Card acceptor terminal identification (ISO 8583 field 41): 1–8 characters `[A-Za-z0-9-_]`.
///
/// On the wire field 41 is fixed at 8 characters, right-padded with spaces; [`TerminalId::to_field41`]
/// pads and [`TerminalId::from_field41`] trims. Acquirer stations use the same registry.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TerminalId(String);

impl TerminalId {
    /// Validates and wraps a terminal id.
    pub fn new(id: impl Into<String>) -> Result<Self, InvalidValue> {
        let id = id.into();
        if id.is_empty() || id.len() > 8 {
            return Err(InvalidValue::new(
                "terminal id",
                format!("must be 1 to 8 characters, got {}", id.len()),
            ));
        }
        if !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(InvalidValue::new(
                "terminal id",
                "only letters, digits, '-' and '_' are allowed",
            ));
        }
        Ok(Self(id))
    }

    /// Reads field 41 (space-padded) into a terminal id.
    pub fn from_field41(raw: &str) -> Result<Self, InvalidValue> {
        Self::new(raw.trim_end_matches(' '))
    }

    /// Field 41 representation: exactly 8 characters, right-padded with spaces.
    pub fn to_field41(&self) -> String {
        format!("{:<8}", self.0)
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TerminalId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TerminalId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TerminalId({})", self.0)
    }
}

impl TryFrom<String> for TerminalId {
    type Error = InvalidValue;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl From<TerminalId> for String {
    fn from(value: TerminalId) -> Self {
        value.0
    }
}

impl FromStr for TerminalId {
    type Err = InvalidValue;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// The kind of a terminal key (SPEC §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum KeyType {
    /// Terminal master key: key-encryption key under which TPK and TAK are delivered.
    Tmk,
    /// Terminal PIN key: enciphers PIN blocks.
    Tpk,
    /// Terminal authentication key: AES-CMAC message authentication.
    Tak,
}

impl KeyType {
    /// Upper-case name as used on the wire (field 48) and in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyType::Tmk => "TMK",
            KeyType::Tpk => "TPK",
            KeyType::Tak => "TAK",
        }
    }
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for KeyType {
    type Err = InvalidValue;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_uppercase().as_str() {
            "TMK" => Ok(KeyType::Tmk),
            "TPK" => Ok(KeyType::Tpk),
            "TAK" => Ok(KeyType::Tak),
            other => Err(InvalidValue::new(
                "key type",
                format!("expected TMK, TPK or TAK, got {other:?}"),
            )),
        }
    }
}

/// Lifecycle state of a key (SPEC §4): `PENDING → ACTIVE → EXPIRED`, or `REVOKED` when compromised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum KeyState {
    /// Generated and delivered, waiting for the terminal's confirmation (or the activation time).
    Pending,
    /// The one key of its type in use for the terminal.
    Active,
    /// Replaced; still verifies until its `graceUntil`, never generates or enciphers.
    Expired,
    /// Declared compromised: never used again, no grace.
    Revoked,
}

impl KeyState {
    /// Upper-case name as stored and shown in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Pending => "PENDING",
            KeyState::Active => "ACTIVE",
            KeyState::Expired => "EXPIRED",
            KeyState::Revoked => "REVOKED",
        }
    }

    /// All states, in lifecycle order (for metrics that must export zeros too).
    pub const ALL: [KeyState; 4] = [
        KeyState::Pending,
        KeyState::Active,
        KeyState::Expired,
        KeyState::Revoked,
    ];
}

impl fmt::Display for KeyState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for KeyState {
    type Err = InvalidValue;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "PENDING" => Ok(KeyState::Pending),
            "ACTIVE" => Ok(KeyState::Active),
            "EXPIRED" => Ok(KeyState::Expired),
            "REVOKED" => Ok(KeyState::Revoked),
            other => Err(InvalidValue::new(
                "key state",
                format!("unknown state {other:?}"),
            )),
        }
    }
}

/// `6011000000000004` → `601100******0004` (first six and last four, the most of a PAN that may
/// be displayed); anything not a plausible PAN is hidden whole.
pub fn mask_pan(pan: &str) -> String {
    if (12..=19).contains(&pan.len()) && pan.bytes().all(|b| b.is_ascii_digit()) {
        format!(
            "{}{}{}",
            &pan[..6],
            "*".repeat(pan.len() - 10),
            &pan[pan.len() - 4..]
        )
    } else {
        "<redacted>".to_string()
    }
}

/// Whom a stored key belongs to: the terminal (ATM or acquirer station) whose key row holds it,
/// or, on the acquirer side, the upstream whose link keys it is. The HSM binds every key it
/// stores to its owner (a TR-31 optional block inside the LMK-wrapped block, covered by the
/// block's MAC) and refuses to open it for anyone else (SPEC §4).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum KeyOwner {
    /// A registered terminal or station (the `keys` table).
    Terminal(TerminalId),
    /// An upstream issuer's link (the `link_keys` table, and the TMK from its settings).
    Upstream(String),
}

impl fmt::Display for KeyOwner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyOwner::Terminal(t) => write!(f, "terminal {t}"),
            KeyOwner::Upstream(u) => write!(f, "upstream {u}"),
        }
    }
}

/// A key wrapped under the LMK, as stored at rest, and the owner the row it was read from names
/// (`None` when it was not read from a row). Opaque outside the HSM; safe to log its length
/// only. `Debug` never shows the bytes (they are ciphertext, but there is no reason to spill them).
#[derive(Clone, PartialEq, Eq)]
pub struct WrappedKey(pub String, Option<KeyOwner>);

impl WrappedKey {
    /// A block with no owner stated (configuration, tests). The HSM refuses to open a block
    /// bound to an owner through such a value: it cannot check the binding.
    pub fn new(block: impl Into<String>) -> Self {
        WrappedKey(block.into(), None)
    }

    /// A block read from the row of `owner` (what the store returns), or made by the HSM for it.
    pub fn owned_by(block: impl Into<String>, owner: KeyOwner) -> Self {
        WrappedKey(block.into(), Some(owner))
    }

    /// Whom the row this block came from says it belongs to.
    pub fn owner(&self) -> Option<&KeyOwner> {
        self.1.as_ref()
    }
}

impl fmt::Debug for WrappedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WrappedKey(<{} chars>", self.0.len())?;
        match &self.1 {
            Some(owner) => write!(f, ", {owner})"),
            None => f.write_str(")"),
        }
    }
}

/// ISO 8583 response codes used by the Switchyard profile (SPEC §3, field 39).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResponseCode {
    /// `00` approved.
    Approved,
    /// `05` do not honour.
    DoNotHonour,
    /// `12` invalid transaction.
    InvalidTransaction,
    /// `13` invalid amount.
    InvalidAmount,
    /// `14` invalid card number.
    InvalidCard,
    /// `21` no action taken (e.g. reversal of an unknown original).
    NoActionTaken,
    /// `30` format error.
    FormatError,
    /// `51` insufficient funds.
    InsufficientFunds,
    /// `54` expired card.
    ExpiredCard,
    /// `55` incorrect PIN.
    IncorrectPin,
    /// `58` transaction not permitted to terminal.
    NotPermittedToTerminal,
    /// `61` exceeds withdrawal amount limit.
    ExceedsWithdrawalLimit,
    /// `62` restricted card.
    RestrictedCard,
    /// `63` security violation (bad MAC).
    SecurityViolation,
    /// `75` allowable number of PIN tries exceeded.
    PinTriesExceeded,
    /// `91` issuer or switch inoperative.
    IssuerUnavailable,
    /// `94` duplicate transmission.
    Duplicate,
    /// `96` system malfunction.
    SystemMalfunction,
}

impl ResponseCode {
    /// The two-character code for field 39.
    pub fn as_str(self) -> &'static str {
        use ResponseCode::*;
        match self {
            Approved => "00",
            DoNotHonour => "05",
            InvalidTransaction => "12",
            InvalidAmount => "13",
            InvalidCard => "14",
            NoActionTaken => "21",
            FormatError => "30",
            InsufficientFunds => "51",
            ExpiredCard => "54",
            IncorrectPin => "55",
            NotPermittedToTerminal => "58",
            ExceedsWithdrawalLimit => "61",
            RestrictedCard => "62",
            SecurityViolation => "63",
            PinTriesExceeded => "75",
            IssuerUnavailable => "91",
            Duplicate => "94",
            SystemMalfunction => "96",
        }
    }

    /// Parses a field 39 value we know; `None` for codes outside the profile.
    pub fn parse(code: &str) -> Option<Self> {
        use ResponseCode::*;
        Some(match code {
            "00" => Approved,
            "05" => DoNotHonour,
            "12" => InvalidTransaction,
            "13" => InvalidAmount,
            "14" => InvalidCard,
            "21" => NoActionTaken,
            "30" => FormatError,
            "51" => InsufficientFunds,
            "54" => ExpiredCard,
            "55" => IncorrectPin,
            "58" => NotPermittedToTerminal,
            "61" => ExceedsWithdrawalLimit,
            "62" => RestrictedCard,
            "63" => SecurityViolation,
            "75" => PinTriesExceeded,
            "91" => IssuerUnavailable,
            "94" => Duplicate,
            "96" => SystemMalfunction,
            _ => return None,
        })
    }
}

impl fmt::Display for ResponseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_id_pads_and_trims_field41() {
        let id = TerminalId::new("ATM1").unwrap();
        assert_eq!(id.to_field41(), "ATM1    ");
        assert_eq!(TerminalId::from_field41("ATM1    ").unwrap(), id);
    }

    #[test]
    fn terminal_id_refuses_bad_input() {
        assert!(TerminalId::new("").is_err());
        assert!(TerminalId::new("ATM000001").is_err());
        assert!(TerminalId::new("ATM 1").is_err());
        assert!(TerminalId::new("ATM;1").is_err());
    }

    #[test]
    fn key_type_and_state_round_trip() {
        for kt in [KeyType::Tmk, KeyType::Tpk, KeyType::Tak] {
            assert_eq!(kt.as_str().parse::<KeyType>().unwrap(), kt);
        }
        for st in KeyState::ALL {
            assert_eq!(st.as_str().parse::<KeyState>().unwrap(), st);
        }
        assert!("XYZ".parse::<KeyType>().is_err());
    }

    #[test]
    fn response_codes_round_trip() {
        for code in [
            "00", "05", "12", "13", "14", "21", "30", "51", "54", "55", "58", "61", "62", "63",
            "75", "91", "94", "96",
        ] {
            assert_eq!(ResponseCode::parse(code).unwrap().as_str(), code);
        }
        assert_eq!(ResponseCode::parse("99"), None);
    }
}
