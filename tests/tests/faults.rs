//! Exactly-once effects under redelivery, a forgetful Redis, and a crash
//! between commit and publish.

use anyhow::Result;
use saga_tests::{DEADLINE, HAPPY_PATH, Stack, eventually, order_body};
use uuid::Uuid;

const PRICE: i64 = 1_000;

/// Effects that must not change when events are applied again.
#[derive(Debug, PartialEq)]
struct Effects {
    balance: i64,
    stock: (i64, i64),
    payments: i64,
    reservations: i64,
    shipments: i64,
    order_events: i64,
    outcomes: Vec<(Uuid, String)>,
}

async fn effects(stack: &Stack) -> Result<Effects> {
    stack.projected().await?;
    let pool = stack.pool("order").await?;
    let outcomes = sqlx::query_as("SELECT order_id, status FROM orders ORDER BY order_id")
        .fetch_all(&pool)
        .await?;
    Ok(Effects {
        balance: stack.balance("alice").await?,
        stock: stack.stock("widget").await?,
        payments: stack.rows("payment", "payments").await?,
        reservations: stack.rows("inventory", "reservations").await?,
        shipments: stack.rows("shipping", "shipments").await?,
        order_events: stack.rows("order", "order_events").await?,
        outcomes,
    })
}

/// One saga of each kind, run to the end.
async fn run_mixed_sagas(stack: &Stack) -> Result<()> {
    stack.set_balance("alice", 100_000).await?;
    stack.set_stock("widget", 3).await?;
    let ok = stack.place("alice", &[("widget", 2, PRICE)], "US").await?;
    let no_stock = stack.place("alice", &[("widget", 5, PRICE)], "US").await?;
    let bad_address = stack.place("alice", &[("widget", 1, PRICE)], "ZZ").await?;
    let broke = stack
        .place("alice", &[("widget", 1, 1_000_000)], "US")
        .await?;
    for id in [ok, no_stock, bad_address, broke] {
        stack.wait_for_outcome(id).await?;
    }
    stack.settle().await
}

fn guard_rows_sql() -> &'static str {
    "SELECT count(*) FROM consumed_events"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_delivered_again_still_has_exactly_one_effect() -> Result<()> {
    let stack = Stack::start().await?;
    run_mixed_sagas(&stack).await?;
    let before = effects(&stack).await?;
    let events_before = stack.stream_events().await?.len();

    let injected = stack.redeliver_every_event().await?;
    stack.settle().await?;

    assert!(
        injected >= 4 * 3,
        "expected the events of four sagas, got {injected}"
    );
    assert_eq!(effects(&stack).await?, before);
    // Nothing new was emitted: the stream holds the originals and the copies only.
    assert_eq!(stack.stream_events().await?.len(), events_before + injected);
    stack.assert_invariants().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_flush_between_delivery_and_redelivery_still_has_exactly_one_effect() -> Result<()>
{
    let stack = Stack::start().await?;
    run_mixed_sagas(&stack).await?;
    let before = effects(&stack).await?;
    let guards_before: i64 = {
        let mut total = 0;
        for s in saga_tests::SERVICES {
            total += stack.count(s, guard_rows_sql()).await?;
        }
        total
    };

    // Redis held the "done" markers; forget them all.
    let mut redis = stack.redis.connection().await?;
    let keys: i64 = redis::cmd("DBSIZE").query_async(&mut redis).await?;
    assert!(keys > 0, "redis held no idempotency keys to lose");
    redis::cmd("FLUSHALL").query_async::<()>(&mut redis).await?;

    let injected = stack.redeliver_every_event().await?;
    stack.settle().await?;

    assert!(injected > 0);
    assert_eq!(
        effects(&stack).await?,
        before,
        "the Postgres guard must catch what Redis forgot"
    );
    let mut guards_after = 0;
    for s in saga_tests::SERVICES {
        guards_after += stack.count(s, guard_rows_sql()).await?;
    }
    assert_eq!(guards_after, guards_before);
    stack.assert_invariants().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_killed_between_commit_and_publish_completes_the_saga_after_restart() -> Result<()>
{
    let stack = Stack::start_with(&["order", "inventory", "shipping"]).await?;
    // Payment runs as its own process with its relay held: it commits the
    // charge and PaymentProcessed to its outbox, and publishes nothing.
    let payment = stack.spawn_process("payment", &[("OUTBOX_RELAY", "off")])?;
    let payment_pool = stack.pool("payment").await?;
    stack.wait_for_table("payment", "accounts").await?;
    sqlx::query("INSERT INTO accounts (customer_id, balance) VALUES ('alice', 10000)")
        .execute(&payment_pool)
        .await?;
    stack.set_stock("widget", 5).await?;

    let id = stack.place("alice", &[("widget", 2, PRICE)], "US").await?;
    eventually(
        "the charge to be committed to the outbox",
        DEADLINE,
        || async {
            let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
                .fetch_one(&payment_pool)
                .await?;
            Ok((pending == 1).then_some(()))
        },
    )
    .await?;
    payment.kill().await?;

    // Committed but never published: the saga cannot have moved on.
    assert_eq!(stack.order(id).await?["status"], "PENDING");
    assert_eq!(stack.balance("alice").await?, 10_000 - 2 * PRICE);
    assert!(
        !stack
            .saga_event_types(id)
            .await?
            .contains(&"PaymentProcessed".to_string())
    );

    let _payment = stack.spawn_process("payment", &[])?;
    let order = stack.wait_for_outcome(id).await?;
    stack.settle().await?;

    assert_eq!(order["status"], "CONFIRMED");
    assert_eq!(stack.balance("alice").await?, 10_000 - 2 * PRICE);
    assert_eq!(stack.rows("payment", "payments").await?, 1);
    let types = stack.saga_event_types(id).await?;
    assert_eq!(
        types.iter().filter(|t| *t == "PaymentProcessed").count(),
        1,
        "{types:?}"
    );
    assert_eq!(types, HAPPY_PATH);
    stack.assert_invariants().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_restart_loses_nothing_in_flight() -> Result<()> {
    let mut stack = Stack::stocked(1_000_000, 1_000).await?;

    let body = order_body("alice", &[("widget", 1, PRICE)], "US");
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(stack.place_order(&body).await?);
    }
    // Stop inventory mid-stream (drains what it took), then bring it back.
    stack.stop_service("inventory").await?;
    stack.start_service("inventory").await?;
    for id in &ids {
        assert_eq!(stack.wait_for_outcome(*id).await?["status"], "CONFIRMED");
    }
    stack.settle().await?;
    stack.assert_invariants().await
}
