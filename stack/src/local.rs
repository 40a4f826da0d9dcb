//! The local stack `stack up` starts: our nats-server and one process per
//! roster service, each with a pid file and a log in the run directory, on
//! the shared Postgres and Redis. A start-up that fails stops whatever it
//! started and names the log to read; nothing is left half-started.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use common::roster::{self, ServiceSpec};
use sqlx::{Connection, PgConnection};

use crate::process::{Daemon, port_in_use, stop_all, stop_pids};

/// Where and on which ports the local stack runs; every field has a default
/// and an environment variable (see the `stack` command's help).
#[derive(Debug, Clone)]
pub struct Local {
    pub root: PathBuf,
    pub run_dir: PathBuf,
    /// `None`: 4222/8222, or 4333/8333 when another server holds 4222.
    pub nats_ports: Option<(u16, u16)>,
    pub service_ports: BTreeMap<&'static str, u16>,
    pub pg_port: u16,
    pub redis_port: u16,
    /// Databases are `<prefix>_<service>`.
    pub database_prefix: String,
    pub subject_prefix: String,
    pub nats_server_bin: PathBuf,
}

impl Local {
    /// Defaults with the environment applied.
    pub fn from_env(root: &Path) -> Result<Local> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let port = |k: &str, default: u16| -> Result<u16> {
            match var(k) {
                Some(v) => v.parse().with_context(|| format!("{k}={v} is not a port")),
                None => Ok(default),
            }
        };
        let nats_ports = match var("NATS_PORT") {
            Some(_) => Some((port("NATS_PORT", 4222)?, port("NATS_MONITOR_PORT", 8222)?)),
            None => None,
        };
        let mut service_ports = BTreeMap::new();
        for s in &roster::SERVICES {
            service_ports.insert(s.name, port(&s.port_variable(), s.default_port)?);
        }
        Ok(Local {
            root: root.to_path_buf(),
            run_dir: var("RUN_DIR").map_or_else(|| root.join(".run"), PathBuf::from),
            nats_ports,
            service_ports,
            pg_port: port("PG_PORT", 5432)?,
            redis_port: port("REDIS_PORT", 6379)?,
            database_prefix: var("DATABASE_PREFIX").unwrap_or_else(|| "saga".into()),
            subject_prefix: var("SUBJECT_PREFIX").unwrap_or_else(|| "saga".into()),
            nats_server_bin: var("NATS_SERVER_BIN")
                .map_or_else(|| root.join(".venv/bin/nats-server"), PathBuf::from),
        })
    }

    /// The services' admin token: `ADMIN_TOKEN`, else the one kept in
    /// `<RUN_DIR>/admin-token`, else a new random one written there (mode
    /// 0600), so the operator finds it with `cat .run/admin-token`.
    pub fn admin_token(&self) -> Result<String> {
        if let Ok(token) = std::env::var("ADMIN_TOKEN")
            && !token.is_empty()
        {
            return Ok(token);
        }
        let path = self.run_dir.join("admin-token");
        if let Ok(token) = std::fs::read_to_string(&path) {
            return Ok(token.trim().to_string());
        }
        std::fs::create_dir_all(&self.run_dir)?;
        let token = format!(
            "{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        );
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("writing {}", path.display()))?;
        std::io::Write::write_all(&mut file, format!("{token}\n").as_bytes())?;
        Ok(token)
    }

    /// The URL of a service, or of one replica of it (`payment-2`).
    pub fn service_url(&self, daemon: &str) -> String {
        format!("http://127.0.0.1:{}", self.daemon_port(daemon))
    }

    /// The port of a service's daemon: the service's port for its first
    /// process, plus 10 for each replica after it (`payment-2`: 8092).
    fn daemon_port(&self, daemon: &str) -> u16 {
        let (name, k) = replica_of(daemon);
        self.service_ports[name] + 10 * (k as u16 - 1)
    }

    fn database(&self, spec: &ServiceSpec) -> String {
        format!("{}_{}", self.database_prefix, spec.name)
    }

    fn admin_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.pg_port)
    }

    fn nats(&self) -> Daemon {
        Daemon::new(&self.run_dir, "nats")
    }

    /// Every service's first process, and the other replicas started.
    fn services(&self) -> Vec<Daemon> {
        let mut out = Vec::new();
        for name in roster::names() {
            out.push(Daemon::new(&self.run_dir, name));
            let others = (2..=MAX_REPLICAS).map(|k| Daemon::new(&self.run_dir, &replica(name, k)));
            out.extend(others.filter(Daemon::recorded));
        }
        out
    }

    /// The ports our running nats-server was started with.
    fn running_nats_ports(&self) -> Option<(u16, u16)> {
        let text = std::fs::read_to_string(self.run_dir.join("nats.ports")).ok()?;
        let (a, b) = text.trim().split_once(' ')?;
        Some((a.parse().ok()?, b.parse().ok()?))
    }
}

/// Most processes `up --replicas` runs per service.
pub const MAX_REPLICAS: usize = 8;

/// The daemon name of replica `k` (from 1) of service `name`: `name`,
/// then `name-2`, `name-3`, ….
fn replica(name: &str, k: usize) -> String {
    if k == 1 {
        name.to_string()
    } else {
        format!("{name}-{k}")
    }
}

/// The service and replica number of a daemon name.
fn replica_of(daemon: &str) -> (&str, usize) {
    match daemon.rsplit_once('-') {
        Some((name, k)) if k.parse::<usize>().is_ok() => (name, k.parse().unwrap_or(1)),
        _ => (daemon, 1),
    }
}

/// What one `up` started, by pid, stopped again (services first, the broker
/// last) if start-up fails.
struct Started<'a> {
    local: &'a Local,
    daemons: Vec<(Daemon, i32)>,
    done: bool,
}

impl Drop for Started<'_> {
    fn drop(&mut self) {
        if self.done || self.daemons.is_empty() {
            return;
        }
        let names: Vec<&str> = self.daemons.iter().map(|(d, _)| d.name.as_str()).collect();
        eprintln!(
            "warning: start-up failed; stopping what this run started: {}",
            names.join(" ")
        );
        let (nats, services): (Vec<_>, Vec<_>) = self
            .daemons
            .iter()
            .cloned()
            .partition(|(d, _)| d.name == "nats");
        stop_pids(&services, Duration::from_secs(30));
        stop_pids(&nats, Duration::from_secs(20));
        eprintln!(
            "warning: nothing of this run is left running; the logs are in {}",
            self.local.run_dir.display()
        );
    }
}

/// Starts the stack: databases, our nats-server (reused when it already runs
/// on the wanted ports), then every service of the roster as `exe serve
/// <name>`, and waits until each is ready. Running services are restarted.
/// Returns the broker's URL.
pub async fn up(local: &Local, exe: &Path, replicas: usize) -> Result<String> {
    anyhow::ensure!(
        (1..=MAX_REPLICAS).contains(&replicas),
        "--replicas {replicas}: from 1 to {MAX_REPLICAS}"
    );
    if !local.nats_server_bin.exists() {
        bail!(
            "{} not found: scripts/up.sh installs nats-server 2.15.1 into .venv, or set NATS_SERVER_BIN",
            local.nats_server_bin.display()
        );
    }
    create_databases(local).await?;
    std::fs::create_dir_all(&local.run_dir)?;
    // Restart: the old services go before their nats-server might.
    stop_all(&local.services(), Duration::from_secs(30));
    let mut started = Started {
        local,
        daemons: Vec::new(),
        done: false,
    };
    let (nats_port, monitor_port) = ensure_nats(local, &mut started).await?;
    let nats_url = format!("nats://127.0.0.1:{nats_port}");

    let admin_token = local.admin_token()?;
    let mut children: Vec<(Daemon, Child)> = Vec::new();
    let replicas = roster::SERVICES
        .iter()
        .flat_map(|spec| (1..=replicas).map(move |k| (spec, replica(spec.name, k))));
    for (spec, name) in replicas {
        let port = local.daemon_port(&name);
        if port_in_use(port) {
            bail!(
                "port {port} (for {name}) is already in use by another process; set {} to use another",
                spec.port_variable()
            );
        }
        let daemon = Daemon::new(&local.run_dir, &name);
        let mut command = Command::new(exe);
        command
            .args(["serve", spec.name])
            .env(
                "DATABASE_URL",
                format!(
                    "postgres://postgres@127.0.0.1:{}/{}",
                    local.pg_port,
                    local.database(spec)
                ),
            )
            .env(
                "REDIS_URL",
                format!("redis://127.0.0.1:{}", local.redis_port),
            )
            .env("NATS_URL", &nats_url)
            .env("HTTP_ADDR", format!("127.0.0.1:{port}"))
            .env("SUBJECT_PREFIX", &local.subject_prefix)
            .env("ADMIN_TOKEN", &admin_token)
            .env("LOG_FORMAT", "json")
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            );
        let child = daemon.spawn(&mut command)?;
        started.daemons.push((daemon.clone(), child.id() as i32));
        children.push((daemon, child));
    }
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()?;
    for (daemon, child) in &mut children {
        wait_ready(local, &http, daemon, child, Duration::from_secs(90)).await?;
        println!(
            "==> {} ready on {} (pid {})",
            daemon.name,
            local.service_url(&daemon.name),
            child.id()
        );
    }
    write_env_file(local, nats_port, monitor_port)?;
    started.done = true;
    Ok(nats_url)
}

/// Waits for `/health/ready`; a ready answer counts only while our process
/// is alive, so another program on the port cannot pass for it.
async fn wait_ready(
    local: &Local,
    http: &reqwest::Client,
    daemon: &Daemon,
    child: &mut Child,
    timeout: Duration,
) -> Result<()> {
    let url = format!("{}/health/ready", local.service_url(&daemon.name));
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            bail!(
                "{} exited during start-up ({status}); last lines of {}:\n{}",
                daemon.name,
                daemon.log_path().display(),
                daemon.log_tail(20)
            );
        }
        if let Ok(r) = http.get(&url).send().await
            && r.status().is_success()
        {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "{} (pid {}) not ready after {timeout:?}; see {}",
                daemon.name,
                child.id(),
                daemon.log_path().display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn ensure_nats(local: &Local, started: &mut Started<'_>) -> Result<(u16, u16)> {
    let nats = local.nats();
    if let Some(pid) = nats.running() {
        let running = local.running_nats_ports();
        if let Some(ports) = running
            && local.nats_ports.is_none_or(|want| want == ports)
            && nats_healthy(ports.1).await
        {
            println!(
                "==> our nats-server is already running (pid {pid}, port {})",
                ports.0
            );
            return Ok(ports);
        }
        stop_all(std::slice::from_ref(&nats), Duration::from_secs(20));
    }
    let (port, monitor) = choose_nats_ports(local)?;
    let store = local.run_dir.join("jetstream");
    println!(
        "==> starting nats-server on 127.0.0.1:{port} (monitor {monitor}, store {})",
        store.display()
    );
    // The shipped configuration with the store moved into the run directory
    // (the server refuses a second store_dir on its command line).
    let shipped = local.root.join("nats/nats-server.conf");
    let shipped_text =
        std::fs::read_to_string(&shipped).with_context(|| format!("read {}", shipped.display()))?;
    let mut moved = false;
    let conf_text: Vec<String> = shipped_text
        .lines()
        .map(|line| match line.trim_start().strip_prefix("store_dir") {
            Some(_) => {
                moved = true;
                format!("  store_dir: {:?}", store.display().to_string())
            }
            None => line.to_string(),
        })
        .collect();
    if !moved {
        bail!(
            "{} has no store_dir line to point at {}",
            shipped.display(),
            store.display()
        );
    }
    let conf = local.run_dir.join("nats-server.conf");
    std::fs::write(&conf, conf_text.join("\n") + "\n")?;
    let mut command = Command::new(&local.nats_server_bin);
    command
        .arg("-c")
        .arg(&conf)
        .args(["-a", "127.0.0.1", "-p", &port.to_string()])
        .args(["-m", &monitor.to_string()]);
    let mut child = nats.spawn(&mut command)?;
    started.daemons.push((nats.clone(), child.id() as i32));
    std::fs::write(
        local.run_dir.join("nats.ports"),
        format!("{port} {monitor}\n"),
    )?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !nats_healthy(monitor).await {
        if let Some(status) = child.try_wait()? {
            bail!(
                "nats-server exited during start-up ({status}); last lines of {}:\n{}",
                nats.log_path().display(),
                nats.log_tail(20)
            );
        }
        if Instant::now() >= deadline {
            bail!(
                "nats-server not healthy after 30s; see {}",
                nats.log_path().display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok((port, monitor))
}

async fn nats_healthy(monitor: u16) -> bool {
    let url = format!("http://127.0.0.1:{monitor}/healthz?js-enabled-only=true");
    let client = reqwest::Client::new();
    matches!(
        tokio::time::timeout(Duration::from_secs(2), client.get(url).send()).await,
        Ok(Ok(r)) if r.status().is_success()
    )
}

fn choose_nats_ports(local: &Local) -> Result<(u16, u16)> {
    let (port, monitor) = match local.nats_ports {
        Some(ports) => ports,
        None if !port_in_use(4222) && !port_in_use(8222) => (4222, 8222),
        None => {
            println!(
                "==> port 4222 or 8222 is taken by another process: using 4333, monitor 8333 for nats-server"
            );
            (4333, 8333)
        }
    };
    for (p, var) in [(port, "NATS_PORT"), (monitor, "NATS_MONITOR_PORT")] {
        if port_in_use(p) {
            bail!("port {p} is in use; set {var} to a free port");
        }
    }
    Ok((port, monitor))
}

/// One database per service, created if missing; safe to run concurrently.
async fn create_databases(local: &Local) -> Result<()> {
    let mut conn = PgConnection::connect(&local.admin_url())
        .await
        .with_context(|| format!("connect to Postgres at {}", local.admin_url()))?;
    for spec in &roster::SERVICES {
        let name = local.database(spec);
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
                .bind(&name)
                .fetch_one(&mut conn)
                .await?;
        if exists {
            continue;
        }
        println!("==> creating database {name}");
        if let Err(e) = sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&mut conn)
            .await
        {
            // Another start-up created it first.
            let code = e.as_database_error().and_then(|d| d.code());
            if !matches!(code.as_deref(), Some("42P04" | "23505")) {
                return Err(e).with_context(|| format!("create database {name}"));
            }
        }
    }
    Ok(())
}

fn write_env_file(local: &Local, nats_port: u16, monitor_port: u16) -> Result<()> {
    let mut text = String::from("# Written by `stack up`: source it to reach the running stack.\n");
    text += &format!("export NATS_URL=nats://127.0.0.1:{nats_port}\n");
    text += &format!("export NATS_MONITOR_URL=http://127.0.0.1:{monitor_port}\n");
    text += &format!("export SUBJECT_PREFIX={}\n", local.subject_prefix);
    if std::env::var("ADMIN_TOKEN").is_ok_and(|t| !t.is_empty()) {
        text += "# ADMIN_TOKEN: the one this stack was started with\n";
    } else {
        text += &format!(
            "export ADMIN_TOKEN=\"$(cat '{}')\"\n",
            local.run_dir.join("admin-token").display()
        );
    }
    for name in roster::names() {
        text += &format!(
            "export {}_URL={}\n",
            name.to_ascii_uppercase(),
            local.service_url(name)
        );
    }
    std::fs::write(local.run_dir.join("stack.env"), text)?;
    Ok(())
}

/// Stops the services and our nats-server; `purge` also removes the run
/// directory and drops the databases. Postgres and Redis keep running.
pub async fn down(local: &Local, purge: bool) -> Result<()> {
    stop_all(&local.services(), Duration::from_secs(30));
    stop_all(&[local.nats()], Duration::from_secs(20));
    if purge {
        println!("==> removing {}", local.run_dir.display());
        let _ = std::fs::remove_dir_all(&local.run_dir);
        match PgConnection::connect(&local.admin_url()).await {
            Ok(mut conn) => {
                for spec in &roster::SERVICES {
                    let name = local.database(spec);
                    println!("==> dropping database {name}");
                    sqlx::query(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
                    )))
                    .execute(&mut conn)
                    .await?;
                }
            }
            Err(e) => eprintln!("warning: Postgres does not answer ({e}); databases not dropped"),
        }
    }
    println!("==> stopped");
    Ok(())
}

/// One line per process of the stack: running or not, and ready or not.
pub async fn status(local: &Local) -> Result<bool> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()?;
    let mut all_ready = true;
    match local.nats().running() {
        Some(pid) => {
            let (port, monitor) = local.running_nats_ports().unwrap_or_default();
            let healthy = nats_healthy(monitor).await;
            all_ready &= healthy;
            println!(
                "{:<10} pid {pid:<8} nats://127.0.0.1:{port}  {}",
                "nats",
                if healthy { "healthy" } else { "NOT HEALTHY" }
            );
        }
        None => {
            all_ready = false;
            println!("{:<10} not running", "nats");
        }
    }
    for daemon in local.services() {
        let url = local.service_url(&daemon.name);
        match daemon.running() {
            Some(pid) => {
                let ready = http
                    .get(format!("{url}/health/ready"))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success());
                all_ready &= ready;
                println!(
                    "{:<10} pid {pid:<8} {url}  {}",
                    daemon.name,
                    if ready { "ready" } else { "NOT READY" }
                );
            }
            None => {
                all_ready = false;
                println!("{:<10} not running", daemon.name);
            }
        }
    }
    Ok(all_ready)
}
