//! Switchyard switch: the ISO 8583 data plane.
#![forbid(unsafe_code)]
