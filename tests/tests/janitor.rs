//! The janitor: guard rows and cancel records are kept as long as their
//! event can come back (as long as the events and dead-letter streams hold
//! messages now, plus a margin; as long as dead letters may be kept while a
//! redrive is in the events stream), then deleted; each service sweeps by
//! itself; under sustained load the guard tables and Redis stay flat.

use std::time::Duration;

use anyhow::{Context, Result};
use chrono::Utc;
use common::janitor::{self, MARGIN, Swept};
use saga_tests::{DEADLINE, Stack, eventually};
use sqlx::PgPool;
use uuid::Uuid;

const DAY: Duration = Duration::from_secs(24 * 3600);

/// A guard row and a cancel record, recorded `days_ago` (fractional).
async fn recorded(pool: &PgPool, days_ago: f64) -> Result<()> {
    sqlx::query(
        "INSERT INTO consumed_events (consumer, event_id, event_type, consumed_at)
         VALUES ('payment', $1, 'OrderPlaced', now() - make_interval(secs => $2 * 86400))",
    )
    .bind(Uuid::now_v7())
    .bind(days_ago)
    .execute(pool)
    .await?;
    sqlx::query(
        "INSERT INTO cancelled_orders (order_id, reason, cancelled_at)
         VALUES ($1, 'changed my mind', now() - make_interval(secs => $2 * 86400))",
    )
    .bind(Uuid::now_v7())
    .bind(days_ago)
    .execute(pool)
    .await?;
    Ok(())
}

async fn kept(pool: &PgPool) -> Result<(i64, i64)> {
    Ok(sqlx::query_as(
        "SELECT (SELECT count(*) FROM consumed_events), (SELECT count(*) FROM cancelled_orders)",
    )
    .fetch_one(pool)
    .await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_can_no_longer_come_back_is_deleted_as_the_clock_moves_and_nothing_sooner()
-> Result<()> {
    let stack = Stack::start_with(&["payment"]).await?;
    let pool = stack.pool("payment").await?;
    // Nothing in either stream: nothing can come back, only the margin is kept.
    let horizon = janitor::horizon(&stack.js, &stack.subjects)
        .await
        .context("the broker says what it holds")?;
    assert_eq!(
        horizon.guard,
        Some(horizon.events.max(horizon.dead_letters))
    );
    assert!(horizon.events < Duration::from_secs(60), "{horizon:?}");
    let keep = chrono::Duration::from_std(horizon.guard.unwrap_or_default() + MARGIN)?;
    for days_ago in [1.0, 0.08, 0.0] {
        recorded(&pool, days_ago).await?;
    }
    let now = Utc::now();
    let swept = janitor::sweep(&pool, now - keep).await?;
    assert_eq!(
        swept,
        Swept {
            consumed_events: 1,
            cancelled_orders: 1
        }
    );
    assert_eq!(kept(&pool).await?, (2, 2), "within the margin");
    assert_eq!(janitor::sweep(&pool, now - keep).await?, Swept::default());
    // An hour later, the records of about two hours ago are past it; a
    // day later, all.
    let later = now + chrono::Duration::hours(1) - keep;
    assert_eq!(janitor::sweep(&pool, later).await?.consumed_events, 1);
    assert_eq!(kept(&pool).await?, (1, 1));
    let day = now + chrono::Duration::days(1) - keep;
    assert_eq!(janitor::sweep(&pool, day).await?.cancelled_orders, 1);
    assert_eq!(kept(&pool).await?, (0, 0));
    Ok(())
}

/// Publishes `body` on `subject` and waits for the broker to store it.
async fn stored(stack: &Stack, subject: String, body: &'static [u8]) -> Result<()> {
    stack.js.publish(subject, body.into()).await?.await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_oldest_dead_letter_holds_the_guard_back() -> Result<()> {
    let stack = Stack::start_with(&["payment"]).await?;
    stored(&stack, stack.subjects.dead_letter("payment"), b"{}").await?;
    let horizon = eventually("the dead letter to be a second old", DEADLINE, || async {
        let h = janitor::horizon(&stack.js, &stack.subjects).await;
        Ok(h.filter(|h| h.dead_letters >= Duration::from_secs(1)))
    })
    .await?;
    assert_eq!(horizon.events, Duration::ZERO, "{horizon:?}");
    assert_eq!(horizon.guard, Some(horizon.dead_letters));
    Ok(())
}

/// A redrive publishes an old event anew: while its record is in the events
/// stream, consumers that applied the event long ago must still know it,
/// so rows are kept as long as dead letters may be (or for ever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_a_redrive_is_in_the_events_stream_rows_are_kept_as_long_as_dead_letters_may_be()
-> Result<()> {
    let stack = Stack::start_with(&["payment"]).await?;
    stored(&stack, stack.subjects.operator(common::dlq::REDRIVE), b"{}").await?;
    let horizon = janitor::horizon(&stack.js, &stack.subjects)
        .await
        .context("the broker says what it holds")?;
    assert!(horizon.guard >= Some(30 * DAY), "{horizon:?}");

    let name = stack.subjects.dead_letter_stream();
    let mut config = stack
        .js
        .get_stream(&name)
        .await?
        .cached_info()
        .config
        .clone();
    config.max_age = Duration::ZERO;
    stack.js.update_stream(config).await?;
    let horizon = janitor::horizon(&stack.js, &stack.subjects)
        .await
        .context("the broker says what it holds")?;
    assert_eq!(
        horizon.guard, None,
        "dead letters kept for ever: so are the rows"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_service_sweeps_by_itself_and_counts_what_it_deleted() -> Result<()> {
    let mut stack = Stack::start_with(&["payment"]).await?;
    let pool = stack.pool("payment").await?;
    recorded(&pool, 40.0).await?;
    recorded(&pool, 0.0).await?;
    stack.stop_service("payment").await?;
    stack
        .start_service_with("payment", |l| {
            l.config.janitor_every = Duration::from_secs(1)
        })
        .await?;
    eventually("the janitor to sweep", DEADLINE, || async {
        Ok((kept(&pool).await? == (1, 1)).then_some(()))
    })
    .await?;
    stack
        .metrics_until("payment", "the deletions to be counted", |m| {
            m.sum(
                common::meter::names::JANITOR_DELETED,
                &[("table", "consumed_events")],
            ) == 1.0
                && m.sum(
                    common::meter::names::JANITOR_DELETED,
                    &[("table", "cancelled_orders")],
                ) == 1.0
        })
        .await?;
    Ok(())
}

const WAVES: usize = 7;
const PER_WAVE: u64 = 100;
/// The events stream holds this many messages: about two and a half waves.
const STREAM_HOLDS: i64 = 1_500;
/// After this wave the stream is full and discards its oldest.
const FULL_AFTER: usize = 3;

/// Places `sagas` sagas one every `every` and waits until every one has
/// ended and the system has settled: their ids.
async fn sagas_through(stack: &Stack, sagas: u64, every: Duration) -> Result<Vec<Uuid>> {
    let placed = stack
        .place_steadily(sagas, every, std::time::Instant::now())
        .await;
    let placed: Vec<Uuid> = placed.into_iter().collect::<Result<_>>()?;
    stack.every_saga_ended(&placed, DEADLINE).await?;
    stack.settle().await?;
    Ok(placed)
}

/// Guard rows over the four databases.
async fn guard_rows(stack: &Stack) -> Result<i64> {
    let mut total = 0;
    for service in saga_tests::SERVICES {
        total += stack.rows(service, "consumed_events").await?;
    }
    Ok(total)
}

/// Redis's done-markers and claims of this stack, and the memory Redis uses.
async fn redis_keys(stack: &Stack) -> Result<(i64, i64)> {
    let client = redis::Client::open(stack.redis.url())?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let pattern = format!("{}:idem:*", stack.config("payment").redis_key_prefix);
    let mut cursor: u64 = 0;
    let mut keys = 0;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1_000)
            .query_async(&mut conn)
            .await?;
        keys += batch.len() as i64;
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(&mut conn)
        .await?;
    let used = info
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    Ok((keys, used))
}

/// A bounded soak: waves of sagas through an events stream that holds about
/// two and a half of them. Once it is full, what the services keep to
/// recognise a redelivery (guard rows, Redis markers) stays about what the
/// stream holds, wave after wave, instead of growing with every saga.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_sustained_load_the_guard_and_redis_stay_as_large_as_the_stream_holds() -> Result<()>
{
    let mut stack = Stack::for_steady_sagas(WAVES as u64 * PER_WAVE).await?;
    let events = stack.subjects.events_stream();
    let mut config = stack
        .js
        .get_stream(&events)
        .await?
        .cached_info()
        .config
        .clone();
    config.max_messages = STREAM_HOLDS;
    stack.js.update_stream(config).await?;
    for service in saga_tests::SERVICES {
        stack.stop_service(service).await?;
        stack
            .start_service_with(service, |l| {
                l.config.janitor_every = Duration::from_secs(1);
                l.config.janitor_margin = Duration::ZERO;
            })
            .await?;
    }

    let mut full = None;
    for wave in 1..=WAVES {
        sagas_through(&stack, PER_WAVE, Duration::from_millis(10)).await?;
        let (guard, (keys, memory)) = (guard_rows(&stack).await?, redis_keys(&stack).await?);
        eprintln!("wave {wave}: {guard} guard rows, {keys} redis keys, redis uses {memory} bytes");
        match (wave, full) {
            (FULL_AFTER, _) => full = Some((guard, keys)),
            (w, Some((guard_full, keys_full))) if w > FULL_AFTER => {
                // Each later wave: back within half again of the full
                // stream's once the janitor and the markers' TTL caught up
                // (kept for good, the fourth wave alone would be 4/3 and
                // the seventh 7/3 of it).
                let within = |full: i64, now: i64| now * 2 <= full * 3;
                eventually(
                    &format!("the guard and redis after wave {wave} to stay within 1.5x of wave {FULL_AFTER}'s"),
                    DEADLINE,
                    || async {
                        let guard = guard_rows(&stack).await?;
                        let (keys, _) = redis_keys(&stack).await?;
                        Ok((within(guard_full, guard) && within(keys_full, keys))
                            .then_some(()))
                    },
                )
                .await?;
            }
            _ => {}
        }
    }
    stack.assert_invariants().await
}

/// Redis at its memory limit evicts markers (every key it holds expires,
/// and the shipped policy is `volatile-lru`): what it forgets the Postgres
/// guard still knows, so every saga ends with each step taken once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_at_its_memory_limit_evicts_markers_and_no_step_is_taken_twice() -> Result<()> {
    let stack = Stack::for_steady_sagas(2 * PER_WAVE).await?;
    let client = redis::Client::open(stack.redis.url())?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let (_, used) = redis_keys(&stack).await?;
    // Room for a few hundred markers beyond what it holds now.
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg(used + 64 * 1024)
        .query_async::<()>(&mut conn)
        .await?;
    let policy: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("maxmemory-policy")
        .query_async(&mut conn)
        .await?;
    assert_eq!(policy.get(1).map(String::as_str), Some("volatile-lru"));

    let placed = sagas_through(&stack, 2 * PER_WAVE, Duration::from_millis(5)).await?;
    let stats: String = redis::cmd("INFO")
        .arg("stats")
        .query_async(&mut conn)
        .await?;
    let evicted: i64 = stats
        .lines()
        .find_map(|l| l.strip_prefix("evicted_keys:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    eprintln!("redis evicted {evicted} keys");
    assert!(evicted > 0, "the limit was never reached");
    // No step of a saga taken twice: each saga's events are of distinct types.
    let mut seen = std::collections::HashSet::new();
    for (_, event) in stack.stream_events().await? {
        let step = (event.metadata.correlation_id, event.event_type.clone());
        assert!(seen.insert(step), "{} twice", event.event_type);
    }
    assert_eq!(
        stack.rows("payment", "payments").await?,
        placed.len() as i64
    );
    stack.assert_invariants().await
}
