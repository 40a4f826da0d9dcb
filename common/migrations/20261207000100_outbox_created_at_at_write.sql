-- An outbox row's created_at is when the row was written, not when its
-- transaction began (now()): the relay's latency histogram
-- (saga_relay_publish_seconds), the oldest-event gauge and the relay's
-- "waiting in the outbox" report all count from it, and a step may spend
-- long in its transaction before it writes its event (waiting on a lock,
-- applying a batch), which is not time the event spent in the outbox.
ALTER TABLE outbox ALTER COLUMN created_at SET DEFAULT clock_timestamp();
