-- Profile v2 (SPEC §3): every sign-on the switch accepted, by its identity (STAN in field 11,
-- transmission date-time in field 7), so a replayed sign-on is answered `94` instead of
-- replacing the terminal's live session. Rows older than the replay window are pruned per
-- terminal at its next sign-on. Expand-only: a new table older binaries never read.
CREATE TABLE accepted_sign_ons (
    terminal_id  TEXT NOT NULL,
    stan         TEXT NOT NULL,
    transmitted  TEXT NOT NULL,
    accepted_at  TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (terminal_id, stan, transmitted)
);
CREATE INDEX accepted_sign_ons_by_age ON accepted_sign_ons (terminal_id, accepted_at);
