//! Events of one order that arrive in the wrong order, published with the
//! raw protocol as a `nats pub` (or a replica that is behind) would: each is
//! applied after what it depends on, or changes nothing; never wrongly.

use anyhow::Result;
use common::{Envelope, Event, EventKind, event::ShipmentFailed};
use saga_tests::{Stack, raw_nats::RawNats};
use serde_json::Value;
use uuid::Uuid;

/// Every observable effect of the stack: orders, money, stock, shipments.
async fn effects(stack: &Stack, orders: &[Uuid]) -> Result<Vec<Value>> {
    let mut all = vec![
        stack.balance("alice").await?.into(),
        stack.balance("poor").await?.into(),
        format!("{:?}", stack.stock("widget").await?).into(),
    ];
    for id in orders {
        all.push(stack.order(*id).await?);
        all.push(
            stack
                .get_json("shipping", &format!("/shipments/{id}"))
                .await?
                .1,
        );
    }
    Ok(all)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_sagas_events_published_again_reversed_and_shuffled_change_nothing() -> Result<()>
{
    let (stack, each) = Stack::one_saga_of_each_kind(1_000).await?;
    let orders = [
        each.happy,
        each.declined,
        each.out_of_stock,
        each.undeliverable,
    ];
    let before = effects(&stack, &orders).await?;
    let (_, timeline_before) = stack
        .get_json("order", &format!("/sagas/{}", each.undeliverable))
        .await?;

    // Every event of the four sagas, last first, then in a fixed shuffle
    // (by event id), without Nats-Msg-Id: the broker cannot deduplicate
    // them, every consumer gets each one again, out of order.
    let events = stack.stream_events().await?;
    let mut shuffled = events.clone();
    shuffled.sort_by_key(|(_, e)| e.event_id.as_u128().reverse_bits());
    let mut cli = RawNats::connect(&stack.cli_url()).await?;
    for (subject, envelope) in events.iter().rev().chain(&shuffled) {
        cli.publish(subject, &envelope.to_bytes()).await?;
    }
    stack.settle().await?;

    assert_eq!(effects(&stack, &orders).await?, before);
    let (_, timeline_after) = stack
        .get_json("order", &format!("/sagas/{}", each.undeliverable))
        .await?;
    assert_eq!(timeline_after["status"], timeline_before["status"]);
    assert_eq!(timeline_after["timeline"], timeline_before["timeline"]);
    assert!(stack.dead_letters().await?.is_empty());
    stack.assert_invariants().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compensation_that_overtakes_the_step_it_undoes_waits_for_it_then_undoes_it_once()
-> Result<()> {
    // Payment is away: the order waits before its charge. A ShipmentFailed
    // for it is published by hand: inventory gets it before anything was
    // reserved, and the saga's steps come after it (to an address shipping
    // refuses too, so the saga fails on its own as well).
    let mut stack = Stack::stocked(10_000, 5).await?;
    stack.stop_service("payment").await?;
    let id = stack.place("alice", &[("widget", 2, 1_000)], "ZZ").await?;
    let failed = Event::ShipmentFailed(ShipmentFailed {
        order_id: id,
        reason: "courier strike".into(),
    });
    let envelope = Envelope::new(&failed, Uuid::now_v7().to_string(), 1, id, Uuid::now_v7());
    let mut cli = RawNats::connect(&stack.cli_url()).await?;
    cli.publish(
        &stack.subjects.event(EventKind::ShipmentFailed),
        &envelope.to_bytes(),
    )
    .await?;

    stack.start_service("payment").await?;
    let order = stack.wait_for_outcome(id).await?;
    stack.settle().await?;
    assert_eq!(order["status"], "CANCELLED", "{order:#}");
    let reason = order["failureReason"].as_str().unwrap_or_default();
    assert!(
        reason == "courier strike" || reason.contains("no delivery to country 'ZZ'"),
        "{reason}"
    );
    assert_eq!(stack.balance("alice").await?, 10_000);
    assert_eq!(stack.stock("widget").await?, (5, 0));
    let types = stack.saga_event_types(id).await?;
    for once in [
        "PaymentProcessed",
        "InventoryReleased",
        "PaymentRefunded",
        "OrderCancelled",
    ] {
        let n = types.iter().filter(|t| *t == once).count();
        assert_eq!(n, 1, "{once}: {types:?}");
    }
    stack.assert_invariants().await
}
