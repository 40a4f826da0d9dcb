-- The latest snapshot of each order: its state at `version`, so a load reads
-- it and the events after it. `format` names the shape and meaning of the
-- state (order/src/snapshot.rs): a snapshot in another format is never
-- trusted, and the next one taken replaces it. Dropping every row loses
-- nothing: the events are the truth.
CREATE TABLE order_snapshots (
    order_id UUID        PRIMARY KEY,
    version  BIGINT      NOT NULL CHECK (version > 0),
    format   TEXT        NOT NULL,
    state    JSONB       NOT NULL,
    taken_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
