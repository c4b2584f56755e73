-- Guarded postings (switch/src/store/sql.rs `guarded_statement`): an authorization is decided
-- in Rust on rows read first, then written in ONE statement whose steps repeat what the
-- decision was based on. When a step finds the data changed, this raises SQLSTATE SYSTL, which
-- undoes the whole statement; the switch reads again and decides again.
CREATE FUNCTION switchyard_require(ok BOOLEAN) RETURNS BOOLEAN
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF ok IS NOT TRUE THEN
        RAISE EXCEPTION 'switchyard: the data a posting was decided on changed; read it again'
            USING ERRCODE = 'SYSTL';
    END IF;
    RETURN TRUE;
END
$$;
