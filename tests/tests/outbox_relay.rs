//! The outbox relay against a live broker and database: replicas, order, restarts.

use std::{collections::HashMap, str::FromStr, time::Duration};

use anyhow::Result;
use common::{
    Envelope, Event,
    event::OrderCancelled,
    outbox::{self, OutboxSignal, Relay},
};
use saga_tests::{DEADLINE, Stack, eventually};
use sqlx::postgres::PgConnectOptions;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const AGGREGATES: usize = 5;
const PER_AGGREGATE: usize = 40;

/// A broker with the streams and a database with the outbox: no services.
async fn outbox_only() -> Result<(Stack, sqlx::PgPool)> {
    let stack = Stack::start_with(&[]).await?;
    let pool = stack.pool("payment").await?;
    common::service::COMMON_MIGRATIONS.run(&pool).await?;
    common::topology::apply_streams(&stack.js, &stack.subjects).await?;
    Ok((stack, pool))
}

/// A relay of the outbox database, woken by nothing but its `poll`.
fn relay(stack: &Stack, poll: Duration) -> Result<Relay> {
    Ok(Relay {
        options: PgConnectOptions::from_str(&stack.dbs.url("payment"))?,
        js: stack.js.clone(),
        signal: OutboxSignal::default(),
        poll,
        health: Default::default(),
        meter: common::meter::Meter::new("payment"),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_on_one_database_publish_each_event_once_in_per_aggregate_order() -> Result<()> {
    let (stack, pool) = outbox_only().await?;

    // Interleaved events of several aggregates, committed one by one.
    let mut conn = pool.acquire().await?;
    for i in 0..AGGREGATES * PER_AGGREGATE {
        let aggregate = format!("agg-{}", i % AGGREGATES);
        let event = Event::OrderCancelled(OrderCancelled {
            order_id: Uuid::nil(),
            reason: format!("#{i}"),
        });
        let version = (i / AGGREGATES + 1) as i64;
        let env = Envelope::new(&event, aggregate, version, Uuid::nil(), Uuid::nil());
        outbox::enqueue(&mut conn, &stack.subjects, &[env], 1 << 20)
            .await?
            .map_err(anyhow::Error::msg)?;
    }
    drop(conn);

    // Two replicas' relays race for the same outbox.
    let shutdown = CancellationToken::new();
    let mut relays = Vec::new();
    for _ in 0..2 {
        let relay = relay(&stack, Duration::from_millis(20))?;
        relays.push(tokio::spawn(relay.run(shutdown.clone())));
    }
    eventually("the outbox to drain", DEADLINE, || async {
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
            .fetch_one(&pool)
            .await?;
        Ok((left == 0).then_some(()))
    })
    .await?;
    shutdown.cancel();
    for r in relays {
        r.await?;
    }

    let published = stack.stream_events().await?;
    assert_eq!(
        published.len(),
        AGGREGATES * PER_AGGREGATE,
        "each event exactly once"
    );
    let mut versions: HashMap<String, Vec<i64>> = HashMap::new();
    for (_, env) in &published {
        versions
            .entry(env.aggregate_id.clone())
            .or_default()
            .push(env.version);
    }
    for (aggregate, seen) in versions {
        let expected: Vec<i64> = (1..=PER_AGGREGATE as i64).collect();
        assert_eq!(seen, expected, "{aggregate} out of order");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_committed_while_no_relay_ran_are_published_when_one_starts() -> Result<()> {
    let (stack, pool) = outbox_only().await?;
    let mut conn = pool.acquire().await?;
    let event = Event::OrderCancelled(OrderCancelled {
        order_id: Uuid::nil(),
        reason: "left behind by a crash".into(),
    });
    let env = Envelope::new(&event, "agg", 1, Uuid::nil(), Uuid::nil());
    outbox::enqueue(
        &mut conn,
        &stack.subjects,
        std::slice::from_ref(&env),
        1 << 20,
    )
    .await?
    .map_err(anyhow::Error::msg)?;
    drop(conn);

    // No wake-up signal: only the start-up pass (and the poll) can find it.
    let shutdown = CancellationToken::new();
    let relay = relay(&stack, Duration::from_secs(3600))?;
    let handle = tokio::spawn(relay.run(shutdown.clone()));
    let published = eventually("the leftover event", DEADLINE, || async {
        let events = stack.stream_events().await?;
        Ok((!events.is_empty()).then_some(events))
    })
    .await?;
    shutdown.cancel();
    handle.await?;
    assert_eq!(published.len(), 1);
    assert_eq!(published[0].1.event_id, env.event_id);
    Ok(())
}
