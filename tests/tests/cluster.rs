//! The services on a 3-node JetStream cluster, every stream in 3 copies,
//! while sagas are placed at a steady rate: the node leading the events
//! stream is killed (SIGKILL) and, once another leads, started again until
//! it holds a current copy; then a node that does not lead it is killed and
//! stays down until every saga has ended, and comes back to a full copy. Afterwards every saga has
//! ended, every event the order service recorded is in the stream, no
//! outbox holds an event, `sagactl audit` finds the services in agreement
//! (nothing charged, reserved or shipped twice) and the invariants hold.
//!
//! 300 sagas; `CLUSTER_SAGAS` (10 to 100,000) for another count.

use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use async_nats::jetstream::stream::RawMessageErrorKind;
use saga_tests::{DEADLINE, Stack, eventually};
use uuid::Uuid;

const SAGAS: u64 = 300;
/// One placement every this often: 40 a second, so that sagas are still
/// being placed while a new leader is elected (4 to 9 s, nats-server's
/// election timeout) and while the old one catches up.
const EVERY: Duration = Duration::from_millis(25);
/// How long the system may take to end every saga after the faults.
const RECOVERY: Duration = Duration::from_secs(180);

/// The node leading the events stream, as any node that answers says.
async fn events_leader(stack: &Stack) -> Result<Option<String>> {
    let answer = tokio::time::timeout(Duration::from_secs(2), async {
        let mut stream = stack.js.get_stream(stack.subjects.events_stream()).await?;
        anyhow::Ok(stream.info().await?.cluster.clone())
    })
    .await;
    Ok(match answer {
        Ok(Ok(Some(cluster))) => cluster.leader,
        _ => None,
    })
}

/// Waits until some node other than `not` leads the events stream.
async fn new_leader(stack: &Stack, not: Option<&str>) -> Result<String> {
    eventually("a node to lead the events stream", DEADLINE, || async {
        Ok(events_leader(stack)
            .await?
            .filter(|l| Some(l.as_str()) != not))
    })
    .await
}

/// Waits until node `name` leads the events stream or holds a current
/// copy of it.
async fn caught_up(stack: &Stack, name: &str) -> Result<()> {
    eventually(
        &format!("{name} to hold a current copy of the events stream"),
        RECOVERY,
        || async {
            let Ok(Ok(info)) = tokio::time::timeout(Duration::from_secs(2), async {
                let mut stream = stack.js.get_stream(stack.subjects.events_stream()).await?;
                anyhow::Ok(stream.info().await?.clone())
            })
            .await
            else {
                return Ok(None);
            };
            let cluster = info.cluster.unwrap_or_default();
            let current = cluster.leader.as_deref() == Some(name)
                || cluster
                    .replicas
                    .iter()
                    .any(|r| r.name == name && r.current && r.lag.unwrap_or(0) == 0);
            Ok(current.then_some(()))
        },
    )
    .await
}

/// The event ids the events stream holds, and how many messages carry them.
async fn stream_event_ids(stack: &Stack) -> Result<(HashSet<Uuid>, u64)> {
    let stream = stack.js.get_stream(stack.subjects.events_stream()).await?;
    let last = stream.get_info().await?.state.last_sequence;
    let (mut ids, mut messages) = (HashSet::new(), 0);
    for seq in 1..=last {
        match stream.get_raw_message(seq).await {
            Ok(m) => {
                messages += 1;
                let id = m
                    .headers
                    .get("Nats-Msg-Id")
                    .with_context(|| format!("message {seq} has no Nats-Msg-Id"))?;
                ids.insert(id.as_str().parse()?);
            }
            Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok((ids, messages))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sagas_survive_losing_the_stream_leader_and_another_node_of_the_cluster() -> Result<()> {
    let sagas = saga_tests::sagas_from_env("CLUSTER_SAGAS", SAGAS);
    let stack = Stack::for_steady_sagas_on_cluster(sagas).await?;
    for name in [
        stack.subjects.events_stream(),
        stack.subjects.dead_letter_stream(),
        stack.subjects.catalog_stream(),
    ] {
        let mut stream = stack.js.get_stream(&name).await?;
        let info = stream.info().await?;
        assert_eq!(info.config.num_replicas, 3, "{name}");
        let cluster = info
            .cluster
            .clone()
            .context("stream info without cluster")?;
        assert_eq!(cluster.replicas.len(), 2, "{name}: {cluster:?}");
    }

    let window = EVERY * sagas as u32;
    let at = |share: f64| window.mul_f64(share);
    let start = Instant::now();
    let placing = stack.place_steadily(sagas, EVERY, start);
    let mut log: Vec<String> = Vec::new();
    let mut note =
        |what: String| log.push(format!("{:>6} ms  {what}", start.elapsed().as_millis()));
    let cluster_faults = async {
        tokio::time::sleep_until((start + at(0.1)).into()).await;
        let leader = new_leader(&stack, None).await?;
        let cluster = stack.nats.cluster().context("a cluster")?;
        cluster.kill(&leader)?;
        let killed_at = Instant::now();
        note(format!("kill -9 {leader}, the events stream's leader"));
        let next = new_leader(&stack, Some(&leader)).await?;
        note(format!(
            "{next} leads the events stream, {} ms after the kill",
            killed_at.elapsed().as_millis()
        ));
        tokio::time::sleep_until((start + at(0.4)).into()).await;
        cluster.start_node(&leader).await?;
        note(format!("{leader} started again"));
        caught_up(&stack, &leader).await?;
        note(format!(
            "{leader} holds a current copy of the events stream"
        ));

        tokio::time::sleep_until((start + at(0.6)).into()).await;
        let leader = new_leader(&stack, None).await?;
        let follower = cluster
            .names()
            .into_iter()
            .find(|n| *n != leader)
            .context("a node that does not lead")?;
        cluster.kill(&follower)?;
        note(format!(
            "kill -9 {follower}, which does not lead the events stream ({leader} does)"
        ));
        anyhow::Ok(follower)
    };
    let (placed, faulted) = tokio::join!(placing, cluster_faults);
    let story = |log: &[String]| log.join("\n");
    let follower = faulted.map_err(|e| anyhow::anyhow!("{e:#}\n{}", story(&log)))?;
    let placed: Vec<Uuid> = placed.into_iter().collect::<Result<_>>()?;

    // Every saga ends on the two nodes left.
    let outcomes = stack
        .every_saga_ended(&placed, RECOVERY)
        .await
        .map_err(|e| anyhow::anyhow!("{e:#}\n{}", story(&log)))?;
    log.push(format!(
        "{:>6} ms  every saga ended with {follower} down: {outcomes:?}",
        start.elapsed().as_millis()
    ));

    // The node comes back and catches up to a full copy.
    stack
        .nats
        .cluster()
        .context("a cluster")?
        .start_node(&follower)
        .await?;
    caught_up(&stack, &follower).await?;
    log.push(format!(
        "{:>6} ms  {follower} started again and holds a current copy",
        start.elapsed().as_millis()
    ));
    eventually("the system to settle", RECOVERY, || async {
        Ok((stack.is_settled().await? && stack.is_settled().await?).then_some(()))
    })
    .await?;
    eprintln!("{}", story(&log));

    // Every event the order service recorded (and the relay had
    // acknowledged before it deleted the outbox row) is in the stream.
    let (in_stream, messages) = stream_event_ids(&stack).await?;
    let recorded: Vec<Uuid> = sqlx::query_scalar("SELECT event_id FROM order_events")
        .fetch_all(&stack.pool("order").await?)
        .await?;
    let missing: Vec<&Uuid> = recorded
        .iter()
        .filter(|id| !in_stream.contains(id))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} recorded events are not in the stream: {:?}",
        missing.len(),
        recorded.len(),
        &missing[..missing.len().min(10)]
    );
    eprintln!(
        "{} events in the stream ({messages} messages), {} of them the order service's",
        in_stream.len(),
        recorded.len()
    );
    // Everything committed was published: no outbox holds an event.
    for service in saga_tests::SERVICES {
        let unpublished: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
            .fetch_one(&stack.pool(service).await?)
            .await?;
        assert_eq!(unpublished, 0, "{service} has events left unpublished");
    }

    let audit = stack.audit().await?;
    eprintln!("{audit}");
    assert!(audit.contains("all invariants hold"), "{audit}");
    assert_eq!(outcomes.values().sum::<i64>(), sagas as i64);
    assert!(outcomes["CONFIRMED"] > 0 && outcomes["CANCELLED"] > 0);
    assert!(
        !outcomes.contains_key("REQUIRES_INTERVENTION"),
        "{outcomes:?}"
    );
    stack.assert_invariants().await
}
