//! Idempotent consumption in two layers.
//!
//! 1. Redis, fast path: a short "started" claim per (consumer, event id) so two
//!    deliveries racing each other do not both do the work, and a long "done"
//!    marker so a redelivery is acknowledged without touching Postgres.
//! 2. Postgres, the guarantee: a `consumed_events` row inserted in the same
//!    transaction as the effect (see [`crate::outbox::enqueue_once`]). If
//!    Redis forgets (flush, restart, eviction), the insert conflicts and the
//!    transaction, effect included, is rolled back.
//!
//! Redis is therefore an optimisation, never a dependency: every call has a
//! deadline, and when Redis is down, hung or not yet reachable the consumers
//! go on with the Postgres guard alone ([`Claim::Unavailable`]). A short
//! circuit breaker keeps a dead Redis from costing a timeout per event; the
//! service reports itself degraded meanwhile and reconnects by itself.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::OnceCell;
use uuid::Uuid;

use crate::{
    backoff::backoff,
    health::{Condition, Health},
};

/// How long a claim protects an event being applied: longer than any
/// transaction should take, and no longer than the consumer's ack wait
/// (10 s), so the redelivery of an event whose process died can claim it.
pub const STARTED_TTL: Duration = Duration::from_secs(10);
/// The longest an applied event is remembered in Redis (the events stream
/// keeps events 7 days at most).
pub const DONE_TTL: Duration = Duration::from_secs(8 * 24 * 3600);
/// How long an applied event is remembered in Redis until the janitor has
/// asked the broker how long the events stream holds events.
pub const DONE_TTL_UNMEASURED: Duration = Duration::from_secs(3600);

/// How long an applied event is remembered in Redis: as long as the events
/// stream holds events ([`crate::janitor::Horizon::redis`]), set by the
/// janitor. Cheap to clone; every clone sees the latest.
#[derive(Clone)]
pub struct DoneTtl(Arc<AtomicU64>);

impl Default for DoneTtl {
    fn default() -> Self {
        DoneTtl(Arc::new(AtomicU64::new(
            DONE_TTL_UNMEASURED.as_millis() as u64
        )))
    }
}

impl DoneTtl {
    pub fn set(&self, ttl: Duration) {
        let ms = ttl.clamp(STARTED_TTL, DONE_TTL).as_millis() as u64;
        self.0.store(ms, Ordering::Relaxed);
    }

    pub fn get(&self) -> Duration {
        Duration::from_millis(self.0.load(Ordering::Relaxed))
    }
}
/// Deadline of one Redis command.
pub const CALL_TIMEOUT: Duration = Duration::from_millis(500);
/// After a failed call, Redis is not asked again for this long.
pub const BREAKER_OPEN_FOR: Duration = Duration::from_secs(2);
/// Name of Redis in the health board.
pub const HEALTH_PART: &str = "redis";

/// What the Redis layer says about an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// Ours to apply.
    Claimed,
    /// Another delivery is applying it right now.
    InProgress,
    /// Already applied.
    Done,
    /// Redis cannot say: apply it, the Postgres guard decides.
    Unavailable,
}

/// Why Redis did not answer.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct Unavailable(pub String);

/// A Redis connection that may not exist yet, with deadlines and a breaker.
#[derive(Clone)]
pub struct Redis {
    conn: Arc<OnceCell<ConnectionManager>>,
    open_until: Arc<Mutex<Option<Instant>>>,
    health: Health,
}

impl Redis {
    /// Connects in the background, retrying until Redis answers; until then
    /// every call is [`Unavailable`]. `health` hears of every change.
    pub fn connect(url: &str, health: Health) -> Result<Redis, redis::RedisError> {
        let client = redis::Client::open(url)?;
        let redis = Redis {
            conn: Arc::new(OnceCell::new()),
            open_until: Arc::new(Mutex::new(None)),
            health,
        };
        redis
            .health
            .report(HEALTH_PART, Condition::Degraded("not connected yet".into()));
        let cell = redis.conn.clone();
        let health = redis.health.clone();
        tokio::spawn(async move {
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(Duration::from_secs(1)))
                .set_response_timeout(Some(CALL_TIMEOUT))
                .set_number_of_retries(2)
                .set_max_delay(Duration::from_secs(1));
            let mut attempt = 0;
            loop {
                attempt += 1;
                match ConnectionManager::new_with_config(client.clone(), config.clone()).await {
                    Ok(conn) => {
                        let _ = cell.set(conn);
                        if health.ok(HEALTH_PART) {
                            tracing::info!("connected to redis");
                        }
                        return;
                    }
                    Err(e) => {
                        let detail =
                            format!("unreachable, consuming on the Postgres guard alone: {e}");
                        if health.report(HEALTH_PART, Condition::Degraded(detail)) {
                            tracing::warn!(error = %e, "redis unreachable; consuming on the postgres guard alone");
                        }
                        tokio::time::sleep(backoff(attempt, Duration::from_secs(5))).await;
                    }
                }
            }
        });
        Ok(redis)
    }

    /// Runs `cmd` within [`CALL_TIMEOUT`], unless Redis is known to be down.
    pub async fn call<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, Unavailable> {
        self.guarded(|mut conn| async move { cmd.query_async(&mut conn).await })
            .await
    }

    /// Runs `pipe` (many commands, one round trip) like [`Self::call`].
    pub async fn pipe<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
    ) -> Result<T, Unavailable> {
        self.guarded(|mut conn| async move { pipe.query_async(&mut conn).await })
            .await
    }

    /// Asks Redis through `query` within [`CALL_TIMEOUT`], unless it is
    /// known to be down; a failure opens the breaker.
    async fn guarded<T, F>(
        &self,
        query: impl FnOnce(ConnectionManager) -> F,
    ) -> Result<T, Unavailable>
    where
        F: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let Some(conn) = self.conn.get() else {
            return Err(Unavailable("redis not connected".into()));
        };
        if let Some(until) = *self.open_until.lock().expect("breaker lock")
            && Instant::now() < until
        {
            return Err(Unavailable("redis recently failed; not asked".into()));
        }
        let result = match tokio::time::timeout(CALL_TIMEOUT, query(conn.clone())).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {CALL_TIMEOUT:?}")),
        };
        match result {
            Ok(v) => {
                *self.open_until.lock().expect("breaker lock") = None;
                if self.health.ok(HEALTH_PART) {
                    tracing::info!("redis answers again");
                }
                Ok(v)
            }
            Err(e) => {
                *self.open_until.lock().expect("breaker lock") =
                    Some(Instant::now() + BREAKER_OPEN_FOR);
                let detail = format!("consuming on the Postgres guard alone: {e}");
                if self.health.report(HEALTH_PART, Condition::Degraded(detail)) {
                    tracing::warn!(error = %e, "redis unavailable; consuming on the postgres guard alone");
                }
                Err(Unavailable(e))
            }
        }
    }

    /// PING with the same deadline, ignoring the breaker (for readiness).
    pub async fn ping(&self) -> Result<(), Unavailable> {
        let Some(conn) = self.conn.get() else {
            return Err(Unavailable("not connected".into()));
        };
        let mut conn = conn.clone();
        match tokio::time::timeout(
            CALL_TIMEOUT,
            redis::cmd("PING").query_async::<String>(&mut conn),
        )
        .await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(Unavailable(e.to_string())),
            Err(_) => Err(Unavailable(format!("no answer within {CALL_TIMEOUT:?}"))),
        }
    }
}

#[derive(Clone)]
pub struct IdempotencyStore {
    redis: Redis,
    prefix: String,
    done_ttl: DoneTtl,
}

impl IdempotencyStore {
    pub fn new(
        redis: Redis,
        key_prefix: &str,
        consumer: &str,
        done_ttl: DoneTtl,
    ) -> IdempotencyStore {
        IdempotencyStore {
            redis,
            prefix: format!("{key_prefix}:idem:{consumer}:"),
            done_ttl,
        }
    }

    fn key(&self, event_id: Uuid) -> String {
        format!("{}{event_id}", self.prefix)
    }

    /// Claims each event, or says who has it, in one round trip, answering
    /// for each in order; [`Claim::Unavailable`] when Redis cannot answer
    /// in time.
    pub async fn claim_all(&self, event_ids: &[Uuid]) -> Vec<Claim> {
        if event_ids.is_empty() {
            return Vec::new();
        }
        // SET NX returns the previous value with GET (Redis >= 7).
        let mut pipe = redis::pipe();
        for id in event_ids {
            pipe.cmd("SET")
                .arg(self.key(*id))
                .arg("started")
                .arg("NX")
                .arg("GET")
                .arg("PX")
                .arg(STARTED_TTL.as_millis() as u64);
        }
        match self.redis.pipe::<Vec<Option<String>>>(&pipe).await {
            Ok(previous) if previous.len() == event_ids.len() => previous
                .into_iter()
                .map(|v| match v.as_deref() {
                    None => Claim::Claimed,
                    Some("done") => Claim::Done,
                    Some(_) => Claim::InProgress,
                })
                .collect(),
            _ => vec![Claim::Unavailable; event_ids.len()],
        }
    }

    /// Marks the events applied (after the Postgres commit).
    pub async fn mark_done(&self, event_ids: &[Uuid]) -> Result<(), Unavailable> {
        if event_ids.is_empty() {
            return Ok(());
        }
        let ttl = self.done_ttl.get().as_millis() as u64;
        let mut pipe = redis::pipe();
        for id in event_ids {
            pipe.cmd("SET")
                .arg(self.key(*id))
                .arg("done")
                .arg("PX")
                .arg(ttl)
                .ignore();
        }
        self.redis.pipe::<()>(&pipe).await
    }

    /// Drops our claims after a rollback, so a redelivery can retry at once.
    pub async fn release(&self, event_ids: &[Uuid]) -> Result<(), Unavailable> {
        if event_ids.is_empty() {
            return Ok(());
        }
        let mut cmd = redis::cmd("DEL");
        for id in event_ids {
            cmd.arg(self.key(*id));
        }
        self.redis.call::<()>(&cmd).await
    }
}
