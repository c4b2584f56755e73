-- The fleet-wide session registry (issue 16): which switch replica holds which terminal's
-- session, with a lease each replica renews, so every replica answers the same about a terminal,
-- one ATM has one live session across the fleet, and key pushes reach the replica that holds the
-- terminal. Expand-only: new tables and triggers that older binaries never touch.

-- One row per running replica; its sessions count only while `lease_until` is in the future.
CREATE TABLE switch_replicas (
    replica_id   TEXT PRIMARY KEY,
    started_at   TIMESTAMPTZ NOT NULL,
    lease_until  TIMESTAMPTZ NOT NULL
);

-- One row per signed-on connection. An ATM has at most one (its sign-on removes the others in
-- the same transaction); a station has one per connection of its processes.
CREATE TABLE terminal_sessions (
    replica_id    TEXT NOT NULL,
    conn_id       BIGINT NOT NULL,
    terminal_id   TEXT NOT NULL,
    kind          TEXT NOT NULL CHECK (kind IN ('atm', 'station')),
    remote        TEXT NOT NULL,
    signed_on_at  TIMESTAMPTZ NOT NULL,
    last_seen     TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (replica_id, conn_id)
);
CREATE INDEX terminal_sessions_by_terminal ON terminal_sessions (terminal_id);

-- A key sent to one session: a key is pushed at most once per session, and a paced rotation
-- counts the pushes still awaiting their terminal's answer against `max_concurrent`.
CREATE TABLE key_pushes (
    key_id       TEXT NOT NULL,
    replica_id   TEXT NOT NULL,
    conn_id      BIGINT NOT NULL,
    pushed_at    TIMESTAMPTZ NOT NULL,
    answer_by    TIMESTAMPTZ NOT NULL,
    answered_at  TIMESTAMPTZ,
    PRIMARY KEY (key_id, replica_id, conn_id)
);
CREATE INDEX key_pushes_by_session ON key_pushes (replica_id, conn_id);

-- A fleet rotation's `maxConcurrent`, fleet-wide. Written before the rotation's keys, so no
-- replica ever pushes them unpaced; hence no foreign key.
CREATE TABLE rotation_pacing (
    rotation_id     TEXT PRIMARY KEY,
    max_concurrent  INTEGER NOT NULL CHECK (max_concurrent > 0)
);

-- Prompt delivery between replicas (LISTEN/NOTIFY). Notifications are hints: a replica that
-- receives one reads the registry before acting, and re-checks it periodically in case one was
-- missed. Payloads hold ids only, never key material.

-- A removed session: the replica holding that connection closes it (an ATM signed on elsewhere,
-- or an operator signed it off through another replica). Payload: replica, connection, terminal.
CREATE FUNCTION switchyard_session_removed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('switchyard_sessions', OLD.replica_id || ' ' || OLD.conn_id || ' ' || OLD.terminal_id);
    RETURN NULL;
END;
$$;
CREATE TRIGGER terminal_sessions_removed AFTER DELETE ON terminal_sessions
    FOR EACH ROW EXECUTE FUNCTION switchyard_session_removed();

-- Keys made or changed: every replica drops that terminal's cached keys ('*': all of them, for a
-- statement that touched many terminals) and looks for keys to push.
CREATE FUNCTION switchyard_keys_changed() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    terminals BIGINT;
    one TEXT;
BEGIN
    SELECT count(DISTINCT terminal_id), min(terminal_id) INTO terminals, one FROM changed_keys;
    IF terminals = 1 THEN
        PERFORM pg_notify('switchyard_keys', one);
    ELSIF terminals > 1 THEN
        PERFORM pg_notify('switchyard_keys', '*');
    END IF;
    RETURN NULL;
END;
$$;
CREATE TRIGGER keys_inserted AFTER INSERT ON keys REFERENCING NEW TABLE AS changed_keys
    FOR EACH STATEMENT EXECUTE FUNCTION switchyard_keys_changed();
CREATE TRIGGER keys_updated AFTER UPDATE ON keys REFERENCING NEW TABLE AS changed_keys
    FOR EACH STATEMENT EXECUTE FUNCTION switchyard_keys_changed();

-- A push answered: a paced rotation has a free slot, so replicas look for keys to push.
CREATE FUNCTION switchyard_push_answered() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('switchyard_pushes', '');
    RETURN NULL;
END;
$$;
CREATE TRIGGER key_pushes_answered AFTER UPDATE ON key_pushes
    FOR EACH STATEMENT EXECUTE FUNCTION switchyard_push_answered();
