-- The audit trail is evidence: it is appended to, never rewritten (issue 10). A trigger refuses
-- UPDATE, DELETE and TRUNCATE for every role, the table's owner (which the switch runs as)
-- included, so neither a bug nor a stolen database login can quietly edit what happened.
-- Expand-only: no existing row or column changes. Retention, should a bank need it, is a
-- deliberate migration that archives and then drops this trigger, never an ad-hoc query.
CREATE FUNCTION audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;
CREATE TRIGGER audit_no_update_or_delete BEFORE UPDATE OR DELETE ON audit
    FOR EACH ROW EXECUTE FUNCTION audit_append_only();
CREATE TRIGGER audit_no_truncate BEFORE TRUNCATE ON audit
    FOR EACH STATEMENT EXECUTE FUNCTION audit_append_only();
