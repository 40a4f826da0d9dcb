//! Traces across the services: a saga placed over HTTP with a W3C
//! `traceparent` is one trace, carried from the request through the outbox
//! into every event's NATS header and on through each consumer; with an
//! OTLP endpoint configured, every service exports its spans of it.

use std::{
    collections::{BTreeSet, HashMap},
    time::Duration,
};

use futures::StreamExt;

use anyhow::{Result, ensure};
use saga_tests::{DEADLINE, Stack, eventually, order_body, otlp::Receiver};
use serde_json::Value;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

fn traceparent() -> String {
    format!("00-{TRACE_ID}-{CALLER_SPAN}-01")
}

/// Places `alice`'s order of a widget, to be shipped to `country`, with
/// the caller's `traceparent`.
async fn place_traced(stack: &Stack, country: &str) -> Result<uuid::Uuid> {
    let answer = stack
        .http
        .post(stack.url("order", "/orders"))
        .header("traceparent", traceparent())
        .json(&order_body("alice", &[("widget", 1, 100)], country))
        .send()
        .await?;
    ensure!(answer.status() == 201, "placement: {}", answer.status());
    let order: Value = answer.json().await?;
    Ok(order["orderId"].as_str().unwrap_or_default().parse()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_of_a_saga_carries_the_trace_of_the_request_that_placed_it() -> Result<()> {
    let wanted = [
        "OrderPlaced",
        "PaymentProcessed",
        "InventoryReserved",
        "ShipmentCreated",
        "OrderConfirmed",
    ];
    one_trace_from_request_to_outcome("US", "CONFIRMED", &wanted).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compensations_of_a_saga_carry_its_trace_on() -> Result<()> {
    // ZZ is a country shipping refuses: the saga is compensated in reverse.
    let wanted = [
        "OrderPlaced",
        "PaymentProcessed",
        "InventoryReserved",
        "ShipmentFailed",
        "InventoryReleased",
        "PaymentRefunded",
        "OrderCancelled",
    ];
    one_trace_from_request_to_outcome("ZZ", "CANCELLED", &wanted).await
}

/// Places a saga with the caller's `traceparent`, waits for `outcome`, and
/// checks that each of the `wanted` events was published with a
/// `traceparent` of the caller's trace, each from a span of its own.
async fn one_trace_from_request_to_outcome(
    country: &str,
    outcome: &str,
    wanted: &[&str],
) -> Result<()> {
    let stack = Stack::stocked(10_000, 5).await?;
    stack.price("widget", 100).await?;
    let mut events = stack.watch().await?;
    let id = place_traced(&stack, country).await?;
    let order = stack.wait_for_outcome(id).await?;
    ensure!(order["status"] == outcome, "{order}");
    let mut seen: HashMap<String, String> = HashMap::new();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !wanted.iter().all(|w| seen.contains_key(*w)) {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "not every event of the saga was seen within {DEADLINE:?}: {seen:?}"
        );
        let next = tokio::time::timeout(Duration::from_millis(200), events.next()).await;
        let Ok(Some(msg)) = next else { continue };
        let Ok(envelope) = serde_json::from_slice::<Value>(&msg.payload) else {
            continue;
        };
        if envelope["metadata"]["correlationId"] != id.to_string() {
            continue;
        }
        let header = msg
            .headers
            .as_ref()
            .and_then(|h| h.get("traceparent"))
            .map(|v| v.as_str().to_string())
            .unwrap_or_default();
        let event = envelope["eventType"].as_str().unwrap_or_default();
        seen.insert(event.to_string(), header);
    }
    let mut spans = BTreeSet::new();
    for (event, header) in &seen {
        let parts: Vec<&str> = header.split('-').collect();
        ensure!(
            parts.len() == 4 && parts[1] == TRACE_ID,
            "{event} carries {header:?}, not the caller's trace"
        );
        ensure!(
            parts[2] != CALLER_SPAN,
            "{event}: the caller's span is not ours"
        );
        spans.insert(parts[2].to_string());
    }
    ensure!(
        spans.len() == seen.len(),
        "each event is caused by a span of its own: {seen:?}"
    );
    // The timeline names the trace of every event, and the page the saga's.
    eventually("the timeline to name the trace", DEADLINE, || async {
        let (_, story) = stack.get_json("order", &format!("/sagas/{id}")).await?;
        let entries = story["timeline"].as_array().cloned().unwrap_or_default();
        let traced = entries.len() >= wanted.len()
            && entries
                .iter()
                .all(|e| e["kind"] != "event" || e["traceId"] == TRACE_ID);
        Ok(traced.then_some(()))
    })
    .await?;
    let page = stack.browse(&format!("/ui?saga={id}")).await?;
    let summary = page.split("id=\"summary\"").nth(1).unwrap_or_default();
    ensure!(summary.contains(TRACE_ID), "{page}");
    stack.assert_invariants().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_an_otlp_endpoint_every_service_exports_its_spans_of_the_one_trace() -> Result<()> {
    let receiver = Receiver::start().await?;
    let mut stack = Stack::start_with(&[]).await?;
    for service in ["order", "payment", "inventory", "shipping"] {
        let endpoint = receiver.endpoint.clone();
        stack
            .start_service_with(service, |launch| {
                launch.config.otlp_endpoint = Some(endpoint);
            })
            .await?;
    }
    stack.set_balance("alice", 10_000).await?;
    stack.set_stock("widget", 5).await?;
    stack.price("widget", 100).await?;
    let id = place_traced(&stack, "US").await?;
    let order = stack.wait_for_outcome(id).await?;
    ensure!(order["status"] == "CONFIRMED", "{order}");
    // Spans are exported in batches (every 5 s by default).
    let wanted = [
        ("order", "POST /orders"),
        ("payment", "apply OrderPlaced"),
        ("inventory", "apply PaymentProcessed"),
        ("shipping", "apply InventoryReserved"),
        ("order", "apply ShipmentCreated"),
    ];
    let spans = eventually("the saga's spans at the receiver", DEADLINE, || async {
        let spans: Vec<_> = receiver
            .spans()
            .into_iter()
            .filter(|s| s.trace_id == TRACE_ID)
            .collect();
        let all = wanted
            .iter()
            .all(|(svc, name)| spans.iter().any(|s| s.service == *svc && s.name == *name));
        Ok(all.then_some(spans))
    })
    .await?;
    let ids: BTreeSet<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
    for span in &spans {
        ensure!(
            span.parent_span_id == CALLER_SPAN || ids.contains(span.parent_span_id.as_str()),
            "{span:?} hangs off no span of the trace"
        );
        ensure!(span.status != 2, "{span:?} failed");
    }
    let placement = spans
        .iter()
        .find(|s| s.name == "POST /orders")
        .expect("found above");
    ensure!(placement.parent_span_id == CALLER_SPAN, "{placement:?}");
    let services: BTreeSet<&str> = spans.iter().map(|s| s.service.as_str()).collect();
    ensure!(services.len() == 4, "{services:?}");
    stack.assert_invariants().await?;
    Ok(())
}
