-- Template build registry, tenant lifecycle columns, and the operations journal.

-- One row per build of a template key on a host. The current ready build of a key is the one
-- tenants are cloned from; retired builds keep a versioned database name until pruned.
CREATE TABLE template_builds (
    id                uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    key               text NOT NULL,
    version           text NOT NULL,           -- content hash: source files + compiler version
    database          text NOT NULL,           -- where this build lives now
    host              text NOT NULL DEFAULT 'localhost',
    status            text NOT NULL DEFAULT 'building',
    is_current        boolean NOT NULL DEFAULT false,
    description       text,
    version_label     text,
    parent_key        text,
    source            text,                    -- folder the source was read from
    migration_level   integer NOT NULL DEFAULT 0,
    database_settings jsonb NOT NULL DEFAULT '{}',
    table_count       integer,
    record_count      bigint,
    size_bytes        bigint,
    duration_ms       integer,
    monk_version      text,
    compiler_version  text,
    server_version    text,
    error             text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    built_at          timestamptz,
    retired_at        timestamptz,
    dropped_at        timestamptz,
    CONSTRAINT template_builds_status CHECK (status IN ('building', 'ready', 'failed', 'retired', 'dropped')),
    CONSTRAINT template_builds_current_is_ready CHECK (NOT is_current OR status = 'ready'),
    CONSTRAINT template_builds_database_name CHECK (database ~ '^[A-Za-z0-9_]+$' AND octet_length(database) <= 63)
);
CREATE UNIQUE INDEX template_builds_one_current ON template_builds (host, key) WHERE is_current;
CREATE UNIQUE INDEX template_builds_live_database ON template_builds (host, database) WHERE dropped_at IS NULL;
CREATE INDEX template_builds_key ON template_builds (key, created_at DESC);

-- Tenant lifecycle detail.
ALTER TABLE tenants
    ADD COLUMN step              text,         -- last completed step of the running operation
    ADD COLUMN migration_level   integer NOT NULL DEFAULT 0,
    ADD COLUMN idempotency_key   text,
    ADD COLUMN archive_path      text,
    ADD COLUMN archive_size      bigint,
    ADD COLUMN archive_sha256    text,
    ADD COLUMN archived_at       timestamptz,
    ADD COLUMN archive_server_version text;

-- Every multi-step operation (provision, purge, archive, restore, template build) is journaled:
-- its state says what a restart must finish or undo.
CREATE TABLE operations (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    kind         text NOT NULL,
    subject      text NOT NULL,                -- tenant name key or template key
    database     text,
    host         text NOT NULL DEFAULT 'localhost',
    state        text NOT NULL DEFAULT 'running',
    step         text,
    error        text,
    params       jsonb NOT NULL DEFAULT '{}',
    result       jsonb,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz,
    CONSTRAINT operations_kind CHECK (kind IN
        ('provision', 'purge', 'archive', 'restore', 'template_build', 'repair')),
    CONSTRAINT operations_state CHECK (state IN ('queued', 'running', 'done', 'failed', 'undone'))
);
CREATE INDEX operations_open ON operations (state, created_at) WHERE state IN ('queued', 'running');
CREATE INDEX operations_subject ON operations (subject, created_at DESC);
