-- A queued job (a purge) that fails is retried later instead of blocking the queue: its failed
-- attempts, the last error (column error) and when it is due again. Workers claim only due
-- jobs, so one failing job never holds back the ones queued after it.
ALTER TABLE operations
    ADD COLUMN attempts        integer NOT NULL DEFAULT 0,
    ADD COLUMN next_attempt_at timestamptz;
