-- The trace each timeline entry belongs to (from the message's traceparent
-- header): a saga placed over HTTP is one trace, which the page and the API
-- name so that its spans can be looked up in the tracing backend.
ALTER TABLE saga_timeline ADD COLUMN trace_id text;
