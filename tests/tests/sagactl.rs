//! `sagactl` against a live stack: dead letters listed with their reasons,
//! shown, redriven (a correctable one completes its saga, an applied one
//! changes nothing, a dry run changes nothing), each redrive audited in the
//! saga's timeline.

use anyhow::Result;
use common::{Envelope, Event, EventKind, event::ShipmentFailed};
use saga_tests::{DEADLINE, Stack, eventually};
use serde_json::Value;
use uuid::Uuid;

/// The ShipmentFailed an operator publishes by hand for order `id`.
fn shipment_failed(id: Uuid) -> Envelope {
    let event = Event::ShipmentFailed(ShipmentFailed {
        order_id: id,
        reason: "courier strike".into(),
    });
    Envelope::new(&event, id.to_string(), 1, id, Uuid::now_v7())
}

/// Publishes order `id`'s ShipmentFailed by hand without its reason, and
/// waits for it to be dead-lettered.
async fn publish_without_its_reason(stack: &Stack, id: Uuid) -> Result<()> {
    let mut broken: Value = serde_json::from_slice(&shipment_failed(id).to_bytes())?;
    broken["payload"]
        .as_object_mut()
        .expect("payload")
        .remove("reason");
    stack
        .publish(
            &stack.subjects.event(EventKind::ShipmentFailed),
            serde_json::to_vec(&broken)?,
        )
        .await?;
    stack.wait_for_dead_letters(1).await?;
    Ok(())
}

async fn status_becomes(stack: &Stack, id: Uuid, status: &str) -> Result<Value> {
    eventually(&format!("order {id} to be {status}"), DEADLINE, || async {
        let order = stack.order(id).await?;
        Ok((order["status"] == status).then_some(order))
    })
    .await
}

/// `sagactl saga` once the saga's timeline shows it ended with `last`.
async fn story(stack: &Stack, id: Uuid, last: &str) -> Result<String> {
    eventually(&format!("{last} in the timeline"), DEADLINE, || async {
        let story = stack.sagactl(&format!("saga {id}")).await?;
        Ok(story.contains(last).then_some(story))
    })
    .await
}

/// A dry run changed nothing: the one dead letter is there, the order as it was.
async fn nothing_changed(stack: &Stack, id: Uuid, status: &str) -> Result<()> {
    assert_eq!(stack.dead_letter_messages().await?.len(), 1);
    assert_eq!(stack.order(id).await?["status"], status);
    Ok(())
}

/// alice has her money back and the widgets are on the shelf: the saga
/// was compensated, once.
async fn compensated_once(stack: &Stack) -> Result<()> {
    assert_eq!(stack.balance("alice").await?, 10_000);
    assert_eq!(stack.stock("widget").await?, (5, 0));
    Ok(())
}

/// The sequence in the first data row of `sagactl dlq list`.
fn first_seq(listing: &str) -> Result<String> {
    let row = listing.lines().nth(1).unwrap_or_default();
    let seq = row.split_whitespace().next().unwrap_or_default();
    anyhow::ensure!(
        seq.parse::<u64>().is_ok(),
        "no dead letter listed:\n{listing}"
    );
    Ok(seq.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_event_is_listed_refused_as_it_is_and_redriven_once_corrected() -> Result<()> {
    let (stack, id) = Stack::waiting_for_shipping().await?;
    // The operator's hand-published ShipmentFailed lacks its reason.
    let good = shipment_failed(id);
    publish_without_its_reason(&stack, id).await?;

    let listing = stack.sagactl("dlq list").await?;
    let seq = first_seq(&listing)?;
    assert!(listing.contains("inventory"), "{listing}");
    assert!(listing.contains("(not an event)"), "{listing}");
    assert!(listing.contains("missing field `reason`"), "{listing}");
    assert!(listing.ends_with("1 of 1 dead letter(s)\n"), "{listing}");
    let none = stack.sagactl("dlq list --consumer payment").await?;
    assert!(none.ends_with("0 of 0 dead letter(s)\n"), "{none}");
    let shown = stack.sagactl(&format!("dlq show {seq}")).await?;
    assert!(
        shown.contains("reason: ") && shown.contains("missing field"),
        "{shown}"
    );
    assert!(shown.contains("Saga-Dlq-Consumer: inventory"), "{shown}");
    assert!(
        shown.contains(&id.to_string()),
        "the body, pretty-printed: {shown}"
    );

    // As it is, it cannot be redriven: the operator is told how.
    let refused = stack
        .sagactl(&format!("dlq redrive --seq {seq} --note retry"))
        .await
        .expect_err("bytes that are not an event are refused");
    let why = format!("{refused:#}");
    assert!(
        why.contains("not an event") && why.contains("--body"),
        "{why}"
    );

    // Corrected: a dry run says what it would do and does nothing...
    let fixed = tempfile(&good.to_bytes())?;
    let dry = stack
        .sagactl(&format!("dlq redrive --seq {seq} --body {fixed} --dry-run"))
        .await?;
    assert!(
        dry.contains(&format!("would redrive {seq}: ShipmentFailed")),
        "{dry}"
    );
    nothing_changed(&stack, id, "PENDING").await?;

    // ...and the redrive compensates the saga, once, and leaves an audit record.
    let done = stack
        .sagactl(&format!("dlq redrive --seq {seq} --body {fixed} --note \"added the missing reason\" --operator ada"))
        .await?;
    assert!(
        done.contains(&format!("redrove {seq}: ShipmentFailed")),
        "{done}"
    );
    let order = status_becomes(&stack, id, "CANCELLED").await?;
    assert_eq!(order["failureReason"], "courier strike");
    stack.settle().await?;
    assert!(stack.dead_letter_messages().await?.is_empty());
    compensated_once(&stack).await?;

    let story = story(&stack, id, "OrderCancelled").await?;
    assert!(
        story.starts_with(&format!("saga {id}: CANCELLED")),
        "{story}"
    );
    let audit = story
        .lines()
        .find(|l| l.contains("op operator"))
        .unwrap_or_else(|| panic!("no operator entry:\n{story}"));
    assert!(
        audit.contains("dlq-redrive") && audit.contains("by ada"),
        "{audit}"
    );
    assert!(audit.contains("(added the missing reason)"), "{audit}");
    // The malformed bytes named no saga: their dead letter is in no timeline.
    assert!(!story.contains("xx "), "{story}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_halted_saga_completes_when_its_dead_letter_is_redriven_and_a_second_redrive_changes_nothing()
-> Result<()> {
    let (stack, id) = Stack::waiting_for_shipping().await?;
    // A valid ShipmentFailed, published on the wrong subject: the order
    // service's consumer refuses it, and the saga is halted.
    let event = shipment_failed(id);
    stack
        .publish(
            &stack.subjects.event(EventKind::ShipmentCreated),
            event.to_bytes(),
        )
        .await?;
    status_becomes(&stack, id, "REQUIRES_INTERVENTION").await?;
    let listing = stack
        .sagactl("dlq list --consumer order --reason-contains SUBJECT")
        .await?;
    assert!(
        listing.contains("ShipmentFailed") && listing.contains(&id.to_string()),
        "{listing}"
    );
    let future = stack
        .sagactl("dlq list --since 2999-01-01T00:00:00Z")
        .await?;
    assert!(future.ends_with("0 of 0 dead letter(s)\n"), "{future}");

    let dry = stack
        .sagactl("dlq redrive --consumer order --dry-run")
        .await?;
    assert!(dry.contains("would redrive"), "{dry}");
    nothing_changed(&stack, id, "REQUIRES_INTERVENTION").await?;

    // Redriven to its own subject: released, refunded, and the halted saga ends.
    let done = stack
        .sagactl(
            "dlq redrive --consumer order --note \"published on the wrong subject\" --operator ada",
        )
        .await?;
    assert!(done.contains("redrove"), "{done}");
    status_becomes(&stack, id, "CANCELLED").await?;
    stack.settle().await?;
    compensated_once(&stack).await?;
    let story = story(&stack, id, "OrderCancelled").await?;
    let marks: Vec<&str> = story
        .lines()
        .skip(1)
        .filter_map(|l| {
            l.split_whitespace()
                .find(|w| ["->", "<-", "!!", "xx", "op"].contains(w))
        })
        .collect();
    assert_eq!(
        marks,
        ["->", "->", "->", "!!", "xx", "!!", "op", "<-", "<-", "->"],
        "placed, charged, reserved, the failure on the wrong subject, its dead \
         letter, the halt, the redrive, release, refund, cancel:\n{story}"
    );

    // The same event, dead-lettered again by another consumer after it was
    // applied: the saga has ended, so it is redriven only when forced, and
    // then it changes nothing, and the dead letter is gone.
    stack
        .publish(
            &stack.subjects.event(EventKind::PaymentProcessed),
            event.to_bytes(),
        )
        .await?;
    stack.wait_for_dead_letters(1).await?;
    let refused = stack
        .sagactl("dlq redrive --consumer inventory --note again --operator ada")
        .await
        .expect_err("the saga has ended");
    assert!(
        format!("{refused:#}").contains("has ended (CANCELLED)"),
        "{refused:#}"
    );
    stack
        .sagactl(
            "dlq redrive --consumer inventory --note again --operator ada --force \"a late duplicate\"",
        )
        .await?;
    stack.settle().await?;
    assert!(stack.dead_letter_messages().await?.is_empty());
    assert_eq!(stack.order(id).await?["status"], "CANCELLED");
    compensated_once(&stack).await?;
    let types = stack.saga_event_types(id).await?;
    let count = |t: &str| types.iter().filter(|x| *x == t).count();
    assert_eq!(
        (count("InventoryReleased"), count("PaymentRefunded")),
        (1, 1),
        "{types:?}"
    );
    Ok(())
}

/// Writes `bytes` to a new file and returns its path.
fn tempfile(bytes: &[u8]) -> Result<String> {
    let path = std::env::temp_dir().join(format!("sagactl-{}.json", Uuid::now_v7()));
    std::fs::write(&path, bytes)?;
    Ok(path.to_string_lossy().into_owned())
}

/// A whole stack with shipping stopped, and a saga of alice's (one widget
/// at 1 000) waiting for it (charged, stock reserved), in the read model.
async fn waiting_on_stopped_shipping() -> Result<(Stack, Uuid)> {
    let mut stack = Stack::stocked(10_000, 5).await?;
    stack.stop_service("shipping").await?;
    let id = stack.place("alice", &[("widget", 1, 1_000)], "US").await?;
    eventually("the saga to wait for shipping", DEADLINE, || async {
        Ok((stack.stock("widget").await? == (4, 1)).then_some(()))
    })
    .await?;
    stack.projected().await?;
    Ok((stack, id))
}

/// `sagactl audit` against this stack's databases: what it printed, and
/// whether it found the records in agreement.
async fn audit(stack: &Stack, options: &str) -> Result<(String, bool)> {
    let databases: Vec<String> = common::roster::names()
        .map(|s| format!("--database {s}={}", stack.dbs.url(s)))
        .collect();
    let line = format!("audit {} {options}", databases.join(" "));
    match stack.sagactl(&line).await {
        Ok(printed) => Ok((printed, true)),
        Err(e) => Ok((format!("{e:#}"), false)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_passes_on_settled_sagas_and_names_a_tampered_record() -> Result<()> {
    let (stack, each) = Stack::one_saga_of_each_kind(1_000).await?;
    stack.settle().await?;
    let (printed, agreed) = audit(&stack, "--page-size 1").await?;
    assert!(agreed, "{printed}");
    assert!(printed.contains("all invariants hold"), "{printed}");
    assert!(printed.contains("payment agrees with order"), "{printed}");

    // A refund the payment service records but never made, and stock
    // inventory says it put back but still counts as reserved.
    let payment = stack.pool("payment").await?;
    sqlx::query("UPDATE payments SET status = 'charged' WHERE order_id = $1")
        .bind(each.undeliverable)
        .execute(&payment)
        .await?;
    let inventory = stack.pool("inventory").await?;
    sqlx::query("UPDATE stock SET reserved = reserved + 1 WHERE product_id = 'widget'")
        .execute(&inventory)
        .await?;
    // Read in pages of two orders: the same findings as in one.
    let (paged, _) = audit(&stack, "--page-size 2").await?;
    let (printed, agreed) = audit(&stack, "").await?;
    let shown = |out: &str| out.split_once("printed:").map(|(_, p)| p.to_string());
    assert_eq!(shown(&paged), shown(&printed));
    assert!(!agreed, "{printed}");
    assert!(printed.contains("3 mismatch"), "{printed}");
    let undeliverable = each.undeliverable.to_string();
    let named =
        |check: &str, id: &str| printed.lines().any(|l| l.contains(check) && l.contains(id));
    assert!(
        named("payment agrees with order", &undeliverable),
        "{printed}"
    );
    assert!(named("money per customer", "alice"), "{printed}");
    assert!(named("reserved stock adds up", "widget"), "{printed}");
    assert!(!printed.contains(&each.happy.to_string()), "{printed}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_counts_a_young_saga_in_flight_and_names_it_stuck_past_the_threshold()
-> Result<()> {
    let (stack, id) = waiting_on_stopped_shipping().await?;
    let (printed, agreed) = audit(&stack, "--in-flight-for 600").await?;
    assert!(agreed, "{printed}");
    assert!(
        printed.contains("in flight (started less than 600s ago): 1"),
        "{printed}"
    );
    let printed = eventually("the saga to count as stuck", DEADLINE, || async {
        let (printed, agreed) = audit(&stack, "--in-flight-for 1").await?;
        Ok((!agreed).then_some(printed))
    })
    .await?;
    assert!(
        printed
            .lines()
            .any(|l| l.contains("every saga ended") && l.contains(&id.to_string())),
        "{printed}"
    );
    Ok(())
}

/// `sagactl <line>`'s exit code: 0 when it succeeded.
async fn exit_code(run: impl Future<Output = Result<String>>) -> u8 {
    match run.await {
        Ok(_) => 0,
        Err(e) => sagactl::exit_code(&e),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_answers_in_json_and_its_exit_code_says_what_went_wrong() -> Result<()> {
    let (stack, id) = Stack::waiting_for_shipping().await?;
    publish_without_its_reason(&stack, id).await?;

    let listed: Value = serde_json::from_str(&stack.sagactl("dlq list --json").await?)?;
    assert_eq!(listed["total"], 1, "{listed}");
    let letter = &listed["deadLetters"][0];
    assert_eq!(letter["consumer"], "inventory", "{listed}");
    assert!(
        letter["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("missing field `reason`"),
        "{listed}"
    );
    let seq = letter["seq"].as_u64().expect("a sequence");
    let shown: Value =
        serde_json::from_str(&stack.sagactl(&format!("dlq show {seq} --json")).await?)?;
    assert_eq!(
        shown["headers"]["Saga-Dlq-Consumer"][0], "inventory",
        "{shown}"
    );
    assert_eq!(
        shown["body"]["metadata"]["correlationId"],
        id.to_string(),
        "{shown}"
    );
    // Once the timeline has recorded the saga (its observer batches).
    let story: Value = eventually("the saga in its timeline", DEADLINE, || async {
        match stack.sagactl(&format!("saga {id} --json")).await {
            Ok(printed) => Ok(Some(serde_json::from_str(&printed)?)),
            Err(e) if sagactl::exit_code(&e) == 6 => Ok(None),
            Err(e) => Err(e),
        }
    })
    .await?;
    assert_eq!(story["correlationId"], id.to_string(), "{story}");
    // Nothing found: 6.
    let unknown = Uuid::now_v7();
    assert_eq!(exit_code(stack.sagactl("dlq show 999999 --json")).await, 6);
    let line = "dlq redrive --seq 999999 --note gone --json";
    assert_eq!(exit_code(stack.sagactl(line)).await, 6);
    assert_eq!(
        exit_code(stack.sagactl(&format!("saga {unknown}"))).await,
        6
    );
    let none = stack
        .sagactl(&format!("retry {unknown} --dry-run --json"))
        .await;
    let none = none.expect_err("no dead letter of that saga");
    assert_eq!(sagactl::exit_code(&none), 6, "{none:#}");
    assert!(format!("{none:#}").contains(r#""results":[]"#), "{none:#}");
    // A redrive refused (bytes that are not an event): 1.
    let line = format!("dlq redrive --seq {seq} --note retry --json");
    assert_eq!(exit_code(stack.sagactl(&line)).await, 1);

    // Authorization: no token, a wrong one, a refused broker password: 4.
    let saga = format!("saga {id}");
    assert_eq!(exit_code(stack.sagactl_as(&saga, &[], None)).await, 4);
    assert_eq!(
        exit_code(stack.sagactl_as(&saga, &[], Some("not-the-token"))).await,
        4
    );
    let wrong_password = [("--nats-password", "not-the-password")];
    assert_eq!(
        exit_code(stack.sagactl_as("dlq list", &wrong_password, Some(saga_tests::ADMIN_TOKEN)))
            .await,
        4
    );

    // Connection: nobody listening: 3.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let order_url = format!("http://127.0.0.1:{closed}");
    let nats_url = format!("nats://127.0.0.1:{closed}");
    let token = Some(saga_tests::ADMIN_TOKEN);
    assert_eq!(
        exit_code(stack.sagactl_as(&saga, &[("--order-url", &order_url)], token)).await,
        3
    );
    assert_eq!(
        exit_code(stack.sagactl_as("dlq list", &[("--nats-url", &nats_url)], token)).await,
        3
    );
    Ok(())
}
