//! Events that can never be applied end in the dead-letter stream with their
//! reason, and the saga they belong to says so (REQUIRES_INTERVENTION)
//! instead of waiting forever: handler panics, permanent database errors,
//! payment events that contradict the order. Dead letters never collide, and
//! the `Nats-Msg-Id` a `nats` CLI user sends is honoured.

use std::time::Duration;

use anyhow::{Context, Result};
use common::{
    Applying, Config, Envelope, Event, EventKind, Handler, HandlerError, Infra, Outcome, Service,
    dlq::dlq_headers,
    event::{OrderPlaced, PaymentRefunded},
};
use saga_tests::{DEADLINE, Stack, eventually, order_body, raw_nats::RawNats};
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

fn header(h: &async_nats::HeaderMap, name: &str) -> String {
    h.get(name)
        .map(|v| v.as_str().to_string())
        .unwrap_or_default()
}

/// A shipping service whose handler panics on every event.
struct Panics;

impl Handler for Panics {
    type Before = common::consumer::NothingBefore;

    fn before(&self) -> &Self::Before {
        &common::consumer::NothingBefore
    }

    async fn handle(&self, _cx: Applying<'_>, _event: Event) -> Result<Outcome, HandlerError> {
        panic!("carrier API returned nonsense")
    }
}

async fn start_panicking_shipping(stack: &Stack) -> Result<CancellationToken> {
    let config: Config = stack.config("shipping");
    let infra = Infra::connect(config, &shipping::MIGRATIONS).await?;
    let shutdown = CancellationToken::new();
    let service =
        Service::build(&infra, Panics, axum::Router::new().into(), shutdown.clone()).await?;
    tokio::spawn(service.run());
    Ok(shutdown)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_panics_dead_letters_the_event_and_the_order_requires_intervention()
-> Result<()> {
    let stack = Stack::start_with(&["order", "payment", "inventory"]).await?;
    let shipping = start_panicking_shipping(&stack).await?;
    stack.set_balance("alice", 10_000).await?;
    stack.set_stock("widget", 5).await?;

    let id = stack.place("alice", &[("widget", 1, 1_000)], "US").await?;
    let order = stack.wait_for_outcome(id).await?;
    assert_eq!(order["status"], "REQUIRES_INTERVENTION", "{order}");
    let reason = order["failureReason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("shipping dead-lettered InventoryReserved")
            && reason.contains("handler panicked: carrier API returned nonsense"),
        "{reason}"
    );
    let letters = stack.wait_for_dead_letters(1).await?;
    assert_eq!(header(&letters[0].0, dlq_headers::CONSUMER), "shipping");
    assert_eq!(
        header(&letters[0].0, dlq_headers::CORRELATION_ID),
        id.to_string()
    );
    shipping.cancel();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_database_error_is_dead_lettered_after_a_few_tries_not_retried_forever()
-> Result<()> {
    // Inventory is down, so the saga waits after the charge.
    let mut stack = Stack::start().await?;
    stack.price("ghost-product", 1_000).await?;
    stack.stop_service("inventory").await?;
    stack.set_balance("alice", 10_000).await?;
    let id = stack
        .place("alice", &[("ghost-product", 1, 1_000)], "US")
        .await?;
    eventually("the charge", DEADLINE, || async {
        Ok((stack.balance("alice").await? == 9_000).then_some(()))
    })
    .await?;
    // Someone sets the balance by hand near the top of bigint: the refund
    // that is coming can never be added.
    sqlx::query("UPDATE accounts SET balance = $1 WHERE customer_id = 'alice'")
        .bind(i64::MAX - 10)
        .execute(&stack.pool("payment").await?)
        .await?;
    // Inventory knows no such product: it fails the reservation, payment refunds.
    stack.start_service("inventory").await?;

    let order = stack.wait_for_outcome(id).await?;
    assert_eq!(order["status"], "REQUIRES_INTERVENTION", "{order}");
    let reason = order["failureReason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("payment dead-lettered InventoryReservationFailed")
            && reason.contains("permanent failure")
            && reason.contains("out of range"),
        "{reason}"
    );
    let letters = stack.wait_for_dead_letters(1).await?;
    assert_eq!(header(&letters[0].0, dlq_headers::DELIVERIES), "3");
    // Nothing was half-applied: still charged, not refunded.
    assert_eq!(stack.balance("alice").await?, i64::MAX - 10);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refund_that_names_another_amount_halts_the_saga_instead_of_cancelling_it() -> Result<()>
{
    // Payment is down: only the forged refund speaks for it.
    let stack = Stack::start_with(&["order", "inventory", "shipping"]).await?;
    let id = stack.place("alice", &[("widget", 2, 1_000)], "US").await?;
    let event = Event::PaymentRefunded(PaymentRefunded {
        order_id: id,
        payment_id: Uuid::now_v7(),
        customer_id: "alice".into(),
        amount: 1,
        reason: "refund".into(),
    });
    let env = Envelope::new(&event, Uuid::now_v7().to_string(), 2, id, Uuid::now_v7());
    stack
        .publish(
            &stack.subjects.event(EventKind::PaymentRefunded),
            env.to_bytes(),
        )
        .await?;

    let order = stack.wait_for_outcome(id).await?;
    assert_eq!(order["status"], "REQUIRES_INTERVENTION", "{order}");
    assert!(
        order["failureReason"]
            .as_str()
            .unwrap_or_default()
            .contains("does not match order"),
        "{order}"
    );
    Ok(())
}

fn placed(order_id: Uuid, customer: &str) -> Envelope {
    let event = Event::OrderPlaced(OrderPlaced {
        order_id,
        customer_id: customer.into(),
        lines: vec![common::event::OrderLine {
            product_id: "widget".into(),
            quantity: 1,
            unit_price: 100,
        }],
        total: 100,
        shipping_address: common::event::Address::example(),
    });
    Envelope::new(&event, order_id.to_string(), 1, order_id, order_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn different_dead_letters_never_share_an_id_even_after_the_stream_is_recreated() -> Result<()>
{
    let stack = Stack::start().await?;
    // Payment listens on inventory.released: an OrderPlaced there is on the
    // wrong subject and is dead-lettered with its event id known.
    let wrong = stack.subjects.event(EventKind::InventoryReleased);
    let order_id = Uuid::now_v7();
    let first = placed(order_id, "alice");
    let mut second = placed(order_id, "eve");
    second.event_id = first.event_id; // same event id, another body
    let mut cli = RawNats::connect(&stack.cli_url()).await?;
    cli.publish_with_headers(&wrong, &[("Nats-Msg-Id", "a")], &first.to_bytes())
        .await?;
    stack.wait_for_dead_letters(1).await?;
    cli.publish_with_headers(&wrong, &[("Nats-Msg-Id", "b")], &second.to_bytes())
        .await?;
    stack.wait_for_dead_letters(2).await?;
    // The first one again (another message, the same bytes): the same dead letter.
    cli.publish_with_headers(&wrong, &[("Nats-Msg-Id", "c")], &first.to_bytes())
        .await?;
    stack.settle().await?;
    let letters = stack.dead_letter_messages().await?;
    assert_eq!(letters.len(), 2, "{letters:?}");
    assert_ne!(letters[0].1, letters[1].1);

    // The events stream is deleted and provisioned again (sequences start
    // again at 1, with its consumers); the services find them by themselves.
    let events = stack.subjects.events_stream();
    stack.js.delete_stream(&events).await?;
    stack.provision().await?;
    stack
        .publish(
            &stack.subjects.event(EventKind::OrderPlaced),
            b"{oops".to_vec(),
        )
        .await?;
    let letters = stack.wait_for_dead_letters(3).await?;
    assert!(
        header(&letters[2].0, dlq_headers::REASON).contains("not a valid event envelope"),
        "{letters:?}"
    );
    // And the system works again.
    stack.set_balance("alice", 1_000).await?;
    stack.set_stock("widget", 1).await?;
    let id = stack.place("alice", &[("widget", 1, 100)], "US").await?;
    assert_eq!(stack.wait_for_outcome(id).await?["status"], "CONFIRMED");
    let (status, ready) = stack.ready("payment").await?;
    assert_eq!(status, 200, "{ready}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_req_retried_with_the_same_msg_id_returns_the_same_order() -> Result<()> {
    let stack = Stack::stocked(10_000, 5).await?;
    stack.price("widget", 700).await?;
    let mut cli = RawNats::connect(&stack.cli_url()).await?;
    let body = serde_json::to_vec(&order_body("alice", &[("widget", 1, 700)], "US"))?;
    let subject = stack.subjects.place_order_command();

    // nats req -H 'Nats-Msg-Id:retry-1' saga.cmd.order.place '...', twice
    let mut ids = Vec::new();
    for _ in 0..2 {
        let (_, reply) = cli
            .request_with_headers(
                &subject,
                &[("Nats-Msg-Id", "retry-1")],
                &body,
                Duration::from_secs(10),
            )
            .await?;
        let reply: Value = serde_json::from_slice(&reply)?;
        ids.push(reply["orderId"].as_str().context("orderId")?.to_string());
    }
    assert_eq!(ids[0], ids[1]);
    let id: Uuid = ids[0].parse()?;
    assert_eq!(stack.wait_for_outcome(id).await?["status"], "CONFIRMED");
    assert_eq!(stack.rows("order", "orders").await?, 1);
    assert_eq!(stack.balance("alice").await?, 10_000 - 700);

    // A dead letter keeps the Nats-Msg-Id the original was published with.
    cli.publish_with_headers(
        &stack.subjects.event(EventKind::OrderPlaced),
        &[("Nats-Msg-Id", "by-hand-7")],
        b"not json",
    )
    .await?;
    let letters = stack.wait_for_dead_letters(1).await?;
    assert_eq!(header(&letters[0].0, dlq_headers::MSG_ID), "by-hand-7");
    Ok(())
}
