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
