//! Idempotent consumption in two layers.
//!
//! 1. Redis, fast path: a short "started" claim per (consumer, event id) so two
//!    deliveries racing each other do not both do the work, and a long "done"
//!    marker so a redelivery is acknowledged without touching Postgres.
//! 2. Postgres, the guarantee: a `consumed_events` row inserted in the same
//!    transaction as the effect (see [`crate::outbox::enqueue_once`]). If
//!    Redis forgets (flush, restart, eviction), the insert conflicts and the
//!    transaction, effect included, is rolled back.

use std::time::Duration;

use redis::aio::ConnectionManager;
use uuid::Uuid;

/// How long a claim protects an event being applied: longer than any
/// transaction should take, and no longer than the consumer's ack wait
/// (10 s), so the redelivery of an event whose process died can claim it.
pub const STARTED_TTL: Duration = Duration::from_secs(10);
/// How long an applied event is remembered in Redis (the broker keeps events 7 days).
pub const DONE_TTL: Duration = Duration::from_secs(8 * 24 * 3600);

/// What the Redis layer says about an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// Ours to apply.
    Claimed,
    /// Another delivery is applying it right now.
    InProgress,
    /// Already applied.
    Done,
}

#[derive(Clone)]
pub struct IdempotencyStore {
    redis: ConnectionManager,
    prefix: String,
}

impl IdempotencyStore {
    pub fn new(redis: ConnectionManager, key_prefix: &str, consumer: &str) -> IdempotencyStore {
        IdempotencyStore {
            redis,
            prefix: format!("{key_prefix}:idem:{consumer}:"),
        }
    }

    fn key(&self, event_id: Uuid) -> String {
        format!("{}{event_id}", self.prefix)
    }

    /// Claims the event, or says who has it.
    pub async fn claim(&self, event_id: Uuid) -> redis::RedisResult<Claim> {
        let mut conn = self.redis.clone();
        // SET NX returns the previous value with GET (Redis >= 7): one round trip.
        let previous: Option<String> = redis::cmd("SET")
            .arg(self.key(event_id))
            .arg("started")
            .arg("NX")
            .arg("GET")
            .arg("PX")
            .arg(STARTED_TTL.as_millis() as u64)
            .query_async(&mut conn)
            .await?;
        Ok(match previous.as_deref() {
            None => Claim::Claimed,
            Some("done") => Claim::Done,
            Some(_) => Claim::InProgress,
        })
    }

    /// Marks the event applied (after the Postgres commit).
    pub async fn mark_done(&self, event_id: Uuid) -> redis::RedisResult<()> {
        let mut conn = self.redis.clone();
        redis::cmd("SET")
            .arg(self.key(event_id))
            .arg("done")
            .arg("PX")
            .arg(DONE_TTL.as_millis() as u64)
            .query_async::<()>(&mut conn)
            .await
    }

    /// Drops our claim after a rollback, so a redelivery can retry at once.
    pub async fn release(&self, event_id: Uuid) -> redis::RedisResult<()> {
        let mut conn = self.redis.clone();
        redis::cmd("DEL")
            .arg(self.key(event_id))
            .query_async::<()>(&mut conn)
            .await
    }
}
