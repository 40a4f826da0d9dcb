-- A consumer's write asks, in the statement that appends its events,
-- whether an earlier event of the same aggregate is still in the outbox:
-- those that have none are handed to the relay at commit and published
-- without being read back. This index answers that question without a
-- scan of the outbox (which holds the rows not yet vacuumed).
CREATE INDEX IF NOT EXISTS outbox_aggregate ON outbox (aggregate_id);
