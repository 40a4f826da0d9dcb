//! Operating through trouble: a hung or missing Redis, a full broker store, a
//! deleted consumer, a graceful stop with work in flight. Each either keeps
//! the sagas going or says clearly what is wrong; none stalls silently.

use std::time::Duration;

use anyhow::{Context, Result};
use async_nats::jetstream::stream::DiscardPolicy;
use saga_tests::{DEADLINE, NatsServer, SERVICES, Stack, eventually};

fn signal(pid: u32, sig: &str) -> Result<()> {
    let status = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()?;
    anyhow::ensure!(status.success(), "kill {sig} {pid} failed");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_redis_slows_nothing_down_for_long_and_sagas_complete_on_the_postgres_guard()
-> Result<()> {
    let mut stack = Stack::stocked(10_000, 5).await?;

    // Redis stops answering but keeps its connections open.
    signal(stack.redis.pid(), "-STOP")?;
    let id = stack.place("alice", &[("widget", 2, 1_000)], "US").await?;
    assert_eq!(stack.wait_for_outcome(id).await?["status"], "CONFIRMED");

    let (status, ready) = tokio::time::timeout(Duration::from_secs(5), stack.ready("payment"))
        .await
        .context("readiness must answer while redis hangs")??;
    assert_eq!(status, 200, "{ready}");
    assert_eq!(ready["status"], "degraded", "{ready}");
    assert!(
        ready["checks"]["redis"]
            .as_str()
            .unwrap()
            .contains("Postgres guard alone"),
        "{ready}"
    );

    // Redelivered events are still applied once, by the guard alone.
    stack.redeliver_every_event().await?;
    stack.settle().await?;
    stack.assert_invariants().await?;
    assert_eq!(stack.rows("payment", "payments").await?, 1);

    // A graceful stop does not wait on the hung Redis.
    tokio::time::timeout(Duration::from_secs(15), stack.stop_service("payment"))
        .await
        .context("graceful stop must not hang on redis")??;
    signal(stack.redis.pid(), "-CONT")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_starts_and_works_while_redis_is_down() -> Result<()> {
    let mut stack = Stack::start_with(&["payment", "inventory", "shipping"]).await?;
    stack.set_balance("alice", 10_000).await?;
    stack.set_stock("widget", 5).await?;
    signal(stack.redis.pid(), "-KILL")?;

    tokio::time::timeout(Duration::from_secs(20), stack.start_service("order"))
        .await
        .context("start-up must not wait for redis")??;
    let id = stack.place("alice", &[("widget", 1, 1_000)], "US").await?;
    assert_eq!(stack.wait_for_outcome(id).await?["status"], "CONFIRMED");
    let (status, ready) = stack.ready("order").await?;
    assert_eq!((status, ready["status"].as_str()), (200, Some("degraded")));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_store_too_small_for_the_streams_is_a_clear_provisioning_error() -> Result<()> {
    let stack = Stack::start_with(&[]).await?;
    let small = NatsServer::start_with_store("64MB").await?;
    let err = match stack::infra::provision(&small.url(), None, &stack.subjects, 1).await {
        Ok(_) => anyhow::bail!("streams provisioned on a store that cannot hold them"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("insufficient storage"), "{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_stream_makes_the_service_unready_naming_it_and_nothing_is_lost() -> Result<()> {
    let stack = Stack::stocked(10_000, 5).await?;

    // The events stream is full and refuses new messages.
    let mut events = stack.js.get_stream(stack.subjects.events_stream()).await?;
    let original = events.info().await?.config.clone();
    let mut full = original.clone();
    full.discard = DiscardPolicy::New;
    full.max_bytes = 1;
    stack.js.update_stream(&full).await?;

    let id = stack.place("alice", &[("widget", 1, 1_000)], "US").await?;
    let ready = eventually("order to report the refusal", DEADLINE, || async {
        let (status, ready) = stack.ready("order").await?;
        Ok((status == 503).then_some(ready))
    })
    .await?;
    let failing = ready["failing"].to_string();
    assert!(
        failing.contains("relay") && failing.contains("refuses events"),
        "{ready}"
    );
    assert_eq!(stack.rows("order", "outbox").await?, 1);

    // Room again: the saga goes on from the outbox.
    stack.js.update_stream(&original).await?;
    assert_eq!(stack.wait_for_outcome(id).await?["status"], "CONFIRMED");
    eventually("order to be ready again", DEADLINE, || async {
        Ok((stack.ready("order").await?.0 == 200).then_some(()))
    })
    .await?;

    // The dead-letter stream is full: the bad event waits, and says why.
    let mut dlq = stack
        .js
        .get_stream(stack.subjects.dead_letter_stream())
        .await?;
    let original = dlq.info().await?.config.clone();
    let mut full = original.clone();
    full.max_bytes = 1;
    stack.js.update_stream(&full).await?;
    stack
        .publish(
            &stack.subjects.event(common::EventKind::OrderPlaced),
            b"not json".to_vec(),
        )
        .await?;
    let ready = eventually("payment to report the refusal", DEADLINE, || async {
        let (status, ready) = stack.ready("payment").await?;
        Ok((status == 503).then_some(ready))
    })
    .await?;
    assert!(
        ready["failing"]
            .to_string()
            .contains("dead-letter stream refuses messages"),
        "{ready}"
    );
    stack.js.update_stream(&original).await?;
    let letters = stack.wait_for_dead_letters(1).await?;
    assert_eq!(letters[0].1, b"not json");
    eventually("payment to be ready again", DEADLINE, || async {
        Ok((stack.ready("payment").await?.0 == 200).then_some(()))
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_consumer_makes_its_service_unready_until_provisioned_and_so_does_a_missing_stream()
-> Result<()> {
    let stack = Stack::stocked(10_000, 5).await?;
    let events = stack.js.get_stream(stack.subjects.events_stream()).await?;
    events.delete_consumer("payment").await?;

    // Payment may not create it again: it says so, and the saga waits.
    let ready = eventually(
        "payment to report its consumer missing",
        DEADLINE,
        || async {
            let (status, ready) = stack.ready("payment").await?;
            let failing = ready["failing"].to_string();
            let missing = failing.contains("is missing") && failing.contains("consumer payment");
            Ok((status == 503 && missing).then_some(ready))
        },
    )
    .await?;
    let failing = ready["failing"].to_string();
    assert!(
        failing.contains("consumer payment") && failing.contains("stack provision"),
        "{ready}"
    );
    let id = stack.place("alice", &[("widget", 1, 1_000)], "US").await?;
    let changed = stack.provision().await?;
    assert_eq!(changed, vec!["consumer payment created".to_string()]);
    assert_eq!(stack.wait_for_outcome(id).await?["status"], "CONFIRMED");

    // Without its stream the consumer cannot come back: readiness says so.
    stack
        .js
        .delete_stream(stack.subjects.events_stream())
        .await?;
    let ready = eventually("inventory to report its consumer", DEADLINE, || async {
        let (status, ready) = stack.ready("inventory").await?;
        Ok((status == 503).then_some(ready))
    })
    .await?;
    assert!(ready["failing"].to_string().contains("consumer"), "{ready}");
    stack.provision().await?;
    // Every service finds its consumer again once the stream and the
    // consumers are provisioned again, each after its own backoff.
    for service in SERVICES {
        let ready = eventually(
            &format!("{service} to be ready again"),
            DEADLINE,
            || async {
                let (status, ready) = stack.ready(service).await?;
                Ok((status == 200).then_some(ready))
            },
        )
        .await?;
        assert_eq!(ready["parts"]["consumer"]["state"], "ok", "{ready}");
    }
    let (_, ready) = stack.ready("order").await?;
    assert_eq!(ready["parts"]["commandResponder"]["state"], "ok", "{ready}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_publishes_what_its_drain_commits() -> Result<()> {
    let mut stack = Stack::stocked(10_000_000, 1_000).await?;
    stack.stop_service("payment").await?;
    // A backlog for payment while it is stopped.
    for _ in 0..150 {
        stack.place("alice", &[("widget", 1, 100)], "US").await?;
    }
    stack.start_service("payment").await?;
    eventually("payment to be busy", DEADLINE, || async {
        Ok((stack.rows("payment", "payments").await? > 0).then_some(()))
    })
    .await?;
    stack.stop_service("payment").await?;
    assert_eq!(
        stack.rows("payment", "outbox").await?,
        0,
        "events committed during the drain were left in the outbox"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provisioning_again_keeps_a_limit_an_operator_raised_and_services_change_none() -> Result<()>
{
    let mut stack = Stack::stocked(10_000, 5).await?;
    // The operator keeps events for 30 days instead of 7, and more bytes.
    let name = stack.subjects.events_stream();
    let mut config = stack
        .js
        .get_stream(&name)
        .await?
        .info()
        .await?
        .config
        .clone();
    let (age, bytes) = (
        Duration::from_secs(30 * 86_400),
        config.max_bytes + (1 << 20),
    );
    config.max_age = age;
    config.max_bytes = bytes;
    stack.js.update_stream(config).await?;

    // A service restarted, and the provisioning run again, leave them.
    stack.stop_service("payment").await?;
    stack.start_service("payment").await?;
    let changed = stack.provision().await?;
    assert!(changed.is_empty(), "{changed:?}");
    let running = stack
        .js
        .get_stream(&name)
        .await?
        .info()
        .await?
        .config
        .clone();
    assert_eq!((running.max_age, running.max_bytes), (age, bytes));
    stack
        .run_saga("alice", &[("widget", 1, 1_000)], "US")
        .await?;
    Ok(())
}
