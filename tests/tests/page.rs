//! The saga page in a real browser (headless Chromium): the list with its
//! filters, and the timelines of a happy, a compensated and an
//! intervention saga, lane by lane, compensations marked going backwards
//! and failures in red.

use anyhow::Result;
use common::{
    Envelope, Event, EventKind,
    event::{ShipmentCreated, ShipmentFailed},
};
use saga_tests::{DEADLINE, Stack, eventually};
use uuid::Uuid;

/// The timeline cards of a rendered saga page: (event type, lane, classes).
fn cards(dom: &str) -> Vec<(String, String, String)> {
    dom.split("<div class=\"entry ")
        .skip(1)
        .map(|rest| {
            let tag = &rest[..rest.find('>').unwrap_or(rest.len())];
            let classes = tag.split('"').next().unwrap_or_default().to_string();
            (attr(tag, "data-type"), attr(tag, "data-service"), classes)
        })
        .collect()
}

fn attr(tag: &str, name: &str) -> String {
    tag.split(&format!("{name}=\""))
        .nth(1)
        .and_then(|v| v.split('"').next())
        .unwrap_or_default()
        .to_string()
}

/// The sagas a rendered list shows, in order.
fn listed(dom: &str) -> Vec<String> {
    dom.split("<tr class=\"saga\" data-id=\"")
        .skip(1)
        .map(|rest| rest.split('"').next().unwrap_or_default().to_string())
        .collect()
}

/// The status shown in a saga page's summary.
fn shown_status(dom: &str) -> String {
    let summary = dom.split("id=\"summary\"").nth(1).unwrap_or_default();
    attr(summary, "data-status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_a_happy_a_compensated_and_an_intervention_saga() -> Result<()> {
    let stack = Stack::stocked(10_000, 5).await?;
    let (happy, order) = stack
        .run_saga("alice", &[("widget", 1, 1_250)], "US")
        .await?;
    assert_eq!(order["status"], "CONFIRMED");
    let (compensated, order) = stack.run_saga("alice", &[("widget", 50, 10)], "US").await?;
    assert_eq!(order["status"], "CANCELLED");
    // Declined (bob has no account), then a shipment appears for it: a
    // contradiction only a person can resolve.
    let (contradicted, _) = stack.run_saga("bob", &[("widget", 1, 100)], "US").await?;
    let shipment = Event::ShipmentCreated(ShipmentCreated {
        order_id: contradicted,
        shipment_id: Uuid::now_v7(),
        tracking_number: "TRK-1".into(),
    });
    let envelope = Envelope::new(
        &shipment,
        Uuid::now_v7().to_string(),
        1,
        contradicted,
        Uuid::now_v7(),
    );
    stack
        .publish(
            &stack.subjects.event(EventKind::ShipmentCreated),
            envelope.to_bytes(),
        )
        .await?;
    eventually("the intervention in the timeline", DEADLINE, || async {
        let (_, story) = stack
            .get_json("order", &format!("/sagas/{contradicted}"))
            .await?;
        Ok((story["lastEventType"] == "OrderRequiresIntervention").then_some(()))
    })
    .await?;

    let dom = stack.browse(&format!("/ui?saga={happy}")).await?;
    assert_eq!(shown_status(&dom), "CONFIRMED");
    let happy_path = [
        ("OrderPlaced", "order"),
        ("PaymentProcessed", "payment"),
        ("InventoryReserved", "inventory"),
        ("ShipmentCreated", "shipping"),
        ("OrderConfirmed", "order"),
    ];
    let seen = cards(&dom);
    let lanes: Vec<(&str, &str)> = seen
        .iter()
        .map(|(t, l, _)| (t.as_str(), l.as_str()))
        .collect();
    assert_eq!(lanes, happy_path);
    assert!(
        seen.iter()
            .all(|(_, _, c)| !c.contains("failure") && !c.contains("compensation")),
        "{seen:?}"
    );

    let dom = stack.browse(&format!("/ui?saga={compensated}")).await?;
    assert_eq!(shown_status(&dom), "CANCELLED");
    let seen = cards(&dom);
    let types: Vec<&str> = seen.iter().map(|(t, _, _)| t.as_str()).collect();
    assert_eq!(
        types,
        [
            "OrderPlaced",
            "PaymentProcessed",
            "InventoryReservationFailed",
            "PaymentRefunded",
            "OrderCancelled"
        ]
    );
    assert!(
        seen[2].2.contains("failure") && seen[2].1 == "inventory",
        "{seen:?}"
    );
    assert!(
        seen[3].2.contains("compensation") && seen[3].1 == "payment",
        "{seen:?}"
    );
    assert!(
        dom.contains("← undo"),
        "the refund is drawn going backwards"
    );

    let dom = stack.browse(&format!("/ui?saga={contradicted}")).await?;
    assert_eq!(shown_status(&dom), "REQUIRES_INTERVENTION");
    let seen = cards(&dom);
    let last = seen.last().expect("cards");
    assert_eq!(
        (last.0.as_str(), last.1.as_str()),
        ("OrderRequiresIntervention", "order")
    );
    assert!(last.2.contains("failure"), "{seen:?}");
    assert!(
        seen.iter()
            .any(|(t, l, _)| t == "ShipmentCreated" && l == "shipping"),
        "{seen:?}"
    );
    assert!(
        dom.contains("was created for an order already cancelled"),
        "the reason is shown"
    );

    // The list, newest activity first, and its filters.
    let all = listed(&stack.browse("/ui").await?);
    assert_eq!(all.len(), 3, "{all:?}");
    for id in [happy, compensated, contradicted] {
        assert!(all.contains(&id.to_string()), "{id} in {all:?}");
    }
    let halted = listed(&stack.browse("/ui?status=REQUIRES_INTERVENTION").await?);
    assert_eq!(halted, [contradicted.to_string()]);
    let stalled = stack.browse("/ui?stalled=true").await?;
    assert!(listed(&stalled).is_empty() && stalled.contains("no saga matches"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_text_is_shown_as_text_never_run_as_markup() -> Result<()> {
    // An operator's hand-published ShipmentFailed whose reason is markup.
    let (stack, id) = Stack::waiting_for_shipping().await?;
    let markup = "<img src=x onerror=\"document.body.dataset.owned=1\">";
    let failed = Event::ShipmentFailed(ShipmentFailed {
        order_id: id,
        reason: markup.into(),
    });
    let envelope = Envelope::new(&failed, id.to_string(), 1, id, Uuid::now_v7());
    stack
        .publish(
            &stack.subjects.event(EventKind::ShipmentFailed),
            envelope.to_bytes(),
        )
        .await?;
    assert_eq!(stack.wait_for_outcome(id).await?["status"], "CANCELLED");
    eventually("the cancellation in the timeline", DEADLINE, || async {
        let (_, story) = stack.get_json("order", &format!("/sagas/{id}")).await?;
        Ok((story["lastEventType"] == "OrderCancelled").then_some(()))
    })
    .await?;
    let dom = stack.browse(&format!("/ui?saga={id}")).await?;
    assert!(!dom.contains("<img"), "an element was made of event text");
    assert!(!dom.contains("data-owned"), "the markup ran");
    assert!(
        dom.contains("&lt;img src=x onerror="),
        "shown as text: {dom}"
    );
    Ok(())
}
