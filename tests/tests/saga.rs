//! The saga's paths against a live broker, real Postgres and Redis.

use anyhow::Result;
use saga_tests::{HAPPY_PATH, Stack, order_body};
use uuid::Uuid;

const PRICE: i64 = 1_250;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paid_reserved_and_shippable_order_is_confirmed_with_one_effect_each() -> Result<()> {
    let stack = Stack::stocked(10_000, 5).await?;

    let (id, order) = stack
        .run_saga("alice", &[("widget", 2, PRICE)], "US")
        .await?;

    assert_eq!(order["status"], "CONFIRMED", "{order}");
    assert_eq!(order["total"], 2 * PRICE);
    assert_eq!(order["version"], 2);
    assert!(order["shipmentId"].is_string());
    assert_eq!(stack.balance("alice").await?, 10_000 - 2 * PRICE);
    assert_eq!(stack.stock("widget").await?, (3, 2));
    assert_eq!(stack.rows("payment", "payments").await?, 1);
    assert_eq!(stack.shipments_created().await?, 1);
    let (status, shipment) = stack
        .get_json("shipping", &format!("/shipments/{id}"))
        .await?;
    assert_eq!(status, 200);
    assert_eq!(shipment["shipmentId"], order["shipmentId"]);
    assert_eq!(stack.saga_event_types(id).await?, HAPPY_PATH);
    stack.assert_invariants().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declined_payment_cancels_the_order_with_the_reason_and_touches_nothing_else()
-> Result<()> {
    let stack = Stack::stocked(1_000, 5).await?;

    let id = stack.place("alice", &[("widget", 1, PRICE)], "US").await?;
    let order = stack.wait_for_outcome(id).await?;
    let unknown = stack.place("nobody", &[("widget", 1, PRICE)], "US").await?;
    let unknown = stack.wait_for_outcome(unknown).await?;
    stack.settle().await?;

    assert_eq!(order["status"], "CANCELLED");
    let reason = order["failureReason"].as_str().unwrap();
    assert!(reason.contains("insufficient funds"), "{reason}");
    assert!(
        unknown["failureReason"]
            .as_str()
            .unwrap()
            .contains("unknown account 'nobody'"),
        "{unknown}"
    );
    assert_eq!(stack.balance("alice").await?, 1_000);
    assert_eq!(stack.stock("widget").await?, (5, 0));
    assert_eq!(stack.rows("inventory", "reservations").await?, 0);
    assert_eq!(stack.rows("shipping", "shipments").await?, 0);
    assert_eq!(
        stack.saga_event_types(id).await?,
        ["OrderPlaced", "PaymentFailed", "OrderCancelled"]
    );
    stack.assert_invariants().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_stock_refunds_the_payment_and_cancels_the_order() -> Result<()> {
    let stack = Stack::stocked(10_000, 1).await?;
    stack.set_stock("gadget", 10).await?;

    // One line can be served, the other cannot: nothing is reserved.
    let lines = [("gadget", 1, 100), ("widget", 2, PRICE)];
    let (id, order) = stack.run_saga("alice", &lines, "US").await?;

    assert_eq!(order["status"], "CANCELLED");
    let reason = order["failureReason"].as_str().unwrap();
    assert!(
        reason.contains("out of stock") && reason.contains("'widget' requested 2, available 1"),
        "{reason}"
    );
    assert_eq!(stack.balance("alice").await?, 10_000);
    assert_eq!(stack.stock("widget").await?, (1, 0));
    assert_eq!(stack.stock("gadget").await?, (10, 0));
    assert_eq!(stack.rows("shipping", "shipments").await?, 0);
    assert_eq!(
        stack.saga_event_types(id).await?,
        [
            "OrderPlaced",
            "PaymentProcessed",
            "InventoryReservationFailed",
            "PaymentRefunded",
            "OrderCancelled"
        ]
    );
    stack.assert_invariants().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undeliverable_address_releases_stock_refunds_and_cancels_in_reverse_order() -> Result<()>
{
    let stack = Stack::stocked(10_000, 5).await?;

    let (id, order) = stack
        .run_saga("alice", &[("widget", 3, PRICE)], "ZZ")
        .await?;

    assert_eq!(order["status"], "CANCELLED");
    assert_eq!(
        order["failureReason"],
        "address rejected: no delivery to country 'ZZ'"
    );
    assert_eq!(stack.balance("alice").await?, 10_000);
    assert_eq!(stack.stock("widget").await?, (5, 0));
    assert_eq!(
        stack
            .count(
                "shipping",
                "SELECT count(*) FROM shipments WHERE status = 'failed'"
            )
            .await?,
        1
    );
    assert_eq!(
        stack.saga_event_types(id).await?,
        [
            "OrderPlaced",
            "PaymentProcessed",
            "InventoryReserved",
            "ShipmentFailed",
            "InventoryReleased",
            "PaymentRefunded",
            "OrderCancelled"
        ]
    );
    // Causation chains each event to the one before it.
    let events: Vec<_> = stack
        .stream_events()
        .await?
        .into_iter()
        .map(|(_, e)| e)
        .filter(|e| e.metadata.correlation_id == id)
        .collect();
    for pair in events.windows(2) {
        assert_eq!(
            pair[1].metadata.causation_id, pair[0].event_id,
            "{} <- {}",
            pair[1].event_type, pair[0].event_type
        );
    }
    stack.assert_invariants().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_orders_for_the_last_units_never_oversell() -> Result<()> {
    const UNITS: i64 = 5;
    const ORDERS: usize = 24;
    let stack = Stack::stocked(1_000_000, UNITS).await?;

    let body = order_body("alice", &[("widget", 1, PRICE)], "US");
    let placing = (0..ORDERS).map(|_| stack.place_order(&body));
    let ids: Vec<Uuid> = futures::future::try_join_all(placing).await?;
    let mut confirmed = 0;
    for id in &ids {
        let o = stack.wait_for_outcome(*id).await?;
        match o["status"].as_str() {
            Some("CONFIRMED") => confirmed += 1,
            Some("CANCELLED") => assert!(
                o["failureReason"]
                    .as_str()
                    .unwrap()
                    .contains("out of stock"),
                "{o}"
            ),
            other => panic!("unexpected status {other:?}"),
        }
    }
    stack.settle().await?;

    assert_eq!(confirmed, UNITS);
    assert_eq!(stack.stock("widget").await?, (0, UNITS));
    assert_eq!(stack.balance("alice").await?, 1_000_000 - UNITS * PRICE);
    assert_eq!(
        stack
            .count(
                "payment",
                "SELECT count(*) FROM payments WHERE status = 'refunded'"
            )
            .await?,
        ORDERS as i64 - UNITS
    );
    stack.assert_invariants().await
}
