//! OrderPlaced schema version 1 (the shipping address as one line), as an
//! older release stored and published it, drives today's saga: the order
//! service loads the stored v1 event, and every consumer reads the v1 bytes
//! from the broker as v2.

use anyhow::Result;
use saga_tests::{Stack, raw_nats::RawNats};
use serde_json::{Value, json};
use uuid::Uuid;

/// The bytes an older release wrote for an order of one widget at 1,000:
/// stored as version 1 of the order and published with its event id.
fn order_placed_v1(order_id: Uuid, address: &str) -> (Uuid, Vec<u8>) {
    let event_id = Uuid::now_v7();
    let envelope = json!({
        "eventId": event_id,
        "eventType": "OrderPlaced",
        "schemaVersion": 1,
        "aggregateType": "order",
        "aggregateId": order_id.to_string(),
        "version": 1,
        "timestamp": "2026-01-05T10:00:00Z",
        "metadata": {"correlationId": order_id, "causationId": Uuid::now_v7()},
        "payload": {
            "orderId": order_id,
            "customerId": "alice",
            "lines": [{"productId": "widget", "quantity": 1, "unitPrice": 1000}],
            "total": 1000,
            "shippingAddress": address
        }
    });
    (event_id, serde_json::to_vec(&envelope).unwrap())
}

/// Stores the v1 event in the order service's event store, as the older
/// release did, and publishes it as its relay did (`nats pub -H
/// "Nats-Msg-Id:<event id>" saga.order.placed '<envelope>'`).
async fn an_older_release_placed(stack: &Stack, address: &str) -> Result<Uuid> {
    let order_id = Uuid::now_v7();
    let (event_id, bytes) = order_placed_v1(order_id, address);
    sqlx::query(
        "INSERT INTO order_events (order_id, version, event_id, event_type, schema_version, envelope, recorded_at)
         VALUES ($1, 1, $2, 'OrderPlaced', 1, convert_from($3, 'UTF8')::jsonb, '2026-01-05T10:00:00Z')",
    )
    .bind(order_id)
    .bind(event_id)
    .bind(&bytes)
    .execute(&stack.pool("order").await?)
    .await?;
    let mut cli = RawNats::connect(&stack.cli_url()).await?;
    let subject = stack.subjects.event(common::EventKind::OrderPlaced);
    cli.publish_with_headers(&subject, &[("Nats-Msg-Id", &event_id.to_string())], &bytes)
        .await?;
    Ok(order_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v1_order_stored_and_published_by_an_older_release_runs_to_confirmation() -> Result<()> {
    let stack = Stack::stocked(10_000, 5).await?;
    let id = an_older_release_placed(
        &stack,
        "Ada Lovelace, 12 Analytical Row, London, N1 1AA, GB",
    )
    .await?;

    let order = stack.wait_for_outcome(id).await?;
    stack.settle().await?;
    assert_eq!(order["status"], "CONFIRMED", "{order:#}");
    let address = json!({"name": "Ada Lovelace", "street": "12 Analytical Row",
                         "city": "London", "postalCode": "N1 1AA", "country": "GB"});
    assert_eq!(order["shippingAddress"], address);
    let (status, shipment) = stack
        .get_json("shipping", &format!("/shipments/{id}"))
        .await?;
    assert_eq!(status, 200, "{shipment}");
    assert_eq!(shipment["address"], address);

    // The stored history is left as it was written; it reads as v2.
    let (_, events) = stack
        .get_json("order", &format!("/orders/{id}/events"))
        .await?;
    let first = &events.as_array().unwrap()[0];
    assert_eq!(first["schemaVersion"], 2, "{first:#}");
    assert_eq!(first["payload"]["shippingAddress"], address);
    let stored: i32 = sqlx::query_scalar(
        "SELECT (envelope->>'schemaVersion')::int FROM order_events WHERE order_id = $1 AND version = 1",
    )
    .bind(id)
    .fetch_one(&stack.pool("order").await?)
    .await?;
    assert_eq!(stored, 1);
    assert_eq!(stack.balance("alice").await?, 9_000);
    stack.assert_invariants().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v1_address_that_cannot_be_split_is_refused_by_shipping_and_compensated() -> Result<()> {
    let stack = Stack::stocked(10_000, 5).await?;
    let id = an_older_release_placed(&stack, "behind the old mill").await?;

    let order = stack.wait_for_outcome(id).await?;
    stack.settle().await?;
    assert_eq!(order["status"], "CANCELLED", "{order:#}");
    let reason = order["failureReason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("'behind the old mill' could not be read"),
        "{reason}"
    );
    assert_eq!(stack.balance("alice").await?, 10_000);
    assert_eq!(stack.stock("widget").await?, (5, 0));
    stack.assert_invariants().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_version_newer_than_the_code_is_dead_lettered_with_the_versions_it_reads()
-> Result<()> {
    let stack = Stack::stocked(10_000, 5).await?;
    let order_id = Uuid::now_v7();
    let (_, bytes) = order_placed_v1(order_id, "Ada, 1 Main St, Springfield, 12345, US");
    let mut envelope: Value = serde_json::from_slice(&bytes)?;
    envelope["schemaVersion"] = json!(3);
    stack
        .publish(
            &stack.subjects.event(common::EventKind::OrderPlaced),
            serde_json::to_vec(&envelope)?,
        )
        .await?;
    stack.wait_for_dead_letters(1).await?;
    let letters = stack.dead_letters().await?;
    assert!(
        letters.iter().any(|(reason, _, _)| reason
            .contains("unsupported schema version 3 for OrderPlaced (supported: 1 to 2)")),
        "{letters:?}"
    );
    assert_eq!(stack.balance("alice").await?, 10_000);
    Ok(())
}
