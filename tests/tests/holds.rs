//! How a step's transaction begins: it holds the orders whose steps it
//! takes from its first statement, learns of the cancels recorded for them
//! once they are held, and leaves its connection fit for the next
//! transaction when a hold cannot be had; a lane begins it on the
//! connection its last transaction committed on.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Result, ensure};
use common::{
    Applying, Envelope, Event, Handler, HandlerError, Infra, Outcome, Service,
    cancels::Cancels,
    consumer::NothingBefore,
    event::{Address, InventoryReserved, OrderLine},
    service,
};
use futures::future::try_join_all;
use saga_tests::{DEADLINE, Stack, eventually};
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// How long the consumer's batches wait for a lock.
const BATCH_LOCK_TIMEOUT: Option<Duration> = Some(Duration::from_millis(100));

/// A database with the common tables, a pool of two connections on it (a
/// lane's, and one for a transaction begun again when a cancel is
/// recorded), an order, and a connection whose open transaction holds the
/// order, as another step or a cancel would.
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
    let pool = service::pool_options(2).connect(&url).await?;
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
    let mut conn = h.pool.acquire().await?;

    let begun = h
        .cancels
        .begin_holding(&h.pool, &mut conn, BATCH_LOCK_TIMEOUT, &[h.order_id])
        .await;
    ensure!(begun.is_err(), "the hold should have timed out");
    drop(begun);
    sqlx::query("ROLLBACK").execute(&mut h.other).await?;

    // The connection the failed start used begins the next transaction.
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    let one: i32 = sqlx::query_scalar("SELECT 1").fetch_one(&mut *tx).await?;
    tx.commit().await?;
    ensure!(one == 1);
    let (tx, _) = h
        .cancels
        .begin_holding(&h.pool, &mut conn, BATCH_LOCK_TIMEOUT, &[h.order_id])
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
            let mut conn = pool.acquire().await?;
            let (mut tx, cancels) =
                (cancels.begin_holding(&pool, &mut conn, None, &[order_id])).await?;
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

/// A shipping service whose handler notes the database backend each
/// event's transaction runs on.
struct NotesBackends(Arc<Mutex<Vec<i32>>>);

impl Handler for NotesBackends {
    type Before = NothingBefore;

    fn before(&self) -> &NothingBefore {
        &NothingBefore
    }

    async fn handle(&self, cx: Applying<'_>, _event: Event) -> Result<Outcome, HandlerError> {
        let backend: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut *cx.tx)
            .await?;
        self.0.lock().unwrap().push(backend);
        Ok(Outcome::Skipped("noted".into()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lane_begins_each_transaction_on_the_connection_its_last_one_committed_on() -> Result<()>
{
    let stack = Stack::start_with(&[]).await?;
    let mut config = stack.config("shipping");
    config.consumer_lanes = 1;
    config.database_max_connections = 4;
    let infra = Infra::connect(config, &shipping::MIGRATIONS).await?;
    // Four idle connections: a transaction on whichever the pool hands out
    // next would run on each in turn.
    let opened = try_join_all((0..4).map(|_| infra.pool.acquire())).await?;
    drop(opened);
    let backends = Arc::new(Mutex::new(Vec::new()));
    let shutdown = CancellationToken::new();
    let handler = NotesBackends(backends.clone());
    let service = Service::build(
        &infra,
        handler,
        axum::Router::new().into(),
        shutdown.clone(),
    );
    tokio::spawn(service.await?.run());

    for applied in 1..=5 {
        let order_id = Uuid::now_v7();
        let event = Event::InventoryReserved(InventoryReserved {
            order_id,
            lines: vec![OrderLine {
                product_id: "widget".into(),
                quantity: 1,
                unit_price: 10,
            }],
            shipping_address: Address::example(),
        });
        let envelope = Envelope::new(&event, order_id.to_string(), 2, order_id, Uuid::now_v7());
        let subject = stack.subjects.event_of(event.kind(), order_id);
        stack.publish(&subject, envelope.to_bytes()).await?;
        eventually("the event applied", DEADLINE, || async {
            Ok((backends.lock().unwrap().len() == applied).then_some(()))
        })
        .await?;
    }
    let backends = backends.lock().unwrap().clone();
    shutdown.cancel();
    ensure!(
        backends.windows(2).all(|w| w[0] == w[1]),
        "each event's transaction should have run on the lane's connection; backends: {backends:?}"
    );
    Ok(())
}
