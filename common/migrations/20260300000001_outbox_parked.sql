-- Outbox rows the relay could never publish (the broker would refuse them
-- whatever it retried, e.g. larger than its max_payload), moved aside with
-- the reason so the rest of the outbox flows. Readiness reports them as an
-- alert; an operator inspects, repairs and re-inserts them into outbox.
CREATE TABLE IF NOT EXISTS outbox_parked (
    id           BIGINT      PRIMARY KEY,
    event_id     UUID        NOT NULL UNIQUE,
    subject      TEXT        NOT NULL,
    aggregate_id TEXT        NOT NULL,
    body         BYTEA       NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL,
    parked_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    reason       TEXT        NOT NULL
);
