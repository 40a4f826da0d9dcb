//! Projections of the order event store: the read model (`orders`) and
//! `customer-stats` follow it from a checkpoint (and survive being cut off
//! mid-batch), and both are rebuilt from history while the service keeps
//! answering and writing.

use std::{
    collections::BTreeMap,
    sync::atomic::{AtomicBool, Ordering},
};

use anyhow::Result;
use common::meter::names;
use order::projection::{self, Batch, CustomerStats, OrdersView, Projection};
use saga_tests::{DEADLINE, Stack, eventually};
use serde_json::{Value, json};
use sqlx::Connection;
use uuid::Uuid;

/// What the stats of `customer` must be, from the read model's orders.
async fn expected_stats(stack: &Stack, customer: &str) -> Result<Value> {
    stack.projected().await?;
    let pool = stack.pool("order").await?;
    let (orders, confirmed, cancelled, spent): (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE status = 'CONFIRMED'),
                count(*) FILTER (WHERE status = 'CANCELLED'),
                coalesce(sum(total) FILTER (WHERE status = 'CONFIRMED'), 0)::bigint
         FROM orders WHERE customer_id = $1",
    )
    .bind(customer)
    .fetch_one(&pool)
    .await?;
    Ok(json!({"orders": orders, "confirmed": confirmed, "cancelled": cancelled, "spent": spent}))
}

/// The stats the projection serves, in the shape of [`expected_stats`].
async fn served_stats(stack: &Stack, customer: &str) -> Result<Option<Value>> {
    let (status, body) = stack
        .get_json("order", &format!("/customers/{customer}/stats"))
        .await?;
    Ok((status == 200).then(|| {
        json!({"orders": body["orders"], "confirmed": body["confirmed"],
               "cancelled": body["cancelled"], "spent": body["spent"]})
    }))
}

/// Waits until the projection serves what the orders say.
async fn stats_agree(stack: &Stack, customer: &str) -> Result<Value> {
    let expected = expected_stats(stack, customer).await?;
    eventually(
        &format!("{customer}'s stats to be {expected}"),
        DEADLINE,
        || async {
            let served = served_stats(stack, customer).await?;
            Ok((served.as_ref() == Some(&expected)).then_some(expected.clone()))
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn customer_stats_follow_the_event_store_and_agree_with_the_orders() -> Result<()> {
    let (stack, _) = Stack::one_saga_of_each_kind(1_000).await?;
    let alice = stats_agree(&stack, "alice").await?;
    assert_eq!(alice["orders"], 3);
    assert_eq!(alice["confirmed"], 1);
    assert_eq!(alice["spent"], 2_000);
    stats_agree(&stack, "poor").await?;
    let (status, body) = stack.get_json("order", "/customers/nobody/stats").await?;
    assert_eq!(status, 404, "{body}");
    let metrics = stack
        .metrics_until("order", "the projection to catch up", |m| {
            m.sum(
                names::PROJECTION_LAG,
                &[("projection", CustomerStats::NAME)],
            ) == 0.0
        })
        .await?;
    assert!(metrics.has(
        names::PROJECTION_LAG,
        &[("projection", CustomerStats::NAME)]
    ));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projection_cut_off_mid_batch_resumes_from_its_checkpoint_and_counts_each_event_once()
-> Result<()> {
    let stack = Stack::stocked(100_000, 50).await?;
    let pool = stack.pool("order").await?;
    // Hold a table the projection writes: its next step blocks half-way.
    let mut holder = stack.hold_table("order", "customer_stats_orders").await?;
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(
            stack
                .run_saga("alice", &[("widget", 1, 700)], "US")
                .await?
                .0,
        );
    }
    let behind = stack
        .metrics_until("order", "the projection to fall behind", |m| {
            m.sum(
                names::PROJECTION_LAG,
                &[("projection", CustomerStats::NAME)],
            ) > 0.0
        })
        .await?;
    assert!(
        behind.sum(
            names::PROJECTION_LAG,
            &[("projection", CustomerStats::NAME)]
        ) > 0.0
    );

    // Cut the blocked step's connection, as a crash would: its transaction
    // is rolled back with the checkpoint it would have moved.
    let cut = cut_blocked_step(&pool, "customer_stats_orders").await?;
    assert!(cut >= 1);
    sqlx::query("ROLLBACK").execute(&mut holder).await?;

    let stats = stats_agree(&stack, "alice").await?;
    assert_eq!(
        stats,
        json!({"orders": 5, "confirmed": 5, "cancelled": 0, "spent": 3_500})
    );
    stack.assert_invariants().await
}

/// Cuts the connection of a projection step waiting for a lock in a
/// statement that contains `statement`, as a crash would: its transaction
/// is rolled back with the checkpoint it would have moved. How many it cut.
async fn cut_blocked_step(pool: &sqlx::PgPool, statement: &str) -> Result<i64> {
    let pattern = format!("%{statement}%");
    eventually("the blocked projection step", DEADLINE, || async {
        let pids: Vec<i32> = sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE $1",
        )
        .bind(&pattern)
        .fetch_all(pool)
        .await?;
        let mut cut = 0;
        for pid in pids {
            let done: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
                .bind(pid)
                .fetch_one(pool)
                .await?;
            cut += i64::from(done);
        }
        Ok((cut > 0).then_some(cut))
    })
    .await
}

/// The read model as a replay of every order's events gives it.
async fn assert_read_model_is_the_replay(stack: &Stack) -> Result<usize> {
    stack.projected().await?;
    let pool = stack.pool("order").await?;
    let mut conn = pool.acquire().await?;
    let ids: Vec<Uuid> = sqlx::query_scalar("SELECT DISTINCT order_id FROM order_events")
        .fetch_all(&mut *conn)
        .await?;
    for id in &ids {
        let replayed = order::store::fold(&order::store::load_events(&mut conn, *id).await?)
            .map(order::read_model::OrderView::from)
            .map(|v| serde_json::to_value(v).unwrap());
        let row = order::read_model::order_view(&mut *conn, *id)
            .await?
            .map(|v| serde_json::to_value(v).unwrap());
        assert_eq!(row, replayed, "order {id}");
    }
    Ok(ids.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_read_model_follows_the_event_store_and_resumes_from_its_checkpoint() -> Result<()> {
    let stack = Stack::stocked(100_000, 50).await?;
    stack.price("widget", 700).await?;
    let pool = stack.pool("order").await?;
    // Hold the read model's table: the projection's next step blocks on it.
    let mut holder = stack.hold_table("order", "orders").await?;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(stack.place("alice", &[("widget", 1, 700)], "US").await?);
    }
    // Each order is still read, from the event store, to its end.
    for id in &ids {
        let path = format!("/orders/{id}");
        eventually("the order to be confirmed", DEADLINE, || async {
            let (status, order) = stack.get_json("order", &path).await?;
            Ok((status == 200 && order["status"] == "CONFIRMED").then_some(()))
        })
        .await?;
    }
    // The list is the read model's, which has none of them yet, and says how far behind it is.
    let (_, page) = stack.get_json("order", "/orders?customerId=alice").await?;
    assert_eq!(page["orders"], json!([]), "{page}");
    stack
        .metrics_until("order", "the read model to fall behind", |m| {
            m.sum(names::PROJECTION_LAG, &[("projection", OrdersView::NAME)]) > 0.0
        })
        .await?;

    // Cut the blocked step's connection, as a crash would: its transaction
    // is rolled back with the checkpoint it would have moved.
    cut_blocked_step(&pool, "INSERT INTO orders").await?;
    sqlx::query("ROLLBACK").execute(&mut holder).await?;

    // It resumes from its checkpoint: every order once, as its events say.
    stack.settle().await?;
    assert_eq!(assert_read_model_is_the_replay(&stack).await?, 3);
    let (_, page) = stack
        .get_json("order", "/orders?customerId=alice&status=CONFIRMED")
        .await?;
    assert_eq!(page["orders"].as_array().map(Vec::len), Some(3), "{page}");
    stack
        .metrics_until("order", "the read model to catch up", |m| {
            m.sum(names::PROJECTION_LAG, &[("projection", OrdersView::NAME)]) == 0.0
        })
        .await?;
    stack.assert_invariants().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_under_reads_and_writes_swaps_in_what_a_replay_gives() -> Result<()> {
    let (stack, each) = Stack::one_saga_of_each_kind(1_000).await?;
    stats_agree(&stack, "alice").await?;
    let pool = stack.pool("order").await?;
    // Both projections damaged.
    sqlx::query("UPDATE customer_stats SET spent = 0, confirmed = 99")
        .execute(&pool)
        .await?;
    sqlx::query("UPDATE orders SET status = 'PENDING', version = 1 WHERE order_id = $1")
        .bind(each.happy)
        .execute(&pool)
        .await?;

    // Readers and writers keep going while both are rebuilt.
    let writing = AtomicBool::new(true);
    let reads_and_writes = async {
        let mut placed = Vec::new();
        while writing.load(Ordering::Relaxed) {
            placed.push(stack.place("alice", &[("widget", 1, 10)], "US").await?);
            let (status, body) = stack.get_json("order", "/customers/alice/stats").await?;
            anyhow::ensure!(status == 200, "stats unreadable during the rebuild: {body}");
            let (status, body) = stack
                .get_json("order", &format!("/orders/{}", each.happy))
                .await?;
            anyhow::ensure!(status == 200, "order unreadable during the rebuild: {body}");
        }
        anyhow::Ok(placed)
    };
    let rebuilding = async {
        let mut seen = BTreeMap::new();
        let mut progress = |done: u64, total: u64| {
            seen.insert(done, total);
        };
        let orders = projection::rebuild(&pool, &projection::OrdersView, &mut progress).await?;
        let events = projection::rebuild(&pool, &CustomerStats, &mut progress).await?;
        writing.store(false, Ordering::Relaxed);
        anyhow::ensure!(!seen.is_empty(), "no progress reported");
        anyhow::Ok((orders, events))
    };
    let (placed, (orders, events)) = tokio::try_join!(reads_and_writes, rebuilding)?;
    assert!(
        orders >= 4 && events >= 8,
        "{orders} orders, {events} events"
    );
    for id in &placed {
        stack.wait_for_outcome(*id).await?;
    }
    stack.settle().await?;

    // The read model is every order's history folded, and the stats what
    // the orders say.
    assert_read_model_is_the_replay(&stack).await?;
    assert_eq!(stack.order(each.happy).await?["status"], "CONFIRMED");
    stats_agree(&stack, "alice").await?;
    stats_agree(&stack, "poor").await?;
    stack.assert_invariants().await
}

/// A projection that remembers the events it was given, in order.
#[derive(Default)]
struct Seen(std::sync::Mutex<Vec<Uuid>>);

impl Projection for Seen {
    const NAME: &'static str = "seen";
    const TABLES: &'static [&'static str] = &[];

    async fn apply(&self, _: &mut sqlx::PgConnection, batch: Batch<'_>) -> sqlx::Result<()> {
        let mut seen = self.0.lock().expect("seen");
        seen.extend(batch.events.iter().map(|(env, _)| env.event_id));
        Ok(())
    }
}

/// The ids of the events stored for `order`.
async fn stored_ids(pool: &sqlx::PgPool, order: Uuid) -> Result<Vec<Uuid>> {
    Ok(
        sqlx::query_scalar(
            "SELECT event_id FROM order_events WHERE order_id = $1 ORDER BY version",
        )
        .bind(order)
        .fetch_all(pool)
        .await?,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_left_open_in_another_database_does_not_hold_the_read_model_back()
-> Result<()> {
    let stack = Stack::start_with(&["order", "inventory"]).await?;
    stack.price("widget", 700).await?;
    // Another service's database on the same Postgres: a transaction that
    // holds a transaction id and stays open for the whole test.
    let mut other = sqlx::PgConnection::connect(&stack.config("payment").database_url).await?;
    sqlx::query("BEGIN").execute(&mut other).await?;
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut other)
        .await?;
    let id = stack.place("alice", &[("widget", 1, 700)], "US").await?;
    assert_eq!(stack.order(id).await?["status"], "PENDING");
    let seen = Seen::default();
    let pool = stack.pool("order").await?;
    let stored = stored_ids(&pool, id).await?;
    eventually(
        "the projection to take the order's events",
        DEADLINE,
        || async {
            projection::step(&pool, &seen, &[]).await?;
            Ok((*seen.0.lock().unwrap() == stored).then_some(()))
        },
    )
    .await?;
    sqlx::query("ROLLBACK").execute(&mut other).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_committed_late_is_not_passed_over() -> Result<()> {
    let stack = Stack::start_with(&["order", "inventory"]).await?;
    stack.price("widget", 700).await?;
    let pool = stack.pool("order").await?;
    // A transaction of the order database takes its id first...
    let mut late = sqlx::PgConnection::connect(&stack.config("order").database_url).await?;
    sqlx::query("BEGIN").execute(&mut late).await?;
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut late)
        .await?;
    // ...then an order is placed and committed, after it in id order.
    let id = stack.place("alice", &[("widget", 1, 700)], "US").await?;
    let placed = stored_ids(&pool, id).await?;
    let seen = Seen::default();
    for _ in 0..3 {
        projection::step(&pool, &seen, &[]).await?;
    }
    assert!(
        seen.0.lock().unwrap().is_empty(),
        "nothing past a running transaction"
    );
    // The early transaction writes an event and commits last.
    let copy = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO order_events (order_id, version, event_id, event_type, schema_version, envelope)
         SELECT $1, version, $2, event_type, schema_version,
                jsonb_set(envelope, '{eventId}', to_jsonb($2::text))
         FROM order_events WHERE order_id = $3 AND version = 1",
    )
    .bind(Uuid::now_v7())
    .bind(copy)
    .bind(id)
    .execute(&mut late)
    .await?;
    sqlx::query("COMMIT").execute(&mut late).await?;
    let expected: Vec<Uuid> = std::iter::once(copy).chain(placed).collect();
    eventually("the projection to take every event", DEADLINE, || async {
        projection::step(&pool, &seen, &[]).await?;
        Ok((seen.0.lock().unwrap().len() >= expected.len()).then_some(()))
    })
    .await?;
    assert_eq!(
        *seen.0.lock().unwrap(),
        expected,
        "in commit order, each once"
    );
    Ok(())
}

/// `order rebuild-projection`, run as an operator runs it with its output
/// going to a log: its progress on stderr as plain lines (no bar, no
/// carriage returns), its result alone on stdout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_run_from_the_command_line_shows_its_progress_as_plain_lines() -> Result<()> {
    let (stack, _) = Stack::one_saga_of_each_kind(1_000).await?;
    stack.projected().await?;
    let output = tokio::process::Command::new(saga_tests::workspace_binary("saga-service"))
        .args(["order", "rebuild-projection", "orders"])
        .envs(stack.env("order"))
        .stdin(std::process::Stdio::null())
        .output()
        .await?;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.starts_with("rebuilt orders from ") && stdout.lines().count() == 1,
        "{stdout}"
    );
    let progress: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("orders: "))
        .collect();
    assert!(!stderr.contains('\r'), "{stderr:?}");
    let last = progress
        .last()
        .unwrap_or_else(|| panic!("no progress: {stderr}"));
    assert!(last.ends_with(" events (100%)"), "{stderr}");
    Ok(())
}
