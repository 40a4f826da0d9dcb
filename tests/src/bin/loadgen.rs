//! Load generator: places N orders at a given rate, mixing sagas that succeed
//! with ones that fail at each step, and reports completed sagas per second
//! and placement-to-final-state latency percentiles.
//!
//! By default it starts a private stack (own broker, Redis, databases and the
//! four services in this process), so a run is reproducible anywhere; with
//! `--stack` it drives the stack started by `scripts/up.sh` instead.
//!
//! ```text
//! cargo run --release -p saga-tests --bin loadgen -- --orders 3000 --rate 0 --concurrency 256
//! cargo run --release -p saga-tests --bin loadgen -- --orders 300 --concurrency 1
//! ```

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use common::{EventKind, Subjects};
use futures::StreamExt;
use saga_tests::{Stack, order_body};
use serde_json::{Value, json};
use tokio::sync::{Semaphore, oneshot};
use uuid::Uuid;

#[derive(Debug, Clone)]
struct Args {
    orders: usize,
    /// Orders per second; 0 places as fast as `concurrency` allows.
    rate: f64,
    concurrency: usize,
    /// Share of orders meant to fail (declined, out of stock, bad address in turn).
    fail_ratio: f64,
    stack: bool,
    order_url: String,
    payment_url: String,
    inventory_url: String,
    nats_url: String,
    prefix: String,
    timeout: Duration,
}

fn usage() -> ! {
    eprintln!(
        "usage: loadgen [--orders N] [--rate PER_SEC|0] [--concurrency C] [--fail-ratio 0.25]
               [--stack [--order-url URL] [--payment-url URL] [--inventory-url URL] [--nats-url URL] [--prefix saga]]
               [--timeout-secs 60]"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut a = Args {
        orders: 1000,
        rate: 0.0,
        concurrency: 128,
        fail_ratio: 0.25,
        stack: false,
        order_url: "http://127.0.0.1:8081".into(),
        payment_url: "http://127.0.0.1:8082".into(),
        inventory_url: "http://127.0.0.1:8083".into(),
        nats_url: std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into()),
        prefix: "saga".into(),
        timeout: Duration::from_secs(60),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "--orders" => a.orders = value().parse().unwrap_or_else(|_| usage()),
            "--rate" => a.rate = value().parse().unwrap_or_else(|_| usage()),
            "--concurrency" => {
                a.concurrency = value().parse::<usize>().unwrap_or_else(|_| usage()).max(1)
            }
            "--fail-ratio" => a.fail_ratio = value().parse().unwrap_or_else(|_| usage()),
            "--stack" => a.stack = true,
            "--order-url" => a.order_url = value(),
            "--payment-url" => a.payment_url = value(),
            "--inventory-url" => a.inventory_url = value(),
            "--nats-url" => a.nats_url = value(),
            "--prefix" => a.prefix = value(),
            "--timeout-secs" => {
                a.timeout = Duration::from_secs(value().parse().unwrap_or_else(|_| usage()))
            }
            _ => usage(),
        }
    }
    a
}

/// What an order is meant to end as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plan {
    Succeed,
    Declined,
    OutOfStock,
    BadAddress,
}

impl Plan {
    fn for_index(i: usize, fail_ratio: f64) -> Plan {
        // Spread failures evenly: order i fails when the running share says so.
        let failures_before = ((i as f64) * fail_ratio).floor() as usize;
        let failures_after = (((i + 1) as f64) * fail_ratio).floor() as usize;
        if failures_after == failures_before {
            return Plan::Succeed;
        }
        match failures_before % 3 {
            0 => Plan::Declined,
            1 => Plan::OutOfStock,
            _ => Plan::BadAddress,
        }
    }

    fn body(self, run: &str) -> Value {
        let rich = format!("{run}-rich");
        let plenty = format!("{run}-plenty");
        match self {
            Plan::Succeed => order_body(&rich, &[(&plenty, 1, 500)], "US"),
            Plan::Declined => order_body(&format!("{run}-broke"), &[(&plenty, 1, 500)], "US"),
            Plan::OutOfStock => order_body(&rich, &[(&format!("{run}-scarce"), 1, 500)], "US"),
            Plan::BadAddress => order_body(&rich, &[(&plenty, 1, 500)], "ZZ"),
        }
    }

    fn expected(self) -> &'static str {
        match self {
            Plan::Succeed => "OrderConfirmed",
            _ => "OrderCancelled",
        }
    }
}

type Waiters = Arc<Mutex<HashMap<Uuid, oneshot::Sender<(String, Instant)>>>>;

struct Endpoints {
    order: String,
    payment: String,
    inventory: String,
    nats: String,
    subjects: Subjects,
}

fn main() -> Result<()> {
    let args = parse_args();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(args))
}

async fn run(args: Args) -> Result<()> {
    let private = if args.stack {
        None
    } else {
        Some(Stack::start().await.context("start private stack")?)
    };
    let endpoints = match &private {
        Some(s) => Endpoints {
            order: s.url("order", ""),
            payment: s.url("payment", ""),
            inventory: s.url("inventory", ""),
            nats: s.nats.url(),
            subjects: s.subjects.clone(),
        },
        None => Endpoints {
            order: args.order_url.clone(),
            payment: args.payment_url.clone(),
            inventory: args.inventory_url.clone(),
            nats: args.nats_url.clone(),
            subjects: Subjects::new(args.prefix.clone()),
        },
    };
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency)
        .build()?;
    let run_id = format!("load{}", &Uuid::new_v4().simple().to_string()[..6]);

    // Arrange: a customer who can pay for everything, one who cannot, a
    // product there is plenty of and one there is none of.
    let put = |url: String, body: Value| {
        let http = http.clone();
        async move {
            let r = http
                .put(&url)
                .json(&body)
                .send()
                .await
                .with_context(|| format!("PUT {url}"))?;
            anyhow::ensure!(r.status().is_success(), "PUT {url}: {}", r.status());
            Ok::<_, anyhow::Error>(())
        }
    };
    put(
        format!("{}/accounts/{run_id}-rich", endpoints.payment),
        json!({"balance": 1_000_000_000_000i64}),
    )
    .await?;
    put(
        format!("{}/accounts/{run_id}-broke", endpoints.payment),
        json!({"balance": 0}),
    )
    .await?;
    put(
        format!("{}/stock/{run_id}-plenty", endpoints.inventory),
        json!({"available": 1_000_000_000i64}),
    )
    .await?;
    put(
        format!("{}/stock/{run_id}-scarce", endpoints.inventory),
        json!({"available": 0}),
    )
    .await?;

    // Watch the saga's final events on the broker.
    let nats = async_nats::connect(&endpoints.nats)
        .await
        .context("connect to NATS")?;
    let waiters: Waiters = Arc::default();
    for kind in [EventKind::OrderConfirmed, EventKind::OrderCancelled] {
        let mut sub = nats.subscribe(endpoints.subjects.event(kind)).await?;
        let waiters = waiters.clone();
        tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                let at = Instant::now();
                let Ok(env) = serde_json::from_slice::<common::Envelope>(&msg.payload) else {
                    continue;
                };
                if let Some(tx) = waiters.lock().unwrap().remove(&env.metadata.correlation_id) {
                    let _ = tx.send((env.event_type, at));
                }
            }
        });
    }
    nats.flush().await?;

    println!(
        "placing {} orders ({}), concurrency {}, {:.0}% meant to fail, {} stack",
        args.orders,
        if args.rate > 0.0 {
            format!("{} per second", args.rate)
        } else {
            "as fast as possible".into()
        },
        args.concurrency,
        args.fail_ratio * 100.0,
        if private.is_some() {
            "private"
        } else {
            "running"
        },
    );
    let permits = Arc::new(Semaphore::new(args.concurrency));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..args.orders {
        if args.rate > 0.0 {
            let due = started + Duration::from_secs_f64(i as f64 / args.rate);
            tokio::time::sleep_until(due.into()).await;
        }
        let permit = permits.clone().acquire_owned().await?;
        let plan = Plan::for_index(i, args.fail_ratio);
        let body = plan.body(&run_id);
        let (http, waiters, url, timeout) = (
            http.clone(),
            waiters.clone(),
            format!("{}/orders", endpoints.order),
            args.timeout,
        );
        tasks.spawn(async move {
            let _permit = permit;
            let t0 = Instant::now();
            let r = http.post(&url).json(&body).send().await?;
            anyhow::ensure!(r.status().as_u16() == 201, "POST /orders: {}", r.status());
            let v: Value = r.json().await?;
            let id: Uuid = v["orderId"].as_str().context("orderId")?.parse()?;
            let (tx, rx) = oneshot::channel();
            waiters.lock().unwrap().insert(id, tx);
            // The final event may already have gone by while we registered.
            let outcome = tokio::time::timeout(timeout, rx).await;
            waiters.lock().unwrap().remove(&id);
            match outcome {
                Ok(Ok((event, at))) => Ok((plan, Some((event, at - t0)), at)),
                _ => Ok((plan, None, Instant::now())),
            }
        });
    }

    let mut latencies = Vec::with_capacity(args.orders);
    let (mut confirmed, mut cancelled, mut unfinished, mut wrong) = (0, 0, 0, 0);
    let mut last = started;
    while let Some(joined) = tasks.join_next().await {
        let (plan, outcome, at) = joined??;
        last = last.max(at);
        match outcome {
            Some((event, latency)) => {
                latencies.push(latency);
                if event == "OrderConfirmed" {
                    confirmed += 1
                } else {
                    cancelled += 1
                }
                if event != plan.expected() {
                    wrong += 1;
                }
            }
            None => unfinished += 1,
        }
    }
    let elapsed = last - started;
    latencies.sort();
    let pct = |p: f64| -> f64 {
        if latencies.is_empty() {
            return f64::NAN;
        }
        let idx = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
        latencies[idx].as_secs_f64() * 1000.0
    };
    println!(
        "completed: {} of {} (confirmed {confirmed}, cancelled {cancelled}, unfinished {unfinished}, unexpected outcome {wrong})",
        latencies.len(),
        args.orders
    );
    println!(
        "throughput: {:.0} sagas/s over {:.2} s",
        latencies.len() as f64 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64()
    );
    println!(
        "latency ms: p50 {:.1}  p95 {:.1}  p99 {:.1}  max {:.1}",
        pct(0.50),
        pct(0.95),
        pct(0.99),
        pct(1.0)
    );

    if let Some(stack) = &private {
        // Rows belong to this run only in a private stack: check the invariants.
        stack.settle().await?;
        stack
            .assert_invariants(
                &[
                    (&format!("{run_id}-rich"), 1_000_000_000_000),
                    (&format!("{run_id}-broke"), 0),
                ],
                &[
                    (&format!("{run_id}-plenty"), 1_000_000_000),
                    (&format!("{run_id}-scarce"), 0),
                ],
            )
            .await?;
        println!("invariants: hold (money, stock, every saga finished)");
    }
    if unfinished > 0 || wrong > 0 {
        bail!("{unfinished} sagas unfinished, {wrong} ended otherwise than planned");
    }
    Ok(())
}
