//! Transactional outbox: events are written in the same Postgres transaction as
//! the state change that produced them, and a relay publishes them to JetStream.
//!
//! The relay is woken in-process right after a commit ([`OutboxSignal`]), with a
//! slow poll only as a fallback (events left by a crashed process, another
//! replica's commits). A row is deleted only after its PubAck, so a crash
//! between commit and publish loses nothing; the broker deduplicates the
//! republish by `Nats-Msg-Id` = event id.

use std::{sync::Arc, time::Duration};

use async_nats::{HeaderMap, jetstream};
use sqlx::{PgConnection, PgPool};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{event::Envelope, subjects::Subjects};

/// Rows published per round trip to the database.
const BATCH: i64 = 512;
/// Serializes relays of several replicas of one service, which keeps
/// per-aggregate order across replicas.
const RELAY_LOCK: i64 = 0x5a6a_0007_0075_7462;

/// Appends `events` to the outbox inside the caller's transaction.
pub async fn enqueue(
    conn: &mut PgConnection,
    subjects: &Subjects,
    events: &[Envelope],
) -> Result<(), sqlx::Error> {
    if events.is_empty() {
        return Ok(());
    }
    let mut ids = Vec::with_capacity(events.len());
    let mut subs = Vec::with_capacity(events.len());
    let mut aggs = Vec::with_capacity(events.len());
    let mut bodies = Vec::with_capacity(events.len());
    for e in events {
        let kind = e.kind().expect("services only emit catalogued events");
        ids.push(e.event_id);
        subs.push(subjects.event(kind));
        aggs.push(e.aggregate_id.clone());
        bodies.push(e.to_bytes());
    }
    sqlx::query(
        "INSERT INTO outbox (event_id, subject, aggregate_id, body)
         SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::bytea[])",
    )
    .bind(&ids)
    .bind(&subs)
    .bind(&aggs)
    .bind(&bodies)
    .execute(conn)
    .await?;
    Ok(())
}

/// Wakes the relay after a commit. Cheap to clone; a wake-up with the relay
/// busy is remembered, so no commit is ever left waiting for the poll.
#[derive(Clone, Default)]
pub struct OutboxSignal(Arc<Notify>);

impl OutboxSignal {
    pub fn notify(&self) {
        self.0.notify_one();
    }
    async fn notified(&self) {
        self.0.notified().await
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("outbox database error: {0}")]
    Db(#[from] sqlx::Error),
}

/// Publishes outbox rows to JetStream.
#[derive(Clone)]
pub struct Relay {
    pool: PgPool,
    js: jetstream::Context,
    signal: OutboxSignal,
    poll: Duration,
}

struct Row {
    id: i64,
    event_id: Uuid,
    subject: String,
    aggregate_id: String,
    body: Vec<u8>,
}

impl Relay {
    pub fn new(
        pool: PgPool,
        js: jetstream::Context,
        signal: OutboxSignal,
        poll: Duration,
    ) -> Relay {
        Relay {
            pool,
            js,
            signal,
            poll,
        }
    }

    /// Runs until `shutdown`, then flushes what is already committed.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut failures = 0u32;
        loop {
            match self.publish_pending().await {
                Ok(_) => failures = 0,
                Err(e) => {
                    failures += 1;
                    tracing::warn!(error = %e, failures, "outbox relay failed; retrying");
                }
            }
            let wait = if failures == 0 {
                self.poll
            } else {
                Duration::from_millis(50u64 << failures.min(7))
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.signal.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
        if let Err(e) = self.publish_pending().await {
            tracing::warn!(error = %e, "outbox not flushed at shutdown; it is published on next start");
        }
    }

    /// Publishes until the outbox is empty (or another replica holds the
    /// relay lock). Returns how many events were published.
    pub async fn publish_pending(&self) -> Result<usize, RelayError> {
        let mut total = 0;
        loop {
            let (published, more) = self.publish_batch().await?;
            total += published;
            if !more {
                return Ok(total);
            }
        }
    }

    /// One batch: returns (published, whether more rows may be waiting).
    async fn publish_batch(&self) -> Result<(usize, bool), RelayError> {
        let mut tx = self.pool.begin().await?;
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
            .bind(RELAY_LOCK)
            .fetch_one(&mut *tx)
            .await?;
        if !locked {
            return Ok((0, false));
        }
        let rows: Vec<(i64, Uuid, String, String, Vec<u8>)> = sqlx::query_as(
            "SELECT id, event_id, subject, aggregate_id, body FROM outbox ORDER BY id LIMIT $1",
        )
        .bind(BATCH)
        .fetch_all(&mut *tx)
        .await?;
        let full = rows.len() as i64 == BATCH;
        let rows = one_per_aggregate(rows.into_iter().map(
            |(id, event_id, subject, aggregate_id, body)| Row {
                id,
                event_id,
                subject,
                aggregate_id,
                body,
            },
        ));
        let cut = rows.len() as i64 != BATCH && full;
        if rows.is_empty() {
            return Ok((0, false));
        }

        // Pipelined: send everything, then collect the PubAcks. A batch holds at
        // most one event per aggregate, so a partial failure cannot reorder an
        // aggregate's events: the unacknowledged ones stay and go out first next time.
        let mut pending = Vec::with_capacity(rows.len());
        let mut send_error = None;
        for row in &rows {
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Msg-Id", row.event_id.to_string().as_str());
            match self
                .js
                .publish_with_headers(row.subject.clone(), headers, row.body.clone().into())
                .await
            {
                Ok(ack) => pending.push((row.id, ack)),
                Err(e) => {
                    send_error = Some(e.to_string());
                    break;
                }
            }
        }
        let mut acked = Vec::with_capacity(pending.len());
        for (id, ack) in pending {
            match ack.await {
                Ok(_) => acked.push(id),
                Err(e) => {
                    send_error.get_or_insert(e.to_string());
                }
            }
        }
        if !acked.is_empty() {
            sqlx::query("DELETE FROM outbox WHERE id = ANY($1)")
                .bind(&acked)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        if let Some(e) = send_error {
            tracing::warn!(error = %e, published = acked.len(), "publish failed; unacknowledged events stay in the outbox");
            return Ok((acked.len(), false));
        }
        Ok((acked.len(), full || cut))
    }
}

/// Takes rows in order up to (not including) the second event of any aggregate.
fn one_per_aggregate(rows: impl Iterator<Item = Row>) -> Vec<Row> {
    let mut seen = std::collections::HashSet::new();
    rows.take_while(|r| seen.insert(r.aggregate_id.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: i64, agg: &str) -> Row {
        Row {
            id,
            event_id: Uuid::nil(),
            subject: String::new(),
            aggregate_id: agg.into(),
            body: vec![],
        }
    }

    #[test]
    fn a_batch_stops_before_an_aggregates_second_event() {
        let rows = vec![row(1, "a"), row(2, "b"), row(3, "a"), row(4, "c")];
        let ids: Vec<i64> = one_per_aggregate(rows.into_iter())
            .iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(ids, vec![1, 2]);
    }
}
