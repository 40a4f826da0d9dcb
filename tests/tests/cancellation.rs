//! The customer's cancel at every step of the saga: the next service is held
//! back, the order is cancelled, the service is let go; and cancels fired
//! into a burst of sagas. Each order ends with exactly one outcome, money
//! and stock exact, and no shipment of an order that is not confirmed.

use std::time::Duration;

use anyhow::{Context, Result};
use reqwest::Method;
use saga_tests::{DEADLINE, Stack, assert_refused, eventually, raw_nats::RawNats};
use serde_json::{Value, json};
use uuid::Uuid;

async fn cancel(stack: &Stack, id: Uuid, reason: &str) -> Result<(u16, Value)> {
    let (status, _, body) = stack
        .call(
            Method::POST,
            "order",
            &format!("/orders/{id}/cancel"),
            Some(json!({ "reason": reason })),
            None,
        )
        .await?;
    Ok((status, body))
}

/// The order's shipment as shipping has it (`None`: there is none).
async fn shipment(stack: &Stack, id: Uuid) -> Result<Option<Value>> {
    let (status, body) = stack
        .get_json("shipping", &format!("/shipments/{id}"))
        .await?;
    Ok((status == 200).then_some(body))
}

/// Once everything settled: the cancelled order, its money back, its
/// stock back, no live shipment, each compensation at most once.
async fn assert_cancelled_and_undone(stack: &Stack, id: Uuid) -> Result<Vec<String>> {
    stack.settle().await?;
    let order = stack.order(id).await?;
    assert_eq!(order["status"], "CANCELLED", "{order:#}");
    assert_eq!(
        order["failureReason"], "cancelled by the customer: changed my mind",
        "{order:#}"
    );
    assert_eq!(stack.balance("alice").await?, 10_000);
    assert_eq!(stack.stock("widget").await?, (5, 0));
    if let Some(s) = shipment(stack, id).await? {
        assert_ne!(s["status"], "created", "{s:#}");
    }
    let types = stack.saga_event_types(id).await?;
    for once in [
        "OrderCancelledByCustomer",
        "PaymentRefunded",
        "InventoryReleased",
        "ShipmentCancelled",
    ] {
        let n = types.iter().filter(|t| *t == once).count();
        assert!(n <= 1, "{once} {n} times: {types:?}");
    }
    stack.assert_invariants().await?;
    Ok(types)
}

/// Alice's order of one widget at 1,000 with `held` stopped; the order
/// cancelled once the saga reached it; `held` started again.
async fn cancelled_while_held(held: &'static str, reached: impl AsyncCheck) -> Result<Vec<String>> {
    let mut stack = Stack::stocked(10_000, 5).await?;
    stack.price("widget", 1_000).await?;
    stack.stop_service(held).await?;
    let id = stack.place("alice", &[("widget", 1, 1_000)], "US").await?;
    reached.check(&stack, id).await?;
    let (status, order) = cancel(&stack, id, "changed my mind").await?;
    assert_eq!(status, 200, "{order}");
    assert_eq!(order["status"], "CANCELLED");
    stack.start_service(held).await?;
    assert_cancelled_and_undone(&stack, id).await
}

/// What the test waits for before it cancels.
trait AsyncCheck {
    async fn check(&self, stack: &Stack, id: Uuid) -> Result<()>;
}

/// Nothing: cancel at once.
struct AtOnce;
impl AsyncCheck for AtOnce {
    async fn check(&self, _: &Stack, _: Uuid) -> Result<()> {
        Ok(())
    }
}

/// Alice was charged.
struct Charged;
impl AsyncCheck for Charged {
    async fn check(&self, stack: &Stack, _: Uuid) -> Result<()> {
        eventually("the charge", DEADLINE, || async {
            Ok((stack.balance("alice").await? == 9_000).then_some(()))
        })
        .await
    }
}

/// The widget was reserved.
struct Reserved;
impl AsyncCheck for Reserved {
    async fn check(&self, stack: &Stack, _: Uuid) -> Result<()> {
        eventually("the reservation", DEADLINE, || async {
            Ok((stack.stock("widget").await? == (4, 1)).then_some(()))
        })
        .await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_before_the_payment_charges_nothing() -> Result<()> {
    let types = cancelled_while_held("payment", AtOnce).await?;
    for never in ["PaymentProcessed", "PaymentRefunded", "InventoryReserved"] {
        assert!(!types.iter().any(|t| t == never), "{types:?}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_after_the_payment_refunds_it_and_reserves_nothing() -> Result<()> {
    let types = cancelled_while_held("inventory", Charged).await?;
    assert!(types.iter().any(|t| t == "PaymentRefunded"), "{types:?}");
    assert!(!types.iter().any(|t| t == "InventoryReserved"), "{types:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_after_the_reservation_releases_and_refunds_and_ships_nothing() -> Result<()> {
    let types = cancelled_while_held("shipping", Reserved).await?;
    for once in ["InventoryReleased", "PaymentRefunded"] {
        assert!(types.iter().any(|t| t == once), "{once}: {types:?}");
    }
    assert!(!types.iter().any(|t| t == "ShipmentCreated"), "{types:?}");
    Ok(())
}

/// Pauses (or resumes) the order service's consumer on the broker.
async fn pause_order_consumer(stack: &Stack, pause: bool) -> Result<()> {
    let subject = format!(
        "$JS.API.CONSUMER.PAUSE.{}.order",
        stack.subjects.events_stream()
    );
    let body = if pause {
        json!({ "pause_until": "2999-01-01T00:00:00Z" })
    } else {
        json!({})
    };
    let reply = stack
        .client
        .request(subject, serde_json::to_vec(&body)?.into())
        .await?;
    let reply: Value = serde_json::from_slice(&reply.payload)?;
    anyhow::ensure!(reply["paused"] == json!(pause), "{reply}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_after_the_shipment_was_created_calls_it_off_releases_and_refunds() -> Result<()> {
    // The order service does not hear of the shipment: the saga waits
    // between ShipmentCreated and its confirmation.
    let stack = Stack::stocked(10_000, 5).await?;
    pause_order_consumer(&stack, true).await?;
    let id = stack.place("alice", &[("widget", 1, 1_000)], "US").await?;
    let created = eventually("the shipment", DEADLINE, || async {
        shipment(&stack, id).await
    })
    .await?;
    assert_eq!(created["status"], "created");
    let (status, order) = cancel(&stack, id, "changed my mind").await?;
    assert_eq!(
        (status, order["status"].as_str()),
        (200, Some("CANCELLED")),
        "{order}"
    );

    pause_order_consumer(&stack, false).await?;
    let types = assert_cancelled_and_undone(&stack, id).await?;
    let called_off = shipment(&stack, id).await?.context("the shipment")?;
    assert_eq!(called_off["status"], "cancelled");
    for once in ["ShipmentCancelled", "InventoryReleased", "PaymentRefunded"] {
        assert!(types.iter().any(|t| t == once), "{once}: {types:?}");
    }
    assert!(!types.iter().any(|t| t == "OrderConfirmed"), "{types:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confirmed_order_is_not_cancelled_and_bad_cancels_are_refused_with_a_message()
-> Result<()> {
    let stack = Stack::stocked(10_000, 5).await?;
    let (id, token) = stack
        .place_with_cancel_token("alice", &[("widget", 1, 1_000)], "US")
        .await?;
    let order = stack.wait_for_outcome(id).await?;
    stack.settle().await?;
    assert_eq!(order["status"], "CONFIRMED");
    let (status, body) = cancel(&stack, id, "too late").await?;
    assert_refused(
        status,
        &body,
        409,
        "is CONFIRMED: it can no longer be cancelled",
    );
    let (status, body) = cancel(&stack, Uuid::now_v7(), "who?").await?;
    assert_refused(status, &body, 404, "not found");
    let (status, body) = cancel(&stack, id, " ").await?;
    assert_refused(status, &body, 422, "reason");
    let (status, _, body) = stack
        .call(
            Method::POST,
            "order",
            &format!("/orders/{id}/cancel"),
            Some(json!({"why": "x"})),
            None,
        )
        .await?;
    assert_refused(status, &body, 422, "why");

    // nats req saga.cmd.order.cancel '{"orderId": ..., "reason": ...}'
    let mut cli = RawNats::connect(&stack.cli_url()).await?;
    let subject = stack.subjects.cancel_order_command();
    let request = json!({"orderId": id, "reason": "too late", "cancelToken": token}).to_string();
    let (headers, reply) = cli
        .request(&subject, request.as_bytes(), Duration::from_secs(10))
        .await?;
    assert!(headers.contains("Saga-Error: conflict"), "{headers}");
    let reply: Value = serde_json::from_slice(&reply)?;
    assert!(
        reply["error"]
            .as_str()
            .unwrap_or_default()
            .contains("CONFIRMED")
    );

    let (pending, token) = stack
        .place_with_cancel_token("alice", &[("widget", 9, 1_000)], "US")
        .await?;
    let request =
        json!({"orderId": pending, "reason": "changed my mind", "cancelToken": token}).to_string();
    let (headers, reply) = cli
        .request(&subject, request.as_bytes(), Duration::from_secs(10))
        .await?;
    let reply: Value = serde_json::from_slice(&reply)?;
    // Out of stock: the saga may have cancelled it first; either way it is.
    assert!(!headers.contains("Saga-Error"), "{headers} {reply}");
    assert_eq!(reply["status"], "CANCELLED", "{reply}");
    stack.settle().await?;
    assert_eq!(stack.balance("alice").await?, 9_000);
    stack.assert_invariants().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancels_fired_into_a_burst_of_sagas_leave_one_outcome_each_with_money_and_stock_exact()
-> Result<()> {
    let stack = Stack::stocked(1_000_000, 20).await?;
    const SAGAS: usize = 40;
    // All placed at once; a quarter cancelled right after its placement
    // (mostly before payment), another quarter after the whole burst is
    // placed (at whatever step its saga is). Some go undeliverable and some
    // run out of stock, so cancels also race the saga's own compensations.
    let placed = futures::future::join_all((0..SAGAS).map(|i| {
        let stack = &stack;
        async move {
            let country = if i % 7 == 3 { "ZZ" } else { "US" };
            let id = stack.place("alice", &[("widget", 1, 100)], country).await?;
            let early = if i % 4 == 0 {
                Some(cancel(stack, id, "changed my mind").await?)
            } else {
                None
            };
            anyhow::Ok((id, early))
        }
    }))
    .await;
    let mut ids = Vec::new();
    let mut cancels = Vec::new();
    for (i, placed) in placed.into_iter().enumerate() {
        let (id, early) = placed?;
        ids.push(id);
        if let Some(answer) = early {
            cancels.push((id, answer));
        } else if i % 4 == 2 {
            cancels.push((id, cancel(&stack, id, "changed my mind").await?));
        }
    }
    // And a quarter once their saga ended: too late for a confirmed one.
    for id in ids.iter().skip(1).step_by(4) {
        stack.wait_for_outcome(*id).await?;
        cancels.push((*id, cancel(&stack, *id, "changed my mind").await?));
    }
    stack.settle().await?;

    let mut answers = std::collections::BTreeMap::<u16, usize>::new();
    for (id, (status, body)) in cancels {
        *answers.entry(status).or_default() += 1;
        let order = stack.order(id).await?;
        match status {
            200 => assert_eq!(order["status"], "CANCELLED", "{order:#}"),
            409 => assert_eq!(order["status"], "CONFIRMED", "{body} {order:#}"),
            other => panic!("cancel of {id}: {other} {body}"),
        }
    }
    eprintln!("cancel answers: {answers:?}");
    for id in &ids {
        let order = stack.order(*id).await?;
        let status = order["status"].as_str().unwrap_or_default();
        assert!(["CONFIRMED", "CANCELLED"].contains(&status), "{order:#}");
        let shipped = shipment(&stack, *id)
            .await?
            .is_some_and(|s| s["status"] == "created");
        assert_eq!(shipped, status == "CONFIRMED", "{order:#}");
    }
    stack.assert_invariants().await
}

/// Only the customer who placed an order (who holds the cancel token its
/// placement answered with) or the operator can cancel it; anyone else is
/// refused, whether or not the order exists, and nothing changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_needs_the_orders_cancel_token_or_the_operator() -> Result<()> {
    let mut stack = Stack::start_with(&["order", "payment", "inventory"]).await?;
    stack.set_balance("alice", 10_000).await?;
    stack.set_balance("bob", 10_000).await?;
    stack.set_stock("widget", 5).await?;
    // Shipping is away: both sagas wait after the reservation.
    let (alice, alice_token) = stack
        .place_with_cancel_token("alice", &[("widget", 1, 1_000)], "US")
        .await?;
    let (bob, bob_token) = stack
        .place_with_cancel_token("bob", &[("widget", 1, 1_000)], "US")
        .await?;
    assert_ne!(alice_token, bob_token);
    let anonymous = reqwest::Client::new();
    let cancel_as = |id: Uuid, token: Option<String>| {
        let (anonymous, url) = (
            anonymous.clone(),
            stack.url("order", &format!("/orders/{id}/cancel")),
        );
        async move {
            let mut r = anonymous.post(url).json(&json!({"reason": "not mine"}));
            if let Some(token) = token {
                r = r.bearer_auth(token);
            }
            let r = r.send().await?;
            let status = r.status().as_u16();
            anyhow::Ok((status, r.json::<Value>().await.unwrap_or(Value::Null)))
        }
    };

    let (status, body) = cancel_as(alice, None).await?;
    assert_refused(status, &body, 401, "cancel token");
    let (status, body) = cancel_as(alice, Some(bob_token.clone())).await?;
    assert_refused(status, &body, 403, "does not cancel order");
    let (status, body) = cancel_as(Uuid::now_v7(), Some(bob_token.clone())).await?;
    assert_refused(status, &body, 403, "does not cancel order");
    let mut cli = RawNats::connect(&stack.cli_url()).await?;
    let subject = stack.subjects.cancel_order_command();
    for request in [
        json!({"orderId": alice, "reason": "not mine", "cancelToken": bob_token}),
        json!({"orderId": alice, "reason": "not mine", "cancelToken": "ct_guess"}),
    ] {
        let (headers, reply) = cli
            .request(
                &subject,
                request.to_string().as_bytes(),
                Duration::from_secs(10),
            )
            .await?;
        assert!(headers.contains("Saga-Error: forbidden"), "{headers}");
        let reply: Value = serde_json::from_slice(&reply)?;
        assert!(
            reply["error"]
                .as_str()
                .unwrap_or_default()
                .contains("does not cancel"),
            "{reply}"
        );
    }
    let (headers, _) = cli
        .request(
            &subject,
            json!({"orderId": alice, "reason": "not mine"})
                .to_string()
                .as_bytes(),
            Duration::from_secs(10),
        )
        .await?;
    assert!(headers.contains("Saga-Error: invalid"), "{headers}");
    assert_eq!(
        stack.order(alice).await?["status"],
        "PENDING",
        "nothing changed"
    );

    // Alice's own token cancels her order, over HTTP; bob's over NATS.
    let (status, body) = cancel_as(alice, Some(alice_token)).await?;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("CANCELLED")),
        "{body}"
    );
    let (headers, reply) = cli
        .request(
            &subject,
            json!({"orderId": bob, "reason": "changed my mind", "cancelToken": bob_token})
                .to_string()
                .as_bytes(),
            Duration::from_secs(10),
        )
        .await?;
    assert!(!headers.contains("Saga-Error"), "{headers}");
    let reply: Value = serde_json::from_slice(&reply)?;
    assert_eq!(reply["status"], "CANCELLED", "{reply}");

    // A placement answered again for its Idempotency-Key carries a token
    // of its own, which cancels the same order.
    let body = saga_tests::order_body("alice", &[("widget", 1, 1_000)], "US");
    let mut tokens = Vec::new();
    let mut ids = Vec::new();
    for _ in 0..2 {
        let r = anonymous
            .post(stack.url("order", "/orders"))
            .header("Idempotency-Key", "k-1")
            .json(&body)
            .send()
            .await?;
        let reply: Value = r.json().await?;
        ids.push(reply["orderId"].clone());
        tokens.push(
            reply["cancelToken"]
                .as_str()
                .context("cancelToken")?
                .to_string(),
        );
    }
    assert_eq!(ids[0], ids[1]);
    assert_ne!(tokens[0], tokens[1]);
    let keyed: Uuid = ids[0].as_str().context("orderId")?.parse()?;
    let (status, body) = cancel_as(keyed, Some(tokens[1].clone())).await?;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("CANCELLED")),
        "{body}"
    );
    stack.start_service("shipping").await?;
    stack.settle().await?;
    assert_eq!(stack.shipments_created().await?, 0);
    stack.assert_invariants().await
}
