//! Projections of the order event store, and rebuilding them.
//!
//! A checkpointed projection ([`Projection`]) follows the event store in the
//! order transactions committed (`order_events.tx`, `.position`, see the
//! migration): each step applies the next batch of events and moves its
//! checkpoint in one transaction, so a projection that stops (or crashes)
//! halfway resumes where it last committed and applies every event once.
//! Its lag is the age of the first event it has not applied. Two follow the
//! store: the read model [`OrdersView`] (`orders`) and [`CustomerStats`].
//!
//! [`rebuild`] replays the whole store into copies of a projection's tables
//! while queries are answered from the live ones, then catches up and puts
//! the copies' rows in place, in one transaction.

use std::{sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use common::Envelope;
use serde::Serialize;
use sqlx::{PgConnection, PgPool};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    domain::OrderEvent,
    read_model::{self, OrderView},
    store,
};

/// Events applied per transaction.
pub const BATCH: i64 = 500;
/// How often a projection that has caught up looks for new events when
/// nothing wakes it (another replica's writes).
const POLL: Duration = Duration::from_millis(100);
/// How soon a woken projection that found nothing looks again: the events
/// it was woken for may belong to a transaction still below the horizon.
const RETRY: Duration = Duration::from_millis(5);
/// How long a woken projection waits for more commits before it applies
/// what they wrote, so that a trickle of commits is applied in a few
/// transactions instead of one each.
const LINGER: Duration = Duration::from_millis(100);

/// A point in the event store's commit order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    pub tx: i64,
    pub position: i64,
}

/// What a projection applies at once: events in commit order, and the
/// tables to write them to (in the order of [`Projection::TABLES`]).
pub struct Batch<'a> {
    pub tables: &'a [String],
    pub events: &'a [(Envelope, OrderEvent)],
}

/// A projection fed from the event store in commit order.
pub trait Projection: Sync {
    /// Its checkpoint's name, its metric label, its name on the command line.
    const NAME: &'static str;
    /// Its tables; a rebuild fills a copy of each (`<table>_rebuild`) and
    /// swaps them in together.
    const TABLES: &'static [&'static str];

    /// Applies a batch, with a few statements whatever the number of
    /// events.
    fn apply(
        &self,
        tx: &mut PgConnection,
        batch: Batch<'_>,
    ) -> impl Future<Output = sqlx::Result<()>> + Send;
}

fn live<P: Projection>() -> Vec<String> {
    P::TABLES.iter().map(|t| t.to_string()).collect()
}

/// Runs `projection` until shutdown: a step whenever `woken` says this
/// process committed events ([`common::outbox::OutboxSignal::follower`]),
/// and every [`POLL`] otherwise; a full batch is followed by
/// the next at once.
pub async fn follow<P: Projection>(
    pool: PgPool,
    projection: P,
    woken: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let tables = live::<P>();
    // A wake-up that found nothing looks again soon, a few times: the
    // writing transaction may still be in the horizon of another one.
    let mut retries = 0;
    loop {
        let wait = match step(&pool, &projection, &tables).await {
            Ok(n) if n as i64 == BATCH => continue,
            Ok(0) if retries > 0 => {
                retries -= 1;
                RETRY
            }
            Ok(_) => {
                retries = 0;
                POLL
            }
            Err(e) => {
                tracing::warn!(projection = P::NAME, error = %e, "projection step failed; retrying");
                POLL
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = woken.notified() => retries = 20,
            _ = tokio::time::sleep(wait) => continue,
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(LINGER) => {}
        }
    }
}

/// Applies the next batch after the checkpoint and moves the checkpoint, in
/// one transaction: how many events it applied.
pub async fn step<P: Projection>(
    pool: &PgPool,
    projection: &P,
    tables: &[String],
) -> sqlx::Result<usize> {
    let mut tx = pool.begin().await?;
    hold(&mut tx, P::NAME).await?;
    let from = checkpoint(&mut tx, P::NAME).await?;
    let (applied, to) = apply_after(&mut tx, projection, tables, from).await?;
    if to != from {
        save_checkpoint(&mut tx, P::NAME, to).await?;
    }
    tx.commit().await?;
    Ok(applied)
}

/// One projection at a time per name: the steps of several replicas, and a
/// rebuild's swap, take turns.
async fn hold(tx: &mut PgConnection, name: &str) -> sqlx::Result<()> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('projection:' || $1, 13))")
        .bind(name)
        .execute(tx)
        .await?;
    Ok(())
}

/// Where projection `name` stands (the start of the store if it never ran).
pub async fn checkpoint(conn: &mut PgConnection, name: &str) -> sqlx::Result<Position> {
    let at: Option<(i64, i64)> = sqlx::query_as(
        "SELECT tx::text::bigint, position FROM projection_checkpoints WHERE name = $1",
    )
    .bind(name)
    .fetch_optional(conn)
    .await?;
    Ok(
        at.map_or_else(Position::default, |(tx, position)| Position {
            tx,
            position,
        }),
    )
}

async fn save_checkpoint(conn: &mut PgConnection, name: &str, at: Position) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO projection_checkpoints (name, tx, position)
         VALUES ($1, $2::bigint::text::xid8, $3)
         ON CONFLICT (name) DO UPDATE
             SET tx = EXCLUDED.tx, position = EXCLUDED.position, updated_at = now()",
    )
    .bind(name)
    .bind(at.tx)
    .bind(at.position)
    .execute(conn)
    .await?;
    Ok(())
}

/// The horizon of this database: a transaction id below every transaction
/// that is still running and may write here. Postgres's own
/// (`pg_snapshot_xmin`) is the whole cluster's, and the other services'
/// databases share the cluster: one long transaction in any of them would
/// hold every projection back. A running transaction is passed over only
/// when `pg_stat_activity` shows it in another database (an id belongs to
/// one database for its life); one it does not show (just ended, prepared,
/// not visible) still holds the horizon back.
const HORIZON: &str = "(SELECT coalesce(
         (SELECT min(x) FROM pg_snapshot_xip(s) AS x
          WHERE x::text::bigint % 4294967296 NOT IN (
              SELECT backend_xid::text::bigint FROM pg_stat_activity
              WHERE backend_xid IS NOT NULL
                AND datname IS DISTINCT FROM current_database())),
         pg_snapshot_xmax(s))
     FROM pg_current_snapshot() AS s)";

/// The next events after `from` in commit order, only of transactions
/// older than every one still running here ([`HORIZON`]): (position,
/// order, envelope).
async fn events_after(
    conn: &mut PgConnection,
    from: Position,
    limit: i64,
) -> sqlx::Result<Vec<(Position, Uuid, String)>> {
    let rows: Vec<(i64, i64, Uuid, String)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT tx::text::bigint, position, order_id, envelope::text FROM order_events
         WHERE (tx, position) > ($1::bigint::text::xid8, $2) AND tx < {HORIZON}
         ORDER BY tx, position LIMIT $3"
    )))
    .bind(from.tx)
    .bind(from.position)
    .bind(limit)
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(tx, position, order_id, body)| (Position { tx, position }, order_id, body))
        .collect())
}

/// Applies one batch after `from` to `tables`: how many, and where it ended.
async fn apply_after<P: Projection>(
    tx: &mut PgConnection,
    projection: &P,
    tables: &[String],
    from: Position,
) -> sqlx::Result<(usize, Position)> {
    let events = events_after(tx, from, BATCH).await?;
    let Some((to, ..)) = events.last() else {
        return Ok((0, from));
    };
    let decoded: Vec<(Envelope, OrderEvent)> = events
        .iter()
        .filter_map(|(_, order_id, body)| match store::decode_stored(*order_id, body) {
            Ok(decoded) => Some(decoded),
            // The order's own history is broken; its loads say so. The
            // projection goes on without it.
            Err(e) => {
                tracing::error!(projection = P::NAME, %order_id, error = %e, "stored event passed over");
                None
            }
        })
        .collect();
    if !decoded.is_empty() {
        projection
            .apply(
                tx,
                Batch {
                    tables,
                    events: &decoded,
                },
            )
            .await?;
    }
    Ok((events.len(), *to))
}

/// Seconds since the first event `name` has not applied was recorded; 0
/// when it has applied everything.
pub async fn lag(pool: &PgPool, name: &str) -> sqlx::Result<f64> {
    let mut conn = pool.acquire().await?;
    let from = checkpoint(&mut conn, name).await?;
    let oldest: Option<DateTime<Utc>> = sqlx::query_scalar(
        "SELECT recorded_at FROM order_events
         WHERE (tx, position) > ($1::bigint::text::xid8, $2)
         ORDER BY tx, position LIMIT 1",
    )
    .bind(from.tx)
    .bind(from.position)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(oldest.map_or(0.0, |t| {
        (Utc::now() - t).num_milliseconds().max(0) as f64 / 1000.0
    }))
}

/// How far a rebuild is: events (or orders) done of the total.
pub type Progress<'a> = &'a mut (dyn FnMut(u64, u64) + Send);

/// Creates an empty copy of each table: `<table>_rebuild`.
async fn shadows(conn: &mut PgConnection, tables: &[&str]) -> sqlx::Result<Vec<String>> {
    let mut out = Vec::new();
    for t in tables {
        let shadow = format!("{t}_rebuild");
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP TABLE IF EXISTS {shadow}"
        )))
        .execute(&mut *conn)
        .await?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "CREATE TABLE {shadow} (LIKE {t} INCLUDING ALL)"
        )))
        .execute(&mut *conn)
        .await?;
        out.push(shadow);
    }
    Ok(out)
}

/// Puts each shadow's rows in place of its table's, in the caller's
/// transaction. The rows change hands, not the tables: readers are never
/// blocked (they see the old rows until the commit), where a rename would
/// hold them up behind its lock.
async fn swap(tx: &mut PgConnection, tables: &[&str]) -> sqlx::Result<()> {
    for t in tables {
        for sql in [
            format!("LOCK TABLE {t} IN EXCLUSIVE MODE"),
            format!("DELETE FROM {t}"),
            format!("INSERT INTO {t} SELECT * FROM {t}_rebuild"),
            format!("DROP TABLE {t}_rebuild"),
        ] {
            sqlx::query(sqlx::AssertSqlSafe(sql.as_str()))
                .execute(&mut *tx)
                .await?;
        }
    }
    Ok(())
}

async fn event_count(pool: &PgPool) -> sqlx::Result<u64> {
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM order_events")
        .fetch_one(pool)
        .await?;
    Ok(n as u64)
}

/// Replays every event into fresh copies of the projection's tables, then,
/// holding the projection (its steps wait), applies what came meanwhile and
/// swaps the copies in with the checkpoint where they end: queries are
/// answered from the old tables until that commits. Events replayed.
pub async fn rebuild<P: Projection>(
    pool: &PgPool,
    projection: &P,
    progress: Progress<'_>,
) -> sqlx::Result<u64> {
    let shadow = shadows(&mut *pool.acquire().await?, P::TABLES).await?;
    let total = event_count(pool).await?;
    let mut at = Position::default();
    let mut done = 0u64;
    loop {
        let mut tx = pool.begin().await?;
        let (n, to) = apply_after(&mut tx, projection, &shadow, at).await?;
        tx.commit().await?;
        (done, at) = (done + n as u64, to);
        progress(done, total.max(done));
        if (n as i64) < BATCH {
            break;
        }
    }
    let mut tx = pool.begin().await?;
    hold(&mut tx, P::NAME).await?;
    loop {
        let (n, to) = apply_after(&mut tx, projection, &shadow, at).await?;
        (done, at) = (done + n as u64, to);
        if (n as i64) < BATCH {
            break;
        }
    }
    swap(&mut tx, P::TABLES).await?;
    save_checkpoint(&mut tx, P::NAME, at).await?;
    tx.commit().await?;
    progress(done, done);
    Ok(done)
}

/// The order a stored event is of.
fn order_of(env: &Envelope) -> Option<Uuid> {
    env.aggregate_id.parse().ok()
}

/// Projection `orders`: the read model, one row per order as its events
/// leave it. A batch is applied by writing each of its orders as the event
/// store has it now (its latest snapshot and the events after it, loaded
/// together), unless the row is at that version or later already: the row
/// never goes back, and an order with several events in the batch is
/// loaded and written once.
pub struct OrdersView;

impl Projection for OrdersView {
    const NAME: &'static str = "orders";
    const TABLES: &'static [&'static str] = &["orders"];

    async fn apply(&self, tx: &mut PgConnection, batch: Batch<'_>) -> sqlx::Result<()> {
        let Batch { tables, events } = batch;
        let mut ids: Vec<Uuid> = events.iter().filter_map(|(env, _)| order_of(env)).collect();
        ids.sort_unstable();
        ids.dedup();
        let mut views = Vec::with_capacity(ids.len());
        for (order_id, loaded) in store::load_latest_many(tx, &ids).await? {
            match loaded {
                Ok(loaded) => views.extend(loaded.state.map(OrderView::from)),
                Err(e) => {
                    tracing::error!(%order_id, error = %e, "order passed over by the read model: its history does not decode");
                }
            }
        }
        read_model::insert_views(tx, &tables[0], &views).await
    }
}

/// Projection `customer-stats`: per customer, how many orders were placed,
/// confirmed, cancelled, halted and compensated by hand, and what the
/// confirmed ones came to; from the order events alone.
pub struct CustomerStats;

impl Projection for CustomerStats {
    const NAME: &'static str = "customer-stats";
    const TABLES: &'static [&'static str] = &["customer_stats", "customer_stats_orders"];

    async fn apply(&self, tx: &mut PgConnection, batch: Batch<'_>) -> sqlx::Result<()> {
        let Batch { tables, events } = batch;
        let (stats, orders) = (&tables[0], &tables[1]);
        // Placements first: the other events find their order's customer
        // among the orders known so far, this batch's included.
        let placed: Vec<_> = events
            .iter()
            .filter_map(|(env, event)| match event {
                OrderEvent::Placed(p) => Some((p, env.timestamp)),
                _ => None,
            })
            .collect();
        if !placed.is_empty() {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "WITH known AS (
                     INSERT INTO {orders} (order_id, customer_id, total)
                     SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::int8[])
                     ON CONFLICT (order_id) DO NOTHING RETURNING order_id, customer_id),
                 placed AS (
                     SELECT k.customer_id, count(*) AS n, max(p.at) AS at
                     FROM known k JOIN UNNEST($1::uuid[], $4::timestamptz[]) AS p(order_id, at)
                         USING (order_id)
                     GROUP BY k.customer_id)
                 INSERT INTO {stats} (customer_id, orders, updated_at)
                 SELECT customer_id, n, at FROM placed
                 ON CONFLICT (customer_id) DO UPDATE
                     SET orders = {stats}.orders + EXCLUDED.orders,
                         updated_at = GREATEST({stats}.updated_at, EXCLUDED.updated_at)"
            )))
            .bind(placed.iter().map(|(p, _)| p.order_id).collect::<Vec<_>>())
            .bind(
                placed
                    .iter()
                    .map(|(p, _)| p.customer_id.clone())
                    .collect::<Vec<_>>(),
            )
            .bind(placed.iter().map(|(p, _)| p.total).collect::<Vec<_>>())
            .bind(placed.iter().map(|(_, at)| *at).collect::<Vec<_>>())
            .execute(&mut *tx)
            .await?;
        }
        let outcomes: Vec<_> = events
            .iter()
            .filter_map(|(env, event)| {
                let column = match event {
                    OrderEvent::Placed(_) => return None,
                    OrderEvent::Confirmed(_) => "confirmed",
                    OrderEvent::Cancelled(_) | OrderEvent::CancelledByCustomer(_) => "cancelled",
                    OrderEvent::RequiresIntervention(_) => "intervened",
                    OrderEvent::ManuallyCompensated(_) => "compensated",
                };
                Some((order_of(env)?, column, env.timestamp))
            })
            .collect();
        if outcomes.is_empty() {
            return Ok(());
        }
        let count = |column: &str| format!("{column} = {stats}.{column} + d.{column}");
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE {stats} SET {}, {}, {}, {},
                 spent = LEAST({stats}.spent::numeric + d.spent, 9223372036854775807)::bigint,
                 updated_at = GREATEST({stats}.updated_at, d.at)
             FROM (
                 SELECT o.customer_id,
                     count(*) FILTER (WHERE e.kind = 'confirmed') AS confirmed,
                     count(*) FILTER (WHERE e.kind = 'cancelled') AS cancelled,
                     count(*) FILTER (WHERE e.kind = 'intervened') AS intervened,
                     count(*) FILTER (WHERE e.kind = 'compensated') AS compensated,
                     COALESCE(sum(o.total) FILTER (WHERE e.kind = 'confirmed'), 0) AS spent,
                     max(e.at) AS at
                 FROM UNNEST($1::uuid[], $2::text[], $3::timestamptz[]) AS e(order_id, kind, at)
                 JOIN {orders} o USING (order_id)
                 GROUP BY o.customer_id
             ) d
             WHERE {stats}.customer_id = d.customer_id",
            count("confirmed"),
            count("cancelled"),
            count("intervened"),
            count("compensated"),
        )))
        .bind(outcomes.iter().map(|o| o.0).collect::<Vec<_>>())
        .bind(outcomes.iter().map(|o| o.1).collect::<Vec<_>>())
        .bind(outcomes.iter().map(|o| o.2).collect::<Vec<_>>())
        // Planned for the orders table as it is each time: a plan kept from
        // when it was small joins by reading all of it.
        .persistent(false)
        .execute(tx)
        .await?;
        Ok(())
    }
}

/// A customer's statistics as the projection has them.
#[derive(Debug, Serialize, sqlx::FromRow, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CustomerStatsView {
    pub customer_id: String,
    pub orders: i64,
    pub confirmed: i64,
    pub cancelled: i64,
    pub intervened: i64,
    pub compensated: i64,
    pub spent: i64,
    pub updated_at: DateTime<Utc>,
}

pub async fn customer_stats(
    pool: &PgPool,
    customer_id: &str,
) -> sqlx::Result<Option<CustomerStatsView>> {
    sqlx::query_as(
        "SELECT customer_id, orders, confirmed, cancelled, intervened, compensated, spent, updated_at
         FROM customer_stats WHERE customer_id = $1",
    )
    .bind(customer_id)
    .fetch_optional(pool)
    .await
}
