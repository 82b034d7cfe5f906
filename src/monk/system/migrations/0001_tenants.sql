-- The tenant registry. Runs with search_path set to the system schema (named like the system
-- database), so that the spec's `INSERT INTO monk_main.tenants (...)` works as written.

CREATE TABLE tenants (
    id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name             text NOT NULL,                    -- display name, as the caller gave it
    name_key         text NOT NULL,                    -- identity: NFC, trimmed, case-folded
    database         text NOT NULL,
    host             text NOT NULL DEFAULT 'localhost',
    is_active        boolean NOT NULL DEFAULT true,
    tenant_type      text NOT NULL DEFAULT 'normal',
    status           text NOT NULL DEFAULT 'active',
    template_key     text,
    template_version text,
    role_name        text,
    access_read      uuid[] NOT NULL DEFAULT '{}',
    access_edit      uuid[] NOT NULL DEFAULT '{}',
    access_full      uuid[] NOT NULL DEFAULT '{}',
    access_deny      uuid[] NOT NULL DEFAULT '{}',
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    trashed_at       timestamptz,
    deleted_at       timestamptz,
    CONSTRAINT tenants_database_name CHECK (database ~ '^[A-Za-z0-9_]+$' AND octet_length(database) <= 63),
    CONSTRAINT tenants_name_not_blank CHECK (btrim(name) <> ''),
    CONSTRAINT tenants_type CHECK (tenant_type IN ('normal', 'template')),
    CONSTRAINT tenants_status CHECK (status IN
        ('provisioning', 'active', 'disabled', 'trashed', 'deleting', 'deleted', 'failed')),
    CONSTRAINT tenants_active_matches_status CHECK (NOT is_active OR status = 'active')
);

-- A name and a database are unique among live tenants; a deleted tenant's name can be
-- provisioned again (its row is kept for audit and restore from archive).
CREATE UNIQUE INDEX tenants_live_name_key ON tenants (name_key) WHERE deleted_at IS NULL;
CREATE UNIQUE INDEX tenants_live_database ON tenants (database) WHERE deleted_at IS NULL;
CREATE INDEX tenants_status_idx ON tenants (status);
CREATE INDEX tenants_template_idx ON tenants (template_key);

-- Rows written by hand (the spec's INSERT) get an identity key; monk itself always sets it, with
-- Python's full Unicode case folding, which lower() approximates here.
CREATE FUNCTION tenants_defaults() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.name_key IS NULL THEN
        NEW.name_key := lower(normalize(btrim(NEW.name), NFC));
    END IF;
    IF TG_OP = 'UPDATE' THEN
        NEW.updated_at := now();
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER tenants_defaults BEFORE INSERT OR UPDATE ON tenants
    FOR EACH ROW EXECUTE FUNCTION tenants_defaults();
