-- Switchyard store, PostgreSQL flavour. Money is BIGINT minor units, never floating point.

CREATE TABLE terminals (
    id          TEXT PRIMARY KEY,
    grp         TEXT NOT NULL,
    kind        TEXT NOT NULL CHECK (kind IN ('atm', 'station')),
    created_at  TIMESTAMPTZ NOT NULL
);
CREATE INDEX terminals_grp ON terminals (grp, id);

CREATE TABLE key_rotations (
    id             TEXT PRIMARY KEY,
    key_type       TEXT NOT NULL CHECK (key_type IN ('TMK', 'TPK', 'TAK')),
    activation     TEXT NOT NULL CHECK (activation IN ('onConfirm', 'atTime')),
    activate_at    TIMESTAMPTZ,
    grace_seconds  BIGINT NOT NULL CHECK (grace_seconds >= 0),
    created_at     TIMESTAMPTZ NOT NULL,
    CHECK ((activation = 'atTime') = (activate_at IS NOT NULL))
);

CREATE TABLE keys (
    id             TEXT PRIMARY KEY,
    terminal_id    TEXT NOT NULL REFERENCES terminals (id),
    key_type       TEXT NOT NULL CHECK (key_type IN ('TMK', 'TPK', 'TAK')),
    version        INTEGER NOT NULL CHECK (version > 0),
    state          TEXT NOT NULL CHECK (state IN ('PENDING', 'ACTIVE', 'EXPIRED', 'REVOKED')),
    kcv            TEXT NOT NULL,
    wrapped        TEXT NOT NULL,
    rotation_id    TEXT REFERENCES key_rotations (id),
    grace_seconds  BIGINT NOT NULL CHECK (grace_seconds >= 0),
    created_at     TIMESTAMPTZ NOT NULL,
    activated_at   TIMESTAMPTZ,
    expired_at     TIMESTAMPTZ,
    grace_until    TIMESTAMPTZ,
    UNIQUE (terminal_id, key_type, version)
);
-- SPEC §4: at most one ACTIVE key per (terminal, type), enforced by the database itself.
CREATE UNIQUE INDEX keys_one_active ON keys (terminal_id, key_type) WHERE state = 'ACTIVE';
CREATE INDEX keys_rotation ON keys (rotation_id, state) WHERE rotation_id IS NOT NULL;

CREATE TABLE accounts (
    id                      TEXT PRIMARY KEY,
    currency                TEXT NOT NULL CHECK (length(currency) = 3),
    -- the last line of defence against an overdraft
    balance                 BIGINT NOT NULL CHECK (balance >= 0),
    daily_withdrawal_limit  BIGINT NOT NULL CHECK (daily_withdrawal_limit >= 0),
    created_at              TIMESTAMPTZ NOT NULL
);

-- Withdrawn total per account and UTC day, for the daily limit (response 61).
CREATE TABLE daily_withdrawals (
    account_id  TEXT NOT NULL REFERENCES accounts (id),
    day         TEXT NOT NULL,
    total       BIGINT NOT NULL CHECK (total >= 0),
    PRIMARY KEY (account_id, day)
);

CREATE TABLE cards (
    id          TEXT PRIMARY KEY,
    pan_token   TEXT NOT NULL UNIQUE,
    last4       TEXT NOT NULL,
    expiry      TEXT NOT NULL,
    account_id  TEXT NOT NULL REFERENCES accounts (id),
    pvv         TEXT NOT NULL,
    pin_tries   INTEGER NOT NULL DEFAULT 0 CHECK (pin_tries >= 0),
    upstream    TEXT,
    created_at  TIMESTAMPTZ NOT NULL
);
CREATE INDEX cards_account ON cards (account_id);

-- Financial journal: one row per request identity (terminal, STAN, transmission date-time).
CREATE TABLE journal (
    id                 TEXT PRIMARY KEY,
    terminal_id        TEXT NOT NULL,
    stan               TEXT NOT NULL,
    transmission       TEXT NOT NULL,
    digest             TEXT NOT NULL,
    mti                TEXT NOT NULL,
    kind               TEXT NOT NULL CHECK (kind IN ('balance', 'withdrawal', 'reversal')),
    amount             BIGINT,
    currency           TEXT NOT NULL,
    response_code      TEXT NOT NULL,
    rrn                TEXT NOT NULL,
    auth_code          TEXT,
    ledger_balance     BIGINT,
    available_balance  BIGINT,
    account_id         TEXT,
    card_id            TEXT,
    business_day       TEXT,
    original_id        TEXT REFERENCES journal (id),
    -- for a reversal: the identity it reverses (field 90), found or not yet
    orig_terminal_id   TEXT,
    orig_stan          TEXT,
    orig_transmission  TEXT,
    reversed           BOOLEAN NOT NULL DEFAULT FALSE,
    created_at         TIMESTAMPTZ NOT NULL,
    UNIQUE (terminal_id, stan, transmission)
);
CREATE INDEX journal_account ON journal (account_id, created_at);
-- a late original must find the reversal that arrived before it (no debit after a reversal)
CREATE INDEX journal_reversal_of ON journal (orig_terminal_id, orig_stan, orig_transmission)
    WHERE kind = 'reversal';

CREATE TABLE audit (
    id      BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at      TIMESTAMPTZ NOT NULL,
    actor   TEXT NOT NULL,
    action  TEXT NOT NULL,
    target  TEXT NOT NULL,
    result  TEXT NOT NULL,
    detail  JSONB NOT NULL
);
CREATE INDEX audit_at ON audit (at, id);

-- Admin API Idempotency-Key: the first response to a key, per caller.
CREATE TABLE idempotency (
    key           TEXT NOT NULL,
    actor         TEXT NOT NULL,
    request_hash  TEXT NOT NULL,
    status        INTEGER NOT NULL,
    body          TEXT NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (key, actor)
);
