//! The published contracts hold for what the services publish: every event
//! of a saga of each kind validates against its JSON Schema
//! (common/contracts/schemas/, by a validating library), and one that
//! breaks its schema is caught. (Every test that checks the invariants
//! checks the schemas of what was published too.)

use anyhow::Result;
use common::{Envelope, Event, EventKind, event::ShipmentFailed};
use saga_tests::Stack;
use serde_json::Value;
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_of_a_saga_of_each_kind_validates_against_its_schema() -> Result<()> {
    let (stack, _) = Stack::one_saga_of_each_kind(1_000).await?;
    stack.settle().await?;
    let checked = stack.assert_published_events_match_their_schemas().await?;
    for kind in [
        EventKind::OrderPlaced,
        EventKind::PaymentProcessed,
        EventKind::PaymentFailed,
        EventKind::InventoryReserved,
        EventKind::InventoryReservationFailed,
        EventKind::ShipmentCreated,
        EventKind::ShipmentFailed,
        EventKind::InventoryReleased,
        EventKind::PaymentRefunded,
        EventKind::OrderConfirmed,
        EventKind::OrderCancelled,
    ] {
        assert!(checked.contains_key(kind.name()), "{kind:?}: {checked:?}");
    }
    assert!(checked.contains_key("ProductPriced"), "{checked:?}");

    // An event that breaks its schema, published as a service would (its
    // id as the message id), is caught.
    let id = Uuid::now_v7();
    let event = Event::ShipmentFailed(ShipmentFailed {
        order_id: id,
        reason: "courier strike".into(),
    });
    let envelope = Envelope::new(&event, id.to_string(), 1, id, Uuid::now_v7());
    let mut broken: Value = serde_json::from_slice(&envelope.to_bytes())?;
    broken["payload"]["reason"] = Value::from(7);
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", envelope.event_id.to_string().as_str());
    stack
        .js
        .publish_with_headers(
            stack.subjects.event(EventKind::ShipmentFailed),
            headers,
            serde_json::to_vec(&broken)?.into(),
        )
        .await?
        .await?;
    let caught = stack
        .assert_published_events_match_their_schemas()
        .await
        .expect_err("a broken event is caught");
    assert!(
        format!("{caught:#}").contains("ShipmentFailed"),
        "{caught:#}"
    );
    Ok(())
}
