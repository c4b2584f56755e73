//! AES-CMAC (NIST SP 800-38B) over 128/192/256-bit keys, the 8-byte ISO 8583 MAC (SPEC §3), the
//! SP 800-108 counter-mode KDF with CMAC as PRF (used by TR-31 and for LMK-derived keys), and the
//! profile v2 network-management key K_NM derived from a terminal's TMK.

use aes::{Aes128, Aes192, Aes256};
use cmac::{Cmac, KeyInit, Mac};

use super::keys::{AesKeySize, ClearKey, KeyBytes};

/// A CMAC key with its cipher schedule and subkeys computed once. Cloning it is much cheaper than
/// expanding the key again, so long-lived keys (the LMK-derived ones) keep one of these.
#[derive(Clone)]
pub(crate) enum CmacKey {
    A128(Cmac<Aes128>),
    A192(Cmac<Aes192>),
    A256(Cmac<Aes256>),
}

impl CmacKey {
    pub(crate) fn new(key: &ClearKey) -> Self {
        match key.key_bytes() {
            KeyBytes::K16(k) => CmacKey::A128(Cmac::new(k.into())),
            KeyBytes::K24(k) => CmacKey::A192(Cmac::new(k.into())),
            KeyBytes::K32(k) => CmacKey::A256(Cmac::new(k.into())),
        }
    }

    /// Full 16-byte CMAC over the concatenation of `parts` (no copy of the message is made).
    pub(crate) fn compute(&self, parts: &[&[u8]]) -> [u8; 16] {
        fn run<M: Mac + Clone>(m: &M, parts: &[&[u8]]) -> [u8; 16] {
            let mut m = m.clone();
            for part in parts {
                m.update(part);
            }
            let mut out = [0u8; 16];
            out.copy_from_slice(&m.finalize().into_bytes()[..16]);
            out
        }
        match self {
            CmacKey::A128(m) => run(m, parts),
            CmacKey::A192(m) => run(m, parts),
            CmacKey::A256(m) => run(m, parts),
        }
    }
}

/// AES-CMAC of `data` under `key` (all 16 bytes).
pub fn aes_cmac(key: &ClearKey, data: &[u8]) -> [u8; 16] {
    CmacKey::new(key).compute(&[data])
}

/// The ISO 8583 MAC of the Switchyard profile: leftmost 8 bytes of AES-CMAC (SPEC §3).
pub fn mac8(key: &ClearKey, data: &[u8]) -> [u8; 8] {
    leftmost8(&aes_cmac(key, data))
}

pub(crate) fn leftmost8(full: &[u8; 16]) -> [u8; 8] {
    let mut out = [0u8; 8];
    out.copy_from_slice(&full[..8]);
    out
}

/// NIST SP 800-108 KDF in counter mode with AES-CMAC as PRF, laid out as TR-31 / X9.143 lays it
/// out: `counter (1 byte) || label || 0x00 || context || L (2 bytes, bits)`, repeated with the
/// counter from 1 until `out` is full.
///
/// TR-31 version D is exactly this with label = key usage indicator (`0000` encryption, `0001`
/// MAC) and context = algorithm indicator, so the one function serves both TR-31 and the keys we
/// derive from the LMK. `out` must be at most 255 blocks long; ours are 16 to 32 bytes.
pub(crate) fn kdf_counter(prf: &CmacKey, label: &[u8], context: &[u8], out: &mut [u8]) {
    // L is in bits; every caller asks for ≤ 32 bytes, so the u16 cannot overflow.
    let bits = u16::try_from(out.len() * 8)
        .unwrap_or(u16::MAX)
        .to_be_bytes();
    for (i, chunk) in out.chunks_mut(16).enumerate() {
        let counter = [u8::try_from(i + 1).unwrap_or(u8::MAX)];
        let mut block = prf.compute(&[&counter, label, &[0x00], context, &bits]);
        chunk.copy_from_slice(&block[..chunk.len()]);
        zeroize::Zeroize::zeroize(&mut block);
    }
}

/// Label of the network-management key derivation (SPEC §3, profile v2).
const NM_LABEL: &[u8] = b"SWITCHYARD-NM";

/// The terminal's network-management key K_NM (SPEC §3, profile v2): NIST SP 800-108r1 counter
/// mode, PRF AES-CMAC under the TMK, a 32-bit counter before the fixed data, fixed data = label
/// `SWITCHYARD-NM` ‖ 0x00 ‖ field 41 as sent (8 ASCII characters, space-padded) ‖ L = 128 as a
/// 32-bit big-endian integer. One CMAC block is the whole 128-bit key.
///
/// Written here rather than taken from a KDF crate because it is one CMAC call over a fixed
/// layout, and the layout (not a library's defaults) is the contract every terminal implements;
/// the interop suite checks it against `cryptography`'s independent `KBKDFCMAC`.
pub(crate) fn derive_nm_key(tmk: &ClearKey, field41: &str) -> CmacKey {
    const COUNTER: [u8; 4] = 1u32.to_be_bytes();
    const L_BITS: [u8; 4] = 128u32.to_be_bytes();
    let mut block =
        CmacKey::new(tmk).compute(&[&COUNTER, NM_LABEL, &[0x00], field41.as_bytes(), &L_BITS]);
    let key = ClearKey::filled_with(AesKeySize::Aes128, |out| out.copy_from_slice(&block));
    zeroize::Zeroize::zeroize(&mut block);
    CmacKey::new(&key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    const RFC4493_MSG: &str = "6bc1bee22e409f96e93d7e117393172aae2d8a571e03ac9c9eb76fac45af8e51\
                               30c81c46a35ce411e5fbc1191a0a52eff69f2445df4f9b17ad2b417be66c3710";

    // RFC 4493 section 4 (AES-128) and NIST SP 800-38B D.2/D.3 (AES-192, AES-256).
    #[rstest]
    #[case::aes128_empty(
        "2b7e151628aed2a6abf7158809cf4f3c",
        0,
        "bb1d6929e95937287fa37d129b756746"
    )]
    #[case::aes128_16(
        "2b7e151628aed2a6abf7158809cf4f3c",
        16,
        "070a16b46b4d4144f79bdd9dd04a287c"
    )]
    #[case::aes128_40(
        "2b7e151628aed2a6abf7158809cf4f3c",
        40,
        "dfa66747de9ae63030ca32611497c827"
    )]
    #[case::aes128_64(
        "2b7e151628aed2a6abf7158809cf4f3c",
        64,
        "51f0bebf7e3b9d92fc49741779363cfe"
    )]
    #[case::aes192_empty(
        "8e73b0f7da0e6452c810f32b809079e562f8ead2522c6b7b",
        0,
        "d17ddf46adaacde531cac483de7a9367"
    )]
    #[case::aes192_40(
        "8e73b0f7da0e6452c810f32b809079e562f8ead2522c6b7b",
        40,
        "8a1de5be2eb31aad089a82e6ee908b0e"
    )]
    #[case::aes256_empty(
        "603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4",
        0,
        "028962f61b7bf89efc6b551f4667d983"
    )]
    #[case::aes256_64(
        "603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4",
        64,
        "e1992190549f6ed5696a2c056c315410"
    )]
    fn aes_cmac_matches_published_vectors(
        #[case] key: &str,
        #[case] len: usize,
        #[case] expected: &str,
    ) {
        let key = ClearKey::from_hex(key).unwrap();
        let msg = hex::decode(RFC4493_MSG).unwrap();
        assert_eq!(hex::encode(aes_cmac(&key, &msg[..len])), expected);
        assert_eq!(hex::encode(mac8(&key, &msg[..len])), &expected[..16]);
    }

    // Computed independently with Python `cryptography`'s KBKDFCMAC(AES, CounterMode, 16, 4, 4,
    // BeforeFixed, b"SWITCHYARD-NM", field41, None); then K_NM's CMAC of 16 zero bytes is
    // compared, which pins the derived key without exposing it.
    #[rstest]
    #[case::aes128_atm(
        "000102030405060708090a0b0c0d0e0f",
        "ATM00001",
        "65eda002c52d61ca5312e71572ebf56e"
    )]
    #[case::aes128_padded_station(
        "000102030405060708090a0b0c0d0e0f",
        "ACQ001  ",
        "a2e5055c0f3be9795c5a556d3cc231c5"
    )]
    #[case::aes256_atm(
        "603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4",
        "ATM00001",
        "10e1558d83cfe2911a63d9f135be551e"
    )]
    fn nm_key_matches_an_independent_sp800_108_implementation(
        #[case] tmk: &str,
        #[case] field41: &str,
        #[case] expected_key: &str,
    ) {
        let tmk = ClearKey::from_hex(tmk).unwrap();
        let derived = derive_nm_key(&tmk, field41);
        let expected = CmacKey::new(&ClearKey::from_hex(expected_key).unwrap());
        assert_eq!(
            derived.compute(&[&[0u8; 16]]),
            expected.compute(&[&[0u8; 16]])
        );
    }

    #[test]
    fn parts_are_concatenated() {
        let key = ClearKey::from_hex("2b7e151628aed2a6abf7158809cf4f3c").unwrap();
        let msg = hex::decode(RFC4493_MSG).unwrap();
        let k = CmacKey::new(&key);
        assert_eq!(
            k.compute(&[&msg[..7], &msg[7..40]]),
            aes_cmac(&key, &msg[..40])
        );
    }

    #[test]
    fn one_changed_bit_changes_the_mac() {
        let key = ClearKey::from_hex("2b7e151628aed2a6abf7158809cf4f3c").unwrap();
        let mut msg = b"0200 withdrawal 000000010000".to_vec();
        let before = mac8(&key, &msg);
        msg[20] ^= 0x01;
        assert_ne!(mac8(&key, &msg), before);
    }
}
