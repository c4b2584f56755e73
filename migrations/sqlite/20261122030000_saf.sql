-- Store-and-forward queue (SPEC §6). Expand-only: a new table, nothing existing changes.
-- Timestamps are INTEGER microseconds since the Unix epoch (UTC), as in the initial migration.

CREATE TABLE saf_messages (
    id                   INTEGER PRIMARY KEY AUTOINCREMENT,
    destination          TEXT NOT NULL,
    priority             INTEGER NOT NULL CHECK (priority BETWEEN 0 AND 255),
    mti                  TEXT NOT NULL CHECK (mti IN ('0220', '0420')),
    -- no advice is queued twice; the receiving switch dedups on the same identity
    idempotency_key      TEXT NOT NULL UNIQUE,
    -- ISO 8583 fields as a JSON object, re-packed (MTI, MAC) at each attempt
    payload              TEXT NOT NULL,
    reference            TEXT,
    status               TEXT NOT NULL DEFAULT 'queued'
                         CHECK (status IN ('queued', 'delivered', 'dead', 'cancelled')),
    -- every attempt ever made (0221/0421 from the second on)
    attempts             INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    -- attempts already made when an operator last requeued it; the budget counts from here
    attempts_at_requeue  INTEGER NOT NULL DEFAULT 0 CHECK (attempts_at_requeue >= 0),
    next_attempt_at      INTEGER NOT NULL,
    lease_holder         TEXT,
    lease_until          INTEGER,
    last_error           TEXT,
    created_at           INTEGER NOT NULL,
    settled_at           INTEGER,
    CHECK ((lease_holder IS NULL) = (lease_until IS NULL))
);
-- what drainers scan: queued advices in delivery order
CREATE INDEX saf_messages_ready ON saf_messages (priority, created_at, id) WHERE status = 'queued';
CREATE INDEX saf_messages_destination ON saf_messages (destination, priority, created_at, id)
    WHERE status = 'queued';
CREATE INDEX saf_messages_status ON saf_messages (status, id);
