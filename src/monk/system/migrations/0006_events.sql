-- Post-provision observers: every tenant state change leaves an event in this outbox, written by
-- a trigger in the very transaction that changes the state (the fast handout's function, the
-- service, or a hand-written INSERT alike): a change that commits has its event, one that is
-- rolled back or undone has none. `monk serve` delivers them to the configured webhooks
-- (MONK_HOOKS), at least once, retrying with backoff; delivered events stay as an audit trail
-- for MONK_EVENTS_RETENTION_DAYS.
CREATE TABLE events (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    seq             bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
    kind            text NOT NULL,
    tenant_id       uuid,
    payload         jsonb NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    delivered_at    timestamptz,
    last_error      text
);
CREATE INDEX events_due ON events (next_attempt_at) WHERE delivered_at IS NULL;
CREATE INDEX events_tenant ON events (tenant_id, seq);

CREATE FUNCTION tenants_emit_event() RETURNS trigger
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $$
DECLARE
    kind text;
    t tenants;
BEGIN
    t := CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
    IF TG_OP = 'DELETE' THEN
        -- a purge with "forget" removes the row; a deleted row's purge was announced already
        IF OLD.status NOT IN ('deleted', 'provisioning') THEN
            kind := 'tenant.purged';
        END IF;
    ELSIF TG_OP = 'INSERT' THEN
        IF NEW.status = 'active' THEN
            kind := 'tenant.provisioned';
        END IF;
    ELSIF NEW.status IS DISTINCT FROM OLD.status THEN
        kind := CASE
            WHEN NEW.status = 'active' AND OLD.status = 'provisioning' THEN 'tenant.provisioned'
            WHEN NEW.status = 'active' AND OLD.status = 'disabled' THEN 'tenant.enabled'
            WHEN NEW.status = 'active' THEN 'tenant.restored'
            WHEN NEW.status = 'disabled' THEN 'tenant.disabled'
            WHEN NEW.status = 'trashed' THEN 'tenant.trashed'
            WHEN NEW.status = 'deleted' THEN 'tenant.purged'
        END;
    END IF;
    IF kind IS NOT NULL THEN
        INSERT INTO events (kind, tenant_id, payload)
        VALUES (kind, t.id, jsonb_build_object(
            'id', t.id, 'name', t.name, 'database', t.database, 'host', t.host,
            'status', CASE WHEN TG_OP = 'DELETE' THEN 'deleted' ELSE t.status END,
            'template', t.template_key, 'template_version', t.template_version));
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER tenants_events AFTER INSERT OR UPDATE OF status OR DELETE ON tenants
    FOR EACH ROW EXECUTE FUNCTION tenants_emit_event();
