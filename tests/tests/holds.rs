//! How a step's transaction begins: it holds the orders whose steps it
//! takes from its first statement, learns of the cancels recorded for them
//! once they are held, and leaves its connection fit for the next
//! transaction when a hold cannot be had.

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use common::{cancels::Cancels, service};
use saga_tests::{DEADLINE, Stack};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

/// How long the consumer's batches wait for a lock.
const BATCH_LOCK_TIMEOUT: Option<Duration> = Some(Duration::from_millis(100));

/// A database with the common tables, a pool of one connection on it (so
/// the next transaction gets the connection the last one used), an order,
/// and a second connection whose open transaction holds the order, as
/// another step or a cancel would.
struct Held {
    _stack: Stack,
    pool: PgPool,
    other: PgConnection,
    cancels: Cancels,
    order_id: Uuid,
}

async fn held_elsewhere() -> Result<Held> {
    let stack = Stack::start_with(&[]).await?;
    let url = stack.dbs.url("payment");
    let pool = service::pool_options(1).connect(&url).await?;
    service::COMMON_MIGRATIONS.run(&pool).await?;
    let mut other = <PgConnection as sqlx::Connection>::connect(&url).await?;
    let cancels = Cancels::new(stack.js.clone(), stack.subjects.clone());
    let order_id = Uuid::now_v7();
    sqlx::query("BEGIN").execute(&mut other).await?;
    common::cancels::hold_order(&mut other, order_id).await?;
    Ok(Held {
        _stack: stack,
        pool,
        other,
        cancels,
        order_id,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_whose_hold_times_out_leaves_its_connection_usable() -> Result<()> {
    let mut h = held_elsewhere().await?;

    let begun = h
        .cancels
        .begin_holding(&h.pool, BATCH_LOCK_TIMEOUT, &[h.order_id])
        .await;
    ensure!(begun.is_err(), "the hold should have timed out");
    drop(begun);
    sqlx::query("ROLLBACK").execute(&mut h.other).await?;

    // The pool's one connection is the one the failed start used.
    let mut tx = h.pool.begin().await?;
    let one: i32 = sqlx::query_scalar("SELECT 1").fetch_one(&mut *tx).await?;
    tx.commit().await?;
    ensure!(one == 1);
    let (tx, _) = h
        .cancels
        .begin_holding(&h.pool, BATCH_LOCK_TIMEOUT, &[h.order_id])
        .await?;
    tx.rollback().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_recorded_while_the_hold_was_awaited_is_seen() -> Result<()> {
    // The cancel's transaction holds the order and records the cancel...
    let mut h = held_elsewhere().await?;
    sqlx::query("INSERT INTO cancelled_orders (order_id, reason) VALUES ($1, 'changed my mind')")
        .bind(h.order_id)
        .execute(&mut h.other)
        .await?;

    // ...while the step's transaction waits for the hold...
    let step = tokio::spawn({
        let (pool, cancels, order_id) = (h.pool.clone(), h.cancels.clone(), h.order_id);
        async move {
            let (mut tx, cancels) = cancels.begin_holding(&pool, None, &[order_id]).await?;
            let recorded = cancels.ended(&mut tx, order_id).await?;
            tx.rollback().await?;
            anyhow::Ok(recorded)
        }
    });
    let deadline = Instant::now() + DEADLINE;
    loop {
        let waiting: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND NOT granted \
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database()))",
        )
        .fetch_one(&mut h.other)
        .await?;
        if waiting {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the step never waited for the hold"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // ...and gets it once the cancel committed.
    sqlx::query("COMMIT").execute(&mut h.other).await?;

    let recorded = step.await??;
    ensure!(
        recorded.as_deref() == Some("changed my mind"),
        "the step should have seen the cancel, saw {recorded:?}"
    );
    Ok(())
}
