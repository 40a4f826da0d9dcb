-- Every change to a product's stock (set, adjustment, reservation, release)
-- bumps its version: the ETag an absolute PUT must match (If-Match), so a
-- level set from a stale read cannot undo a reservation made meanwhile.
ALTER TABLE stock ADD COLUMN version BIGINT NOT NULL DEFAULT 1;
