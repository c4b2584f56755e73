//! Errors of the store, phrased for the caller that has to decide between `96`/503 and a 4xx.

use crate::domain::KeyState;

pub use super::sql::Violation;

/// An engine's own error, kept as the source of a [`StoreError`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a store operation failed.
///
/// Messages never carry secrets, key material or database URLs; the `#[source]` of
/// [`StoreError::Unavailable`] and [`StoreError::Database`] is the driver error, which names the
/// failing statement's problem but not the connection string.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The thing the operation needs does not exist.
    #[error("failed to find {what}")]
    NotFound {
        /// What was looked for, e.g. "terminal ATM00001".
        what: String,
    },
    /// The thing to create already exists (or a uniqueness rule would be broken).
    #[error("failed to create {what}: it already exists")]
    Conflict {
        /// What collided, e.g. "terminal ATM00001".
        what: String,
    },
    /// A key lifecycle transition that SPEC §4 does not allow from the key's current state.
    #[error("failed to move key from {from} to {to}: transition not allowed")]
    InvalidTransition {
        /// The state the key is in now.
        from: KeyState,
        /// The state that was asked for.
        to: &'static str,
    },
    /// The input was refused before it reached the database.
    #[error("failed to accept {what}")]
    Invalid {
        /// What is wrong, naming the field.
        what: String,
    },
    /// A SAF drainer tried to settle an advice it no longer holds: its lease ended and another
    /// drainer took it, or an operator settled it. Drop the message; its new owner delivers it.
    #[error("failed to settle {what}; list the SAF queue to see who holds it")]
    LeaseLost {
        /// The advice and who holds it now, e.g. "advice 7: it is leased by drainer-2".
        what: String,
    },
    /// An operator action on an advice that its current status does not allow.
    #[error("failed to {what}")]
    AdviceState {
        /// The action and why it cannot happen, e.g. "retry advice 7: it is delivered".
        what: String,
    },
    /// A station's advice would take its force-posts above a ceiling (`[stations]`): refused,
    /// nothing journaled. The issuer answers `61`.
    #[error("failed to force-post {what}")]
    OverCeiling {
        /// Which ceiling and by how much, e.g. "advice of 600000: above the per-advice ceiling
        /// 500000 of station ACQ001". No card data.
        what: String,
    },
    /// Another attempt of the same admin request (same `Idempotency-Key`) claimed the key first;
    /// this attempt's transaction was rolled back and changed nothing.
    #[error("failed to claim the Idempotency-Key: another attempt of this request claimed it")]
    IdempotencyClaimed,
    /// The database URL or options could not be used (the URL itself is never repeated here).
    #[error("failed to configure the database connection: {what}")]
    Config {
        /// What is wrong with the configuration.
        what: String,
    },
    /// The database cannot be reached (connection, pool timeout, I/O): answer `96`/503 and let
    /// readiness go false.
    #[error("failed to reach the database")]
    Unavailable(#[source] BoxError),
    /// Applying or reading migrations failed.
    #[error("failed to apply database migrations")]
    Migration(#[source] sqlx::migrate::MigrateError),
    /// A statement failed for a reason other than availability (a bug or a schema drift).
    #[error("failed to run a database statement")]
    Database {
        /// The constraint the statement broke, when that is why it failed.
        violation: Option<Violation>,
        #[source]
        source: BoxError,
    },
    /// A guarded posting found that what it was decided on changed since it was read (another
    /// request moved the balance, counted a PIN try, claimed the request identity…): nothing was
    /// written; read again and decide again.
    #[error("failed to post: the data it was decided on changed meanwhile")]
    Stale,
    /// A row holds a value the code cannot represent: the data was changed behind our back.
    #[error("failed to read {what}: stored value is corrupt")]
    Corrupt {
        /// Which column or value is bad.
        what: String,
    },
}

impl StoreError {
    /// True when the database could not be reached: the caller answers `96` / HTTP 503 and the
    /// readiness probe should report the store as down.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }

    pub(crate) fn not_found(what: impl Into<String>) -> Self {
        StoreError::NotFound { what: what.into() }
    }

    pub(crate) fn conflict(what: impl Into<String>) -> Self {
        StoreError::Conflict { what: what.into() }
    }

    pub(crate) fn invalid(what: impl Into<String>) -> Self {
        StoreError::Invalid { what: what.into() }
    }

    /// Which constraint a failed statement broke, if that is why it failed.
    pub fn violation(&self) -> Option<Violation> {
        match self {
            StoreError::Database { violation, .. } => *violation,
            _ => None,
        }
    }

    pub(crate) fn corrupt(what: impl Into<String>) -> Self {
        StoreError::Corrupt { what: what.into() }
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(err: sqlx::Error) -> Self {
        use sqlx::Error as E;
        match err {
            E::Io(_)
            | E::Tls(_)
            | E::PoolTimedOut
            | E::PoolClosed
            | E::WorkerCrashed
            | E::Protocol(_)
            | E::BeginFailed => StoreError::Unavailable(Box::new(err)),
            E::Database(ref db) if is_unavailable_code(db.code().as_deref()) => {
                StoreError::Unavailable(Box::new(err))
            }
            // raised by `switchyard_require` (the `guarded_posts` migration)
            E::Database(ref db) if db.code().as_deref() == Some("SYSTL") => StoreError::Stale,
            E::Migrate(inner) => StoreError::Migration(*inner),
            E::Database(ref db) => {
                let violation = if db.is_foreign_key_violation() {
                    Some(Violation::ForeignKey)
                } else if db.is_unique_violation() {
                    Some(Violation::Unique)
                } else {
                    None
                };
                StoreError::Database {
                    violation,
                    source: Box::new(err),
                }
            }
            other => StoreError::Database {
                violation: None,
                source: Box::new(other),
            },
        }
    }
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(err: sqlx::migrate::MigrateError) -> Self {
        StoreError::Migration(err)
    }
}

/// Database error codes that mean "the server is going away, overloaded or refusing us", not
/// "your statement is wrong": PostgreSQL class 08 (connection exception), class 28 (bad
/// credentials) and 3D000 (no such database) — both fixed by configuration, not by the caller —
/// 57P01..57P03 (admin shutdown, crash
/// shutdown, cannot connect now), 53300 (too many connections), 40001/40P01 (serialization
/// failure, deadlock: retryable); SQLite 5/6 (busy/locked after the
/// busy timeout).
fn is_unavailable_code(code: Option<&str>) -> bool {
    match code {
        Some(c) => {
            c.starts_with("08")
                || c.starts_with("28")
                || c == "3D000"
                || matches!(
                    c,
                    "57P01"
                        | "57P02"
                        | "57P03"
                        | "53300"
                        | "40001"
                        | "40P01"
                        | "5"
                        | "6"
                        | "261"
                        | "517"
                )
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_timeout_is_unavailable_and_says_what_failed() {
        let err = StoreError::from(sqlx::Error::PoolTimedOut);
        assert!(err.is_unavailable());
        assert_eq!(err.to_string(), "failed to reach the database");
    }

    #[test]
    fn row_not_found_is_not_unavailable() {
        let err = StoreError::from(sqlx::Error::RowNotFound);
        assert!(!err.is_unavailable());
        assert!(matches!(err, StoreError::Database { .. }));
    }

    #[test]
    fn invalid_transition_names_both_states() {
        let err = StoreError::InvalidTransition {
            from: KeyState::Revoked,
            to: "ACTIVE",
        };
        assert_eq!(
            err.to_string(),
            "failed to move key from REVOKED to ACTIVE: transition not allowed"
        );
    }
}
