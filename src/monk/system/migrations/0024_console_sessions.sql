-- Console sessions in the system database: every `monk serve` on it shares them, a restart
-- signs nobody out, and a sign-out ends the session everywhere. Only a hash of the session id
-- is kept, so a copy of this table signs nobody in.
CREATE TABLE console_sessions (
    id_hash    bytea PRIMARY KEY,
    operator   text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);
CREATE INDEX console_sessions_expires ON console_sessions (expires_at);
