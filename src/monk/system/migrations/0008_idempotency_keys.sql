-- An Idempotency-Key names one provisioning request: the request's parameters are recorded
-- the first time the key is seen, so a retry is recognised (and answered with the tenant it
-- made) and the same key with other parameters is refused (IDEMPOTENCY_KEY_REUSED), across
-- names. The primary key makes two concurrent first uses agree on one request.
CREATE TABLE idempotency_keys (
    key        text PRIMARY KEY,
    request    jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
