//! A saga halted in REQUIRES_INTERVENTION with a dead letter, the way it
//! happens in production: the payment gateway refuses a refund on every
//! attempt of its schedule, the refund is dead-lettered, the saga halts.
//! The gateway and page tests start from here.

use std::time::Duration;

use anyhow::Result;
use payment::settings::Schedule;
use serde_json::Value;
use uuid::Uuid;

use crate::{DEADLINE, Launch, Stack, eventually, order_body};

/// The refund schedule of these tests: the shipped one (1, 2, 4, 8, 16 s)
/// divided by ten.
pub const SCHEDULE_MS: [u64; 5] = [100, 200, 400, 800, 1_600];

/// A payment service whose gateway refuses refunds, on `SCHEDULE_MS`.
fn refunds_refused(l: &mut Launch) {
    l.payment.gateway_rules = Some(r#"{"all": {"refunds": "fail"}}"#.into());
    l.payment.refund_retries = Schedule(SCHEDULE_MS.map(Duration::from_millis).to_vec());
}

/// A stack whose gateway refuses refunds; alice has 10 000, and product
/// `rare` no stock (an order of it is charged, then refunded).
pub async fn refunds_refused_stack() -> Result<Stack> {
    let mut stack = Stack::start_with(&["order", "inventory", "shipping"]).await?;
    stack.start_service_with("payment", refunds_refused).await?;
    stack.set_balance("alice", 10_000).await?;
    stack.set_stock("rare", 0).await?;
    Ok(stack)
}

/// [`refunds_refused_stack`] with the operator console beside it, the
/// order service's page sending its actions there.
pub async fn refunds_refused_stack_with_console() -> Result<(Stack, crate::console::Console)> {
    let at = crate::console::reserve().await?;
    let mut stack = Stack::start_with(&["inventory", "shipping"]).await?;
    let url = at.url.clone();
    stack
        .start_service_with("order", |l| l.order.operator_console_url = Some(url))
        .await?;
    stack.start_service_with("payment", refunds_refused).await?;
    stack.set_balance("alice", 10_000).await?;
    stack.set_stock("rare", 0).await?;
    let console = stack.start_console(at).await?;
    Ok((stack, console))
}

/// Alice's order of `rare` (2 500), charged and then not refunded: its id
/// and timeline once the saga is halted.
/// The halt and the dead letter that caused it are recorded by two
/// watches, in either order: the timeline is read once it has both.
pub async fn halted_refund(stack: &Stack) -> Result<(Uuid, Vec<Value>)> {
    let order = order_body("alice", &[("rare", 1, 2_500)], "US");
    let id = stack.place_order(&order).await?;
    let entries = timeline_where(
        stack,
        id,
        "the halt and its dead letter in the timeline",
        |entries| {
            entries
                .last()
                .is_some_and(|e| e["eventType"] == "OrderRequiresIntervention")
                && entries.iter().any(|e| e["kind"] == "dead_letter")
        },
    )
    .await?;
    Ok((id, entries))
}

/// The timeline of saga `id` once its last entry is a `last`.
pub async fn timeline_until(stack: &Stack, id: Uuid, last: &str) -> Result<Vec<Value>> {
    timeline_where(stack, id, &format!("{last} in the timeline"), |entries| {
        entries.last().is_some_and(|e| e["eventType"] == last)
    })
    .await
}

/// The timeline of saga `id` once `done` holds for its entries.
pub async fn timeline_where(
    stack: &Stack,
    id: Uuid,
    what: &str,
    done: impl Fn(&[Value]) -> bool,
) -> Result<Vec<Value>> {
    eventually(&format!("{what} of {id}"), DEADLINE, || async {
        let (_, story) = stack.get_json("order", &format!("/sagas/{id}")).await?;
        let entries = story["timeline"].as_array().cloned().unwrap_or_default();
        Ok(done(&entries).then_some(entries))
    })
    .await
}
