//! Routing to upstream issuer hosts and the resilience around it (SPEC §6): the per-upstream
//! circuit breaker and the link reconnect schedule.

pub mod backoff;
pub mod breaker;
