-- Spare roles on every host (issue 13, item 3). A row's `host` names the host of the fleet its
-- role is on (NULL: the registry's own server, as before). A role on another host cannot be
-- made or renamed in the registry's transaction, so there the steps are ordered instead:
-- - made: the row commits first, then monk makes the role on the host (make_tenant_role, its
--   copy there): a crash leaves a row without a role (dropped with the others of its dead
--   keyholder), never a role nobody knows;
-- - claimed: the reservation marks the row with the intent (`tenant_id`) in its one statement;
--   the role is renamed on the host after that commit (rename_spare_role, its copy there), and
--   the row deleted with the activation. The intent's undo (a failure, or a crash repaired)
--   drops the claimed role on the host, under either name, and deletes the row.
-- The claim goes with its intent row whichever way that row goes (the activation deletes it
-- first; an undo, or a restore that replaces its intent row, deletes the intent).
ALTER TABLE spare_roles
    ADD COLUMN host text,
    ADD COLUMN tenant_id uuid REFERENCES tenants (id) ON DELETE CASCADE;
CREATE INDEX spare_roles_host ON spare_roles (host, keyholder) WHERE host IS NOT NULL;
CREATE INDEX spare_roles_tenant ON spare_roles (tenant_id) WHERE tenant_id IS NOT NULL;

-- The rename of a claimed spare role, written once: here for the local claim, and copied onto
-- every host (admin.HOST_FUNCTIONS) for a claim there. A role already under the tenant's name
-- is a leftover of a crashed attempt on that name, whose lock the caller holds: dropped first.
CREATE FUNCTION rename_spare_role(p_spare text, p_role text) RETURNS void
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $$
BEGIN
    EXECUTE format('DROP ROLE IF EXISTS %I', p_role);
    EXECUTE format('ALTER ROLE %I RENAME TO %I', p_spare, p_role);
END
$$;

-- The local claim of 0007 (row deleted and role renamed in the reservation's transaction), for
-- rows of the registry's server only, its rename now the step above.
CREATE OR REPLACE FUNCTION claim_spare_role(p_spare text, p_role text, p_keyholder uuid)
RETURNS boolean
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $$
BEGIN
    DELETE FROM spare_roles WHERE role = p_spare AND keyholder = p_keyholder AND host IS NULL;
    IF NOT FOUND OR NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = p_spare) THEN
        RETURN false;
    END IF;
    PERFORM rename_spare_role(p_spare, p_role);
    RETURN true;
END
$$;

-- The claim on a host of the fleet: the row marked with the intent, in the reservation's
-- transaction; false (nothing changed) when it is no longer an unclaimed spare of this
-- keyholder on that host.
CREATE FUNCTION claim_host_spare_role(p_spare text, p_keyholder uuid, p_host text, p_tenant uuid)
RETURNS boolean
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $$
BEGIN
    UPDATE spare_roles SET tenant_id = p_tenant
    WHERE role = p_spare AND keyholder = p_keyholder AND host = p_host AND tenant_id IS NULL;
    RETURN FOUND;
END
$$;

-- drop_spare_roles of 0007, for the registry's server only: a host's spare roles are dropped
-- one by one, on the host first, then their row (monk.service.role_pool).
CREATE OR REPLACE FUNCTION drop_spare_roles(p_keep uuid, p_only uuid) RETURNS integer
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $$
DECLARE
    dropped record;
    n integer := 0;
BEGIN
    FOR dropped IN
        DELETE FROM spare_roles
        WHERE host IS NULL
            AND (p_keep IS NULL OR keyholder <> p_keep) AND (p_only IS NULL OR keyholder = p_only)
        RETURNING role
    LOOP
        EXECUTE format('DROP ROLE IF EXISTS %I', dropped.role);
        n := n + 1;
    END LOOP;
    RETURN n;
END
$$;
