//! The terminal side of the key hierarchy, for the ATM simulator: a terminal holds its keys in
//! clear (a real ATM keeps them in its encrypting PIN pad).
//!
//! Pure: no I/O. The simulator owns one `TerminalKeys` per simulated ATM. An acquirer switch's
//! upstream link (SPEC §6) does not use this: its link keys must stay inside its own HSM so PINs
//! can be translated there, so it uses `Hsm::import_clear_key` for the shared TMK and
//! `Hsm::import_under_tmk` for the delivered TPK/TAK.

use rand::CryptoRng;
use subtle::ConstantTimeEq;

use super::cmac::{CmacKey, derive_nm_key, leftmost8};
use super::hsm::delivery_header;
use super::kcv::KeyCheckValue;
use super::keys::{AesKeySize, ClearKey, Kek, KeyType};
use super::pinblock::{self, ClearPin, PinBlockError};
use super::tr31::{self, Exportability, KeyBlockHeader, KeyUsage, ModeOfUse, Tr31Error};

/// Why a terminal-side key operation failed. Never carries key material or PIN digits.
#[derive(Debug, thiserror::Error)]
pub enum TerminalError {
    /// The key the operation needs has not been delivered yet.
    #[error("failed to use {0}: none loaded yet (run key exchange, network management 161)")]
    NoKey(KeyType),
    /// A key block from the switch does not open under the TMK.
    #[error("failed to unwrap {kt} key block under the TMK")]
    KeyBlock {
        /// The key type being delivered.
        kt: KeyType,
        /// What was wrong with the block.
        #[source]
        source: Tr31Error,
    },
    /// The delivered key block is not for the key type announced in field 48.
    #[error("failed to accept {expected} key block: its usage is {found}")]
    WrongUsage {
        /// Type announced.
        expected: KeyType,
        /// Usage in the block header.
        found: KeyUsage,
    },
    /// The delivered key does not have the KCV sent in field 122.
    #[error(
        "failed to accept {kt}: key check value mismatch (stated {stated}, computed {computed})"
    )]
    KcvMismatch {
        /// The key type delivered.
        kt: KeyType,
        /// KCV from field 122.
        stated: KeyCheckValue,
        /// KCV of the key in the block.
        computed: KeyCheckValue,
    },
    /// A TMK is never delivered in field 120.
    #[error("failed to accept key block: a TMK is never delivered under the TMK")]
    TmkDelivery,
    /// The PIN block could not be built.
    #[error("failed to build PIN block")]
    PinBlock(#[source] PinBlockError),
    /// The TMK could not be wrapped under the KEK.
    #[error("failed to wrap TMK under the KEK")]
    Wrap(#[source] Tr31Error),
}

/// A terminal's clear keys: its TMK and, once delivered, its TPK and TAK. Cloned when the
/// processes of one acquirer station share its keys (every copy is wiped on drop).
#[derive(Clone)]
pub struct TerminalKeys {
    tmk: ClearKey,
    tpk: Option<ClearKey>,
    tak: Option<CmacKey>,
    /// The TAK the last key change replaced: an answer to a request the switch took before the
    /// change was confirmed may still come under it.
    previous_tak: Option<CmacKey>,
    tpk_kcv: Option<KeyCheckValue>,
    tak_kcv: Option<KeyCheckValue>,
}

impl TerminalKeys {
    /// A terminal with `tmk` loaded and no working keys yet.
    pub fn new(tmk: ClearKey) -> Self {
        TerminalKeys {
            tmk,
            tpk: None,
            tak: None,
            previous_tak: None,
            tpk_kcv: None,
            tak_kcv: None,
        }
    }

    /// A terminal with a fresh random AES-128 TMK (the simulator provisions new ATMs this way).
    pub fn generate<R: CryptoRng + ?Sized>(rng: &mut R) -> Self {
        Self::new(ClearKey::generate(AesKeySize::Aes128, rng))
    }

    /// The TMK as a TR-31 D block under the switch's KEK plus its KCV: the `tmk` object of
    /// `POST /v1/terminals` (SPEC §5). Header `K0` `A` mode `B`, exportability `N`.
    pub fn wrap_tmk_under_kek(&self, kek: &Kek) -> Result<(String, KeyCheckValue), TerminalError> {
        let header = KeyBlockHeader::new(
            KeyUsage::KEY_ENCRYPTION,
            ModeOfUse::Both,
            Exportability::NonExportable,
        );
        let block = tr31::wrap(kek.key(), &header, &self.tmk).map_err(TerminalError::Wrap)?;
        Ok((block, KeyCheckValue::of(&self.tmk)))
    }

    /// Opens a key block from field 120 under the TMK, checks its usage against `kt` (field 48)
    /// and its KCV against `kcv` (field 122), and installs it. Returns the KCV the terminal
    /// computed, which it sends back in field 122. On any error the old key stays in place.
    pub fn accept_key_block(
        &mut self,
        kt: KeyType,
        block: &str,
        kcv: &KeyCheckValue,
    ) -> Result<KeyCheckValue, TerminalError> {
        let expected = delivery_header(kt).ok_or(TerminalError::TmkDelivery)?;
        let (header, key) = tr31::unwrap(&self.tmk, block)
            .map_err(|source| TerminalError::KeyBlock { kt, source })?;
        if header.key_usage != expected.key_usage {
            return Err(TerminalError::WrongUsage {
                expected: kt,
                found: header.key_usage,
            });
        }
        let computed = KeyCheckValue::of(&key);
        if computed != *kcv {
            return Err(TerminalError::KcvMismatch {
                kt,
                stated: *kcv,
                computed,
            });
        }
        match kt {
            KeyType::Tpk => {
                self.tpk = Some(key);
                self.tpk_kcv = Some(computed);
            }
            KeyType::Tak => {
                // the same key delivered again (a repeated 161) is no change
                if self.tak_kcv != Some(computed) {
                    self.previous_tak = self.tak.replace(CmacKey::new(&key));
                }
                self.tak_kcv = Some(computed);
            }
            KeyType::Tmk => return Err(TerminalError::TmkDelivery),
        }
        Ok(computed)
    }

    /// The KCV of the loaded key of type `kt`, if any.
    pub fn kcv(&self, kt: KeyType) -> Option<KeyCheckValue> {
        match kt {
            KeyType::Tmk => Some(KeyCheckValue::of(&self.tmk)),
            KeyType::Tpk => self.tpk_kcv,
            KeyType::Tak => self.tak_kcv,
        }
    }

    /// Enciphers `pin` for `pan` as a format 4 block under the TPK (field 123).
    pub fn encipher_pin(&self, pan: &str, pin: &ClearPin) -> Result<[u8; 16], TerminalError> {
        let tpk = self
            .tpk
            .as_ref()
            .ok_or(TerminalError::NoKey(KeyType::Tpk))?;
        pinblock::encipher_format4(tpk, pan, pin, &mut rand::rng()).map_err(TerminalError::PinBlock)
    }

    /// The 8-byte MAC of `data` under the TAK (field 64/128).
    pub fn mac(&self, data: &[u8]) -> Result<[u8; 8], TerminalError> {
        let tak = self
            .tak
            .as_ref()
            .ok_or(TerminalError::NoKey(KeyType::Tak))?;
        Ok(leftmost8(&tak.compute(&[data])))
    }

    /// The 8-byte MAC of a network-management message (0800/0810, profile v2) under K_NM,
    /// derived from the TMK for `field41` (this terminal's field 41 as sent, space-padded).
    pub fn nm_mac(&self, field41: &str, data: &[u8]) -> [u8; 8] {
        leftmost8(&derive_nm_key(&self.tmk, field41).compute(&[data]))
    }

    /// Checks a network-management MAC from the switch in constant time.
    pub fn verify_nm_mac(&self, field41: &str, data: &[u8], mac: &[u8]) -> bool {
        self.nm_mac(field41, data).as_slice().ct_eq(mac).into()
    }

    /// Checks a response MAC in constant time.
    pub fn verify_mac(&self, data: &[u8], mac: &[u8]) -> Result<bool, TerminalError> {
        Ok(self.mac(data)?.as_slice().ct_eq(mac).into())
    }

    /// Checks the MAC of an answer: under the TAK (the switch answers under its ACTIVE TAK,
    /// which this terminal confirmed before it became ACTIVE), or under the one the last key
    /// change replaced (an answer to a request the switch took just before the change).
    pub fn verify_answer_mac(&self, data: &[u8], mac: &[u8]) -> Result<bool, TerminalError> {
        if self.verify_mac(data, mac)? {
            return Ok(true);
        }
        Ok(self
            .previous_tak
            .as_ref()
            .is_some_and(|tak| bool::from(leftmost8(&tak.compute(&[data])).as_slice().ct_eq(mac))))
    }
}

impl std::fmt::Debug for TerminalKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TerminalKeys")
            .field("tmk_kcv", &KeyCheckValue::of(&self.tmk))
            .field("tpk_kcv", &self.tpk_kcv)
            .field("tak_kcv", &self.tak_kcv)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::hsm::{Hsm, PinCheck, SoftHsm};
    use crate::crypto::keys::Lmk;
    use crate::domain::KeyOwner;

    const KEK: &str = "89E88CF7931444F334BD7547FC3F380C";
    const PAN: &str = "6011000000000004";

    /// Provisioning, key exchange, a PIN and a MAC, end to end between terminal and switch HSM.
    #[test]
    fn terminal_and_switch_agree_end_to_end() {
        let hsm = SoftHsm::new(
            Lmk::generate(&mut rand::rng()),
            Some(Kek::from_hex(KEK).unwrap()),
        );
        let owner = KeyOwner::Terminal(crate::domain::TerminalId::new("ATM00001").unwrap());
        let mut atm = TerminalKeys::generate(&mut rand::rng());
        assert!(matches!(
            atm.mac(b"x"),
            Err(TerminalError::NoKey(KeyType::Tak))
        ));

        let (block, kcv) = atm
            .wrap_tmk_under_kek(&Kek::from_hex(KEK).unwrap())
            .unwrap();
        assert!(block.starts_with("D0144K0AB00N0000"), "{block}");
        let (tmk, _) = hsm
            .import_under_kek(KeyType::Tmk, &owner, &block, &kcv)
            .unwrap();

        let mut wrapped = Vec::new();
        for kt in [KeyType::Tpk, KeyType::Tak] {
            let (key, kcv) = hsm.generate_key(kt, &owner).unwrap();
            let field120 = hsm.export_under_tmk(&tmk, &key, kt).unwrap();
            assert_eq!(atm.accept_key_block(kt, &field120, &kcv).unwrap(), kcv);
            assert_eq!(atm.kcv(kt), Some(kcv));
            wrapped.push(key);
        }
        let (tpk, tak) = (&wrapped[0], &wrapped[1]);

        let pvv = hsm.make_pvv(PAN, &ClearPin::new("1234").unwrap()).unwrap();
        let good = atm
            .encipher_pin(PAN, &ClearPin::new("1234").unwrap())
            .unwrap();
        let bad = atm
            .encipher_pin(PAN, &ClearPin::new("1243").unwrap())
            .unwrap();
        assert_eq!(
            hsm.verify_pin(tpk, PAN, &good, &pvv).unwrap(),
            PinCheck::Match
        );
        assert_eq!(
            hsm.verify_pin(tpk, PAN, &bad, &pvv).unwrap(),
            PinCheck::Mismatch
        );

        let request = b"0200...request up to the MAC";
        let mac = atm.mac(request).unwrap();
        assert!(hsm.verify_mac(tak, request, &mac).unwrap());
        let response = b"0210...response up to the MAC";
        let response_mac = hsm.generate_mac(tak, response).unwrap();
        assert!(atm.verify_mac(response, &response_mac).unwrap());
        assert!(!atm.verify_mac(request, &response_mac).unwrap());
    }

    #[test]
    fn bad_deliveries_leave_the_old_key_in_place() {
        let hsm = SoftHsm::new(
            Lmk::generate(&mut rand::rng()),
            Some(Kek::from_hex(KEK).unwrap()),
        );
        let owner = KeyOwner::Terminal(crate::domain::TerminalId::new("ATM00001").unwrap());
        let mut atm = TerminalKeys::generate(&mut rand::rng());
        let (block, kcv) = atm
            .wrap_tmk_under_kek(&Kek::from_hex(KEK).unwrap())
            .unwrap();
        let (tmk, _) = hsm
            .import_under_kek(KeyType::Tmk, &owner, &block, &kcv)
            .unwrap();
        let (tak, tak_kcv) = hsm.generate_key(KeyType::Tak, &owner).unwrap();
        let field120 = hsm.export_under_tmk(&tmk, &tak, KeyType::Tak).unwrap();
        atm.accept_key_block(KeyType::Tak, &field120, &tak_kcv)
            .unwrap();
        let mac_before = atm.mac(b"msg").unwrap();

        let (tak2, tak2_kcv) = hsm.generate_key(KeyType::Tak, &owner).unwrap();
        let field120 = hsm.export_under_tmk(&tmk, &tak2, KeyType::Tak).unwrap();
        let wrong: KeyCheckValue = "ABCDEF".parse().unwrap();
        assert!(matches!(
            atm.accept_key_block(KeyType::Tak, &field120, &wrong),
            Err(TerminalError::KcvMismatch { .. })
        ));
        assert!(matches!(
            atm.accept_key_block(KeyType::Tpk, &field120, &tak2_kcv),
            Err(TerminalError::WrongUsage { .. })
        ));
        let mut tampered = field120.clone().into_bytes();
        tampered[40] = if tampered[40] == b'0' { b'1' } else { b'0' };
        assert!(matches!(
            atm.accept_key_block(
                KeyType::Tak,
                &String::from_utf8(tampered).unwrap(),
                &tak2_kcv
            ),
            Err(TerminalError::KeyBlock {
                source: Tr31Error::Mac,
                ..
            })
        ));
        assert!(matches!(
            atm.accept_key_block(KeyType::Tmk, &field120, &tak2_kcv),
            Err(TerminalError::TmkDelivery)
        ));
        assert_eq!(atm.mac(b"msg").unwrap(), mac_before);
        assert_eq!(atm.kcv(KeyType::Tak), Some(tak_kcv));
    }
}
