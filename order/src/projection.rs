//! Projections of the order event store, and rebuilding them.
//!
//! A checkpointed projection ([`Projection`]) follows the event store in the
//! order transactions committed (`order_events.tx`, `.position`, see the
//! migration): each step applies the next batch of events and moves its
//! checkpoint in one transaction, so a projection that stops (or crashes)
//! halfway resumes where it last committed and applies every event once.
//! Its lag is the age of the first event it has not applied.
//!
//! [`rebuild`] replays the whole store into copies of a projection's tables
//! while queries are answered from the live ones, then catches up and swaps
//! the copies in, in one transaction. [`rebuild_orders`] does the same for
//! the read model the write path keeps (`orders`).

use std::time::Duration;

use chrono::{DateTime, Utc};
use common::Envelope;
use serde::Serialize;
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    domain::OrderEvent,
    store::{self, OrderView},
};

/// Events applied per transaction.
pub const BATCH: i64 = 500;
/// How often a projection that has caught up looks for new events.
const POLL: Duration = Duration::from_millis(50);

/// A point in the event store's commit order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    pub tx: i64,
    pub position: i64,
}

/// A projection fed from the event store in commit order.
pub trait Projection: Sync {
    /// Its checkpoint's name, its metric label, its name on the command line.
    const NAME: &'static str;
    /// Its tables; a rebuild fills a copy of each (`<table>_rebuild`) and
    /// swaps them in together.
    const TABLES: &'static [&'static str];

    /// Applies one event to the tables named `tables` (in the order of
    /// [`TABLES`](Projection::TABLES)).
    fn apply(
        &self,
        tx: &mut PgConnection,
        tables: &[String],
        env: &Envelope,
        event: &OrderEvent,
    ) -> impl Future<Output = sqlx::Result<()>> + Send;
}

fn live<P: Projection>() -> Vec<String> {
    P::TABLES.iter().map(|t| t.to_string()).collect()
}

/// Runs `projection` until shutdown: a step whenever there is something to
/// apply, and every [`POLL`] otherwise.
pub async fn follow<P: Projection>(pool: PgPool, projection: P, shutdown: CancellationToken) {
    let tables = live::<P>();
    loop {
        match step(&pool, &projection, &tables).await {
            Ok(n) if n as i64 == BATCH => continue,
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(projection = P::NAME, error = %e, "projection step failed; retrying")
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(POLL) => {}
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

/// The next events after `from` in commit order, only of transactions
/// older than every one still running: (position, order, envelope).
async fn events_after(
    conn: &mut PgConnection,
    from: Position,
    limit: i64,
) -> sqlx::Result<Vec<(Position, Uuid, String)>> {
    let rows: Vec<(i64, i64, Uuid, String)> = sqlx::query_as(
        "SELECT tx::text::bigint, position, order_id, envelope::text FROM order_events
         WHERE (tx, position) > ($1::bigint::text::xid8, $2)
           AND tx < pg_snapshot_xmin(pg_current_snapshot())
         ORDER BY tx, position LIMIT $3",
    )
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
    let mut to = from;
    for (at, order_id, body) in &events {
        match store::decode_stored(*order_id, body) {
            Ok((env, event)) => projection.apply(tx, tables, &env, &event).await?,
            // The order's own history is broken; its loads say so. The
            // projection goes on without it.
            Err(e) => {
                tracing::error!(projection = P::NAME, %order_id, error = %e, "stored event passed over")
            }
        }
        to = *at;
    }
    Ok((events.len(), to))
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
        sqlx::query(&format!("DROP TABLE IF EXISTS {shadow}"))
            .execute(&mut *conn)
            .await?;
        sqlx::query(&format!("CREATE TABLE {shadow} (LIKE {t} INCLUDING ALL)"))
            .execute(&mut *conn)
            .await?;
        out.push(shadow);
    }
    Ok(out)
}

/// Puts each shadow in place of its table, in the caller's transaction.
async fn swap(tx: &mut PgConnection, tables: &[&str]) -> sqlx::Result<()> {
    for t in tables {
        for sql in [
            format!("ALTER TABLE {t} RENAME TO {t}_replaced"),
            format!("ALTER TABLE {t}_rebuild RENAME TO {t}"),
            format!("DROP TABLE {t}_replaced"),
        ] {
            sqlx::query(&sql).execute(&mut *tx).await?;
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

/// Rebuilds the read model (`orders`), which the write path keeps in the
/// writing transaction: every order folded from its events into a copy;
/// then, with writers of the read model held back for a moment, the orders
/// written since the rebuild began are folded again and the copy's rows
/// replace the read model's in one transaction. Orders rebuilt.
pub async fn rebuild_orders(pool: &PgPool, progress: Progress<'_>) -> sqlx::Result<u64> {
    const TABLES: &[&str] = &["orders"];
    let mut conn = pool.acquire().await?;
    shadows(&mut conn, TABLES).await?;
    // Every transaction at or after this one may have written after a fold.
    let began: i64 =
        sqlx::query_scalar("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint")
            .fetch_one(&mut *conn)
            .await?;
    let ids: Vec<Uuid> = sqlx::query_scalar("SELECT DISTINCT order_id FROM order_events")
        .fetch_all(&mut *conn)
        .await?;
    drop(conn);
    let total = ids.len() as u64;
    for (n, chunk) in ids.chunks(BATCH as usize).enumerate() {
        let mut tx = pool.begin().await?;
        for id in chunk {
            refold(&mut tx, *id).await?;
        }
        tx.commit().await?;
        progress((n * BATCH as usize + chunk.len()) as u64, total);
    }
    let mut tx = pool.begin().await?;
    // Writers of the read model wait here until the swap commits; readers
    // go on, and see the old rows until then. Only this lock is waited for:
    // a writer holding the event store while it waits for the read model
    // cannot close a cycle with it.
    sqlx::query("LOCK TABLE orders IN EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await?;
    let since: Vec<Uuid> = sqlx::query_scalar(
        "SELECT DISTINCT order_id FROM order_events WHERE tx >= $1::bigint::text::xid8",
    )
    .bind(began)
    .fetch_all(&mut *tx)
    .await?;
    for id in &since {
        refold(&mut tx, *id).await?;
    }
    // The rows change hands, not the tables: a rename would have to wait
    // for writers that hold the event store, which wait for this.
    for sql in [
        "DELETE FROM orders",
        "INSERT INTO orders SELECT * FROM orders_rebuild",
        "DROP TABLE orders_rebuild",
    ] {
        sqlx::query(sql).execute(&mut *tx).await?;
    }
    tx.commit().await?;
    progress(total, total);
    Ok(total)
}

/// Folds order `id` from its events into `orders_rebuild`.
async fn refold(tx: &mut PgConnection, id: Uuid) -> sqlx::Result<()> {
    let events = match store::load_events(tx, id).await {
        Ok(events) => events,
        Err(store::ExecError::Db(e)) => return Err(e),
        Err(e) => {
            tracing::error!(order_id = %id, error = %e, "order passed over: its history does not decode");
            return Ok(());
        }
    };
    if let Some(order) = store::fold(&events) {
        store::insert_view(tx, "orders_rebuild", &OrderView::from(order)).await?;
    }
    Ok(())
}

/// Projection `customer-stats`: per customer, how many orders were placed,
/// confirmed, cancelled, halted and compensated by hand, and what the
/// confirmed ones came to; from the order events alone.
pub struct CustomerStats;

impl Projection for CustomerStats {
    const NAME: &'static str = "customer-stats";
    const TABLES: &'static [&'static str] = &["customer_stats", "customer_stats_orders"];

    async fn apply(
        &self,
        tx: &mut PgConnection,
        tables: &[String],
        env: &Envelope,
        event: &OrderEvent,
    ) -> sqlx::Result<()> {
        let (stats, orders) = (&tables[0], &tables[1]);
        let column = match event {
            OrderEvent::Placed(p) => {
                sqlx::query(&format!(
                    "WITH known AS (
                         INSERT INTO {orders} (order_id, customer_id, total) VALUES ($1, $2, $3)
                         ON CONFLICT (order_id) DO NOTHING RETURNING customer_id)
                     INSERT INTO {stats} (customer_id, orders, updated_at)
                     SELECT customer_id, 1, $4 FROM known
                     ON CONFLICT (customer_id) DO UPDATE
                         SET orders = {stats}.orders + 1, updated_at = EXCLUDED.updated_at"
                ))
                .bind(p.order_id)
                .bind(&p.customer_id)
                .bind(p.total)
                .bind(env.timestamp)
                .execute(tx)
                .await?;
                return Ok(());
            }
            OrderEvent::Confirmed(_) => "confirmed",
            OrderEvent::Cancelled(_) | OrderEvent::CancelledByCustomer(_) => "cancelled",
            OrderEvent::RequiresIntervention(_) => "intervened",
            OrderEvent::ManuallyCompensated(_) => "compensated",
        };
        let spent = if column == "confirmed" {
            format!(
                ", spent = LEAST({stats}.spent::numeric + o.total, 9223372036854775807)::bigint"
            )
        } else {
            String::new()
        };
        let order_id: Uuid = env.aggregate_id.parse().unwrap_or_else(|_| Uuid::nil());
        sqlx::query(&format!(
            "UPDATE {stats} SET {column} = {stats}.{column} + 1, updated_at = $2 {spent}
             FROM {orders} o WHERE o.order_id = $1 AND {stats}.customer_id = o.customer_id"
        ))
        .bind(order_id)
        .bind(env.timestamp)
        .execute(tx)
        .await?;
        Ok(())
    }
}

/// A customer's statistics as the projection has them.
#[derive(Debug, Serialize, sqlx::FromRow, PartialEq, Eq)]
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
