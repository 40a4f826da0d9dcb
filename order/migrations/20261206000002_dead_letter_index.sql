-- The dead letters of every saga, newest first (the page's dead-letter view):
-- a dead letter's stream_seq is its sequence in SAGA_DLQ, which sagactl
-- redrives by.
CREATE INDEX saga_timeline_dead_letters ON saga_timeline (stream_seq DESC)
    WHERE kind = 'dead_letter';
