//! The HSM boundary (SPEC §4): the `Hsm` trait every caller uses and `SoftHsm`, the software
//! implementation. Clear keys and PINs exist only inside; callers see wrapped keys, KCVs, MACs,
//! PIN blocks and PVVs.
//!
//! Keys at rest ([`WrappedKey`]) are TR-31 version D blocks under a key-block protection key
//! derived from the LMK. Their header records the key type (TMK `K0`, TPK `P0`, TAK `M6`), and
//! every operation checks it, so a stored TPK can never be used to compute a MAC, nor a TAK to
//! wrap keys (key separation, as a hardware HSM enforces it).
//!
//! Delivery to terminals (`export_under_tmk`, SPEC §3 field 120) uses X9.143 headers:
//! TPK → `P0` `A` mode `E` (the terminal only enciphers PINs), TAK → `M6` `A` mode `C` (the
//! terminal generates request MACs and verifies response MACs); both key version `00` and
//! exportability `N` (a terminal must not pass keys on).
//!
//! Every stored key is bound to its owner (SPEC §4): the LMK block carries a proprietary
//! optional block `0B` (X9.143 reserves ids starting with a digit for proprietary use) naming
//! the terminal (`T` + id) or upstream (`U` + hex of the name) it was made for. The header is
//! covered by the block's MAC, so the binding cannot be edited without the LMK. Whenever a
//! stored key is opened, the owner named by the row it was read from ([`WrappedKey::owner`])
//! must be the bound one; a key row moved (UPDATEd) to another terminal is refused
//! ([`HsmError::WrongOwner`], logged without key material), and its terminal's MACs and PINs
//! fail as if it had no key. Blocks written before the binding existed carry no `0B`: they are
//! accepted for the owner their row names (a bank upgrades without re-keying its fleet) and
//! [`Hsm::rebind`] re-wraps them bound to that owner, which the switch does for every stored
//! key at start (`txn::keys::bind_stored_keys`).
//!
//! No cache of unwrapped keys: the LMK's TR-31 KBEK/KBAK are derived once in `SoftHsm::new`, so
//! opening a stored key per call costs about 2.6 µs (criterion, `benches/crypto.rs`, shared
//! 2-core machine), a MAC on 200 bytes 3.5 µs in all and a PIN verification 4.1 µs. That is
//! noise next to one database round trip, while a cache would keep every active terminal's keys
//! in clear in memory and put a lock on the hot path.

use std::fmt;

use subtle::ConstantTimeEq;
use tracing::warn;
use zeroize::Zeroizing;

use super::block::AesCipher;
use super::cmac::{CmacKey, derive_nm_key, leftmost8};
use super::kcv::KeyCheckValue;
use super::keys::{AesKeySize, ClearKey, Kek, KeyType, Lmk, WrappedKey};
use super::pinblock::{self, ClearPin, PinBlockError};
use super::pvv::{Pvv, PvvError};
use super::tr31::{
    Exportability, KeyBlockHeader, KeyUsage, ModeOfUse, OptionalBlock, Tr31Error, Tr31Kbpk,
};
use crate::domain::KeyOwner;

/// Why an HSM operation failed. Never carries key material or PIN digits.
#[derive(Debug, thiserror::Error)]
pub enum HsmError {
    /// A stored key does not open under the LMK: wrong LMK loaded, or the record was altered.
    #[error("failed to unwrap stored key under the LMK (wrong LMK or altered key record)")]
    StoredKey(#[source] Tr31Error),
    /// A key block received for import does not open or is malformed.
    #[error(
        "failed to unwrap imported key block (was it wrapped under this switch's KEK, or the TMK?)"
    )]
    ImportBlock(#[source] Tr31Error),
    /// A key could not be wrapped (LMK storage or delivery block).
    #[error("failed to wrap key in a TR-31 block")]
    Wrap(#[source] Tr31Error),
    /// A stored key is bound to another owner than the row it was read from names: the row was
    /// moved to another terminal (or upstream), or the caller did not say whose key it is.
    #[error("failed to use stored key: it is bound to {bound}, not to {claimed}")]
    WrongOwner {
        /// The owner bound into the block (ids and names are not secret).
        bound: String,
        /// The owner the key row names, or `"no owner"`.
        claimed: String,
    },
    /// A key must be bound to an owner, and the caller did not say whose key it is.
    #[error("failed to import key: the TMK it arrives under has no stated owner")]
    NoOwner,
    /// The key is not of the type the operation needs (key separation).
    #[error("failed to use key: expected a {expected} key (usage {}), found usage {found}", KeyUsage::for_key_type(*expected))]
    WrongKeyType {
        /// The type the operation needs.
        expected: KeyType,
        /// The usage found in the key block header.
        found: KeyUsage,
    },
    /// The key imported does not have the KCV the sender stated.
    #[error(
        "failed to import key: key check value mismatch (stated {stated}, computed {computed})"
    )]
    KcvMismatch {
        /// KCV sent with the key block.
        stated: KeyCheckValue,
        /// KCV of the key found inside.
        computed: KeyCheckValue,
    },
    /// Sealed card data does not open: altered, or sealed under another LMK.
    #[error("failed to open sealed card data (altered, or sealed under another LMK)")]
    SealedData,
    /// No KEK is configured, so TR-31 blocks under the KEK cannot be imported.
    #[error("failed to import key under the KEK: no KEK is configured (set keys.kek_file)")]
    NoKek,
    /// This key type is never carried under a TMK (a TMK arrives under the KEK or from a file).
    #[error("failed to transfer key: a {0} is never exported or imported under a TMK")]
    NotExportable(KeyType),
    /// A PIN block (or its PAN) could not be processed.
    #[error("failed to process PIN block")]
    PinBlock(#[source] PinBlockError),
    /// A PVV could not be computed.
    #[error("failed to compute PIN verification value")]
    Pvv(#[source] PvvError),
}

/// Outcome of a PIN verification. A block that does not decipher to a valid format 4 PIN field
/// (wrong key, wrong PAN, garbage) is `BadBlock`, distinct from a well-formed wrong PIN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinCheck {
    /// The PIN matches the PVV.
    Match,
    /// A valid PIN block holding another PIN.
    Mismatch,
    /// The block does not decipher to a valid format 4 PIN field.
    BadBlock,
}

/// All cryptography the switch performs. Synchronous on purpose: every operation is CPU-only and
/// takes microseconds, so it runs inline on the async runtime without a blocking pool.
pub trait Hsm: Send + Sync + fmt::Debug {
    /// Generates a random AES-128 key of type `kt` for `owner`; returns it wrapped under the LMK
    /// (bound to `owner`) and its KCV.
    fn generate_key(
        &self,
        kt: KeyType,
        owner: &KeyOwner,
    ) -> Result<(WrappedKey, KeyCheckValue), HsmError>;

    /// Imports a key sent as a TR-31 block under the KEK (TMK registration, SPEC §4), checking
    /// the block's usage against `kt` and the key's KCV against `expected_kcv`; stores it bound
    /// to `owner`.
    fn import_under_kek(
        &self,
        kt: KeyType,
        owner: &KeyOwner,
        tr31_block: &str,
        expected_kcv: &KeyCheckValue,
    ) -> Result<(WrappedKey, KeyCheckValue), HsmError>;

    /// Imports a TPK or TAK delivered under a TMK (the acquirer side of an upstream link's key
    /// exchange, SPEC §6), bound to the TMK's owner.
    fn import_under_tmk(
        &self,
        tmk: &WrappedKey,
        kt: KeyType,
        tr31_block: &str,
        expected_kcv: &KeyCheckValue,
    ) -> Result<(WrappedKey, KeyCheckValue), HsmError>;

    /// Wraps a clear key read from configuration (an upstream link's shared TMK, SPEC §6) under
    /// the LMK, bound to `owner`. The clear key is consumed and wiped.
    fn import_clear_key(
        &self,
        kt: KeyType,
        key: ClearKey,
        owner: &KeyOwner,
    ) -> Result<(WrappedKey, KeyCheckValue), HsmError>;

    /// Re-wraps a stored key written before keys were bound to their owner, bound to the owner
    /// its row names (`key.owner()`). `None` when there is nothing to do: already bound (to that
    /// owner), or no owner stated. Refuses a block bound to someone else.
    fn rebind(&self, key: &WrappedKey) -> Result<Option<WrappedKey>, HsmError>;

    /// `key` (a TPK or TAK) as a TR-31 D block under the terminal's TMK, for field 120.
    fn export_under_tmk(
        &self,
        tmk: &WrappedKey,
        key: &WrappedKey,
        kt: KeyType,
    ) -> Result<String, HsmError>;

    /// The KCV of a stored key (its owner checked like every other use).
    fn kcv(&self, key: &WrappedKey) -> Result<KeyCheckValue, HsmError>;

    /// The ISO 8583 MAC (leftmost 8 bytes of AES-CMAC) of `data` under a TAK.
    fn generate_mac(&self, tak: &WrappedKey, data: &[u8]) -> Result<[u8; 8], HsmError>;

    /// Checks `mac` against `data` under a TAK in constant time; a MAC of the wrong length is
    /// simply `false`.
    fn verify_mac(&self, tak: &WrappedKey, data: &[u8], mac: &[u8]) -> Result<bool, HsmError>;

    /// The MAC of a network-management message (0800/0810, SPEC §3 profile v2) exchanged with
    /// the terminal or station whose field 41 is `field41`: leftmost 8 bytes of AES-CMAC under
    /// its K_NM, derived inside the HSM from its stored TMK. K_NM never leaves the HSM.
    fn generate_nm_mac(
        &self,
        tmk: &WrappedKey,
        field41: &str,
        data: &[u8],
    ) -> Result<[u8; 8], HsmError>;

    /// Checks a network-management MAC (see [`Hsm::generate_nm_mac`]) in constant time; a MAC
    /// of the wrong length is simply `false`.
    fn verify_nm_mac(
        &self,
        tmk: &WrappedKey,
        field41: &str,
        data: &[u8],
        mac: &[u8],
    ) -> Result<bool, HsmError>;

    /// The PVV to store for `pin` on the card `pan` (card creation, PIN reset).
    fn make_pvv(&self, pan: &str, pin: &ClearPin) -> Result<Pvv, HsmError>;

    /// Deciphers a format 4 PIN block under a TPK and compares its PIN with the PVV.
    fn verify_pin(
        &self,
        tpk: &WrappedKey,
        pan: &str,
        pin_block: &[u8; 16],
        pvv: &Pvv,
    ) -> Result<PinCheck, HsmError>;

    /// Re-enciphers a format 4 PIN block from one TPK to another (with fresh random fill); the
    /// clear PIN never leaves the HSM.
    fn translate_pin(
        &self,
        from_tpk: &WrappedKey,
        to_tpk: &WrappedKey,
        pan: &str,
        pin_block: &[u8; 16],
    ) -> Result<[u8; 16], HsmError>;

    /// A keyed hash of the PAN (32 lower-case hex characters) to store and look cards up by,
    /// so the store never holds a PAN in clear. Deterministic for one LMK; hashes the exact text,
    /// so callers pass the PAN digits only (no spaces, no track 2 separator).
    fn pan_token(&self, pan: &str) -> String;

    /// Enciphers card data that must be kept to be sent later (the PAN of a queued advice), as
    /// hex: AES-SIV (RFC 5297) under a key derived from the LMK, bound to `context` (what the
    /// value is, e.g. the field number), so it opens only as what it was sealed as.
    fn seal_card_data(&self, context: &str, value: &str) -> Result<String, HsmError>;

    /// Opens what [`Hsm::seal_card_data`] sealed with the same `context`.
    fn open_card_data(&self, context: &str, sealed: &str) -> Result<Zeroizing<String>, HsmError>;

    /// A keyed MAC (AES-CMAC, 32 lower-case hex characters) of `parts` under a key derived from
    /// the LMK for idempotency records: what the admin API keeps of an `Idempotency-Key` and of
    /// the request it came with, so a stored record cannot be brute-forced back to a PAN or PIN
    /// in the body. Each part is length-prefixed, so no two lists of parts MAC alike.
    fn idempotency_mac(&self, parts: &[&[u8]]) -> String;
}

/// The software HSM: holds only keys derived from the LMK (the LMK itself is dropped once they
/// are derived) and, optionally, the KEK.
pub struct SoftHsm {
    storage: Tr31Kbpk,
    pvk: CmacKey,
    pan_key: CmacKey,
    data_key: ClearKey,
    idempotency_key: CmacKey,
    kek: Option<Tr31Kbpk>,
}

const PAN_TOKEN_DOMAIN: &[u8] = b"switchyard-pan-token-v1\x00";

impl SoftHsm {
    /// Builds the HSM from the LMK and the optional KEK (without it TMK import is refused).
    pub fn new(lmk: Lmk, kek: Option<Kek>) -> Self {
        let derived = lmk.derive();
        SoftHsm {
            storage: Tr31Kbpk::new(&derived.kbpk),
            pvk: CmacKey::new(&derived.pvk),
            pan_key: CmacKey::new(&derived.pan_key),
            data_key: derived.data_key,
            idempotency_key: CmacKey::new(&derived.idempotency_key),
            kek: kek.map(|k| Tr31Kbpk::new(k.key())),
        }
    }

    /// The header a key of type `kt` is stored under, bound to `owner`.
    fn storage_header(kt: KeyType, owner: &KeyOwner) -> KeyBlockHeader {
        let (mode, export) = match kt {
            KeyType::Tmk => (ModeOfUse::Both, Exportability::NonExportable),
            KeyType::Tpk => (ModeOfUse::Both, Exportability::Exportable),
            KeyType::Tak => (ModeOfUse::GenerateAndVerify, Exportability::Exportable),
        };
        let mut header = KeyBlockHeader::new(KeyUsage::for_key_type(kt), mode, export);
        header.optional_blocks.push(OptionalBlock {
            id: OWNER_BLOCK,
            data: owner_binding(owner),
        });
        header
    }

    fn store(&self, kt: KeyType, key: &ClearKey, owner: &KeyOwner) -> Result<WrappedKey, HsmError> {
        self.storage
            .wrap_with(&Self::storage_header(kt, owner), key, &mut rand::rng())
            .map(|block| WrappedKey::owned_by(block, owner.clone()))
            .map_err(HsmError::Wrap)
    }

    /// Opens a stored key and checks whom it is bound to (module docs).
    fn open(&self, key: &WrappedKey) -> Result<(KeyBlockHeader, ClearKey), HsmError> {
        let (header, clear) = self.storage.unwrap(&key.0).map_err(HsmError::StoredKey)?;
        check_owner(&header, key.owner())?;
        Ok((header, clear))
    }

    /// Opens a stored key, checks whom it is bound to and that it is of type `kt`.
    fn load(&self, key: &WrappedKey, kt: KeyType) -> Result<ClearKey, HsmError> {
        let (header, clear) = self.open(key)?;
        check_usage(&header, kt)?;
        Ok(clear)
    }

    /// Opens a block received from outside, checks its usage and the stated KCV, and stores it
    /// bound to `owner`.
    fn import_from(
        &self,
        kbpk: &Tr31Kbpk,
        kt: KeyType,
        owner: &KeyOwner,
        tr31_block: &str,
        expected_kcv: &KeyCheckValue,
    ) -> Result<(WrappedKey, KeyCheckValue), HsmError> {
        let (header, key) = kbpk.unwrap(tr31_block).map_err(HsmError::ImportBlock)?;
        check_usage(&header, kt)?;
        let computed = KeyCheckValue::of(&key);
        if computed != *expected_kcv {
            return Err(HsmError::KcvMismatch {
                stated: *expected_kcv,
                computed,
            });
        }
        Ok((self.store(kt, &key, owner)?, computed))
    }
}

/// Id of the optional block binding a stored key to its owner (module docs).
const OWNER_BLOCK: [u8; 2] = *b"0B";

/// The `0B` data for `owner`: `T` + terminal id (letters, digits, `-`, `_`), or `U` + the
/// upstream name in hex (names are free text; hex keeps the header printable ASCII).
fn owner_binding(owner: &KeyOwner) -> String {
    match owner {
        KeyOwner::Terminal(t) => format!("T{t}"),
        KeyOwner::Upstream(name) => format!("U{}", hex::encode(name.as_bytes())),
    }
}

/// Checks the binding of a stored block against the owner its row names. A block without a
/// binding (written before there was one) is accepted for whoever its row names.
fn check_owner(header: &KeyBlockHeader, claimed: Option<&KeyOwner>) -> Result<(), HsmError> {
    let Some(bound) = header.optional_blocks.iter().find(|b| b.id == OWNER_BLOCK) else {
        return Ok(());
    };
    if claimed.is_some_and(|owner| owner_binding(owner) == bound.data) {
        return Ok(());
    }
    let claimed = claimed.map_or_else(|| "no owner".to_string(), ToString::to_string);
    warn!(
        bound = %bound.data,
        %claimed,
        usage = %header.key_usage,
        "stored key refused: bound to another owner than its key row names (row moved?)"
    );
    Err(HsmError::WrongOwner {
        bound: bound.data.clone(),
        claimed,
    })
}

fn check_usage(header: &KeyBlockHeader, kt: KeyType) -> Result<(), HsmError> {
    if header.key_usage == KeyUsage::for_key_type(kt) {
        Ok(())
    } else {
        Err(HsmError::WrongKeyType {
            expected: kt,
            found: header.key_usage,
        })
    }
}

/// The X9.143 header a TPK or TAK is delivered to a terminal under (module docs say why).
pub(crate) fn delivery_header(kt: KeyType) -> Option<KeyBlockHeader> {
    let mode = match kt {
        KeyType::Tmk => return None,
        KeyType::Tpk => ModeOfUse::EncryptOnly,
        KeyType::Tak => ModeOfUse::GenerateAndVerify,
    };
    Some(KeyBlockHeader::new(
        KeyUsage::for_key_type(kt),
        mode,
        Exportability::NonExportable,
    ))
}

impl Hsm for SoftHsm {
    fn generate_key(
        &self,
        kt: KeyType,
        owner: &KeyOwner,
    ) -> Result<(WrappedKey, KeyCheckValue), HsmError> {
        let key = ClearKey::generate(AesKeySize::Aes128, &mut rand::rng());
        Ok((self.store(kt, &key, owner)?, KeyCheckValue::of(&key)))
    }

    fn import_under_kek(
        &self,
        kt: KeyType,
        owner: &KeyOwner,
        tr31_block: &str,
        expected_kcv: &KeyCheckValue,
    ) -> Result<(WrappedKey, KeyCheckValue), HsmError> {
        let kek = self.kek.as_ref().ok_or(HsmError::NoKek)?;
        self.import_from(kek, kt, owner, tr31_block, expected_kcv)
    }

    fn import_under_tmk(
        &self,
        tmk: &WrappedKey,
        kt: KeyType,
        tr31_block: &str,
        expected_kcv: &KeyCheckValue,
    ) -> Result<(WrappedKey, KeyCheckValue), HsmError> {
        if kt == KeyType::Tmk {
            return Err(HsmError::NotExportable(kt));
        }
        // the delivered key belongs to whoever the TMK belongs to
        let owner = tmk.owner().cloned().ok_or(HsmError::NoOwner)?;
        let tmk = Tr31Kbpk::new(&self.load(tmk, KeyType::Tmk)?);
        self.import_from(&tmk, kt, &owner, tr31_block, expected_kcv)
    }

    fn import_clear_key(
        &self,
        kt: KeyType,
        key: ClearKey,
        owner: &KeyOwner,
    ) -> Result<(WrappedKey, KeyCheckValue), HsmError> {
        Ok((self.store(kt, &key, owner)?, KeyCheckValue::of(&key)))
    }

    fn rebind(&self, key: &WrappedKey) -> Result<Option<WrappedKey>, HsmError> {
        let Some(owner) = key.owner() else {
            return Ok(None);
        };
        let (header, clear) = self.open(key)?;
        if header.optional_blocks.iter().any(|b| b.id == OWNER_BLOCK) {
            return Ok(None);
        }
        // keep everything else the block said (usage, mode, exportability, other blocks)
        let mut bound = header;
        bound.optional_blocks.retain(|b| &b.id != b"PB");
        bound.optional_blocks.push(OptionalBlock {
            id: OWNER_BLOCK,
            data: owner_binding(owner),
        });
        self.storage
            .wrap_with(&bound, &clear, &mut rand::rng())
            .map(|block| Some(WrappedKey::owned_by(block, owner.clone())))
            .map_err(HsmError::Wrap)
    }

    fn export_under_tmk(
        &self,
        tmk: &WrappedKey,
        key: &WrappedKey,
        kt: KeyType,
    ) -> Result<String, HsmError> {
        let header = delivery_header(kt).ok_or(HsmError::NotExportable(kt))?;
        let clear = self.load(key, kt)?;
        let tmk = Tr31Kbpk::new(&self.load(tmk, KeyType::Tmk)?);
        tmk.wrap_with(&header, &clear, &mut rand::rng())
            .map_err(HsmError::Wrap)
    }

    fn kcv(&self, key: &WrappedKey) -> Result<KeyCheckValue, HsmError> {
        let (_, clear) = self.open(key)?;
        Ok(KeyCheckValue::of(&clear))
    }

    fn generate_mac(&self, tak: &WrappedKey, data: &[u8]) -> Result<[u8; 8], HsmError> {
        let tak = CmacKey::new(&self.load(tak, KeyType::Tak)?);
        Ok(leftmost8(&tak.compute(&[data])))
    }

    fn verify_mac(&self, tak: &WrappedKey, data: &[u8], mac: &[u8]) -> Result<bool, HsmError> {
        let expected = self.generate_mac(tak, data)?;
        // `ct_eq` on slices of different lengths is false without comparing contents.
        Ok(expected.as_slice().ct_eq(mac).into())
    }

    fn generate_nm_mac(
        &self,
        tmk: &WrappedKey,
        field41: &str,
        data: &[u8],
    ) -> Result<[u8; 8], HsmError> {
        let nm = derive_nm_key(&self.load(tmk, KeyType::Tmk)?, field41);
        Ok(leftmost8(&nm.compute(&[data])))
    }

    fn verify_nm_mac(
        &self,
        tmk: &WrappedKey,
        field41: &str,
        data: &[u8],
        mac: &[u8],
    ) -> Result<bool, HsmError> {
        let expected = self.generate_nm_mac(tmk, field41, data)?;
        Ok(expected.as_slice().ct_eq(mac).into())
    }

    fn make_pvv(&self, pan: &str, pin: &ClearPin) -> Result<Pvv, HsmError> {
        Pvv::compute(&self.pvk, pan, pin).map_err(HsmError::Pvv)
    }

    fn verify_pin(
        &self,
        tpk: &WrappedKey,
        pan: &str,
        pin_block: &[u8; 16],
        pvv: &Pvv,
    ) -> Result<PinCheck, HsmError> {
        let tpk = AesCipher::new(&self.load(tpk, KeyType::Tpk)?);
        let pin = match pinblock::decipher_with(&tpk, pan, pin_block) {
            Ok(pin) => pin,
            Err(PinBlockError::InvalidPan) => {
                return Err(HsmError::PinBlock(PinBlockError::InvalidPan));
            }
            Err(_) => return Ok(PinCheck::BadBlock),
        };
        let candidate = Pvv::compute(&self.pvk, pan, &pin).map_err(HsmError::Pvv)?;
        Ok(if candidate == *pvv {
            PinCheck::Match
        } else {
            PinCheck::Mismatch
        })
    }

    fn translate_pin(
        &self,
        from_tpk: &WrappedKey,
        to_tpk: &WrappedKey,
        pan: &str,
        pin_block: &[u8; 16],
    ) -> Result<[u8; 16], HsmError> {
        let from = AesCipher::new(&self.load(from_tpk, KeyType::Tpk)?);
        let to = self.load(to_tpk, KeyType::Tpk)?;
        let pin = pinblock::decipher_with(&from, pan, pin_block).map_err(HsmError::PinBlock)?;
        pinblock::encipher_format4(&to, pan, &pin, &mut rand::rng()).map_err(HsmError::PinBlock)
    }

    fn pan_token(&self, pan: &str) -> String {
        hex::encode(self.pan_key.compute(&[PAN_TOKEN_DOMAIN, pan.as_bytes()]))
    }

    fn seal_card_data(&self, context: &str, value: &str) -> Result<String, HsmError> {
        // Deterministic (SIV): the same PAN seals the same way, which tells no more than the
        // PAN token already does; there is no nonce to get wrong.
        self.siv()?
            .encrypt([SEAL_DOMAIN, context.as_bytes()], value.as_bytes())
            .map(hex::encode)
            .map_err(|_| HsmError::SealedData)
    }

    fn open_card_data(&self, context: &str, sealed: &str) -> Result<Zeroizing<String>, HsmError> {
        let bytes = hex::decode(sealed).map_err(|_| HsmError::SealedData)?;
        let clear = Zeroizing::new(
            self.siv()?
                .decrypt([SEAL_DOMAIN, context.as_bytes()], &bytes)
                .map_err(|_| HsmError::SealedData)?,
        );
        std::str::from_utf8(&clear)
            .map(|s| Zeroizing::new(s.to_string()))
            .map_err(|_| HsmError::SealedData)
    }

    fn idempotency_mac(&self, parts: &[&[u8]]) -> String {
        let mut framed = Vec::with_capacity(parts.iter().map(|p| p.len() + 8).sum());
        for part in parts {
            framed.extend_from_slice(&(part.len() as u64).to_be_bytes());
            framed.extend_from_slice(part);
        }
        hex::encode(
            self.idempotency_key
                .compute(&[IDEMPOTENCY_DOMAIN, framed.as_slice()]),
        )
    }
}

/// Domain of every idempotency MAC (the derived key has no other use; this is belt and braces).
const IDEMPOTENCY_DOMAIN: &[u8] = b"switchyard-idempotency-v1\x00";

/// Associated data of every sealed value: the purpose, then the caller's context.
const SEAL_DOMAIN: &[u8] = b"switchyard-card-data-v1";

impl SoftHsm {
    /// AES-SIV over the data key (its 256 bits are the two AES-128 halves RFC 5297 needs).
    fn siv(&self) -> Result<aes_siv::siv::Aes128Siv, HsmError> {
        use aes_siv::KeyInit;
        aes_siv::siv::Aes128Siv::new_from_slice(self.data_key.as_bytes())
            .map_err(|_| HsmError::SealedData)
    }
}

impl fmt::Debug for SoftHsm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SoftHsm")
            .field("lmk", &"<redacted>")
            .field(
                "kek",
                &if self.kek.is_some() {
                    "<redacted>"
                } else {
                    "<none>"
                },
            )
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::cmac::mac8;
    use crate::crypto::tr31;

    const LMK: &str = "00112233445566778899AABBCCDDEEFF0123456789ABCDEFFEDCBA9876543210";
    const KEK: &str = "89E88CF7931444F334BD7547FC3F380C";
    const PAN: &str = "6011000000000004";

    fn hsm() -> SoftHsm {
        SoftHsm::new(
            Lmk::from_hex(LMK).unwrap(),
            Some(Kek::from_hex(KEK).unwrap()),
        )
    }

    /// The terminal the keys of these tests belong to.
    fn owner() -> KeyOwner {
        KeyOwner::Terminal(crate::domain::TerminalId::new("ATM00001").unwrap())
    }

    /// The upstream of the link-key tests.
    fn upstream() -> KeyOwner {
        KeyOwner::Upstream("issuer-b".into())
    }

    /// A terminal's TMK, registered through the KEK as `POST /v1/terminals` does.
    fn register_tmk(hsm: &SoftHsm) -> (ClearKey, WrappedKey) {
        let tmk = ClearKey::from_hex("0F0E0D0C0B0A09080706050403020100").unwrap();
        let header = KeyBlockHeader::new(
            KeyUsage::KEY_ENCRYPTION,
            ModeOfUse::Both,
            Exportability::NonExportable,
        );
        let block = tr31::wrap(Kek::from_hex(KEK).unwrap().key(), &header, &tmk).unwrap();
        let (wrapped, kcv) = hsm
            .import_under_kek(KeyType::Tmk, &owner(), &block, &KeyCheckValue::of(&tmk))
            .unwrap();
        assert_eq!(kcv, KeyCheckValue::of(&tmk));
        (tmk, wrapped)
    }

    /// What the terminal gets out of field 120.
    fn deliver(hsm: &SoftHsm, tmk: &(ClearKey, WrappedKey), kt: KeyType) -> (WrappedKey, ClearKey) {
        let (wrapped, kcv) = hsm.generate_key(kt, &owner()).unwrap();
        let block = hsm.export_under_tmk(&tmk.1, &wrapped, kt).unwrap();
        let (header, clear) = tr31::unwrap(&tmk.0, &block).unwrap();
        assert_eq!(Some(header), delivery_header(kt));
        assert_eq!(KeyCheckValue::of(&clear), kcv);
        (wrapped, clear)
    }

    #[test]
    fn tmk_import_refuses_wrong_kcv_wrong_usage_and_missing_kek() {
        let hsm = hsm();
        let tmk = ClearKey::from_hex("0F0E0D0C0B0A09080706050403020100").unwrap();
        let kek = Kek::from_hex(KEK).unwrap();
        let k0 = KeyBlockHeader::new(
            KeyUsage::KEY_ENCRYPTION,
            ModeOfUse::Both,
            Exportability::NonExportable,
        );
        let block = tr31::wrap(kek.key(), &k0, &tmk).unwrap();
        let wrong: KeyCheckValue = "000000".parse().unwrap();
        let err = hsm
            .import_under_kek(KeyType::Tmk, &owner(), &block, &wrong)
            .unwrap_err();
        assert!(matches!(err, HsmError::KcvMismatch { .. }), "{err}");

        let p0 = KeyBlockHeader::new(
            KeyUsage::PIN_ENCRYPTION,
            ModeOfUse::Both,
            Exportability::NonExportable,
        );
        let block_p0 = tr31::wrap(kek.key(), &p0, &tmk).unwrap();
        let err = hsm
            .import_under_kek(KeyType::Tmk, &owner(), &block_p0, &KeyCheckValue::of(&tmk))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "failed to use key: expected a TMK key (usage K0), found usage P0"
        );

        let tampered = block.replacen("K0AB", "K0AE", 1);
        assert!(matches!(
            hsm.import_under_kek(KeyType::Tmk, &owner(), &tampered, &KeyCheckValue::of(&tmk)),
            Err(HsmError::ImportBlock(Tr31Error::Mac))
        ));

        let no_kek = SoftHsm::new(Lmk::from_hex(LMK).unwrap(), None);
        assert!(matches!(
            no_kek.import_under_kek(KeyType::Tmk, &owner(), &block, &KeyCheckValue::of(&tmk)),
            Err(HsmError::NoKek)
        ));
    }

    #[test]
    fn delivered_keys_work_at_the_terminal_and_in_the_hsm() {
        let hsm = hsm();
        let tmk = register_tmk(&hsm);
        let (tak, tak_clear) = deliver(&hsm, &tmk, KeyType::Tak);
        let (tpk, tpk_clear) = deliver(&hsm, &tmk, KeyType::Tpk);

        // MAC: terminal computes, switch verifies; switch computes, terminal recomputes.
        let msg = b"0200F23A...packed message up to the MAC field";
        let terminal_mac = mac8(&tak_clear, msg);
        assert!(hsm.verify_mac(&tak, msg, &terminal_mac).unwrap());
        assert_eq!(hsm.generate_mac(&tak, msg).unwrap(), terminal_mac);
        let mut bad = terminal_mac;
        bad[7] ^= 1;
        assert!(!hsm.verify_mac(&tak, msg, &bad).unwrap());
        assert!(!hsm.verify_mac(&tak, msg, &terminal_mac[..7]).unwrap());
        assert!(
            !hsm.verify_mac(&tak, b"0200 other message", &terminal_mac)
                .unwrap()
        );

        // PIN: card created with PIN 1234 via the admin API, then used at the terminal.
        let pvv = hsm.make_pvv(PAN, &ClearPin::new("1234").unwrap()).unwrap();
        let mut rng = rand::rng();
        let good =
            pinblock::encipher_format4(&tpk_clear, PAN, &ClearPin::new("1234").unwrap(), &mut rng)
                .unwrap();
        let wrong =
            pinblock::encipher_format4(&tpk_clear, PAN, &ClearPin::new("4321").unwrap(), &mut rng)
                .unwrap();
        assert_eq!(
            hsm.verify_pin(&tpk, PAN, &good, &pvv).unwrap(),
            PinCheck::Match
        );
        assert_eq!(
            hsm.verify_pin(&tpk, PAN, &wrong, &pvv).unwrap(),
            PinCheck::Mismatch
        );
        assert_eq!(
            hsm.verify_pin(&tpk, PAN, &[0x5A; 16], &pvv).unwrap(),
            PinCheck::BadBlock
        );
        // Block made for another card number does not verify for this one.
        let other_pan = "6011000000000012";
        let other = pinblock::encipher_format4(
            &tpk_clear,
            other_pan,
            &ClearPin::new("1234").unwrap(),
            &mut rng,
        )
        .unwrap();
        assert_ne!(
            hsm.verify_pin(&tpk, PAN, &other, &pvv).unwrap(),
            PinCheck::Match
        );
        assert!(matches!(
            hsm.verify_pin(&tpk, "not-a-pan", &good, &pvv),
            Err(HsmError::PinBlock(PinBlockError::InvalidPan))
        ));
    }

    #[test]
    fn key_separation_is_enforced() {
        let hsm = hsm();
        let tmk = register_tmk(&hsm);
        let (tpk, _) = hsm.generate_key(KeyType::Tpk, &owner()).unwrap();
        let (tak, _) = hsm.generate_key(KeyType::Tak, &owner()).unwrap();
        // A TPK cannot MAC, a TAK cannot decipher PINs, neither can act as a TMK.
        assert!(matches!(
            hsm.generate_mac(&tpk, b"x"),
            Err(HsmError::WrongKeyType {
                expected: KeyType::Tak,
                ..
            })
        ));
        let pvv = hsm.make_pvv(PAN, &ClearPin::new("1234").unwrap()).unwrap();
        assert!(matches!(
            hsm.verify_pin(&tak, PAN, &[0; 16], &pvv),
            Err(HsmError::WrongKeyType {
                expected: KeyType::Tpk,
                ..
            })
        ));
        assert!(matches!(
            hsm.export_under_tmk(&tpk, &tak, KeyType::Tak),
            Err(HsmError::WrongKeyType {
                expected: KeyType::Tmk,
                ..
            })
        ));
        // Exporting a TPK as a TAK is refused; a TMK is never exported.
        assert!(matches!(
            hsm.export_under_tmk(&tmk.1, &tpk, KeyType::Tak),
            Err(HsmError::WrongKeyType { .. })
        ));
        assert!(matches!(
            hsm.export_under_tmk(&tmk.1, &tmk.1, KeyType::Tmk),
            Err(HsmError::NotExportable(KeyType::Tmk))
        ));
    }

    #[test]
    fn stored_keys_are_bound_to_the_lmk() {
        let hsm = hsm();
        let (tak, kcv) = hsm.generate_key(KeyType::Tak, &owner()).unwrap();
        assert_eq!(hsm.kcv(&tak).unwrap(), kcv);
        assert!(tak.0.starts_with('D'), "stored as a TR-31 D block");
        let other = SoftHsm::new(Lmk::from_hex(&LMK.replace('F', "E")).unwrap(), None);
        assert!(matches!(
            other.kcv(&tak),
            Err(HsmError::StoredKey(Tr31Error::Mac))
        ));
        // A restarted HSM with the same LMK opens what the first one stored.
        let again = SoftHsm::new(Lmk::from_hex(LMK).unwrap(), None);
        assert_eq!(again.kcv(&tak).unwrap(), kcv);
        assert!(matches!(
            hsm.kcv(&WrappedKey::new("D0016garbage")),
            Err(HsmError::StoredKey(_))
        ));
        // Two generated keys differ.
        assert_ne!(hsm.generate_key(KeyType::Tak, &owner()).unwrap().1, kcv);
    }

    #[test]
    fn translate_pin_moves_a_block_between_tpks_without_changing_the_pin() {
        let hsm = hsm();
        let tmk = register_tmk(&hsm);
        let (terminal_tpk, terminal_clear) = deliver(&hsm, &tmk, KeyType::Tpk);
        let (link_tpk, link_clear) = deliver(&hsm, &tmk, KeyType::Tpk);
        let pin = ClearPin::new("908172").unwrap();
        let block =
            pinblock::encipher_format4(&terminal_clear, PAN, &pin, &mut rand::rng()).unwrap();
        let translated = hsm
            .translate_pin(&terminal_tpk, &link_tpk, PAN, &block)
            .unwrap();
        assert_ne!(translated, block);
        let at_issuer = pinblock::decipher_format4(&link_clear, PAN, &translated).unwrap();
        let pvv = hsm.make_pvv(PAN, &pin).unwrap();
        assert_eq!(hsm.make_pvv(PAN, &at_issuer).unwrap(), pvv);
        assert_eq!(
            hsm.verify_pin(&link_tpk, PAN, &translated, &pvv).unwrap(),
            PinCheck::Match
        );
        assert!(matches!(
            hsm.translate_pin(&terminal_tpk, &link_tpk, PAN, &[0; 16]),
            Err(HsmError::PinBlock(_))
        ));
    }

    #[test]
    fn link_keys_import_under_a_configured_tmk() {
        // Issuer switch and acquirer switch share a TMK; the issuer delivers a TAK under it.
        let issuer = hsm();
        let acquirer = SoftHsm::new(Lmk::from_hex(&LMK.replace('0', "7")).unwrap(), None);
        let shared = ClearKey::from_hex("00112233445566770011223344556677").unwrap();
        let (issuer_tmk, kcv1) = issuer
            .import_clear_key(KeyType::Tmk, shared.clone(), &upstream())
            .unwrap();
        let (acquirer_tmk, kcv2) = acquirer
            .import_clear_key(KeyType::Tmk, shared, &upstream())
            .unwrap();
        assert_eq!(kcv1, kcv2);
        let (tak, kcv) = issuer.generate_key(KeyType::Tak, &owner()).unwrap();
        let block = issuer
            .export_under_tmk(&issuer_tmk, &tak, KeyType::Tak)
            .unwrap();
        let (link_tak, got) = acquirer
            .import_under_tmk(&acquirer_tmk, KeyType::Tak, &block, &kcv)
            .unwrap();
        assert_eq!(got, kcv);
        let mac = acquirer.generate_mac(&link_tak, b"0200...").unwrap();
        assert!(issuer.verify_mac(&tak, b"0200...", &mac).unwrap());
        assert!(matches!(
            acquirer.import_under_tmk(&acquirer_tmk, KeyType::Tpk, &block, &kcv),
            Err(HsmError::WrongKeyType { .. })
        ));
        // the delivered key belongs to the upstream whose TMK it came under, and only to it
        assert_eq!(link_tak.owner(), Some(&upstream()));
        let elsewhere =
            WrappedKey::owned_by(link_tak.0.clone(), KeyOwner::Upstream("other".into()));
        assert!(matches!(
            acquirer.generate_mac(&elsewhere, b"0200..."),
            Err(HsmError::WrongOwner { .. })
        ));
        assert!(matches!(
            acquirer.import_under_tmk(
                &WrappedKey::new(acquirer_tmk.0.clone()),
                KeyType::Tak,
                &block,
                &kcv
            ),
            Err(HsmError::NoOwner)
        ));
    }

    fn other_terminal() -> KeyOwner {
        KeyOwner::Terminal(crate::domain::TerminalId::new("ATM00002").unwrap())
    }

    #[test]
    fn stored_keys_open_only_for_the_terminal_they_are_bound_to() {
        let hsm = hsm();
        let (tak, kcv) = hsm.generate_key(KeyType::Tak, &owner()).unwrap();
        assert_eq!(tak.owner(), Some(&owner()));
        let mac = hsm.generate_mac(&tak, b"data").unwrap();
        assert!(hsm.verify_mac(&tak, b"data", &mac).unwrap());
        assert_eq!(hsm.kcv(&tak).unwrap(), kcv);

        // the row was moved to another terminal: the key is refused for every use
        let moved = WrappedKey::owned_by(tak.0.clone(), other_terminal());
        for refused in [
            hsm.verify_mac(&moved, b"data", &mac).map(|_| ()),
            hsm.generate_mac(&moved, b"data").map(|_| ()),
            hsm.kcv(&moved).map(|_| ()),
            // nobody said whose it is: it cannot be checked, so it is refused too
            hsm.generate_mac(&WrappedKey::new(tak.0.clone()), b"data")
                .map(|_| ()),
            // an upstream named like the terminal is someone else
            hsm.generate_mac(
                &WrappedKey::owned_by(tak.0.clone(), KeyOwner::Upstream("ATM00001".into())),
                b"data",
            )
            .map(|_| ()),
        ] {
            match refused {
                Err(HsmError::WrongOwner { bound, claimed }) => {
                    assert_eq!(bound, "TATM00001");
                    assert_ne!(claimed, bound);
                }
                other => panic!("expected WrongOwner, got {other:?}"),
            }
        }
        let tmk = register_tmk(&hsm);
        let (tpk, _) = hsm.generate_key(KeyType::Tpk, &owner()).unwrap();
        let pvv = hsm.make_pvv(PAN, &ClearPin::new("1234").unwrap()).unwrap();
        let moved_tpk = WrappedKey::owned_by(tpk.0.clone(), other_terminal());
        assert!(matches!(
            hsm.verify_pin(&moved_tpk, PAN, &[0u8; 16], &pvv),
            Err(HsmError::WrongOwner { .. })
        ));
        assert!(matches!(
            hsm.export_under_tmk(&tmk.1, &moved_tpk, KeyType::Tpk),
            Err(HsmError::WrongOwner { .. })
        ));

        // the binding is inside the authenticated header: editing it breaks the block
        let edited =
            WrappedKey::owned_by(tak.0.replace("TATM00001", "TATM00002"), other_terminal());
        assert_ne!(edited.0, tak.0);
        assert!(matches!(
            hsm.generate_mac(&edited, b"data"),
            Err(HsmError::StoredKey(Tr31Error::Mac))
        ));
        // and the error names owners, never key material
        let text = hsm.kcv(&moved).unwrap_err().to_string();
        assert!(
            text.contains("TATM00001") && !text.contains(&tak.0[16..]),
            "{text}"
        );
    }

    #[test]
    fn blocks_stored_before_binding_are_accepted_and_rebound() {
        let hsm = hsm();
        let clear = ClearKey::from_hex("00112233445566778899AABBCCDDEEFF").unwrap();
        // what earlier versions stored: no optional blocks
        let legacy_header = KeyBlockHeader::new(
            KeyUsage::AES_CMAC,
            ModeOfUse::GenerateAndVerify,
            Exportability::Exportable,
        );
        let legacy = hsm
            .storage
            .wrap_with(&legacy_header, &clear, &mut rand::rng())
            .unwrap();
        // the store finds such rows by this (`Database::unbound_keys`)
        assert_eq!(&legacy[12..14], "00");
        let row = WrappedKey::owned_by(legacy, owner());
        let mac = hsm.generate_mac(&row, b"x").unwrap();

        let bound = hsm.rebind(&row).unwrap().expect("re-wrapped");
        assert_ne!(&bound.0[12..14], "00");
        assert_eq!(bound.owner(), Some(&owner()));
        assert_eq!(hsm.generate_mac(&bound, b"x").unwrap(), mac, "the same key");
        assert_eq!(hsm.kcv(&bound).unwrap(), KeyCheckValue::of(&clear));
        assert!(hsm.rebind(&bound).unwrap().is_none(), "already bound");
        assert!(matches!(
            hsm.generate_mac(
                &WrappedKey::owned_by(bound.0.clone(), other_terminal()),
                b"x"
            ),
            Err(HsmError::WrongOwner { .. })
        ));
        assert!(matches!(
            hsm.rebind(&WrappedKey::owned_by(bound.0.clone(), other_terminal())),
            Err(HsmError::WrongOwner { .. })
        ));
        assert!(
            hsm.rebind(&WrappedKey::new(row.0.clone()))
                .unwrap()
                .is_none()
        );
        // keys made now are bound from the start
        let (fresh, _) = hsm.generate_key(KeyType::Tpk, &owner()).unwrap();
        assert!(hsm.rebind(&fresh).unwrap().is_none());
    }

    #[test]
    fn idempotency_macs_are_keyed_framed_and_not_a_plain_hash() {
        use sha2::{Digest, Sha256};
        let hsm = hsm();
        let body = br#"{"pan":"6011000000000004","pin":"1234"}"#;
        let mac = hsm.idempotency_mac(&[b"POST", b"/v1/cards", body]);
        assert_eq!(mac.len(), 32);
        assert_eq!(mac, hsm.idempotency_mac(&[b"POST", b"/v1/cards", body]));
        // framing: moving a byte between parts changes the MAC
        assert_ne!(mac, hsm.idempotency_mac(&[b"POS", b"T/v1/cards", body]));
        // another LMK, another MAC
        let other = SoftHsm::new(Lmk::from_hex(&LMK.replace('0', "9")).unwrap(), None);
        assert_ne!(mac, other.idempotency_mac(&[b"POST", b"/v1/cards", body]));
        // not the PAN token key either
        assert!(!hsm.pan_token("6011000000000004").contains(&mac));
        let plain = hex::encode(Sha256::digest(body));
        assert!(!plain.starts_with(&mac));
    }

    #[test]
    fn pan_tokens_are_keyed_and_stable() {
        let hsm = hsm();
        let t = hsm.pan_token(PAN);
        assert_eq!(t.len(), 32);
        assert!(
            t.bytes()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert!(!t.contains(PAN));
        assert_eq!(
            t,
            SoftHsm::new(Lmk::from_hex(LMK).unwrap(), None).pan_token(PAN)
        );
        assert_ne!(t, hsm.pan_token("6011000000000012"));
        let other = SoftHsm::new(Lmk::from_hex(&LMK.replace('F', "E")).unwrap(), None);
        assert_ne!(t, other.pan_token(PAN));
    }

    #[test]
    fn sealed_card_data_opens_only_as_sealed_under_the_same_lmk() {
        let hsm = hsm();
        let sealed = hsm.seal_card_data("2", PAN).unwrap();
        assert!(!sealed.contains(PAN) && sealed.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(hsm.open_card_data("2", &sealed).unwrap().as_str(), PAN);
        // bound to its context, its bytes and its LMK
        assert!(matches!(
            hsm.open_card_data("14", &sealed),
            Err(HsmError::SealedData)
        ));
        let mut altered = sealed.clone().into_bytes();
        altered[40] = if altered[40] == b'0' { b'1' } else { b'0' };
        let altered = String::from_utf8(altered).unwrap();
        assert!(hsm.open_card_data("2", &altered).is_err());
        assert!(hsm.open_card_data("2", "not hex").is_err());
        let other = SoftHsm::new(Lmk::from_hex(&LMK.replace('F', "E")).unwrap(), None);
        assert!(other.open_card_data("2", &sealed).is_err());
        let err = hsm.open_card_data("2", &altered).unwrap_err().to_string();
        assert!(!err.contains(PAN) && !err.contains(&altered), "{err}");
    }

    #[test]
    fn debug_is_redacted_and_trait_is_object_safe() {
        let hsm: Box<dyn Hsm> = Box::new(hsm());
        let dbg = format!("{hsm:?}");
        assert_eq!(dbg, r#"SoftHsm { lmk: "<redacted>", kek: "<redacted>" }"#);
        let pvv = hsm.make_pvv(PAN, &ClearPin::new("1234").unwrap()).unwrap();
        assert!(!format!("{pvv:?}").contains(&pvv.to_hex()));
    }
}
