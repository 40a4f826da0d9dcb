-- Operators' actions (sagactl's audit records) are entries of the saga
-- timeline too, keyed 'op:<action id>'.
ALTER TABLE saga_timeline DROP CONSTRAINT saga_timeline_kind_check;
ALTER TABLE saga_timeline ADD CONSTRAINT saga_timeline_kind_check
    CHECK (kind IN ('event', 'dead_letter', 'operator'));
