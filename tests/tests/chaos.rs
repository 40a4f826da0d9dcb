//! A chaos run: sagas placed at a steady rate (some declined, some
//! undeliverable, so compensations run too) while payment, inventory and
//! shipping, each as two processes (replicas), are killed (SIGKILL) and
//! started again one replica after the other, then all at once, Redis
//! forgets every idempotency key; then, with
//! sagas in flight, Postgres (the test's own server) is stopped at once and
//! started again, the broker is restarted, and Redis killed and started
//! again. Afterwards every saga has ended, `sagactl audit` finds the
//! services' records in agreement, and the invariants hold.
//!
//! 300 sagas in the suite; `CHAOS_SAGAS=2000` (up to 100,000) for a longer
//! run, the faults spread over it the same way. It prints what it did and
//! the audit's table.

use std::time::{Duration, Instant};

use anyhow::Result;
use saga_tests::{ChildService, DEADLINE, Stack, eventually};
use uuid::Uuid;

/// Sagas placed unless `CHAOS_SAGAS` says otherwise.
const SAGAS: u64 = 300;
/// One placement every this often: 100 a second.
const EVERY: Duration = Duration::from_millis(10);

const OUT_OF_PROCESS: [&str; 3] = ["payment", "inventory", "shipping"];
/// Processes of each of them: competing consumers of its durable consumer,
/// one of which leads its relay.
const REPLICAS: usize = 2;
/// How long the system may take to end every saga and settle after the
/// faults (a busy machine runs other tests beside this one).
const RECOVERY: Duration = Duration::from_secs(180);

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
    let sagas = saga_tests::sagas_from_env("CHAOS_SAGAS", SAGAS);
    let mut stack = Stack::for_steady_sagas_on_own_postgres(sagas).await?;
    for service in OUT_OF_PROCESS {
        stack.stop_service(service).await?;
    }
    // Each service as REPLICAS processes: `<service>#<k>`.
    let mut children: Vec<(&str, usize, ChildService)> = Vec::new();
    for service in OUT_OF_PROCESS {
        for k in 1..=REPLICAS {
            children.push((service, k, stack.spawn_process(service, &[])?));
        }
    }
    for service in OUT_OF_PROCESS {
        at_work(&stack, service).await?;
    }

    // The faults come at these shares of the placements' window.
    let window = EVERY * sagas as u32;
    let at = |share: f64| window.mul_f64(share);
    let start = Instant::now();
    let placing = stack.place_steadily(sagas, EVERY, start);
    let mut log = Log::default();
    let faults = async {
        // One replica at a time, every replica of every service in turn,
        // between 10% and 65% of the window.
        let turns: Vec<(&str, usize)> = OUT_OF_PROCESS
            .iter()
            .flat_map(|s| (1..=REPLICAS).map(move |k| (*s, k)))
            .collect();
        for (n, (service, k)) in turns.iter().copied().enumerate() {
            let share = 0.1 + 0.55 * n as f64 / turns.len() as f64;
            tokio::time::sleep_until((start + at(share)).into()).await;
            let i = children
                .iter()
                .position(|(s, r, _)| *s == service && *r == k)
                .expect("a running replica");
            let (_, _, child) = children.swap_remove(i);
            child.kill().await?;
            log.note(start, format!("kill -9 {service}#{k}"));
            tokio::time::sleep(Duration::from_millis(150)).await;
            children.push((service, k, stack.spawn_process(service, &[])?));
            log.note(start, format!("{service}#{k} started again"));
        }
        let mut redis = stack.redis.connection().await?;
        redis::cmd("FLUSHALL").query_async::<()>(&mut redis).await?;
        log.note(start, "Redis flushed: every idempotency key forgotten");
        tokio::time::sleep_until((start + at(0.75)).into()).await;
        for (_, _, child) in std::mem::take(&mut children) {
            child.kill().await?;
        }
        log.note(
            start,
            format!(
                "kill -9 every replica of {}, all at once",
                OUT_OF_PROCESS.join(", ")
            ),
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
        for service in OUT_OF_PROCESS {
            for k in 1..=REPLICAS {
                children.push((service, k, stack.spawn_process(service, &[])?));
            }
        }
        log.note(start, "all started again");
        anyhow::Ok(())
    };
    let (placed, faulted) = tokio::join!(placing, faults);
    faulted?;
    let placed: Vec<Uuid> = placed.into_iter().collect::<Result<_>>()?;
    // With sagas in flight: Postgres, the broker, then Redis, go away and
    // come back.
    let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM orders WHERE status = 'PENDING'")
        .fetch_one(&stack.pool("order").await?)
        .await?;
    log.note(start, format!("{pending} sagas pending in the read model"));
    stack
        .postgres
        .as_mut()
        .expect("the stack's own Postgres")
        .restart()
        .await?;
    log.note(
        start,
        "Postgres stopped at once (no checkpoint: it recovers as after a crash) and started again",
    );
    stack.nats.restart().await?;
    log.note(start, "nats-server restarted");
    stack.redis.restart().await?;
    log.note(start, "Redis killed and started again: every key forgotten");

    // Events whose acknowledgements the restart lost come back after the
    // consumers' ack_wait (10 s); retried steps back off up to about 13 s.
    let settled = async {
        let outcomes = stack.every_saga_ended(&placed, RECOVERY).await?;
        log.note(start, format!("every saga ended: {outcomes:?}"));
        eventually("the system to settle", RECOVERY, || async {
            Ok((stack.is_settled().await? && stack.is_settled().await?).then_some(()))
        })
        .await?;
        let audit = stack.audit().await?;
        anyhow::Ok((outcomes, audit))
    };
    let settled = settled.await;
    let story = log.0.join("\n");
    eprintln!("{story}");
    let (outcomes, audit) = settled.map_err(|e| anyhow::anyhow!("{e:#}\n{story}"))?;
    eprintln!("{audit}");
    assert!(audit.contains("all invariants hold"), "{audit}\n{story}");
    assert_eq!(outcomes.values().sum::<i64>(), sagas as i64);
    assert!(
        outcomes["CONFIRMED"] > 0 && outcomes["CANCELLED"] > 0,
        "{story}"
    );
    assert!(!outcomes.contains_key("REQUIRES_INTERVENTION"), "{story}");
    stack.assert_invariants().await
}
