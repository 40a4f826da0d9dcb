-- The janitor deletes guard rows and cancel records older than the streams
-- keep events (see common/src/janitor.rs): a BRIN index finds them at little
-- cost to inserts, which come in time order.
CREATE INDEX IF NOT EXISTS consumed_events_by_age ON consumed_events USING brin (consumed_at);
CREATE INDEX IF NOT EXISTS cancelled_orders_by_age ON cancelled_orders USING brin (cancelled_at);
