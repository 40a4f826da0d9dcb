//! The saga page in a real browser (headless Chromium): the list with its
//! filters, and the timelines of a happy, a declined, an out-of-stock, an
//! undeliverable and an intervention saga exactly as the API tells them,
//! lane by lane, compensations marked going backwards and failures in red.

use anyhow::Result;
use common::{
    Envelope, Event, EventKind,
    event::{ShipmentCreated, ShipmentFailed},
};
use saga_tests::{DEADLINE, EachKind, Stack, UNDELIVERABLE_SERVICES, eventually};
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

/// What the page must show of a saga, from the JSON it reads: each entry's
/// type, lane, and whether it is drawn as a compensation or a failure.
async fn expected(stack: &Stack, id: Uuid) -> Result<(String, Vec<(String, String, bool, bool)>)> {
    let (_, story) = stack.get_json("order", &format!("/sagas/{id}")).await?;
    let entries = story["timeline"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            let text = |k: &str| e[k].as_str().unwrap_or_default().to_string();
            (
                text("eventType"),
                text("service"),
                e["compensation"] == true,
                e["failure"] == true,
            )
        })
        .collect();
    Ok((
        story["status"].as_str().unwrap_or_default().to_string(),
        entries,
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_every_kind_of_saga_as_its_timeline_tells_it() -> Result<()> {
    let (stack, each) = Stack::one_saga_of_each_kind(1_250).await?;
    let EachKind {
        happy,
        declined,
        out_of_stock,
        undeliverable,
    } = each;
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

    let cases = [
        (happy, "CONFIRMED", "OrderConfirmed"),
        (declined, "CANCELLED", "OrderCancelled"),
        (out_of_stock, "CANCELLED", "OrderCancelled"),
        (undeliverable, "CANCELLED", "OrderCancelled"),
        (
            contradicted,
            "REQUIRES_INTERVENTION",
            "OrderRequiresIntervention",
        ),
    ];
    for (id, status, last) in cases {
        let (api_status, entries) =
            eventually(&format!("{id} to end with {last}"), DEADLINE, || async {
                let (status, entries) = expected(&stack, id).await?;
                Ok((entries.last().is_some_and(|e| e.0 == last)).then_some((status, entries)))
            })
            .await?;
        assert_eq!(api_status, status);
        let dom = stack.browse(&format!("/ui?saga={id}")).await?;
        assert_eq!(shown_status(&dom), status, "{id}");
        let drawn: Vec<(String, String, bool, bool)> = cards(&dom)
            .into_iter()
            .map(|(t, lane, classes)| {
                let class = |c: &str| classes.split(' ').any(|x| x == c);
                (t, lane, class("compensation"), class("failure"))
            })
            .collect();
        assert_eq!(
            drawn, entries,
            "the page shows saga {id} as its timeline tells it"
        );
    }

    // The happy path runs forward through the four lanes; the undeliverable
    // order's compensations run back, marked; the contradiction is red.
    let lanes = |dom: &str| {
        cards(dom)
            .into_iter()
            .map(|(_, l, _)| l)
            .collect::<Vec<_>>()
    };
    let dom = stack.browse(&format!("/ui?saga={happy}")).await?;
    assert_eq!(
        lanes(&dom),
        ["order", "payment", "inventory", "shipping", "order"]
    );
    let undo = "<span class=\"dir\">← undo</span>";
    assert!(!dom.contains(undo), "nothing goes backwards");
    let dom = stack.browse(&format!("/ui?saga={undeliverable}")).await?;
    assert_eq!(lanes(&dom), UNDELIVERABLE_SERVICES);
    assert_eq!(
        dom.matches(undo).count(),
        2,
        "release and refund go backwards"
    );
    let dom = stack.browse(&format!("/ui?saga={contradicted}")).await?;
    assert!(
        dom.contains("was created for an order already cancelled"),
        "the reason is shown"
    );

    // The list and its filters.
    let all = listed(&stack.browse("/ui").await?);
    assert_eq!(all.len(), cases.len(), "{all:?}");
    for (id, ..) in cases {
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

/// The sagas are the operator's: without the operator token the page shows
/// its sign-in form and no saga, and the JSON behind it answers 401.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_asks_for_the_operator_token_and_shows_nothing_without_it() -> Result<()> {
    let stack = Stack::stocked(10_000, 5).await?;
    let (id, _) = stack
        .run_saga("alice", &[("widget", 1, 1_000)], "US")
        .await?;
    let signed_in = stack.browse("/ui").await?;
    assert!(signed_in.contains(&id.to_string()), "{signed_in}");

    for (token, says) in [
        (None, "sign in with the operator token"),
        (Some("not-the-token-at-all"), "wrong admin token"),
    ] {
        for path in ["/ui".to_string(), format!("/ui?saga={id}")] {
            let dom = stack.browse_as(&path, token, "signin").await?;
            assert!(dom.contains("id=\"signin\""), "{path}: {dom}");
            assert!(dom.contains(says), "{path} with {token:?}: {dom}");
            assert!(
                !dom.contains(&id.to_string()),
                "{path} shows the saga: {dom}"
            );
        }
    }
    let anonymous = reqwest::Client::new();
    for path in [
        "/sagas".to_string(),
        format!("/sagas/{id}"),
        "/orders?customerId=alice".into(),
    ] {
        let r = anonymous.get(stack.url("order", &path)).send().await?;
        assert_eq!(r.status().as_u16(), 401, "GET {path}");
    }
    Ok(())
}
