//! Switchyard operator library: CRD types, the BankSwitch and KeyRotation reconcilers,
//! the switch admin API client and the operator process.
#![forbid(unsafe_code)]

pub mod alerts;
pub mod bank_switch;
pub mod crd;
pub mod events;
pub mod http;
pub mod key_rotation;
pub mod metrics;
pub mod render;
pub mod switch_admin;
pub mod telemetry;
