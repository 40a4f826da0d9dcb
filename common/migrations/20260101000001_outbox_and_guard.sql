-- Shared by every service: the transactional outbox and the consumed-event guard.

-- Events committed with a state change, waiting for the relay to publish them.
-- Rows are deleted once JetStream has acknowledged them.
CREATE TABLE IF NOT EXISTS outbox (
    id           BIGSERIAL PRIMARY KEY,
    event_id     UUID        NOT NULL UNIQUE,
    subject      TEXT        NOT NULL,
    aggregate_id TEXT        NOT NULL,
    body         BYTEA       NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- One row per event a consumer has applied, written in the same transaction as
-- the effect: the durable half of idempotency, which survives a Redis flush.
CREATE TABLE IF NOT EXISTS consumed_events (
    consumer    TEXT        NOT NULL,
    event_id    UUID        NOT NULL,
    event_type  TEXT        NOT NULL,
    consumed_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);
