//! Inputs that are too large, overflow, carry characters a database refuses,
//! or are forged: each gets a 4xx or a dead letter with its reason, and the
//! system goes on (the saga after them completes).

use anyhow::{Context, Result};
use common::{
    Envelope, Event, EventKind,
    event::{Address, OrderLine, PaymentProcessed},
};
use saga_tests::{DEADLINE, Stack, assert_refused, eventually, order_body};
use serde_json::{Value, json};
use uuid::Uuid;

async fn post_raw(stack: &Stack, body: Vec<u8>) -> Result<(u16, Value)> {
    let r = stack
        .http
        .post(stack.url("order", "/orders"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await?;
    Ok((r.status().as_u16(), r.json().await.unwrap_or(Value::Null)))
}

/// None of the bad input started a saga, and a good order after it completes.
async fn nothing_was_placed_and_a_saga_still_completes(stack: &Stack) -> Result<()> {
    assert_eq!(stack.rows("order", "order_events").await?, 0);
    a_saga_still_completes(stack).await
}

/// A normal order placed after the bad input still runs to its end.
async fn a_saga_still_completes(stack: &Stack) -> Result<()> {
    let id = stack.place("alice", &[("widget", 1, 100)], "US").await?;
    assert_eq!(stack.wait_for_outcome(id).await?["status"], "CONFIRMED");
    Ok(())
}

/// Publishes a PaymentProcessed nobody's payment service sent: `lines` as
/// (product, quantity, unit price), for `order_id`, in saga `correlation_id`.
async fn publish_forged_payment(
    stack: &Stack,
    order_id: Uuid,
    correlation_id: Uuid,
    amount: i64,
    lines: &[(&str, i64, i64)],
) -> Result<()> {
    let event = Event::PaymentProcessed(PaymentProcessed {
        order_id,
        payment_id: Uuid::now_v7(),
        customer_id: "mallory".into(),
        amount,
        lines: lines
            .iter()
            .map(|(p, q, price)| OrderLine {
                product_id: p.to_string(),
                quantity: *q,
                unit_price: *price,
            })
            .collect(),
        shipping_address: Address::example(),
    });
    let env = Envelope::new(
        &event,
        order_id.to_string(),
        1,
        correlation_id,
        Uuid::now_v7(),
    );
    stack
        .publish(
            &stack.subjects.event(EventKind::PaymentProcessed),
            env.to_bytes(),
        )
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_order_is_refused_before_it_can_make_an_event_the_broker_refuses() -> Result<()>
{
    let stack = Stack::stocked(10_000, 10).await?;

    // ~1.2 MB of lines: more than the broker's max_payload as one event.
    let lines: Vec<Value> = (0..12_000)
        .map(|i| json!({"productId": format!("p{i:05}-{}", "x".repeat(60)), "quantity": 1, "unitPrice": 1}))
        .collect();
    let mut body = order_body("alice", &[("widget", 1, 100)], "US");
    body["lines"] = Value::Array(lines);
    let (status, v) = post_raw(&stack, serde_json::to_vec(&body)?).await?;
    assert_eq!(status, 413, "{v}");
    assert!(
        v["error"].as_str().unwrap_or_default().contains("bytes"),
        "{v}"
    );

    // Under the body limit, still too many lines: a message naming the bound.
    let mut body = order_body("alice", &[("widget", 1, 100)], "US");
    body["lines"] = Value::Array(
        (0..101)
            .map(|i| json!({"productId": format!("p{i}"), "quantity": 1, "unitPrice": 1}))
            .collect(),
    );
    let (status, v) = post_raw(&stack, serde_json::to_vec(&body)?).await?;
    assert_refused(status, &v, 422, "at most 100 lines");

    // One huge string.
    let mut body = order_body("alice", &[("widget", 1, 100)], "US");
    body["shippingAddress"]["street"] = json!("s".repeat(100_000));
    let (status, v) = post_raw(&stack, serde_json::to_vec(&body)?).await?;
    assert_refused(
        status,
        &v,
        422,
        "shippingAddress.street must be at most 200 characters",
    );

    nothing_was_placed_and_a_saga_still_completes(&stack).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbox_row_the_broker_can_never_take_is_parked_and_the_rest_flows() -> Result<()> {
    let stack = Stack::stocked(10_000, 10).await?;

    // A row larger than max_payload, first in payment's outbox (as an older
    // version without the size check could have left it).
    let pool = stack.pool("payment").await?;
    let subject = stack.subjects.event(EventKind::PaymentProcessed);
    sqlx::query(
        "INSERT INTO outbox (event_id, subject, aggregate_id, body) VALUES ($1, $2, 'giant', $3)",
    )
    .bind(Uuid::now_v7())
    .bind(&subject)
    .bind(vec![b'x'; 1_100_000])
    .execute(&pool)
    .await?;

    a_saga_still_completes(&stack).await?;
    let reason: String = eventually("the giant row to be parked", DEADLINE, || async {
        Ok(
            sqlx::query_scalar::<_, String>("SELECT reason FROM outbox_parked")
                .fetch_optional(&pool)
                .await?,
        )
    })
    .await?;
    assert!(reason.contains("max_payload"), "{reason}");
    let (status, ready) = stack.ready("payment").await?;
    assert_eq!(status, 200, "{ready}");
    let alerts = ready["alerts"].to_string();
    assert!(alerts.contains("parked"), "{ready}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_near_limit_message_is_dead_lettered_without_its_body_rather_than_jamming() -> Result<()>
{
    let stack = Stack::stocked(10_000, 10).await?;

    // Just under max_payload: fits alone, not with the dead-letter headers.
    let body = vec![b'z'; 1024 * 1024 - 300];
    stack
        .publish(&stack.subjects.event(EventKind::OrderPlaced), body.clone())
        .await?;
    let letters = stack.wait_for_dead_letters(1).await?;
    let (headers, dead_body) = &letters[0];
    let omitted = headers
        .get(common::dlq::dlq_headers::BODY_OMITTED)
        .context("body omitted header")?;
    assert!(omitted.as_str().contains("sequence 1"), "{omitted:?}");
    assert!(dead_body.is_empty());
    assert!(
        headers
            .get(common::dlq::dlq_headers::REASON)
            .unwrap()
            .as_str()
            .contains("not a valid event envelope")
    );
    a_saga_still_completes(&stack).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quantities_that_would_overflow_are_dead_lettered_and_create_no_stock() -> Result<()> {
    let stack = Stack::stocked(10_000, 10).await?;

    // Two lines of i64::MAX at price 0: the total does not overflow, the
    // demand (summed per product) would wrap to -2.
    let order_id = Uuid::now_v7();
    let huge = ("widget", i64::MAX, 0);
    publish_forged_payment(&stack, order_id, order_id, 0, &[huge, huge]).await?;

    let letters = stack.wait_for_dead_letters(1).await?;
    let reason = letters[0]
        .0
        .get(common::dlq::dlq_headers::REASON)
        .unwrap()
        .as_str()
        .to_string();
    assert!(reason.contains("quantity must be at most"), "{reason}");
    assert_eq!(stack.stock("widget").await?, (10, 0));
    assert_eq!(stack.rows("inventory", "reservations").await?, 0);

    // A free item is refused at the edge too.
    let (status, v) = post_raw(
        &stack,
        serde_json::to_vec(&order_body("alice", &[("widget", 1, 0)], "US"))?,
    )
    .await?;
    assert_refused(status, &v, 422, "lines[0].unitPrice must be positive");
    a_saga_still_completes(&stack).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inputs_that_used_to_be_server_errors_are_client_errors_with_a_message() -> Result<()> {
    let stack = Stack::stocked(10_000, 10).await?;

    let (status, v) = stack
        .get_json("order", "/orders?offset=9223372036854775807")
        .await?;
    assert_refused(status, &v, 400, "offset");

    let with_nul = order_body("al\u{0}ice", &[("widget", 1, 100)], "US");
    let (status, v) = post_raw(&stack, serde_json::to_vec(&with_nul)?).await?;
    assert_refused(status, &v, 422, "control characters");

    let mut nul_in_address = order_body("alice", &[("widget", 1, 100)], "US");
    nul_in_address["shippingAddress"]["city"] = json!("Lon\u{0}don");
    let (status, v) = post_raw(&stack, serde_json::to_vec(&nul_in_address)?).await?;
    assert_eq!(status, 422, "{v}");

    let long_customer = order_body(&"c".repeat(3000), &[("widget", 1, 100)], "US");
    let (status, v) = post_raw(&stack, serde_json::to_vec(&long_customer)?).await?;
    assert_refused(status, &v, 422, "customerId must be at most 128 characters");

    let long_key = "k".repeat(3000);
    let (status, _) = stack
        .put(
            "payment",
            &format!("/accounts/{long_key}"),
            json!({"balance": 1}),
        )
        .await?;
    assert_eq!(status, 400);
    let (status, _) = stack
        .put("inventory", "/stock/wid%00get", json!({"available": 1}))
        .await?;
    assert_eq!(status, 400);

    // An unknown field inside a line is refused like one at the top.
    let mut extra = order_body("alice", &[("widget", 1, 100)], "US");
    extra["lines"][0]["discount"] = json!(5);
    let (status, v) = post_raw(&stack, serde_json::to_vec(&extra)?).await?;
    assert_refused(status, &v, 422, "unknown field `discount`");
    let mut extra = order_body("alice", &[("widget", 1, 100)], "US");
    extra["shippingAddress"]["floor"] = json!(3);
    let (status, _) = post_raw(&stack, serde_json::to_vec(&extra)?).await?;
    assert_eq!(status, 422);

    nothing_was_placed_and_a_saga_still_completes(&stack).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_payment_for_an_order_nobody_placed_is_dead_lettered_and_ships_nothing()
-> Result<()> {
    let stack = Stack::stocked(10_000, 10).await?;

    let order_id = Uuid::now_v7();
    publish_forged_payment(&stack, order_id, order_id, -5, &[("widget", 3, 1)]).await?;
    // Consistent amounts, but the saga id is not the order's.
    publish_forged_payment(
        &stack,
        Uuid::now_v7(),
        Uuid::now_v7(),
        3,
        &[("widget", 3, 1)],
    )
    .await?;

    let letters = stack.wait_for_dead_letters(2).await?;
    let reasons: Vec<String> = letters
        .iter()
        .map(|(h, _)| {
            h.get(common::dlq::dlq_headers::REASON)
                .unwrap()
                .as_str()
                .to_string()
        })
        .collect();
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("amount -5 does not match the lines")
                || r.contains("amount must be positive")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("correlationId")),
        "{reasons:?}"
    );
    a_saga_still_completes(&stack).await?;
    stack.settle().await?;
    assert_eq!(stack.stock("widget").await?, (9, 1));
    assert_eq!(stack.rows("shipping", "shipments").await?, 1);
    Ok(())
}
