//! Switchyard switch: the ISO 8583 data plane (ATM channel, authorization, keys, routing, SAF).
#![forbid(unsafe_code)]

pub mod crypto;
pub mod domain;
