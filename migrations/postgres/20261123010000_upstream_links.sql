-- Upstream links and advices (SPEC §6). Expand-only: new tables, and one constraint relaxed
-- (older binaries never write what it used to refuse).

-- Next STAN each acquirer station hands out; processes reserve blocks of it (1..=999999, wraps).
CREATE TABLE stan_counters (
    station    TEXT PRIMARY KEY,
    next_stan  INTEGER NOT NULL CHECK (next_stan BETWEEN 1 AND 999999)
);

-- An upstream link's working keys (wrapped under the LMK), shared by every acquirer process so
-- a second process reuses them instead of exchanging keys again.
CREATE TABLE link_keys (
    upstream      TEXT PRIMARY KEY,
    tpk           TEXT NOT NULL,
    tak           TEXT NOT NULL,
    exchanged_at  TIMESTAMPTZ NOT NULL
);

-- A 0220 advice books cash the acquirer already paid out, even past the balance: an issuer
-- account may go negative now. Ordinary withdrawals still refuse an overdraft in the statement
-- that debits (`balance >= amount`).
ALTER TABLE accounts DROP CONSTRAINT IF EXISTS accounts_balance_check;
