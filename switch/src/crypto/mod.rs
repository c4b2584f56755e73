//! Payment cryptography and the software HSM (SPEC §3 MAC/KCV/PIN block, §4 keys and HSM boundary).
//!
//! Everything here is pure and CPU-only. Clear keys and PINs live in zeroizing types with redacted
//! `Debug`; outside this module the switch handles only wrapped keys, KCVs, PIN blocks and MACs.

mod block;
pub mod cmac;
pub mod hsm;
pub mod kcv;
pub mod keys;
pub mod pinblock;
pub mod pvv;
pub mod terminal;
#[cfg(test)]
mod test_support;
pub mod tr31;

pub use hsm::{Hsm, HsmError, PinCheck, SoftHsm};
pub use kcv::KeyCheckValue;
pub use keys::{AesKeySize, ClearKey, Kek, KeyError, KeyType, Lmk, WrappedKey};
pub use pinblock::{ClearPin, PinBlockError};
pub use pvv::Pvv;
pub use terminal::{TerminalError, TerminalKeys};
pub use tr31::{KeyBlockHeader, Tr31Error};
