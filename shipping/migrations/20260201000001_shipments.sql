-- One shipment per order: the primary key makes a second shipment impossible.
CREATE TABLE shipments (
    order_id        UUID        PRIMARY KEY,
    shipment_id     UUID        NOT NULL UNIQUE,
    status          TEXT        NOT NULL CHECK (status IN ('created', 'failed')),
    tracking_number TEXT,
    address         JSONB       NOT NULL,
    reason          TEXT,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);
