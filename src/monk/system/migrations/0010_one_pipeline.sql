-- One provisioning pipeline (issue 11): each step of provisioning has one home. The steps that
-- run on the registry's session are system functions (a DDL statement sent by the client would
-- make psycopg discard the session's prepared statements); nothing of them is repeated in Python.

-- obtain a role: the one way a role monk gives out is made (a tenant's, a spare database's, a
-- spare role). A role already under that name is a leftover of a crashed attempt on it, whose
-- name the caller holds: dropped first.
CREATE FUNCTION make_tenant_role(
    p_role text, p_verifier text, p_mark text, p_login boolean, p_connection_limit integer
) RETURNS void
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $$
BEGIN
    -- format('%I') quotes identifiers on the server as psycopg.sql.Identifier does on the client.
    EXECUTE format('DROP ROLE IF EXISTS %I', p_role);
    EXECUTE format('CREATE ROLE %I %s CONNECTION LIMIT %s PASSWORD %L', p_role,
                   CASE WHEN p_login THEN 'LOGIN' ELSE 'NOLOGIN' END, p_connection_limit,
                   p_verifier);
    EXECUTE format('COMMENT ON ROLE %I IS %L', p_role, p_mark);
    IF NOT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
        -- A CREATEROLE admin needs membership to hand objects over and to manage the role.
        EXECUTE format('GRANT %I TO CURRENT_USER', p_role);
    END IF;
END
$$;

DROP FUNCTION make_spare_role(text, text, text, uuid);
CREATE FUNCTION make_spare_role(p_role text, p_verifier text, p_mark text, p_keyholder uuid)
RETURNS void
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $$
BEGIN
    INSERT INTO spare_roles (role, keyholder) VALUES (p_role, p_keyholder);
    PERFORM make_tenant_role(p_role, p_verifier, p_mark, true, -1);
END
$$;

-- The warm handout, the whole pipeline in one statement for a spare (which was cloned, migrated,
-- given its role and configured when it was made): reserve the name (its lock, no live tenant
-- with the name or the database), take the spare (`p_spare`, one whose password the caller
-- knows as its keyholder; NULL: the oldest ready one of the template's current build, whose
-- password `p_verifier` then replaces), rename its database and role into the tenant's, LOGIN
-- and the tenant's own connection limit (NULL: the role keeps the default), journal, activate.
-- No row when it must not: the name is busy or taken, or no such spare is ready.
DROP FUNCTION hand_out_spare(bigint, uuid, text, text, text, text, text, text, text, uuid, text);
CREATE FUNCTION hand_out_spare(
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
    EXECUTE format('ALTER DATABASE %I RENAME TO %I', s.database, p_database);
    EXECUTE format('ALTER ROLE %I RENAME TO %I', s.database, p_role);
    EXECUTE format('ALTER ROLE %I LOGIN%s%s', p_role,
                   CASE WHEN p_verifier IS NULL THEN ''
                        ELSE format(' PASSWORD %L', p_verifier) END,
                   CASE WHEN p_connection_limit IS NULL THEN ''
                        ELSE format(' CONNECTION LIMIT %s', p_connection_limit) END);
    INSERT INTO operations (kind, subject, database, host, state, step, params, finished_at)
    VALUES ('provision', p_name_key, p_database, p_host, 'done', 'active',
            jsonb_build_object('template', p_template, 'version', s.template_version,
                               'spare', s.database),
            now());
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
