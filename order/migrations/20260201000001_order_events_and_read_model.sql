-- Event store of the Order aggregate. The primary key is the optimistic
-- concurrency check: two writers appending the same version cannot both commit.
CREATE TABLE order_events (
    order_id       UUID        NOT NULL,
    version        BIGINT      NOT NULL CHECK (version > 0),
    event_id       UUID        NOT NULL UNIQUE,
    event_type     TEXT        NOT NULL,
    schema_version INT         NOT NULL,
    envelope       JSONB       NOT NULL,
    recorded_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (order_id, version)
);

-- Read model (CQRS), projected from the events in the same transaction.
-- It can be rebuilt at any time by replaying order_events.
CREATE TABLE orders (
    order_id         UUID        PRIMARY KEY,
    customer_id      TEXT        NOT NULL,
    status           TEXT        NOT NULL,
    lines            JSONB       NOT NULL,
    total            BIGINT      NOT NULL,
    shipping_address JSONB       NOT NULL,
    failure_reason   TEXT,
    shipment_id      UUID,
    version          BIGINT      NOT NULL,
    created_at       TIMESTAMPTZ NOT NULL,
    updated_at       TIMESTAMPTZ NOT NULL
);
CREATE INDEX orders_by_customer ON orders (customer_id, created_at DESC);
CREATE INDEX orders_by_status ON orders (status, created_at DESC);

-- Placement requests seen, by client idempotency key: a retried POST or
-- `nats req` returns the order it already created.
CREATE TABLE place_requests (
    idempotency_key TEXT        PRIMARY KEY,
    order_id        UUID        NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);
