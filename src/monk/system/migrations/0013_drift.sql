-- Drift (issue 12): each build records the catalog of its database (schema public and monk's
-- metadata rows, see monk.core.catalog) and its fingerprint, read in the build's health step;
-- a tenant's catalog is compared with the one of the build it claims to be at.
ALTER TABLE template_builds
    ADD COLUMN catalog     jsonb,
    ADD COLUMN fingerprint text;

-- The last drift check of each tenant: when, against which build, what differed.
CREATE TABLE drift_checks (
    tenant_id        uuid PRIMARY KEY REFERENCES tenants (id) ON DELETE CASCADE,
    host             text NOT NULL,
    template_key     text,
    template_version text,                 -- the build the tenant claimed at the check
    checked_at       timestamptz NOT NULL DEFAULT now(),
    drifted          boolean,              -- NULL: it could not be compared (see error)
    differences      jsonb NOT NULL DEFAULT '[]',
    fingerprint      text,                 -- the tenant's own catalog fingerprint
    error            text
);
CREATE INDEX drift_checks_key ON drift_checks (host, template_key);
