//! Switchyard switch: the ISO 8583 data plane (ATM channel, authorization, keys, routing, SAF).
#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod atm;
pub mod backup;
pub mod crypto;
pub mod demo;
pub mod domain;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod health;
pub mod http;
pub mod iso8583;
pub mod maintenance;
pub mod metrics;
pub mod net;
pub mod routing;
pub mod settings;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod txn;
