-- The order service's copy of the product catalog, fed by inventory's
-- ProductPriced events (the order-catalog watch): what every order line is
-- priced with. A row changes only for a newer product version, so late,
-- repeated or reordered events never take a price back. `stream_seq` is the
-- event's place in the catalog stream: a rebuild keeps what arrived after
-- the part of the stream it read.
CREATE TABLE catalog (
    product_id TEXT        PRIMARY KEY,
    name       TEXT        NOT NULL,
    unit_price BIGINT      NOT NULL CHECK (unit_price > 0),
    version    BIGINT      NOT NULL CHECK (version > 0),
    event_id   UUID        NOT NULL,
    priced_at  TIMESTAMPTZ NOT NULL,
    stream_seq BIGINT      NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
