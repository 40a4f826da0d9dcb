//! The database connection a lane applies its batches on, kept from one
//! batch to the next.
//!
//! A connection given back to sqlx's pool is pinged on its way back (a
//! round trip to Postgres and a wake of its backend, on a task of its own):
//! one more round trip for every transaction. A lane applies its batches one
//! after another, so it keeps the connection its last batch committed on
//! and begins the next one on it, and gives it back to the pool only once
//! it has been idle for [`IDLE_FOR`], or after a batch that did not commit
//! (the pool's ping then says whether it is still usable).
//!
//! Lanes keep connections only while they take at most half the pool: the
//! rest is left to the service's requests and to the other lanes' batches.

use std::time::Duration;

use sqlx::{PgPool, Postgres, pool::PoolConnection};

/// How long a lane keeps a connection it has no batch for.
pub const IDLE_FOR: Duration = Duration::from_secs(1);

/// A lane's connection, if it keeps one.
pub(super) struct LaneConnection {
    pool: PgPool,
    kept: Option<PoolConnection<Postgres>>,
    keeps: bool,
}

impl LaneConnection {
    /// For one of `lanes` lanes on `pool`.
    pub fn new(pool: PgPool, lanes: usize) -> LaneConnection {
        let keeps = lanes.saturating_mul(2) <= pool.options().get_max_connections() as usize;
        LaneConnection {
            pool,
            kept: None,
            keeps,
        }
    }

    /// The connection kept from the last batch, or one from the pool.
    pub async fn take(&mut self) -> sqlx::Result<PoolConnection<Postgres>> {
        match self.kept.take() {
            Some(conn) => Ok(conn),
            None => self.pool.acquire().await,
        }
    }

    /// Takes `conn` back after a batch: kept if the batch committed (it is
    /// then outside any transaction), given back to the pool otherwise.
    pub fn give_back(&mut self, conn: PoolConnection<Postgres>, committed: bool) {
        if committed && self.keeps {
            self.kept = Some(conn);
        }
    }

    /// Whether a connection is kept (to be given back once idle).
    pub fn keeps_one(&self) -> bool {
        self.kept.is_some()
    }

    /// Gives the kept connection back to the pool.
    pub fn release(&mut self) {
        self.kept = None;
    }
}
