-- A global order of the event store that is safe to follow: an event's
-- position is (the id of the transaction that wrote it, a sequence number).
-- A reader takes only events of transactions older than every one still
-- running (pg_snapshot_xmin), so an event that commits late is never passed
-- over by a reader that already moved beyond its sequence number.
ALTER TABLE order_events ADD COLUMN tx xid8 NOT NULL DEFAULT pg_current_xact_id();
ALTER TABLE order_events ADD COLUMN position BIGINT GENERATED ALWAYS AS IDENTITY;
CREATE INDEX order_events_in_commit_order ON order_events (tx, position);

-- Where each checkpointed projection is in that order.
CREATE TABLE projection_checkpoints (
    name       TEXT        PRIMARY KEY,
    tx         xid8        NOT NULL,
    position   BIGINT      NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Projection `customer-stats`: per customer, from the order events alone.
CREATE TABLE customer_stats (
    customer_id TEXT        PRIMARY KEY,
    orders      BIGINT      NOT NULL DEFAULT 0,
    confirmed   BIGINT      NOT NULL DEFAULT 0,
    cancelled   BIGINT      NOT NULL DEFAULT 0,
    intervened  BIGINT      NOT NULL DEFAULT 0,
    compensated BIGINT      NOT NULL DEFAULT 0,
    -- Sum of the confirmed orders' totals, saturating at 2^63 - 1.
    spent       BIGINT      NOT NULL DEFAULT 0,
    updated_at  TIMESTAMPTZ NOT NULL
);
-- What the projection needs to remember of each order (its customer and
-- total, for the events that do not carry them).
CREATE TABLE customer_stats_orders (
    order_id    UUID   PRIMARY KEY,
    customer_id TEXT   NOT NULL,
    total       BIGINT NOT NULL
);
