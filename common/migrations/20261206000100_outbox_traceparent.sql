-- The W3C trace context of the work that wrote an event (see
-- common/src/trace.rs): the relay publishes it as the message's
-- `traceparent` header, so the consumers continue the same trace. NULL for
-- rows written before, or by work that had none.
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS traceparent text;
