//! The shell around a service's domain: connect to the infrastructure, apply
//! migrations and the JetStream topology, then run the HTTP server, the
//! consumer and the outbox relay until shutdown, draining in-flight work.

use std::{borrow::Cow, future::Future, net::SocketAddr, pin::Pin, time::Duration};

use async_nats::jetstream;
use axum::Router;
use sqlx::{
    PgPool,
    migrate::Migrator,
    postgres::{PgConnectOptions, PgPoolOptions},
};
use std::str::FromStr;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use utoipa_axum::router::OpenApiRouter;

use crate::{
    config::Config,
    consumer::{ConsumerRuntime, Handler, RuntimeParts},
    health::{Condition, Health},
    http::HealthState,
    idempotency::{DoneTtl, IdempotencyStore, Redis},
    janitor::Janitor,
    meter::{self, Meter, Probe, Scrape, Watched},
    outbox::{OutboxSignal, Relay},
    subjects::Subjects,
    topology,
    trace::Tracing,
};

/// Tables every service has: outbox and consumed-event guard.
pub static COMMON_MIGRATIONS: Migrator = sqlx::migrate!("./migrations");

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("configuration: {0}")]
    Config(String),
    #[error("postgres: {0}")]
    Postgres(#[from] sqlx::Error),
    #[error("migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("nats: {0}")]
    Nats(String),
    #[error(transparent)]
    Topology(#[from] topology::TopologyError),
    #[error("http listener on {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
}

/// Connections to Postgres, Redis and NATS, and the service's health board.
#[derive(Clone)]
pub struct Infra {
    pub config: Config,
    pub pool: PgPool,
    pub redis: Redis,
    pub nats: async_nats::Client,
    pub js: jetstream::Context,
    pub subjects: Subjects,
    pub outbox: OutboxSignal,
    pub health: Health,
    pub meter: Meter,
    /// Where its spans go (trace context is carried either way).
    pub tracing: Tracing,
}

/// How long start-up waits for infrastructure that is still coming up.
const CONNECT_PATIENCE: Duration = Duration::from_secs(60);

async fn with_retry<T, E: std::fmt::Display, F: Future<Output = Result<T, E>>>(
    what: &str,
    mut f: impl FnMut() -> F,
) -> Result<T, E> {
    let deadline = tokio::time::Instant::now() + CONNECT_PATIENCE;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let delay = crate::backoff::backoff(attempt, Duration::from_secs(2));
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if tokio::time::Instant::now() + delay < deadline => {
                tracing::warn!(error = %e, "{what} not reachable yet; retrying");
                tokio::time::sleep(delay).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// How long a pooled connection may sit unused before it is checked with a
/// round trip when next taken: one in steady use is not (sqlx's default
/// checks every one, a round trip before each transaction on the hot path).
/// A connection is also checked when it is returned, and one that turns out
/// dead fails its statement, which the consumer retries like any transient
/// failure.
const PING_IF_IDLE_FOR: Duration = Duration::from_secs(5);

/// Worker threads a service's runtime has, unless `TOKIO_WORKER_THREADS`
/// says otherwise. A service spends its time waiting on round trips
/// (Postgres, the broker, Redis), not computing: at saturation each of
/// ours uses well under one core. A second worker only adds the wake-ups
/// of two threads handing tasks to each other: one worker took a fifth
/// of the services' context switches and about 8% of their CPU per saga
/// away at saturation, in alternated runs (docs/benchmarks.md).
pub const WORKER_THREADS: usize = 1;

/// The runtime a service runs on: [`WORKER_THREADS`] worker threads, or
/// as many as `TOKIO_WORKER_THREADS` asks for (tokio reads it).
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        builder.worker_threads(WORKER_THREADS);
    }
    builder.enable_all().build()
}

/// The pool every service uses.
pub fn pool_options(max_connections: u32) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= PING_IF_IDLE_FOR {
                    sqlx::Connection::ping(conn).await?;
                }
                Ok(true)
            })
        })
}

impl Infra {
    /// What the consumer runtime needs besides the handler, from the
    /// configuration and these connections.
    fn runtime_parts(&self, done_ttl: DoneTtl) -> RuntimeParts {
        let config = &self.config;
        RuntimeParts {
            name: config.service.clone(),
            pool: self.pool.clone(),
            js: self.js.clone(),
            idempotency: IdempotencyStore::new(
                self.redis.clone(),
                &config.redis_key_prefix,
                &config.service,
                done_ttl,
            ),
            subjects: self.subjects.clone(),
            outbox: self.outbox.clone(),
            health: self.health.clone(),
            meter: self.meter.clone(),
            concurrency: config.consumer_concurrency,
            lanes: config.consumer_lanes,
            batch: config.consumer_batch,
            max_deliveries: config.consumer_max_deliveries,
            max_payload: self.max_payload(),
            tracing: self.tracing.clone(),
        }
    }

    /// The outbox relay of this process, unless `OUTBOX_RELAY=off`.
    fn relay(&self) -> Result<Option<Relay>, StartError> {
        let config = &self.config;
        if !config.outbox_relay_enabled {
            return Ok(None);
        }
        let name = format!("{} relay, pid {}", config.service, std::process::id());
        Ok(Some(Relay {
            // Which process leads is in `relay_lease` and pg_stat_activity.
            options: PgConnectOptions::from_str(&config.database_url)?.application_name(&name),
            name,
            lease: config.relay_lease,
            js: self.js.clone(),
            subjects: self.subjects.clone(),
            signal: self.outbox.clone(),
            poll: config.outbox_poll,
            health: self.health.clone(),
            meter: self.meter.clone(),
            vacuum_after: crate::outbox::VACUUM_AFTER,
            delete_linger: crate::outbox::DELETE_LINGER,
        }))
    }

    /// Connects (waiting up to a minute for Postgres and NATS), runs the
    /// common and the service's migrations, and applies the streams. Redis
    /// is connected in the background: the service runs without it, on the
    /// Postgres guard alone, until it answers.
    pub async fn connect(config: Config, migrations: &Migrator) -> Result<Infra, StartError> {
        let health = Health::default();
        let pool = with_retry("postgres", || {
            pool_options(config.database_max_connections).connect(&config.database_url)
        })
        .await?;
        combined(migrations).run(&pool).await?;
        let redis = Redis::connect(&config.redis_url, health.clone())?;

        let seeds = crate::broker::seeds(&config.nats_url).map_err(StartError::Nats)?;
        let nats = with_retry("nats", || {
            crate::broker::with_credentials(
                async_nats::ConnectOptions::new(),
                config.nats_user.as_deref(),
                config.nats_password.as_deref(),
            )
            .name(format!("{}-service", config.service))
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(5))
            .connect(seeds.clone())
        })
        .await
        .map_err(|e| StartError::Nats(e.to_string()))?;
        let js = jetstream::new(nats.clone());
        let subjects = Subjects::new(config.subject_prefix.clone());
        // The streams are provisioned by a step of their own; a service
        // only finds out whether they are there, and says so until they are.
        tokio::spawn(watch_streams(js.clone(), subjects.clone(), health.clone()));
        let tracing = match &config.otlp_endpoint {
            Some(endpoint) => {
                Tracing::exporting(&config.service, endpoint).map_err(StartError::Config)?
            }
            None => Tracing::off(),
        };

        Ok(Infra {
            tracing,
            meter: Meter::new(&config.service),
            config,
            pool,
            redis,
            nats,
            js,
            subjects,
            outbox: OutboxSignal::default(),
            health,
        })
    }

    pub fn health(&self) -> HealthState {
        HealthState {
            pool: self.pool.clone(),
            redis: self.redis.clone(),
            nats: self.nats.clone(),
            board: self.health.clone(),
        }
    }

    /// The broker's `max_payload` (see [`crate::broker::max_payload`]).
    pub fn max_payload(&self) -> usize {
        crate::broker::max_payload(&self.js)
    }

    /// What operator endpoints require.
    pub fn admin(&self) -> crate::http::AdminToken {
        crate::http::AdminToken::new(self.config.admin_token.as_deref())
    }
}

/// The part of readiness that says whether the streams are there.
pub const HEALTH_STREAMS: &str = "streams";

/// Checks the streams until they are as their files say (every 5 s),
/// reporting under [`HEALTH_STREAMS`]; then stops.
async fn watch_streams(js: jetstream::Context, subjects: Subjects, health: Health) {
    loop {
        let problems = topology::check_streams(&js, &subjects).await;
        if problems.is_empty() {
            health.ok(HEALTH_STREAMS);
            return;
        }
        if health.report(HEALTH_STREAMS, Condition::Failing(problems.join("; "))) {
            tracing::error!(problems = %problems.join("; "), "the streams are not as provisioned");
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

/// Common migrations first, then the service's, as one migrator: what a
/// service's database is migrated with (also by its maintenance commands).
pub fn combined(service: &Migrator) -> Migrator {
    let migrations: Vec<_> = COMMON_MIGRATIONS
        .iter()
        .chain(service.iter())
        .cloned()
        .collect();
    Migrator {
        migrations: Cow::Owned(migrations),
        ..Migrator::DEFAULT
    }
}

type Task = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A built service: listener bound, consumer created, ready to [`run`](Service::run).
pub struct Service {
    name: String,
    listener: TcpListener,
    router: Router,
    tasks: Vec<Task>,
    relay: Option<Task>,
    relay_stop: CancellationToken,
    shutdown: CancellationToken,
    scrape: Scrape,
    tracing: Tracing,
}

impl Service {
    /// Connects, migrates and builds a service whose handler and HTTP
    /// routes are made from its connections: what payment, inventory and
    /// shipping are.
    pub async fn start<H: Handler>(
        config: Config,
        migrations: &'static Migrator,
        handler: impl FnOnce(&Infra) -> H,
        routes: impl FnOnce(&Infra) -> OpenApiRouter,
        shutdown: CancellationToken,
    ) -> Result<Service, StartError> {
        let infra = Infra::connect(config, migrations).await?;
        let handler = handler(&infra);
        let routes = routes(&infra);
        Service::build(&infra, handler, routes, shutdown).await
    }

    /// Binds `config.http_addr` (port 0 picks one), creates the service's
    /// durable consumer and prepares the relay. `routes` are served with
    /// health and `GET /openapi.json` (the document they make).
    pub async fn build<H: Handler>(
        infra: &Infra,
        handler: H,
        routes: OpenApiRouter,
        shutdown: CancellationToken,
    ) -> Result<Service, StartError> {
        let config = &infra.config;
        let listener = TcpListener::bind(config.http_addr)
            .await
            .map_err(|e| StartError::Bind(config.http_addr, e))?;
        // Not there yet (or not as its file says): the consumer says so in
        // readiness and looks again until it is.
        let consumer = topology::bind_consumer(
            &infra.js,
            &infra.subjects,
            topology::Durable::Service(&config.service),
        )
        .await
        .inspect_err(|e| tracing::error!(error = %e, "the service's consumer cannot be used yet"));
        let done_ttl = DoneTtl::default();
        let runtime = ConsumerRuntime::new(handler, infra.runtime_parts(done_ttl.clone()));
        let janitor = Janitor {
            pool: infra.pool.clone(),
            js: infra.js.clone(),
            subjects: infra.subjects.clone(),
            every: config.janitor_every,
            margin: config.janitor_margin,
            done: done_ttl,
            meter: infra.meter.clone(),
        }
        .run(shutdown.clone());
        let tasks: Vec<Task> = vec![
            Box::pin(runtime.run(consumer, shutdown.clone())),
            Box::pin(janitor),
        ];
        // The relay stops after everything else has drained (see `run`).
        let relay_stop = CancellationToken::new();
        let relay: Option<Task> = match infra.relay()? {
            Some(relay) => Some(Box::pin(relay.run(relay_stop.clone()))),
            None => {
                tracing::warn!("OUTBOX_RELAY=off: committed events stay in the outbox");
                None
            }
        };
        Ok(Service {
            name: config.service.clone(),
            listener,
            router: crate::http_shell::shell(
                crate::api_doc::serve(routes, infra.health(), &config.service),
                &config.service,
                infra.tracing.clone(),
            ),
            tasks,
            relay,
            relay_stop,
            shutdown,
            tracing: infra.tracing.clone(),
            scrape: Scrape {
                meter: infra.meter.clone(),
                pool: infra.pool.clone(),
                js: infra.js.clone(),
                subjects: infra.subjects.clone(),
                consumer: config.service.clone(),
                watched: vec![Watched {
                    stream: infra.subjects.events_stream(),
                    durable: config.service.clone(),
                    projection: None,
                }],
                probes: Vec::new(),
            },
        })
    }

    /// Adds a background task that runs with the service and stops on shutdown.
    pub fn spawn_with(&mut self, task: impl Future<Output = ()> + Send + 'static) {
        self.tasks.push(Box::pin(task));
    }

    /// Reports a further consumer's backlog in `/metrics`.
    pub fn watch_metrics(&mut self, watched: Watched) {
        self.scrape.watched.push(watched);
    }

    /// Adds a read to every `/metrics` scrape.
    pub fn probe_metrics(&mut self, probe: Probe) {
        self.scrape.probes.push(probe);
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("bound listener has an address")
    }

    pub fn port(&self) -> u16 {
        self.local_addr().port()
    }

    /// Serves until the shutdown token is cancelled, then drains in order:
    /// stop taking work (no new pulls, requests or commands), finish what was
    /// taken (HTTP requests, events, commands in flight, each committing its
    /// events to the outbox), then flush the outbox, then close. The relay
    /// runs throughout and is stopped last, so it publishes every commit the
    /// drain made.
    pub async fn run(self) -> std::io::Result<()> {
        tracing::info!(service = %self.name, addr = %self.local_addr(), "service started");
        let shutdown = self.shutdown.clone();
        let router = self.router.merge(crate::http_shell::shell(
            self.scrape.router(),
            &self.name,
            Tracing::off(),
        ));
        let mut tasks = self.tasks;
        tasks.push(Box::pin(meter::upkeep(shutdown.clone())));
        let server = axum::serve(self.listener, router)
            .with_graceful_shutdown(async move { shutdown.cancelled().await });
        let relay_stop = self.relay_stop.clone();
        // Each task is a task of the runtime's, run by its worker threads:
        // not polled by the thread that awaits `run` (under `#[tokio::main]`,
        // the main thread, which every wake-up would have to be handed to)
        // and not polled again whenever another of them wakes up.
        let relay = spawned(async move {
            if let Some(relay) = self.relay {
                relay.await;
            }
        });
        let tasks: Vec<_> = tasks.into_iter().map(spawned).collect();
        let server = spawned(server.into_future());
        let drained = async move {
            let (served, _) = tokio::join!(server, futures::future::join_all(tasks));
            // Everything that commits events has finished: flush and stop.
            relay_stop.cancel();
            served
        };
        let (served, ()) = tokio::join!(drained, relay);
        let traces = self.tracing;
        let _ = tokio::task::spawn_blocking(move || traces.flush()).await;
        tracing::info!(service = %self.name, "service stopped");
        served
    }
}

/// `task` spawned on the runtime, as a future of its output that behaves
/// as `task` awaited in place would: a panic in it is resumed where it is
/// awaited, and dropping the future (a service aborted) aborts the task.
fn spawned<T: Send + 'static>(
    task: impl Future<Output = T> + Send + 'static,
) -> impl Future<Output = T> {
    struct AbortOnDrop(tokio::task::AbortHandle);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let handle = tokio::spawn(task);
    let guard = AbortOnDrop(handle.abort_handle());
    async move {
        let _guard = guard;
        match handle.await {
            Ok(output) => output,
            Err(e) => match e.try_into_panic() {
                Ok(panic) => std::panic::resume_unwind(panic),
                // Only a runtime shutting down cancels a task: it is gone.
                Err(e) => panic!("service task cancelled: {e}"),
            },
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

/// Runs a service configured by `config`: logs, build, run until a signal,
/// then drain ([`crate::cli::main_with`] reads the configuration first).
pub async fn run<F, Fut>(config: Config, build: F) -> anyhow::Result<()>
where
    F: FnOnce(Config, CancellationToken) -> Fut,
    Fut: Future<Output = Result<Service, StartError>>,
{
    crate::telemetry::init(config.log_format);
    let shutdown = CancellationToken::new();
    let service = build(config, shutdown.clone()).await?;
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutdown requested; draining");
        shutdown.cancel();
    });
    service.run().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_service_runs_on_one_worker_thread_unless_the_environment_asks_for_more() {
        let asked = std::env::var("TOKIO_WORKER_THREADS")
            .ok()
            .and_then(|n| n.parse().ok());
        let runtime = runtime().expect("runtime");
        assert_eq!(
            runtime.metrics().num_workers(),
            asked.unwrap_or(WORKER_THREADS)
        );
    }
}
