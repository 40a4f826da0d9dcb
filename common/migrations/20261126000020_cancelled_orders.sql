-- Orders the customer cancelled before this service took its step for them:
-- the step is then never taken (payment charges nothing, inventory reserves
-- nothing, shipping creates no shipment). One row per order.
CREATE TABLE IF NOT EXISTS cancelled_orders (
    order_id     UUID        PRIMARY KEY,
    reason       TEXT        NOT NULL,
    cancelled_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
