//! A short chaos run: sagas placed at a steady rate (some declined, some
//! undeliverable, so compensations run too) while payment, inventory and
//! shipping, each its own process, are killed (SIGKILL) and started again
//! one after the other, Redis forgets every idempotency key, and the broker
//! is restarted. Afterwards every saga has ended, `sagactl audit` finds the
//! services' records in agreement, and the invariants hold.

use std::time::{Duration, Instant};

use anyhow::Result;
use futures::{StreamExt, stream};
use saga_tests::{ChildService, DEADLINE, Stack, eventually};
use uuid::Uuid;

const SAGAS: u64 = 300;
/// One placement every this often: the run lasts about 3 s.
const EVERY: Duration = Duration::from_millis(10);
const PRICE: i64 = 100;
const OUT_OF_PROCESS: [&str; 3] = ["payment", "inventory", "shipping"];

/// What happened when, for the failure message.
#[derive(Default)]
struct Log(Vec<String>);

impl Log {
    fn note(&mut self, start: Instant, what: impl std::fmt::Display) {
        self.0
            .push(format!("{:>6} ms  {what}", start.elapsed().as_millis()));
    }
}

/// Waits until the broker shows `service`'s consumer being pulled from
/// (the process is at work).
async fn at_work(stack: &Stack, service: &str) -> Result<()> {
    eventually(&format!("{service} to pull events"), DEADLINE, || async {
        let stream = stack.js.get_stream(stack.subjects.events_stream()).await?;
        let mut consumer: async_nats::jetstream::consumer::PullConsumer = stream
            .get_consumer(service)
            .await
            .map_err(|e| anyhow::anyhow!(e))?;
        let info = consumer.info().await?;
        Ok((info.num_waiting > 0).then_some(()))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sagas_survive_killed_services_a_forgetful_redis_and_a_broker_restart() -> Result<()> {
    let mut stack = Stack::start().await?;
    for customer in ["alice", "bob"] {
        stack.set_balance(customer, 1_000_000).await?;
    }
    stack.set_balance("poor", 3 * PRICE).await?;
    stack.set_stock("widget", 1_000).await?;
    stack.price("widget", PRICE).await?;
    for service in OUT_OF_PROCESS {
        stack.stop_service(service).await?;
    }
    let mut children: Vec<(&str, ChildService)> = Vec::new();
    for service in OUT_OF_PROCESS {
        children.push((service, stack.spawn_process(service, &[])?));
    }
    for service in OUT_OF_PROCESS {
        at_work(&stack, service).await?;
    }

    let start = Instant::now();
    let placing = {
        let stack = &stack;
        stream::iter(0..SAGAS)
            .map(move |i| async move {
                tokio::time::sleep_until((start + EVERY * i as u32).into()).await;
                let (customer, country) = match i % 10 {
                    0 => ("poor", "US"),
                    1 => ("alice", "ZZ"),
                    n if n % 2 == 0 => ("alice", "US"),
                    _ => ("bob", "US"),
                };
                stack
                    .place(customer, &[("widget", 1 + (i % 3) as i64, PRICE)], country)
                    .await
            })
            .buffer_unordered(64)
            .collect::<Vec<Result<Uuid>>>()
    };
    let mut log = Log::default();
    let faults = async {
        for (n, (service, child)) in std::mem::take(&mut children).into_iter().enumerate() {
            tokio::time::sleep_until((start + Duration::from_millis(400 + 600 * n as u64)).into())
                .await;
            child.kill().await?;
            log.note(start, format!("kill -9 {service}"));
            tokio::time::sleep(Duration::from_millis(150)).await;
            children.push((service, stack.spawn_process(service, &[])?));
            log.note(start, format!("{service} started again"));
        }
        let mut redis = stack.redis.connection().await?;
        redis::cmd("FLUSHALL").query_async::<()>(&mut redis).await?;
        log.note(start, "Redis flushed: every idempotency key forgotten");
        anyhow::Ok(())
    };
    let (placed, faulted) = tokio::join!(placing, faults);
    faulted?;
    let placed: Vec<Uuid> = placed.into_iter().collect::<Result<_>>()?;
    // After the placements: the broker goes away and comes back.
    stack.nats.restart().await?;
    log.note(start, "nats-server restarted");

    let mut outcomes = std::collections::BTreeMap::<String, usize>::new();
    for id in &placed {
        let order = stack.wait_for_outcome(*id).await?;
        *outcomes
            .entry(order["status"].as_str().unwrap_or_default().to_string())
            .or_default() += 1;
    }
    log.note(start, format!("every saga ended: {outcomes:?}"));
    stack.settle().await?;
    let databases: Vec<String> = saga_tests::SERVICES
        .iter()
        .map(|s| format!("--database {s}={}", stack.dbs.url(s)))
        .collect();
    let audit = stack
        .sagactl(&format!("audit {}", databases.join(" ")))
        .await;
    let story = log.0.join("\n");
    eprintln!("{story}");
    let audit = audit.map_err(|e| anyhow::anyhow!("{e:#}\n{story}"))?;
    assert!(audit.contains("all invariants hold"), "{audit}\n{story}");
    assert_eq!(outcomes.values().sum::<usize>(), SAGAS as usize);
    assert!(
        outcomes["CONFIRMED"] > 0 && outcomes["CANCELLED"] > 0,
        "{story}"
    );
    assert!(!outcomes.contains_key("REQUIRES_INTERVENTION"), "{story}");
    stack.assert_invariants().await
}
