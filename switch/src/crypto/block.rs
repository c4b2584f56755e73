//! AES block cipher over the three key sizes, plus the CBC mode TR-31 needs.
//!
//! CBC is written here rather than pulled from the `cbc` crate: TR-31 version D uses it without
//! padding and with the key block MAC as IV, which is a dozen lines over the block cipher and keeps
//! one less crate in the key-handling path.

use aes::cipher::{BlockCipherDecrypt, BlockCipherEncrypt, KeyInit};
use aes::{Aes128, Aes192, Aes256, Block};

use super::keys::{ClearKey, KeyBytes};

/// AES block size in bytes.
pub(crate) const BLOCK: usize = 16;

/// An expanded AES key of any of the three sizes. The `aes` crate wipes key schedules on drop
/// (feature `zeroize`).
#[derive(Clone)]
pub(crate) enum AesCipher {
    A128(Aes128),
    A192(Aes192),
    A256(Aes256),
}

impl AesCipher {
    /// Expands `key`. Infallible because `ClearKey` only holds 16, 24 or 32 bytes.
    pub(crate) fn new(key: &ClearKey) -> Self {
        match key.key_bytes() {
            KeyBytes::K16(k) => AesCipher::A128(Aes128::new(k.into())),
            KeyBytes::K24(k) => AesCipher::A192(Aes192::new(k.into())),
            KeyBytes::K32(k) => AesCipher::A256(Aes256::new(k.into())),
        }
    }

    pub(crate) fn encrypt_block(&self, block: &mut [u8; BLOCK]) {
        let b: &mut Block = block.into();
        match self {
            AesCipher::A128(c) => c.encrypt_block(b),
            AesCipher::A192(c) => c.encrypt_block(b),
            AesCipher::A256(c) => c.encrypt_block(b),
        }
    }

    pub(crate) fn decrypt_block(&self, block: &mut [u8; BLOCK]) {
        let b: &mut Block = block.into();
        match self {
            AesCipher::A128(c) => c.decrypt_block(b),
            AesCipher::A192(c) => c.decrypt_block(b),
            AesCipher::A256(c) => c.decrypt_block(b),
        }
    }

    /// CBC-encrypts `data` in place. `data.len()` must be a multiple of 16; callers build the
    /// buffer themselves, so a violation is a programming error, reported as `false`.
    pub(crate) fn cbc_encrypt(&self, iv: &[u8; BLOCK], data: &mut [u8]) -> bool {
        if !data.len().is_multiple_of(BLOCK) {
            return false;
        }
        let mut chain = *iv;
        for chunk in data.chunks_exact_mut(BLOCK) {
            let mut block = [0u8; BLOCK];
            for (out, (p, c)) in block.iter_mut().zip(chunk.iter().zip(chain.iter())) {
                *out = p ^ c;
            }
            self.encrypt_block(&mut block);
            chunk.copy_from_slice(&block);
            chain = block;
        }
        true
    }

    /// CBC-decrypts `data` in place; same length rule as [`AesCipher::cbc_encrypt`].
    pub(crate) fn cbc_decrypt(&self, iv: &[u8; BLOCK], data: &mut [u8]) -> bool {
        if !data.len().is_multiple_of(BLOCK) {
            return false;
        }
        let mut chain = *iv;
        for chunk in data.chunks_exact_mut(BLOCK) {
            let mut block = [0u8; BLOCK];
            block.copy_from_slice(chunk);
            let next_chain = block;
            self.decrypt_block(&mut block);
            for (out, (p, c)) in chunk.iter_mut().zip(block.iter().zip(chain.iter())) {
                *out = p ^ c;
            }
            chain = next_chain;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(hex_key: &str) -> ClearKey {
        ClearKey::from_hex(hex_key).unwrap()
    }

    fn unhex(s: &str) -> Vec<u8> {
        hex::decode(s).unwrap()
    }

    // NIST SP 800-38A F.2.1 / F.2.2 (CBC-AES128), first two blocks.
    #[test]
    fn cbc_aes128_matches_sp800_38a() {
        let c = AesCipher::new(&key("2b7e151628aed2a6abf7158809cf4f3c"));
        let iv: [u8; 16] = unhex("000102030405060708090a0b0c0d0e0f")
            .try_into()
            .unwrap();
        let plain = unhex("6bc1bee22e409f96e93d7e117393172aae2d8a571e03ac9c9eb76fac45af8e51");
        let mut data = plain.clone();
        assert!(c.cbc_encrypt(&iv, &mut data));
        assert_eq!(
            hex::encode(&data),
            "7649abac8119b246cee98e9b12e9197d5086cb9b507219ee95db113a917678b2"
        );
        assert!(c.cbc_decrypt(&iv, &mut data));
        assert_eq!(data, plain);
    }

    // NIST SP 800-38A F.2.5 (CBC-AES256), first block; FIPS 197 C.2 for AES-192 ECB.
    #[test]
    fn aes256_cbc_and_aes192_block_match_published_vectors() {
        let c = AesCipher::new(&key(
            "603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4",
        ));
        let iv: [u8; 16] = unhex("000102030405060708090a0b0c0d0e0f")
            .try_into()
            .unwrap();
        let mut data = unhex("6bc1bee22e409f96e93d7e117393172a");
        assert!(c.cbc_encrypt(&iv, &mut data));
        assert_eq!(hex::encode(&data), "f58c4c04d6e5f1ba779eabfb5f7bfbd6");

        let c = AesCipher::new(&key("000102030405060708090a0b0c0d0e0f1011121314151617"));
        let mut block: [u8; 16] = unhex("00112233445566778899aabbccddeeff")
            .try_into()
            .unwrap();
        c.encrypt_block(&mut block);
        assert_eq!(hex::encode(block), "dda97ca4864cdfe06eaf70a0ec0d7191");
        c.decrypt_block(&mut block);
        assert_eq!(hex::encode(block), "00112233445566778899aabbccddeeff");
    }

    #[test]
    fn cbc_refuses_partial_blocks() {
        let c = AesCipher::new(&key("2b7e151628aed2a6abf7158809cf4f3c"));
        let mut data = [0u8; 17];
        assert!(!c.cbc_encrypt(&[0; 16], &mut data));
        assert!(!c.cbc_decrypt(&[0; 16], &mut data));
    }
}
