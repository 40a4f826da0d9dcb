//! Test harness: starts the real thing for one test, in its own namespace.
//!
//! Each [`Stack`] owns a private `nats-server` (2.15.1 from the project venv,
//! random port, temporary store dir), a private `redis-server` (unix socket),
//! four fresh Postgres databases on the local server, and a random subject and
//! Redis key prefix. Services run in-process on port 0, or as real processes
//! when a test needs to kill one. Everything is torn down on drop, so tests
//! run in parallel and twice in a row.

pub mod api_fuzz;
pub mod console;
pub mod exposition;
pub mod fuzz;
pub mod halted;
pub mod otlp;
pub mod pg_proxy;
pub mod raw_nats;
pub mod schemas;
pub mod webdriver;

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use async_nats::jetstream;
use common::{Config, Envelope, Subjects};
use futures::StreamExt;
use serde_json::{Value, json};
use sqlx::PgPool;
pub use stack::services::Launch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub use stack::{
    eventually,
    infra::{
        Broker, NatsCluster, NatsServer, PostgresServer, RedisServer, TestCertificates,
        TestDatabases, Users,
    },
};

/// The names of the roster's services.
pub const SERVICES: [&str; common::roster::SERVICES.len()] = {
    let mut names = [""; common::roster::SERVICES.len()];
    let mut i = 0;
    while i < names.len() {
        names[i] = common::roster::SERVICES[i].name;
        i += 1;
    }
    names
};

/// The events of a saga that succeeds, in order.
pub const HAPPY_PATH: [&str; 5] = [
    "OrderPlaced",
    "PaymentProcessed",
    "InventoryReserved",
    "ShipmentCreated",
    "OrderConfirmed",
];

/// The services an undeliverable order's saga passes through, in order:
/// forward to shipping, then back through its compensations.
pub const UNDELIVERABLE_SERVICES: [&str; 7] = [
    "order",
    "payment",
    "inventory",
    "shipping",
    "inventory",
    "payment",
    "order",
];

/// One saga of each outcome, ended: [`Stack::one_saga_of_each_kind`].
pub struct EachKind {
    /// alice's 2 widgets: confirmed.
    pub happy: Uuid,
    /// poor's order, over the balance: payment declined.
    pub declined: Uuid,
    /// alice's order of a product with no stock: refunded.
    pub out_of_stock: Uuid,
    /// alice's order to a country no one delivers to: released and refunded.
    pub undeliverable: Uuid,
}

/// Default deadline for a saga to reach its end in tests.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// A service running inside the test process.
struct InProcess {
    shutdown: CancellationToken,
    handle: JoinHandle<std::io::Result<()>>,
    base_url: String,
}

/// A service running as its own OS process (the `saga-service` binary).
pub struct ChildService {
    child: tokio::process::Child,
}

impl ChildService {
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// SIGKILL: no shutdown hook runs, nothing is flushed.
    pub async fn kill(mut self) -> Result<()> {
        self.child.kill().await.context("SIGKILL service process")?;
        Ok(())
    }
}

/// One test's complete system.
pub struct Stack {
    pub nats: Broker,
    /// Who the broker lets in: each service as itself, the test's own
    /// client as the operator.
    pub users: Users,
    pub redis: RedisServer,
    pub dbs: TestDatabases,
    pub prefix: String,
    pub subjects: Subjects,
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub http: reqwest::Client,
    services: HashMap<&'static str, InProcess>,
    /// Every service started in this test, in process or as a process: a
    /// consumer of one never started (provisioned all the same) holds what
    /// nobody was to apply, and does not count against settling.
    started: std::sync::Mutex<std::collections::BTreeSet<String>>,
    /// Balances and stock as [`Stack::set_balance`] and [`Stack::set_stock`]
    /// last arranged them: what [`Stack::assert_invariants`] starts from.
    arranged: std::sync::Mutex<BTreeMap<(&'static str, String), i64>>,
    /// Each product's price as [`Stack::price`] last set it (and the order
    /// service's catalog shows it): written while a price changes, read
    /// while an order priced with it is placed, so that no placement meets
    /// a price another one set meanwhile.
    prices: tokio::sync::RwLock<HashMap<String, i64>>,
    /// Its own Postgres server, if it was started on one (dropped last: the
    /// databases and services go first).
    pub postgres: Option<PostgresServer>,
    /// The certificates its servers present, when they take TLS only.
    pub certs: Option<TestCertificates>,
}

/// The number in environment variable `variable` (10 to 100,000), else
/// `default`: how many sagas a long run places.
pub fn sagas_from_env(variable: &str, default: u64) -> u64 {
    std::env::var(variable)
        .ok()
        .and_then(|n| n.parse().ok())
        .map_or(default, |n: u64| n.clamp(10, 100_000))
}

/// The admin token of every test stack's services.
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

/// An HTTP client that speaks as the operator (it sends [`ADMIN_TOKEN`]).
fn operator_client() -> Result<reqwest::Client> {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {ADMIN_TOKEN}").parse()?,
    );
    Ok(reqwest::Client::builder()
        .default_headers(headers)
        .build()?)
}

/// Runs headless Chromium (`CHROMIUM_BIN`, default `chromium`, which
/// `scripts/test.sh` installs) with `args` and a profile of its own; what it
/// printed on stdout.
pub async fn chromium(args: &[&str]) -> Result<String> {
    let bin = std::env::var("CHROMIUM_BIN").unwrap_or_else(|_| "chromium".into());
    let profile = std::env::temp_dir().join(format!("chromium-{}", Uuid::now_v7()));
    let run = tokio::process::Command::new(&bin)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--virtual-time-budget=10000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), run).await;
    let _ = std::fs::remove_dir_all(&profile);
    let out = out
        .context("Chromium did not finish within 60 s")?
        .with_context(|| {
            format!(
                "running {bin}: scripts/test.sh installs Debian's chromium, or set CHROMIUM_BIN"
            )
        })?;
    anyhow::ensure!(
        out.status.success(),
        "{bin} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Location of a workspace binary built next to the test executable.
pub fn workspace_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target profile dir");
    dir.join(name)
}

impl Stack {
    /// Broker, Redis, databases and all four services.
    pub async fn start() -> Result<Stack> {
        Self::start_with(&SERVICES).await
    }

    /// Broker, Redis, databases and only `services` (others can be started later).
    pub async fn start_with(services: &[&'static str]) -> Result<Stack> {
        Self::start_on(services, None, false).await
    }

    /// [`Stack::start`] on a Postgres server of its own
    /// ([`Stack::postgres`]), for a test that crashes or restarts it.
    pub async fn start_on_own_postgres() -> Result<Stack> {
        Self::start_on(&SERVICES, Some(PostgresServer::start().await?), false).await
    }

    /// [`Stack::start`] on a 3-node JetStream cluster ([`Stack::nats`]),
    /// every stream in 3 copies, for a test that kills its nodes.
    pub async fn start_on_cluster() -> Result<Stack> {
        Self::start_on(&SERVICES, None, true).await
    }

    /// A whole stack whose Postgres (its own), Redis and nats-server take
    /// connections over TLS only, with certificates made for the test: the
    /// clients must trust `certs.ca` (a test sets `SSL_CERT_FILE`,
    /// `PGSSLMODE` and `PGSSLROOTCERT` before it starts one).
    pub async fn start_with_tls(certs: TestCertificates) -> Result<Stack> {
        common::telemetry::init_for_tests();
        let postgres = PostgresServer::start_tls(&certs).await?;
        let dbs = TestDatabases::create_on(&postgres.admin_url(), &SERVICES).await?;
        let prefix = format!("t{}", &Uuid::new_v4().simple().to_string()[..10]);
        let users = Users::random(&Subjects::new(prefix.clone()));
        let nats = Broker::Single(NatsServer::start_with_users_and_tls(&users, &certs).await?);
        let redis = RedisServer::start_tls(&certs).await?;
        Self::assemble(
            &SERVICES,
            Some(postgres),
            nats,
            redis,
            dbs,
            users,
            prefix,
            Some(certs),
        )
        .await
    }

    async fn start_on(
        services: &[&'static str],
        postgres: Option<PostgresServer>,
        cluster: bool,
    ) -> Result<Stack> {
        common::telemetry::init_for_tests();
        let databases = async {
            match &postgres {
                Some(server) => TestDatabases::create_on(&server.admin_url(), &SERVICES).await,
                None => TestDatabases::create(&SERVICES).await,
            }
        };
        let prefix = format!("t{}", &Uuid::new_v4().simple().to_string()[..10]);
        let users = Users::random(&Subjects::new(prefix.clone()));
        let broker = async {
            Ok::<_, anyhow::Error>(if cluster {
                Broker::Cluster(NatsCluster::start(Some(&users)).await?)
            } else {
                Broker::Single(NatsServer::start_with_users(&users).await?)
            })
        };
        let (nats, redis, dbs) = tokio::try_join!(broker, RedisServer::start(), databases)?;
        Self::assemble(services, postgres, nats, redis, dbs, users, prefix, None).await
    }

    /// A stack of these parts, provisioned, with `services` started.
    #[allow(clippy::too_many_arguments)]
    async fn assemble(
        services: &[&'static str],
        postgres: Option<PostgresServer>,
        nats: Broker,
        redis: RedisServer,
        dbs: TestDatabases,
        users: Users,
        prefix: String,
        certs: Option<TestCertificates>,
    ) -> Result<Stack> {
        let client = common::broker::connect(
            users.as_operator(async_nats::ConnectOptions::new()),
            &nats.url(),
        )
        .await
        .context("connect test client")?;
        let js = jetstream::new(client.clone());
        let mut stack = Stack {
            subjects: Subjects::new(prefix.clone()),
            nats,
            users,
            redis,
            dbs,
            prefix,
            client,
            js,
            http: operator_client()?,
            services: HashMap::new(),
            started: Default::default(),
            arranged: Default::default(),
            prices: Default::default(),
            postgres,
            certs,
        };
        stack.provision().await?;
        for s in services {
            stack.start_service(s).await?;
        }
        Ok(stack)
    }

    /// Provisions the streams and consumers as the provisioning identity
    /// (a step of its own, as `stack provision` is: the services may not).
    pub async fn provision(&self) -> Result<Vec<String>> {
        stack::infra::provision(
            &self.nats.url(),
            Some(&self.users),
            &self.subjects,
            self.nats.stream_replicas(),
        )
        .await
    }

    /// A whole stack in which customer `alice` has `balance` and product
    /// `widget` has `stock`: where most sagas of the tests start.
    pub async fn stocked(balance: i64, stock: i64) -> Result<Stack> {
        let stack = Stack::start().await?;
        stack.set_balance("alice", balance).await?;
        stack.set_stock("widget", stock).await?;
        Ok(stack)
    }

    /// A whole stack and one saga of each outcome, each `price` a unit.
    pub async fn one_saga_of_each_kind(price: i64) -> Result<(Stack, EachKind)> {
        let stack = Stack::stocked(10_000, 5).await?;
        stack.set_balance("poor", 100).await?;
        stack.set_stock("rare", 0).await?;
        let (happy, _) = stack
            .run_saga("alice", &[("widget", 2, price)], "US")
            .await?;
        let (declined, _) = stack
            .run_saga("poor", &[("widget", 1, price)], "US")
            .await?;
        let (out_of_stock, _) = stack.run_saga("alice", &[("rare", 1, price)], "US").await?;
        let (undeliverable, _) = stack
            .run_saga("alice", &[("widget", 1, price)], "ZZ")
            .await?;
        let each = EachKind {
            happy,
            declined,
            out_of_stock,
            undeliverable,
        };
        Ok((stack, each))
    }

    /// A stack without the shipping service, and a saga of alice's (2
    /// widgets at 1 000) waiting for it: charged, stock reserved. Where an
    /// operator publishes by hand what shipping would have.
    pub async fn waiting_for_shipping() -> Result<(Stack, Uuid)> {
        let stack = Stack::start_with(&["order", "payment", "inventory"]).await?;
        stack.set_balance("alice", 10_000).await?;
        stack.set_stock("widget", 5).await?;
        let id = stack.place("alice", &[("widget", 2, 1_000)], "US").await?;
        eventually("the reservation", DEADLINE, || async {
            Ok((stack.stock("widget").await? == (3, 2)).then_some(()))
        })
        .await?;
        Ok((stack, id))
    }

    /// One server of the broker as the `nats` CLI is pointed at it, with
    /// the operator's credentials: `nats://operator:<password>@host:port`.
    pub fn cli_url(&self) -> String {
        let (user, password) = self.users.operator();
        let url = self.nats.first_url();
        let address = url.trim_start_matches("nats://");
        format!("nats://{user}:{password}@{address}")
    }

    /// Configuration a service of this stack gets.
    pub fn config(&self, service: &str) -> Config {
        let mut c = Config::local(service);
        c.database_url = self.dbs.url(service);
        c.redis_url = self.redis.url();
        c.nats_url = self.nats.url();
        c.nats_stream_replicas = self.nats.stream_replicas();
        if let Some((user, password)) = self.users.credentials(service) {
            c.nats_user = Some(user);
            c.nats_password = Some(password);
        }
        c.http_addr = "127.0.0.1:0".parse().unwrap();
        c.subject_prefix = self.prefix.clone();
        c.redis_key_prefix = self.prefix.clone();
        c.consumer_concurrency = 32;
        c.admin_token = Some(ADMIN_TOKEN.into());
        // Four tests run at once, each with four services (pool plus the
        // relay's own connection) and the assertion pools: about 20
        // connections a stack keeps the suite under PostgreSQL's default
        // max_connections of 100.
        c.database_max_connections = 3;
        c
    }

    /// Environment for running `service` as a process with [`Self::config`].
    pub fn env(&self, service: &str) -> Vec<(String, String)> {
        let c = self.config(service);
        vec![
            ("DATABASE_URL".into(), c.database_url),
            ("REDIS_URL".into(), c.redis_url),
            ("NATS_URL".into(), c.nats_url),
            (
                "NATS_STREAM_REPLICAS".into(),
                c.nats_stream_replicas.to_string(),
            ),
            ("NATS_USER".into(), c.nats_user.unwrap_or_default()),
            ("NATS_PASSWORD".into(), c.nats_password.unwrap_or_default()),
            ("HTTP_ADDR".into(), c.http_addr.to_string()),
            ("SUBJECT_PREFIX".into(), c.subject_prefix),
            (
                "CONSUMER_CONCURRENCY".into(),
                c.consumer_concurrency.to_string(),
            ),
            (
                "DATABASE_MAX_CONNECTIONS".into(),
                c.database_max_connections.to_string(),
            ),
        ]
    }

    /// What an in-process `service` of this stack is started with.
    pub fn launch(&self, service: &str) -> Launch {
        let mut launch = Launch::new(self.config(service));
        // Short enough for a test to see a stall come and go.
        launch.order.stall_after = Duration::from_secs(2);
        launch
    }

    pub async fn start_service(&mut self, name: &'static str) -> Result<()> {
        self.start_service_with(name, |_| {}).await
    }

    /// Starts `name` with its configuration and settings changed by `adjust`.
    pub async fn start_service_with(
        &mut self,
        name: &'static str,
        adjust: impl FnOnce(&mut Launch),
    ) -> Result<()> {
        let mut launch = self.launch(name);
        adjust(&mut launch);
        self.started.lock().expect("lock").insert(name.to_string());
        let shutdown = CancellationToken::new();
        let Some(building) = stack::services::build(name, launch, shutdown.clone()) else {
            bail!("no service named {name}");
        };
        let service = building.await.with_context(|| format!("start {name}"))?;
        let base_url = format!("http://{}", service.local_addr());
        let handle = tokio::spawn(service.run());
        self.services.insert(
            name,
            InProcess {
                shutdown,
                handle,
                base_url,
            },
        );
        Ok(())
    }

    /// Graceful stop: drains in-flight work, like SIGTERM.
    pub async fn stop_service(&mut self, name: &str) -> Result<()> {
        let svc = self
            .services
            .remove(name)
            .with_context(|| format!("{name} is not running"))?;
        svc.shutdown.cancel();
        svc.handle.await??;
        Ok(())
    }

    /// Runs `service` as a separate process with extra environment.
    pub fn spawn_process(&self, service: &str, extra_env: &[(&str, &str)]) -> Result<ChildService> {
        self.started
            .lock()
            .expect("lock")
            .insert(service.to_string());
        let bin = workspace_binary("saga-service");
        let mut cmd = tokio::process::Command::new(&bin);
        cmd.arg(service)
            .envs(self.env(service))
            .kill_on_drop(true)
            .stdin(Stdio::null());
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        if std::env::var_os("TEST_LOG").is_none() {
            cmd.stdout(Stdio::null()).stderr(Stdio::null());
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("spawn {}", bin.display()))?;
        Ok(ChildService { child })
    }

    pub fn url(&self, service: &str, path: &str) -> String {
        let base = &self
            .services
            .get(service)
            .unwrap_or_else(|| panic!("{service} is not running in-process"))
            .base_url;
        format!("{base}{path}")
    }

    pub async fn pool(&self, service: &str) -> Result<PgPool> {
        self.dbs.pool(service).await
    }

    /// Holds `table` of `service`'s database in SHARE mode, on a connection
    /// of its own, until `ROLLBACK` on it (or its drop): writers of the
    /// table wait. SHARE mode takes no transaction id, so projections of
    /// other tests on this Postgres are not held back with it.
    pub async fn hold_table(&self, service: &str, table: &str) -> Result<sqlx::PgConnection> {
        use sqlx::Connection;
        let mut holder = sqlx::PgConnection::connect(&self.config(service).database_url).await?;
        sqlx::query("BEGIN").execute(&mut holder).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "LOCK TABLE {table} IN SHARE MODE"
        )))
        .execute(&mut holder)
        .await?;
        Ok(holder)
    }

    /// Waits until `service` (started as a process) has created `table`:
    /// its migrations have run.
    pub async fn wait_for_table(&self, service: &str, table: &str) -> Result<()> {
        let pool = self.pool(service).await?;
        eventually(
            &format!("{service} to create {table}"),
            DEADLINE,
            || async {
                let ready: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
                    .bind(table)
                    .fetch_one(&pool)
                    .await?;
                Ok(ready.then_some(()))
            },
        )
        .await
    }

    // ---- arranging ----

    /// Sends `body` (if any) to `service` at `path`, with `If-Match` if
    /// given: the status, the ETag and the JSON body (null if none).
    pub async fn call(
        &self,
        method: reqwest::Method,
        service: &str,
        path: &str,
        body: Option<Value>,
        if_match: Option<&str>,
    ) -> Result<(u16, Option<String>, Value)> {
        let mut request = self.http.request(method, self.url(service, path));
        if let Some(body) = body {
            request = request.json(&body);
        }
        if let Some(tag) = if_match {
            request = request.header("If-Match", tag);
        }
        let r = request.send().await?;
        let status = r.status().as_u16();
        let etag = r
            .headers()
            .get("etag")
            .map(|v| v.to_str().unwrap_or_default().to_string());
        Ok((status, etag, r.json().await.unwrap_or(Value::Null)))
    }

    /// `PUT` of `body`: status and the reply (JSON, or null).
    pub async fn put(&self, service: &str, path: &str, body: Value) -> Result<(u16, Value)> {
        let (status, _, reply) = self
            .call(reqwest::Method::PUT, service, path, Some(body), None)
            .await?;
        Ok((status, reply))
    }

    /// `PUT` of `body`, which must succeed (arranging, not testing).
    async fn put_ok(&self, service: &str, path: &str, body: Value) -> Result<()> {
        let (status, _, reply) = self
            .call(reqwest::Method::PUT, service, path, Some(body), None)
            .await?;
        anyhow::ensure!((200..300).contains(&status), "PUT {path}: {status} {reply}");
        Ok(())
    }

    pub async fn set_balance(&self, customer: &str, balance: i64) -> Result<()> {
        self.arrange("payment", customer, balance).await
    }

    pub async fn set_stock(&self, product: &str, available: i64) -> Result<()> {
        self.arrange("inventory", product, available).await
    }

    /// Sets a customer's balance (`payment`) or a product's stock
    /// (`inventory`) and remembers it for [`Stack::assert_invariants`].
    async fn arrange(&self, service: &'static str, key: &str, value: i64) -> Result<()> {
        let (path, body) = match service {
            "payment" => (format!("/accounts/{key}"), json!({ "balance": value })),
            _ => (format!("/stock/{key}"), json!({ "available": value })),
        };
        self.put_ok(service, &path, body).await?;
        let mut arranged = self.arranged.lock().expect("arranged");
        arranged.insert((service, key.to_string()), value);
        Ok(())
    }

    /// Prices `product` at `unit_price` at inventory (`PUT /products`,
    /// whatever was there) and waits until the order service's catalog has
    /// the price, so an order placed next is priced with it.
    pub async fn price(&self, product: &str, unit_price: i64) -> Result<()> {
        let mut prices = self.prices.write().await;
        self.reprice(&mut prices, product, unit_price).await
    }

    async fn reprice(
        &self,
        prices: &mut HashMap<String, i64>,
        product: &str,
        unit_price: i64,
    ) -> Result<()> {
        anyhow::ensure!(
            self.services.contains_key("inventory"),
            "pricing {product} needs inventory running: price products before stopping it"
        );
        let path = format!("/products/{product}");
        let body = json!({ "name": format!("{product} (test)"), "unitPrice": unit_price });
        let (status, _, reply) = self
            .call(
                reqwest::Method::PUT,
                "inventory",
                &path,
                Some(body),
                Some("*"),
            )
            .await?;
        anyhow::ensure!((200..300).contains(&status), "PUT {path}: {status} {reply}");
        // Without the order service, the next placement asks again (a PUT of
        // the same price changes nothing) and waits for its catalog then.
        if self.services.contains_key("order") {
            eventually(
                &format!("{product} at {unit_price} in the catalog"),
                DEADLINE,
                || async {
                    let (status, entry) = self.get_json("order", &path).await?;
                    Ok((status == 200 && entry["unitPrice"] == unit_price).then_some(()))
                },
            )
            .await?;
            prices.insert(product.to_string(), unit_price);
        }
        Ok(())
    }

    /// Prices every product of `body`'s lines that names a unit price at
    /// that price, unless it already has it: a test that writes a price
    /// into an order means the catalog to have it.
    async fn price_lines(
        &self,
        body: &Value,
    ) -> Result<tokio::sync::RwLockReadGuard<'_, HashMap<String, i64>>> {
        let wanted: Vec<(&str, i64)> = body["lines"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|l| Some((l["productId"].as_str()?, l["unitPrice"].as_i64()?)))
            .filter(|(p, price)| {
                common::limits::check_id("productId", p).is_ok()
                    && (1..=common::limits::MAX_UNIT_PRICE).contains(price)
            })
            .collect();
        let priced = |prices: &HashMap<String, i64>, (product, price): &(&str, i64)| {
            prices.get(*product) == Some(price)
        };
        let prices = self.prices.read().await;
        if wanted.iter().all(|w| priced(&prices, w)) {
            return Ok(prices);
        }
        drop(prices);
        let mut prices = self.prices.write().await;
        for w in &wanted {
            if !priced(&prices, w) {
                self.reprice(&mut prices, w.0, w.1).await?;
            }
        }
        Ok(prices.downgrade())
    }

    /// Places `customer`'s order of `lines` to `country`, waits for its
    /// outcome and for the system to settle: the order as it ended.
    pub async fn run_saga(
        &self,
        customer: &str,
        lines: &[(&str, i64, i64)],
        country: &str,
    ) -> Result<(Uuid, Value)> {
        let id = self.place(customer, lines, country).await?;
        let order = self.wait_for_outcome(id).await?;
        self.settle().await?;
        Ok((id, order))
    }

    /// Places `customer`'s order of `lines` (product, quantity, unit price)
    /// to an address in `country`: the new order's id.
    pub async fn place(
        &self,
        customer: &str,
        lines: &[(&str, i64, i64)],
        country: &str,
    ) -> Result<Uuid> {
        self.place_order(&order_body(customer, lines, country))
            .await
    }

    /// Places the order `body` (its products priced as its lines say, see
    /// [`Stack::price`]): the new order's id.
    pub async fn place_order(&self, body: &Value) -> Result<Uuid> {
        Ok(self.place_order_for_cancel(body).await?.0)
    }

    /// Places `customer`'s order of `lines` like [`Stack::place`]: its id
    /// and the cancel token its placement answered with.
    pub async fn place_with_cancel_token(
        &self,
        customer: &str,
        lines: &[(&str, i64, i64)],
        country: &str,
    ) -> Result<(Uuid, String)> {
        self.place_order_for_cancel(&order_body(customer, lines, country))
            .await
    }

    async fn place_order_for_cancel(&self, body: &Value) -> Result<(Uuid, String)> {
        // Held until the order is placed: its prices stay as it says.
        let _prices = self.price_lines(body).await?;
        let r = self
            .http
            .post(self.url("order", "/orders"))
            .json(body)
            .send()
            .await?;
        let status = r.status();
        let text = r.text().await?;
        anyhow::ensure!(status.as_u16() == 201, "place order: {status} {text}");
        let v: Value = serde_json::from_str(&text)?;
        let id = v["orderId"].as_str().context("orderId")?.parse()?;
        let token = v["cancelToken"]
            .as_str()
            .context("cancelToken")?
            .to_string();
        Ok((id, token))
    }

    // ---- observing ----

    pub async fn get_json(&self, service: &str, path: &str) -> Result<(u16, Value)> {
        let r = self.http.get(self.url(service, path)).send().await?;
        let status = r.status().as_u16();
        let v = r.json::<Value>().await.unwrap_or(Value::Null);
        Ok((status, v))
    }

    /// `GET /metrics` of a service, which `promtool check metrics` must pass.
    pub async fn metrics(&self, service: &str) -> Result<exposition::Exposition> {
        let r = self.http.get(self.url(service, "/metrics")).send().await?;
        anyhow::ensure!(
            r.status() == 200,
            "GET /metrics of {service}: {}",
            r.status()
        );
        let text = r.text().await?;
        stack::infra::promtool(&["check", "metrics"], text.as_bytes())
            .await
            .with_context(|| format!("the /metrics of {service}:\n{text}"))?;
        exposition::Exposition::parse(&text)
    }

    /// Runs `sagactl <line>` against this stack, the line split into words
    /// as a shell would (double quotes group): what it printed, or its
    /// error, with what it printed as context.
    pub async fn sagactl(&self, line: &str) -> Result<String> {
        self.sagactl_as(line, &[], Some(ADMIN_TOKEN)).await
    }

    /// `sagactl <line>` as [`Stack::sagactl`] runs it, with some of its
    /// connection flags given other values (`("--order-url", …)`) and
    /// `token` as the admin token (`None`: none set).
    pub async fn sagactl_as(
        &self,
        line: &str,
        overrides: &[(&str, &str)],
        token: Option<&str>,
    ) -> Result<String> {
        use clap::Parser;
        let (user, password) = self.users.operator();
        let flags = [
            ("--nats-url", self.nats.url()),
            ("--nats-user", user),
            ("--nats-password", password),
            ("--subject-prefix", self.subjects.prefix().to_string()),
            ("--order-url", self.url("order", "")),
        ];
        let mut argv = vec!["sagactl".to_string()];
        for (flag, value) in flags {
            let value = overrides
                .iter()
                .find(|(f, _)| *f == flag)
                .map_or(value, |(_, v)| v.to_string());
            argv.extend([flag.to_string(), value]);
        }
        argv.extend(
            line.split('"')
                .enumerate()
                .flat_map(|(i, part)| match i % 2 {
                    1 => vec![part.to_string()],
                    _ => part.split_whitespace().map(str::to_string).collect(),
                }),
        );
        let args = line;
        let mut cli = sagactl::Cli::try_parse_from(&argv)?;
        // As ADMIN_TOKEN would give it (never a flag).
        cli.connection.admin_token = token.map(str::to_string);
        let mut out = Vec::new();
        let result = sagactl::run(cli, &mut out).await;
        let printed = String::from_utf8_lossy(&out).into_owned();
        match result {
            Ok(()) => Ok(printed),
            Err(e) => Err(e.context(format!("sagactl {args} printed:\n{printed}"))),
        }
    }

    /// The DOM of `path` on the order service once headless Chromium has run
    /// its script to the end (the page marks `<body data-ready>`), signed
    /// in with the operator token (given in the link's fragment).
    pub async fn browse(&self, path: &str) -> Result<String> {
        self.browse_as(path, Some(ADMIN_TOKEN), "true").await
    }

    /// The DOM of `path` signed in with `token` (none: not signed in) once
    /// the page says it is `ready` (`true`, `signin`, `error`).
    pub async fn browse_as(&self, path: &str, token: Option<&str>, ready: &str) -> Result<String> {
        let mut url = self.url("order", path);
        if let Some(token) = token {
            url.push_str(&format!("#token={token}"));
        }
        let marker = format!("data-ready=\"{ready}\"");
        eventually(&format!("Chromium to render {path}"), DEADLINE, || async {
            let dom = chromium(&["--dump-dom", &url]).await?;
            Ok(dom.contains(&marker).then_some(dom))
        })
        .await
    }

    /// Polls `service`'s metrics until `check` holds.
    pub async fn metrics_until(
        &self,
        service: &str,
        what: &str,
        check: impl Fn(&exposition::Exposition) -> bool,
    ) -> Result<exposition::Exposition> {
        eventually(what, DEADLINE, || async {
            let m = self.metrics(service).await?;
            Ok(check(&m).then_some(m))
        })
        .await
    }

    /// `GET /health/ready` of a service: (status, body).
    pub async fn ready(&self, service: &str) -> Result<(u16, Value)> {
        self.get_json(service, "/health/ready").await
    }

    /// Publishes `body` to `subject` through JetStream and waits for the PubAck.
    pub async fn publish(&self, subject: &str, body: Vec<u8>) -> Result<()> {
        self.js
            .publish(subject.to_string(), body.into())
            .await?
            .await?;
        Ok(())
    }

    /// Every event the services (and sagactl) published to the events and
    /// catalog streams validates against its JSON Schema
    /// ([`schemas::check`]). What they published is told apart from what
    /// a test published by hand (a broken event, on purpose) by its
    /// `Nats-Msg-Id`: the relay's is the event id, sagactl's the action id.
    /// Returns how many it checked, by event type.
    pub async fn assert_published_events_match_their_schemas(
        &self,
    ) -> Result<BTreeMap<String, usize>> {
        let mut checked: BTreeMap<String, usize> = BTreeMap::new();
        for name in [
            self.subjects.events_stream(),
            self.subjects.catalog_stream(),
        ] {
            let stream = self.js.get_stream(&name).await?;
            let last = stream.get_info().await?.state.last_sequence;
            for seq in 1..=last {
                let m = match stream.get_raw_message(seq).await {
                    Ok(m) => m,
                    Err(e)
                        if e.kind() == jetstream::stream::RawMessageErrorKind::NoMessageFound =>
                    {
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                };
                let Ok(body) = serde_json::from_slice::<serde_json::Value>(&m.payload) else {
                    continue;
                };
                let operator = self.subjects.is_operator(&m.subject);
                let id = if operator {
                    &body["actionId"]
                } else {
                    &body["eventId"]
                };
                let msg_id = m.headers.get("Nats-Msg-Id").map(|v| v.as_str());
                if id.as_str().is_none() || msg_id != id.as_str() {
                    continue;
                }
                schemas::check(&m.payload, operator).with_context(|| {
                    format!(
                        "{} on {} does not match its schema: {}",
                        body["eventType"].as_str().unwrap_or("an operator action"),
                        m.subject,
                        String::from_utf8_lossy(&m.payload)
                    )
                })?;
                let kind = body["eventType"].as_str().unwrap_or("OperatorAction");
                *checked.entry(kind.to_string()).or_default() += 1;
            }
        }
        Ok(checked)
    }

    /// Dead letters with all their headers: (headers, body) per message.
    pub async fn dead_letter_messages(&self) -> Result<Vec<(async_nats::HeaderMap, Vec<u8>)>> {
        let stream = self
            .js
            .get_stream(self.subjects.dead_letter_stream())
            .await?;
        let last = stream.get_info().await?.state.last_sequence;
        let mut out = Vec::new();
        for seq in 1..=last {
            match stream.get_raw_message(seq).await {
                Ok(m) => out.push((m.headers, m.payload.to_vec())),
                Err(e) if e.kind() == jetstream::stream::RawMessageErrorKind::NoMessageFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(out)
    }

    /// Waits until the dead-letter stream holds at least `n` messages; returns them.
    pub async fn wait_for_dead_letters(
        &self,
        n: usize,
    ) -> Result<Vec<(async_nats::HeaderMap, Vec<u8>)>> {
        eventually(&format!("{n} dead letter(s)"), DEADLINE, || async {
            let all = self.dead_letter_messages().await?;
            Ok((all.len() >= n).then_some(all))
        })
        .await
    }

    /// The order as `GET /orders/{id}` shows it once the read model has
    /// caught up with what has happened so far (what a test saw elsewhere,
    /// in a timeline or a balance, the read model shows too).
    pub async fn order(&self, id: Uuid) -> Result<Value> {
        self.projected().await?;
        let (status, v) = self.get_json("order", &format!("/orders/{id}")).await?;
        anyhow::ensure!(status == 200, "get order {id}: {status} {v}");
        Ok(v)
    }

    /// Waits until the order leaves PENDING; returns it.
    pub async fn wait_for_outcome(&self, id: Uuid) -> Result<Value> {
        eventually(&format!("order {id} to finish"), DEADLINE, || async {
            let o = self.order(id).await?;
            Ok((o["status"] != "PENDING").then_some(o))
        })
        .await
    }

    pub async fn balance(&self, customer: &str) -> Result<i64> {
        let sql = "SELECT balance FROM accounts WHERE customer_id = $1";
        let pool = self.pool("payment").await?;
        Ok(sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .bind(customer)
            .fetch_one(&pool)
            .await?)
    }

    /// (available, reserved) of a product.
    pub async fn stock(&self, product: &str) -> Result<(i64, i64)> {
        let sql = "SELECT available, reserved FROM stock WHERE product_id = $1";
        let pool = self.pool("inventory").await?;
        Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(product)
            .fetch_one(&pool)
            .await?)
    }

    /// Shipments shipping created (and did not call off or fail).
    pub async fn shipments_created(&self) -> Result<i64> {
        let sql = "SELECT count(*) FROM shipments WHERE status = 'created'";
        self.count("shipping", sql).await
    }

    /// A whole stack arranged for [`Stack::place_steadily`] with `sagas`
    /// sagas: alice and bob can pay for anything, poor for three widgets,
    /// and there are widgets for every order.
    pub async fn for_steady_sagas(sagas: u64) -> Result<Stack> {
        Self::steady(Stack::start().await?, sagas).await
    }

    /// Waits up to `within` until every saga of `ids` has ended (none
    /// PENDING in the read model); how many ended in each status.
    pub async fn every_saga_ended(
        &self,
        ids: &[Uuid],
        within: Duration,
    ) -> Result<BTreeMap<String, i64>> {
        eventually("every saga to end", within, || async {
            self.projected().await?;
            let counts: Vec<(String, i64)> = sqlx::query_as(
                "SELECT status, count(*) FROM orders WHERE order_id = ANY($1) GROUP BY status",
            )
            .bind(ids)
            .fetch_all(&self.pool("order").await?)
            .await?;
            let outcomes: BTreeMap<String, i64> = counts.into_iter().collect();
            let ended = outcomes.values().sum::<i64>() == ids.len() as i64
                && !outcomes.contains_key("PENDING");
            Ok(ended.then_some(outcomes))
        })
        .await
    }

    /// What `sagactl audit` prints over the four databases of this stack.
    pub async fn audit(&self) -> Result<String> {
        let databases: Vec<String> = SERVICES
            .iter()
            .map(|s| format!("--database {s}={}", self.dbs.url(s)))
            .collect();
        self.sagactl(&format!("audit {}", databases.join(" ")))
            .await
    }

    /// [`Stack::for_steady_sagas`] on a Postgres server of its own.
    pub async fn for_steady_sagas_on_own_postgres(sagas: u64) -> Result<Stack> {
        Self::steady(Stack::start_on_own_postgres().await?, sagas).await
    }

    /// [`Stack::for_steady_sagas`] on a 3-node JetStream cluster.
    pub async fn for_steady_sagas_on_cluster(sagas: u64) -> Result<Stack> {
        Self::steady(Stack::start_on_cluster().await?, sagas).await
    }

    async fn steady(stack: Stack, sagas: u64) -> Result<Stack> {
        for customer in ["alice", "bob"] {
            stack.set_balance(customer, 1_000_000).await?;
        }
        stack.set_balance("poor", 3 * STEADY_PRICE).await?;
        stack.set_stock("widget", 3 * sagas as i64).await?;
        stack.price("widget", STEADY_PRICE).await?;
        Ok(stack)
    }

    /// Places `sagas` sagas of 1 to 3 widgets, one every `every` from
    /// `start` (at most 64 waiting for an answer): a tenth by poor (declined
    /// once the money is gone), a tenth to an undeliverable address, the
    /// rest go through. Their ids, in the order they were answered.
    pub async fn place_steadily(
        &self,
        sagas: u64,
        every: Duration,
        start: Instant,
    ) -> Vec<Result<Uuid>> {
        futures::stream::iter(0..sagas)
            .map(|i| async move {
                tokio::time::sleep_until((start + every * i as u32).into()).await;
                let (customer, country) = match i % 10 {
                    0 => ("poor", "US"),
                    1 => ("alice", "ZZ"),
                    n if n % 2 == 0 => ("alice", "US"),
                    _ => ("bob", "US"),
                };
                let lines = [("widget", 1 + (i % 3) as i64, STEADY_PRICE)];
                self.place(customer, &lines, country).await
            })
            .buffer_unordered(64)
            .collect()
            .await
    }

    pub async fn count(&self, service: &str, sql: &str) -> Result<i64> {
        let pool = self.pool(service).await?;
        Ok(sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .fetch_one(&pool)
            .await?)
    }

    /// Rows of `table` in `service`'s database (the order service's once
    /// its read model has caught up).
    pub async fn rows(&self, service: &str, table: &str) -> Result<i64> {
        if service == "order" {
            self.projected().await?;
        }
        self.count(service, &format!("SELECT count(*) FROM {table}"))
            .await
    }

    /// Every message in the events stream, in order.
    pub async fn stream_events(&self) -> Result<Vec<(String, Envelope)>> {
        let stream = self.js.get_stream(self.subjects.events_stream()).await?;
        let last = stream.get_info().await?.state.last_sequence;
        let mut out = Vec::new();
        for seq in 1..=last {
            match stream.get_raw_message(seq).await {
                Ok(m) => {
                    if let Ok(env) = serde_json::from_slice::<Envelope>(&m.payload) {
                        out.push((m.subject.to_string(), env));
                    }
                }
                Err(e) if e.kind() == jetstream::stream::RawMessageErrorKind::NoMessageFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(out)
    }

    /// Event types of one saga in the stream, in order.
    pub async fn saga_event_types(&self, order_id: Uuid) -> Result<Vec<String>> {
        Ok(self
            .stream_events()
            .await?
            .into_iter()
            .filter(|(_, e)| e.metadata.correlation_id == order_id)
            .map(|(_, e)| e.event_type)
            .collect())
    }

    /// Dead letters: (reason header, consumer header, body) per message.
    pub async fn dead_letters(&self) -> Result<Vec<(String, String, Vec<u8>)>> {
        Ok(self
            .dead_letter_messages()
            .await?
            .into_iter()
            .map(|(headers, body)| {
                let h = |name: &str| {
                    headers
                        .get(name)
                        .map(|v| v.as_str().to_string())
                        .unwrap_or_default()
                };
                (
                    h(common::dlq::dlq_headers::REASON),
                    h(common::dlq::dlq_headers::CONSUMER),
                    body,
                )
            })
            .collect())
    }

    /// True when nothing can happen any more without new input: every
    /// outbox is empty and every consumer has nothing pending or unacked.
    pub async fn is_settled(&self) -> Result<bool> {
        for s in SERVICES {
            let pool = self.pool(s).await?;
            // A service that never started in this test has no tables yet.
            let migrated: bool = sqlx::query_scalar("SELECT to_regclass('outbox') IS NOT NULL")
                .fetch_one(&pool)
                .await?;
            if migrated && self.count(s, "SELECT count(*) FROM outbox").await? != 0 {
                return Ok(false);
            }
        }
        if !self.is_projected().await? {
            return Ok(false);
        }
        let stream = self.js.get_stream(self.subjects.events_stream()).await?;
        let started = self.started.lock().expect("lock").clone();
        for s in SERVICES.iter().filter(|s| started.contains(**s)) {
            let mut consumer: jetstream::consumer::PullConsumer = match stream.get_consumer(s).await
            {
                Ok(c) => c,
                Err(_) => continue, // its stream was deleted and not provisioned again
            };
            let info = consumer.info().await?;
            if info.num_pending != 0 || info.num_ack_pending != 0 {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Whether the order service's read model (`orders`) has applied every
    /// event of its event store (true before the service ever ran).
    pub async fn is_projected(&self) -> Result<bool> {
        use order::projection::{OrdersView, Projection, lag};
        let pool = self.pool("order").await?;
        let migrated: bool =
            sqlx::query_scalar("SELECT to_regclass('projection_checkpoints') IS NOT NULL")
                .fetch_one(&pool)
                .await?;
        Ok(!migrated || lag(&pool, OrdersView::NAME).await? == 0.0)
    }

    /// Waits until the read model has applied every event written so far.
    pub async fn projected(&self) -> Result<()> {
        eventually("the read model to catch up", DEADLINE, || async {
            Ok(self.is_projected().await?.then_some(()))
        })
        .await
    }

    /// Waits until [`Self::is_settled`] holds twice in a row.
    pub async fn settle(&self) -> Result<()> {
        let start = Instant::now();
        let mut streak = 0;
        while streak < 2 {
            if start.elapsed() > DEADLINE {
                bail!("the system did not settle within {DEADLINE:?}");
            }
            streak = if self.is_settled().await? {
                streak + 1
            } else {
                0
            };
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        Ok(())
    }

    /// Publishes every message of the events stream again, as a new message
    /// (different `Nats-Msg-Id`, same bytes): each consumer sees each event twice.
    pub async fn redeliver_every_event(&self) -> Result<usize> {
        let events = self.stream_events().await?;
        for (subject, env) in &events {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", format!("dup-{}", env.event_id).as_str());
            self.js
                .publish_with_headers(subject.clone(), headers, env.to_bytes().into())
                .await?
                .await?;
        }
        Ok(events.len())
    }

    /// The invariants that must hold whenever the system is settled, from
    /// the balances and stock this stack arranged.
    pub async fn assert_invariants(&self) -> Result<()> {
        let arranged = self.arranged.lock().expect("arranged").clone();
        let of = |service: &str| -> Vec<(&str, i64)> {
            let keys = arranged.iter().filter(|((s, _), _)| *s == service);
            keys.map(|((_, k), v)| (k.as_str(), *v)).collect()
        };
        self.assert_invariants_from(&of("payment"), &of("inventory"))
            .await
    }

    /// The invariants, for the given initial balances and stock (when they
    /// were arranged some other way than through this stack).
    pub async fn assert_invariants_from(
        &self,
        initial_balances: &[(&str, i64)],
        initial_stock: &[(&str, i64)],
    ) -> Result<()> {
        self.projected().await?;
        self.assert_published_events_match_their_schemas().await?;
        let order_pool = self.pool("order").await?;
        let rows: Vec<(
            String,
            i64,
            sqlx::types::Json<Vec<common::event::OrderLine>>,
            String,
        )> = sqlx::query_as("SELECT status, total, lines, customer_id FROM orders")
            .fetch_all(&order_pool)
            .await?;
        let mut confirmed_total: HashMap<String, i64> = HashMap::new();
        let mut confirmed_qty: HashMap<String, i64> = HashMap::new();
        for (status, total, lines, customer) in &rows {
            anyhow::ensure!(
                [
                    "CONFIRMED",
                    "CANCELLED",
                    "REQUIRES_INTERVENTION",
                    "MANUALLY_COMPENSATED"
                ]
                .contains(&status.as_str()),
                "an order is stuck in {status}"
            );
            if status == "CONFIRMED" {
                *confirmed_total.entry(customer.clone()).or_default() += total;
                for l in lines.iter() {
                    *confirmed_qty.entry(l.product_id.clone()).or_default() += l.quantity;
                }
            }
        }
        for (customer, initial) in initial_balances {
            let spent = initial - self.balance(customer).await?;
            let expected = confirmed_total.get(*customer).copied().unwrap_or(0);
            anyhow::ensure!(
                spent == expected,
                "{customer}: charged minus refunded is {spent}, confirmed orders total {expected}"
            );
        }
        for (product, initial) in initial_stock {
            let (available, reserved) = self.stock(product).await?;
            let taken = initial - available;
            let expected = confirmed_qty.get(*product).copied().unwrap_or(0);
            anyhow::ensure!(
                taken == expected && reserved == expected,
                "{product}: taken {taken} (reserved {reserved}), confirmed quantity {expected}"
            );
        }
        Ok(())
    }

    /// Subscribes to every event of this stack (for tests that watch a saga).
    pub async fn watch(&self) -> Result<async_nats::Subscriber> {
        Ok(self.client.subscribe(self.subjects.all()).await?)
    }

    /// Stops every in-process service gracefully.
    pub async fn shutdown(mut self) -> Result<()> {
        let names: Vec<&'static str> = self.services.keys().copied().collect();
        for n in names {
            self.stop_service(n).await?;
        }
        Ok(())
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        for svc in self.services.values() {
            svc.shutdown.cancel();
            svc.handle.abort();
        }
    }
}

/// The unit price of the widgets [`Stack::place_steadily`] orders.
pub const STEADY_PRICE: i64 = 100;

/// A valid order body.
pub fn order_body(customer: &str, lines: &[(&str, i64, i64)], country: &str) -> Value {
    json!({
        "customerId": customer,
        "lines": lines.iter().map(|(p, q, price)| json!({"productId": p, "quantity": q, "unitPrice": price})).collect::<Vec<_>>(),
        "shippingAddress": {
            "name": "Ada Lovelace",
            "street": "12 Analytical Row",
            "city": "London",
            "postalCode": "12345",
            "country": country,
        }
    })
}

/// Reads one message from a subscription with a deadline.
pub async fn next_message(
    sub: &mut async_nats::Subscriber,
    deadline: Duration,
) -> Result<async_nats::Message> {
    tokio::time::timeout(deadline, sub.next())
        .await
        .context("no message before the deadline")?
        .context("subscription closed")
}

/// Asserts that a request was refused with `expected` and a JSON body whose
/// `error` message mentions `message`.
#[track_caller]
pub fn assert_refused(status: u16, body: &Value, expected: u16, message: &str) {
    assert_eq!(status, expected, "{body}");
    let error = body["error"].as_str().unwrap_or_default();
    assert!(
        error.contains(message),
        "expected an error mentioning {message:?}: {body}"
    );
}
