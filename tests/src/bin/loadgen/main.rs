//! Load generator: places N orders at a given rate, mixing sagas that succeed
//! with ones that fail at each step, and reports completed sagas per second
//! and placement-to-final-state latency percentiles.
//!
//! By default it starts a private stack (own broker, Redis, databases and the
//! four services in this process, the broker without an fsync per write), so
//! a run is reproducible anywhere; with `--stack` it drives the stack started
//! by `scripts/up.sh` instead, on the settings it ships with, and reports each
//! service's memory; `--bench` runs the three standard measures there, and
//! `--vs-reference DIR` measures them against the reference saga in `DIR`
//! back to back (see vs_reference.rs).
//!
//! ```text
//! cargo run --release -p saga-tests --bin loadgen -- --orders 3000 --rate 0 --concurrency 256
//! cargo run --release -p saga-tests --bin loadgen -- --orders 300 --concurrency 1
//! ```

mod vs_reference;

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

/// Places orders and reports completed sagas per second, latency
/// percentiles and (against the local stack) each service's memory.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "loadgen")]
struct Args {
    /// Orders to place.
    #[arg(long, default_value_t = 1000)]
    orders: usize,
    /// Orders per second (open loop); 0 places as fast as `concurrency` allows.
    #[arg(long, default_value_t = 0.0, value_parser = parse_share_or_rate::<1_000_000>)]
    rate: f64,
    /// Orders in flight at most.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    concurrency: u32,
    /// Share of orders meant to fail (declined, out of stock, bad address in turn).
    #[arg(long, default_value_t = 0.25, value_parser = parse_share_or_rate::<1>)]
    fail_ratio: f64,
    /// Paying customers the orders are spread over: fewer make hotter
    /// accounts (orders on one account serialize on its row lock).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    customers: u32,
    /// Products the orders are spread over: fewer make hotter stock rows.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    products: u32,
    /// Drive the stack `scripts/up.sh` started (its settings, its processes)
    /// instead of a private one; each service's RSS is reported.
    #[arg(long)]
    stack: bool,
    /// Print each consumer's backlog every second.
    #[arg(long)]
    progress: bool,
    /// The standard measures against the running stack (`--stack`, no
    /// failures): saturation with `--orders` at 256 in flight, one saga in
    /// flight, then an open loop at 80% of the saturation rate.
    #[arg(long)]
    bench: bool,
    /// How long `--bench`'s open loop runs.
    #[arg(long, default_value_t = 20, value_parser = parse_secs)]
    seconds: u64,
    /// Measure against the reference saga in this folder (a cargo project
    /// whose `sagabench` binary drives it): on a fresh local stack
    /// (`scripts/down.sh --purge`, `scripts/up.sh --no-demo`) and the
    /// reference on its own broker, Redis and database, saturation and one
    /// saga in flight for both, ours in an open loop at half the
    /// reference's saturation for `--seconds`; prints one table of ratios.
    /// Ours at saturation places as many orders as the reference finished
    /// in its 15 s (`--orders` is not used).
    #[arg(long, value_name = "DIR", conflicts_with_all = ["bench", "stack"])]
    vs_reference: Option<std::path::PathBuf>,
    /// A copy of the reference whose driver places at a fixed rate (`RATE`
    /// sagas per second) instead of keeping sagas in flight: with it,
    /// `--vs-reference` runs the reference's open loop at ours' rate too.
    #[arg(long, value_name = "DIR", requires = "vs_reference")]
    fixed_rate_reference: Option<std::path::PathBuf>,
    /// How many pairs of runs `--vs-reference` alternates.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10))]
    pairs: u32,
    /// The running stack's services and broker (`.run/stack.env` exports them).
    #[arg(long, env = "ORDER_URL", default_value = "http://127.0.0.1:8081")]
    order_url: String,
    #[arg(long, env = "PAYMENT_URL", default_value = "http://127.0.0.1:8082")]
    payment_url: String,
    #[arg(long, env = "INVENTORY_URL", default_value = "http://127.0.0.1:8083")]
    inventory_url: String,
    #[arg(long, env = "SHIPPING_URL", default_value = "http://127.0.0.1:8084")]
    shipping_url: String,
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// The running stack's broker monitor, for the messages it handled.
    #[arg(
        long,
        env = "NATS_MONITOR_URL",
        default_value = "http://127.0.0.1:8222"
    )]
    nats_monitor_url: String,
    /// The broker user to watch the sagas' ends as (`operator`), if it has users.
    #[arg(long, env = "NATS_USER")]
    nats_user: Option<String>,
    /// Its password: set NATS_PASSWORD.
    #[arg(long, env = "NATS_PASSWORD", hide_env_values = true, hide = true)]
    nats_password: Option<String>,
    /// The running stack's subject prefix.
    #[arg(long, env = "SUBJECT_PREFIX", default_value = "saga")]
    prefix: String,
    /// How long one saga may take before it counts as unfinished.
    #[arg(long = "timeout-secs", default_value_t = 60, value_parser = parse_secs)]
    timeout: u64,
}

/// A number from 0 to `MAX`.
fn parse_share_or_rate<const MAX: u32>(text: &str) -> Result<f64, String> {
    text.parse::<f64>()
        .ok()
        .filter(|v| (0.0..=f64::from(MAX)).contains(v))
        .ok_or_else(|| format!("{text} is not a number from 0 to {MAX}"))
}

impl Args {
    /// Takes each address the command line and environment leave at its
    /// default from the running stack's `<RUN_DIR>/stack.env` (`stack up`
    /// moves nats-server to other ports when 4222 is taken).
    fn find_the_stack(&mut self) {
        let path = run_dir().join("stack.env");
        let Ok(text) = std::fs::read_to_string(&path) else {
            return;
        };
        for line in text.lines() {
            let Some((key, value)) = line.strip_prefix("export ").and_then(|l| l.split_once('='))
            else {
                continue;
            };
            if std::env::var_os(key).is_some() {
                continue;
            }
            let field = match key {
                "ORDER_URL" => &mut self.order_url,
                "PAYMENT_URL" => &mut self.payment_url,
                "INVENTORY_URL" => &mut self.inventory_url,
                "SHIPPING_URL" => &mut self.shipping_url,
                "NATS_URL" => &mut self.nats_url,
                "NATS_MONITOR_URL" => &mut self.nats_monitor_url,
                "NATS_USER" => self.nats_user.get_or_insert_default(),
                "SUBJECT_PREFIX" => &mut self.prefix,
                _ => continue,
            };
            *field = value.trim_matches('"').to_string();
        }
        // The password `stack up` keeps for the user (stack.env reads it
        // from that file too).
        if let Some(user) = &self.nats_user
            && self.nats_password.is_none()
        {
            let kept = run_dir().join(format!("nats-password-{user}"));
            self.nats_password = std::fs::read_to_string(kept)
                .ok()
                .map(|p| p.trim().to_string());
        }
    }
}

/// Where `stack up` keeps its pids, token and environment.
fn run_dir() -> std::path::PathBuf {
    std::env::var("RUN_DIR").map_or_else(|_| stack::repo_root().join(".run"), Into::into)
}

fn parse_secs(text: &str) -> Result<u64, String> {
    text.parse::<u64>()
        .ok()
        .filter(|s| (1..=3600).contains(s))
        .ok_or_else(|| format!("{text} is not a number of seconds from 1 to 3600"))
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

    /// The body of order `i`: orders are spread over `customers` paying
    /// customers and `products` products, as real traffic is. (Orders on one
    /// account serialize on its row lock, as they must.)
    fn body(self, run: &str, i: usize, customers: usize, products: usize) -> Value {
        let rich = format!("{run}-rich-{}", i % customers);
        let plenty = format!("{run}-plenty-{}", i % products);
        match self {
            Plan::Succeed => order_body(&rich, &[(&plenty, 1, UNIT_PRICE)], "US"),
            Plan::Declined => {
                order_body(&format!("{run}-broke"), &[(&plenty, 1, UNIT_PRICE)], "US")
            }
            Plan::OutOfStock => {
                order_body(&rich, &[(&format!("{run}-scarce"), 1, UNIT_PRICE)], "US")
            }
            Plan::BadAddress => order_body(&rich, &[(&plenty, 1, UNIT_PRICE)], "ZZ"),
        }
    }

    fn expected(self) -> &'static str {
        match self {
            Plan::Succeed => "OrderConfirmed",
            _ => "OrderCancelled",
        }
    }
}

const RICH_BALANCE: i64 = 1_000_000_000_000;
const UNIT_PRICE: i64 = 500;
const PLENTY_STOCK: i64 = 1_000_000_000;

type Waiters = Arc<Mutex<HashMap<Uuid, oneshot::Sender<(String, Instant)>>>>;

struct Endpoints {
    order: String,
    payment: String,
    inventory: String,
    nats: String,
    /// User and password on the broker, if it has users.
    nats_user: Option<(String, String)>,
    subjects: Subjects,
}

fn main() -> Result<()> {
    let mut args = <Args as clap::Parser>::parse();
    if args.stack || args.bench {
        args.find_the_stack();
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if let Some(reference) = args.vs_reference.clone() {
        return runtime.block_on(vs_reference::compare(args, &reference));
    }
    if !args.bench {
        return runtime.block_on(run(args)).map(drop);
    }
    runtime.block_on(bench(args))
}

/// The standard measures against the running stack, on the settings it
/// ships with: saturation, one saga in flight, and an open loop at 80% of
/// the saturation rate for `--seconds`.
async fn bench(args: Args) -> Result<()> {
    let base = Args {
        stack: true,
        fail_ratio: 0.0,
        rate: 0.0,
        ..args
    };
    println!("==> saturation: {} sagas, 256 in flight", base.orders);
    let saturation = run(Args {
        concurrency: 256,
        ..base.clone()
    })
    .await?;
    println!("\n==> one saga in flight: 300 sagas");
    run(Args {
        orders: 300,
        concurrency: 1,
        ..base.clone()
    })
    .await?;
    let rate = (saturation.throughput * 0.8).floor().max(1.0);
    println!(
        "\n==> open loop at 80% of saturation: {rate} sagas/s for {} s",
        base.seconds
    );
    run(Args {
        orders: (rate as usize) * base.seconds as usize,
        rate,
        concurrency: 4096,
        ..base
    })
    .await
    .map(drop)
}

/// The admin token: arranging balances and stock is an operator's change.
fn admin_token(private: bool, run_dir: &std::path::Path) -> Result<String> {
    // Arranging balances and stock is an operator's change: the private
    // stack's token, or the running stack's (ADMIN_TOKEN, or what `stack
    // up` keeps in .run/admin-token).
    Ok(match private {
        true => saga_tests::ADMIN_TOKEN.to_string(),
        false => std::env::var("ADMIN_TOKEN")
            .ok()
            .filter(|t| !t.is_empty())
            .or_else(|| std::fs::read_to_string(run_dir.join("admin-token")).ok())
            .map(|t| t.trim().to_string())
            .context("the stack's admin token: set ADMIN_TOKEN, or run scripts/up.sh (it keeps one in .run/admin-token)")?,
    })
}

/// Arranges the run: a customer who can pay for everything, one who
/// cannot, a product there is plenty of and one there is none of; every
/// product priced in the catalog, and the price arrived at the order
/// service, which prices the lines.
async fn arrange(
    http: &reqwest::Client,
    endpoints: &Endpoints,
    args: &Args,
    run_id: &str,
) -> Result<()> {
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
    for i in 0..args.customers {
        put(
            format!("{}/accounts/{run_id}-rich-{i}", endpoints.payment),
            json!({"balance": RICH_BALANCE}),
        )
        .await?;
    }
    for i in 0..args.products {
        put(
            format!("{}/stock/{run_id}-plenty-{i}", endpoints.inventory),
            json!({"available": PLENTY_STOCK}),
        )
        .await?;
    }
    put(
        format!("{}/accounts/{run_id}-broke", endpoints.payment),
        json!({"balance": 0}),
    )
    .await?;
    put(
        format!("{}/stock/{run_id}-scarce", endpoints.inventory),
        json!({"available": 0}),
    )
    .await?;
    // Every product priced in the catalog, and the price arrived at the
    // order service, which prices the lines.
    let products: Vec<String> = (0..args.products)
        .map(|i| format!("{run_id}-plenty-{i}"))
        .chain([format!("{run_id}-scarce")])
        .collect();
    for p in &products {
        put(
            format!("{}/products/{p}", endpoints.inventory),
            json!({"name": p, "unitPrice": UNIT_PRICE}),
        )
        .await?;
    }
    for p in &products {
        let url = format!("{}/products/{p}", endpoints.order);
        stack::eventually(
            &format!("{p} in the catalog"),
            Duration::from_secs(30),
            || async {
                let r = http.get(&url).send().await?;
                Ok(r.status().is_success().then_some(()))
            },
        )
        .await?;
    }
    Ok(())
}

/// Who waits for which saga's end: each saga's final event on the broker
/// (OrderConfirmed or OrderCancelled) is handed to its waiter.
async fn watch_endings(nats: &async_nats::Client, subjects: &Subjects) -> Result<Waiters> {
    let waiters: Waiters = Arc::default();
    for kind in [EventKind::OrderConfirmed, EventKind::OrderCancelled] {
        let mut sub = nats.subscribe(subjects.event(kind)).await?;
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
    Ok(waiters)
}

/// What one run measured.
#[derive(Debug, Clone, Default)]
struct Report {
    /// Completed sagas per second.
    throughput: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// Sagas that ended.
    completed: usize,
    /// Against the running stack: CPU milliseconds per saga by group (each
    /// service, nats-server, postgres, redis-server).
    cpu_ms_per_saga: Vec<(String, f64)>,
    /// Each process's resident memory in MB: name, idle, peak.
    memory: Vec<(String, Option<f64>, Option<f64>)>,
}

async fn run(args: Args) -> Result<Report> {
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
            nats_user: Some(s.users.operator()),
            subjects: s.subjects.clone(),
        },
        None => Endpoints {
            order: args.order_url.clone(),
            payment: args.payment_url.clone(),
            inventory: args.inventory_url.clone(),
            nats: args.nats_url.clone(),
            nats_user: args.nats_user.clone().zip(args.nats_password.clone()),
            subjects: Subjects::new(args.prefix.clone()),
        },
    };
    let run_dir = run_dir();
    // Each service's process: the running stack's, or this one (a private
    // stack runs the services in this process).
    let processes: Vec<(String, u32)> = match &private {
        Some(_) => vec![("loadgen and the services".into(), std::process::id())],
        None => common::roster::names()
            .filter_map(|name| Some((name.to_string(), running(&run_dir, name)?)))
            .collect(),
    };
    let token = admin_token(private.is_some(), &run_dir)?;
    let mut operator = reqwest::header::HeaderMap::new();
    operator.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {token}").parse()?,
    );
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency as usize)
        .default_headers(operator)
        .build()?;
    let run_id = format!("load{}", &Uuid::new_v4().simple().to_string()[..6]);

    arrange(&http, &endpoints, &args, &run_id).await?;

    // Watch the saga's final events on the broker.
    let (user, password) = endpoints.nats_user.clone().unzip();
    let options = common::broker::with_credentials(
        async_nats::ConnectOptions::new(),
        user.as_deref(),
        password.as_deref(),
    );
    let nats = common::broker::connect(options, &endpoints.nats)
        .await
        .context("connect to NATS")?;
    let waiters = watch_endings(&nats, &endpoints.subjects).await?;
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
    if args.progress {
        tokio::spawn(report_backlog(nats.clone(), endpoints.subjects.clone()));
    }
    let idle: Vec<Option<u64>> = processes.iter().map(|(_, pid)| rss_kib(*pid)).collect();
    // Each running service's metrics, for how long its relay kept events.
    let metrics: Vec<(String, String)> = [
        ("order", &args.order_url),
        ("payment", &args.payment_url),
        ("inventory", &args.inventory_url),
        ("shipping", &args.shipping_url),
    ]
    .into_iter()
    .map(|(name, url)| (name.to_string(), format!("{url}/metrics")))
    .collect();
    // What the sagas cost the running stack's processes and broker.
    let observe = |http| Observed {
        http,
        monitor: &args.nats_monitor_url,
        services: &processes,
        metrics: &metrics,
        run_dir: &run_dir,
    };
    let costs_before = match &private {
        Some(_) => None,
        None => Some(Costs::now(observe(&http)).await),
    };
    let peak = Arc::new(Mutex::new(idle.clone()));
    let sampling = tokio::spawn({
        let (peak, pids) = (
            peak.clone(),
            processes.iter().map(|p| p.1).collect::<Vec<_>>(),
        );
        async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let mut peak = peak.lock().unwrap();
                for (p, pid) in peak.iter_mut().zip(&pids) {
                    *p = (*p).max(rss_kib(*pid));
                }
            }
        }
    });
    let started = Instant::now();
    let mut tally = place_all(&args, &http, &endpoints.order, &waiters, &run_id).await?;
    let mut report = tally.print(args.orders, started);

    sampling.abort();
    let peak = peak.lock().unwrap().clone();
    let mb = |kib: &Option<u64>| kib.map(|k| k as f64 / 1024.0);
    report.memory = processes
        .iter()
        .zip(idle.iter().zip(&peak))
        .map(|((name, _), (idle, peak))| (name.clone(), mb(idle), mb(peak)))
        .collect();
    let shown = |v: &Option<f64>| v.map_or("?".to_string(), |v| format!("{v:.1}"));
    let memory: Vec<String> = report
        .memory
        .iter()
        .map(|(name, idle, peak)| format!("{name} {} idle, {} peak", shown(idle), shown(peak)))
        .collect();
    println!("memory (RSS MB): {}", memory.join("; "));
    if let Some(before) = costs_before {
        let after = Costs::now(observe(&http)).await;
        report.cpu_ms_per_saga = after.since(&before, tally.latencies.len());
    }

    if let Some((latency, id)) = tally.slowest {
        print_timeline(&nats, &endpoints.subjects, id, latency).await?;
    }
    if let Some(stack) = &private {
        check_invariants(stack, &args, &run_id).await?;
    }
    let Tally {
        unfinished, wrong, ..
    } = tally;
    if unfinished > 0 || wrong > 0 {
        bail!("{unfinished} sagas unfinished, {wrong} ended otherwise than planned");
    }
    Ok(report)
}

/// Places `args.orders` orders (at `args.rate` per second, or as fast as
/// `args.concurrency` allows), each waiting for its saga's end, and tallies
/// what they came to.
async fn place_all(
    args: &Args,
    http: &reqwest::Client,
    order_url: &str,
    waiters: &Waiters,
    run_id: &str,
) -> Result<Tally> {
    let started = Instant::now();
    let permits = Arc::new(Semaphore::new(args.concurrency as usize));
    let mut tasks = tokio::task::JoinSet::new();
    // Sagas ended (or given up on), shown as they go: a bar on a
    // terminal, a line at every tenth otherwise.
    let ended = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let shown = tokio::spawn({
        let (ended, orders) = (ended.clone(), args.orders);
        async move {
            let mut progress = common::progress::Progress::stderr("sagas", "ended", orders as u64);
            loop {
                let now = ended.load(std::sync::atomic::Ordering::Relaxed);
                progress.set(now as u64);
                if now >= orders {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            progress.finish();
        }
    });
    for i in 0..args.orders {
        if args.rate > 0.0 {
            let due = started + Duration::from_secs_f64(i as f64 / args.rate);
            tokio::time::sleep_until(due.into()).await;
        }
        let permit = permits.clone().acquire_owned().await?;
        let plan = Plan::for_index(i, args.fail_ratio);
        let body = plan.body(run_id, i, args.customers as usize, args.products as usize);
        let (http, waiters, url, timeout) = (
            http.clone(),
            waiters.clone(),
            format!("{order_url}/orders"),
            Duration::from_secs(args.timeout),
        );
        let ended = ended.clone();
        tasks.spawn(async move {
            let _permit = permit;
            let _counted = Ended(ended);
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
                Ok(Ok((event, at))) => Ok((plan, Some((event, at - t0)), at, id)),
                _ => Ok((plan, None, Instant::now(), id)),
            }
        });
    }

    let mut tally = Tally::default();
    while let Some(joined) = tasks.join_next().await {
        let (plan, outcome, at, id) = joined??;
        tally.add(&plan, outcome, at, id);
    }
    let _ = shown.await;
    Ok(tally)
}

/// Counts one saga as ended when its task ends, however it ends.
struct Ended(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for Ended {
    fn drop(&mut self) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// What the sagas of a run came to.
#[derive(Default)]
struct Tally {
    latencies: Vec<Duration>,
    slowest: Option<(Duration, Uuid)>,
    confirmed: usize,
    cancelled: usize,
    unfinished: usize,
    wrong: usize,
    /// When the last saga ended.
    last: Option<Instant>,
}

impl Tally {
    /// One saga, planned as `plan`, ended with `outcome` (its final event
    /// and latency) at `at`; `None` if it did not end in time.
    fn add(&mut self, plan: &Plan, outcome: Option<(String, Duration)>, at: Instant, id: Uuid) {
        self.last = Some(self.last.map_or(at, |last| last.max(at)));
        let Some((event, latency)) = outcome else {
            self.unfinished += 1;
            return;
        };
        if self.slowest.is_none_or(|(l, _)| latency > l) {
            self.slowest = Some((latency, id));
        }
        self.latencies.push(latency);
        if event == "OrderConfirmed" {
            self.confirmed += 1
        } else {
            self.cancelled += 1
        }
        if event != plan.expected() {
            self.wrong += 1;
        }
    }

    /// Prints the outcomes, the throughput and the latencies of `orders`
    /// sagas placed from `started`, and returns them.
    fn print(&mut self, orders: usize, started: Instant) -> Report {
        let elapsed = self.last.unwrap_or(started) - started;
        let latencies = &mut self.latencies;
        latencies.sort();
        let pct = |p: f64| -> f64 {
            if latencies.is_empty() {
                return f64::NAN;
            }
            let idx = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
            latencies[idx].as_secs_f64() * 1000.0
        };
        let Tally {
            confirmed,
            cancelled,
            unfinished,
            wrong,
            ..
        } = self;
        println!(
            "completed: {} of {orders} (confirmed {confirmed}, cancelled {cancelled}, unfinished {unfinished}, unexpected outcome {wrong})",
            latencies.len(),
        );
        let throughput = latencies.len() as f64 / elapsed.as_secs_f64();
        println!(
            "throughput: {throughput:.0} sagas/s over {:.2} s",
            elapsed.as_secs_f64()
        );
        println!(
            "latency ms: p50 {:.1}  p95 {:.1}  p99 {:.1}  max {:.1}",
            pct(0.50),
            pct(0.95),
            pct(0.99),
            pct(1.0)
        );
        Report {
            throughput,
            p50_ms: pct(0.50),
            p99_ms: pct(0.99),
            completed: latencies.len(),
            ..Report::default()
        }
    }
}

/// In a private stack, where every row belongs to this run: money, stock
/// and every saga finished, as the invariants say.
async fn check_invariants(stack: &Stack, args: &Args, run_id: &str) -> Result<()> {
    stack.settle().await?;
    let mut balances: Vec<(String, i64)> = (0..args.customers)
        .map(|i| (format!("{run_id}-rich-{i}"), RICH_BALANCE))
        .collect();
    balances.push((format!("{run_id}-broke"), 0));
    let mut stock: Vec<(String, i64)> = (0..args.products)
        .map(|i| (format!("{run_id}-plenty-{i}"), PLENTY_STOCK))
        .collect();
    stock.push((format!("{run_id}-scarce"), 0));
    let balances: Vec<(&str, i64)> = balances.iter().map(|(k, n)| (k.as_str(), *n)).collect();
    let stock: Vec<(&str, i64)> = stock.iter().map(|(k, n)| (k.as_str(), *n)).collect();
    stack.assert_invariants_from(&balances, &stock).await?;
    println!("invariants: hold (money, stock, every saga finished)");
    Ok(())
}

/// Prints, every second, what each consumer has waiting (pending) and in
/// hand (unacknowledged): where a saga spends its time under load.
async fn report_backlog(nats: async_nats::Client, subjects: Subjects) {
    let js = async_nats::jetstream::new(nats);
    let Ok(stream) = js.get_stream(subjects.events_stream()).await else {
        return;
    };
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut line = String::from("backlog");
        for name in common::roster::names() {
            let consumer: Result<async_nats::jetstream::consumer::PullConsumer, _> =
                stream.get_consumer(name).await;
            if let Ok(mut c) = consumer
                && let Ok(info) = c.info().await
            {
                line.push_str(&format!(
                    "  {name} {}+{}",
                    info.num_pending, info.num_ack_pending
                ));
            }
        }
        eprintln!("{line}");
    }
}

/// The slowest saga's events as the stream holds them, with the time each
/// step took since the one before: where the latency went.
async fn print_timeline(
    nats: &async_nats::Client,
    subjects: &Subjects,
    id: Uuid,
    latency: Duration,
) -> Result<()> {
    let js = async_nats::jetstream::new(nats.clone());
    let stream = js.get_stream(subjects.events_stream()).await?;
    let last = stream.get_info().await?.state.last_sequence;
    let mut steps = Vec::new();
    // Newest first: the slowest saga is usually among the last ones.
    for seq in (1..=last).rev().take(200_000) {
        let Ok(m) = stream.get_raw_message(seq).await else {
            continue;
        };
        if let Ok(env) = serde_json::from_slice::<common::Envelope>(&m.payload)
            && env.metadata.correlation_id == id
        {
            let stored = chrono::DateTime::<chrono::Utc>::from_timestamp_nanos(
                m.time.unix_timestamp_nanos() as i64,
            );
            steps.push((env, stored));
            if steps.len() >= 12 {
                break;
            }
        }
        if steps
            .last()
            .is_some_and(|(e, _)| e.event_type == "OrderPlaced")
        {
            break;
        }
    }
    steps.reverse();
    let mut line = format!(
        "slowest saga {id} ({:.1} ms):",
        latency.as_secs_f64() * 1000.0
    );
    let mut prev = None;
    let ms = |d: chrono::TimeDelta| d.num_microseconds().unwrap_or(0) as f64 / 1000.0;
    for (e, stored) in &steps {
        // Time since the previous event was stored (delivery and processing),
        // then from this event's commit to its storage in the stream (outbox relay).
        let gap = prev.map_or(0.0, |p| ms(e.timestamp - p));
        line.push_str(&format!(
            " {} +{gap:.1}ms (relayed in {:.1}ms)",
            e.event_type,
            ms(*stored - e.timestamp)
        ));
        prev = Some(*stored);
    }
    println!("{line}");
    Ok(())
}

/// What the running stack's processes had used at one moment: CPU time by
/// process (the services, nats-server, every Postgres backend, Redis), the
/// messages the broker had taken in and sent out, and how long each
/// service's relay had kept its events. Compared over a run, per saga,
/// these vary far less with the machine's moods than sagas per second do.
struct Costs {
    /// Group (a service, `nats-server`, `postgres`), pid, CPU time used.
    cpu: Vec<(String, u32, Duration)>,
    /// The broker's `in_msgs` and `out_msgs`, if its monitor answered.
    messages: Option<(u64, u64)>,
    /// Each service's relay: the seconds its published events had waited
    /// from their write to the outbox to the broker's acknowledgement, and
    /// how many events (`saga_relay_publish_seconds`), if its metrics
    /// answered.
    relayed: Vec<(String, Option<(f64, f64)>)>,
}

/// Where [`Costs`] are read from.
struct Observed<'a> {
    http: &'a reqwest::Client,
    /// The broker's monitor.
    monitor: &'a str,
    /// The services' processes.
    services: &'a [(String, u32)],
    /// The services' metrics endpoints, by name.
    metrics: &'a [(String, String)],
    run_dir: &'a std::path::Path,
}

impl Costs {
    async fn now(at: Observed<'_>) -> Costs {
        let Observed {
            http,
            monitor,
            services,
            metrics,
            run_dir,
        } = at;
        let mut pids: Vec<(String, u32)> = services.to_vec();
        // Every broker node `stack up` started (`nats.pid`, `nats-2.pid`, …).
        if let Ok(dir) = std::fs::read_dir(run_dir) {
            for entry in dir.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if let Some(node) = name.strip_suffix(".pid").filter(|n| n.starts_with("nats")) {
                    let pid = running(run_dir, node);
                    pids.extend(pid.map(|pid| ("nats-server".to_string(), pid)));
                }
            }
        }
        // Postgres (every backend of the server) and Redis: the shared
        // servers, this stack's use of them or not.
        if let Ok(proc) = std::fs::read_dir("/proc") {
            for entry in proc.flatten() {
                let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse().ok()) else {
                    continue;
                };
                let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
                if let name @ ("postgres" | "redis-server") = comm.trim() {
                    pids.push((name.to_string(), pid));
                }
            }
        }
        let cpu = pids
            .into_iter()
            .filter_map(|(group, pid)| Some((group, pid, cpu_time(pid)?)))
            .collect();
        let varz = async {
            let v: Value = http
                .get(format!("{monitor}/varz"))
                .timeout(Duration::from_secs(5))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            Some((v["in_msgs"].as_u64()?, v["out_msgs"].as_u64()?))
        };
        let mut relayed = Vec::with_capacity(metrics.len());
        for (name, url) in metrics {
            relayed.push((name.clone(), relay_waits(http, url).await));
        }
        Costs {
            cpu,
            messages: varz.await,
            relayed,
        }
    }

    /// Prints what `sagas` sagas cost since `before`: CPU milliseconds per
    /// saga by group (a process that ended meanwhile, a Postgres backend
    /// closed, is not counted), and the broker's messages per saga;
    /// returns the CPU milliseconds per saga by group.
    fn since(&self, before: &Costs, sagas: usize) -> Vec<(String, f64)> {
        if sagas == 0 {
            return Vec::new();
        }
        let mut groups: Vec<(String, Duration)> = Vec::new();
        for (group, pid, used) in &self.cpu {
            let earlier = before
                .cpu
                .iter()
                .find(|(_, p, _)| p == pid)
                .map_or(Duration::ZERO, |c| c.2);
            let spent = used.saturating_sub(earlier);
            match groups.iter_mut().find(|(g, _)| g == group) {
                Some((_, total)) => *total += spent,
                None => groups.push((group.clone(), spent)),
            }
        }
        let per_saga = |d: Duration| d.as_secs_f64() * 1000.0 / sagas as f64;
        let total: Duration = groups.iter().map(|g| g.1).sum();
        let each: Vec<String> = groups
            .iter()
            .map(|(g, d)| format!("{g} {:.2}", per_saga(*d)))
            .collect();
        println!(
            "cpu ms per saga: {}; all {:.2}",
            each.join(", "),
            per_saga(total)
        );
        if let (Some((i0, o0)), Some((i1, o1))) = (before.messages, self.messages) {
            println!(
                "broker messages per saga: in {:.1}, out {:.1}",
                i1.saturating_sub(i0) as f64 / sagas as f64,
                o1.saturating_sub(o0) as f64 / sagas as f64
            );
        }
        let waits: Vec<String> = self
            .relayed
            .iter()
            .filter_map(|(name, after)| {
                let (s0, n0) = before.relayed.iter().find(|(n, _)| n == name)?.1?;
                let (s1, n1) = (*after)?;
                (n1 > n0).then(|| format!("{name} {:.1}", (s1 - s0) * 1000.0 / (n1 - n0)))
            })
            .collect();
        if !waits.is_empty() {
            println!(
                "outbox to broker, mean ms per event (from its write to the broker's ack): {}",
                waits.join(", ")
            );
        }
        groups.into_iter().map(|(g, d)| (g, per_saga(d))).collect()
    }
}

/// The sum and count of `saga_relay_publish_seconds` in the metrics at
/// `url` (all its series), if they answered.
async fn relay_waits(http: &reqwest::Client, url: &str) -> Option<(f64, f64)> {
    let text = http
        .get(url)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let total = |metric: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(metric))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    };
    Some((
        total("saga_relay_publish_seconds_sum"),
        total("saga_relay_publish_seconds_count"),
    ))
}

/// The pid of the process `stack up` started as `name`, if it still runs.
fn running(run_dir: &std::path::Path, name: &str) -> Option<u32> {
    let pid = stack::process::Daemon::new(run_dir, name).running()?;
    u32::try_from(pid).ok()
}

/// CPU time (user and system) process `pid` has used, if it runs.
fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command (in parentheses, and it may hold blanks): utime and
    // stime are the 12th and 13th fields, in USER_HZ, which Linux fixes at
    // 100 per second for what it reports in /proc.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

/// Resident memory of process `pid` in KiB (`VmRSS`), if it runs.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}
