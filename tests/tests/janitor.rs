//! The janitor: guard rows and cancel records are kept as long as their
//! event can come back (the longer retention of the events and dead-letter
//! streams, plus a margin), then deleted; a stream that keeps events forever
//! means nothing is deleted; each service sweeps by itself.

use std::time::Duration;

use anyhow::Result;
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
    // The dead-letter stream keeps the longest (30 days): a dead letter can
    // be redriven that long, so its event's guard rows stay that long.
    let retention = janitor::retention(&stack.js, &stack.subjects).await;
    assert_eq!(retention, Some(30 * DAY));
    let keep = chrono::Duration::from_std(30 * DAY + MARGIN)?;
    for days_ago in [40.0, 30.9, 0.0] {
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
    assert_eq!(kept(&pool).await?, (2, 2), "within retention and margin");
    assert_eq!(janitor::sweep(&pool, now - keep).await?, Swept::default());
    // A day later, the 30.9-day-old records are past it; a month later, all.
    let later = now + chrono::Duration::days(1) - keep;
    assert_eq!(janitor::sweep(&pool, later).await?.consumed_events, 1);
    assert_eq!(kept(&pool).await?, (1, 1));
    let month = now + chrono::Duration::days(32) - keep;
    assert_eq!(janitor::sweep(&pool, month).await?.cancelled_orders, 1);
    assert_eq!(kept(&pool).await?, (0, 0));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_keeps_events_forever_means_nothing_is_deleted() -> Result<()> {
    let stack = Stack::start_with(&["payment"]).await?;
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
    assert_eq!(janitor::retention(&stack.js, &stack.subjects).await, None);
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
        .start_service_with("payment", |c| c.janitor_every = Duration::from_secs(1))
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
