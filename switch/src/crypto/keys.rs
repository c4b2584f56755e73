//! Key material: clear AES keys (zeroizing, redacted), the LMK and KEK loaded from Secret files,
//! and the working keys the software HSM derives from the LMK.
//!
//! `KeyType` and `WrappedKey` live in [`crate::domain`] (the store and the API use them too) and
//! are re-exported here. A `WrappedKey` is a TR-31 version D key block under a key-block
//! protection key derived from the LMK, so a key at rest is both encrypted and authenticated, and
//! its header binds it to its usage (a TPK cannot be used as a TAK).

use std::fmt;
use std::path::{Path, PathBuf};

use rand::CryptoRng;
use subtle::{Choice, ConstantTimeEq};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use super::cmac::{CmacKey, kdf_counter};
pub use crate::domain::{KeyType, WrappedKey};

/// Why key material could not be loaded. Never carries the material itself, nor any character of
/// it (which is why hex decoding errors are not passed through: they quote the bad character).
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The key has a length the algorithm does not allow.
    #[error("failed to load {what}: expected {expected}, got {got} bytes")]
    Length {
        /// Which key, e.g. "LMK".
        what: &'static str,
        /// The accepted lengths, phrased for people.
        expected: &'static str,
        /// The length received.
        got: usize,
    },
    /// The text is not a hex key of an accepted length.
    #[error("failed to parse {what}: expected {expected}")]
    Hex {
        /// Which key, e.g. "KEK".
        what: &'static str,
        /// The accepted form, e.g. "64 hex characters (32 bytes)".
        expected: &'static str,
    },
    /// The key file could not be read.
    #[error("failed to read {what} file {}", path.display())]
    ReadFile {
        /// Which key, e.g. "LMK".
        what: &'static str,
        /// The file that failed.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The key file was read but does not hold a hex key of an accepted length.
    #[error("failed to read {what} file {}: expected {expected}", path.display())]
    FileContents {
        /// Which key, e.g. "LMK".
        what: &'static str,
        /// The file that failed.
        path: PathBuf,
        /// The accepted form, e.g. "64 hex characters (32 bytes)".
        expected: &'static str,
    },
}

/// AES key sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AesKeySize {
    /// 16-byte key.
    Aes128,
    /// 24-byte key.
    Aes192,
    /// 32-byte key.
    Aes256,
}

impl AesKeySize {
    /// Key length in bytes.
    pub fn bytes(self) -> usize {
        match self {
            AesKeySize::Aes128 => 16,
            AesKeySize::Aes192 => 24,
            AesKeySize::Aes256 => 32,
        }
    }

    /// The size for a key of `len` bytes, if AES has one.
    pub fn from_len(len: usize) -> Option<Self> {
        match len {
            16 => Some(AesKeySize::Aes128),
            24 => Some(AesKeySize::Aes192),
            32 => Some(AesKeySize::Aes256),
            _ => None,
        }
    }
}

/// Fixed-size storage so a key never lives on the heap and the cipher crates can borrow it as an
/// array without a copy.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub(crate) enum KeyBytes {
    K16([u8; 16]),
    K24([u8; 24]),
    K32([u8; 32]),
}

/// A clear AES key (16, 24 or 32 bytes). Wiped on drop; `Debug` shows only the size; equality is
/// constant time.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct ClearKey(KeyBytes);

const ANY_AES_HEX: &str = "32, 48 or 64 hex characters (16, 24 or 32 bytes)";
const ANY_AES_LEN: &str = "16, 24 or 32 bytes";

impl ClearKey {
    /// Copies `bytes` into a new key; refuses lengths AES does not have.
    pub fn new(bytes: &[u8]) -> Result<Self, KeyError> {
        Self::new_checked(bytes).ok_or(KeyError::Length {
            what: "AES key",
            expected: ANY_AES_LEN,
            got: bytes.len(),
        })
    }

    fn new_checked(bytes: &[u8]) -> Option<Self> {
        Some(ClearKey(match bytes.len() {
            16 => KeyBytes::K16(copy_array(bytes)?),
            24 => KeyBytes::K24(copy_array(bytes)?),
            32 => KeyBytes::K32(copy_array(bytes)?),
            _ => return None,
        }))
    }

    /// A fresh random key of `size` from a cryptographic RNG.
    pub fn generate<R: CryptoRng + ?Sized>(size: AesKeySize, rng: &mut R) -> Self {
        Self::filled_with(size, |out| rng.fill_bytes(out))
    }

    /// A key of `size` whose bytes `fill` writes in place (generation, derivation), so the
    /// material is never copied through a buffer of unchecked length.
    pub(crate) fn filled_with(size: AesKeySize, fill: impl FnOnce(&mut [u8])) -> Self {
        let mut key = ClearKey(match size {
            AesKeySize::Aes128 => KeyBytes::K16([0; 16]),
            AesKeySize::Aes192 => KeyBytes::K24([0; 24]),
            AesKeySize::Aes256 => KeyBytes::K32([0; 32]),
        });
        fill(key.as_bytes_mut());
        key
    }

    /// Parses a hex key (either case, surrounding whitespace ignored).
    pub fn from_hex(text: &str) -> Result<Self, KeyError> {
        decode_secret_hex(text)
            .and_then(|b| Self::new_checked(&b))
            .ok_or(KeyError::Hex {
                what: "AES key",
                expected: ANY_AES_HEX,
            })
    }

    /// Reads a hex key from a file (e.g. an upstream link's shared TMK, SPEC §6).
    pub fn from_hex_file(path: impl AsRef<Path>) -> Result<Self, KeyError> {
        read_hex_key_file(path.as_ref(), "key", ANY_AES_HEX, |_| true)
    }

    /// The key's size.
    pub fn size(&self) -> AesKeySize {
        match self.0 {
            KeyBytes::K16(_) => AesKeySize::Aes128,
            KeyBytes::K24(_) => AesKeySize::Aes192,
            KeyBytes::K32(_) => AesKeySize::Aes256,
        }
    }

    /// The clear bytes; only code in `crypto` may see them.
    pub(crate) fn as_bytes(&self) -> &[u8] {
        match &self.0 {
            KeyBytes::K16(k) => k,
            KeyBytes::K24(k) => k,
            KeyBytes::K32(k) => k,
        }
    }

    fn as_bytes_mut(&mut self) -> &mut [u8] {
        match &mut self.0 {
            KeyBytes::K16(k) => k,
            KeyBytes::K24(k) => k,
            KeyBytes::K32(k) => k,
        }
    }

    pub(crate) fn key_bytes(&self) -> &KeyBytes {
        &self.0
    }
}

fn copy_array<const N: usize>(bytes: &[u8]) -> Option<[u8; N]> {
    let mut out = [0u8; N];
    if bytes.len() != N {
        return None;
    }
    out.copy_from_slice(bytes);
    Some(out)
}

impl fmt::Debug for ClearKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClearKey({:?}, <redacted>)", self.size())
    }
}

impl ConstantTimeEq for ClearKey {
    fn ct_eq(&self, other: &Self) -> Choice {
        // Lengths are not secret; contents are compared without early exit.
        let (a, b) = (self.as_bytes(), other.as_bytes());
        if a.len() != b.len() {
            return Choice::from(0);
        }
        a.ct_eq(b)
    }
}

impl PartialEq for ClearKey {
    fn eq(&self, other: &Self) -> bool {
        self.ct_eq(other).into()
    }
}

impl Eq for ClearKey {}

/// Decodes hex into zeroizing storage. Returns no detail on failure on purpose: the detail would
/// quote part of a secret.
fn decode_secret_hex(text: &str) -> Option<Zeroizing<Vec<u8>>> {
    let text = text.trim().as_bytes();
    if !text.len().is_multiple_of(2) {
        return None;
    }
    let mut out = Zeroizing::new(Vec::with_capacity(text.len() / 2));
    for pair in text.chunks_exact(2) {
        let hi = hex_nibble(pair[0])?;
        let lo = hex_nibble(pair[1])?;
        out.push(hi << 4 | lo);
    }
    Some(out)
}

fn hex_nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Reads a Secret file holding a hex key; trailing newlines (as `kubectl create secret` and
/// editors leave them) are ignored. Errors name the file and the expected form, never the content.
fn read_hex_key_file(
    path: &Path,
    what: &'static str,
    expected: &'static str,
    size_ok: impl Fn(AesKeySize) -> bool,
) -> Result<ClearKey, KeyError> {
    let text = Zeroizing::new(std::fs::read(path).map_err(|source| KeyError::ReadFile {
        what,
        path: path.to_path_buf(),
        source,
    })?);
    std::str::from_utf8(&text)
        .ok()
        .and_then(decode_secret_hex)
        .and_then(|b| ClearKey::new_checked(&b))
        .filter(|k| size_ok(k.size()))
        .ok_or_else(|| KeyError::FileContents {
            what,
            path: path.to_path_buf(),
            expected,
        })
}

const LMK_HEX: &str = "64 hex characters (32 bytes)";
const KEK_HEX: &str = "32 or 64 hex characters (16 or 32 bytes)";

/// The local master key: AES-256, the root of every key the switch stores (SPEC §4).
///
/// It is never used directly: [`Lmk`] yields separate derived keys for key wrapping, PIN
/// verification values and PAN tokens, so no two purposes share a key.
#[derive(PartialEq, Eq)]
pub struct Lmk(ClearKey);

impl Lmk {
    /// Reads the LMK from a Secret file (64 hex characters).
    pub fn from_hex_file(path: impl AsRef<Path>) -> Result<Self, KeyError> {
        read_hex_key_file(path.as_ref(), "LMK", LMK_HEX, |s| s == AesKeySize::Aes256).map(Lmk)
    }

    /// Parses the LMK from 64 hex characters.
    pub fn from_hex(text: &str) -> Result<Self, KeyError> {
        match ClearKey::from_hex(text) {
            Ok(k) if k.size() == AesKeySize::Aes256 => Ok(Lmk(k)),
            _ => Err(KeyError::Hex {
                what: "LMK",
                expected: LMK_HEX,
            }),
        }
    }

    /// Wraps a 32-byte key as the LMK.
    pub fn from_key(key: ClearKey) -> Result<Self, KeyError> {
        if key.size() == AesKeySize::Aes256 {
            Ok(Lmk(key))
        } else {
            Err(KeyError::Length {
                what: "LMK",
                expected: "32 bytes",
                got: key.size().bytes(),
            })
        }
    }

    /// A fresh random LMK (tests, the local demo).
    pub fn generate<R: CryptoRng + ?Sized>(rng: &mut R) -> Self {
        Lmk(ClearKey::generate(AesKeySize::Aes256, rng))
    }

    /// Derives the working keys (SP 800-108 counter mode, AES-CMAC PRF, one label per purpose).
    pub(crate) fn derive(&self) -> LmkDerivedKeys {
        let prf = CmacKey::new(&self.0);
        let derive = |label: &[u8]| {
            ClearKey::filled_with(AesKeySize::Aes256, |out| {
                kdf_counter(&prf, label, b"switchyard-lmk-v1", out)
            })
        };
        LmkDerivedKeys {
            kbpk: derive(LABEL_KBPK),
            pvk: derive(LABEL_PVK),
            pan_key: derive(LABEL_PAN),
            data_key: derive(LABEL_DATA),
            idempotency_key: derive(LABEL_IDEMPOTENCY),
        }
    }
}

const LABEL_KBPK: &[u8] = b"key-block protection key";
const LABEL_PVK: &[u8] = b"PIN verification key";
const LABEL_PAN: &[u8] = b"PAN token key";
const LABEL_DATA: &[u8] = b"card data at rest key";
const LABEL_IDEMPOTENCY: &[u8] = b"idempotency record key";

impl fmt::Debug for Lmk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Lmk(<redacted>)")
    }
}

/// The working keys derived from the LMK.
pub(crate) struct LmkDerivedKeys {
    /// TR-31 key-block protection key for keys at rest.
    pub(crate) kbpk: ClearKey,
    /// PIN verification key (see `pvv`).
    pub(crate) pvk: ClearKey,
    /// Key of the PAN token keyed hash.
    pub(crate) pan_key: ClearKey,
    /// AES-SIV key (two AES-128 halves) for card data kept at rest.
    pub(crate) data_key: ClearKey,
    /// CMAC key of what the admin API keeps to recognise an `Idempotency-Key` retry.
    pub(crate) idempotency_key: ClearKey,
}

/// The key-exchange key under which TMKs arrive as TR-31 blocks (SPEC §4, `POST /v1/terminals`).
/// AES-128 or AES-256.
#[derive(PartialEq, Eq)]
pub struct Kek(ClearKey);

impl Kek {
    /// Reads the KEK from a Secret file (32 or 64 hex characters).
    pub fn from_hex_file(path: impl AsRef<Path>) -> Result<Self, KeyError> {
        read_hex_key_file(path.as_ref(), "KEK", KEK_HEX, kek_size_ok).map(Kek)
    }

    /// Parses the KEK from 32 or 64 hex characters.
    pub fn from_hex(text: &str) -> Result<Self, KeyError> {
        match ClearKey::from_hex(text) {
            Ok(k) if kek_size_ok(k.size()) => Ok(Kek(k)),
            _ => Err(KeyError::Hex {
                what: "KEK",
                expected: KEK_HEX,
            }),
        }
    }

    /// Wraps a 16- or 32-byte key as the KEK.
    pub fn from_key(key: ClearKey) -> Result<Self, KeyError> {
        if kek_size_ok(key.size()) {
            Ok(Kek(key))
        } else {
            Err(KeyError::Length {
                what: "KEK",
                expected: "16 or 32 bytes",
                got: key.size().bytes(),
            })
        }
    }

    pub(crate) fn key(&self) -> &ClearKey {
        &self.0
    }
}

fn kek_size_ok(size: AesKeySize) -> bool {
    matches!(size, AesKeySize::Aes128 | AesKeySize::Aes256)
}

impl fmt::Debug for Kek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Kek({:?}, <redacted>)", self.0.size())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const LMK_HEX_VALUE: &str = "00112233445566778899AABBCCDDEEFF0123456789ABCDEFFEDCBA9876543210";

    fn write_file(contents: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(contents.as_bytes()).unwrap();
        f
    }

    #[test]
    fn lmk_loads_from_file_with_trailing_newline() {
        let f = write_file(&format!("{LMK_HEX_VALUE}\n"));
        let lmk = Lmk::from_hex_file(f.path()).unwrap();
        assert_eq!(lmk, Lmk::from_hex(&LMK_HEX_VALUE.to_lowercase()).unwrap());
    }

    #[test]
    fn bad_lmk_file_error_says_what_is_expected_and_never_echoes_contents() {
        // A 32-byte-looking secret with one bad character, and a KEK-sized key as an LMK.
        for contents in [
            "00112233445566778899AABBCCDDEEFF0123456789ABCDEFFEDCBA987654321Z",
            "00112233445566778899AABBCCDDEEFF",
            "SECRETSECRET",
        ] {
            let f = write_file(contents);
            let err = Lmk::from_hex_file(f.path()).unwrap_err();
            let msg = err.to_string();
            assert!(msg.starts_with("failed to read LMK file "), "{msg}");
            assert!(
                msg.ends_with("expected 64 hex characters (32 bytes)"),
                "{msg}"
            );
            assert!(msg.contains(&f.path().display().to_string()));
            assert!(!msg.contains("SECRET") && !msg.contains("321Z") && !msg.contains("AABB"));
            assert!(!format!("{err:?}").contains("AABB"));
        }
    }

    #[test]
    fn missing_lmk_file_names_the_path() {
        let err = Lmk::from_hex_file("/nonexistent/lmk.hex").unwrap_err();
        assert_eq!(
            err.to_string(),
            "failed to read LMK file /nonexistent/lmk.hex"
        );
        assert!(std::error::Error::source(&err).is_some());
    }

    #[test]
    fn kek_accepts_16_or_32_bytes_only() {
        assert!(Kek::from_hex("00112233445566778899AABBCCDDEEFF").is_ok());
        assert!(Kek::from_hex(LMK_HEX_VALUE).is_ok());
        let err = Kek::from_hex("00112233445566778899AABBCCDDEEFF0011223344556677").unwrap_err();
        assert_eq!(
            err.to_string(),
            "failed to parse KEK: expected 32 or 64 hex characters (16 or 32 bytes)"
        );
        let f = write_file("0011");
        let msg = Kek::from_hex_file(f.path()).unwrap_err().to_string();
        assert!(msg.starts_with("failed to read KEK file "), "{msg}");
    }

    #[test]
    fn debug_output_is_redacted() {
        let key = ClearKey::from_hex("00112233445566778899AABBCCDDEEFF").unwrap();
        assert_eq!(format!("{key:?}"), "ClearKey(Aes128, <redacted>)");
        let lmk = Lmk::from_hex(LMK_HEX_VALUE).unwrap();
        assert_eq!(format!("{lmk:?}"), "Lmk(<redacted>)");
        let kek = Kek::from_hex("00112233445566778899AABBCCDDEEFF").unwrap();
        assert_eq!(format!("{kek:?}"), "Kek(Aes128, <redacted>)");
    }

    #[test]
    fn clear_key_refuses_non_aes_lengths() {
        assert!(ClearKey::new(&[0u8; 15]).is_err());
        assert!(ClearKey::new(&[0u8; 8]).is_err());
        for n in [16, 24, 32] {
            assert_eq!(ClearKey::new(&vec![7u8; n]).unwrap().size().bytes(), n);
        }
        assert!(ClearKey::from_hex("zz112233445566778899AABBCCDDEEFF").is_err());
    }

    #[test]
    fn generated_keys_differ_and_have_the_asked_size() {
        let mut rng = rand::rng();
        let a = ClearKey::generate(AesKeySize::Aes128, &mut rng);
        let b = ClearKey::generate(AesKeySize::Aes128, &mut rng);
        assert_eq!(a.size(), AesKeySize::Aes128);
        assert_ne!(a, b);
        assert_eq!(
            ClearKey::generate(AesKeySize::Aes256, &mut rng).size(),
            AesKeySize::Aes256
        );
    }

    #[test]
    fn key_type_is_serialized_as_the_api_shows_it() {
        assert_eq!(serde_json::to_string(&KeyType::Tpk).unwrap(), "\"TPK\"");
        let kt: KeyType = serde_json::from_str("\"TAK\"").unwrap();
        assert_eq!(kt, KeyType::Tak);
        assert_eq!(KeyType::Tmk.to_string(), "TMK");
        assert_eq!("tpk".parse::<KeyType>().unwrap(), KeyType::Tpk);
    }

    #[test]
    fn lmk_derived_keys_are_distinct_and_stable() {
        let lmk = Lmk::from_hex(LMK_HEX_VALUE).unwrap();
        let (d1, d2) = (lmk.derive(), lmk.derive());
        assert_eq!(d1.kbpk, d2.kbpk);
        assert_eq!(d1.pvk, d2.pvk);
        assert_ne!(d1.kbpk, d1.pvk);
        assert_ne!(d1.pvk, d1.pan_key);
        assert_ne!(d1.kbpk, d1.pan_key);
        assert_ne!(d1.kbpk, lmk.0);
        let other = Lmk::from_hex(&LMK_HEX_VALUE.replace('0', "1")).unwrap();
        assert_ne!(other.derive().kbpk, d1.kbpk);
    }
}
