-- Where a request went upstream (SPEC §6). Expand-only: one nullable column.
-- `upstream:MTI:STAN:transmission` of the message the issuer knows it by: the 0200 forwarded
-- over the link, or the 0220 advice of a stand-in approval. A reversal row copies its
-- original's value when it reverses it, so the acquirer can send the issuer a 0420.
ALTER TABLE journal ADD COLUMN upstream_ref TEXT;
