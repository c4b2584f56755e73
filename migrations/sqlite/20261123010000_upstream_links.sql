-- Upstream links and advices (SPEC §6). Expand-only: new tables, and one constraint relaxed
-- (older binaries never write what it used to refuse). Timestamps are INTEGER microseconds.

-- Next STAN each acquirer station hands out; processes reserve blocks of it (1..=999999, wraps).
CREATE TABLE stan_counters (
    station    TEXT PRIMARY KEY NOT NULL,
    next_stan  INTEGER NOT NULL CHECK (next_stan BETWEEN 1 AND 999999)
);

-- An upstream link's working keys (wrapped under the LMK), shared by every acquirer process so
-- a second process reuses them instead of exchanging keys again.
CREATE TABLE link_keys (
    upstream      TEXT PRIMARY KEY NOT NULL,
    tpk           TEXT NOT NULL,
    tak           TEXT NOT NULL,
    exchanged_at  INTEGER NOT NULL
);

-- A 0220 advice books cash the acquirer already paid out, even past the balance: an issuer
-- account may go negative now. Ordinary withdrawals still refuse an overdraft in the statement
-- that debits (`balance >= amount`).
--
-- SQLite cannot drop a CHECK, so the table is rebuilt. Child rows (cards, daily_withdrawals)
-- keep referencing `accounts` by name; deferring foreign keys lets the drop orphan them until
-- the same rows are inserted again, and the commit checks that none is left orphaned.
PRAGMA defer_foreign_keys = ON;
CREATE TEMP TABLE accounts_rebuild AS SELECT * FROM accounts;
DROP TABLE accounts;
CREATE TABLE accounts (
    id                      TEXT PRIMARY KEY NOT NULL,
    currency                TEXT NOT NULL CHECK (length(currency) = 3),
    balance                 INTEGER NOT NULL,
    daily_withdrawal_limit  INTEGER NOT NULL CHECK (daily_withdrawal_limit >= 0),
    created_at              INTEGER NOT NULL
);
INSERT INTO accounts (id, currency, balance, daily_withdrawal_limit, created_at)
    SELECT id, currency, balance, daily_withdrawal_limit, created_at FROM accounts_rebuild;
DROP TABLE accounts_rebuild;
