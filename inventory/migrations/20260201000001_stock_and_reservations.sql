-- The CHECKs are the last line against overselling: no update can take
-- available below zero, whatever the application does.
CREATE TABLE stock (
    product_id TEXT        PRIMARY KEY,
    available  BIGINT      NOT NULL CHECK (available >= 0),
    reserved   BIGINT      NOT NULL DEFAULT 0 CHECK (reserved >= 0),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- One reservation per order: the primary key makes a second reservation impossible.
CREATE TABLE reservations (
    order_id   UUID        PRIMARY KEY,
    lines      JSONB       NOT NULL,
    status     TEXT        NOT NULL CHECK (status IN ('reserved', 'failed', 'released')),
    reason     TEXT,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
