//! KeyRotation controller core: schedule computation and the pure "what to do next" planner.
//!
//! The reconcile loop, the switch admin API client and the controller wiring build on these; they
//! hold no I/O so every decision is unit-tested with explicit times.

pub mod plan;
pub mod schedule;
