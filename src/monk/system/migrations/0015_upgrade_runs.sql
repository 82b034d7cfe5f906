-- Fleet upgrades: a run is an operations row (kind 'template_upgrade', subject the template
-- key) plus one row per tenant it selected. The process running it holds the key's upgrade
-- lock (an advisory lock) for its life: a 'running' run whose lock nobody holds is dead, and
-- the same command again resumes it. The tenant's own monk.build says whether its upgrade
-- committed; these rows say what the run knows of it.
ALTER TABLE operations DROP CONSTRAINT operations_kind;
ALTER TABLE operations ADD CONSTRAINT operations_kind CHECK (kind IN
    ('provision', 'purge', 'archive', 'restore', 'template_build', 'repair', 'template_upgrade'));

CREATE TABLE upgrade_tenants (
    op_id         uuid NOT NULL REFERENCES operations (id) ON DELETE CASCADE,
    tenant_id     uuid NOT NULL,
    name          text NOT NULL,
    database      text NOT NULL,
    -- the canary wave runs, and must finish cleanly, before the rest
    canary        boolean NOT NULL DEFAULT false,
    -- the order the run schedules them in
    position      integer NOT NULL,
    state         text NOT NULL DEFAULT 'pending',
    from_version  text,
    to_version    text,
    level         integer,
    -- failed: the error; skipped: why
    reason        text,
    attempts      integer NOT NULL DEFAULT 0,
    started_at    timestamptz,
    finished_at   timestamptz,
    PRIMARY KEY (op_id, tenant_id),
    CONSTRAINT upgrade_tenants_state
        CHECK (state IN ('pending', 'running', 'done', 'failed', 'skipped'))
);
CREATE INDEX upgrade_tenants_open ON upgrade_tenants (op_id, position)
    WHERE state IN ('pending', 'running');
