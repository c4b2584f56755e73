-- Guarded postings: on SQLite the steps of a posting run one by one under a savepoint on the
-- single writer (switch/src/store/sql.rs `Conn::apply_all`), so there is no function to create.
-- This migration keeps the two migration histories in step.
SELECT 1;
