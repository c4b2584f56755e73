-- The fleet-wide session registry (issue 16): which switch replica holds which terminal's
-- session, with a lease each replica renews. SQLite serves one replica, so the tables are the
-- same as on PostgreSQL and there is no cross-process notification (times are microseconds).
-- Expand-only: new tables older binaries never touch.
CREATE TABLE switch_replicas (
    replica_id   TEXT PRIMARY KEY,
    started_at   INTEGER NOT NULL,
    lease_until  INTEGER NOT NULL
);

CREATE TABLE terminal_sessions (
    replica_id    TEXT NOT NULL,
    conn_id       INTEGER NOT NULL,
    terminal_id   TEXT NOT NULL,
    kind          TEXT NOT NULL CHECK (kind IN ('atm', 'station')),
    remote        TEXT NOT NULL,
    signed_on_at  INTEGER NOT NULL,
    last_seen     INTEGER NOT NULL,
    PRIMARY KEY (replica_id, conn_id)
);
CREATE INDEX terminal_sessions_by_terminal ON terminal_sessions (terminal_id);

CREATE TABLE key_pushes (
    key_id       TEXT NOT NULL,
    replica_id   TEXT NOT NULL,
    conn_id      INTEGER NOT NULL,
    pushed_at    INTEGER NOT NULL,
    answer_by    INTEGER NOT NULL,
    answered_at  INTEGER,
    PRIMARY KEY (key_id, replica_id, conn_id)
);
CREATE INDEX key_pushes_by_session ON key_pushes (replica_id, conn_id);

CREATE TABLE rotation_pacing (
    rotation_id     TEXT PRIMARY KEY,
    max_concurrent  INTEGER NOT NULL CHECK (max_concurrent > 0)
);
