//! The local stack `stack up` starts: our nats-server, one process per
//! roster service and the operator console (`sagactl console`, which the
//! saga page acts through), each with a pid file and a log in the run
//! directory, on the shared Postgres and Redis. A start-up that fails stops whatever it
//! started and names the log to read; nothing is left half-started.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use common::{
    permissions,
    roster::{self, ServiceSpec},
};
use sqlx::{Connection, PgConnection};

use crate::process::{Daemon, port_in_use, stop_all, stop_pids};

/// Where and on which ports the local stack runs; every field has a default
/// and an environment variable (see the `stack` command's help).
#[derive(Debug, Clone)]
pub struct Local {
    pub root: PathBuf,
    pub run_dir: PathBuf,
    /// `None`: 4222/8222, or 4333/8333 when another server holds 4222.
    /// Node k of a cluster listens on both plus k − 1.
    pub nats_ports: Option<(u16, u16)>,
    /// `NATS_CLUSTER_PORT`, default 6222: the route port of a cluster's
    /// first node (node k: plus k − 1).
    pub nats_cluster_port: u16,
    /// Each service's port, and the console's ([`CONSOLE`]; `CONSOLE_PORT`,
    /// default 8090).
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
        service_ports.insert(CONSOLE, port("CONSOLE_PORT", 8090)?);
        Ok(Local {
            root: root.to_path_buf(),
            run_dir: var("RUN_DIR").map_or_else(|| root.join(".run"), PathBuf::from),
            nats_ports,
            nats_cluster_port: port("NATS_CLUSTER_PORT", 6222)?,
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
        self.secret("ADMIN_TOKEN", "admin-token")
    }

    /// `variable` from the environment, else the secret kept in `file` of
    /// the run directory, else a new random one written there (mode 0600).
    fn secret(&self, variable: &str, file: &str) -> Result<String> {
        if let Ok(token) = std::env::var(variable)
            && !token.is_empty()
        {
            return Ok(token);
        }
        let path = self.run_dir.join(file);
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

    /// The broker password of `user` (a roster service, or the operator):
    /// `NATS_PASSWORD_<USER>`, else the one kept in
    /// `<RUN_DIR>/nats-password-<user>`, else a new random one written
    /// there (mode 0600).
    pub fn nats_password(&self, user: &str) -> Result<String> {
        let variable = common::permissions::password_variable(user);
        self.secret(&variable, &format!("nats-password-{user}"))
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

    /// Where a service's database is (and `sagactl audit` reads it). On
    /// loopback, in plain TCP: a server with `ssl = on` (Debian's default)
    /// would otherwise be spoken to in TLS, which protects nothing that
    /// never leaves the machine and costs both ends CPU on every statement
    /// (docs/security.md says how to require TLS where it matters).
    pub fn database_url(&self, spec: &ServiceSpec) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/{}?sslmode=disable",
            self.pg_port,
            self.database(spec)
        )
    }

    fn admin_url(&self) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres?sslmode=disable",
            self.pg_port
        )
    }

    /// The broker's daemons: `nats`, and `nats-2`, `nats-3` of a cluster.
    fn nats(&self) -> Vec<Daemon> {
        (1..=CLUSTER_NODES)
            .map(|k| Daemon::new(&self.run_dir, &replica("nats", k)))
            .filter(|d| d.name == "nats" || d.recorded())
            .collect()
    }

    /// The console, if started, then every service's first process and
    /// the other replicas started.
    fn services(&self) -> Vec<Daemon> {
        let console = Daemon::new(&self.run_dir, CONSOLE);
        let mut out: Vec<Daemon> = Some(console).filter(Daemon::recorded).into_iter().collect();
        for name in roster::names() {
            out.push(Daemon::new(&self.run_dir, name));
            let others = (2..=MAX_REPLICAS).map(|k| Daemon::new(&self.run_dir, &replica(name, k)));
            out.extend(others.filter(Daemon::recorded));
        }
        out
    }

    /// The ports our running broker was started with, and its nodes (1,
    /// or [`CLUSTER_NODES`]).
    fn running_nats(&self) -> Option<NatsLayout> {
        let text = std::fs::read_to_string(self.run_dir.join("nats.ports")).ok()?;
        let mut fields = text.split_whitespace().map(str::parse::<u16>);
        let port = fields.next()?.ok()?;
        let monitor = fields.next()?.ok()?;
        let nodes = fields.next().unwrap_or(Ok(1)).ok()?;
        Some(NatsLayout {
            port,
            monitor,
            nodes: nodes as usize,
        })
    }

    /// Where a single server or a cluster keeps its JetStream store.
    fn store(&self, nodes: usize) -> PathBuf {
        if nodes == 1 {
            self.run_dir.join("jetstream")
        } else {
            self.run_dir.join("jetstream-cluster")
        }
    }
}

/// Most processes `up --replicas` runs per service.
pub const MAX_REPLICAS: usize = 8;

/// Nodes of the broker `up --cluster` runs.
pub use crate::infra::CLUSTER_NODES;

/// Where the broker listens: node k (from 1) on `port` and `monitor` plus
/// k − 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NatsLayout {
    pub port: u16,
    pub monitor: u16,
    pub nodes: usize,
}

impl NatsLayout {
    fn node_ports(&self) -> impl Iterator<Item = (String, u16, u16)> + '_ {
        (1..=self.nodes).map(|k| {
            let d = k as u16 - 1;
            let (port, monitor) = (self.port.saturating_add(d), self.monitor.saturating_add(d));
            (replica("nats", k), port, monitor)
        })
    }

    /// What `NATS_URL` is set to: the server, or every node as a seed.
    pub fn url(&self) -> String {
        let seeds: Vec<String> = self
            .node_ports()
            .map(|(_, port, _)| format!("nats://127.0.0.1:{port}"))
            .collect();
        seeds.join(",")
    }

    /// Copies of each stream: one per node.
    pub fn stream_replicas(&self) -> usize {
        self.nodes
    }
}

/// The operator console's daemon name (and its entry in the ports).
pub const CONSOLE: &str = "console";

/// The daemon name of replica `k` (from 1) of service `name`: `name`,
/// then `name-2`, `name-3`, ….
pub(crate) fn replica(name: &str, k: usize) -> String {
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
            .partition(|(d, _)| replica_of(&d.name).0 == "nats");
        stop_pids(&services, Duration::from_secs(30));
        stop_pids(&nats, Duration::from_secs(20));
        eprintln!(
            "warning: nothing of this run is left running; the logs are in {}",
            self.local.run_dir.display()
        );
    }
}

/// Starts the stack: databases, our nats-server or, with `cluster`, a
/// cluster of [`CLUSTER_NODES`] (reused when it already runs on the wanted
/// ports), then every service of the roster as `exe serve <name>`, and
/// waits until each is ready. Running services are restarted. Returns the
/// broker's URL (a cluster's: every node, comma separated).
pub async fn up(local: &Local, exe: &Path, replicas: usize, cluster: bool) -> Result<String> {
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
    let nodes = if cluster { CLUSTER_NODES } else { 1 };
    check_store_layout(local, nodes)?;
    create_databases(local).await?;
    std::fs::create_dir_all(&local.run_dir)?;
    // Restart: the old services go before their nats-server might.
    stop_all(&local.services(), Duration::from_secs(30));
    let mut started = Started {
        local,
        daemons: Vec::new(),
        done: false,
    };
    let broker = ensure_nats(local, &mut started, nodes).await?;
    let nats_url = broker.url();
    provision(local, &nats_url, broker.stream_replicas()).await?;

    let admin_token = local.admin_token()?;
    let mut children: Vec<(Daemon, Child)> = Vec::new();
    let processes = roster::SERVICES
        .iter()
        .flat_map(|spec| (1..=replicas).map(move |k| (spec, replica(spec.name, k))));
    for (spec, name) in processes {
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
            .env("DATABASE_URL", local.database_url(spec))
            .env(
                "REDIS_URL",
                format!("redis://127.0.0.1:{}", local.redis_port),
            )
            .env("NATS_URL", &nats_url)
            .env("NATS_USER", spec.name)
            .env("NATS_PASSWORD", local.nats_password(spec.name)?)
            .env("NATS_STREAM_REPLICAS", broker.stream_replicas().to_string())
            .env("HTTP_ADDR", format!("127.0.0.1:{port}"))
            .env("SUBJECT_PREFIX", &local.subject_prefix)
            .env("ADMIN_TOKEN", &admin_token)
            .env("LOG_FORMAT", "json")
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            );
        if spec.name == "order" {
            // Where the saga page sends the operator's redrives and retries.
            command.env("OPERATOR_CONSOLE_URL", local.service_url(CONSOLE));
        }
        let child = daemon.spawn(&mut command)?;
        started.daemons.push((daemon.clone(), child.id() as i32));
        children.push((daemon, child));
    }
    // The operator console: the operator's broker identity, nothing else.
    let port = local.daemon_port(CONSOLE);
    if port_in_use(port) {
        bail!(
            "port {port} (for the operator console) is already in use by another process; set CONSOLE_PORT to use another"
        );
    }
    let daemon = Daemon::new(&local.run_dir, CONSOLE);
    let page = local.service_url("order");
    let mut command = Command::new(exe);
    command
        .args(["sagactl", "console"])
        .env("NATS_URL", &nats_url)
        .env("NATS_USER", permissions::OPERATOR)
        .env("NATS_PASSWORD", local.nats_password(permissions::OPERATOR)?)
        .env("SUBJECT_PREFIX", &local.subject_prefix)
        .env("ORDER_URL", &page)
        .env("ADMIN_TOKEN", &admin_token)
        .env("CONSOLE_ADDR", format!("127.0.0.1:{port}"))
        .env(
            "PAGE_ORIGIN",
            format!("{page},{}", page.replace("127.0.0.1", "localhost")),
        )
        .env("LOG_FORMAT", "json")
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        );
    let child = daemon.spawn(&mut command)?;
    started.daemons.push((daemon.clone(), child.id() as i32));
    children.push((daemon, child));
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
    write_env_file(local, &broker)?;
    write_scrape_targets(local, replicas)?;
    started.done = true;
    Ok(nats_url)
}

/// Provisions the streams and consumers on the broker at `url` as the
/// provisioning identity, each stream in `replicas` copies, and says what
/// it changed: the services may only check them.
pub async fn provision(local: &Local, url: &str, replicas: usize) -> Result<()> {
    let user = permissions::PROVISIONER;
    let options = common::broker::with_credentials(
        async_nats::ConnectOptions::new().name("stack provision"),
        Some(user),
        Some(&local.nats_password(user)?),
    )
    .connection_timeout(Duration::from_secs(5));
    let client = tokio::time::timeout(
        Duration::from_secs(15),
        common::broker::connect(options, url),
    )
    .await
    .with_context(|| format!("no answer from {url} within 15 s"))?
    .with_context(|| format!("connecting to {url} as {user}"))?;
    let js = async_nats::jetstream::new(client);
    let subjects = common::Subjects::new(local.subject_prefix.clone());
    let changed = common::topology::provision(&js, &subjects, replicas).await?;
    if changed.is_empty() {
        println!("==> streams and consumers as provisioned");
    }
    for line in changed {
        println!("==> provisioned: {line}");
    }
    Ok(())
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
            return Err(exited(daemon, status));
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

/// Refuses to start a broker of one layout (a single server, or a cluster
/// of `nodes`) where a store of the other holds streams: it would start
/// with empty ones, and events not yet consumed would be lost without a word.
fn check_store_layout(local: &Local, nodes: usize) -> Result<()> {
    let other = local.store(if nodes == 1 { CLUSTER_NODES } else { 1 });
    if std::fs::read_dir(&other).is_ok_and(|mut d| d.next().is_some()) {
        bail!(
            "{} holds the streams of a {}; the {} would start with empty ones and events not yet \
             consumed would be lost. Nothing was stopped. Run scripts/down.sh --purge first (it \
             drops the databases too), or start as before{}",
            other.display(),
            if nodes == 1 {
                "nats cluster"
            } else {
                "single nats-server"
            },
            if nodes == 1 {
                "single nats-server"
            } else {
                "cluster"
            },
            if nodes == 1 {
                " (--cluster)"
            } else {
                " (without --cluster)"
            },
        );
    }
    Ok(())
}

async fn ensure_nats(local: &Local, started: &mut Started<'_>, nodes: usize) -> Result<NatsLayout> {
    let daemons = local.nats();
    if daemons.iter().any(|d| d.running().is_some()) {
        if let Some(running) = local.running_nats()
            && running.nodes == nodes
            && local
                .nats_ports
                .is_none_or(|want| want == (running.port, running.monitor))
            && all_healthy(&running).await
        {
            println!(
                "==> our {} already running (port {})",
                if nodes == 1 {
                    "nats-server is".to_string()
                } else {
                    format!("{nodes}-node nats cluster is")
                },
                running.port
            );
            return Ok(running);
        }
        stop_all(&daemons, Duration::from_secs(20));
    }
    let broker = choose_nats_ports(local, nodes)?;
    let store = local.store(nodes);
    let shipped = local.root.join("nats/nats-server.conf");
    let shipped_text =
        std::fs::read_to_string(&shipped).with_context(|| format!("read {}", shipped.display()))?;
    // What the shipped configuration includes (nats/auth.conf), next to
    // the copy of it, for this stack's subject prefix.
    std::fs::write(
        local.run_dir.join("auth.conf"),
        crate::auth_conf::auth_conf(&common::Subjects::new(local.subject_prefix.clone())),
    )?;
    let routes: Vec<String> = (0..nodes)
        .map(|k| format!("127.0.0.1:{}", local.nats_cluster_port + k as u16))
        .collect();
    let route_password = local.nats_password(crate::infra::ROUTE_USER)?;
    let mut children = Vec::new();
    for (k, (name, port, monitor)) in broker.node_ports().enumerate() {
        let node_store = if nodes == 1 {
            store.clone()
        } else {
            store.join(&name)
        };
        let node = if nodes == 1 {
            String::new()
        } else {
            format!(" {name}")
        };
        println!(
            "==> starting nats-server{node} on 127.0.0.1:{port} (monitor {monitor}, store {})",
            node_store.display()
        );
        let conf = local.run_dir.join(format!("{name}-server.conf"));
        let mut text = with_store_dir(&shipped, &shipped_text, &node_store)?;
        if nodes > 1 {
            // Routes authenticate; the block holds their password.
            text += &crate::infra::cluster_block(&routes[k], &routes, &route_password);
        }
        write_private(&conf, &text)?;
        let mut command = nats_command(local, &conf, port, monitor)?;
        if nodes > 1 {
            // Routes to every node, itself included (it skips its own).
            command.args(["--server_name", &name]);
        }
        let daemon = Daemon::new(&local.run_dir, &name);
        let child = daemon.spawn(&mut command)?;
        started.daemons.push((daemon.clone(), child.id() as i32));
        children.push((daemon, child, monitor));
    }
    std::fs::write(
        local.run_dir.join("nats.ports"),
        format!("{} {} {nodes}\n", broker.port, broker.monitor),
    )?;
    wait_for_nats(&mut children).await?;
    Ok(broker)
}

/// The command that starts one nats-server node with `conf`, listening on
/// `port` and `monitor`, every user's password in its environment (the
/// shipped configuration reads them from there).
fn nats_command(local: &Local, conf: &Path, port: u16, monitor: u16) -> Result<Command> {
    let mut command = Command::new(&local.nats_server_bin);
    for user in roster::names().chain([permissions::OPERATOR, permissions::PROVISIONER]) {
        command.env(
            permissions::password_variable(user),
            local.nats_password(user)?,
        );
    }
    command
        .arg("-c")
        .arg(conf)
        .args(["-a", "127.0.0.1", "-p", &port.to_string()])
        .args(["-m", &monitor.to_string()]);
    Ok(command)
}

/// Waits until every node just started says it is healthy (30 s at most),
/// or one of them exits.
async fn wait_for_nats(nodes: &mut [(Daemon, std::process::Child, u16)]) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    for (daemon, child, monitor) in nodes {
        while !nats_healthy(*monitor).await {
            if let Some(status) = child.try_wait()? {
                return Err(exited(daemon, status));
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} not healthy after 30s; see {}",
                    daemon.name,
                    daemon.log_path().display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// The shipped configuration with the store moved into the run directory
/// (the server refuses a second store_dir on its command line).
/// Writes `text` to `path`, readable by its owner only.
fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    std::io::Write::write_all(&mut file, text.as_bytes())?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(())
}

fn with_store_dir(shipped: &Path, text: &str, store: &Path) -> Result<String> {
    let mut moved = false;
    let lines: Vec<String> = text
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
    Ok(lines.join("\n") + "\n")
}

/// Whether every node of `broker` says it is healthy.
async fn all_healthy(broker: &NatsLayout) -> bool {
    for (_, _, monitor) in broker.node_ports() {
        if !nats_healthy(monitor).await {
            return false;
        }
    }
    true
}

async fn nats_healthy(monitor: u16) -> bool {
    let url = format!("http://127.0.0.1:{monitor}/healthz?js-enabled-only=true");
    let client = reqwest::Client::new();
    matches!(
        tokio::time::timeout(Duration::from_secs(2), client.get(url).send()).await,
        Ok(Ok(r)) if r.status().is_success()
    )
}

fn choose_nats_ports(local: &Local, nodes: usize) -> Result<NatsLayout> {
    let free = |port: u16, monitor: u16| {
        (0..nodes as u16).all(|d| !port_in_use(port + d) && !port_in_use(monitor + d))
    };
    let (port, monitor) = match local.nats_ports {
        Some(ports) => ports,
        None if free(4222, 8222) => (4222, 8222),
        None => {
            println!(
                "==> a port of 4222 or 8222 (and up) is taken by another process: using 4333, monitor 8333 for nats-server"
            );
            (4333, 8333)
        }
    };
    let last = nodes as u16 - 1;
    for (p, var) in [
        (port, "NATS_PORT"),
        (monitor, "NATS_MONITOR_PORT"),
        (local.nats_cluster_port, "NATS_CLUSTER_PORT"),
    ] {
        if p.checked_add(last).is_none() {
            bail!("{var}={p}: {nodes} nodes need {p} to {p}+{last}");
        }
    }
    let broker = NatsLayout {
        port,
        monitor,
        nodes,
    };
    for (name, p, m) in broker.node_ports() {
        for (p, var) in [(p, "NATS_PORT"), (m, "NATS_MONITOR_PORT")] {
            if port_in_use(p) {
                bail!("port {p} (for {name}) is in use; set {var} to a free port");
            }
        }
    }
    if nodes > 1 {
        for d in 0..nodes as u16 {
            let p = local.nats_cluster_port + d;
            if port_in_use(p) {
                bail!("route port {p} is in use; set NATS_CLUSTER_PORT to a free port");
            }
        }
    }
    Ok(broker)
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

/// `<RUN_DIR>/prometheus/<service>.json`: every process of each service,
/// as Prometheus's file discovery reads it (prometheus/prometheus.yml);
/// Prometheus follows the files as `up` rewrites them.
fn write_scrape_targets(local: &Local, replicas: usize) -> Result<()> {
    let dir = local.run_dir.join("prometheus");
    std::fs::create_dir_all(&dir)?;
    for name in roster::names() {
        let targets: Vec<String> = (1..=replicas)
            .map(|k| format!("127.0.0.1:{}", local.daemon_port(&replica(name, k))))
            .collect();
        let groups = serde_json::json!([{ "targets": targets }]);
        // Written aside and renamed: Prometheus never reads half a file.
        let path = dir.join(format!("{name}.json"));
        let partial = dir.join(format!(".{name}.json"));
        std::fs::write(&partial, serde_json::to_vec_pretty(&groups)?)?;
        std::fs::rename(&partial, &path)?;
    }
    Ok(())
}

fn write_env_file(local: &Local, broker: &NatsLayout) -> Result<()> {
    let mut text = String::from("# Written by `stack up`: source it to reach the running stack.\n");
    text += &format!("export NATS_URL={}\n", broker.url());
    text += &format!(
        "export NATS_MONITOR_URL=http://127.0.0.1:{}\n",
        broker.monitor
    );
    // The operator's user: the `nats` CLI, sagactl and the loadgen read both.
    text += &format!("export NATS_USER={}\n", permissions::OPERATOR);
    let variable = permissions::password_variable(permissions::OPERATOR);
    if std::env::var(&variable).is_ok_and(|t| !t.is_empty()) {
        text += &format!("export NATS_PASSWORD=\"${variable}\"\n");
    } else {
        text += &format!(
            "export NATS_PASSWORD=\"$(cat '{}')\"\n",
            local
                .run_dir
                .join(format!("nats-password-{}", permissions::OPERATOR))
                .display()
        );
    }
    text += &format!("export SUBJECT_PREFIX={}\n", local.subject_prefix);
    if std::env::var("ADMIN_TOKEN").is_ok_and(|t| !t.is_empty()) {
        text += "# ADMIN_TOKEN: the one this stack was started with\n";
    } else {
        text += &format!(
            "export ADMIN_TOKEN=\"$(cat '{}')\"\n",
            local.run_dir.join("admin-token").display()
        );
    }
    for spec in &roster::SERVICES {
        let name = spec.name.to_ascii_uppercase();
        text += &format!("export {name}_URL={}\n", local.service_url(spec.name));
        // Where sagactl audit finds this stack's databases.
        text += &format!("export {name}_DATABASE_URL={}\n", local.database_url(spec));
    }
    text += &format!("export CONSOLE_URL={}\n", local.service_url(CONSOLE));
    std::fs::write(local.run_dir.join("stack.env"), text)?;
    Ok(())
}

/// Stops the services and our nats-server; `purge` also removes the run
/// directory and drops the databases. Postgres and Redis keep running.
pub async fn down(local: &Local, purge: bool) -> Result<()> {
    stop_all(&local.services(), Duration::from_secs(30));
    stop_all(&local.nats(), Duration::from_secs(20));
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
    let running = local.running_nats().unwrap_or(NatsLayout {
        port: 0,
        monitor: 0,
        nodes: 1,
    });
    let nodes: Vec<_> = running.node_ports().collect();
    for (k, daemon) in local.nats().into_iter().enumerate() {
        let (pid, node) = (daemon.running(), nodes.get(k));
        let healthy = match (pid, node) {
            (Some(_), Some((_, _, monitor))) => nats_healthy(*monitor).await,
            _ => false,
        };
        let address = node.map_or(String::new(), |(_, port, _)| {
            format!("nats://127.0.0.1:{port}")
        });
        all_ready &= status_line(
            &daemon.name,
            pid,
            &address,
            healthy,
            ("healthy", "NOT HEALTHY"),
        );
    }
    for daemon in local.services() {
        let url = local.service_url(&daemon.name);
        let pid = daemon.running();
        let ready = pid.is_some()
            && http
                .get(format!("{url}/health/ready"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
        all_ready &= status_line(&daemon.name, pid, &url, ready, ("ready", "NOT READY"));
    }
    Ok(all_ready)
}

/// Prints one process's status line (`name pid address state`, or `name
/// not running`); whether it is running and `ok`.
fn status_line(
    name: &str,
    pid: Option<i32>,
    address: &str,
    ok: bool,
    (yes, no): (&str, &str),
) -> bool {
    match pid {
        Some(pid) => {
            println!(
                "{name:<10} pid {pid:<8} {address}  {}",
                if ok { yes } else { no }
            );
            ok
        }
        None => {
            println!("{name:<10} not running");
            false
        }
    }
}

/// A daemon that exited while it was starting, with the end of its log.
fn exited(daemon: &Daemon, status: std::process::ExitStatus) -> anyhow::Error {
    anyhow::anyhow!(
        "{} exited during start-up ({status}); last lines of {}:\n{}",
        daemon.name,
        daemon.log_path().display(),
        daemon.log_tail(20)
    )
}
