-- The web console's reads: the tenants table paged in creation order and filtered by host,
-- the provisions of the last hour, the journal newest first.
CREATE INDEX tenants_live_created ON tenants (created_at, id) WHERE deleted_at IS NULL;
CREATE INDEX tenants_host_idx ON tenants (host);
CREATE INDEX operations_kind_finished ON operations (kind, finished_at);
CREATE INDEX operations_created ON operations (created_at DESC);
