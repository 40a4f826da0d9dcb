-- A write now asks for the latest earlier row of each aggregate it appends
-- to (max(id)), not only whether there is one: the relay publishes the new
-- row from its hand-over when it published that one itself. Keyed on
-- (aggregate_id, id), the answer is the last entry of the aggregate in the
-- index, however many of its rows wait.
CREATE INDEX IF NOT EXISTS outbox_aggregate_latest ON outbox (aggregate_id, id);
DROP INDEX IF EXISTS outbox_aggregate;
