-- The customer's right to cancel an order: the SHA-256 of each cancel token
-- a placement answer carried (the token itself is never stored). A
-- placement answered again for its Idempotency-Key carries a new token.
CREATE TABLE IF NOT EXISTS cancel_capabilities (
    token_hash BYTEA       PRIMARY KEY,
    order_id   UUID        NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS cancel_capabilities_by_order ON cancel_capabilities (order_id);
