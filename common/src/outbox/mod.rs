//! Transactional outbox: events are written in the same Postgres transaction as
//! the state change that produced them, and a relay publishes them to JetStream.
//!
//! The relay is woken in-process right after a commit ([`OutboxSignal`]), with a
//! slow poll only as a fallback (events left by a crashed process, another
//! replica's commits); a consumer's commit hands its rows over, so the relay
//! need not read them back ([`signal`]). A row is deleted only after its
//! PubAck, so a crash between commit and publish loses nothing; the broker
//! deduplicates the republish by `Nats-Msg-Id` = event id.

mod signal;

use std::{
    sync::LazyLock,
    time::{Duration, Instant},
};

use async_nats::{
    HeaderMap, header,
    jetstream::{self, context::PublishErrorKind},
};
use sqlx::{
    Connection, PgConnection, Postgres, Row as _,
    postgres::{PgArguments, PgConnectOptions, PgRow},
    query::Query,
};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    backoff::backoff,
    broker::max_payload,
    event::Envelope,
    health::{Condition, Health},
    meter::Meter,
    relay_lease::{self, Asked, Lead},
    subjects::Subjects,
    trace::{self, Trace},
};
use signal::HandedRow;
pub use signal::{Handover, OutboxSignal};

/// Bytes the relay adds to an event on the wire besides its body: the
/// `Nats-Msg-Id` header (a UUID), the `traceparent` header (55 bytes) and
/// the header framing, with room to spare.
pub const PUBLISH_OVERHEAD: usize = 256;

/// Whether `event` can ever be published to a broker whose `max_payload`
/// is `max_payload`; checked before an event is written to the outbox, so
/// what is committed can always be relayed. `Err` says why not.
pub fn check_fits(event: &Envelope, max_payload: usize) -> Result<(), String> {
    fits(event, event.to_bytes().len(), max_payload)
}

fn fits(event: &Envelope, body_len: usize, max_payload: usize) -> Result<(), String> {
    let size = body_len + PUBLISH_OVERHEAD;
    if size > max_payload {
        return Err(format!(
            "{} {} would be {size} bytes on the wire, over the broker's max_payload of {max_payload}",
            event.event_type, event.event_id
        ));
    }
    Ok(())
}

/// Names of the relay in the health board.
pub const HEALTH_RELAY: &str = "relay";
pub const HEALTH_PARKED: &str = "outboxParked";
/// Whether the relay's leader (this replica or another) is heard from.
pub const HEALTH_LEAD: &str = "relayLeader";

/// Longest wait between two attempts of a relay that keeps failing.
const RELAY_BACKOFF_CAP: Duration = Duration::from_millis(6_400);
/// Rows looked at per round trip to the database.
const BATCH: i64 = 512;
/// Most events in one atomic batch, and most bytes: the broker holds a
/// batch until its commit (and takes at most 1,000 messages in one).
const ATOMIC_EVENTS: usize = 256;
const ATOMIC_BYTES: usize = 4 << 20;
/// Fewest events published as one atomic batch. Under `sync_interval:
/// always` nats-server (2.15) spends about 2.5 ms on an atomic batch
/// whatever its size (it stages the batch in a store of its own, written
/// and removed on disk), against about 0.3 ms per event published on its
/// own with the acknowledgements awaited together: below this many, one by
/// one is the faster, and costs the broker less.
const ATOMIC_FROM: usize = 8;
/// The headers of an atomic batch publish (nats-server 2.12 and later, on a
/// stream with `allow_atomic`).
const BATCH_ID: &str = "Nats-Batch-Id";
const BATCH_SEQUENCE: &str = "Nats-Batch-Sequence";
const BATCH_COMMIT: &str = "Nats-Batch-Commit";
/// How long asking the broker about a stream may take.
const STREAM_INFO_TIMEOUT: Duration = Duration::from_secs(5);
/// Default length of the relay lease: a standby leads within about this
/// long of the leader going silent.
pub const LEASE: Duration = Duration::from_secs(10);
/// Rows the leading relay deletes before it vacuums the outbox, at the end
/// of the round that passes it. The outbox is a queue: every row is
/// inserted once and deleted once, so without a vacuum its pages and index
/// fill with dead rows that every read of it walks through, and a plan
/// made when it was small (a scan of the whole table) is kept while it
/// grows. Autovacuum may be off, or behind on a table this busy; a vacuum
/// of a nearly empty outbox takes a few milliseconds and blocks no writer.
pub const VACUUM_AFTER: u64 = 1_000;
/// Longest a published row waits for its delete. The relay deletes the rows
/// the broker acknowledged in the statement that reads its next window
/// (one round trip a round instead of two); when no commit wakes it
/// sooner, it deletes them on their own after this long.
pub const DELETE_LINGER: Duration = Duration::from_millis(50);

/// Columns of `events` as arrays, for one multi-row insert.
struct Columns {
    ids: Vec<Uuid>,
    subjects: Vec<String>,
    aggregates: Vec<String>,
    bodies: Vec<Vec<u8>>,
    traces: Vec<Option<String>>,
}

/// The rows of `events`, each serialized once and checked against
/// `max_payload`; `Err` names the first that can never be published.
fn columns<'a>(
    subjects: &Subjects,
    events: impl ExactSizeIterator<Item = (&'a Envelope, Option<&'a Trace>)>,
    max_payload: usize,
) -> Result<Columns, String> {
    let len = events.len();
    columns_on(
        events.map(|(e, trace)| {
            let kind = e.kind().expect("services only emit catalogued events");
            (subjects.event_of(kind, e.metadata.correlation_id), e, trace)
        }),
        len,
        max_payload,
    )
}

/// The rows of events each on its own subject.
fn columns_on<'a>(
    rows: impl Iterator<Item = (String, &'a Envelope, Option<&'a Trace>)>,
    len: usize,
    max_payload: usize,
) -> Result<Columns, String> {
    let mut c = Columns {
        ids: Vec::with_capacity(len),
        subjects: Vec::with_capacity(len),
        aggregates: Vec::with_capacity(len),
        bodies: Vec::with_capacity(len),
        traces: Vec::with_capacity(len),
    };
    for (subject, e, trace) in rows {
        let body = e.to_bytes();
        fits(e, body.len(), max_payload)?;
        c.ids.push(e.event_id);
        c.subjects.push(subject);
        c.aggregates.push(e.aggregate_id.clone());
        c.bodies.push(body);
        c.traces.push(trace.map(Trace::traceparent));
    }
    Ok(c)
}

impl Columns {
    /// The rows among these that the database said were written with
    /// nothing earlier of their aggregate before them in the statement
    /// (`handed`, by event id: the ids it gave them, and the latest earlier
    /// row of their aggregate it saw in the outbox, 0 for none), to be
    /// handed to the relay once committed.
    fn handover(self, handed: &[(Uuid, i64, i64)]) -> Handover {
        let written = Instant::now();
        let behind = handed.len() < self.ids.len();
        let rows = (self.ids.into_iter())
            .zip(self.subjects)
            .zip(self.bodies.into_iter().zip(self.traces))
            .filter_map(|((event_id, subject), (body, traceparent))| {
                let (_, id, after) = handed.iter().find(|(e, ..)| *e == event_id)?;
                Some(HandedRow {
                    id: *id,
                    event_id,
                    subject,
                    body,
                    traceparent,
                    after: (*after > 0).then_some(*after),
                    written,
                })
            })
            .collect();
        Handover { rows, behind }
    }

    /// Binds the columns as the statement's last five parameters, the
    /// arrays of `UNNEST(..uuid[], ..text[], ..text[], ..bytea[], ..text[])`.
    fn bind_to<'q>(
        &'q self,
        query: Query<'q, Postgres, PgArguments>,
    ) -> Query<'q, Postgres, PgArguments> {
        query
            .bind(&self.ids)
            .bind(&self.subjects)
            .bind(&self.aggregates)
            .bind(&self.bodies)
            .bind(&self.traces)
    }
}

/// Events to append to the outbox as part of a statement of the caller's: a
/// write whose rows and events must commit together in a single statement,
/// with no transaction around it (one round trip instead of three).
pub struct OutboxRows(Columns);

impl OutboxRows {
    /// The rows of `events`, each with the trace it carries, each checked
    /// against `max_payload` like [`enqueue`]; `Err` names the first that
    /// can never be published.
    pub fn traced(
        subjects: &Subjects,
        events: &[(&Envelope, Option<&Trace>)],
        max_payload: usize,
    ) -> Result<OutboxRows, String> {
        columns(subjects, events.iter().copied(), max_payload).map(OutboxRows)
    }

    /// The insert of the rows as two CTEs of the caller's statement, with
    /// their arrays as parameters `$first` to `$first + 4`, written only
    /// where `condition` (SQL) holds: `emitted`, the rows written, and
    /// `handed`, those of them with nothing earlier of their aggregate
    /// before them in the statement, each with the latest earlier row of
    /// its aggregate in the outbox (`after`, if any), which the relay may
    /// publish once they are committed, without reading them back: at
    /// once if there is none, or if it has published that row itself (so
    /// every earlier one too). The statement selects
    /// [`OutboxRows::HANDED`] among its columns, for
    /// [`OutboxRows::handover`].
    ///
    /// The caller's transaction must hold what serializes an aggregate's
    /// writers (a service's lock on the order, the event store's
    /// versions) from an earlier statement, or write a new aggregate, so
    /// that this statement sees every earlier committed row of the
    /// aggregate.
    pub fn insert_ctes(first: usize, condition: &str) -> String {
        let [a, b, c, d, e] = [first, first + 1, first + 2, first + 3, first + 4];
        format!(
            "emitted AS (
                 INSERT INTO outbox (event_id, subject, aggregate_id, body, traceparent)
                 SELECT * FROM UNNEST(${a}::uuid[], ${b}::text[], ${c}::text[], ${d}::bytea[], ${e}::text[])
                 WHERE {condition}
                 RETURNING id, event_id, aggregate_id
             ), handed AS (
                 SELECT e.id, e.event_id,
                        (SELECT coalesce(max(o.id), 0) FROM outbox o
                         WHERE o.aggregate_id = e.aggregate_id) AS after
                 FROM emitted e
                 WHERE NOT EXISTS (
                     SELECT 1 FROM emitted p WHERE p.aggregate_id = e.aggregate_id AND p.id < e.id)
             )"
        )
    }

    /// The three columns a statement with [`OutboxRows::insert_ctes`]
    /// selects: the event ids, row ids and `after` of the rows in `handed`.
    pub const HANDED: &str = "ARRAY(SELECT event_id FROM handed ORDER BY id), \
         ARRAY(SELECT id FROM handed ORDER BY id), ARRAY(SELECT after FROM handed ORDER BY id)";

    /// The rows the relay may take once the statement is committed, from
    /// the [`OutboxRows::HANDED`] columns of its row, from `column` on.
    pub fn handover(self, row: &PgRow, column: usize) -> sqlx::Result<Handover> {
        let events: Vec<Uuid> = row.try_get(column)?;
        let ids: Vec<i64> = row.try_get(column + 1)?;
        let after: Vec<i64> = row.try_get(column + 2)?;
        let handed: Vec<(Uuid, i64, i64)> = (events.into_iter().zip(ids).zip(after))
            .map(|((event, id), after)| (event, id, after))
            .collect();
        Ok(self.0.handover(&handed))
    }

    /// Binds the rows' arrays as the next five parameters of `query`.
    pub fn bind_to<'q>(
        &'q self,
        query: Query<'q, Postgres, PgArguments>,
    ) -> Query<'q, Postgres, PgArguments> {
        self.0.bind_to(query)
    }
}

/// Why events were not appended to the outbox.
#[derive(Debug, thiserror::Error)]
pub enum EnqueueError {
    /// An event can never be published: it does not fit the broker's
    /// `max_payload` ([`check_fits`] says which). Nothing was written.
    #[error("{0}")]
    TooLarge(String),
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
}

/// Appends `events` to the outbox inside the caller's transaction, after
/// checking each fits `max_payload` (nothing is written if one does not);
/// each carries the trace of the work this task is doing
/// ([`trace::current`]).
pub async fn enqueue(
    conn: &mut PgConnection,
    subjects: &Subjects,
    events: &[Envelope],
    max_payload: usize,
) -> Result<(), EnqueueError> {
    let trace = trace::current();
    let traced: Vec<_> = events.iter().map(|e| (e, trace.as_ref())).collect();
    enqueue_traced(conn, subjects, &traced, max_payload).await
}

/// As [`enqueue`], each event with the trace it carries.
pub async fn enqueue_traced(
    conn: &mut PgConnection,
    subjects: &Subjects,
    events: &[(&Envelope, Option<&Trace>)],
    max_payload: usize,
) -> Result<(), EnqueueError> {
    if events.is_empty() {
        return Ok(());
    }
    let c =
        columns(subjects, events.iter().copied(), max_payload).map_err(EnqueueError::TooLarge)?;
    Ok(insert(conn, &c).await?)
}

/// Appends events that are not the saga's (a product's catalog events),
/// each on the subject given with it, inside the caller's transaction;
/// checked against `max_payload` like [`enqueue`].
pub async fn enqueue_on(
    conn: &mut PgConnection,
    events: &[(String, Envelope)],
    max_payload: usize,
) -> Result<(), EnqueueError> {
    let trace = trace::current();
    let rows = events
        .iter()
        .map(|(subject, e)| (subject.clone(), e, trace.as_ref()));
    let c = columns_on(rows, events.len(), max_payload).map_err(EnqueueError::TooLarge)?;
    Ok(insert(conn, &c).await?)
}

async fn insert(conn: &mut PgConnection, c: &Columns) -> Result<(), sqlx::Error> {
    if c.ids.is_empty() {
        return Ok(());
    }
    c.bind_to(sqlx::query(
        "INSERT INTO outbox (event_id, subject, aggregate_id, body, traceparent)
         SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::bytea[], $5::text[])",
    ))
    .execute(conn)
    .await?;
    Ok(())
}

/// What [`enqueue_once`] did.
#[derive(Debug)]
pub enum Enqueued {
    /// Guards recorded and events appended: the rows the relay may take
    /// once they are committed ([`OutboxSignal::hand_over`]).
    Done(Handover),
    /// An event was already applied: nothing appended; roll back.
    AlreadyConsumed,
    /// An event would never fit the broker's `max_payload`: nothing written.
    TooLarge(String),
}

/// An event consumed: what it was, the trace of its applying (which what
/// it caused carries), and what it caused.
pub type Consumed<'a> = (&'a Envelope, Option<&'a Trace>, &'a [Envelope]);

/// Records each consumed event as applied by `consumer` (the Postgres
/// idempotency guard) and appends the events each caused, in that order,
/// each checked against `max_payload`, in one statement of the caller's
/// transaction: a batch's guards and emitted events cost one round trip.
/// If any of them was applied before, nothing is appended.
///
/// The same statement says which rows have nothing earlier of their
/// aggregate in the outbox (nor in the statement): those the relay may
/// publish as soon as they are committed, without reading them back. The
/// caller's transaction must hold what serializes an aggregate's writers
/// (a service's lock on the order, the event store's versions) from an
/// earlier statement, so that this statement sees every earlier committed
/// row of the aggregate.
pub async fn enqueue_once(
    conn: &mut PgConnection,
    subjects: &Subjects,
    consumer: &str,
    consumed: &[Consumed<'_>],
    max_payload: usize,
) -> Result<Enqueued, sqlx::Error> {
    let emitted: Vec<(&Envelope, Option<&Trace>)> = consumed
        .iter()
        .flat_map(|(_, trace, events)| events.iter().map(move |e| (e, *trace)))
        .collect();
    let rows = match columns(subjects, emitted.into_iter(), max_payload) {
        Ok(c) => OutboxRows(c),
        Err(reason) => return Ok(Enqueued::TooLarge(reason)),
    };
    let ids: Vec<Uuid> = consumed.iter().map(|(e, _, _)| e.event_id).collect();
    let types: Vec<&str> = consumed
        .iter()
        .map(|(e, _, _)| e.event_type.as_str())
        .collect();
    static SQL: LazyLock<String> = LazyLock::new(|| {
        format!(
            "WITH guard AS (
                 INSERT INTO consumed_events (consumer, event_id, event_type)
                 SELECT $1, g.id, g.type FROM UNNEST($2::uuid[], $3::text[]) AS g(id, type)
                 ON CONFLICT DO NOTHING RETURNING 1
             ), {}
             SELECT (SELECT count(*) FROM guard), {}",
            OutboxRows::insert_ctes(5, "(SELECT count(*) FROM guard) = $4"),
            OutboxRows::HANDED
        )
    });
    let guarded = sqlx::query(sqlx::AssertSqlSafe(SQL.as_str()))
        .bind(consumer)
        .bind(&ids)
        .bind(&types)
        .bind(ids.len() as i64);
    let row = rows.bind_to(guarded).fetch_one(conn).await?;
    let fresh: i64 = row.try_get(0)?;
    if fresh != ids.len() as i64 {
        return Ok(Enqueued::AlreadyConsumed);
    }
    Ok(Enqueued::Done(rows.handover(&row, 1)?))
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
/// One relay per service database leads at a time (it holds the database's
/// relay lease, see [`crate::relay_lease`]), so replicas do not publish the
/// same events twice over; a standby takes over as soon as the leader's
/// session is gone, or once the lease of a frozen or hung leader expires.
/// The connection commits asynchronously: losing a relay's delete in a
/// crash only means events are published again, and the broker
/// (`Nats-Msg-Id`) and the consumers (idempotency) drop the copies.
#[derive(Clone)]
pub struct Relay {
    /// Who it is, in the lease and the logs (`<service> relay, pid <pid>`).
    pub name: String,
    /// How to reach the service's database.
    pub options: PgConnectOptions,
    /// How long its lead lasts without a renewal ([`LEASE`]).
    pub lease: Duration,
    pub js: jetstream::Context,
    /// Which stream an event goes to (an atomic batch goes to one).
    pub subjects: Subjects,
    /// Commits wake it through this.
    pub signal: OutboxSignal,
    /// How often it looks without being woken.
    pub poll: Duration,
    pub health: Health,
    pub meter: Meter,
    /// Rows deleted between two vacuums of the outbox ([`VACUUM_AFTER`]).
    pub vacuum_after: u64,
    /// Longest published rows wait to be deleted with the next read
    /// ([`DELETE_LINGER`]).
    pub delete_linger: Duration,
}

/// What one round of the relay did.
#[derive(Default)]
struct Round {
    /// Rows published or parked.
    published: usize,
    /// Whether rows were left for the next round.
    more: bool,
    /// Whether the broker refused what it was sent.
    refused: bool,
}

struct Row {
    id: i64,
    event_id: Uuid,
    subject: String,
    body: Vec<u8>,
    /// The trace of the work that wrote it, published as `traceparent`.
    traceparent: Option<String>,
    /// Since its commit, when it was read.
    age: Duration,
}

/// What a round published.
#[derive(Default)]
struct Sent {
    /// The ids of the rows the broker acknowledged.
    acked: Vec<i64>,
    /// Why publishing stopped early, if it failed.
    failure: Option<String>,
    /// Whether it stopped because the lease was no longer fresh.
    fenced: bool,
}

/// Deletes the rows `published` (the broker has them), and reads the
/// earliest pending row of each aggregate among the oldest [`BATCH`] of
/// the others, in order; and whether more is pending than these (an
/// aggregate's later events, or a full window), to be read once these are
/// published. A commit after the read wakes the relay again: no need to
/// look. One statement: its read does not see its own delete, so it leaves
/// the deleted rows out by their ids.
async fn read_window(conn: &mut PgConnection, published: &[i64]) -> sqlx::Result<(Vec<Row>, bool)> {
    let mut window = 0;
    let rows: Vec<Row> =
        sqlx::query_as::<_, (i64, Uuid, String, Vec<u8>, Option<String>, f64, i64)>(
            "WITH deleted AS (DELETE FROM outbox WHERE id = ANY($2))
             SELECT id, event_id, subject, body, traceparent,
                extract(epoch FROM clock_timestamp() - created_at)::float8, window_rows FROM (
             SELECT o.*, row_number() OVER (PARTITION BY aggregate_id ORDER BY id) AS nth,
                    count(*) OVER () AS window_rows
             FROM (SELECT * FROM outbox WHERE id <> ALL($2) ORDER BY id LIMIT $1) o
         ) ranked
         WHERE nth = 1 ORDER BY id",
        )
        .bind(BATCH)
        .bind(published)
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .map(
            |(id, event_id, subject, body, traceparent, age, window_rows)| {
                window = window_rows;
                Row {
                    id,
                    event_id,
                    subject,
                    body,
                    traceparent,
                    age: Duration::try_from_secs_f64(age).unwrap_or_default(),
                }
            },
        )
        .collect();
    let more = window == BATCH || window > rows.len() as i64;
    Ok((rows, more))
}

/// Vacuums the outbox (see [`VACUUM_AFTER`]), for at most `limit` (a
/// round of the relay must end well within its lease). A vacuum that fails
/// or runs out of time is logged: the relay works on, on a larger table,
/// and tries again after as many rows. (A role that does not own the table
/// is only warned by Postgres.)
async fn vacuum(conn: &mut PgConnection, limit: Duration) -> Result<(), RelayError> {
    let started = Instant::now();
    // Not in a transaction (VACUUM cannot be), so set and reset around it.
    let timeout = format!("SET statement_timeout = {}", limit.as_millis().max(1));
    sqlx::raw_sql(sqlx::AssertSqlSafe(timeout))
        .execute(&mut *conn)
        .await?;
    match sqlx::raw_sql("VACUUM outbox").execute(&mut *conn).await {
        Ok(_) => tracing::debug!(took = ?started.elapsed(), "outbox vacuumed"),
        Err(e) => tracing::warn!(error = %e, "the outbox was not vacuumed"),
    }
    sqlx::raw_sql("SET statement_timeout = 0")
        .execute(&mut *conn)
        .await?;
    Ok(())
}

impl Row {
    /// A row handed over by its committer, as if read now.
    fn handed(row: HandedRow) -> Row {
        Row {
            id: row.id,
            event_id: row.event_id,
            subject: row.subject,
            body: row.body,
            traceparent: row.traceparent,
            age: row.written.elapsed(),
        }
    }

    /// The headers it is published with: its event id as `Nats-Msg-Id`,
    /// which the broker deduplicates a republish by, and the trace context
    /// of the work that wrote it (`traceparent`), which the consumers
    /// continue.
    fn headers(&self) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::NATS_MESSAGE_ID, self.event_id.to_string().as_str());
        if let Some(traceparent) = &self.traceparent {
            headers.insert(trace::TRACEPARENT, traceparent.as_str());
        }
        headers
    }
}

/// A relay's connection, and its lead while it has one.
struct Session {
    conn: PgConnection,
    lead: Option<Leading>,
    /// Rows deleted (published or parked) since the outbox was last vacuumed.
    deleted: u64,
    /// Rows the broker acknowledged, deleted with the next read of the
    /// outbox (or on their own: see [`delete_published`]). Lost with the
    /// connection, they are published again, and the broker (`Nats-Msg-Id`)
    /// and the consumers drop the copies.
    published: Vec<i64>,
    /// When published rows were last deleted.
    deleted_at: Instant,
    /// Whether its last read found nothing more to publish, and nothing has
    /// gone wrong since: what is committed after it is handed over, or
    /// wakes the relay to read ([`OutboxSignal`]).
    read_all: bool,
    /// When it last read the outbox: it reads again at least once a poll,
    /// for what another process committed.
    last_read: Option<Instant>,
}

/// Deletes the rows `published` and not deleted yet.
async fn delete_published(
    conn: &mut PgConnection,
    published: &mut Vec<i64>,
) -> Result<(), RelayError> {
    if !published.is_empty() {
        sqlx::query("DELETE FROM outbox WHERE id = ANY($1)")
            .bind(&*published)
            .execute(conn)
            .await?;
        published.clear();
    }
    Ok(())
}

/// The lead, and what the streams take.
struct Leading {
    lease: Lead,
    atomic: Atomic,
}

/// Which streams take atomic batches (`allow_atomic`, nats-server 2.12 and
/// later); the others get one publish per event.
#[derive(Clone, Copy)]
struct Atomic {
    events: bool,
    catalog: bool,
}

/// Why an atomic batch was not stored.
enum Refusal {
    /// The broker answered no (a duplicate in the batch, atomic publishing
    /// not enabled on the stream): nothing of it was stored.
    Refused(String),
    /// No answer: it may or may not have been stored.
    Unanswered(String),
}

/// `rows` cut into atomic batches of at most [`ATOMIC_EVENTS`] events and
/// [`ATOMIC_BYTES`] bytes (at least one event each), in order; a stream
/// that takes no batches gets its events one by one in the same pieces.
fn atomic_chunks<'a, 'r>(rows: &'a [&'r Row]) -> impl Iterator<Item = &'a [&'r Row]> {
    let mut rest = rows;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut bytes = 0;
        let mut n = 0;
        while n < rest.len() && n < ATOMIC_EVENTS {
            bytes += rest[n].body.len();
            if n > 0 && bytes > ATOMIC_BYTES {
                break;
            }
            n += 1;
        }
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        Some(chunk)
    })
}

impl Relay {
    /// Runs until `shutdown`, then flushes what is already committed and
    /// gives its lead up. The service cancels `shutdown` only once its
    /// consumers and request handlers have drained, so the flush includes
    /// their last commits.
    pub async fn run(self, shutdown: CancellationToken) {
        let holder = format!(
            "{} ({})",
            self.name,
            &Uuid::new_v4().simple().to_string()[..8]
        );
        let mut failures = 0u32;
        let mut session: Option<Session> = None;
        self.health.ok(HEALTH_RELAY);
        self.health.ok(HEALTH_LEAD);
        loop {
            // A round that outlives half the lease is hung (a publish or a
            // query that never ends): its lead is given up with its
            // connection, and a standby leads.
            match tokio::time::timeout(self.lease / 2, self.round(&holder, &mut session)).await {
                Ok(Ok(refused)) => {
                    failures = 0;
                    // A standby, or a leader with nothing to publish, is
                    // working again after a failure.
                    if !refused && self.health.ok(HEALTH_RELAY) {
                        tracing::info!("the outbox relay works again");
                    }
                }
                Ok(Err(e)) => {
                    failures += 1;
                    session = None;
                    self.signal.set_taking(false);
                    self.health.report(
                        HEALTH_RELAY,
                        Condition::Failing(format!("cannot read the outbox: {e}")),
                    );
                    tracing::warn!(error = %e, failures, "outbox relay failed; retrying");
                }
                Err(_) => {
                    failures += 1;
                    session = None;
                    self.signal.set_taking(false);
                    let detail = format!(
                        "a round of the relay took longer than {:?}; it gave its lead up",
                        self.lease / 2
                    );
                    self.health
                        .report(HEALTH_RELAY, Condition::Failing(detail.clone()));
                    tracing::error!(failures, "{detail}");
                }
            }
            // Renewals (a leader) and asking (a standby) happen at rounds.
            let wait = if failures == 0 {
                self.poll
            } else {
                backoff(failures as i64, RELAY_BACKOFF_CAP)
            }
            .min(Lead::renew_every(self.lease));
            // Published rows wait for the next read to be deleted with it,
            // but not for long.
            let wait = match &session {
                Some(s) if !s.published.is_empty() => wait.min(self.delete_linger),
                _ => wait,
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.signal.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
        self.signal.set_taking(false);
        if let Some(s) = session.as_mut() {
            // The flush reads everything committed.
            s.read_all = false;
        }
        if let Err(e) = self.round(&holder, &mut session).await {
            tracing::warn!(error = %e, "outbox not flushed at shutdown; it is published on next start");
        }
        let Some(mut session) = session else { return };
        if let Err(e) = delete_published(&mut session.conn, &mut session.published).await {
            tracing::warn!(error = %e, "published events not deleted at shutdown; they are published again on next start, and dropped as copies");
        }
        if let Err(e) = relay_lease::release(&mut session.conn, &holder).await {
            tracing::warn!(error = %e, "relay lease not given up; a standby leads when it expires");
        }
    }

    /// Leads if it may, then publishes everything pending: whether the
    /// broker refused events. What was handed over is published without a
    /// read while the relay has read everything else; otherwise it reads
    /// the outbox, which holds the handed rows too.
    async fn round(&self, holder: &str, session: &mut Option<Session>) -> Result<bool, RelayError> {
        // Taken before anything is read: every row handed over so far is
        // committed, so a read from now on sees it.
        let waiting = self.signal.take();
        if session.is_none() {
            let options = self
                .options
                .clone()
                .options([("synchronous_commit", "off")]);
            let conn = PgConnection::connect_with(&options).await?;
            *session = Some(Session {
                conn,
                lead: None,
                deleted: 0,
                published: Vec::new(),
                deleted_at: Instant::now(),
                read_all: false,
                last_read: None,
            });
        }
        let Session {
            conn,
            lead,
            deleted,
            published,
            deleted_at,
            read_all,
            last_read,
        } = session.as_mut().expect("relay session");
        // A row written behind an earlier one of its aggregate is taken
        // only if this relay published that one (it is published, or still
        // in the outbox: the read finds them in order).
        let behind_unpublished = (waiting.rows.iter())
            .any(|row| row.after.is_some_and(|after| !published.contains(&after)));
        let must_read = waiting.read
            || behind_unpublished
            || !*read_all
            || last_read.is_none_or(|at| at.elapsed() >= self.poll);
        *read_all = false;
        let mut reads = 0;
        let refused = loop {
            if !self.keep_lead(conn, holder, lead).await? {
                self.signal.set_taking(false);
                // A standby now: what it published as the leader is
                // deleted all the same (the broker has it).
                delete_published(conn, published).await?;
                return Ok(false);
            }
            let Some(leading) = lead.as_ref() else {
                return Ok(false);
            };
            if !must_read {
                let handed = waiting.rows;
                let round =
                    (self.publish_handed(conn, published, deleted_at, leading, handed)).await?;
                *deleted = deleted.saturating_add(round.published as u64);
                *read_all = !round.refused && !round.more;
                break round.refused;
            }
            if reads > 0 {
                // Handed over before this read: the read sees them.
                drop(self.signal.take());
            }
            reads += 1;
            *last_read = Some(Instant::now());
            let round = self.publish_batch(conn, published, leading).await?;
            *deleted_at = Instant::now();
            *deleted = deleted.saturating_add(round.published as u64);
            if round.refused {
                break true;
            }
            if !round.more {
                *read_all = true;
                break false;
            }
            if round.published == 0 && leading.lease.fresh() {
                break false;
            }
        };
        self.signal.set_taking(*read_all);
        if *deleted >= self.vacuum_after {
            *deleted = 0;
            // What it gives back must be deleted first.
            delete_published(conn, published).await?;
            vacuum(conn, self.lease / 4).await?;
        }
        Ok(refused)
    }

    /// Publishes the rows handed over since the last round, and deletes
    /// what it published once their linger is over (at once if nothing
    /// was handed over: the linger woke it).
    async fn publish_handed(
        &self,
        conn: &mut PgConnection,
        published: &mut Vec<i64>,
        deleted_at: &mut Instant,
        leading: &Leading,
        handed: Vec<HandedRow>,
    ) -> Result<Round, RelayError> {
        let rows = (handed.into_iter())
            // Already published by a read that saw it committed.
            .filter(|row| !published.contains(&row.id))
            .map(Row::handed)
            .collect();
        let now = Instant::now();
        let round = (self.publish(conn, published, leading, rows, false, now)).await?;
        // With no read to ride on, deleted on their own once their linger
        // is over.
        let lingered = round.published == 0 || deleted_at.elapsed() >= self.delete_linger;
        if !round.refused && lingered {
            delete_published(conn, published).await?;
            *deleted_at = Instant::now();
        }
        Ok(round)
    }

    /// Renews the lead when due, or asks for it as a standby: whether this
    /// relay leads now.
    async fn keep_lead(
        &self,
        conn: &mut PgConnection,
        holder: &str,
        lead: &mut Option<Leading>,
    ) -> Result<bool, RelayError> {
        if lead.as_ref().is_some_and(|l| !l.lease.due()) {
            return Ok(true);
        }
        let asked = Instant::now();
        match relay_lease::ask(conn, holder, self.lease).await? {
            Asked::Held { epoch } => {
                let lease = Lead {
                    epoch,
                    asked,
                    length: self.lease,
                };
                match lead {
                    Some(l) => l.lease = lease,
                    None => {
                        tracing::info!(holder, epoch, "leads the outbox relay");
                        self.report_parked(conn).await?;
                        let atomic = Atomic {
                            events: self.takes_atomic(&self.subjects.events_stream()).await,
                            catalog: self.takes_atomic(&self.subjects.catalog_stream()).await,
                        };
                        *lead = Some(Leading { lease, atomic });
                    }
                }
                self.health.ok(HEALTH_LEAD);
                Ok(true)
            }
            Asked::Standby { leader, silent } => {
                if lead.take().is_some() {
                    tracing::warn!(holder, leader = ?leader, "lost the outbox relay's lead; a standby now");
                }
                let leader = leader.unwrap_or_else(|| "nobody".into());
                if relay_lease::silent_too_long(silent, self.lease) {
                    let detail = format!(
                        "standby: the relay's leader, {leader}, has been silent for {}s; \
                         this replica leads once its lease of {}s runs out",
                        silent.as_secs(),
                        self.lease.as_secs()
                    );
                    let was_silent = matches!(
                        self.health.condition(HEALTH_LEAD),
                        Some(Condition::Degraded(_))
                    );
                    self.health.report(HEALTH_LEAD, Condition::Degraded(detail));
                    if !was_silent {
                        tracing::warn!(%leader, ?silent, "the outbox relay's leader is silent");
                    }
                } else if self.health.ok(HEALTH_LEAD) {
                    tracing::info!(%leader, "the outbox relay's leader is heard from");
                }
                Ok(false)
            }
        }
    }

    /// Deletes what the last round published, publishes the earliest
    /// pending event of each aggregate among the oldest rows, pipelined,
    /// and keeps the acknowledged ones to be deleted with the next read.
    /// With at most one event per aggregate in flight, a partial failure can
    /// never reorder an aggregate's events: what was not acknowledged stays
    /// first.
    async fn publish_batch(
        &self,
        conn: &mut PgConnection,
        published: &mut Vec<i64>,
        leading: &Leading,
    ) -> Result<Round, RelayError> {
        let read_at = Instant::now();
        let (rows, more) = read_window(conn, published).await?;
        published.clear();
        self.publish(conn, published, leading, rows, more, read_at)
            .await
    }

    /// Publishes `rows` (read at `read_at`, with `more` behind them), and
    /// keeps the acknowledged ones in `published`, to be deleted later;
    /// parks those the broker can never take.
    async fn publish(
        &self,
        conn: &mut PgConnection,
        published: &mut Vec<i64>,
        leading: &Leading,
        rows: Vec<Row>,
        more: bool,
        read_at: Instant,
    ) -> Result<Round, RelayError> {
        if rows.is_empty() {
            return Ok(Round::default());
        }
        let (sendable, parked) = self.sendable(&rows);
        let sent = self.publish_rows(sendable, leading, read_at).await;
        published.extend_from_slice(&sent.acked);
        for (id, reason) in &parked {
            self.park(conn, *id, reason).await?;
        }
        if !parked.is_empty() {
            self.report_parked(conn).await?;
        }
        if let Some(e) = sent.failure {
            // What is counted as waiting is what was not published.
            delete_published(conn, published).await?;
            self.refused(conn, &e, sent.acked.len()).await?;
            return Ok(Round {
                refused: true,
                ..Round::default()
            });
        }
        if self.health.ok(HEALTH_RELAY) {
            tracing::info!("the broker accepts events again");
        }
        Ok(Round {
            published: sent.acked.len() + parked.len(),
            more: more || sent.fenced,
            refused: false,
        })
    }

    /// The rows the broker can take, and the ids of those it must refuse
    /// (larger than its `max_payload`) with why, to be parked. Never hand
    /// the client a message the server must refuse: it would close the
    /// whole connection, consumers and all.
    fn sendable<'r>(&self, rows: &'r [Row]) -> (Vec<&'r Row>, Vec<(i64, String)>) {
        let max = max_payload(&self.js);
        let mut parked = Vec::new();
        let mut sendable = Vec::with_capacity(rows.len());
        for row in rows {
            let size = row.body.len() + PUBLISH_OVERHEAD;
            if size > max {
                let why =
                    format!("{size} bytes on the wire, over the broker's max_payload of {max}");
                parked.push((row.id, why));
            } else {
                sendable.push(row);
            }
        }
        (sendable, parked)
    }

    /// Publishes `rows` in atomic chunks where the stream takes them (the
    /// catalog's events apart: an atomic batch goes to one stream), until
    /// one fails or the lease is no longer fresh.
    async fn publish_rows(&self, rows: Vec<&Row>, leading: &Leading, read_at: Instant) -> Sent {
        let (catalog, events): (Vec<&Row>, Vec<&Row>) = rows
            .into_iter()
            .partition(|row| self.subjects.is_catalog(&row.subject));
        let atomic = leading.atomic;
        let mut sent = Sent::default();
        for (rows, atomic) in [(events, atomic.events), (catalog, atomic.catalog)] {
            for chunk in atomic_chunks(&rows) {
                // Frozen past half its lease: a standby may lead by now.
                if !leading.lease.fresh() {
                    sent.fenced = true;
                    return sent;
                }
                let (published, failed) = self.publish_chunk(chunk, atomic).await;
                for row in published {
                    self.meter.published(row.age + read_at.elapsed());
                    sent.acked.push(row.id);
                }
                if failed.is_some() {
                    sent.failure = failed;
                    return sent;
                }
            }
        }
        sent
    }

    /// Says on the health board (and in the log, once) that the broker
    /// refuses events, and how many wait.
    async fn refused(
        &self,
        conn: &mut PgConnection,
        e: &str,
        published: usize,
    ) -> Result<(), RelayError> {
        let (waiting, oldest): (i64, Option<f64>) = sqlx::query_as(
            "SELECT count(*), extract(epoch FROM now() - min(created_at))::float8 FROM outbox",
        )
        .fetch_one(&mut *conn)
        .await?;
        let detail = format!(
            "the broker refuses events ({e}); {waiting} waiting in the outbox, the oldest for {:.0}s",
            oldest.unwrap_or(0.0)
        );
        if (self.health).report(HEALTH_RELAY, Condition::Failing(detail)) {
            tracing::error!(error = %e, waiting, "cannot publish; events stay in the outbox");
        } else {
            tracing::warn!(error = %e, published, "publish failed; unacknowledged events stay in the outbox");
        }
        Ok(())
    }

    /// Whether `stream` says it takes atomic batches. A broker that does
    /// not know them (before 2.12) would store a batch's messages one by
    /// one and acknowledge only the last: the relay must not rely on it.
    async fn takes_atomic(&self, stream: &str) -> bool {
        let info = tokio::time::timeout(STREAM_INFO_TIMEOUT, self.js.get_stream(stream)).await;
        match info {
            Ok(Ok(s)) => s.cached_info().config.allow_atomic_publish,
            _ => {
                tracing::warn!(
                    stream,
                    "stream not known; its events are published one by one"
                );
                false
            }
        }
    }

    /// Publishes `rows` (of one stream, in outbox order) as one atomic
    /// batch if the stream takes them and they are [`ATOMIC_FROM`] or more,
    /// and one by one if not or if the broker refuses the batch: the rows
    /// it acknowledged, and why it stopped short of the others.
    ///
    /// With `sync_interval: always` the broker writes each message to disk
    /// on its own; a batch is written at its commit, so a round of the relay
    /// costs the broker one write instead of one per event. The broker
    /// refuses a whole batch holding an event it already has (a relay that
    /// died between publishing and deleting the rows): one by one, each
    /// publish is deduplicated on its own.
    async fn publish_chunk<'r>(
        &self,
        rows: &[&'r Row],
        atomic: bool,
    ) -> (Vec<&'r Row>, Option<String>) {
        if atomic && rows.len() >= ATOMIC_FROM {
            match self.publish_atomic(rows).await {
                Ok(()) => {
                    self.meter.relay_batch("atomic", rows.len());
                    return (rows.to_vec(), None);
                }
                // Nothing said: whether it was stored is unknown, and the
                // round is tried again (a stored batch is then refused as
                // duplicates, and published one by one).
                Err(Refusal::Unanswered(e)) => return (Vec::new(), Some(e)),
                Err(Refusal::Refused(e)) => {
                    tracing::info!(events = rows.len(), error = %e, "atomic batch refused; publishing its events one by one");
                    self.meter.relay_batch("one_by_one", rows.len());
                }
            }
        }
        self.publish_each(rows).await
    }

    /// `rows` as one atomic batch: every message but the last sent without
    /// waiting, the last one commits the batch and is acknowledged for all.
    async fn publish_atomic(&self, rows: &[&Row]) -> Result<(), Refusal> {
        let batch_id = Uuid::new_v4().simple().to_string();
        let client = self.js.client();
        let (last, first) = rows.split_last().expect("a batch has rows");
        let headers = |row: &Row, sequence: usize| {
            let mut headers = row.headers();
            headers.insert(BATCH_ID, batch_id.as_str());
            headers.insert(BATCH_SEQUENCE, sequence.to_string().as_str());
            headers
        };
        for (i, row) in first.iter().enumerate() {
            client
                .publish_with_headers(
                    row.subject.clone(),
                    headers(row, i + 1),
                    row.body.clone().into(),
                )
                .await
                .map_err(|e| Refusal::Unanswered(e.to_string()))?;
        }
        let mut commit = headers(last, rows.len());
        commit.insert(BATCH_COMMIT, "1");
        let answer = async {
            self.js
                .publish_with_headers(last.subject.clone(), commit, last.body.clone().into())
                .await?
                .await
        }
        .await;
        match answer {
            Ok(_) => Ok(()),
            Err(e) => match e.kind() {
                PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe => {
                    Err(Refusal::Unanswered(e.to_string()))
                }
                _ => Err(Refusal::Refused(e.to_string())),
            },
        }
    }

    /// `rows` one publish each, all sent before any acknowledgement is
    /// awaited: the rows acknowledged, and the first failure.
    async fn publish_each<'r>(&self, rows: &[&'r Row]) -> (Vec<&'r Row>, Option<String>) {
        let mut pending = Vec::with_capacity(rows.len());
        let mut failure = None;
        for row in rows {
            match self
                .js
                .publish_with_headers(row.subject.clone(), row.headers(), row.body.clone().into())
                .await
            {
                Ok(ack) => pending.push((*row, ack)),
                Err(e) => {
                    failure = Some(e.to_string());
                    break;
                }
            }
        }
        let mut acked = Vec::with_capacity(pending.len());
        for (row, ack) in pending {
            match ack.await {
                Ok(_) => acked.push(row),
                Err(e) => {
                    failure.get_or_insert(e.to_string());
                }
            }
        }
        (acked, failure)
    }

    /// Moves a row that can never be published out of the way, with why.
    async fn park(&self, conn: &mut PgConnection, id: i64, reason: &str) -> Result<(), RelayError> {
        let parked: Option<(Uuid, String)> = sqlx::query_as(
            "WITH moved AS (DELETE FROM outbox WHERE id = $1 RETURNING *)
             INSERT INTO outbox_parked (id, event_id, subject, aggregate_id, body, created_at, reason)
             SELECT id, event_id, subject, aggregate_id, body, created_at, $2 FROM moved
             RETURNING event_id, subject",
        )
        .bind(id)
        .bind(reason)
        .fetch_optional(&mut *conn)
        .await?;
        if let Some((event_id, subject)) = parked {
            tracing::error!(%event_id, %subject, %reason, "event can never be published; parked in outbox_parked");
        }
        Ok(())
    }

    /// Raises (or clears) the alert for parked rows.
    async fn report_parked(&self, conn: &mut PgConnection) -> Result<(), RelayError> {
        let (count, last): (i64, Option<String>) = sqlx::query_as(
            "SELECT count(*), (SELECT reason FROM outbox_parked ORDER BY parked_at DESC LIMIT 1)
             FROM outbox_parked",
        )
        .fetch_one(&mut *conn)
        .await?;
        let condition = if count == 0 {
            Condition::Ok
        } else {
            Condition::Alert(format!(
                "{count} event(s) could never be published and were parked in outbox_parked; last: {}",
                last.unwrap_or_default()
            ))
        };
        self.health.report(HEALTH_PARKED, condition);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Event, ShipmentFailed};

    fn event(reason_len: usize) -> Envelope {
        let id = Uuid::nil();
        Envelope::new(
            &Event::ShipmentFailed(ShipmentFailed {
                order_id: id,
                reason: "r".repeat(reason_len),
            }),
            id.to_string(),
            1,
            id,
            id,
        )
    }

    #[test]
    fn an_event_that_fits_with_its_headers_passes() {
        assert_eq!(check_fits(&event(10), 1024 * 1024), Ok(()));
    }

    #[test]
    fn an_event_too_large_for_the_broker_is_named_with_its_size() {
        let err = check_fits(&event(2_000), 1_000).unwrap_err();
        assert!(err.starts_with("ShipmentFailed "), "{err}");
        assert!(
            err.contains("over the broker's max_payload of 1000"),
            "{err}"
        );
    }

    #[test]
    fn the_rows_of_a_batch_with_one_oversized_event_are_refused_whole() {
        let s = Subjects::new("saga");
        assert!(
            columns(
                &s,
                [event(10), event(5_000)].iter().map(|e| (e, None)),
                4_000
            )
            .is_err()
        );
        assert_eq!(
            columns(&s, [event(10)].iter().map(|e| (e, None)), 4_000)
                .unwrap()
                .bodies
                .len(),
            1
        );
    }
}
