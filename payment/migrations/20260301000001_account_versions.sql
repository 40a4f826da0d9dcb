-- Every change to an account (set, deposit, charge, refund) bumps its
-- version: the ETag an absolute PUT must match (If-Match), so a balance set
-- from a stale read cannot erase a charge or a deposit made meanwhile.
ALTER TABLE accounts ADD COLUMN version BIGINT NOT NULL DEFAULT 1;
