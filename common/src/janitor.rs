//! Bounds what a service keeps only to recognise an event it may see again.
//!
//! Every service remembers each event it applied (`consumed_events`, the
//! guard behind the Redis claims, and a "done" marker in Redis) and each
//! order it learnt was cancelled before it took its step
//! (`cancelled_orders`). Both only matter while the event can still come
//! back: while the events stream holds it (JetStream redelivers, a replica
//! restarts from its ack floor) or while the dead-letter stream holds a copy
//! an operator may redrive.
//!
//! How long that is is what the streams hold now, not what they may hold at
//! most: a stream bounded by bytes keeps far less than its `max_age` under
//! load. The janitor asks the broker for the oldest message of each stream
//! ([`horizon`]) and deletes rows older than that, less a margin for clocks
//! and for the time an event takes to be dead-lettered, a chunk per
//! transaction. One thing stretches it: a redriven event is an old event
//! published anew, which consumers that applied it long ago must still
//! recognise; while the record of a redrive is in the events stream, rows
//! are kept as long as the dead-letter stream may keep a dead letter.
//!
//! Redis's done-markers live as long as the events stream holds events
//! ([`Horizon::redis`]); Redis only speeds up what the guard decides, so a
//! marker that goes sooner (expired, evicted under its memory limit) costs a
//! Postgres lookup, never a second effect.

use std::time::Duration;

use async_nats::jetstream::stream::Stream;
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::{Subjects, dlq::REDRIVE, idempotency::DoneTtl, meter::Meter};

/// Kept beyond what the streams hold, by default: clocks differ, and an
/// event that keeps failing is dead-lettered up to about 45 minutes after
/// the other consumers applied it (`CONSUMER_MAX_DELIVERIES` deliveries,
/// backing off to 30 s).
pub const MARGIN: Duration = Duration::from_secs(2 * 3600);
/// Rows deleted per transaction: short locks, bounded WAL per statement.
const CHUNK: i64 = 5_000;
/// How long asking the broker for a stream's retention may take.
const ASK_TIMEOUT: Duration = Duration::from_secs(5);

/// What one sweep deleted, per table.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    pub consumed_events: u64,
    pub cancelled_orders: u64,
}

/// The tables the janitor bounds, and the column that says how old a row is.
const TABLES: [(&str, &str); 2] = [
    ("consumed_events", "consumed_at"),
    ("cancelled_orders", "cancelled_at"),
];

/// How far back an event can still come back from, as the broker says now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Horizon {
    /// Since the oldest message the events stream holds (zero when empty).
    pub events: Duration,
    /// Since the oldest dead letter (zero when there is none).
    pub dead_letters: Duration,
    /// How long a guard row or cancel record must be kept (before the
    /// margin); `None`: for ever (a stream keeps messages for ever).
    pub guard: Option<Duration>,
}

impl Horizon {
    /// How long Redis remembers an applied event: while the events stream
    /// may redeliver it, at least a claim's length, at most eight days.
    pub fn redis(&self) -> Duration {
        self.events.clamp(
            crate::idempotency::STARTED_TTL,
            crate::idempotency::DONE_TTL,
        )
    }
}

/// What a stream holds now, and for how long it may keep a message.
struct Held {
    /// Since its oldest message; zero when it holds none.
    oldest: Duration,
    /// Its `max_age`: zero is for ever.
    max_age: Duration,
}

async fn held(js: &async_nats::jetstream::Context, name: &str) -> Option<(Stream, Held)> {
    let info = tokio::time::timeout(ASK_TIMEOUT, js.get_stream(name)).await;
    let Ok(Ok(stream)) = info else {
        tracing::warn!(
            stream = name,
            "janitor: the broker did not say what it holds"
        );
        return None;
    };
    // As of the call: `get_stream` asks the broker for the stream's info.
    let info = stream.cached_info().clone();
    let oldest = if info.state.messages == 0 {
        Duration::ZERO
    } else {
        let first = info.state.first_timestamp.unix_timestamp_nanos();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i128);
        Duration::from_nanos(u64::try_from(now.saturating_sub(first)).unwrap_or(0))
    };
    Some((
        stream,
        Held {
            oldest,
            max_age: info.config.max_age,
        },
    ))
}

/// What the events and dead-letter streams hold now. `None` when the
/// broker did not say (nothing is deleted then).
pub async fn horizon(js: &async_nats::jetstream::Context, subjects: &Subjects) -> Option<Horizon> {
    let (events_stream, events) = held(js, &subjects.events_stream()).await?;
    let (_, dead_letters) = held(js, &subjects.dead_letter_stream()).await?;
    // A redrive's record in the events stream: an event as old as the
    // dead-letter stream keeps them may have been published anew.
    let redriven = tokio::time::timeout(
        ASK_TIMEOUT,
        events_stream.get_last_raw_message_by_subject(&subjects.operator(REDRIVE)),
    )
    .await
    .ok()?;
    let redriven = match redriven {
        Ok(_) => true,
        Err(e)
            if e.kind()
                == async_nats::jetstream::stream::LastRawMessageErrorKind::NoMessageFound =>
        {
            false
        }
        Err(e) => {
            tracing::warn!(error = %e, "janitor: the broker did not say whether events were redriven");
            return None;
        }
    };
    let guard = if redriven {
        (!dead_letters.max_age.is_zero()).then(|| dead_letters.max_age + events.oldest)
    } else {
        Some(events.oldest.max(dead_letters.oldest))
    };
    Some(Horizon {
        events: events.oldest,
        dead_letters: dead_letters.oldest,
        guard,
    })
}

/// Deletes the rows recorded before `before`, a chunk per transaction.
pub async fn sweep(pool: &PgPool, before: DateTime<Utc>) -> sqlx::Result<Swept> {
    let mut swept = Swept::default();
    for (table, column) in TABLES {
        let sql = format!(
            "DELETE FROM {table} WHERE ctid = ANY(ARRAY(
                 SELECT ctid FROM {table} WHERE {column} < $1 LIMIT $2))"
        );
        loop {
            let deleted = sqlx::query(sqlx::AssertSqlSafe(sql.as_str()))
                .bind(before)
                .bind(CHUNK)
                .execute(pool)
                .await?
                .rows_affected();
            match table {
                "consumed_events" => swept.consumed_events += deleted,
                _ => swept.cancelled_orders += deleted,
            }
            if deleted < CHUNK as u64 {
                break;
            }
        }
    }
    Ok(swept)
}

/// A service's janitor: what it sweeps and how often.
pub struct Janitor {
    pub pool: PgPool,
    pub js: async_nats::jetstream::Context,
    pub subjects: Subjects,
    /// How often it sweeps (`JANITOR_EVERY_MS`).
    pub every: Duration,
    /// What it keeps beyond the streams' horizon (`JANITOR_MARGIN_MS`, [`MARGIN`]).
    pub margin: Duration,
    /// How long Redis remembers applied events: set at each sweep.
    pub done: DoneTtl,
    pub meter: Meter,
}

impl Janitor {
    /// Every `every` until shutdown (the first soon after start): asks the
    /// broker what the streams hold, sets how long Redis remembers applied
    /// events, and deletes rows older than the streams' [`horizon`] plus the
    /// margin.
    pub async fn run(self, shutdown: CancellationToken) {
        let Janitor {
            pool,
            js,
            subjects,
            every,
            margin,
            done,
            meter,
        } = self;
        // Not all at once with the start-up work.
        let mut wait = every.min(Duration::from_secs(10));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            wait = every;
            let Some(horizon) = horizon(&js, &subjects).await else {
                continue;
            };
            done.set(horizon.redis());
            let Some(kept) = horizon.guard else {
                continue;
            };
            let Some(before) = chrono::Duration::from_std(kept + margin)
                .ok()
                .and_then(|keep| Utc::now().checked_sub_signed(keep))
            else {
                continue;
            };
            match sweep(&pool, before).await {
                Ok(swept) => {
                    meter.janitor("consumed_events", swept.consumed_events);
                    meter.janitor("cancelled_orders", swept.cancelled_orders);
                    if swept != Swept::default() {
                        tracing::info!(
                            consumed_events = swept.consumed_events,
                            cancelled_orders = swept.cancelled_orders,
                            %before,
                            "janitor: forgot what can no longer come back"
                        );
                    }
                }
                Err(e) => tracing::warn!(error = %e, "janitor: sweep failed; tried again later"),
            }
        }
    }
}
