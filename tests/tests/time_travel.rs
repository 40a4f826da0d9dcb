//! Reading an order's past (`?atVersion=N`, `?asOf=T`) and one's own writes
//! (`?minVersion=V`), against the order service's event store.

use anyhow::Result;
use saga_tests::{Stack, assert_refused};
use serde_json::Value;
use uuid::Uuid;

/// An order placed, charged, out of stock, refunded and cancelled: two
/// events of the order (OrderPlaced, OrderCancelled).
async fn a_cancelled_order() -> Result<(Stack, Uuid, Vec<Value>)> {
    let stack = Stack::stocked(10_000, 0).await?;
    let (id, order) = stack
        .run_saga("alice", &[("widget", 1, 1_000)], "US")
        .await?;
    assert_eq!(order["status"], "CANCELLED");
    let (_, events) = stack
        .get_json("order", &format!("/orders/{id}/events"))
        .await?;
    let events = events.as_array().cloned().unwrap_or_default();
    assert_eq!(events.len(), 2, "{events:#?}");
    Ok((stack, id, events))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_is_read_as_it_was_at_each_version_and_at_each_moment() -> Result<()> {
    let (stack, id, events) = a_cancelled_order().await?;
    let get = |query: String| {
        let stack = &stack;
        async move {
            stack
                .get_json("order", &format!("/orders/{id}?{query}"))
                .await
        }
    };

    let (status, v1) = get("atVersion=1".into()).await?;
    assert_eq!(status, 200, "{v1}");
    assert_eq!(
        (v1["status"].as_str(), v1["version"].as_i64()),
        (Some("PENDING"), Some(1))
    );
    assert_eq!(v1["failureReason"], Value::Null);
    let (_, v2) = get("atVersion=2".into()).await?;
    assert_eq!(
        v2,
        stack.order(id).await?,
        "the last version is the current state"
    );
    assert_eq!(v2["status"], "CANCELLED");

    // By the events' own timestamps.
    let at = |i: usize| events[i]["timestamp"].as_str().unwrap().to_string();
    let (_, then) = get(format!("asOf={}", at(0))).await?;
    assert_eq!(then, v1);
    let (_, then) = get(format!("asOf={}", at(1))).await?;
    assert_eq!(then, v2);
    let (_, later) = get("asOf=2999-01-01T00:00:00Z".into()).await?;
    assert_eq!(later, v2);

    let (status, body) = get("atVersion=3".into()).await?;
    assert_refused(status, &body, 404, "has no version 3: it is at version 2");
    let (status, body) = get("asOf=2000-01-01T00:00:00Z".into()).await?;
    assert_refused(
        status,
        &body,
        404,
        "did not exist yet at 2000-01-01T00:00:00+00:00",
    );
    let (status, body) = get(format!("atVersion=1&asOf={}", at(0))).await?;
    assert_refused(
        status,
        &body,
        400,
        "at most one of atVersion, asOf, minVersion and latest",
    );
    let (status, body) = get("atVersion=0".into()).await?;
    assert_refused(status, &body, 400, "atVersion");
    let (status, body) = get("asOf=yesterday".into()).await?;
    assert_refused(status, &body, 400, "asOf");
    let (status, body) = get("atVersion=1&colour=red".into()).await?;
    assert_refused(status, &body, 400, "colour");
    let (status, _) = stack
        .get_json("order", &format!("/orders/{}?atVersion=1", Uuid::now_v7()))
        .await?;
    assert_eq!(status, 404);
    stack.assert_invariants().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_wrote_a_version_reads_at_least_that_version() -> Result<()> {
    let (stack, id, _) = a_cancelled_order().await?;
    let get = |query: &'static str| {
        let stack = &stack;
        async move {
            stack
                .get_json("order", &format!("/orders/{id}{query}"))
                .await
        }
    };

    let (status, order) = get("?minVersion=2").await?;
    assert_eq!(
        (status, order["version"].as_i64()),
        (200, Some(2)),
        "{order}"
    );
    let (status, body) = get("?minVersion=3").await?;
    assert_refused(
        status,
        &body,
        409,
        "is at version 2: version 3 has not been written",
    );

    // A read model that has not caught up (here: set back by hand) answers
    // plain reads; a client that wrote version 2 still reads version 2,
    // from the event store.
    let pool = stack.pool("order").await?;
    sqlx::query("UPDATE orders SET status = 'PENDING', failure_reason = NULL, version = 1 WHERE order_id = $1")
        .bind(id)
        .execute(&pool)
        .await?;
    assert_eq!(stack.order(id).await?["status"], "PENDING");
    let (status, order) = get("?minVersion=2").await?;
    assert_eq!(status, 200, "{order}");
    assert_eq!(
        (order["status"].as_str(), order["version"].as_i64()),
        (Some("CANCELLED"), Some(2))
    );

    // No row in the read model at all (an order not projected yet, such as
    // one just placed): every read is answered from the event store.
    sqlx::query("DELETE FROM orders WHERE order_id = $1")
        .bind(id)
        .execute(&pool)
        .await?;
    let (status, order) = get("").await?;
    assert_eq!((status, order["status"].as_str()), (200, Some("CANCELLED")));
    let (status, order) = get("?minVersion=1").await?;
    assert_eq!((status, order["status"].as_str()), (200, Some("CANCELLED")));
    let (status, body) = get("?minVersion=-1").await?;
    assert_refused(status, &body, 400, "minVersion");
    Ok(())
}
