-- The warm handout's journal entry is written and finished inside its one statement, whose
-- now() is the statement's start: finished_at now reads the clock, so the journal (the
-- console's latency chart) times a warm handout as it took, not as 0 ms.
CREATE OR REPLACE FUNCTION hand_out_spare(
    p_lock bigint, p_id uuid, p_name text, p_name_key text, p_database text, p_role text,
    p_host text, p_template text, p_idempotency_key text, p_keyholder uuid, p_spare text,
    p_verifier text, p_connection_limit integer
) RETURNS SETOF tenants
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $$
DECLARE
    s record;
BEGIN
    -- The transaction-level twin of the session lock the other paths take on the same key (a
    -- session that holds that one gets this one too).
    IF NOT pg_try_advisory_xact_lock(p_lock) THEN
        RETURN;
    END IF;
    IF EXISTS (SELECT 1 FROM tenants
               WHERE deleted_at IS NULL AND (name_key = p_name_key OR database = p_database)) THEN
        RETURN;
    END IF;
    SELECT sp.id, sp.database, sp.migration_level, sp.template_version INTO s
    FROM spares sp
    JOIN template_builds b ON b.host = sp.host AND b.key = sp.template_key
        AND b.version = sp.template_version AND b.is_current
    WHERE sp.host = p_host AND sp.template_key = p_template AND sp.status = 'ready'
        AND (p_spare IS NULL OR sp.database = p_spare)
        AND (p_verifier IS NOT NULL OR sp.keyholder = p_keyholder)
    ORDER BY sp.created_at LIMIT 1
    FOR UPDATE OF sp SKIP LOCKED;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    PERFORM rename_spare_into(s.database, p_database, p_role, p_verifier, p_connection_limit);
    INSERT INTO operations (kind, subject, database, host, state, step, params, finished_at)
    VALUES ('provision', p_name_key, p_database, p_host, 'done', 'active',
            jsonb_build_object('template', p_template, 'version', s.template_version,
                               'spare', s.database),
            clock_timestamp());
    DELETE FROM spares WHERE id = s.id;
    RETURN QUERY
    INSERT INTO tenants (id, name, name_key, database, host, is_active, status, template_key,
                         template_version, role_name, step, idempotency_key, migration_level,
                         connection_limit)
    VALUES (p_id, p_name, p_name_key, p_database, p_host, true, 'active', p_template,
            s.template_version, p_role, 'active', p_idempotency_key, s.migration_level,
            p_connection_limit)
    RETURNING *;
END
$$;
