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

/// How long an applied event's done marker may wait to ride on the next
/// claim's round trip before it is written on its own. Meanwhile the event
/// holds its "started" claim ([`STARTED_TTL`]), so a redelivery is retried
/// a little later instead of acked at once; the Postgres guard decides
/// either way.
pub const DONE_RIDES_FOR: Duration = Duration::from_millis(50);

#[derive(Clone)]
pub struct IdempotencyStore {
    redis: Redis,
    prefix: String,
    done_ttl: DoneTtl,
    /// Events applied whose done markers are not written yet.
    due: Arc<Mutex<Vec<Uuid>>>,
    /// Wakes the task that writes the markers no claim took along (started
    /// with the first marker; it ends when the last clone is dropped).
    flusher: Arc<std::sync::OnceLock<tokio::sync::mpsc::Sender<()>>>,
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
            due: Arc::default(),
            flusher: Arc::default(),
        }
    }

    fn key(&self, event_id: Uuid) -> String {
        format!("{}{event_id}", self.prefix)
    }

    /// Adds a done marker for each of `event_ids` to `pipe`.
    fn add_done(&self, pipe: &mut redis::Pipeline, event_ids: &[Uuid]) {
        let ttl = self.done_ttl.get().as_millis() as u64;
        for id in event_ids {
            pipe.cmd("SET")
                .arg(self.key(*id))
                .arg("done")
                .arg("PX")
                .arg(ttl)
                .ignore();
        }
    }

    /// The done markers waiting to be written, taken.
    fn take_due(&self) -> Vec<Uuid> {
        std::mem::take(&mut *self.due.lock().expect("done markers lock"))
    }

    /// Claims each event, or says who has it, in one round trip, answering
    /// for each in order; [`Claim::Unavailable`] when Redis cannot answer
    /// in time.
    pub async fn claim_all(&self, event_ids: &[Uuid]) -> Vec<Claim> {
        if event_ids.is_empty() {
            return Vec::new();
        }
        // The done markers waiting go first, in the same round trip (a
        // marker for one of these events is then seen by its claim).
        let mut pipe = redis::pipe();
        self.add_done(&mut pipe, &self.take_due());
        // SET NX returns the previous value with GET (Redis >= 7).
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

    /// Marks the events applied (after the Postgres commit), now.
    pub async fn mark_done(&self, event_ids: &[Uuid]) -> Result<(), Unavailable> {
        if event_ids.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        self.add_done(&mut pipe, event_ids);
        self.redis.pipe::<()>(&pipe).await
    }

    /// Marks the events applied (after the Postgres commit) on the next
    /// claim's round trip, or on their own within [`DONE_RIDES_FOR`]: a
    /// round trip to Redis fewer per batch. Markers lost with a failed
    /// round trip or a killed process cost only a redelivery's trip to the
    /// Postgres guard.
    pub fn mark_done_soon(&self, event_ids: &[Uuid]) {
        if event_ids.is_empty() {
            return;
        }
        let first = {
            let mut due = self.due.lock().expect("done markers lock");
            let first = due.is_empty();
            due.extend_from_slice(event_ids);
            first
        };
        if first {
            // Full: a wake-up is pending already.
            let _ = self
                .flusher
                .get_or_init(|| self.spawn_flusher())
                .try_send(());
        }
    }

    /// Writes the done markers still waiting (at shutdown).
    pub async fn flush_done(&self) -> Result<(), Unavailable> {
        self.mark_done(&self.take_due()).await
    }

    /// The task that writes the markers no claim took along within
    /// [`DONE_RIDES_FOR`] of the first of them.
    fn spawn_flusher(&self) -> tokio::sync::mpsc::Sender<()> {
        let (wake, mut woken) = tokio::sync::mpsc::channel::<()>(1);
        let store = IdempotencyStore {
            // Not this store's sender: the task ends with the last clone.
            flusher: Arc::default(),
            ..self.clone()
        };
        tokio::spawn(async move {
            while woken.recv().await.is_some() {
                tokio::time::sleep(DONE_RIDES_FOR).await;
                let _ = store.flush_done().await;
            }
        });
        wake
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
