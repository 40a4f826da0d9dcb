-- Which of a service's replicas publishes its outbox: the holder of a lease
-- it renews every few seconds. A standby takes the lease over once it has
-- expired (a leader frozen, hung or cut off) or once the holder's database
-- session is gone (a leader that died). See common/src/relay_lease.rs.
CREATE TABLE IF NOT EXISTS relay_lease (
    -- One row per database.
    id          BOOLEAN     PRIMARY KEY DEFAULT true CHECK (id),
    -- "<service> relay, pid <pid> (<random>)": unique per relay run.
    holder      TEXT        NOT NULL,
    -- The holder's database session, to see at once that it is gone.
    backend_pid INTEGER     NOT NULL,
    -- Raised by one at each change of holder.
    epoch       BIGINT      NOT NULL,
    renewed_at  TIMESTAMPTZ NOT NULL,
    expires_at  TIMESTAMPTZ NOT NULL
);
