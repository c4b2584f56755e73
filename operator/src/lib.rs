//! Switchyard operator library: CRD types, the BankSwitch reconciler and the operator process.
#![forbid(unsafe_code)]

pub mod bank_switch;
pub mod crd;
pub mod http;
pub mod key_rotation;
pub mod metrics;
pub mod render;
pub mod telemetry;
