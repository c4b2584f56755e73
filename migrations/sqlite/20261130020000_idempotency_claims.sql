-- Admin Idempotency-Key records (SPEC §5). A key is claimed in the same transaction as the
-- write it guards, so two concurrent retries run the write once; what is kept to recognise a
-- retry is a MAC under an LMK-derived key (computed inside the HSM) of the caller and key
-- (key_mac) and of method, path and body (request_mac), never a plain hash of a body.
-- status and body stay NULL while the claiming attempt runs, then hold its answer.
CREATE TABLE idempotency_claims (
    key_mac      TEXT PRIMARY KEY,
    request_mac  TEXT NOT NULL,
    claim_id     TEXT NOT NULL,
    status       INTEGER,
    body         TEXT,
    created_at   INTEGER NOT NULL
);

-- The previous table kept sha256(method + path + body), which for POST /v1/cards can be
-- brute-forced back to the PAN and PIN. Its rows are short-lived retry records: they are
-- dropped here rather than carried over (a retry of a request made before the upgrade runs as
-- a new request). The table stays (expand-only) but this version never writes it; a later
-- contract migration drops it.
DELETE FROM idempotency;
