-- Failed tenant logins, counted per (tenant, user) in a window, in the system database so that
-- every `monk serve` process sees the same count. A row is made by a failure and deleted by a
-- success; one whose window has passed is started over by the next failure. The tenant and
-- user are the names as given (unknown ones are counted too: the answer must not tell them apart).
CREATE TABLE login_failures (
    tenant_key   text NOT NULL,
    username     text NOT NULL,
    failures     integer NOT NULL,
    window_start timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_key, username)
);
