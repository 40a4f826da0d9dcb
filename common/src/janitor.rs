//! Bounds what a service keeps only to recognise an event it may see again.
//!
//! Every service remembers each event it applied (`consumed_events`, the
//! guard behind the Redis claims) and each order it learnt was cancelled
//! before it took its step (`cancelled_orders`). Both only matter while the
//! event can still come back: while the events stream keeps it (JetStream
//! redelivers, a replica restarts from its ack floor) or while the
//! dead-letter stream keeps a copy an operator may redrive. The janitor asks
//! the broker how long each stream keeps messages (`max_age`), adds a margin,
//! and deletes rows older than that, a chunk per transaction. A stream that
//! keeps messages forever (no `max_age`) means nothing is ever deleted.
//!
//! Redis's done-markers expire by themselves (see [`crate::idempotency`]);
//! the dead-letter stream is bounded by its own `max_age`
//! (`nats/streams/dlq.json`).

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::{Subjects, meter::Meter};

/// Kept beyond the streams' retention: clocks differ, a redrive takes time.
pub const MARGIN: Duration = Duration::from_secs(24 * 3600);
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

/// How long an event may still come back: the longer `max_age` of the
/// events and dead-letter streams. `None` when either keeps messages
/// forever, or the broker did not say.
pub async fn retention(
    js: &async_nats::jetstream::Context,
    subjects: &Subjects,
) -> Option<Duration> {
    let mut longest = Duration::ZERO;
    for stream in [subjects.events_stream(), subjects.dead_letter_stream()] {
        let info = tokio::time::timeout(ASK_TIMEOUT, js.get_stream(&stream)).await;
        let max_age = match info {
            Ok(Ok(s)) => s.cached_info().config.max_age,
            _ => {
                tracing::warn!(
                    stream,
                    "janitor: the broker did not say how long it keeps events"
                );
                return None;
            }
        };
        if max_age.is_zero() {
            return None;
        }
        longest = longest.max(max_age);
    }
    Some(longest)
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

/// Sweeps every `every` until shutdown (the first soon after start),
/// rows older than the streams' retention plus [`MARGIN`].
pub async fn run(
    pool: PgPool,
    js: async_nats::jetstream::Context,
    subjects: Subjects,
    every: Duration,
    meter: Meter,
    shutdown: CancellationToken,
) {
    // Not all at once with the start-up work.
    let mut wait = every.min(Duration::from_secs(10));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        wait = every;
        let Some(kept) = retention(&js, &subjects).await else {
            continue;
        };
        let Some(before) = chrono::Duration::from_std(kept + MARGIN)
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
