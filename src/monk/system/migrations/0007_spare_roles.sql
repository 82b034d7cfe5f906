-- Spare roles: roles with a password, made ahead of time, renamed into a cold provision's
-- tenant role. They may log in from the start (their password is known only to the process that
-- made them until it becomes the tenant's: no more than the tenant's role may), so that the
-- claim is one catalog update, the rename. Setting a SCRAM password costs the server some 4 ms of CPU (it checks
-- every new secret against the empty password at the verifier's iteration count) and the client
-- some 2 ms to compute the verifier: done in idle time, a cold provision pays for a rename.
--
-- Like a spare database's, a spare role's password lives only in the memory of the process that
-- set it, named by `keyholder`; only that process claims it.
CREATE TABLE spare_roles (
    role text PRIMARY KEY CHECK (role ~ '^monk_role_[0-9a-f]{16}$'),
    keyholder uuid NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX spare_roles_keyholder ON spare_roles (keyholder);

-- The role and its row in one transaction: a crash leaves both or neither. A function, so that
-- the registry session sends no DDL of its own (a client that sees one, psycopg, discards its
-- prepared statements).
CREATE FUNCTION make_spare_role(p_role text, p_verifier text, p_mark text, p_keyholder uuid)
RETURNS void
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $$
BEGIN
    INSERT INTO spare_roles (role, keyholder) VALUES (p_role, p_keyholder);
    EXECUTE format('CREATE ROLE %I LOGIN PASSWORD %L', p_role, p_verifier);
    EXECUTE format('COMMENT ON ROLE %I IS %L', p_role, p_mark);
    IF NOT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
        -- A CREATEROLE admin needs membership to hand objects over and to manage the role.
        EXECUTE format('GRANT %I TO CURRENT_USER', p_role);
    END IF;
END
$$;

-- Renames the caller's spare role into the tenant's role, in the caller's transaction; false (nothing changed) when it is no longer a spare of this keyholder. A role
-- already under the tenant's name is a leftover of a crashed attempt on that name, whose lock
-- the caller holds: dropped first, as a freshly created role would do.
CREATE FUNCTION claim_spare_role(p_spare text, p_role text, p_keyholder uuid)
RETURNS boolean
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $$
BEGIN
    DELETE FROM spare_roles WHERE role = p_spare AND keyholder = p_keyholder;
    IF NOT FOUND OR NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = p_spare) THEN
        RETURN false;
    END IF;
    EXECUTE format('DROP ROLE IF EXISTS %I', p_role);
    EXECUTE format('ALTER ROLE %I RENAME TO %I', p_spare, p_role);
    RETURN true;
END
$$;

-- Drops spare roles, rows and roles together: of every keyholder but `p_keep` (NULL: none
-- spared), and only of `p_only` (NULL: of any); returns how many.
CREATE FUNCTION drop_spare_roles(p_keep uuid, p_only uuid) RETURNS integer
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $$
DECLARE
    dropped record;
    n integer := 0;
BEGIN
    FOR dropped IN
        DELETE FROM spare_roles
        WHERE (p_keep IS NULL OR keyholder <> p_keep) AND (p_only IS NULL OR keyholder = p_only)
        RETURNING role
    LOOP
        EXECUTE format('DROP ROLE IF EXISTS %I', dropped.role);
        n := n + 1;
    END LOOP;
    RETURN n;
END
$$;
