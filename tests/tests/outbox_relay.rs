//! The outbox relay against a live broker and database: replicas, order, restarts.

use std::{collections::HashMap, str::FromStr, time::Duration};

use anyhow::Result;
use async_nats::{HeaderMap, header::NATS_MESSAGE_ID};
use common::{
    Envelope, Event, EventKind,
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
    Ok((stack, pool))
}

/// A relay of the outbox database, woken by nothing but its `poll`.
fn relay(stack: &Stack, poll: Duration) -> Result<Relay> {
    Ok(Relay {
        name: "payment relay".into(),
        lease: outbox::LEASE,
        options: PgConnectOptions::from_str(&stack.dbs.url("payment"))?,
        js: stack.js.clone(),
        subjects: stack.subjects.clone(),
        signal: OutboxSignal::default(),
        poll,
        health: Default::default(),
        meter: common::meter::Meter::new("payment"),
        vacuum_after: outbox::VACUUM_AFTER,
        delete_linger: outbox::DELETE_LINGER,
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
        outbox::enqueue(&mut conn, &stack.subjects, &[env], 1 << 20).await?;
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
        let left = outbox_rows(&pool).await?;
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
    .await?;
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

/// Each event in the stream, in order: its id, and the atomic batch it was
/// stored with, if any.
async fn stored(stack: &Stack) -> Result<Vec<(Uuid, Option<String>)>> {
    let stream = stack.js.get_stream(stack.subjects.events_stream()).await?;
    let last = stream.get_info().await?.state.last_sequence;
    let mut out = Vec::new();
    for seq in 1..=last {
        let m = stream.get_raw_message(seq).await?;
        let env: Envelope = serde_json::from_slice(&m.payload)?;
        let batch = m.headers.get("Nats-Batch-Id").map(|v| v.to_string());
        out.push((env.event_id, batch));
    }
    Ok(out)
}

/// `n` events of different aggregates, as a service would commit them.
fn events(n: usize) -> Vec<Envelope> {
    (0..n)
        .map(|i| {
            let event = Event::OrderCancelled(OrderCancelled {
                order_id: Uuid::nil(),
                reason: format!("#{i}"),
            });
            Envelope::new(&event, format!("agg-{i}"), 1, Uuid::nil(), Uuid::nil())
        })
        .collect()
}

/// Commits `events` to the outbox and runs a relay until it is empty.
async fn relay_all(stack: &Stack, pool: &sqlx::PgPool, events: &[Envelope]) -> Result<()> {
    let mut conn = pool.acquire().await?;
    outbox::enqueue(&mut conn, &stack.subjects, events, 1 << 20).await?;
    drop(conn);
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(relay(stack, Duration::from_millis(20))?.run(shutdown.clone()));
    eventually("the outbox to drain", DEADLINE, || async {
        let left = outbox_rows(pool).await?;
        Ok((left == 0).then_some(()))
    })
    .await?;
    shutdown.cancel();
    handle.await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_is_stored_as_one_batch_a_few_events_and_a_batch_the_broker_partly_has_one_by_one()
-> Result<()> {
    let (stack, pool) = outbox_only().await?;

    // A relay died after publishing events 3 to 5 and before deleting
    // their rows: the broker has them, and the next relay publishes them
    // again with the rest. The broker refuses that batch as a whole (it
    // holds duplicates); one by one, each duplicate is dropped on its own.
    let first = events(10);
    for env in &first[3..6] {
        let mut headers = HeaderMap::new();
        headers.insert(NATS_MESSAGE_ID, env.event_id.to_string().as_str());
        let subject = stack
            .subjects
            .event_of(EventKind::OrderCancelled, Uuid::nil());
        stack
            .js
            .publish_with_headers(subject, headers, env.to_bytes().into())
            .await?
            .await?;
    }
    relay_all(&stack, &pool, &first).await?;
    let after_first = stored(&stack).await?;
    let ids: Vec<Uuid> = after_first.iter().map(|(id, _)| *id).collect();
    let mut expected: Vec<Uuid> = first[3..6].iter().map(|e| e.event_id).collect();
    expected.extend(first[..3].iter().chain(&first[6..]).map(|e| e.event_id));
    assert_eq!(
        ids, expected,
        "each event once, the ones already there first"
    );
    assert!(
        after_first.iter().all(|(_, batch)| batch.is_none()),
        "{after_first:?}"
    );

    // A round the broker has none of: stored as one atomic batch.
    let second = events(10);
    relay_all(&stack, &pool, &second).await?;
    let all = stored(&stack).await?;
    let added = &all[after_first.len()..];
    let ids: Vec<Uuid> = added.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, second.iter().map(|e| e.event_id).collect::<Vec<_>>());
    let batch = added[0].1.clone();
    assert!(batch.is_some(), "stored as an atomic batch");
    assert!(added.iter().all(|(_, b)| *b == batch), "{added:?}");

    // A round of a few events: one by one, which costs the broker less
    // than staging a batch.
    let third = events(3);
    relay_all(&stack, &pool, &third).await?;
    let added = &stored(&stack).await?[all.len()..];
    let ids: Vec<Uuid> = added.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, third.iter().map(|e| e.event_id).collect::<Vec<_>>());
    assert!(added.iter().all(|(_, b)| b.is_none()), "{added:?}");
    Ok(())
}

/// The outbox's size in pages, and how often it was vacuumed by hand (not
/// by autovacuum).
async fn outbox_pages_and_vacuums(pool: &sqlx::PgPool) -> Result<(i64, i64)> {
    Ok(sqlx::query_as(
        "SELECT pg_relation_size('outbox') / current_setting('block_size')::int8,
                vacuum_count
         FROM pg_stat_user_tables WHERE relname = 'outbox'",
    )
    .fetch_one(pool)
    .await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_vacuums_its_outbox_so_a_drained_outbox_gives_its_pages_back() -> Result<()> {
    let (stack, pool) = outbox_only().await?;
    let mut conn = pool.acquire().await?;
    outbox::enqueue(&mut conn, &stack.subjects, &events(600), 1 << 20).await?;
    drop(conn);
    let (filled, _) = outbox_pages_and_vacuums(&pool).await?;
    assert!(filled > 0, "600 events take pages");

    // Every 500 rows deleted: once in this run.
    let shutdown = CancellationToken::new();
    let mut relay = relay(&stack, Duration::from_millis(20))?;
    relay.vacuum_after = 500;
    let handle = tokio::spawn(relay.run(shutdown.clone()));
    // Dead rows would keep every page (autovacuum may be off, and is
    // never this quick): only the relay's vacuum gives them back. A vacuum
    // truncates the table before it counts itself in the statistics, so
    // both are waited for.
    let vacuums = eventually("the outbox to drain and shrink", DEADLINE, || async {
        let left = outbox_rows(&pool).await?;
        let (pages, vacuums) = outbox_pages_and_vacuums(&pool).await?;
        Ok((left == 0 && pages == 0 && vacuums > 0).then_some(vacuums))
    })
    .await?;
    assert_eq!(vacuums, 1, "vacuumed once, after 500 rows or more");
    shutdown.cancel();
    handle.await?;
    assert_eq!(stack.stream_events().await?.len(), 600, "all published");
    Ok(())
}

/// Rows in the outbox, published or not.
async fn outbox_rows(pool: &sqlx::PgPool) -> Result<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(pool)
        .await?)
}

/// What the broker acknowledged is deleted with the relay's next read of
/// the outbox (one statement for both), after its linger when nothing else
/// wakes it, and before it stops: nothing is left to publish twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_rows_are_deleted_with_the_next_read_after_a_linger_or_when_the_relay_stops()
-> Result<()> {
    let (stack, pool) = outbox_only().await?;
    let enqueue = |events: Vec<Envelope>| {
        let (pool, subjects) = (pool.clone(), stack.subjects.clone());
        async move {
            let mut conn = pool.acquire().await?;
            outbox::enqueue(&mut conn, &subjects, &events, 1 << 20).await?;
            anyhow::Ok(())
        }
    };
    let published = |n: usize| {
        let stack = &stack;
        eventually("the events in the stream", DEADLINE, move || async move {
            Ok((stack.stream_events().await?.len() == n).then_some(()))
        })
    };

    // Woken by commits alone: no poll, no lease renewal, no linger in time.
    let shutdown = CancellationToken::new();
    let mut lingering = relay(&stack, Duration::from_secs(3600))?;
    lingering.lease = Duration::from_secs(3600);
    lingering.delete_linger = Duration::from_secs(3600);
    let signal = lingering.signal.clone();
    // Published by its first round, which is not woken.
    enqueue(events(3)).await?;
    let handle = tokio::spawn(lingering.run(shutdown.clone()));
    published(3).await?;
    assert_eq!(outbox_rows(&pool).await?, 3, "kept for the next read");
    enqueue(events(2)).await?;
    signal.notify();
    published(5).await?;
    assert_eq!(
        outbox_rows(&pool).await?,
        2,
        "the first three deleted by the second read"
    );
    // Published by its last round, as it stops, and deleted after it.
    enqueue(events(1)).await?;
    shutdown.cancel();
    handle.await?;
    assert_eq!(
        stack.stream_events().await?.len(),
        6,
        "flushed as it stopped"
    );
    assert_eq!(outbox_rows(&pool).await?, 0, "deleted before it stopped");

    // Nothing wakes it after a round: the linger does.
    let shutdown = CancellationToken::new();
    let mut relay = relay(&stack, Duration::from_secs(3600))?;
    relay.lease = Duration::from_secs(3600);
    relay.delete_linger = Duration::from_millis(50);
    enqueue(events(4)).await?;
    let handle = tokio::spawn(relay.run(shutdown.clone()));
    published(10).await?;
    eventually("the published rows deleted", DEADLINE, || async {
        Ok((outbox_rows(&pool).await? == 0).then_some(()))
    })
    .await?;
    shutdown.cancel();
    handle.await?;
    assert_eq!(stack.stream_events().await?.len(), 10, "each event once");
    Ok(())
}

/// Commits, as a consumer does, the guard of one consumed event and the
/// events it caused, in one statement: what the relay may take of them.
async fn consume(
    stack: &Stack,
    pool: &sqlx::PgPool,
    caused: &[Envelope],
) -> Result<outbox::Handover> {
    let consumed = events(1).remove(0);
    let mut tx = pool.begin().await?;
    let applied = [(&consumed, None, caused)];
    let enqueued =
        outbox::enqueue_once(&mut tx, &stack.subjects, "payment", &applied, 1 << 20).await?;
    let outbox::Enqueued::Done(handover) = enqueued else {
        anyhow::bail!("not enqueued: {enqueued:?}");
    };
    tx.commit().await?;
    Ok(handover)
}

/// An event of `aggregate`, numbered `n` (its version).
fn event_of(aggregate: &str, n: i64) -> Envelope {
    let event = Event::OrderCancelled(OrderCancelled {
        order_id: Uuid::nil(),
        reason: format!("{aggregate} #{n}"),
    });
    Envelope::new(&event, aggregate.to_string(), n, Uuid::nil(), Uuid::nil())
}

/// A relay that nothing wakes but commits: no poll, no lease renewal, no
/// linger in time; and once it has read the outbox, empty, it takes rows
/// handed over.
async fn relay_taking_handovers(
    stack: &Stack,
    shutdown: &CancellationToken,
) -> Result<(OutboxSignal, tokio::task::JoinHandle<()>)> {
    let mut relay = relay(stack, Duration::from_secs(3600))?;
    relay.lease = Duration::from_secs(3600);
    relay.delete_linger = Duration::from_secs(3600);
    let signal = relay.signal.clone();
    let handle = tokio::spawn(relay.run(shutdown.clone()));
    eventually("the relay to take rows handed over", DEADLINE, || async {
        Ok(signal.takes_handovers().then_some(()))
    })
    .await?;
    Ok((signal, handle))
}

/// The (aggregate, version) of each event in the stream, in its order.
async fn stream_order(stack: &Stack) -> Result<Vec<(String, i64)>> {
    Ok((stack.stream_events().await?.into_iter())
        .map(|(_, e)| (e.aggregate_id, e.version))
        .collect())
}

/// A consumer's commit hands its rows to the relay, which publishes them
/// without reading the outbox back: here they are gone from the outbox
/// before the relay runs, so only what was handed over can publish them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_handed_over_at_commit_are_published_without_reading_the_outbox_back() -> Result<()> {
    let (stack, pool) = outbox_only().await?;
    let shutdown = CancellationToken::new();
    let (signal, handle) = relay_taking_handovers(&stack, &shutdown).await?;

    let caused = [event_of("a", 1), event_of("b", 1), event_of("c", 1)];
    let handover = consume(&stack, &pool, &caused).await?;
    assert_eq!(handover.len(), 3, "each the first of its aggregate");
    assert!(!handover.leaves_rows_to_read());
    // Nothing woke the relay yet.
    sqlx::query("DELETE FROM outbox").execute(&pool).await?;
    signal.hand_over(handover);

    eventually("the rows handed over in the stream", DEADLINE, || async {
        Ok((stack.stream_events().await?.len() == 3).then_some(()))
    })
    .await?;
    assert_eq!(
        stream_order(&stack).await?,
        [("a".into(), 1), ("b".into(), 1), ("c".into(), 1)],
        "in the order they were written"
    );
    shutdown.cancel();
    handle.await?;
    Ok(())
}

/// A row written while an earlier event of its aggregate waits in the
/// outbox unpublished is not published from the hand-over, nor is the
/// second of two events of one aggregate written together: the relay reads
/// them, so each aggregate's events are published in the order they were
/// written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_behind_an_earlier_one_of_its_aggregate_is_read_not_handed_over_and_keeps_its_place()
-> Result<()> {
    let (stack, pool) = outbox_only().await?;
    let shutdown = CancellationToken::new();
    let (signal, handle) = relay_taking_handovers(&stack, &shutdown).await?;
    let in_stream = |n: usize| {
        let stack = &stack;
        eventually("the events in the stream", DEADLINE, move || async move {
            Ok((stack.stream_events().await?.len() == n).then_some(()))
        })
    };

    // Committed without waking the relay: it waits in the outbox.
    let mut conn = pool.acquire().await?;
    outbox::enqueue(&mut conn, &stack.subjects, &[event_of("x", 1)], 1 << 20).await?;
    drop(conn);
    let handover = consume(&stack, &pool, &[event_of("x", 2)]).await?;
    assert_eq!(handover.len(), 1);
    assert!(!handover.leaves_rows_to_read());
    signal.hand_over(handover);
    in_stream(2).await?;

    let handover = consume(&stack, &pool, &[event_of("y", 1), event_of("y", 2)]).await?;
    assert!(
        handover.leaves_rows_to_read(),
        "y #2 waits behind y #1, written with it"
    );
    assert_eq!(handover.len(), 1, "y #1 alone is handed over");
    signal.hand_over(handover);
    in_stream(4).await?;

    let order = stream_order(&stack).await?;
    for aggregate in ["x", "y"] {
        let versions: Vec<i64> = (order.iter())
            .filter(|(a, _)| a == aggregate)
            .map(|(_, v)| *v)
            .collect();
        assert_eq!(versions, [1, 2], "{aggregate} in order: {order:?}");
    }

    // Read, the outbox is clear again: what follows is handed over.
    eventually(
        "the relay to take rows handed over again",
        DEADLINE,
        || async { Ok(signal.takes_handovers().then_some(())) },
    )
    .await?;
    shutdown.cancel();
    handle.await?;
    Ok(())
}

/// A row written behind an earlier event of its aggregate that the relay
/// has published, and not yet deleted, is published from the hand-over:
/// here it is gone from the outbox before it is handed over, so only the
/// hand-over can publish it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_behind_one_its_relay_has_published_is_handed_over_too() -> Result<()> {
    let (stack, pool) = outbox_only().await?;
    let shutdown = CancellationToken::new();
    let (signal, handle) = relay_taking_handovers(&stack, &shutdown).await?;

    signal.hand_over(consume(&stack, &pool, &[event_of("p", 1)]).await?);
    eventually("p #1 in the stream", DEADLINE, || async {
        Ok((stack.stream_events().await?.len() == 1).then_some(()))
    })
    .await?;
    assert_eq!(outbox_rows(&pool).await?, 1, "p #1 lingers in the outbox");

    let second = event_of("p", 2);
    let handover = consume(&stack, &pool, std::slice::from_ref(&second)).await?;
    assert_eq!(handover.len(), 1, "p #2 is handed over, after p #1");
    assert!(!handover.leaves_rows_to_read());
    sqlx::query("DELETE FROM outbox WHERE event_id = $1")
        .bind(second.event_id)
        .execute(&pool)
        .await?;
    signal.hand_over(handover);

    eventually("p #2 in the stream", DEADLINE, || async {
        Ok((stack.stream_events().await?.len() == 2).then_some(()))
    })
    .await?;
    assert_eq!(
        stream_order(&stack).await?,
        [("p".into(), 1), ("p".into(), 2)]
    );
    shutdown.cancel();
    handle.await?;
    Ok(())
}
