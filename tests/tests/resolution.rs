//! A resolution closes a saga for good. An operator who resolved a halted
//! saga as compensated by hand ("never charged", "stock put back") has
//! settled it: every service treats the resolution as a cancel of every
//! step it has not taken, and a dead letter of the saga redriven later —
//! refused unless forced with a reason, which the audit keeps — charges,
//! reserves and ships nothing.

use std::time::Duration;

use anyhow::Result;
use payment::settings::Schedule;
use saga_tests::{DEADLINE, Stack, eventually};
use serde_json::Value;
use uuid::Uuid;

/// The timeline of saga `id` once it shows the halt and its dead letter.
async fn halted(stack: &Stack, id: Uuid) -> Result<Vec<Value>> {
    eventually(
        &format!("saga {id} halted by a dead letter"),
        DEADLINE,
        || async {
            let (_, story) = stack.get_json("order", &format!("/sagas/{id}")).await?;
            let entries = story["timeline"].as_array().cloned().unwrap_or_default();
            let halted = entries
                .iter()
                .any(|e| e["eventType"] == "OrderRequiresIntervention")
                && entries.iter().any(|e| e["kind"] == "dead_letter");
            Ok(halted.then_some(entries))
        },
    )
    .await
}

/// Resolves `id` as compensated by hand, and waits until every consumer
/// has taken the resolution in.
async fn resolve(stack: &Stack, id: Uuid, note: &str) -> Result<()> {
    let done = stack
        .sagactl(&format!(
            "resolve {id} --manually-compensated --note \"{note}\" --operator ada"
        ))
        .await?;
    assert!(done.contains("MANUALLY_COMPENSATED"), "{done}");
    stack.settle().await
}

/// Redrives every dead letter of saga `id` the way `sagactl retry` does,
/// without forcing: each must be refused because the saga has ended.
async fn retry_is_refused(stack: &Stack, id: Uuid) -> Result<()> {
    let refused = stack
        .sagactl(&format!(
            "retry {id} --note \"gateway back\" --operator ada"
        ))
        .await;
    let said = match refused {
        Ok(printed) => printed,
        Err(e) => format!("{e:#}"),
    };
    assert!(
        said.contains("refused") && said.contains("has ended (MANUALLY_COMPENSATED)"),
        "a dead letter of a resolved saga is refused: {said}"
    );
    assert!(!said.contains("redrove"), "{said}");
    Ok(())
}

/// The forced redrive is on record in the saga's timeline, with its reason.
async fn forced_redrive_on_record(stack: &Stack, id: Uuid, why: &str) -> Result<()> {
    eventually("the forced redrive in the timeline", DEADLINE, || async {
        let (_, story) = stack.get_json("order", &format!("/sagas/{id}")).await?;
        let forced = story["timeline"].as_array().is_some_and(|entries| {
            entries.iter().any(|e| {
                e["kind"] == "operator"
                    && e["effect"].as_str().is_some_and(|effect| {
                        effect.contains("forced past the saga's end (MANUALLY_COMPENSATED)")
                            && effect.contains(why)
                    })
            })
        });
        Ok(forced.then_some(()))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_charge_redriven_after_the_saga_was_resolved_moves_no_money_or_goods() -> Result<()> {
    // Carol's charges time out at the gateway: payment tries three times,
    // then dead-letters her OrderPlaced, which halts the saga.
    let mut stack = Stack::start_with(&["order", "inventory", "shipping"]).await?;
    stack
        .start_service_with("payment", |l| {
            l.payment.gateway_rules =
                Some(r#"{"customers": {"carol": {"charges": "timeout"}}}"#.into());
            l.payment.gateway_timeout = Duration::from_millis(200);
            l.payment.refund_retries =
                Schedule(vec![Duration::from_millis(100), Duration::from_millis(200)]);
        })
        .await?;
    stack.set_balance("carol", 10_000).await?;
    stack.set_stock("widget", 5).await?;
    let id = stack.place("carol", &[("widget", 2, 1_250)], "US").await?;
    halted(&stack, id).await?;
    assert_eq!(stack.order(id).await?["status"], "REQUIRES_INTERVENTION");

    // The operator settles it: never charged.
    resolve(&stack, id, "never charged: the gateway was down").await?;

    // The gateway recovers; a plain retry of the saga is refused.
    let (status, _) = stack
        .put("payment", "/admin/gateway", serde_json::json!({}))
        .await?;
    assert_eq!(status, 200);
    retry_is_refused(&stack, id).await?;

    // Forced, with a reason: published and audited, and still nothing moves.
    let printed = stack
        .sagactl(&format!(
            "retry {id} --note \"gateway back\" --operator ada --force \"the customer asked to see it\""
        ))
        .await?;
    assert!(printed.contains("redrove"), "{printed}");
    forced_redrive_on_record(&stack, id, "the customer asked to see it").await?;
    stack.settle().await?;

    assert_eq!(stack.balance("carol").await?, 10_000, "never charged");
    assert_eq!(stack.stock("widget").await?, (5, 0), "nothing reserved");
    assert_eq!(stack.shipments_created().await?, 0, "nothing shipped");
    assert_eq!(stack.order(id).await?["status"], "MANUALLY_COMPENSATED");
    let types = stack.saga_event_types(id).await?;
    for moved in ["PaymentProcessed", "InventoryReserved", "ShipmentCreated"] {
        assert!(!types.iter().any(|t| t == moved), "{moved} in {types:?}");
    }
    stack.assert_invariants().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reservation_redriven_after_the_saga_was_resolved_ships_nothing() -> Result<()> {
    // Shipping cannot store this one shipment (a value its table refuses:
    // a permanent failure), and dead-letters the InventoryReserved.
    let stack = Stack::stocked(10_000, 5).await?;
    sqlx::query(
        "ALTER TABLE shipments ADD CONSTRAINT refuses_poison CHECK (address->>'name' <> 'Poison')",
    )
    .execute(&stack.pool("shipping").await?)
    .await?;
    let mut order = saga_tests::order_body("alice", &[("widget", 2, 1_000)], "US");
    order["shippingAddress"]["name"] = "Poison".into();
    let id = stack.place_order(&order).await?;
    halted(&stack, id).await?;
    assert_eq!(stack.balance("alice").await?, 8_000, "charged");
    assert_eq!(stack.stock("widget").await?.1, 2, "reserved");

    // The operator refunded and put the stock back by hand.
    resolve(&stack, id, "refunded in the console, stock counted back").await?;
    eventually("the resolution to be recorded", DEADLINE, || async {
        let settled =
            stack.balance("alice").await? == 10_000 && stack.stock("widget").await? == (5, 0);
        Ok(settled.then_some(()))
    })
    .await?;

    // Shipping could store it now; a plain redrive is still refused.
    sqlx::query("ALTER TABLE shipments DROP CONSTRAINT refuses_poison")
        .execute(&stack.pool("shipping").await?)
        .await?;
    retry_is_refused(&stack, id).await?;
    let printed = stack
        .sagactl(&format!(
            "retry {id} --note \"shipping fixed\" --operator ada --force \"checking it ships nothing\""
        ))
        .await?;
    assert!(printed.contains("redrove"), "{printed}");
    forced_redrive_on_record(&stack, id, "checking it ships nothing").await?;
    stack.settle().await?;

    assert_eq!(stack.shipments_created().await?, 0, "nothing shipped");
    assert_eq!(stack.balance("alice").await?, 10_000);
    assert_eq!(stack.stock("widget").await?, (5, 0));
    assert_eq!(stack.order(id).await?["status"], "MANUALLY_COMPENSATED");
    stack.assert_invariants().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrected_body_keeps_the_dead_letters_event_id_type_and_saga() -> Result<()> {
    let stack = Stack::stocked(10_000, 5).await?;
    sqlx::query(
        "ALTER TABLE shipments ADD CONSTRAINT refuses_poison CHECK (address->>'name' <> 'Poison')",
    )
    .execute(&stack.pool("shipping").await?)
    .await?;
    let mut order = saga_tests::order_body("alice", &[("widget", 1, 1_000)], "US");
    order["shippingAddress"]["name"] = "Poison".into();
    let id = stack.place_order(&order).await?;
    halted(&stack, id).await?;
    let letters = stack.dead_letter_messages().await?;
    let (_, body) = letters
        .iter()
        .find(|(h, _)| {
            h.get("Saga-Dlq-Event-Type")
                .is_some_and(|t| t.as_str() == "InventoryReserved")
        })
        .expect("shipping's dead letter");
    let original: Value = serde_json::from_slice(body)?;
    let seq: u64 = stack
        .sagactl("dlq list --consumer shipping")
        .await?
        .lines()
        .find_map(|l| l.split_whitespace().next()?.parse().ok())
        .expect("a listed dead letter");

    let other = stack.place("alice", &[("widget", 1, 1_000)], "US").await?;
    stack.wait_for_outcome(other).await?;
    let changed = |edit: &dyn Fn(&mut Value)| {
        let mut v = original.clone();
        edit(&mut v);
        v
    };
    let forged = [
        (
            changed(&|v| v["eventId"] = Uuid::new_v4().to_string().into()),
            "event id",
        ),
        (
            changed(&|v| {
                v["eventType"] = "ShipmentFailed".into();
                v["aggregateType"] = "shipping".into();
                v["payload"] = serde_json::json!({"orderId": id, "reason": "forged"});
            }),
            "event type",
        ),
        (
            changed(&|v| {
                v["metadata"]["correlationId"] = other.to_string().into();
                v["aggregateId"] = other.to_string().into();
                v["payload"]["orderId"] = other.to_string().into();
            }),
            "saga",
        ),
    ];
    let dir = std::env::temp_dir().join(format!("corrected-{}", Uuid::now_v7()));
    std::fs::create_dir_all(&dir)?;
    for (i, (body, what)) in forged.iter().enumerate() {
        let file = dir.join(format!("{i}.json"));
        std::fs::write(&file, serde_json::to_vec(body)?)?;
        let printed = stack
            .sagactl(&format!(
                "dlq redrive --seq {seq} --body {} --note x --operator ada",
                file.display()
            ))
            .await;
        let said = match printed {
            Ok(p) => p,
            Err(e) => format!("{e:#}"),
        };
        assert!(
            said.contains("refused")
                && said.contains(&format!("must keep the dead letter's {what}")),
            "{what}: {said}"
        );
    }
    std::fs::remove_dir_all(&dir)?;
    // Nothing was published: the other saga and this one are as they were.
    stack.settle().await?;
    assert_eq!(stack.order(other).await?["status"], "CONFIRMED");
    assert_eq!(stack.order(id).await?["status"], "REQUIRES_INTERVENTION");
    assert_eq!(stack.dead_letter_messages().await?.len(), letters.len());
    Ok(())
}
