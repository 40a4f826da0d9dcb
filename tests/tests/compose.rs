//! The container deployment, run for real: the project's image built with
//! its own Dockerfile, the stack started with `docker compose up` (or
//! Debian's docker-compose 1.29, whichever the engine has), and used as a
//! user would: the demo, one saga of each outcome, a service container
//! killed mid-load and started again, more replicas of a service, the
//! operator's `sagactl audit` and `dlq list` from a container, the
//! operator console as the page reaches it, each
//! service's database role reaching its own database only and Redis wanting
//! its password, Prometheus scraping every service with its rules loaded;
//! then `down -v`.
//!
//! `tests/compose/images.sh` makes sure an engine answers and that every
//! image the files name is there (pulled, or where nothing can be pulled,
//! built as a stand-in: tests/compose/stand-ins/README.md).

use std::{
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use saga_tests::{eventually, order_body, workspace_binary};
use serde_json::{Value, json};
use uuid::Uuid;

/// How long making sure of the engine and the images it needs may take
/// (cold: installing Docker, a Debian base from debootstrap, the stand-ins;
/// about 2 minutes here).
const IMAGES: Duration = Duration::from_secs(12 * 60);
/// How long building the image may take (cold: the dependencies too). With
/// [`IMAGES`] and the test's own run, within the test runner's limit
/// (.config/nextest.toml), so that a slow step says which it was.
const BUILD: Duration = Duration::from_secs(35 * 60);
/// How long the stack may take to come up, and a saga to end.
const UP: Duration = Duration::from_secs(180);
const SAGA: Duration = Duration::from_secs(60);

use stack::repo_root;

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `cmd` with a deadline: its output, killed past it. The output goes
/// to files, not pipes, so that a process it leaves running (an engine it
/// started) cannot keep the caller waiting for the end of its output.
fn run_within(mut cmd: Command, within: Duration) -> Result<Output> {
    let scratch = std::env::temp_dir().join(format!("compose-run-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&scratch)?;
    let (out_path, err_path) = (scratch.join("stdout"), scratch.join("stderr"));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path)?)
        .stderr(std::fs::File::create(&err_path)?)
        .spawn()
        .with_context(|| format!("spawn {cmd:?}"))?;
    let deadline = Instant::now() + within;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if Instant::now() > deadline {
            child.kill()?;
            child.wait()?;
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let out = Output {
        status: status.unwrap_or_default(),
        stdout: std::fs::read(&out_path)?,
        stderr: std::fs::read(&err_path)?,
    };
    let _ = std::fs::remove_dir_all(&scratch);
    match status {
        Some(_) => Ok(out),
        None => bail!("{cmd:?} still running after {within:?}: {}", text(&out)),
    }
}

/// One compose project of this test: its own name, secrets and host ports;
/// taken down with its volumes when dropped.
struct Project {
    compose: Vec<String>,
    /// The compose files, `-f` each.
    files: Vec<&'static str>,
    name: String,
    env: Vec<(String, String)>,
    ports: std::collections::HashMap<String, u16>,
    admin_token: String,
}

impl Project {
    fn new(compose: &str, files: &[&'static str]) -> Result<Project> {
        let name = format!("sagatest{}", &Uuid::new_v4().simple().to_string()[..10]);
        let mut env = Vec::new();
        for secret in stack::compose::secrets() {
            env.push((secret, Uuid::new_v4().simple().to_string()));
        }
        let admin_token = env
            .iter()
            .find(|(k, _)| k == "ADMIN_TOKEN")
            .map(|(_, v)| v.clone())
            .context("ADMIN_TOKEN is a secret")?;
        // Builds trust what this machine trusts beyond Debian's authorities.
        let mut extra = String::new();
        if let Ok(dir) = std::fs::read_dir("/usr/local/share/ca-certificates") {
            for entry in dir.flatten() {
                if entry.path().extension().is_some_and(|e| e == "crt") {
                    extra += &std::fs::read_to_string(entry.path())?;
                }
            }
        }
        env.push(("EXTRA_CA_CERTS".into(), extra));
        let mut variables: Vec<String> = common::roster::SERVICES
            .iter()
            .map(|s| s.port_variable())
            .collect();
        variables.extend(
            [
                "NATS_PORT",
                "NATS_MONITOR_PORT",
                "NATS_2_PORT",
                "NATS_2_MONITOR_PORT",
                "NATS_3_PORT",
                "NATS_3_MONITOR_PORT",
                "PROMETHEUS_PORT",
                "CONSOLE_PORT",
            ]
            .map(String::from),
        );
        let free = stack::infra::free_ports(variables.len())?;
        let ports: std::collections::HashMap<String, u16> =
            variables.into_iter().zip(free).collect();
        for (variable, port) in &ports {
            env.push((variable.clone(), port.to_string()));
        }
        Ok(Project {
            compose: compose.split_whitespace().map(String::from).collect(),
            files: files.to_vec(),
            name,
            env,
            ports,
            admin_token,
        })
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.compose[0]);
        cmd.args(&self.compose[1..]);
        for file in &self.files {
            cmd.args(["-f", file]);
        }
        cmd.args(["-p", &self.name])
            .args(args)
            .current_dir(repo_root())
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    /// `compose args…`, which must succeed within `within`: its output.
    fn run(&self, args: &[&str], within: Duration) -> Result<String> {
        let out = run_within(self.command(args), within)?;
        ensure!(
            out.status.success(),
            "compose {}: {}\n{}",
            args.join(" "),
            out.status,
            text(&out)
        );
        Ok(text(&out))
    }

    fn url(&self, service: &str, path: &str) -> String {
        let variable = format!("{}_PORT", service.to_ascii_uppercase());
        format!("http://127.0.0.1:{}{path}", self.ports[&variable])
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        let down = run_within(
            self.command(&[
                "--profile",
                "tools",
                "--profile",
                "replicas",
                "down",
                "-v",
                "--remove-orphans",
                "-t",
                "10",
            ]),
            Duration::from_secs(180),
        );
        if let Err(e) = down {
            eprintln!("compose down -v of {}: {e}", self.name);
        }
    }
}

/// The operator's HTTP client.
fn operator(token: &str) -> Result<reqwest::Client> {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {token}").parse()?,
    );
    Ok(reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .default_headers(headers)
        .build()?)
}

async fn put(http: &reqwest::Client, url: String, body: Value) -> Result<()> {
    let r = http
        .put(&url)
        .header("If-Match", "*")
        .json(&body)
        .send()
        .await?;
    let status = r.status();
    ensure!(
        status.is_success(),
        "PUT {url}: {status} {}",
        r.text().await?
    );
    Ok(())
}

async fn place(
    p: &Project,
    http: &reqwest::Client,
    customer: &str,
    product: &str,
    country: &str,
) -> Result<Uuid> {
    let body = order_body(customer, &[(product, 1, 100)], country);
    let r = http
        .post(p.url("order", "/orders"))
        .header("Idempotency-Key", Uuid::new_v4().to_string())
        .json(&body)
        .send()
        .await?;
    let status = r.status();
    let answer: Value = r.json().await?;
    ensure!(status.as_u16() == 201, "place: {status} {answer}");
    Ok(answer["orderId"].as_str().context("orderId")?.parse()?)
}

async fn outcome(p: &Project, http: &reqwest::Client, id: Uuid) -> Result<Value> {
    eventually(&format!("order {id} to end"), SAGA, || async {
        let order: Value = http
            .get(p.url("order", &format!("/orders/{id}")))
            .send()
            .await?
            .json()
            .await?;
        Ok((order["status"] != "PENDING").then_some(order))
    })
    .await
}

/// Every image there, the project's built, and a project of `files` up
/// with every service ready: it, and the operator's HTTP client.
async fn start(files: &[&'static str]) -> Result<(Project, reqwest::Client)> {
    let images = run_within(
        {
            let mut cmd = Command::new("bash");
            cmd.arg(repo_root().join("tests/compose/images.sh"));
            cmd
        },
        IMAGES,
    )?;
    ensure!(images.status.success(), "images.sh: {}", text(&images));
    let compose = String::from_utf8(images.stdout)?.trim().to_string();
    eprintln!("compose: {compose}");
    let p = Project::new(&compose, files)?;

    let started = Instant::now();
    p.run(&["build", "provision"], BUILD)?;
    eprintln!("image built in {:?}", started.elapsed());
    p.run(&["up", "-d"], UP)?;
    let http = operator(&p.admin_token)?;
    for service in common::roster::names() {
        eventually(&format!("{service} to be ready"), UP, || async {
            let r = http.get(p.url(service, "/health/ready")).send().await;
            Ok(r.ok().filter(|r| r.status().is_success()).map(|_| ()))
        })
        .await?;
    }
    eprintln!("up and ready in {:?}", started.elapsed());
    Ok((p, http))
}

/// c-rich (a large balance), c-poor (10), p-kept (in stock) and p-none (out
/// of stock), each product priced 100 and known to the order service.
async fn arrange(p: &Project, http: &reqwest::Client) -> Result<()> {
    let payment = |path: &str| p.url("payment", path);
    let inventory = |path: &str| p.url("inventory", path);
    put(
        http,
        payment("/accounts/c-rich"),
        json!({ "balance": 1_000_000 }),
    )
    .await?;
    put(http, payment("/accounts/c-poor"), json!({ "balance": 10 })).await?;
    for (product, available) in [("p-kept", 1_000), ("p-none", 0)] {
        put(
            http,
            inventory(&format!("/stock/{product}")),
            json!({ "available": available }),
        )
        .await?;
        put(
            http,
            inventory(&format!("/products/{product}")),
            json!({ "name": product, "unitPrice": 100 }),
        )
        .await?;
        eventually(
            &format!("{product} to be priced at the order service"),
            SAGA,
            || async {
                let r = http
                    .get(p.url("order", &format!("/products/{product}")))
                    .send()
                    .await?;
                Ok(r.status().is_success().then_some(()))
            },
        )
        .await?;
    }
    Ok(())
}

/// `sagas` sagas of c-rich placed 25 ms apart while `meanwhile` runs: each
/// must end CONFIRMED.
async fn confirmed_under(
    p: &Project,
    http: &reqwest::Client,
    sagas: u64,
    meanwhile: impl std::future::Future<Output = Result<()>>,
) -> Result<()> {
    let load: Vec<_> = (0..sagas)
        .map(|i| async move {
            tokio::time::sleep(Duration::from_millis(25 * i)).await;
            place(p, http, "c-rich", "p-kept", "US").await
        })
        .collect();
    let (placed, done) = tokio::join!(futures::future::join_all(load), meanwhile);
    done?;
    for id in placed {
        let order = outcome(p, http, id?).await?;
        ensure!(order["status"] == "CONFIRMED", "{order}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compose_stack_builds_runs_sagas_survives_a_killed_service_and_is_operated_from_a_container()
-> Result<()> {
    let (p, http) = start(&["docker-compose.yml"]).await?;

    // The demo, as `stack demo` runs it, pointed at the compose ports.
    let demo = run_within(
        {
            let mut cmd = Command::new(workspace_binary("stack"));
            cmd.arg("demo").envs(p.env.iter().map(|(k, v)| (k, v)));
            cmd
        },
        Duration::from_secs(120),
    )?;
    ensure!(demo.status.success(), "stack demo: {}", text(&demo));

    // One saga of each outcome.
    arrange(&p, &http).await?;
    for (customer, product, country, status, reason) in [
        ("c-rich", "p-kept", "US", "CONFIRMED", ""),
        ("c-poor", "p-kept", "US", "CANCELLED", "payment"),
        ("c-rich", "p-none", "US", "CANCELLED", "stock"),
        ("c-rich", "p-kept", "ZZ", "CANCELLED", "deliver"),
    ] {
        let id = place(&p, &http, customer, product, country).await?;
        let order = outcome(&p, &http, id).await?;
        ensure!(
            order["status"] == status,
            "{customer} {product} {country}: {order}"
        );
        let why = order["failureReason"]
            .as_str()
            .unwrap_or_default()
            .to_lowercase();
        ensure!(
            why.contains(reason),
            "{customer} {product} {country}: {order}"
        );
    }

    // Payment's container killed mid-load, then started again: every saga
    // of the load ends, and the audit agrees.
    confirmed_under(&p, &http, 40, async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        p.run(&["kill", "payment"], Duration::from_secs(60))?;
        p.run(&["start", "payment"], Duration::from_secs(120))?;
        Ok(())
    })
    .await?;

    // Two more processes of payment: competing consumers, one effect each.
    p.run(
        &[
            "up",
            "-d",
            "--scale",
            "payment-replica=2",
            "payment-replica",
        ],
        UP,
    )?;
    let mut more = Vec::new();
    for _ in 0..20 {
        more.push(place(&p, &http, "c-rich", "p-kept", "US").await?);
    }
    for id in more {
        let order = outcome(&p, &http, id).await?;
        ensure!(order["status"] == "CONFIRMED", "{order}");
    }

    // The operator's tool, from a container of the stack.
    let audit = p.run(
        &["run", "--rm", "sagactl", "audit"],
        Duration::from_secs(180),
    )?;
    eprintln!("{audit}");
    let dlq = p.run(
        &["run", "--rm", "sagactl", "dlq", "list"],
        Duration::from_secs(120),
    )?;
    eprintln!("{dlq}");

    // The operator console, as the saga page reaches it: named in the
    // page's policy, answering CORS for the page's origin, acting only with
    // the admin token.
    let console = format!("http://127.0.0.1:{}", p.ports["CONSOLE_PORT"]);
    eventually("the console to be healthy", UP, || async {
        let r = reqwest::get(format!("{console}/health/ready")).await;
        Ok(r.ok().filter(|r| r.status().is_success()).map(|_| ()))
    })
    .await?;
    let page = http.get(p.url("order", "/ui")).send().await?;
    let policy = page.headers()["content-security-policy"]
        .to_str()?
        .to_string();
    ensure!(policy.contains(&console), "{policy}");
    let retry = format!("{console}/sagas/{}/retry", Uuid::now_v7());
    let page_origin = p.url("order", "");
    let preflight = reqwest::Client::new()
        .request(reqwest::Method::OPTIONS, &retry)
        .header("origin", &page_origin)
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization,content-type",
        )
        .send()
        .await?;
    ensure!(
        preflight.headers().get("access-control-allow-origin") == Some(&page_origin.parse()?),
        "{:?}",
        preflight.headers()
    );
    let anonymous = reqwest::Client::new()
        .post(&retry)
        .json(&json!({ "dryRun": true }))
        .send()
        .await?;
    ensure!(anonymous.status() == 401, "{}", anonymous.status());
    let nothing = http
        .post(&retry)
        .json(&json!({ "dryRun": true }))
        .send()
        .await?;
    let status = nothing.status();
    let said: Value = nothing.json().await?;
    ensure!(
        status == 404
            && said["error"]
                .as_str()
                .is_some_and(|e| e.contains("no dead letter")),
        "{status} {said}"
    );

    // Least privilege: each service's role reaches its own database only,
    // with its password; the auditor only reads; Redis wants its password.
    let secret = |name: &str| {
        p.env
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let psql = |role: &str, password: &str, database: &str, sql: &str| {
        let url = format!("postgresql://{role}:{password}@127.0.0.1:5432/{database}");
        run_within(
            p.command(&["exec", "-T", "postgres", "psql", &url, "-c", sql]),
            Duration::from_secs(60),
        )
    };
    let order_pw = secret("DATABASE_PASSWORD_ORDER");
    let own = psql(
        "saga_order",
        &order_pw,
        "saga_order",
        "SELECT count(*) FROM orders",
    )?;
    ensure!(own.status.success(), "{}", text(&own));
    for (role, password, database, sql, refusal) in [
        (
            "saga_order",
            order_pw.as_str(),
            "saga_payment",
            "SELECT 1",
            "permission denied",
        ),
        (
            "saga_order",
            "not-the-password",
            "saga_order",
            "SELECT 1",
            "password authentication failed",
        ),
        (
            "saga_auditor",
            &secret("DATABASE_PASSWORD_AUDITOR"),
            "saga_payment",
            "DELETE FROM outbox",
            "permission denied",
        ),
    ] {
        let out = psql(role, password, database, sql)?;
        ensure!(
            !out.status.success() && text(&out).contains(refusal),
            "{role} on {database}, {sql}: {}",
            text(&out)
        );
    }
    let redis = run_within(
        p.command(&[
            "exec",
            "-T",
            "redis",
            "sh",
            "-c",
            "unset REDISCLI_AUTH; redis-cli ping",
        ]),
        Duration::from_secs(60),
    )?;
    ensure!(
        text(&redis).contains("NOAUTH"),
        "redis without its password: {}",
        text(&redis)
    );

    // Prometheus scrapes every service (the replicas too) and has the rules.
    let prometheus = format!("http://127.0.0.1:{}", p.ports["PROMETHEUS_PORT"]);
    eventually(
        "Prometheus to scrape every service",
        Duration::from_secs(120),
        || async {
            let targets: Value = reqwest::get(format!("{prometheus}/api/v1/targets"))
                .await?
                .json()
                .await?;
            let active = targets["data"]["activeTargets"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let up = |job: &str| {
                active
                    .iter()
                    .filter(|t| t["labels"]["job"] == job)
                    .filter(|t| t["health"] == "up")
                    .count()
            };
            let all = common::roster::names().all(|job| up(job) >= 1) && up("payment") == 3;
            Ok(all.then_some(()))
        },
    )
    .await?;
    let rules: Value = reqwest::get(format!("{prometheus}/api/v1/rules"))
        .await?
        .json()
        .await?;
    let groups = rules["data"]["groups"].as_array().map_or(0, Vec::len);
    ensure!(groups > 0, "no rule groups loaded: {rules}");
    Ok(())
}

/// The cluster override: three broker nodes whose routes authenticate,
/// every stream in three copies; one node killed under load, every saga
/// ends and the audit agrees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compose_cluster_loses_a_node_under_load_and_every_saga_ends() -> Result<()> {
    let (p, http) = start(&["docker-compose.yml", "docker-compose.cluster.yml"]).await?;
    arrange(&p, &http).await?;
    confirmed_under(&p, &http, 40, async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        p.run(&["kill", "nats-2"], Duration::from_secs(60))?;
        Ok(())
    })
    .await?;
    let audit = p.run(
        &["run", "--rm", "sagactl", "audit"],
        Duration::from_secs(180),
    )?;
    ensure!(audit.contains("all invariants hold"), "{audit}");
    Ok(())
}
