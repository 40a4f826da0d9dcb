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
use sqlx::{Connection, PgConnection, postgres::PgConnectOptions};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{event::Envelope, subjects::Subjects};

/// Rows looked at per round trip to the database.
const BATCH: i64 = 512;
/// Makes one relay of a service's replicas the leader, so they do not all
/// publish the same events.
const RELAY_LOCK: i64 = 0x5a6a_0007_0075_7462;

/// Columns of `events` as arrays, for one multi-row insert.
struct Columns {
    ids: Vec<Uuid>,
    subjects: Vec<String>,
    aggregates: Vec<String>,
    bodies: Vec<Vec<u8>>,
}

fn columns(subjects: &Subjects, events: &[Envelope]) -> Columns {
    let mut c = Columns {
        ids: Vec::with_capacity(events.len()),
        subjects: Vec::with_capacity(events.len()),
        aggregates: Vec::with_capacity(events.len()),
        bodies: Vec::with_capacity(events.len()),
    };
    for e in events {
        let kind = e.kind().expect("services only emit catalogued events");
        c.ids.push(e.event_id);
        c.subjects.push(subjects.event(kind));
        c.aggregates.push(e.aggregate_id.clone());
        c.bodies.push(e.to_bytes());
    }
    c
}

/// Appends `events` to the outbox inside the caller's transaction.
pub async fn enqueue(
    conn: &mut PgConnection,
    subjects: &Subjects,
    events: &[Envelope],
) -> Result<(), sqlx::Error> {
    if events.is_empty() {
        return Ok(());
    }
    let c = columns(subjects, events);
    sqlx::query(
        "INSERT INTO outbox (event_id, subject, aggregate_id, body)
         SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::bytea[])",
    )
    .bind(&c.ids)
    .bind(&c.subjects)
    .bind(&c.aggregates)
    .bind(&c.bodies)
    .execute(conn)
    .await?;
    Ok(())
}

/// Records `consumed` as applied by `consumer` (the Postgres idempotency
/// guard) and appends the events it caused, in one statement of the caller's
/// transaction. `false`: the event was already applied; the caller must roll
/// back, and nothing was appended.
pub async fn enqueue_once(
    conn: &mut PgConnection,
    subjects: &Subjects,
    consumer: &str,
    consumed: &Envelope,
    events: &[Envelope],
) -> Result<bool, sqlx::Error> {
    let c = columns(subjects, events);
    let fresh: i64 = sqlx::query_scalar(
        "WITH guard AS (
             INSERT INTO consumed_events (consumer, event_id, event_type) VALUES ($1, $2, $3)
             ON CONFLICT DO NOTHING RETURNING 1
         ), emitted AS (
             INSERT INTO outbox (event_id, subject, aggregate_id, body)
             SELECT * FROM UNNEST($4::uuid[], $5::text[], $6::text[], $7::bytea[])
             WHERE EXISTS (SELECT 1 FROM guard)
         )
         SELECT count(*) FROM guard",
    )
    .bind(consumer)
    .bind(consumed.event_id)
    .bind(&consumed.event_type)
    .bind(&c.ids)
    .bind(&c.subjects)
    .bind(&c.aggregates)
    .bind(&c.bodies)
    .fetch_one(conn)
    .await?;
    Ok(fresh == 1)
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
///
/// Per-aggregate order comes from what is picked: only an aggregate's
/// earliest pending event, deleted only once the broker has stored it, so
/// the next event of that aggregate cannot be picked (by this relay or any
/// other) before the previous one is in the stream.
///
/// One relay per service database leads at a time (a session advisory lock
/// on its own connection), so replicas do not publish the same events twice
/// over; a standby takes over as soon as the leader's connection closes. The
/// connection commits asynchronously: losing a relay's delete in a crash only
/// means events are published again, and the broker (`Nats-Msg-Id`) and the
/// consumers (idempotency) drop the copies.
#[derive(Clone)]
pub struct Relay {
    options: PgConnectOptions,
    js: jetstream::Context,
    signal: OutboxSignal,
    poll: Duration,
}

struct Row {
    id: i64,
    event_id: Uuid,
    subject: String,
    body: Vec<u8>,
}

impl Relay {
    /// `options`: how to reach the service's database.
    pub fn new(
        options: PgConnectOptions,
        js: jetstream::Context,
        signal: OutboxSignal,
        poll: Duration,
    ) -> Relay {
        Relay {
            options: options.options([("synchronous_commit", "off")]),
            js,
            signal,
            poll,
        }
    }

    /// Runs until `shutdown`, then flushes what is already committed.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut failures = 0u32;
        let mut leader: Option<PgConnection> = None;
        loop {
            match self.lead(&mut leader).await {
                Ok(_) => failures = 0,
                Err(e) => {
                    failures += 1;
                    leader = None; // closing the connection releases the lock
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
        if let Err(e) = self.lead(&mut leader).await {
            tracing::warn!(error = %e, "outbox not flushed at shutdown; it is published on next start");
        }
    }

    /// Becomes leader if no one is, then publishes everything pending.
    async fn lead(&self, leader: &mut Option<PgConnection>) -> Result<usize, RelayError> {
        if leader.is_none() {
            let mut conn = PgConnection::connect_with(&self.options).await?;
            let held: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                .bind(RELAY_LOCK)
                .fetch_one(&mut conn)
                .await?;
            if !held {
                // Another replica leads; try again at the next wake-up.
                return Ok(0);
            }
            *leader = Some(conn);
        }
        let conn = leader.as_mut().expect("leader connection");
        let mut total = 0;
        loop {
            let published = self.publish_batch(conn).await?;
            total += published;
            if published == 0 {
                return Ok(total);
            }
        }
    }

    /// Publishes the earliest pending event of each aggregate among the
    /// oldest rows, pipelined, then deletes the acknowledged ones. With at
    /// most one event per aggregate in flight, a partial failure can never
    /// reorder an aggregate's events: what was not acknowledged stays first.
    async fn publish_batch(&self, conn: &mut PgConnection) -> Result<usize, RelayError> {
        let rows: Vec<Row> = sqlx::query_as::<_, (i64, Uuid, String, Vec<u8>)>(
            "SELECT id, event_id, subject, body FROM (
                 SELECT o.*, row_number() OVER (PARTITION BY aggregate_id ORDER BY id) AS nth
                 FROM (SELECT * FROM outbox ORDER BY id LIMIT $1) o
             ) ranked
             WHERE nth = 1 ORDER BY id",
        )
        .bind(BATCH)
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .map(|(id, event_id, subject, body)| Row {
            id,
            event_id,
            subject,
            body,
        })
        .collect();
        if rows.is_empty() {
            return Ok(0);
        }

        let mut pending = Vec::with_capacity(rows.len());
        let mut failure = None;
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
                    failure = Some(e.to_string());
                    break;
                }
            }
        }
        let mut acked = Vec::with_capacity(pending.len());
        for (id, ack) in pending {
            match ack.await {
                Ok(_) => acked.push(id),
                Err(e) => {
                    failure.get_or_insert(e.to_string());
                }
            }
        }
        if !acked.is_empty() {
            sqlx::query("DELETE FROM outbox WHERE id = ANY($1)")
                .bind(&acked)
                .execute(&mut *conn)
                .await?;
        }
        if let Some(e) = failure {
            tracing::warn!(error = %e, published = acked.len(), "publish failed; unacknowledged events stay in the outbox");
            return Ok(0);
        }
        Ok(acked.len())
    }
}
