//! Property tests with 10,000 generated hostile inputs each: the envelope
//! decoder never panics and accepts only what the catalog allows; the HTTP
//! placement answers every body with a 2xx or a 4xx carrying a message, never
//! a 5xx, and so does every other endpoint that takes a body (cancels,
//! resolutions, redrives, balances, stock, products, gateway rules); every
//! generated event on the broker is applied or dead-lettered
//! with a reason; and the invariants hold afterwards.

use std::{collections::HashSet, time::Duration};

use anyhow::{Context, Result};
use common::{Envelope, Event, dlq::dlq_headers, event, limits};
use futures::{StreamExt, stream};
use proptest::test_runner::TestCaseError;
use saga_tests::{Stack, eventually, fuzz};
use serde_json::Value;

const CASES: usize = 10_000;

#[test]
fn the_envelope_decoder_never_panics_and_accepts_only_bounded_consistent_events() {
    let mut runner = fuzz::runner();
    let mut config = runner.config().clone();
    config.cases = CASES as u32;
    config.failure_persistence = None;
    let mut runner = proptest::test_runner::TestRunner::new_with_rng(config, runner.new_rng());
    let subjects = common::Subjects::new("saga");
    runner
        .run(&fuzz::envelope(subjects), |(_, bytes)| {
            match Envelope::decode(&bytes) {
                Err(e) => {
                    prop_assert_message(!e.to_string().is_empty())?;
                }
                Ok((env, ev)) => {
                    prop_assert_message(env.metadata.correlation_id == ev.order_id())?;
                    if let Some(lines) = lines_of(&ev) {
                        prop_assert_message(lines.len() <= limits::MAX_LINES)?;
                        prop_assert_message(event::lines_total(lines).is_some())?;
                        for l in lines {
                            prop_assert_message(
                                (1..=limits::MAX_QUANTITY).contains(&l.quantity)
                                    && (1..=limits::MAX_UNIT_PRICE).contains(&l.unit_price),
                            )?;
                        }
                    }
                    // What was accepted survives its own round trip.
                    let (again, _) = Envelope::decode(&env.to_bytes())
                        .map_err(|e| TestCaseError::fail(e.to_string()))?;
                    prop_assert_message(again == env)?;
                }
            }
            Ok(())
        })
        .unwrap();
}

fn prop_assert_message(ok: bool) -> Result<(), TestCaseError> {
    if ok {
        Ok(())
    } else {
        Err(TestCaseError::fail("property violated"))
    }
}

fn lines_of(ev: &Event) -> Option<&[event::OrderLine]> {
    match ev {
        Event::OrderPlaced(p) => Some(&p.lines),
        Event::PaymentProcessed(p) => Some(&p.lines),
        Event::InventoryReserved(p) => Some(&p.lines),
        Event::InventoryReleased(p) => Some(&p.lines),
        _ => None,
    }
}

const BALANCE: i64 = 1_000_000_000_000;
const STOCK: i64 = 1_000_000_000;

async fn stocked_stack() -> Result<Stack> {
    let stack = Stack::start().await?;
    for c in fuzz::CUSTOMERS {
        stack.set_balance(c, BALANCE).await?;
    }
    for (p, price) in fuzz::PRODUCTS.iter().zip(fuzz::PRICES) {
        stack.set_stock(p, STOCK).await?;
        stack.price(p, price).await?;
    }
    Ok(stack)
}

/// Waits for quiescence with room for early events' retries (about 13 s each hop).
async fn settle_long(stack: &Stack) -> Result<()> {
    eventually("the system to settle", Duration::from_secs(240), || async {
        Ok((stack.is_settled().await? && stack.is_settled().await?).then_some(()))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_generated_placements_get_a_2xx_or_a_4xx_with_a_message_never_a_5xx()
-> Result<()> {
    let stack = stocked_stack().await?;
    let bodies = fuzz::sample(&mut fuzz::runner(), fuzz::order_bytes(), CASES);
    let results = send_all(&stack, "order", reqwest::Method::POST, "/orders", bodies).await;
    let mut placed = 0;
    for result in results {
        let (status, reply, body) = result?;
        let shown = String::from_utf8_lossy(&body[..body.len().min(300)]).to_string();
        match status {
            201 => {
                placed += 1;
                assert_eq!(reply["status"], "PENDING", "{shown} -> {reply}");
            }
            400..=499 => assert!(
                reply["error"].as_str().is_some_and(|e| !e.is_empty()),
                "{status} without a message for {shown}: {reply}"
            ),
            other => panic!("{other} for {shown}: {reply}"),
        }
    }
    assert!(
        placed > CASES / 50,
        "the generator should place some orders, placed {placed}"
    );
    settle_long(&stack).await?;
    stack.assert_invariants().await
}

/// `bodies` sent to `method path` of `service` (as the operator), 32 at a
/// time: the status, the answer and the body of each.
async fn send_all(
    stack: &Stack,
    service: &str,
    method: reqwest::Method,
    path: &str,
    bodies: Vec<Vec<u8>>,
) -> Vec<Result<(u16, Value, Vec<u8>)>> {
    let url = stack.url(service, path);
    stream::iter(bodies)
        .map(|body| {
            let (http, url, method) = (stack.http.clone(), url.clone(), method.clone());
            async move {
                let r = http
                    .request(method, url)
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await?;
                let status = r.status().as_u16();
                Ok((status, r.json::<Value>().await.unwrap_or(Value::Null), body))
            }
        })
        .buffer_unordered(32)
        .collect()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_other_endpoint_that_takes_a_body_answers_ten_thousand_generated_ones_with_a_2xx_or_a_4xx()
-> Result<()> {
    use reqwest::Method;
    let stack = stocked_stack().await?;
    // Confirmed before any cancel comes: every valid cancel is refused.
    let order = stack.place("alice", &[("widget", 1, 1_000)], "US").await?;
    stack.wait_for_outcome(order).await?;
    let cancel = format!("/orders/{order}/cancel");
    let resolution = format!("/orders/{}/resolution", uuid::Uuid::now_v7());
    // (service, method, path, the body's fields, whether generated bodies
    // can be applied there: a put of an existing counter or product needs
    // If-Match, a resolution an order in REQUIRES_INTERVENTION, a cancel a
    // pending order, so there every valid body is refused after validation).
    type Endpoint<'a> = (&'a str, Method, &'a str, &'static [&'static str], bool);
    let endpoints: [Endpoint; 7] = [
        ("order", Method::POST, &cancel, &["reason"], false),
        (
            "order",
            Method::POST,
            &resolution,
            &["resolution", "operator", "note"],
            false,
        ),
        (
            "payment",
            Method::PUT,
            "/accounts/alice",
            &["balance"],
            false,
        ),
        (
            "payment",
            Method::POST,
            "/accounts/bob/deposits",
            &["amount"],
            true,
        ),
        (
            "payment",
            Method::PUT,
            "/admin/gateway",
            &["all", "customers"],
            true,
        ),
        (
            "inventory",
            Method::POST,
            "/stock/gadget/adjustments",
            &["delta"],
            true,
        ),
        (
            "inventory",
            Method::PUT,
            "/products/gizmo",
            &["name", "unitPrice"],
            false,
        ),
    ];
    let mut runner = fuzz::runner();
    for (service, method, path, keys, applies) in endpoints {
        let bodies = fuzz::sample(&mut runner, fuzz::body(keys), CASES);
        let mut applied = 0;
        for result in send_all(&stack, service, method.clone(), path, bodies).await {
            let (status, reply, body) = result?;
            let shown = String::from_utf8_lossy(&body[..body.len().min(300)]).to_string();
            match status {
                200..=299 => applied += 1,
                400..=499 => assert!(
                    reply["error"].as_str().is_some_and(|e| !e.is_empty()),
                    "{method} {path}: {status} without a message for {shown}: {reply}"
                ),
                other => panic!("{method} {path}: {other} for {shown}: {reply}"),
            }
        }
        assert_eq!(applied > 0, applies, "{method} {path}: {applied} applied");
    }
    for service in ["order", "payment", "inventory"] {
        let (status, body) = stack.get_json(service, "/health/ready").await?;
        assert_eq!(status, 200, "{service}: {body}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_generated_events_are_each_applied_or_dead_lettered_with_a_reason()
-> Result<()> {
    let stack = stocked_stack().await?;
    let events = fuzz::sample(
        &mut fuzz::runner(),
        fuzz::envelope(stack.subjects.clone()),
        CASES,
    );
    // Raw publishes, pipelined; then one flush.
    let mut refused_locally = 0;
    for (subject, bytes) in &events {
        if Envelope::decode(bytes).is_err() {
            refused_locally += 1;
        }
        stack
            .client
            .publish(subject.clone(), bytes.clone().into())
            .await?;
    }
    stack.client.flush().await?;
    let stream = stack.js.get_stream(stack.subjects.events_stream()).await?;
    // (Consumers react to the valid ones meanwhile: more than CASES in all.)
    eventually(
        "every event to be stored",
        Duration::from_secs(60),
        || async {
            let n = stream.get_info().await?.state.messages;
            Ok((n >= CASES as u64).then_some(n))
        },
    )
    .await?;

    // A real saga goes through meanwhile: each of its events waits behind
    // the garbage queued for its consumer, so it gets the time the backlog
    // takes (on a loaded machine, more than a saga's usual deadline).
    let id = stack.place("alice", &[("widget", 1, 100)], "US").await?;
    let order = eventually("the real saga to end", Duration::from_secs(180), || async {
        let order = stack.order(id).await?;
        Ok((order["status"] != "PENDING").then_some(order))
    })
    .await?;
    assert_eq!(
        order["status"], "CONFIRMED",
        "a real saga among the garbage"
    );

    settle_long(&stack).await?;
    let letters = stack.dead_letter_messages().await?;
    let mut sequences = HashSet::new();
    for (headers, _) in &letters {
        let reason = headers
            .get(dlq_headers::REASON)
            .map(|v| v.as_str().to_string())
            .unwrap_or_default();
        assert!(!reason.trim().is_empty(), "a dead letter without a reason");
        sequences.insert(
            headers
                .get(dlq_headers::STREAM_SEQUENCE)
                .context("stream sequence header")?
                .as_str()
                .to_string(),
        );
    }
    // Everything that does not decode was dead-lettered, once.
    assert!(
        sequences.len() >= refused_locally,
        "{} dead letters for {refused_locally} undecodable events",
        sequences.len()
    );
    for (status, body) in [
        stack.ready("order").await?,
        stack.ready("payment").await?,
        stack.ready("inventory").await?,
        stack.ready("shipping").await?,
    ] {
        assert_eq!(status, 200, "{body}");
    }
    stack.assert_invariants().await
}
