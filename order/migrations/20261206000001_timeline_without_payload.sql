-- The timeline kept each entry's payload, which no reader asks for (an
-- entry says what happened; the event itself stays in the stream and, for
-- the order's own events, in order_events): a copy of every event's JSON
-- written per saga for nothing.
ALTER TABLE saga_timeline DROP COLUMN payload;
