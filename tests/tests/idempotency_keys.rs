//! Client idempotency keys: one order per key and customer, however many
//! retries race each other, and a key never leaks another customer's order.

use anyhow::{Context, Result};
use saga_tests::{Stack, assert_refused, order_body};
use serde_json::Value;
use uuid::Uuid;

async fn place_with_key(stack: &Stack, body: &Value, key: &str) -> Result<(u16, Value)> {
    let r = stack
        .http
        .post(stack.url("order", "/orders"))
        .header("Idempotency-Key", key)
        .json(body)
        .send()
        .await?;
    Ok((r.status().as_u16(), r.json().await?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_concurrent_retries_with_one_key_place_one_order_and_charge_once() -> Result<()> {
    let stack = Stack::stocked(100_000, 100).await?;
    stack.price("widget", 1_000).await?;
    let body = order_body("alice", &[("widget", 2, 1_000)], "US");

    let attempts = (0..16).map(|_| place_with_key(&stack, &body, "checkout-42"));
    let replies = futures::future::try_join_all(attempts).await?;

    let ids: Vec<&str> = replies
        .iter()
        .map(|(_, v)| v["orderId"].as_str().unwrap_or("none"))
        .collect();
    assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
    let created = replies.iter().filter(|(s, _)| *s == 201).count();
    assert_eq!(created, 1, "{replies:?}");
    assert!(replies.iter().all(|(s, _)| *s == 201 || *s == 200));

    let id: Uuid = ids[0].parse().context("order id")?;
    assert_eq!(stack.wait_for_outcome(id).await?["status"], "CONFIRMED");
    stack.settle().await?;
    assert_eq!(stack.rows("order", "orders").await?, 1);
    assert_eq!(stack.rows("payment", "payments").await?, 1);
    assert_eq!(stack.balance("alice").await?, 100_000 - 2_000);
    stack.assert_invariants().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_belongs_to_its_customer_and_to_the_request_it_was_first_used_with() -> Result<()> {
    let stack = Stack::start().await?;
    stack.set_balance("alice", 100_000).await?;
    stack.set_balance("bob", 100_000).await?;
    stack.set_stock("widget", 100).await?;
    stack.price("widget", 1_000).await?;

    let alice = order_body("alice", &[("widget", 1, 1_000)], "US");
    let (status, first) = place_with_key(&stack, &alice, "k-1").await?;
    assert_eq!(status, 201, "{first}");

    // Bob happens to use the same key: his own order, never Alice's.
    let bob = order_body("bob", &[("widget", 1, 1_000)], "GB");
    let (status, his) = place_with_key(&stack, &bob, "k-1").await?;
    assert_eq!(status, 201, "{his}");
    assert_eq!(his["customerId"], "bob");
    assert_ne!(his["orderId"], first["orderId"]);
    assert_eq!(his["shippingAddress"]["country"], "GB");

    // Alice reuses her key for something else: refused, naming the key.
    let other = order_body("alice", &[("widget", 5, 1_000)], "US");
    let (status, v) = place_with_key(&stack, &other, "k-1").await?;
    assert_refused(
        status,
        &v,
        422,
        "already used by this customer for a different request",
    );

    // The same request again is the same order.
    let (status, again) = place_with_key(&stack, &alice, "k-1").await?;
    assert_eq!(status, 200);
    assert_eq!(again["orderId"], first["orderId"]);
    assert_eq!(stack.rows("order", "orders").await?, 2);
    Ok(())
}
