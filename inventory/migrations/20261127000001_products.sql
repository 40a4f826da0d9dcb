-- The catalog data of each product inventory owns: name and price. Every
-- change bumps the version and is published (ProductPriced, through the
-- outbox, in the same transaction), so the order service prices lines from
-- its own copy without asking.
CREATE TABLE products (
    product_id TEXT        PRIMARY KEY,
    name       TEXT        NOT NULL,
    unit_price BIGINT      NOT NULL CHECK (unit_price > 0),
    version    BIGINT      NOT NULL DEFAULT 1 CHECK (version > 0),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
