//! Event store of the Order aggregate: its events and snapshots.
//!
//! `execute` is the one write path: load the latest snapshot and the events
//! after it, decide, then append with the next versions (and snapshot when
//! due), in the caller's transaction, which puts the events in the outbox.
//! The read model ([`crate::read_model`]) follows the event store as a
//! checkpointed projection.

use chrono::{DateTime, Utc};
use common::{Envelope, meter::Meter};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::{
    domain::{self, Command, DomainError, Order, OrderEvent},
    snapshot,
};

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error(transparent)]
    Domain(#[from] DomainError),
    /// Another writer appended first; load and decide again.
    #[error("order {0} was changed concurrently")]
    Conflict(Uuid),
    #[error("stored event of order {0} does not decode: {1}")]
    Corrupt(Uuid, String),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// How the event store snapshots orders ([`crate::snapshot`]).
#[derive(Debug, Clone)]
pub struct Snapshots {
    /// Snapshot every this many events (`SNAPSHOT_EVERY`).
    pub every: i64,
    pub meter: Meter,
}

/// An order as loaded.
#[derive(Debug)]
pub struct Loaded {
    pub state: Option<Order>,
    /// The version of the snapshot the load started from; 0: none.
    pub snapshot: i64,
    /// Why a stored snapshot was not used, if one was not.
    pub ignored: Option<String>,
}

/// The order's current state: its latest snapshot in the current format and
/// the events after it, read in one statement; the whole history when there
/// is no snapshot it can trust.
pub async fn load(conn: &mut PgConnection, order_id: Uuid) -> Result<Option<Order>, ExecError> {
    Ok(load_latest(conn, order_id).await?.state)
}

/// [`load`], saying how.
pub async fn load_latest(conn: &mut PgConnection, order_id: Uuid) -> Result<Loaded, ExecError> {
    let rows = latest_rows(&mut *conn, &[order_id]).await?;
    fold_latest(
        conn,
        order_id,
        rows.into_iter().map(|(_, row)| row).collect(),
    )
    .await
}

/// [`load_latest`] of each of `ids`, in one statement: an order with no
/// events is not in the map, one whose history does not decode maps to
/// its error.
pub async fn load_latest_many(
    conn: &mut PgConnection,
    ids: &[Uuid],
) -> sqlx::Result<Vec<(Uuid, Result<Loaded, ExecError>)>> {
    let mut by_order: Vec<(Uuid, Vec<StoredRow>)> = Vec::with_capacity(ids.len());
    for (order_id, row) in latest_rows(&mut *conn, ids).await? {
        match by_order.last_mut() {
            Some((id, rows)) if *id == order_id => rows.push(row),
            _ => by_order.push((order_id, vec![row])),
        }
    }
    let mut loaded = Vec::with_capacity(by_order.len());
    for (order_id, rows) in by_order {
        let folded = fold_latest(&mut *conn, order_id, rows).await;
        if let Err(ExecError::Db(e)) = folded {
            return Err(e);
        }
        loaded.push((order_id, folded));
    }
    Ok(loaded)
}

/// A stored snapshot (kind 0) or event (kind 1): version, snapshot format,
/// body.
type StoredRow = (i32, i64, Option<String>, String);

/// The latest snapshot in the current format of each of `ids` and the
/// events after it (every event when there is none), by order, snapshot
/// first, then by version.
async fn latest_rows(
    conn: &mut PgConnection,
    ids: &[Uuid],
) -> sqlx::Result<Vec<(Uuid, StoredRow)>> {
    let rows: Vec<(Uuid, i32, i64, Option<String>, String)> = sqlx::query_as(
        "SELECT order_id, 0 AS kind, version, format, state::text AS body
         FROM order_snapshots WHERE order_id = ANY($1)
         UNION ALL
         SELECT e.order_id, 1, e.version, NULL, e.envelope::text FROM order_events e
         WHERE e.order_id = ANY($1) AND e.version > COALESCE(
             (SELECT s.version FROM order_snapshots s
              WHERE s.order_id = e.order_id AND s.format = $2), 0)
         ORDER BY 1, 2, 3",
    )
    .bind(ids)
    .bind(snapshot::format())
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(id, kind, version, format, body)| (id, (kind, version, format, body)))
        .collect())
}

/// One order's state from its [`latest_rows`].
async fn fold_latest(
    conn: &mut PgConnection,
    order_id: Uuid,
    rows: Vec<StoredRow>,
) -> Result<Loaded, ExecError> {
    let format = snapshot::format();
    let mut rows = rows.into_iter().peekable();
    let mut loaded = Loaded {
        state: None,
        snapshot: 0,
        ignored: None,
    };
    if let Some((_, version, stored_format, body)) = rows.next_if(|row| row.0 == 0) {
        let stored_format = stored_format.unwrap_or_default();
        match snapshot::decode(order_id, version, &stored_format, &body) {
            Ok(order) => {
                loaded.state = Some(order);
                loaded.snapshot = version;
            }
            // Another format: the statement read every event already.
            Err(why) if stored_format != format => loaded.ignored = Some(why),
            Err(why) => {
                tracing::warn!(%order_id, version, %why, "snapshot ignored: the order is replayed in full");
                loaded.ignored = Some(why);
                loaded.state = fold(&load_events(conn, order_id).await?);
                return Ok(loaded);
            }
        }
    }
    for (_, _, _, text) in rows {
        let (env, event) = decode_stored(order_id, &text)?;
        loaded.state = domain::evolve(loaded.state, &event, env.timestamp);
    }
    Ok(loaded)
}

/// A point in an order's past.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum At {
    /// After its first `n` events.
    Version(i64),
    /// After every event that occurred by then (the events' own timestamps).
    Time(DateTime<Utc>),
}

/// The order as it was at `at`, folded from its events up to that point
/// (never from a snapshot: they hold only the latest state), and the
/// version it is at now (0: no such order).
pub async fn load_at(
    conn: &mut PgConnection,
    order_id: Uuid,
    at: At,
) -> Result<(Option<Order>, i64), ExecError> {
    let events = load_events(conn, order_id).await?;
    let latest = events.len() as i64;
    let until = match at {
        At::Version(n) => n.clamp(0, latest) as usize,
        At::Time(t) => events
            .iter()
            .take_while(|(env, _)| env.timestamp <= t)
            .count(),
    };
    Ok((fold(&events[..until]), latest))
}

/// Folds a history, oldest first.
pub fn fold(events: &[(Envelope, OrderEvent)]) -> Option<Order> {
    events.iter().fold(None, |state, (env, event)| {
        domain::evolve(state, event, env.timestamp)
    })
}

/// The aggregate's history, oldest first.
pub async fn load_events(
    conn: &mut PgConnection,
    order_id: Uuid,
) -> Result<Vec<(Envelope, OrderEvent)>, ExecError> {
    // As text: decoded once, straight into the typed event.
    let rows: Vec<String> = sqlx::query_scalar(
        "SELECT envelope::text FROM order_events WHERE order_id = $1 ORDER BY version",
    )
    .bind(order_id)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter()
        .map(|text| decode_stored(order_id, text))
        .collect()
}

/// A stored event of the order, brought to the current schema.
pub fn decode_stored(order_id: Uuid, text: &str) -> Result<(Envelope, OrderEvent), ExecError> {
    let (env, event) = Envelope::decode(text.as_bytes())
        .map_err(|e| ExecError::Corrupt(order_id, e.to_string()))?;
    let event = OrderEvent::try_from(event).map_err(|_| {
        ExecError::Corrupt(
            order_id,
            format!("{} is not an order event", env.event_type),
        )
    })?;
    Ok((env, event))
}

/// Runs `command` against the order: returns the new state and the emitted
/// envelopes, appended. Publishing them is the caller's part,
/// as for every service: the consumer runtime puts what a handler returns in
/// the outbox, placement and the dead-letter watch call
/// [`common::outbox::enqueue`].
pub async fn execute(
    conn: &mut PgConnection,
    snapshots: &Snapshots,
    order_id: Uuid,
    command: Command,
    correlation_id: Uuid,
    causation_id: Uuid,
) -> Result<(Option<Order>, Vec<Envelope>), ExecError> {
    // A placement always gets a fresh id: there is no history to read (and
    // the primary key would refuse a second version 1 anyway).
    let loaded = match command {
        Command::Place { .. } => Loaded {
            state: None,
            snapshot: 0,
            ignored: None,
        },
        _ => load_latest(conn, order_id).await?,
    };
    if loaded.ignored.is_some() {
        snapshots.meter.snapshot("ignored");
    }
    let (state, envelopes) = domain::decide_enveloped(
        loaded.state,
        order_id,
        command,
        correlation_id,
        causation_id,
    )?;
    if let Some(order) = state.as_ref().filter(|_| !envelopes.is_empty()) {
        append(conn, snapshots, loaded.snapshot, &[(order, &envelopes)]).await?;
    }
    Ok((state, envelopes))
}

/// Appends what several orders decided, in one statement, and snapshots
/// each whose last snapshot (`snapshot`, its version; 0: none) is
/// [`snapshot::due`]. A concurrent writer that appended the same version of
/// an order first makes the primary key refuse them all:
/// [`ExecError::Conflict`], naming the first order.
pub async fn append(
    conn: &mut PgConnection,
    snapshots: &Snapshots,
    snapshot: i64,
    decided: &[(&Order, &[Envelope])],
) -> Result<(), ExecError> {
    let appended = Appended::of(snapshots, snapshot, decided);
    let sql = format!("WITH {} SELECT 1", Appended::ctes(1));
    let result = appended
        .bind_to(sqlx::query(sqlx::AssertSqlSafe(sql)))
        .execute(conn)
        .await;
    appended.written(result.map(drop))
}

/// What several orders decided as the event store keeps it: their events,
/// and the snapshot of each whose last one is [`snapshot::due`]; written
/// by one statement, [`append`]'s or one that writes more with them
/// ([`Appended::ctes`]). The read model follows the event store
/// ([`crate::projection::OrdersView`]).
pub struct Appended {
    orders: Vec<Uuid>,
    versions: Vec<i64>,
    ids: Vec<Uuid>,
    types: Vec<String>,
    schemas: Vec<i32>,
    bodies: Vec<Vec<u8>>,
    times: Vec<DateTime<Utc>>,
    snapshot_orders: Vec<Uuid>,
    snapshot_versions: Vec<i64>,
    snapshot_states: Vec<String>,
    meter: Meter,
}

impl Appended {
    /// The rows of `decided`; `snapshot` is the version of the last
    /// snapshot of each (0: none).
    pub fn of(snapshots: &Snapshots, snapshot: i64, decided: &[(&Order, &[Envelope])]) -> Appended {
        let envelopes = || {
            decided
                .iter()
                .flat_map(|(order, envs)| envs.iter().map(move |e| (order.id, e)))
        };
        let due: Vec<&Order> = decided
            .iter()
            .map(|(order, _)| *order)
            .filter(|order| snapshot::due(snapshot, order.version, snapshots.every))
            .collect();
        Appended {
            orders: envelopes().map(|(id, _)| id).collect(),
            versions: envelopes().map(|(_, e)| e.version).collect(),
            ids: envelopes().map(|(_, e)| e.event_id).collect(),
            types: envelopes().map(|(_, e)| e.event_type.clone()).collect(),
            schemas: envelopes().map(|(_, e)| e.schema_version as i32).collect(),
            bodies: envelopes().map(|(_, e)| e.to_bytes()).collect(),
            times: envelopes().map(|(_, e)| e.timestamp).collect(),
            snapshot_orders: due.iter().map(|o| o.id).collect(),
            snapshot_versions: due.iter().map(|o| o.version).collect(),
            snapshot_states: due.iter().map(|o| snapshot::encode(o)).collect(),
            meter: snapshots.meter.clone(),
        }
    }

    /// Two common table expressions, `appended` and `snapshotted`, that
    /// write the rows, with their arrays as the statement's parameters
    /// `$first` to `$first + 10` (bound by [`Appended::bind_to`]). A
    /// snapshot is kept unless a newer one in the current format is there
    /// already.
    pub fn ctes(first: usize) -> String {
        let p: Vec<String> = (first..first + 11).map(|i| format!("${i}")).collect();
        format!(
            "appended AS (
                 INSERT INTO order_events (order_id, version, event_id, event_type, schema_version, envelope, recorded_at)
                 SELECT e.order_id, e.version, e.id, e.type, e.schema, convert_from(e.body, 'UTF8')::jsonb, e.at
                 FROM UNNEST({}::uuid[], {}::bigint[], {}::uuid[], {}::text[], {}::int[], {}::bytea[], {}::timestamptz[])
                      AS e(order_id, version, id, type, schema, body, at)
             ), snapshotted AS (
                 INSERT INTO order_snapshots (order_id, version, format, state)
                 SELECT s.order_id, s.version, {}, s.state::jsonb
                 FROM UNNEST({}::uuid[], {}::bigint[], {}::text[]) AS s(order_id, version, state)
                 ON CONFLICT (order_id) DO UPDATE SET
                     version = EXCLUDED.version, format = EXCLUDED.format,
                     state = EXCLUDED.state, taken_at = now()
                 WHERE order_snapshots.version < EXCLUDED.version
                    OR order_snapshots.format <> EXCLUDED.format
             )",
            p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8], p[9], p[10]
        )
    }

    /// Binds the rows' arrays as the next eleven parameters of `query`.
    pub fn bind_to<'q>(
        &'q self,
        query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
        query
            .bind(&self.orders)
            .bind(&self.versions)
            .bind(&self.ids)
            .bind(&self.types)
            .bind(&self.schemas)
            .bind(&self.bodies)
            .bind(&self.times)
            .bind(snapshot::format())
            .bind(&self.snapshot_orders)
            .bind(&self.snapshot_versions)
            .bind(&self.snapshot_states)
    }

    /// What the statement that wrote the rows did, as the event store says
    /// it: a version of an order appended first by another writer is
    /// [`ExecError::Conflict`]; the snapshots taken are counted.
    pub fn written<T>(&self, result: sqlx::Result<T>) -> Result<T, ExecError> {
        match result {
            Ok(written) => {
                for _ in &self.snapshot_orders {
                    self.meter.snapshot("taken");
                }
                Ok(written)
            }
            Err(sqlx::Error::Database(e))
                if e.is_unique_violation()
                    && e.try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                        .and_then(|e| e.table())
                        == Some("order_events") =>
            {
                Err(ExecError::Conflict(
                    self.orders.first().copied().unwrap_or_default(),
                ))
            }
            Err(e) => Err(e.into()),
        }
    }
}
