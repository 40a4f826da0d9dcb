//! Placements written together: placements that arrive while the order
//! service's writers are busy wait, and a free writer then writes all that
//! waited in one transaction. Each is placed once, with its own answer; one
//! the catalog refuses, or one the transaction cannot take, costs only
//! itself.
//!
//! The groups are shaped on purpose: the test holds the order event store,
//! so each placement writer waits in its transaction with one placement,
//! then sends the placements under test, which wait for a writer, and lets
//! the store go: the first writer free takes them all as one group.

use anyhow::{Context, Result, ensure};
use common::meter::names;
use order::place::{self, GROUP};
use saga_tests::{
    DEADLINE, Stack, eventually, order_body,
    pg_proxy::{CommitAnswerLoser, Target},
};
use serde_json::Value;
use sqlx::PgConnection;
use tokio::task::JoinHandle;
use uuid::Uuid;

const PRICE: i64 = 100;

/// `POST /orders` of `body` in the background: (status, reply).
fn post(stack: &Stack, body: Value) -> JoinHandle<Result<(u16, Value)>> {
    let http = reqwest::Client::new();
    let url = stack.url("order", "/orders");
    tokio::spawn(async move {
        let r = http.post(url).json(&body).send().await?;
        let status = r.status().as_u16();
        Ok((status, r.json().await.unwrap_or(Value::Null)))
    })
}

/// Sessions of the order database waiting for a lock.
async fn blocked(stack: &Stack) -> Result<i64> {
    stack
        .count(
            "order",
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .await
}

/// Holds the event store and occupies every placement writer with one
/// placement of its own (each sent once the one before is waiting, so that
/// each writer takes exactly one): the holder, to roll back, and the
/// placements, to await.
async fn occupy_writers(
    stack: &Stack,
) -> Result<(PgConnection, Vec<JoinHandle<Result<(u16, Value)>>>)> {
    let holder = stack.hold_table("order", "order_events").await?;
    let mut first = Vec::new();
    for k in 1..=writers(stack) {
        first.push(post(
            stack,
            order_body("early", &[("widget", 1, PRICE)], "US"),
        ));
        eventually(
            &format!("{k} placement writers waiting"),
            DEADLINE,
            || async { Ok((blocked(stack).await? == k as i64).then_some(())) },
        )
        .await?;
    }
    Ok((holder, first))
}

/// The order service's placement writers.
fn writers(stack: &Stack) -> usize {
    place::writers(stack.config("order").database_max_connections)
}

/// Waits until `n` placements wait for a writer.
async fn until_waiting(stack: &Stack, n: usize) -> Result<()> {
    stack
        .metrics_until("order", &format!("{n} placements waiting"), |m| {
            m.sum(names::PLACEMENTS_WAITING, &[]) == n as f64
        })
        .await?;
    Ok(())
}

/// OrderPlaced events of `customer` in the order event store.
async fn placed_of(stack: &Stack, customer: &str) -> Result<i64> {
    stack
        .count(
            "order",
            &format!(
                "SELECT count(*) FROM order_events WHERE event_type = 'OrderPlaced' \
                 AND envelope -> 'payload' ->> 'customerId' = '{customer}'"
            ),
        )
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placements_that_wait_are_written_together_each_once_with_its_own_answer() -> Result<()> {
    let stack = Stack::start_with(&["order", "inventory"]).await?;
    stack.price("widget", PRICE).await?;
    let (mut holder, first) = occupy_writers(&stack).await?;

    // Twenty placements, one of them priced wrong: the catalog refuses it,
    // the group is written without it.
    let mut sent = Vec::new();
    for i in 0..20 {
        let price = if i == 7 { PRICE + 1 } else { PRICE };
        let customer = format!("c{i}");
        sent.push((
            customer.clone(),
            post(&stack, order_body(&customer, &[("widget", 1, price)], "US")),
        ));
    }
    until_waiting(&stack, 20).await?;
    sqlx::query("ROLLBACK").execute(&mut holder).await?;

    for placement in first {
        let (status, reply) = placement.await??;
        ensure!(status == 201, "{status} {reply}");
    }
    let mut ids = Vec::new();
    for (i, (customer, placement)) in sent.into_iter().enumerate() {
        let (status, reply) = placement.await??;
        if i == 7 {
            ensure!(status == 422, "{status} {reply}");
            ensure!(
                reply["error"].as_str().unwrap_or("").contains("widget"),
                "{reply}"
            );
            ensure!(
                placed_of(&stack, &customer).await? == 0,
                "{customer} placed"
            );
            continue;
        }
        ensure!(status == 201, "{customer}: {status} {reply}");
        ensure!(reply["customerId"] == customer.as_str(), "{reply}");
        ensure!(reply["lines"][0]["unitPrice"] == PRICE, "{reply}");
        let id: Uuid = reply["orderId"].as_str().unwrap_or_default().parse()?;
        ids.push(id);
        ensure!(
            placed_of(&stack, &customer).await? == 1,
            "{customer} placed once"
        );
        ensure!(stack.order(id).await?["customerId"] == customer.as_str());
    }
    ids.sort();
    ids.dedup();
    ensure!(ids.len() == 19, "{ids:?}");

    // One group, one statement; every OrderPlaced relayed once.
    let m = stack.metrics("order").await?;
    let committed = [("outcome", "committed")];
    ensure!(m.sum(names::PLACEMENT_GROUPS, &committed) == 1.0);
    ensure!(m.sum(names::PLACEMENT_GROUPED, &committed) == 20.0);
    ensure!(!m.has(names::PLACEMENT_GROUPS, &[("outcome", "one_by_one")]));
    eventually("every OrderPlaced relayed", DEADLINE, || async {
        let placed = stack
            .stream_events()
            .await?
            .into_iter()
            .filter(|(_, e)| e.event_type == "OrderPlaced")
            .count();
        ensure!(
            placed <= writers(&stack) + 19,
            "{placed} OrderPlaced in the stream"
        );
        Ok((placed == writers(&stack) + 19).then_some(()))
    })
    .await?;
    ensure!(stack.rows("order", "outbox").await? == 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_placement_the_group_statement_cannot_take_fails_alone_and_the_others_are_placed_once()
-> Result<()> {
    let stack = Stack::start_with(&["order", "inventory"]).await?;
    stack.price("widget", PRICE).await?;
    // The event store refuses the poison customer's events: a database
    // error for the whole group's statement.
    let pool = stack.pool("order").await?;
    sqlx::raw_sql(
        "CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.envelope -> 'payload' ->> 'customerId' = 'poison' THEN
                 RAISE EXCEPTION 'poison refused';
             END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER refuse_poison BEFORE INSERT ON order_events
             FOR EACH ROW EXECUTE FUNCTION refuse_poison();",
    )
    .execute(&pool)
    .await?;
    let (mut holder, first) = occupy_writers(&stack).await?;

    let n = GROUP.min(12);
    let mut sent = Vec::new();
    for i in 0..n {
        let customer = if i == n / 2 {
            "poison".to_string()
        } else {
            format!("c{i}")
        };
        sent.push((
            customer.clone(),
            post(&stack, order_body(&customer, &[("widget", 1, PRICE)], "US")),
        ));
    }
    until_waiting(&stack, n).await?;
    sqlx::query("ROLLBACK").execute(&mut holder).await?;

    for placement in first {
        let (status, reply) = placement.await??;
        ensure!(status == 201, "{status} {reply}");
    }
    for (customer, placement) in sent {
        let (status, reply) = placement.await??;
        if customer == "poison" {
            ensure!(status == 500, "{status} {reply}");
            continue;
        }
        ensure!(status == 201, "{customer}: {status} {reply}");
        ensure!(
            placed_of(&stack, &customer).await? == 1,
            "{customer} placed once"
        );
    }
    ensure!(placed_of(&stack, "poison").await? == 0);
    // What the refused placement wrote with its events went with them: no
    // cancel token is kept for an order that is not there.
    let orphans: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM cancel_capabilities c
         WHERE NOT EXISTS (SELECT 1 FROM order_events e WHERE e.order_id = c.order_id)",
    )
    .fetch_one(&pool)
    .await?;
    ensure!(orphans == 0, "{orphans} cancel tokens without their order");

    let m = stack.metrics("order").await?;
    let apart = [("outcome", "one_by_one")];
    ensure!(m.sum(names::PLACEMENT_GROUPS, &apart) == 1.0);
    ensure!(m.sum(names::PLACEMENT_GROUPED, &apart) == n as f64);
    ensure!(!m.has(names::PLACEMENT_GROUPS, &[("outcome", "committed")]));
    ensure!(m.sum(names::PLACEMENTS_WAITING, &[]) == 0.0);
    Ok(())
}

/// The order service's database URL with the host and port of `proxy`
/// instead of the server's (and no TLS, which the proxy does not read),
/// and the server's address.
fn through(url: &str, proxy: std::net::SocketAddr) -> Result<(String, std::net::SocketAddr)> {
    let (scheme, rest) = url.split_once("://").context("a URL")?;
    let (credentials, rest) = match rest.split_once('@') {
        Some((c, r)) => (format!("{c}@"), r),
        None => (String::new(), rest),
    };
    let (host_port, path) = rest.split_once('/').context("a database")?;
    let server = std::net::ToSocketAddrs::to_socket_addrs(host_port)?
        .next()
        .context("the server's address")?;
    let separator = if path.contains('?') { '&' } else { '?' };
    Ok((
        format!("{scheme}://{credentials}{proxy}/{path}{separator}sslmode=disable"),
        server,
    ))
}

/// A stack whose order service reaches its database through a proxy that
/// can lose the answer to the COMMIT of a transaction carrying `at_least`
/// OrderPlaced (widget priced at [`PRICE`]), and the proxy, not armed yet.
async fn order_behind_a_proxy(at_least: usize) -> Result<(Stack, CommitAnswerLoser)> {
    let mut stack = Stack::start_with(&["inventory"]).await?;
    let direct = stack.config("order").database_url;
    let (_, server) = through(&direct, "127.0.0.1:1".parse()?)?;
    let target = Target {
        marker: br#""eventType":"OrderPlaced""#,
        at_least,
    };
    let proxy = CommitAnswerLoser::start(server, target).await?;
    let (proxied, _) = through(&direct, proxy.addr())?;
    stack
        .start_service_with("order", |l| l.config.database_url = proxied)
        .await?;
    stack.price("widget", PRICE).await?;
    Ok((stack, proxy))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_whose_commit_answer_is_lost_is_placed_once_with_the_ids_it_was_given() -> Result<()>
{
    // The order service reaches its database through a proxy that can
    // lose the answer to the COMMIT of a group of placements (a transaction
    // that carries three OrderPlaced or more): Postgres commits, the
    // service sees its connection drop.
    let (stack, proxy) = order_behind_a_proxy(3).await?;
    let (mut holder, first) = occupy_writers(&stack).await?;

    let customers: Vec<String> = (0..10).map(|i| format!("lost{i}")).collect();
    let sent: Vec<_> = customers
        .iter()
        .map(|c| post(&stack, order_body(c, &[("widget", 1, PRICE)], "US")))
        .collect();
    until_waiting(&stack, customers.len()).await?;
    proxy.arm(1);
    sqlx::query("ROLLBACK").execute(&mut holder).await?;
    for placement in first {
        let (status, reply) = placement.await??;
        ensure!(status == 201, "{status} {reply}");
    }
    let mut ids = Vec::new();
    for (customer, placement) in customers.iter().zip(sent) {
        let (status, reply) = placement.await??;
        ensure!(status == 201, "{customer}: {status} {reply}");
        ids.push(
            reply["orderId"]
                .as_str()
                .unwrap_or_default()
                .parse::<Uuid>()?,
        );
    }
    ensure!(proxy.lost() == 1, "the group's answer was lost");

    // Each customer's order exists once, under the id its answer gave.
    for (customer, id) in customers.iter().zip(&ids) {
        ensure!(
            placed_of(&stack, customer).await? == 1,
            "{customer} placed {} times",
            placed_of(&stack, customer).await?
        );
        ensure!(stack.order(*id).await?["customerId"] == customer.as_str());
    }
    eventually("every OrderPlaced relayed once", DEADLINE, || async {
        let placed = stack
            .stream_events()
            .await?
            .into_iter()
            .filter(|(_, e)| e.event_type == "OrderPlaced")
            .count();
        let expected = writers(&stack) + customers.len();
        ensure!(placed <= expected, "{placed} OrderPlaced in the stream");
        Ok((placed == expected).then_some(()))
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_placement_whose_commit_answer_is_lost_is_answered_with_the_order_it_wrote()
-> Result<()> {
    let (stack, proxy) = order_behind_a_proxy(1).await?;
    proxy.arm(1);
    let (status, reply) = post(&stack, order_body("lone", &[("widget", 1, PRICE)], "US")).await??;
    ensure!(status == 201, "{status} {reply}");
    ensure!(proxy.lost() == 1, "the answer was lost");
    let id: Uuid = reply["orderId"].as_str().unwrap_or_default().parse()?;
    ensure!(placed_of(&stack, "lone").await? == 1);
    ensure!(stack.order(id).await?["customerId"] == "lone");
    Ok(())
}
