-- The warm pool: spare databases pre-cloned from a template build, with every tenant-independent
-- post-clone step done, waiting under neutral names to be renamed into a tenant.

CREATE TABLE spares (
    id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    host             text NOT NULL DEFAULT 'localhost',
    template_key     text NOT NULL,
    template_version text NOT NULL,
    database         text NOT NULL,           -- monk_spare_<16 hex>; its role has the same name
    status           text NOT NULL DEFAULT 'creating',
    migration_level  integer NOT NULL DEFAULT 0,
    tenant_id        uuid,                    -- set when claimed
    created_at       timestamptz NOT NULL DEFAULT now(),
    ready_at         timestamptz,
    claimed_at       timestamptz,
    CONSTRAINT spares_status CHECK (status IN ('creating', 'ready', 'claimed')),
    CONSTRAINT spares_database_name CHECK (database ~ '^monk_spare_[0-9a-f]{16}$')
);
CREATE UNIQUE INDEX spares_database ON spares (host, database);
CREATE INDEX spares_ready ON spares (host, template_key, template_version, created_at)
    WHERE status = 'ready';
