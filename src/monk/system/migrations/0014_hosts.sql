-- The fleet: the PostgreSQL servers tenants may live on, by the name tenants.host records.
-- The server monk starts with (MONK_HOST_NAME, embedded or MONK_DATABASE_URL) keeps the system
-- database and is listed without a row; it gets one (is_local) once its state or capacity is
-- set. A host's password is never here: it is kept in a private file of MONK_DATA_DIR, named
-- by the row's id (docs/hosts.md).
CREATE TABLE hosts (
    name               text PRIMARY KEY,
    id                 uuid NOT NULL UNIQUE,
    is_local           boolean NOT NULL DEFAULT false,
    -- libpq URL of the admin role, without its password; NULL for the local host
    url                text,
    -- pg_control_system(): one cluster, one identifier, whatever URL reaches it
    system_identifier  text UNIQUE,
    capacity           integer CHECK (capacity IS NULL OR capacity >= 0),
    labels             jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(labels) = 'object'),
    state              text NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'draining')),
    server_version     text,
    added_at           timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    -- the last check (monk host check, or the one of add)
    checked_at         timestamptz,
    check_ok           boolean,
    check_error        text,
    check_latency_ms   double precision,
    CONSTRAINT hosts_remote_has_url CHECK (is_local OR url IS NOT NULL)
);
CREATE UNIQUE INDEX hosts_one_local ON hosts (is_local) WHERE is_local;
CREATE UNIQUE INDEX hosts_url ON hosts (url) WHERE url IS NOT NULL;
