//! AES key check value (ANSI X9.24-1:2017): leftmost 3 bytes of AES-CMAC of 16 zero bytes under
//! the key, shown as 6 upper-case hex characters (SPEC §3, field 122).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use super::cmac::aes_cmac;
use super::keys::ClearKey;

/// A key check value. Comparison is constant time: a KCV is compared against an attacker-supplied
/// one when keys are imported and confirmed.
#[derive(Clone, Copy, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct KeyCheckValue([u8; 3]);

/// A text that is not a KCV.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("failed to parse key check value: expected 6 hex characters, got {got:?}")]
pub struct KcvParseError {
    /// What was received (a KCV is not secret, so it may be echoed; truncated to stay short).
    pub got: String,
}

impl KeyCheckValue {
    /// The KCV of `key`.
    pub fn of(key: &ClearKey) -> Self {
        let mac = aes_cmac(key, &[0u8; 16]);
        KeyCheckValue([mac[0], mac[1], mac[2]])
    }

    /// The three KCV bytes.
    pub fn as_bytes(&self) -> [u8; 3] {
        self.0
    }
}

impl PartialEq for KeyCheckValue {
    fn eq(&self, other: &Self) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl std::hash::Hash for KeyCheckValue {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.hash(state);
    }
}

impl fmt::Display for KeyCheckValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02X}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for KeyCheckValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyCheckValue({self})")
    }
}

impl FromStr for KeyCheckValue {
    type Err = KcvParseError;

    /// Accepts either case (terminals differ); always displays upper case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || KcvParseError {
            got: s.chars().take(16).collect(),
        };
        if s.len() != 6 {
            return Err(err());
        }
        let mut out = [0u8; 3];
        hex::decode_to_slice(s, &mut out).map_err(|_| err())?;
        Ok(KeyCheckValue(out))
    }
}

impl TryFrom<String> for KeyCheckValue {
    type Error = KcvParseError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        value.parse()
    }
}

impl From<KeyCheckValue> for String {
    fn from(value: KeyCheckValue) -> Self {
        value.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kcv_is_leftmost_three_bytes_of_cmac_of_zero_block() {
        // TR-31:2018 A.7.4 states KCV 08793E for the key it wraps.
        let key = ClearKey::from_hex("3F419E1CB7079442AA37474C2EFBF8B8").unwrap();
        assert_eq!(KeyCheckValue::of(&key).to_string(), "08793E");
    }

    #[test]
    fn parses_either_case_and_displays_upper_case() {
        let kcv: KeyCheckValue = "08793e".parse().unwrap();
        assert_eq!(kcv.to_string(), "08793E");
        assert_eq!(kcv, "08793E".parse().unwrap());
        assert_ne!(kcv, "08793F".parse().unwrap());
        assert_eq!(format!("{kcv:?}"), "KeyCheckValue(08793E)");
    }

    #[test]
    fn refuses_malformed_kcvs() {
        for bad in ["", "08793", "08793E0", "08793G", "0879 3E", "é8793"] {
            let err = bad.parse::<KeyCheckValue>().unwrap_err();
            assert!(
                err.to_string()
                    .starts_with("failed to parse key check value")
            );
        }
    }

    #[test]
    fn serializes_as_json_string() {
        let kcv: KeyCheckValue = "1a2b3c".parse().unwrap();
        assert_eq!(serde_json::to_string(&kcv).unwrap(), "\"1A2B3C\"");
        let back: KeyCheckValue = serde_json::from_str("\"1A2B3C\"").unwrap();
        assert_eq!(back, kcv);
        assert!(serde_json::from_str::<KeyCheckValue>("\"XYZ\"").is_err());
    }
}
