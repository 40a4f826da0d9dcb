//! Least privilege on the broker: every service of a test stack connects as
//! its own user (`common::permissions`), so every other test runs its sagas
//! under these permissions. Here: inventory's credentials cannot publish a
//! payment's or a shipment's event, nor read another service's consumer; an
//! unauthenticated client and a wrong password are refused. (The operator
//! publishing by hand is the `nats_cli` tests'.)

use std::time::Duration;

use anyhow::Result;
use async_nats::jetstream;
use saga_tests::Stack;
use serde_json::json;
use uuid::Uuid;

/// Long enough for an acknowledgement that is coming; a refused publish
/// never gets one.
const ACK_WITHIN: Duration = Duration::from_secs(3);

async fn connect_as(stack: &Stack, user: &str, password: &str) -> Result<async_nats::Client> {
    common::broker::connect(
        async_nats::ConnectOptions::new()
            .user_and_password(user.into(), password.into())
            .connection_timeout(Duration::from_secs(2)),
        &stack.nats.url(),
    )
    .await
}

/// Whether JetStream stored what `js` published to `subject`.
async fn stored(js: &jetstream::Context, subject: String, body: Vec<u8>) -> bool {
    let ack = tokio::time::timeout(ACK_WITHIN, async {
        js.publish(subject, body.into()).await?.await
    })
    .await;
    matches!(ack, Ok(Ok(_)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inventory_cannot_forge_a_refund_or_a_shipment_failure_and_strangers_are_refused()
-> Result<()> {
    let stack = Stack::stocked(10_000, 5).await?;
    // The services work under their permissions: a saga goes through.
    let (id, order) = stack
        .run_saga("alice", &[("widget", 1, 1_000)], "US")
        .await?;
    assert_eq!(order["status"], "CONFIRMED", "{order}");

    let (user, password) = stack.users.credentials("inventory").expect("a user");
    let inventory = connect_as(&stack, &user, &password).await?;
    let js = jetstream::new(inventory);
    let forged = |event_type: &str| {
        serde_json::to_vec(&json!({
            "eventId": Uuid::now_v7(), "eventType": event_type, "schemaVersion": 1,
            "aggregateType": "payment", "aggregateId": id.to_string(), "version": 9,
            "timestamp": "2026-11-27T00:00:00Z",
            "metadata": {"correlationId": id, "causationId": id},
            "payload": {"orderId": id, "paymentId": Uuid::now_v7(), "amount": 1_000}
        }))
        .unwrap()
    };
    for (kind, event_type) in [
        (common::EventKind::PaymentRefunded, "PaymentRefunded"),
        (common::EventKind::ShipmentFailed, "ShipmentFailed"),
    ] {
        let subject = stack.subjects.event_of(kind, id);
        assert!(
            !stored(&js, subject.clone(), forged(event_type)).await,
            "inventory published {subject}"
        );
        let events = stack.js.get_stream(stack.subjects.events_stream()).await?;
        let last = events.get_last_raw_message_by_subject(&subject).await;
        assert!(last.is_err(), "{subject} is in the stream");
    }
    // Nor may it take payment's events from payment's consumer.
    let peek = tokio::time::timeout(ACK_WITHIN, async {
        let stream = js.get_stream(stack.subjects.events_stream()).await?;
        let consumer: jetstream::consumer::PullConsumer = stream
            .get_consumer("payment")
            .await
            .map_err(|e| anyhow::anyhow!(e))?;
        anyhow::Ok(consumer)
    })
    .await;
    assert!(
        !matches!(peek, Ok(Ok(_))),
        "inventory reached payment's consumer"
    );

    // No user, or a wrong password: refused at once.
    let anonymous = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(2))
        .connect(stack.nats.url())
        .await;
    assert!(anonymous.is_err(), "a client without a user was let in");
    assert!(
        connect_as(&stack, "inventory", "not-its-password")
            .await
            .is_err(),
        "a wrong password was let in"
    );

    stack.assert_invariants().await
}

/// A client as `user` (with its own inbox prefix, as the services connect)
/// and every error the broker sends it, as text.
async fn watched_as(
    stack: &Stack,
    user: &str,
) -> Result<(
    async_nats::Client,
    tokio::sync::mpsc::UnboundedReceiver<String>,
)> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let options = stack
        .users
        .as_user(user, async_nats::ConnectOptions::new())
        .connection_timeout(Duration::from_secs(2))
        .event_callback(move |event| {
            let tx = tx.clone();
            async move {
                if let async_nats::Event::ServerError(e) = event {
                    let _ = tx.send(e.to_string());
                }
            }
        });
    Ok((
        common::broker::connect(options, &stack.nats.url()).await?,
        rx,
    ))
}

/// Waits for the broker to say it refused `what` on `subject`.
async fn refused(
    errors: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
    what: &str,
    subject: &str,
) -> Result<()> {
    let expected = format!("Permissions Violation for {what} to \"{subject}\"");
    let deadline = tokio::time::Instant::now() + ACK_WITHIN;
    loop {
        let error = tokio::time::timeout_at(deadline, errors.recv())
            .await
            .map_err(|_| anyhow::anyhow!("the broker did not refuse {what} to {subject}"))?
            .ok_or_else(|| anyhow::anyhow!("the connection's events ended"))?;
        if error.contains(&expected) {
            return Ok(());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_service_may_change_a_stream_or_touch_another_services_consumer_or_inbox() -> Result<()>
{
    let stack = Stack::stocked(10_000, 5).await?;
    let s = &stack.subjects;
    let (events, dlq) = (s.events_stream(), s.dead_letter_stream());
    let before = stack
        .js
        .get_stream(&events)
        .await?
        .info()
        .await?
        .config
        .clone();
    for service in saga_tests::SERVICES {
        let other = if service == "payment" {
            "inventory"
        } else {
            "payment"
        };
        let (client, mut errors) = watched_as(&stack, service).await?;
        let forbidden = [
            format!("$JS.API.STREAM.UPDATE.{events}"),
            format!("$JS.API.STREAM.CREATE.{dlq}"),
            format!("$JS.API.STREAM.DELETE.{events}"),
            format!("$JS.API.STREAM.PURGE.{dlq}"),
            format!("$JS.API.STREAM.MSG.DELETE.{dlq}"),
            format!("$JS.API.CONSUMER.CREATE.{events}.{service}"),
            format!("$JS.API.CONSUMER.DURABLE.CREATE.{events}.{service}"),
            format!("$JS.API.CONSUMER.DELETE.{events}.{service}"),
            format!("$JS.API.CONSUMER.CREATE.{events}.{other}"),
            format!("$JS.API.CONSUMER.DELETE.{events}.{other}"),
            format!("$JS.API.CONSUMER.MSG.NEXT.{events}.{other}"),
            // A +TERM for a delivery of another service's consumer.
            format!("$JS.ACK.{events}.{other}.1.7.7.1700000000000000000.0"),
            s.operator("dlq-redrive"),
            s.dead_letter(other),
            format!("_INBOX_{other}.anything"),
        ];
        for subject in &forbidden {
            client.publish(subject.clone(), "{}".into()).await?;
            client.flush().await?;
            refused(&mut errors, "Publish", subject)
                .await
                .map_err(|e| anyhow::anyhow!("{service}: {e}"))?;
        }
        // Only its own inbox: not everyone's, not another's.
        for subject in ["_INBOX.>".to_string(), format!("_INBOX_{other}.>")] {
            let _sub = client.subscribe(subject.clone()).await?;
            client.flush().await?;
            refused(&mut errors, "Subscription", &subject)
                .await
                .map_err(|e| anyhow::anyhow!("{service}: {e}"))?;
        }
    }
    // Nothing changed: the stream as it was, every consumer there, and
    // sagas still go through.
    let after = stack
        .js
        .get_stream(&events)
        .await?
        .info()
        .await?
        .config
        .clone();
    assert_eq!(before, after);
    let stream = stack.js.get_stream(&events).await?;
    for service in saga_tests::SERVICES {
        let consumer: Result<jetstream::consumer::PullConsumer, _> =
            stream.get_consumer(service).await;
        assert!(consumer.is_ok(), "{service}'s consumer is gone");
    }
    let (_, order) = stack
        .run_saga("alice", &[("widget", 1, 1_000)], "US")
        .await?;
    assert_eq!(order["status"], "CONFIRMED");
    stack.assert_invariants().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_order_service_cannot_forge_another_services_event_or_the_catalog() -> Result<()> {
    let stack = Stack::stocked(10_000, 5).await?;
    let s = &stack.subjects;
    let (client, mut errors) = watched_as(&stack, "order").await?;
    let id = Uuid::now_v7();
    for subject in [
        s.event(common::EventKind::PaymentProcessed),
        s.event(common::EventKind::InventoryReserved),
        s.event(common::EventKind::ShipmentCreated),
        s.product("widget"),
    ] {
        client
            .publish(subject.clone(), format!("{{\"orderId\":\"{id}\"}}").into())
            .await?;
        client.flush().await?;
        refused(&mut errors, "Publish", &subject).await?;
    }
    // Its own events it may publish.
    let own = s.event(common::EventKind::OrderConfirmed);
    assert!(stored(&jetstream::new(client), own, b"{}".to_vec()).await);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catalog_event_far_ahead_of_the_held_version_is_dead_lettered_and_pins_no_price()
-> Result<()> {
    let stack = Stack::stocked(10_000, 5).await?;
    stack.price("widget", 1_000).await?;
    // Whoever may publish the catalog (inventory's credentials, or the
    // operator's) sends a price with the largest version there is.
    let envelope = json!({
        "eventId": Uuid::now_v7(), "eventType": "ProductPriced", "schemaVersion": 1,
        "aggregateType": "product", "aggregateId": "widget", "version": i64::MAX,
        "timestamp": "2026-12-04T00:00:00Z",
        "metadata": {"correlationId": Uuid::now_v7(), "causationId": Uuid::now_v7()},
        "payload": {"productId": "widget", "name": "Widget", "unitPrice": 1}
    });
    stack
        .publish(
            &stack.subjects.product("widget"),
            serde_json::to_vec(&envelope)?,
        )
        .await?;
    stack.wait_for_dead_letters(1).await?;
    let letters = stack.dead_letters().await?;
    assert!(
        letters
            .iter()
            .any(|(reason, _, _)| reason.contains("more than 1000000 past the catalog's")),
        "{letters:?}"
    );
    // The catalog kept its price, and inventory's next price still counts.
    let (_, product) = stack.get_json("order", "/products/widget").await?;
    assert_eq!(product["unitPrice"], 1_000, "{product}");
    stack.price("widget", 1_250).await?;
    let (_, order) = stack
        .run_saga("alice", &[("widget", 1, 1_250)], "US")
        .await?;
    assert_eq!(order["status"], "CONFIRMED");
    Ok(())
}
