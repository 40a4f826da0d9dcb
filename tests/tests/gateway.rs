//! Money moves through the payment gateway. A charge it declines cancels
//! the saga; a refund it refuses is retried on its schedule (each attempt on
//! record in the timeline), then dead-lettered, which halts the saga; once
//! the operator has the gateway working again, `sagactl retry` finishes the
//! saga with exactly one refund.

use std::time::Duration;

use anyhow::Result;
use chrono::{DateTime, Utc};
use common::meter::names;
use payment::settings::Schedule;
use saga_tests::{
    DEADLINE, Stack, eventually,
    halted::{SCHEDULE_MS, halted_refund, refunds_refused_stack, timeline_until},
};
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_refund_is_retried_on_schedule_then_halts_the_saga_until_retried() -> Result<()> {
    let stack = refunds_refused_stack().await?;
    let (_, rules) = stack.get_json("payment", "/admin/gateway").await?;
    assert_eq!(rules["all"]["refunds"], "fail", "{rules}");
    // Out of stock: the charge must be refunded, and the gateway refuses.
    let (id, entries) = halted_refund(&stack).await?;
    assert_eq!(stack.order(id).await?["status"], "REQUIRES_INTERVENTION");
    assert_eq!(
        stack.balance("alice").await?,
        7_500,
        "charged, not refunded"
    );

    // Every attempt on record: the first and five retries, spaced by the schedule.
    let attempts: Vec<&Value> = entries
        .iter()
        .filter(|e| e["eventType"] == "PaymentRefundFailed")
        .collect();
    assert_eq!(attempts.len(), SCHEDULE_MS.len() + 1, "{entries:#?}");
    let at = |e: &Value| -> DateTime<Utc> { e["occurredAt"].as_str().unwrap().parse().unwrap() };
    for (n, pair) in attempts.windows(2).enumerate() {
        let gap = (at(pair[1]) - at(pair[0])).num_milliseconds();
        let delay = SCHEDULE_MS[n] as i64;
        assert!(
            gap >= delay && gap < delay + 2_000,
            "attempt {} came {gap} ms after the one before, not {delay} ms",
            n + 2
        );
        assert!(
            pair[1]["effect"]
                .as_str()
                .unwrap()
                .ends_with(&format!("(attempt {})", n + 2))
        );
    }
    assert!(
        attempts
            .iter()
            .all(|e| e["failure"] == true && e["service"] == "payment")
    );
    // Then the dead letter, and the halt.
    let tail: Vec<(&str, &str)> = entries
        .iter()
        .rev()
        .take(2)
        .map(|e| {
            (
                e["kind"].as_str().unwrap(),
                e["eventType"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        tail,
        [
            ("event", "OrderRequiresIntervention"),
            ("dead_letter", "InventoryReservationFailed")
        ]
    );
    let failed = stack.metrics("payment").await?.sum(
        names::COMPENSATIONS,
        &[("step", "payment"), ("result", "failed")],
    );
    assert_eq!(failed, (SCHEDULE_MS.len() + 1) as f64);

    // The operator repairs the gateway and retries the saga, which ends as
    // it would have.
    let (status, rules) = stack
        .put("payment", "/admin/gateway", serde_json::json!({}))
        .await?;
    assert_eq!(status, 200, "{rules}");
    let done = stack
        .sagactl(&format!(
            "retry {id} --note \"gateway back\" --operator ada"
        ))
        .await?;
    assert!(done.contains("redrove"), "{done}");
    let entries = timeline_until(&stack, id, "OrderCancelled").await?;
    assert_eq!(stack.order(id).await?["status"], "CANCELLED");
    stack.settle().await?;
    assert_eq!(stack.balance("alice").await?, 10_000);
    let refunds: Vec<&Value> = entries
        .iter()
        .filter(|e| e["eventType"] == "PaymentRefunded")
        .collect();
    assert_eq!(refunds.len(), 1, "{entries:#?}");
    // The redrive carries the saga's trace on to the refund it caused.
    assert!(entries[0]["traceId"].is_string(), "{entries:#?}");
    assert_eq!(refunds[0]["traceId"], entries[0]["traceId"], "{entries:#?}");
    assert!(entries.iter().any(|e| e["kind"] == "operator"));
    stack.assert_invariants().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_resolves_a_halted_refund_as_compensated_by_hand() -> Result<()> {
    let stack = refunds_refused_stack().await?;
    stack.set_stock("widget", 5).await?;
    let (confirmed, _) = stack
        .run_saga("alice", &[("widget", 1, 1_000)], "US")
        .await?;
    let (id, _) = halted_refund(&stack).await?;

    // Only an order that requires intervention can be resolved.
    let refused = stack
        .sagactl(&format!(
            "resolve {confirmed} --manually-compensated --note x --operator ada"
        ))
        .await
        .expect_err("a confirmed order is not resolved");
    assert!(format!("{refused:#}").contains("409"), "{refused:#}");

    let done = stack
        .sagactl(&format!(
            "resolve {id} --manually-compensated --note \"refunded in the gateway console\" --operator ada"
        ))
        .await?;
    assert!(done.contains("MANUALLY_COMPENSATED"), "{done}");
    let entries = timeline_until(&stack, id, "OrderManuallyCompensated").await?;
    let last = entries.last().unwrap();
    assert_eq!(last["reason"], "refunded in the gateway console");
    assert_eq!(last["effect"], "compensated by hand by ada");
    // Payment records the refund made by hand, without calling the gateway
    // (which still refuses refunds).
    eventually("the refund by hand to be recorded", DEADLINE, || async {
        Ok((stack.balance("alice").await? == 9_000).then_some(()))
    })
    .await?;
    assert_eq!(stack.order(id).await?["status"], "MANUALLY_COMPENSATED");
    let ended = stack
        .metrics_until("order", "the resolution to be counted", |m| {
            m.sum(names::SAGAS_ENDED, &[("outcome", "manually_compensated")]) == 1.0
        })
        .await?;
    assert_eq!(
        ended.sum(names::SAGAS_ENDED, &[("outcome", "intervention")]),
        1.0
    );

    // The refund request still in the dead-letter stream is refused: the
    // saga is settled. Forced now that the gateway works, it finds nothing
    // left to refund; a second resolution is refused.
    stack
        .put("payment", "/admin/gateway", serde_json::json!({}))
        .await?;
    let refused = stack
        .sagactl(&format!("retry {id} --note cleanup --operator ada"))
        .await
        .expect_err("a dead letter of a resolved saga is not redriven unforced");
    assert!(
        format!("{refused:#}").contains("has ended (MANUALLY_COMPENSATED)"),
        "{refused:#}"
    );
    stack
        .sagactl(&format!(
            "retry {id} --note cleanup --operator ada --force \"clearing the dead-letter stream\""
        ))
        .await?;
    stack.settle().await?;
    assert_eq!(stack.balance("alice").await?, 9_000);
    let types = stack.saga_event_types(id).await?;
    assert!(!types.iter().any(|t| t == "PaymentRefunded"), "{types:?}");
    let again = stack
        .sagactl(&format!(
            "resolve {id} --manually-compensated --note again --operator ada"
        ))
        .await
        .expect_err("resolved once");
    assert!(
        format!("{again:#}").contains("MANUALLY_COMPENSATED"),
        "{again:#}"
    );
    stack.assert_invariants().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_charge_the_gateway_declines_cancels_only_that_customers_saga() -> Result<()> {
    let mut stack = Stack::start_with(&["order", "inventory", "shipping"]).await?;
    stack
        .start_service_with("payment", |l| {
            l.payment.gateway_rules = Some(r#"{"customers": {"bob": {"charges": "fail"}}}"#.into());
        })
        .await?;
    stack.set_balance("alice", 10_000).await?;
    stack.set_balance("bob", 10_000).await?;
    stack.set_stock("widget", 5).await?;
    let (_, bob) = stack.run_saga("bob", &[("widget", 1, 1_000)], "US").await?;
    assert_eq!(bob["status"], "CANCELLED");
    assert!(
        bob["failureReason"]
            .as_str()
            .unwrap_or_default()
            .contains("payment declined by the gateway"),
        "{bob}"
    );
    let (_, alice) = stack
        .run_saga("alice", &[("widget", 1, 1_000)], "US")
        .await?;
    assert_eq!(alice["status"], "CONFIRMED");
    assert_eq!(stack.balance("bob").await?, 10_000);
    assert_eq!(stack.balance("alice").await?, 9_000);
    stack.assert_invariants().await
}

/// A charge whose answer the gateway lost may have gone through; the
/// customer's cancel, arriving while payment waits to ask again, voids the
/// payment id, so the money comes back although no charge was ever
/// recorded, and the charge is not made again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_voids_a_charge_whose_answer_was_lost() -> Result<()> {
    let mut stack = Stack::start_with(&["order", "inventory", "shipping"]).await?;
    stack
        .start_service_with("payment", |l| {
            l.payment.gateway_rules = Some(r#"{"customers": {"bob": {"charges": "lost"}}}"#.into());
            l.payment.gateway_timeout = Duration::from_millis(200);
            // Payment asks again only after the cancel is in.
            l.payment.refund_retries = Schedule(vec![Duration::from_secs(3); 3]);
        })
        .await?;
    stack.set_balance("bob", 10_000).await?;
    stack.set_stock("widget", 5).await?;
    let id = stack.place("bob", &[("widget", 2, 1_500)], "US").await?;
    let payment = payment::gateway::payment_id(id);
    let at_gateway = format!("/admin/gateway/payments/{payment}");
    eventually("the gateway to carry the charge out", DEADLINE, || async {
        let (_, record) = stack.get_json("payment", &at_gateway).await?;
        Ok((record["charged"] == 3_000).then_some(()))
    })
    .await?;
    assert_eq!(stack.balance("bob").await?, 10_000, "no charge recorded");

    let (status, _, reply) = stack
        .call(
            reqwest::Method::POST,
            "order",
            &format!("/orders/{id}/cancel"),
            Some(serde_json::json!({"reason": "changed my mind"})),
            None,
        )
        .await?;
    assert_eq!(status, 200, "{reply}");
    let record = eventually("the payment id to be voided", DEADLINE, || async {
        let (_, record) = stack.get_json("payment", &at_gateway).await?;
        Ok((record["refunded"] == 3_000).then_some(record))
    })
    .await?;
    assert_eq!(record["voided"], true, "{record}");

    // Payment's next attempt finds the cancel and charges nothing.
    eventually("payment to give up on the charge", DEADLINE, || async {
        let (_, record) = stack.get_json("payment", &at_gateway).await?;
        let settled = stack.is_settled().await? && record["charged"] == 3_000;
        Ok(settled.then_some(()))
    })
    .await?;
    stack.settle().await?;
    assert_eq!(stack.order(id).await?["status"], "CANCELLED");
    assert_eq!(stack.balance("bob").await?, 10_000);
    let types = stack.saga_event_types(id).await?;
    assert!(!types.iter().any(|t| t == "PaymentProcessed"), "{types:?}");
    stack.assert_invariants().await
}
