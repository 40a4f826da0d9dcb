-- The saga timeline: every event and dead letter of every saga, as the
-- order service's observer saw them on the broker, keyed so that a
-- redelivery records nothing twice.
CREATE TABLE saga_timeline (
    entry_key      text PRIMARY KEY,          -- the event id, or 'dlq:<stream sequence>'
    correlation_id uuid NOT NULL,
    kind           text NOT NULL CHECK (kind IN ('event', 'dead_letter')),
    service        text NOT NULL,             -- who emitted the event, or whose consumer gave up
    event_type     text NOT NULL,
    event_id       uuid,
    causation_id   uuid,
    aggregate_id   text,
    version        bigint,
    occurred_at    timestamptz NOT NULL,      -- the event's timestamp, or when it was dead-lettered
    recorded_at    timestamptz NOT NULL DEFAULT now(),
    stream_seq     bigint NOT NULL,
    effect         text NOT NULL,
    reason         text,
    payload        jsonb
);
CREATE INDEX saga_timeline_by_saga ON saga_timeline (correlation_id, occurred_at, stream_seq);

-- Where each saga stands, folded from its timeline after every entry.
CREATE TABLE sagas (
    correlation_id  uuid PRIMARY KEY,
    status          text NOT NULL,            -- the order's statuses: PENDING until it ends
    waiting_for     text,                     -- the service that owes the next event
    step            text,                     -- what it is expected to do
    started_at      timestamptz NOT NULL,
    last_event_at   timestamptz NOT NULL,
    last_event_type text NOT NULL,
    dead_letters    integer NOT NULL DEFAULT 0,
    stall_reported  boolean NOT NULL DEFAULT false
);
CREATE INDEX sagas_recent ON sagas (last_event_at DESC);
CREATE INDEX sagas_waiting ON sagas (status, last_event_at);
