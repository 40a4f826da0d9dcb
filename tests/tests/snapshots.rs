//! Snapshots of the Order aggregate in the order service's database: taken
//! every `SNAPSHOT_EVERY` events, a load from one gives the state of a full
//! replay, and one the code cannot trust is ignored and replaced.

use anyhow::Result;
use common::meter::names;
use order::store;
use saga_tests::{DEADLINE, Stack, eventually};
use uuid::Uuid;

/// Every service, the order service snapshotting every event.
async fn snapshotting_every_event() -> Result<Stack> {
    let mut stack = Stack::start_with(&["payment", "inventory", "shipping"]).await?;
    stack
        .start_service_with("order", |l| l.order.snapshot_every = 1)
        .await?;
    stack.set_balance("alice", 10_000).await?;
    stack.set_stock("widget", 2).await?;
    Ok(stack)
}

/// The order as a load from its snapshot sees it, checked against a replay
/// of its whole history.
async fn load_agrees_with_replay(stack: &Stack, id: Uuid) -> Result<store::Loaded> {
    let pool = stack.pool("order").await?;
    let mut conn = pool.acquire().await?;
    let loaded = store::load_latest(&mut conn, id).await?;
    let replayed = store::fold(&store::load_events(&mut conn, id).await?);
    anyhow::ensure!(
        loaded.state == replayed,
        "order {id}: snapshot + tail {:#?} but replay {replayed:#?}",
        loaded.state
    );
    Ok(loaded)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_from_the_latest_snapshot_gives_the_state_of_a_full_replay() -> Result<()> {
    let stack = snapshotting_every_event().await?;
    let (confirmed, _) = stack
        .run_saga("alice", &[("widget", 1, 1_000)], "US")
        .await?;
    let (undeliverable, _) = stack
        .run_saga("alice", &[("widget", 1, 1_000)], "ZZ")
        .await?;
    let (out_of_stock, _) = stack
        .run_saga("alice", &[("widget", 5, 1_000)], "US")
        .await?;
    let (declined, _) = stack
        .run_saga("alice", &[("widget", 1, 20_000)], "US")
        .await?;
    // Every command again, now loading from the snapshots: nothing changes.
    stack.redeliver_every_event().await?;
    stack.settle().await?;

    for id in [confirmed, undeliverable, out_of_stock, declined] {
        let loaded = load_agrees_with_replay(&stack, id).await?;
        let order = stack.order(id).await?;
        let state = loaded.state.expect("placed");
        assert_eq!(loaded.snapshot, state.version, "the latest is snapshotted");
        assert_eq!(order["version"], state.version);
        assert_eq!(order["status"], serde_json::to_value(state.status)?);
        assert!(loaded.ignored.is_none());
    }
    assert_eq!(stack.order(confirmed).await?["status"], "CONFIRMED");
    let taken = stack.metrics("order").await?;
    assert!(taken.sum(names::SNAPSHOTS, &[("outcome", "taken")]) >= 8.0);
    stack.assert_invariants().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_the_code_cannot_trust_is_ignored_and_replaced_by_the_next_write() -> Result<()>
{
    // Payment is down: the order waits at version 1, snapshotted.
    let mut stack = snapshotting_every_event().await?;
    stack.stop_service("payment").await?;
    let id = stack.place("alice", &[("widget", 1, 1_000)], "US").await?;
    let pool = stack.pool("order").await?;
    let format: String =
        sqlx::query_scalar("SELECT format FROM order_snapshots WHERE order_id = $1")
            .bind(id)
            .fetch_one(&pool)
            .await?;
    assert_eq!(format, order::snapshot::format());

    // Written by an older release, in a shape this code does not read.
    sqlx::query(
        "UPDATE order_snapshots SET format = 'order/0/0000000000000000',
                state = '{\"status\": \"CONFIRMED\"}' WHERE order_id = $1",
    )
    .bind(id)
    .execute(&pool)
    .await?;
    let loaded = load_agrees_with_replay(&stack, id).await?;
    assert_eq!(loaded.snapshot, 0);
    assert!(loaded.ignored.unwrap().contains("format order/0/"));

    // In the current format, but not the order at the version it is filed
    // under: not trusted either.
    let state = load_agrees_with_replay(&stack, id).await?.state.unwrap();
    let mut forged = serde_json::from_str::<serde_json::Value>(&order::snapshot::encode(&state))?;
    forged["version"] = 5.into();
    sqlx::query("UPDATE order_snapshots SET format = $2, state = $3 WHERE order_id = $1")
        .bind(id)
        .bind(order::snapshot::format())
        .bind(forged)
        .execute(&pool)
        .await?;
    let loaded = load_agrees_with_replay(&stack, id).await?;
    assert!(loaded.ignored.unwrap().contains("at version 5"));

    // The saga goes on; the next write of the order snapshots it afresh.
    stack.start_service("payment").await?;
    let order = stack.wait_for_outcome(id).await?;
    assert_eq!(order["status"], "CONFIRMED");
    let (version, format): (i64, String) = eventually("a new snapshot", DEADLINE, || async {
        let row: (i64, String) =
            sqlx::query_as("SELECT version, format FROM order_snapshots WHERE order_id = $1")
                .bind(id)
                .fetch_one(&pool)
                .await?;
        Ok((row.0 == 2).then_some(row))
    })
    .await?;
    assert_eq!((version, format.as_str()), (2, order::snapshot::format()));
    assert!(load_agrees_with_replay(&stack, id).await?.ignored.is_none());
    let metrics = stack.metrics("order").await?;
    assert!(metrics.sum(names::SNAPSHOTS, &[("outcome", "ignored")]) >= 1.0);
    stack.settle().await?;
    stack.assert_invariants().await
}
