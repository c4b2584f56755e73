//! The KeyRotation controller: schedule computation and the pure "what to do next" planner, and
//! the reconcile shell that performs the planned action against the switch admin API.
//!
//! `schedule` and `plan` hold no I/O, so every decision is unit-tested with explicit times;
//! `controller` reads, calls the switch, writes status and requeues at the next transition.

pub mod controller;
pub mod plan;
pub mod schedule;
