//! The `nats` CLI path, byte for byte: what `nats req` and `nats pub -H`
//! put on the wire drives the system as the README documents.

use std::time::Duration;

use anyhow::{Context, Result};
use common::{Envelope, Event, EventKind, event::ShipmentFailed};
use saga_tests::{DEADLINE, Stack, eventually, order_body, raw_nats::RawNats};
use serde_json::Value;
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_req_places_an_order_that_runs_to_confirmation() -> Result<()> {
    let stack = Stack::stocked(10_000, 5).await?;
    stack.price("widget", 700).await?;
    let mut cli = RawNats::connect(&stack.cli_url()).await?;

    // nats req saga.cmd.order.place '{"customerId":...}'
    let body = serde_json::to_vec(&order_body("alice", &[("widget", 1, 700)], "US"))?;
    let (_, reply) = cli
        .request(
            &stack.subjects.place_order_command(),
            &body,
            Duration::from_secs(10),
        )
        .await?;
    let reply: Value = serde_json::from_slice(&reply)?;
    assert_eq!(reply["status"], "PENDING", "{reply}");
    let id: Uuid = reply["orderId"].as_str().context("orderId")?.parse()?;

    assert_eq!(stack.wait_for_outcome(id).await?["status"], "CONFIRMED");
    assert_eq!(stack.balance("alice").await?, 10_000 - 700);

    // A bad request gets an error reply, not silence.
    let (headers, reply) = cli
        .request(
            &stack.subjects.place_order_command(),
            br#"{"customerId":"alice"}"#,
            Duration::from_secs(10),
        )
        .await?;
    assert!(headers.contains("Saga-Error: invalid"), "{headers}");
    let reply: Value = serde_json::from_slice(&reply)?;
    assert!(
        reply["error"]
            .as_str()
            .unwrap()
            .contains("missing field `lines`"),
        "{reply}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_published_shipment_failure_compensates_once_however_often_it_is_sent() -> Result<()>
{
    // Shipping is down, so the saga waits after InventoryReserved; the
    // operator publishes ShipmentFailed by hand.
    let (stack, id) = Stack::waiting_for_shipping().await?;

    let event = Event::ShipmentFailed(ShipmentFailed {
        order_id: id,
        reason: "courier strike".into(),
    });
    let envelope = Envelope::new(&event, id.to_string(), 1, id, Uuid::now_v7());
    let bytes = envelope.to_bytes();
    let subject = stack.subjects.event(EventKind::ShipmentFailed);
    let msg_id = envelope.event_id.to_string();
    let mut cli = RawNats::connect(&stack.cli_url()).await?;

    // nats pub -H "Nats-Msg-Id:<event id>" saga.shipping.failed '<envelope>'  (twice)
    cli.publish_with_headers(&subject, &[("Nats-Msg-Id", &msg_id)], &bytes)
        .await?;
    cli.publish_with_headers(&subject, &[("Nats-Msg-Id", &msg_id)], &bytes)
        .await?;
    // ...and once more without the header: the broker cannot deduplicate it,
    // the consumers' idempotency must.
    cli.publish(&subject, &bytes).await?;

    let order = stack.wait_for_outcome(id).await?;
    stack.settle().await?;

    assert_eq!(order["status"], "CANCELLED");
    assert_eq!(order["failureReason"], "courier strike");
    assert_eq!(stack.balance("alice").await?, 10_000);
    assert_eq!(stack.stock("widget").await?, (5, 0));
    let types = stack.saga_event_types(id).await?;
    let count = |t: &str| types.iter().filter(|x| *x == t).count();
    assert_eq!(
        count("ShipmentFailed"),
        2,
        "broker dedup keeps one of the two identical Nats-Msg-Id publishes: {types:?}"
    );
    assert_eq!(count("InventoryReleased"), 1, "{types:?}");
    assert_eq!(count("PaymentRefunded"), 1, "{types:?}");
    assert_eq!(count("OrderCancelled"), 1, "{types:?}");
    stack.assert_invariants().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_events_land_in_the_dead_letter_stream_with_a_reason_and_the_service_keeps_going()
-> Result<()> {
    let stack = Stack::stocked(10_000, 5).await?;
    let mut cli = RawNats::connect(&stack.cli_url()).await?;
    let placed = stack.subjects.event(EventKind::OrderPlaced);

    // Not JSON at all.
    cli.publish_with_headers(
        &placed,
        &[("Nats-Msg-Id", "garbage-1")],
        b"{this is not json",
    )
    .await?;
    // An envelope whose payload fails validation (total disagrees with the lines).
    let mut env: Value = serde_json::from_slice(
        &Envelope::new(
            &Event::OrderPlaced(serde_json::from_value(serde_json::json!({
                "orderId": Uuid::now_v7(), "customerId": "alice", "total": 100,
                "lines": [{"productId": "widget", "quantity": 1, "unitPrice": 100}],
                "shippingAddress": {"name": "A", "street": "S", "city": "C", "postalCode": "12345", "country": "US"}
            }))?),
            "x",
            1,
            Uuid::now_v7(),
            Uuid::now_v7(),
        )
        .to_bytes(),
    )?;
    env["payload"]["total"] = 999.into();
    cli.publish(&placed, &serde_json::to_vec(&env)?).await?;
    // An event type nobody knows.
    env["eventType"] = "OrderTeleported".into();
    cli.publish(&placed, &serde_json::to_vec(&env)?).await?;

    let letters = eventually("three dead letters", DEADLINE, || async {
        let l = stack.dead_letters().await?;
        Ok((l.len() >= 3).then_some(l))
    })
    .await?;
    assert_eq!(letters.len(), 3);
    assert!(letters.iter().all(|(_, consumer, _)| consumer == "payment"));
    // The consumer applies events concurrently: dead letters may come in any order.
    let find = |needle: &str| {
        letters
            .iter()
            .find(|(reason, _, _)| reason.contains(needle))
            .unwrap_or_else(|| panic!("no dead letter with '{needle}' in {letters:?}"))
    };
    let garbage = find("not a valid event envelope");
    assert_eq!(
        garbage.2, b"{this is not json",
        "the original bytes are kept"
    );
    find("invalid OrderPlaced payload: total 999 does not match the lines (100)");
    find("unknown event type 'OrderTeleported'");

    // Still serving: a real order goes through.
    let id = stack.place("alice", &[("widget", 1, 100)], "US").await?;
    assert_eq!(stack.wait_for_outcome(id).await?["status"], "CONFIRMED");
    let (status, _) = stack.get_json("payment", "/health/ready").await?;
    assert_eq!(status, 200);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_for_an_order_nobody_knows_is_retried_then_dead_lettered() -> Result<()> {
    let stack = Stack::start().await?;
    let ghost = Uuid::now_v7();
    let event = Event::ShipmentFailed(ShipmentFailed {
        order_id: ghost,
        reason: "lost".into(),
    });
    let env = Envelope::new(&event, ghost.to_string(), 1, ghost, Uuid::now_v7());
    let mut cli = RawNats::connect(&stack.cli_url()).await?;
    cli.publish(
        &stack.subjects.event(EventKind::ShipmentFailed),
        &env.to_bytes(),
    )
    .await?;

    let letters = eventually("the dead letter", Duration::from_secs(60), || async {
        let l = stack.dead_letters().await?;
        Ok((!l.is_empty()).then_some(l))
    })
    .await?;
    assert_eq!(letters[0].1, "inventory");
    assert!(
        letters[0]
            .0
            .starts_with("gave up after 12 deliveries: no reservation for order"),
        "{}",
        letters[0].0
    );
    Ok(())
}
