-- How a tenant at one build of a template gets to the next: one row per (predecessor, build)
-- pair, recorded by the build that succeeded the predecessor, in the transaction that swaps it
-- in. A tenant at any older build reaches the current one by following the rows in order.
CREATE TABLE template_upgrades (
    host          text NOT NULL,
    key           text NOT NULL,
    from_version  text NOT NULL,
    to_version    text NOT NULL,
    -- SQL run in this order, in one transaction, in the tenant's database as its owner role
    script        text[] NOT NULL,
    -- the template's migration level once the script ran
    level         integer NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (host, key, from_version, to_version),
    CONSTRAINT template_upgrades_step CHECK (from_version <> to_version)
);
