//! Replicas: payment, inventory and shipping each run as two processes on
//! one database and one durable consumer (competing consumers), while sagas
//! come in at a steady rate; the process leading payment's outbox relay is
//! killed (SIGKILL) and the other takes the lead. Every saga ends once,
//! with exactly one charge, reservation and shipment each, and the
//! invariants hold.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use saga_tests::{ChildService, DEADLINE, Stack, eventually};
use sqlx::PgPool;
use uuid::Uuid;

const SAGAS: u64 = 300;
const EVERY: Duration = Duration::from_millis(10);
const REPLICATED: [&str; 3] = ["payment", "inventory", "shipping"];

/// The process id of the replica leading `service`'s outbox relay: the
/// session of this database (other tests' share the cluster) holding an
/// advisory lock whose application name says so.
async fn relay_leader(pool: &PgPool, service: &str) -> Result<Option<u32>> {
    let name: Option<String> = sqlx::query_scalar(
        "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a USING (pid)
         WHERE l.locktype = 'advisory' AND l.granted AND a.application_name LIKE $1
           AND a.datname = current_database()",
    )
    .bind(format!("{service} relay, pid %"))
    .fetch_optional(pool)
    .await?;
    name.map(|n| {
        n.rsplit(' ')
            .next()
            .and_then(|pid| pid.parse().ok())
            .with_context(|| format!("no pid in {n:?}"))
    })
    .transpose()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_of_each_service_apply_every_event_once_and_a_killed_relay_leader_is_replaced()
-> Result<()> {
    let mut stack = Stack::for_steady_sagas(SAGAS).await?;
    for service in REPLICATED {
        stack.stop_service(service).await?;
    }
    let mut replicas: Vec<ChildService> = Vec::new();
    for service in REPLICATED {
        for _ in 0..2 {
            replicas.push(stack.spawn_process(service, &[])?);
        }
    }
    let payment = stack.pool("payment").await?;
    // (The in-process payment, stopped, may still show for a moment.)
    let pids: Vec<u32> = replicas.iter().filter_map(ChildService::pid).collect();
    let leader = eventually("a payment replica to lead the relay", DEADLINE, || async {
        let leader = relay_leader(&payment, "payment").await?;
        Ok(leader.filter(|pid| pids.contains(pid)))
    })
    .await?;

    let start = Instant::now();
    let placing = stack.place_steadily(SAGAS, EVERY, start);
    let takeover = async {
        tokio::time::sleep_until((start + Duration::from_secs(1)).into()).await;
        let at = replicas
            .iter()
            .position(|r| r.pid() == Some(leader))
            .context("the relay leader is not one of the replicas")?;
        replicas.remove(at).kill().await?;
        let killed = Instant::now();
        let next = eventually("another replica to lead the relay", DEADLINE, || async {
            Ok(relay_leader(&payment, "payment")
                .await?
                .filter(|pid| *pid != leader))
        })
        .await?;
        anyhow::Ok((next, killed.elapsed()))
    };
    let (placed, took_over) = tokio::join!(placing, takeover);
    let (next, took) = took_over?;
    let placed: Vec<Uuid> = placed.into_iter().collect::<Result<_>>()?;
    eprintln!("relay of payment: pid {leader} killed, pid {next} led {took:?} later");
    // The relay's poll (OUTBOX_POLL_MS, 1 s) bounds it, with the next
    // commit usually sooner.
    assert!(took < Duration::from_secs(5), "{took:?}");

    let mut confirmed = 0;
    for id in &placed {
        let order = stack.wait_for_outcome(*id).await?;
        assert!(
            ["CONFIRMED", "CANCELLED"].contains(&order["status"].as_str().unwrap_or_default()),
            "{order}"
        );
        confirmed += usize::from(order["status"] == "CONFIRMED");
    }
    stack.settle().await?;
    assert!(confirmed > 0 && confirmed < placed.len(), "{confirmed}");
    // One effect per saga whatever replica applied it.
    assert_eq!(stack.rows("payment", "payments").await?, SAGAS as i64);
    assert_eq!(stack.shipments_created().await?, confirmed as i64);
    // No step taken twice: each saga's events are of distinct types.
    let mut seen = std::collections::HashSet::new();
    for (_, event) in stack.stream_events().await? {
        let step = (event.metadata.correlation_id, event.event_type.clone());
        assert!(seen.insert(step), "{} twice", event.event_type);
    }
    stack.assert_invariants().await
}
