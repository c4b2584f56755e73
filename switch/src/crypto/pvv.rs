//! PIN verification value: Switchyard's own keyed construction (SPEC §4), so the switch stores
//! no PIN and no reversible PIN form.
//!
//! `PVV = leftmost 8 bytes of AES-CMAC(PVK, "switchyard-pvv-v1" || 0x00 || len(PAN) || PAN ||
//! len(PIN) || PIN)`, where PAN and PIN are their ASCII digits and each `len` is one byte. The
//! length prefixes make the encoding unambiguous (PAN `12`, PIN `3456` can never collide with
//! PAN `123`, PIN `456`), and binding the PAN means equal PINs on two cards give unrelated PVVs.
//! The PVK is derived from the LMK and never leaves the HSM; with only 10^4..10^12 PINs a PVV is
//! guessable offline by whoever holds the PVK, which is why it is a keyed MAC and not a hash.
//! Rotating the LMK therefore requires re-deriving PVVs (PIN reset); there is no other way.

use std::fmt;

use subtle::ConstantTimeEq;

use super::cmac::{CmacKey, leftmost8};
use super::pinblock::ClearPin;

const DOMAIN: &[u8] = b"switchyard-pvv-v1\x00";

/// Why a PVV could not be made or read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PvvError {
    /// The PAN is not 1 to 19 decimal digits.
    #[error("failed to compute PVV: PAN must be 1 to 19 decimal digits")]
    InvalidPan,
    /// A stored PVV is not 16 hex characters.
    #[error("failed to parse PVV: expected 16 hex characters")]
    InvalidHex,
}

/// A PIN verification value (8 bytes). Equality is constant time; `Debug` is redacted because a
/// PVV plus the PVK would let a PIN be recovered by trial.
#[derive(Clone, Copy, Eq)]
pub struct Pvv([u8; 8]);

impl Pvv {
    /// Computes the PVV of `pin` for `pan` under the PVK.
    pub(crate) fn compute(pvk: &CmacKey, pan: &str, pin: &ClearPin) -> Result<Self, PvvError> {
        let pan = pan.as_bytes();
        if !(1..=19).contains(&pan.len()) || !pan.iter().all(u8::is_ascii_digit) {
            return Err(PvvError::InvalidPan);
        }
        let mut pin_ascii = zeroize::Zeroizing::new([0u8; 12]);
        let digits = pin.digits();
        for (a, d) in pin_ascii.iter_mut().zip(digits) {
            *a = b'0' + d;
        }
        // Both lengths are ≤ 19, so the casts cannot truncate.
        let mac = pvk.compute(&[
            DOMAIN,
            &[pan.len() as u8],
            pan,
            &[digits.len() as u8],
            &pin_ascii[..digits.len()],
        ]);
        Ok(Pvv(leftmost8(&mac)))
    }

    /// 16 upper-case hex characters, for the store.
    pub fn to_hex(&self) -> String {
        hex::encode_upper(self.0)
    }

    /// Reads a PVV from the store (either case).
    pub fn from_hex(text: &str) -> Result<Self, PvvError> {
        let mut out = [0u8; 8];
        if text.len() != 16 {
            return Err(PvvError::InvalidHex);
        }
        hex::decode_to_slice(text, &mut out).map_err(|_| PvvError::InvalidHex)?;
        Ok(Pvv(out))
    }
}

impl PartialEq for Pvv {
    fn eq(&self, other: &Self) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl fmt::Debug for Pvv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Pvv(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::keys::ClearKey;

    fn pvk() -> CmacKey {
        CmacKey::new(
            &ClearKey::from_hex("000102030405060708090A0B0C0D0E0F101112131415161718191A1B1C1D1E1F")
                .unwrap(),
        )
    }

    fn pvv(pan: &str, pin: &str) -> Pvv {
        Pvv::compute(&pvk(), pan, &ClearPin::new(pin).unwrap()).unwrap()
    }

    #[test]
    fn pvv_is_the_documented_construction() {
        // Recomputed independently from the module doc with Python's `cryptography` package:
        // CMAC(key, b"switchyard-pvv-v1\0" + bytes([16]) + b"6011000000000004" + bytes([4]) + b"1234")[:8]
        assert_eq!(pvv("6011000000000004", "1234").to_hex(), EXPECTED_6011_1234);
    }

    const EXPECTED_6011_1234: &str = "44739C0D48A1E384";

    #[test]
    fn pvv_depends_on_pin_pan_and_key() {
        let base = pvv("6011000000000004", "1234");
        assert_eq!(base, pvv("6011000000000004", "1234"));
        assert_ne!(base, pvv("6011000000000004", "1235"));
        assert_ne!(base, pvv("6011000000000012", "1234"));
        // Unambiguous encoding: moving a digit across the PAN/PIN boundary changes the PVV.
        assert_ne!(
            pvv("60110000000000041", "2345"),
            pvv("6011000000000004", "12345")
        );
        let other = CmacKey::new(&ClearKey::from_hex("00000000000000000000000000000000").unwrap());
        assert_ne!(
            Pvv::compute(&other, "6011000000000004", &ClearPin::new("1234").unwrap()).unwrap(),
            base
        );
    }

    #[test]
    fn hex_round_trip_and_redaction() {
        let p = pvv("6011000000000004", "1234");
        assert_eq!(Pvv::from_hex(&p.to_hex().to_lowercase()).unwrap(), p);
        assert_eq!(Pvv::from_hex("00").unwrap_err(), PvvError::InvalidHex);
        assert_eq!(
            Pvv::from_hex("ZZ00000000000000").unwrap_err(),
            PvvError::InvalidHex
        );
        assert_eq!(format!("{p:?}"), "Pvv(<redacted>)");
    }

    #[test]
    fn refuses_bad_pan() {
        let pin = ClearPin::new("1234").unwrap();
        assert_eq!(
            Pvv::compute(&pvk(), "", &pin).unwrap_err(),
            PvvError::InvalidPan
        );
        assert_eq!(
            Pvv::compute(&pvk(), "6011-0000", &pin).unwrap_err(),
            PvvError::InvalidPan
        );
    }
}
