CREATE TABLE accounts (
    customer_id TEXT        PRIMARY KEY,
    balance     BIGINT      NOT NULL CHECK (balance >= 0),
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- One payment per order: the primary key makes a second charge impossible.
CREATE TABLE payments (
    order_id    UUID        PRIMARY KEY,
    payment_id  UUID        NOT NULL UNIQUE,
    customer_id TEXT        NOT NULL,
    amount      BIGINT      NOT NULL CHECK (amount >= 0),
    status      TEXT        NOT NULL CHECK (status IN ('charged', 'failed', 'refunded')),
    reason      TEXT,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX payments_by_customer ON payments (customer_id, created_at);
