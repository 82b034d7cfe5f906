-- A cold provision made by `monk serve` is answered before its root user is written into the
-- tenant's database (that login into the new database is most of what a provision costs beyond
-- its clone). The root user's hash waits here, committed with the activation, until monk writes
-- it there: right after the answer, on demand at the first use of the tenant's users, at
-- `monk serve`'s start and by `monk doctor --repair`.
CREATE TABLE pending_roots (
    tenant_id     uuid PRIMARY KEY REFERENCES tenants (id) ON DELETE CASCADE,
    password_hash text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);
