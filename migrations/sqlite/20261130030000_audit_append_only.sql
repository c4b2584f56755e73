-- The audit trail is evidence: it is appended to, never rewritten (issue 10). Triggers refuse
-- UPDATE and DELETE (SQLite has no TRUNCATE; `DELETE FROM audit` fires the DELETE trigger), so
-- neither a bug nor someone with the database file's connection can quietly edit what
-- happened. Expand-only: no existing row or column changes.
CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
BEGIN
    SELECT RAISE(ABORT, 'audit is append-only: UPDATE refused');
END;
CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
BEGIN
    SELECT RAISE(ABORT, 'audit is append-only: DELETE refused');
END;
