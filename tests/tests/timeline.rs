//! The saga observer: every saga's story from the broker, in order, with
//! who did what, and where a saga is stuck.

use anyhow::Result;
use common::meter::names;
use saga_tests::{DEADLINE, EachKind, HAPPY_PATH, Stack, UNDELIVERABLE_SERVICES, eventually};
use serde_json::Value;
use uuid::Uuid;

const PRICE: i64 = 1_250;

/// The saga's story once the observer has recorded its last event.
async fn story(stack: &Stack, id: Uuid, last: &str) -> Result<Value> {
    eventually(
        &format!("saga {id} to end with {last}"),
        DEADLINE,
        || async {
            let (status, story) = stack.get_json("order", &format!("/sagas/{id}")).await?;
            let done = status == 200 && story["lastEventType"] == last;
            Ok(done.then_some(story))
        },
    )
    .await
}

/// `"A B C"` as `["A", "B", "C"]`.
fn types(names: &str) -> Vec<&str> {
    names.split_whitespace().collect()
}

fn column<'a>(story: &'a Value, field: &str) -> Vec<&'a str> {
    let entries = story["timeline"].as_array().expect("a timeline");
    entries
        .iter()
        .map(|e| e[field].as_str().unwrap_or("?"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_saga_is_told_in_causal_order_with_who_did_what() -> Result<()> {
    let (stack, each) = Stack::one_saga_of_each_kind(PRICE).await?;
    let EachKind {
        happy,
        declined,
        out_of_stock: no_stock,
        undeliverable: no_route,
    } = each;

    let s = story(&stack, happy, "OrderConfirmed").await?;
    assert_eq!(column(&s, "eventType"), HAPPY_PATH);
    assert_eq!(
        column(&s, "service"),
        ["order", "payment", "inventory", "shipping", "order"]
    );
    let effects = column(&s, "effect");
    assert_eq!(effects[1], format!("charged {} to alice", 2 * PRICE));
    assert_eq!(effects[2], "reserved 2 x widget");
    assert!(effects[3].starts_with("shipment "), "{effects:?}");
    assert_eq!(s["status"], "CONFIRMED");
    assert!(s["waiting"].is_null() && s["stalled"] == false, "{s}");
    // Each step is caused by the one before it.
    let entries = s["timeline"].as_array().unwrap();
    for pair in entries.windows(2) {
        assert_eq!(pair[1]["causationId"], pair[0]["eventId"], "{s}");
        assert!(pair[1]["sincePreviousMs"].as_i64().unwrap() >= 0);
    }

    let s = story(&stack, declined, "OrderCancelled").await?;
    assert_eq!(
        column(&s, "eventType"),
        types("OrderPlaced PaymentFailed OrderCancelled")
    );
    assert_eq!(s["timeline"][1]["failure"], true);
    assert!(
        s["timeline"][1]["reason"]
            .as_str()
            .unwrap()
            .contains("insufficient funds"),
        "{s}"
    );

    let s = story(&stack, no_stock, "OrderCancelled").await?;
    assert_eq!(
        column(&s, "eventType"),
        types(
            "OrderPlaced PaymentProcessed InventoryReservationFailed PaymentRefunded OrderCancelled"
        )
    );
    assert_eq!(s["timeline"][3]["compensation"], true);
    assert_eq!(
        s["timeline"][3]["effect"],
        format!("refunded {PRICE} to alice")
    );

    let s = story(&stack, no_route, "OrderCancelled").await?;
    assert_eq!(
        column(&s, "eventType"),
        types(
            "OrderPlaced PaymentProcessed InventoryReserved ShipmentFailed InventoryReleased PaymentRefunded OrderCancelled"
        )
    );
    assert_eq!(column(&s, "service"), UNDELIVERABLE_SERVICES);
    assert_eq!(s["status"], "CANCELLED");

    let (status, page) = stack.get_json("order", "/sagas?status=CANCELLED").await?;
    assert_eq!(status, 200);
    let listed: Vec<&str> = page["sagas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["correlationId"].as_str().unwrap())
        .collect();
    assert_eq!(listed.len(), 3, "{page}");
    assert!(!listed.contains(&happy.to_string().as_str()));
    stack.assert_invariants().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_waiting_on_a_stopped_service_is_listed_stalled_until_it_moves_on() -> Result<()> {
    let mut stack = Stack::stocked(10_000, 5).await?;
    stack.stop_service("shipping").await?;
    let id = stack.place("alice", &[("widget", 1, PRICE)], "US").await?;

    let stalled = eventually("the saga to be listed stalled", DEADLINE, || async {
        let (_, page) = stack.get_json("order", "/sagas?stalled=true").await?;
        let found = page["sagas"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|s| s["correlationId"] == id.to_string())
            .cloned();
        Ok(found)
    })
    .await?;
    assert_eq!(stalled["waitingFor"], "shipping", "{stalled}");
    assert_eq!(
        stalled["waiting"],
        "waiting for shipping to create the shipment"
    );
    assert_eq!(stalled["lastEventType"], "InventoryReserved");
    assert_eq!(stalled["stalled"], true);
    // In the metrics: the stall, counted once, and shipping's backlog, which
    // the order service reports while shipping cannot.
    let lagging = [("service", "order"), ("consumer", "shipping")];
    let m = stack
        .metrics_until("order", "the stall to be counted", |m| {
            m.sum(names::SAGAS_STALLED, &[]) == 1.0 && m.sum(names::STALLS, &[]) >= 1.0
        })
        .await?;
    assert_eq!(m.sum(names::CONSUMER_PENDING, &lagging), 1.0);
    assert_eq!(m.sum(names::STALLS, &[]), 1.0, "reported once");

    stack.start_service("shipping").await?;
    assert_eq!(stack.wait_for_outcome(id).await?["status"], "CONFIRMED");
    story(&stack, id, "OrderConfirmed").await?;
    let (_, page) = stack.get_json("order", "/sagas?stalled=true").await?;
    assert_eq!(page["sagas"], serde_json::json!([]), "{page}");
    let m = stack
        .metrics_until("order", "the stall to clear", |m| {
            m.sum(names::SAGAS_STALLED, &[]) == 0.0
        })
        .await?;
    assert_eq!(m.sum(names::CONSUMER_PENDING, &lagging), 0.0);
    assert_eq!(m.sum(names::STALLS, &[]), 1.0);
    stack.assert_invariants().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saga_queries_refuse_bad_input_with_a_message() -> Result<()> {
    let stack = Stack::start_with(&["order"]).await?;
    for (path, expected) in [
        ("/sagas/not-a-uuid", 400),
        (&format!("/sagas/{}", Uuid::now_v7()), 404),
        ("/sagas?limit=0", 400),
        ("/sagas?status=LOST", 400),
        ("/sagas?since=yesterday", 400),
        ("/sagas?stalled=maybe", 400),
    ] {
        let (status, body) = stack.get_json("order", path).await?;
        assert_eq!(status, expected, "{path}: {body}");
        assert!(body["error"].is_string(), "{path}: {body}");
    }
    Ok(())
}
