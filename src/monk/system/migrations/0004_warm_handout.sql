-- The warm handout as one server-side function: one round trip and one transaction for the
-- common case (a spare whose password this very process knows).
--
-- A spare's password lives only in the memory of the process that set it; `keyholder` names
-- that process (a random id per TenantService), so the handout can tell, under the row lock it
-- claims with, whether the password it remembers is still the role's.
ALTER TABLE spares ADD COLUMN keyholder uuid;

-- Hands the given spare (one whose password the caller knows) out as the tenant and returns the
-- tenant's row, committed with it: active, with its journal entry. No row when it must not:
-- another operation holds the name's lock, a live tenant has the name or the database (the
-- caller's full path decides what to answer), or that spare is not a ready spare of the
-- template's current build with this keyholder (claimed meanwhile, or of an older build).
-- The advisory lock is the transaction-level twin of the session lock the full path takes on
-- the same key, so the two exclude each other.
CREATE FUNCTION hand_out_spare(
    p_lock bigint, p_id uuid, p_name text, p_name_key text, p_database text, p_role text,
    p_host text, p_template text, p_idempotency_key text, p_keyholder uuid, p_spare text
) RETURNS SETOF tenants
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $$
DECLARE
    s record;
BEGIN
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
    WHERE sp.host = p_host AND sp.database = p_spare AND sp.template_key = p_template
        AND sp.status = 'ready' AND sp.keyholder = p_keyholder
    FOR UPDATE OF sp SKIP LOCKED;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    -- format('%I') quotes identifiers on the server as psycopg.sql.Identifier does on the client.
    EXECUTE format('ALTER DATABASE %I RENAME TO %I', s.database, p_database);
    EXECUTE format('ALTER ROLE %I RENAME TO %I', s.database, p_role);
    EXECUTE format('ALTER ROLE %I LOGIN', p_role);
    INSERT INTO operations (kind, subject, database, host, state, step, params, finished_at)
    VALUES ('provision', p_name_key, p_database, p_host, 'done', 'active',
            jsonb_build_object('template', p_template, 'version', s.template_version,
                               'spare', s.database),
            now());
    DELETE FROM spares WHERE id = s.id;
    RETURN QUERY
    INSERT INTO tenants (id, name, name_key, database, host, is_active, status, template_key,
                         template_version, role_name, step, idempotency_key, migration_level)
    VALUES (p_id, p_name, p_name_key, p_database, p_host, true, 'active', p_template,
            s.template_version, p_role, 'active', p_idempotency_key, s.migration_level)
    RETURNING *;
END
$$;
