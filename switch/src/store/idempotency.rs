//! Admin `Idempotency-Key` claims that commit or roll back with the write they guard.
//!
//! Every admin write is audited by the store in the write's own transaction (SPEC §5), so the
//! audit insert is the one statement every such transaction runs. An admin handler runs its
//! write inside [`with_claim`]; while it does, each audit insert of either backend first
//! inserts the claim in the same transaction (`claim_in` in `scripts/common.rs`).
//! So:
//!
//! - the claim commits exactly when the write commits, and a write that fails leaves no claim;
//! - of two concurrent attempts of one request, the second's claim insert finds the first's
//!   row (PostgreSQL makes it wait for the first transaction to end; SQLite serializes writers),
//!   fails with [`StoreError::IdempotencyClaimed`], and its whole transaction rolls back;
//! - a handler that makes several audited writes claims once: its later transactions find the
//!   claim of its own attempt (same `claim_id`) and go on.
//!
//! The claim is carried in a task-local so the store methods the handlers share with the
//! rest of the switch keep their signatures; work spawned onto other tasks (key pushes, the
//! activation loop) never carries it.
//!
//! [`StoreError::IdempotencyClaimed`]: super::StoreError::IdempotencyClaimed

use std::future::Future;

use super::IdempotencyClaim;

tokio::task_local! {
    static CLAIM: IdempotencyClaim;
}

/// Runs `write` so that the first audited store write it makes also claims `claim`, in that
/// write's transaction.
pub async fn with_claim<F: Future>(claim: IdempotencyClaim, write: F) -> F::Output {
    CLAIM.scope(claim, write).await
}

/// The claim of the admin write running on this task, if any.
pub(crate) fn current_claim() -> Option<IdempotencyClaim> {
    CLAIM.try_with(Clone::clone).ok()
}

/// Runs `f` on this thread with `claim` as the current claim: how an engine that runs scripts
/// on its own thread (SQLite's writer) carries the claim of the task that queued the script.
pub(crate) fn in_claim_scope<R>(claim: Option<IdempotencyClaim>, f: impl FnOnce() -> R) -> R {
    match claim {
        Some(claim) => CLAIM.sync_scope(claim, f),
        None => f(),
    }
}

/// How long a claimed key may wait for its answer before a retry is told the first attempt
/// is presumed lost (applied, but its answer never recorded) rather than "in progress".
pub const CLAIM_STALE_AFTER: std::time::Duration = std::time::Duration::from_secs(300);
