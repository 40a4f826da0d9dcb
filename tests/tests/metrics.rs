//! `GET /metrics` of every service: Prometheus exposition that promtool
//! accepts, whose series move as sagas run (values, not just names).

use anyhow::Result;
use common::{EventKind, meter::names, roster};
use saga_tests::{DEADLINE, Stack, eventually};

const PRICE: i64 = 1_250;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_design_metrics_move_as_sagas_confirm_compensate_and_dead_letter() -> Result<()> {
    let stack = Stack::stocked(10_000, 5).await?;
    // Before any saga: every gauge is there, at zero.
    for service in roster::names() {
        let m = stack.metrics(service).await?;
        let own = [("service", service)];
        assert_eq!(m.sum(names::OUTBOX_DEPTH, &own), 0.0, "{service}");
        assert!(
            m.has(names::DEAD_LETTERS, &[("consumer", service)]),
            "{service}"
        );
        assert!(
            m.has(names::CONSUMER_PENDING, &[("consumer", service)]),
            "{service}"
        );
        assert_eq!(m.sum(names::EVENTS, &own), 0.0, "{service}");
    }

    let (_, confirmed) = stack
        .run_saga("alice", &[("widget", 1, PRICE)], "US")
        .await?;
    assert_eq!(confirmed["status"], "CONFIRMED");
    // More than there is: the reservation fails and the payment is refunded.
    let (_, cancelled) = stack.run_saga("alice", &[("widget", 50, 10)], "US").await?;
    assert_eq!(cancelled["status"], "CANCELLED");
    // Bytes that are no event, on payment's input subject.
    stack
        .publish(
            &stack.subjects.event(EventKind::OrderPlaced),
            b"{not an event".to_vec(),
        )
        .await?;
    stack.wait_for_dead_letters(1).await?;

    // Saga completion, as the observer saw the sagas end.
    let order = stack
        .metrics_until("order", "both sagas counted as ended", |m| {
            m.sum(names::SAGAS_ENDED, &[]) >= 2.0
        })
        .await?;
    for (outcome, count) in [
        ("confirmed", 1.0),
        ("cancelled", 1.0),
        ("intervention", 0.0),
    ] {
        let ended = order.sum(names::SAGAS_ENDED, &[("outcome", outcome)]);
        assert_eq!(ended, count, "{outcome}");
    }
    // The timeline projection catches up (the observer may still be
    // gathering the last messages into a batch), and so does every consumer.
    let order = stack
        .metrics_until("order", "the timeline and every consumer caught up", |m| {
            m.sum(names::PROJECTION_LAG, &[("projection", "timeline")]) == 0.0
                && roster::names().all(|c| {
                    m.sum(
                        names::CONSUMER_PENDING,
                        &[("service", "order"), ("consumer", c)],
                    ) == 0.0
                })
        })
        .await?;
    assert_eq!(
        order.sum(names::PROJECTION_LAG, &[("projection", "timeline")]),
        0.0
    );
    assert!(order.has(names::PROJECTION_LAG, &[("projection", "timeline")]));
    for consumer in roster::names() {
        let labels = [("service", "order"), ("consumer", consumer)];
        assert!(order.has(names::CONSUMER_PENDING, &labels), "{consumer}");
        assert_eq!(
            order.sum(names::CONSUMER_PENDING, &labels),
            0.0,
            "{consumer}"
        );
    }

    // Each service applied events, timed them from their publish, and
    // published its own through the relay.
    for service in roster::names() {
        let m = stack.metrics(service).await?;
        let own = [("service", service)];
        let applied = [("service", service), ("disposition", "applied")];
        assert!(m.sum(names::EVENTS, &applied) >= 1.0, "{service}");
        let timed = format!("{}_count", names::EVENT_LATENCY);
        assert_eq!(
            m.sum(&timed, &own),
            m.sum(names::EVENTS, &applied),
            "{service}: one latency per applied event"
        );
        let handled = format!("{}_count", names::HANDLER_SECONDS);
        assert_eq!(
            m.sum(&handled, &own),
            m.sum(names::EVENTS, &own),
            "{service}"
        );
        let published = format!("{}_count", names::RELAY_PUBLISH);
        assert!(m.sum(&published, &own) >= 1.0, "{service}");
        assert_eq!(m.sum(names::OUTBOX_DEPTH, &own), 0.0, "{service}");
    }

    // One compensation (the refund), none failed; the reservation was
    // refused, so there was nothing to release.
    let payment = stack.metrics("payment").await?;
    let refunds = [("step", "payment"), ("result", "undone")];
    assert_eq!(payment.sum(names::COMPENSATIONS, &refunds), 1.0);
    assert_eq!(
        payment.sum(names::COMPENSATIONS, &[("result", "failed")]),
        0.0
    );
    // The malformed event: dead-lettered, and in the dead-letter count.
    let dead = [
        ("event_type", "undecodable"),
        ("disposition", "dead_lettered"),
    ];
    assert_eq!(payment.sum(names::EVENTS, &dead), 1.0);
    assert_eq!(
        payment.sum(names::DEAD_LETTERS, &[("consumer", "payment")]),
        1.0
    );
    assert_eq!(
        stack
            .metrics("shipping")
            .await?
            .sum(names::DEAD_LETTERS, &[("consumer", "shipping")]),
        0.0
    );
    stack.assert_invariants().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_projection_lag_grows_while_the_timeline_cannot_record_and_clears_after() -> Result<()>
{
    let stack = Stack::stocked(10_000, 5).await?;
    let lag = |m: &saga_tests::exposition::Exposition| {
        m.sum(names::PROJECTION_LAG, &[("projection", "timeline")])
    };
    // Hold the timeline's tables: the observer cannot record, the saga goes on.
    let mut holder = stack.hold_table("order", "saga_timeline").await?;
    let id = stack.place("alice", &[("widget", 1, 100)], "US").await?;
    assert_eq!(stack.wait_for_outcome(id).await?["status"], "CONFIRMED");
    let behind = stack
        .metrics_until("order", "the projection to fall behind", |m| lag(m) >= 1.0)
        .await?;
    assert!(lag(&behind) < 60.0, "{}", lag(&behind));
    sqlx::query("ROLLBACK").execute(&mut holder).await?;
    stack
        .metrics_until("order", "the projection to catch up", |m| lag(m) == 0.0)
        .await?;
    Ok(())
}

/// How long the test keeps a step of the saga waiting inside its
/// transaction, before the step writes its event.
const HELD: std::time::Duration = std::time::Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relays_latency_counts_from_the_events_write_not_from_its_transactions_start()
-> Result<()> {
    let stack = Stack::stocked(10_000, 5).await?;
    // The payments table held: payment's step begins its transaction, then
    // waits to record the payment, before it writes PaymentProcessed.
    let mut holder = stack.hold_table("payment", "payments").await?;
    let id = stack.place("alice", &[("widget", 1, 100)], "US").await?;
    let payment = stack.pool("payment").await?;
    eventually("payment's step to wait on the table", DEADLINE, || async {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(&payment)
        .await?;
        Ok((waiting > 0).then_some(()))
    })
    .await?;
    tokio::time::sleep(HELD).await;
    sqlx::query("ROLLBACK").execute(&mut holder).await?;
    assert_eq!(stack.wait_for_outcome(id).await?["status"], "CONFIRMED");

    let m = stack.metrics("payment").await?;
    let own = [("service", "payment")];
    let series = |part| format!("{}_{part}", names::RELAY_PUBLISH);
    assert_eq!(m.sum(&series("count"), &own), 1.0, "one event relayed");
    // Its time in the outbox, not the step's wait before it was written.
    let relayed = m.sum(&series("sum"), &own);
    assert!(
        relayed < HELD.as_secs_f64() / 2.0,
        "PaymentProcessed took {relayed:.3} s from the outbox to the broker"
    );
    Ok(())
}
