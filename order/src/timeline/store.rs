//! The saga timeline's SQL: entries the observer records and the summary
//! of each saga it folds from them (`sagas`), and the reads the API and the
//! stall report make of both.

use std::collections::HashMap;

use chrono::{DateTime, SubsecRound, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::{Seen, fold_onto};
use common::sql::column;

use crate::domain::OrderStatus;

/// One entry of a saga's timeline: an event, or a dead letter of the saga.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NewEntry {
    /// The event id, or `dlq:<stream sequence>`: a redelivery records nothing.
    #[serde(skip)]
    #[sqlx(rename = "entry_key")]
    pub key: String,
    #[serde(skip)]
    pub correlation_id: Uuid,
    pub kind: EntryKind,
    pub service: String,
    pub event_type: String,
    pub event_id: Option<Uuid>,
    pub causation_id: Option<Uuid>,
    pub aggregate_id: Option<String>,
    pub version: Option<i64>,
    pub occurred_at: DateTime<Utc>,
    pub stream_seq: i64,
    pub effect: String,
    pub reason: Option<String>,
    /// The trace it belongs to (W3C trace id), when its message carried one.
    pub trace_id: Option<String>,
}

/// Declared in the order of the names they are stored as, so that they
/// sort as the timeline does (`ORDER BY occurred_at, kind, …`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, sqlx::Type, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
#[sqlx(type_name = "text", rename_all = "snake_case")]
pub enum EntryKind {
    DeadLetter,
    Event,
    /// An operator's action (audit record), which changes no status.
    Operator,
}

/// An entry as recorded: what was seen, and when the observer saw it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EntryRow {
    #[serde(flatten)]
    #[sqlx(flatten)]
    pub entry: NewEntry,
    pub recorded_at: DateTime<Utc>,
}

/// Where a saga stands, as the observer last folded it.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SagaRow {
    pub correlation_id: Uuid,
    pub status: OrderStatus,
    pub waiting_for: Option<String>,
    pub step: Option<String>,
    pub started_at: DateTime<Utc>,
    pub last_event_at: DateTime<Utc>,
    pub last_event_type: String,
    pub dead_letters: i32,
}

const SAGA_COLUMNS: &str = "correlation_id, status, waiting_for, step, started_at, \
     last_event_at, last_event_type, dead_letters";

/// Records `entries` and folds each of their sagas' summaries again, in
/// one transaction serialized per saga, with a statement for each step
/// whatever the number of entries: for each entry in order, whether it was
/// new (`false`: recorded already, or earlier in `entries`). Nothing is
/// recorded if any fails.
pub async fn record_entries(pool: &PgPool, entries: &[NewEntry]) -> sqlx::Result<Vec<bool>> {
    let mut tx = pool.begin().await?;
    // Every saga of the batch locked up front, in one global order, so two
    // batches (events and dead letters) never wait on each other in a cycle.
    let sagas: Vec<Uuid> = entries.iter().map(|e| e.correlation_id).collect();
    sqlx::query(
        "SELECT count(pg_advisory_xact_lock(k)) FROM (
             SELECT DISTINCT hashtextextended(id::text, 7) AS k
             FROM unnest($1::uuid[]) AS id ORDER BY k
         ) keys",
    )
    .bind(&sagas)
    .execute(&mut *tx)
    .await?;
    let inserted: Vec<String> = sqlx::query_scalar(
        "INSERT INTO saga_timeline (entry_key, correlation_id, kind, service, event_type,
             event_id, causation_id, aggregate_id, version, occurred_at, stream_seq, effect,
             reason, trace_id)
         SELECT * FROM UNNEST($1::text[], $2::uuid[], $3::text[], $4::text[], $5::text[],
             $6::uuid[], $7::uuid[], $8::text[], $9::int8[], $10::timestamptz[], $11::int8[],
             $12::text[], $13::text[], $14::text[])
         ON CONFLICT (entry_key) DO NOTHING
         RETURNING entry_key",
    )
    .bind(column(entries, |e| e.key.clone()))
    .bind(&sagas)
    .bind(column(entries, |e| e.kind))
    .bind(column(entries, |e| e.service.clone()))
    .bind(column(entries, |e| e.event_type.clone()))
    .bind(column(entries, |e| e.event_id))
    .bind(column(entries, |e| e.causation_id))
    .bind(column(entries, |e| e.aggregate_id.clone()))
    .bind(column(entries, |e| e.version))
    .bind(column(entries, |e| e.occurred_at))
    .bind(column(entries, |e| e.stream_seq))
    .bind(column(entries, |e| e.effect.clone()))
    .bind(column(entries, |e| e.reason.clone()))
    .bind(column(entries, |e| e.trace_id.clone()))
    .fetch_all(&mut *tx)
    .await?;
    let mut new: std::collections::HashSet<String> = inserted.into_iter().collect();
    let fresh: Vec<bool> = entries.iter().map(|e| new.remove(&e.key)).collect();
    let recorded: Vec<&NewEntry> = entries
        .iter()
        .zip(&fresh)
        .filter(|(_, fresh)| **fresh)
        .map(|(e, _)| e)
        .collect();
    if !recorded.is_empty() {
        fold_sagas(&mut tx, recorded).await?;
    }
    tx.commit().await?;
    Ok(fresh)
}

/// Folds the entries just `recorded` into their sagas' summaries
/// (`sagas`): onto the summary as it stands when they come after
/// everything it summarises (the usual case: the timeline is read only for
/// the others), otherwise again from the saga's whole timeline.
async fn fold_sagas(tx: &mut PgConnection, mut recorded: Vec<&NewEntry>) -> sqlx::Result<()> {
    // Times as stored (to the microsecond), so that entries sort as the
    // timeline does and compare with the summary's as Postgres would.
    let stored = |e: &NewEntry| e.occurred_at.trunc_subsecs(6);
    // Each saga's entries in the timeline's order (see `timeline_in`).
    recorded.sort_by_key(|e| (e.correlation_id, stored(e), e.kind, e.stream_seq));
    let mut ids: Vec<Uuid> = recorded.iter().map(|e| e.correlation_id).collect();
    ids.dedup();
    let mut current: HashMap<Uuid, SagaRow> = sqlx::query_as::<_, SagaRow>(sqlx::AssertSqlSafe(
        format!("SELECT {SAGA_COLUMNS} FROM sagas WHERE correlation_id = ANY($1)"),
    ))
    .bind(&ids)
    // Planned for the table as it is each time (as below): a plan kept
    // from when it was small reads all of it, for every batch.
    .persistent(false)
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .map(|row| (row.correlation_id, row))
    .collect();
    let mut folded: Vec<SagaRow> = Vec::new();
    let mut again: Vec<Uuid> = Vec::new();
    for saga in recorded.chunk_by(|a, b| a.correlation_id == b.correlation_id) {
        let id = saga[0].correlation_id;
        let seen: Vec<Seen<'_>> = saga
            .iter()
            .map(|e| Seen {
                kind: e.kind,
                event_type: &e.event_type,
                occurred_at: stored(e),
            })
            .collect();
        match fold_onto(id, current.remove(&id), &seen) {
            Some(row) => folded.push(row),
            None => again.push(id),
        }
    }
    if !again.is_empty() {
        let rows: Vec<(Uuid, EntryKind, String, DateTime<Utc>)> = sqlx::query_as(
            "SELECT correlation_id, kind, event_type, occurred_at FROM saga_timeline
             WHERE correlation_id = ANY($1)
             ORDER BY correlation_id, occurred_at, kind, stream_seq",
        )
        .bind(&again)
        // Planned for the ids at hand each time: a plan kept from when the
        // table was small scans all of it.
        .persistent(false)
        .fetch_all(&mut *tx)
        .await?;
        for saga in rows.chunk_by(|a, b| a.0 == b.0) {
            let seen: Vec<Seen<'_>> = saga
                .iter()
                .map(|(_, kind, event_type, occurred_at)| Seen {
                    kind: *kind,
                    event_type,
                    occurred_at: *occurred_at,
                })
                .collect();
            folded.extend(fold_onto(saga[0].0, None, &seen));
        }
    }
    sqlx::query(
        "INSERT INTO sagas (correlation_id, status, waiting_for, step, started_at, last_event_at,
             last_event_type, dead_letters)
         SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[],
             $5::timestamptz[], $6::timestamptz[], $7::text[], $8::int4[])
         ON CONFLICT (correlation_id) DO UPDATE SET
             status = EXCLUDED.status, waiting_for = EXCLUDED.waiting_for, step = EXCLUDED.step,
             started_at = EXCLUDED.started_at, last_event_at = EXCLUDED.last_event_at,
             last_event_type = EXCLUDED.last_event_type, dead_letters = EXCLUDED.dead_letters,
             stall_reported = sagas.stall_reported
                 AND sagas.last_event_at = EXCLUDED.last_event_at",
    )
    .bind(column(&folded, |r| r.correlation_id))
    .bind(column(&folded, |r| r.status))
    .bind(column(&folded, |r| r.waiting_for.clone()))
    .bind(column(&folded, |r| r.step.clone()))
    .bind(column(&folded, |r| r.started_at))
    .bind(column(&folded, |r| r.last_event_at))
    .bind(column(&folded, |r| r.last_event_type.clone()))
    .bind(column(&folded, |r| r.dead_letters))
    .execute(&mut *tx)
    .await?;
    Ok(())
}

async fn timeline_in(conn: &mut PgConnection, id: Uuid) -> sqlx::Result<Vec<EntryRow>> {
    sqlx::query_as(
        "SELECT entry_key, correlation_id, kind, service, event_type, event_id, causation_id,
                aggregate_id, version, occurred_at, recorded_at, stream_seq, effect, reason,
                trace_id
         FROM saga_timeline WHERE correlation_id = $1
         ORDER BY occurred_at, kind, stream_seq",
    )
    .bind(id)
    .fetch_all(conn)
    .await
}

/// Every entry of a saga, in the order they happened.
pub async fn timeline(pool: &PgPool, id: Uuid) -> sqlx::Result<Vec<EntryRow>> {
    timeline_in(&mut *pool.acquire().await?, id).await
}

pub async fn saga(pool: &PgPool, id: Uuid) -> sqlx::Result<Option<SagaRow>> {
    common::sql::row_by_key(pool, "sagas", SAGA_COLUMNS, "correlation_id", id).await
}

/// Which sagas to list, newest activity first.
#[derive(Debug, Default, Clone)]
pub struct SagaFilter {
    pub status: Option<OrderStatus>,
    /// Only sagas still waiting that have waited since before this.
    pub stalled_before: Option<DateTime<Utc>>,
    /// Only sagas active at or after this.
    pub since: Option<DateTime<Utc>>,
    /// Only sagas last active before this (the next page).
    pub before: Option<DateTime<Utc>>,
    pub limit: i64,
}

pub async fn list_sagas(pool: &PgPool, f: &SagaFilter) -> sqlx::Result<Vec<SagaRow>> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {SAGA_COLUMNS} FROM sagas
         WHERE ($1::text IS NULL OR status = $1)
           AND ($2::timestamptz IS NULL OR (status = 'PENDING' AND last_event_at < $2))
           AND ($3::timestamptz IS NULL OR last_event_at >= $3)
           AND ($4::timestamptz IS NULL OR last_event_at < $4)
         ORDER BY last_event_at DESC, correlation_id
         LIMIT $5"
    )))
    .bind(f.status)
    .bind(f.stalled_before)
    .bind(f.since)
    .bind(f.before)
    .bind(f.limit)
    .fetch_all(pool)
    .await
}

/// A dead letter of a saga, with where its saga stands now.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetterRow {
    pub correlation_id: Uuid,
    /// The consumer that gave up on the event.
    pub service: String,
    pub event_type: String,
    pub event_id: Option<Uuid>,
    /// When it was dead-lettered.
    pub occurred_at: DateTime<Utc>,
    /// Its sequence in the dead-letter stream (`sagactl dlq redrive --seq`).
    pub dlq_seq: i64,
    pub reason: Option<String>,
    /// The saga's status now.
    pub saga_status: Option<OrderStatus>,
}

/// Dead letters of sagas, newest first: those before dead-letter stream
/// sequence `before` if given, at most `limit`.
pub async fn list_dead_letters(
    pool: &PgPool,
    before: Option<i64>,
    limit: i64,
) -> sqlx::Result<Vec<DeadLetterRow>> {
    sqlx::query_as(
        "SELECT t.correlation_id, t.service, t.event_type, t.event_id, t.occurred_at,
                t.stream_seq AS dlq_seq, t.reason, s.status AS saga_status
         FROM saga_timeline t LEFT JOIN sagas s USING (correlation_id)
         WHERE t.kind = 'dead_letter' AND ($1::bigint IS NULL OR t.stream_seq < $1)
         ORDER BY t.stream_seq DESC
         LIMIT $2",
    )
    .bind(before)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// How many pending sagas have waited since before `before`.
pub async fn count_stalled(pool: &PgPool, before: DateTime<Utc>) -> sqlx::Result<i64> {
    sqlx::query_scalar("SELECT count(*) FROM sagas WHERE status = 'PENDING' AND last_event_at < $1")
        .bind(before)
        .fetch_one(pool)
        .await
}

/// Pending sagas that have waited since before `before` and were not
/// reported yet: marked reported and returned (each stall is reported once;
/// a saga that moves on and stalls again is reported again).
pub async fn report_stalls(pool: &PgPool, before: DateTime<Utc>) -> sqlx::Result<Vec<SagaRow>> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "UPDATE sagas SET stall_reported = true
         WHERE status = 'PENDING' AND last_event_at < $1 AND NOT stall_reported
         RETURNING {SAGA_COLUMNS}"
    )))
    .bind(before)
    .fetch_all(pool)
    .await
}

#[cfg(test)]
mod tests {
    use super::EntryKind;

    #[test]
    fn entry_kinds_sort_as_their_stored_names_do() {
        let kinds = [EntryKind::DeadLetter, EntryKind::Event, EntryKind::Operator];
        for a in kinds {
            for b in kinds {
                let name = |k| serde_json::to_string(&k).expect("a name");
                assert_eq!(a.cmp(&b), name(a).cmp(&name(b)), "{a:?} {b:?}");
            }
        }
    }
}
