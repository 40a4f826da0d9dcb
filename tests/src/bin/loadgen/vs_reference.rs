//! `loadgen --vs-reference DIR`: this system against the minimal five-hop
//! reference saga in `DIR`, back to back on this machine and on the settings
//! both ship (the broker's `sync_interval: always`, Postgres's
//! `synchronous_commit = on`), printed as one table of ratios.
//!
//! Each pair of runs: the reference at saturation (256 in flight) on a
//! broker, Redis and database of its own, then ours; the reference with
//! one saga in flight, then ours; ours in an open loop at half the
//! reference's saturation rate, then (with `--fixed-rate-reference`, a copy
//! of the reference whose driver places at a fixed rate) the reference's
//! open loop at the same rate; the same at a quarter of it. As the
//! reference gets a new broker, Redis and database for each run, ours is
//! started afresh for each (`scripts/down.sh --purge`, `scripts/up.sh
//! --no-demo`), warmed up, measured and stopped. Per saga,
//! for both: CPU by part, counted the same way (per-process CPU time of
//! Postgres's backends, nats-server, Redis and the services; the
//! reference's one process holds its driver too), Postgres statements sent
//! (top-level calls in `pg_stat_statements`, when it is loaded) and rows
//! written (`pg_stat_database`).

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use sqlx::{Connection, PgConnection};

use super::{Args, Report, run};

/// In flight at saturation, for both systems.
const SATURATION: u32 = 256;
/// The open loops' rates, as shares of the reference's saturation rate:
/// half (where the reference still has a third of the machine to spare),
/// and a quarter (where neither system is short of CPU).
const OPEN_LOOP_SHARES: [(f64, &str); 2] = [(0.5, "half"), (0.25, "a quarter")];

/// Runs the pairs and prints the table.
pub(crate) async fn compare(args: Args, reference_dir: &Path) -> Result<()> {
    let root = stack::repo_root();
    let local = stack::local::Local::from_env(&root)?;
    let reference = Reference::build(reference_dir, &root.join("target/reference"), &local)?;
    let fixed_rate = match &args.fixed_rate_reference {
        Some(dir) => Some(Reference::build(
            dir,
            &root.join("target/reference-fixed-rate"),
            &local,
        )?),
        None => None,
    };
    let mut pg = PgCounters::connect(local.pg_port).await?;
    let ours_like = format!("{}\\_%", local.database_prefix);
    let mut pairs = Vec::new();
    for pair in 1..=args.pairs {
        println!("==> pair {pair} of {}", args.pairs);
        println!("==> reference: saturation ({SATURATION} in flight, 15 s)");
        let ref_saturation = reference.run(&mut pg, SATURATION, None, 15).await?;
        // As many sagas as the reference finished in its window, so that
        // ours runs about as long and its start and end weigh as little.
        let orders = (ref_saturation.report.completed).max(1000);
        println!("==> ours: saturation ({orders} sagas, {SATURATION} in flight)");
        let saturation = Fresh::measure(&root, &args, async |ours| {
            pg.measure(&ours_like, run(ours.args(orders, 0.0, SATURATION)))
                .await
        })
        .await?;
        println!("==> reference: one saga in flight (10 s)");
        let ref_one = reference.run(&mut pg, 1, None, 10).await?;
        println!("==> ours: one saga in flight (300 sagas)");
        let one = Fresh::measure(&root, &args, async |ours| {
            pg.measure(&ours_like, run(ours.args(300, 0.0, 1))).await
        })
        .await?;
        let mut open_loops = Vec::new();
        for (share, named) in OPEN_LOOP_SHARES {
            let rate = (ref_saturation.report.throughput * share).floor().max(1.0);
            println!(
                "==> ours: open loop at {rate} sagas/s ({named} the reference's saturation) for {} s",
                args.seconds
            );
            let orders = rate as usize * args.seconds as usize;
            let ours = Fresh::measure(&root, &args, async |ours| {
                run(ours.args(orders, rate, 4096)).await
            })
            .await?;
            let reference = match &fixed_rate {
                Some(fixed_rate) => {
                    println!(
                        "==> reference: open loop at {rate} sagas/s for {} s",
                        args.seconds
                    );
                    let seconds = u32::try_from(args.seconds)?;
                    Some(
                        fixed_rate
                            .run(&mut pg, 1, Some(rate), seconds)
                            .await?
                            .report,
                    )
                }
                None => None,
            };
            open_loops.push(OpenLoop {
                named,
                rate,
                ours,
                reference,
            });
        }
        pairs.push(Pair {
            ours: saturation,
            reference: ref_saturation,
            ours_one: one.0,
            reference_one: ref_one.report,
            open_loops,
        });
    }
    print_table(&pairs);
    Ok(())
}

/// Sagas placed to warm a fresh stack up before it is measured (the
/// reference measures after three seconds of its own load).
const WARM_UP_SAGAS: usize = 300;

/// Our stack, started afresh for one measure, as the reference's broker,
/// Redis and database are for each of its runs: with Postgres's autovacuum
/// off, or behind, a stack that has run the measures before this one
/// would carry their tables' dead rows into it.
struct Fresh {
    root: PathBuf,
    /// The arguments that reach it, as `stack up` wrote its addresses.
    base: Args,
}

impl Fresh {
    /// What `measure` makes of a stack started afresh, stopped afterwards
    /// whether or not it measured.
    async fn measure<T>(
        root: &Path,
        args: &Args,
        measure: impl AsyncFnOnce(&Fresh) -> Result<T>,
    ) -> Result<T> {
        let fresh = Fresh::start(root, args).await?;
        let measured = measure(&fresh).await;
        fresh.stop()?;
        measured
    }

    /// Purges the last stack, starts one, and warms it up.
    async fn start(root: &Path, args: &Args) -> Result<Fresh> {
        script(root, "down.sh", &["--purge"])?;
        script(root, "up.sh", &["--no-demo"])?;
        let mut base = Args {
            stack: true,
            bench: false,
            vs_reference: None,
            fail_ratio: 0.0,
            rate: 0.0,
            ..args.clone()
        };
        base.find_the_stack();
        let fresh = Fresh {
            root: root.to_path_buf(),
            base,
        };
        println!("==> ours: warm-up ({WARM_UP_SAGAS} sagas, 16 in flight)");
        run(fresh.args(WARM_UP_SAGAS, 0.0, 16)).await?;
        Ok(fresh)
    }

    /// The arguments of a run of `orders` sagas at `rate` per second (0:
    /// as fast as `concurrency` in flight allows).
    fn args(&self, orders: usize, rate: f64, concurrency: u32) -> Args {
        Args {
            orders,
            rate,
            concurrency,
            ..self.base.clone()
        }
    }

    /// Stops it, so the reference's next run has the machine to itself.
    fn stop(self) -> Result<()> {
        script(&self.root, "down.sh", &[])
    }
}

/// What one pair of runs measured.
struct Pair {
    /// At saturation: ours and its Postgres costs per saga.
    ours: (Report, Costs),
    reference: ReferenceRun,
    ours_one: Report,
    reference_one: Report,
    /// At each of [`OPEN_LOOP_SHARES`].
    open_loops: Vec<OpenLoop>,
}

/// One open loop at a fixed rate, ours and (if given the fixed-rate copy)
/// the reference's.
struct OpenLoop {
    /// Which share of the reference's saturation its rate is, in words.
    named: &'static str,
    rate: f64,
    ours: Report,
    reference: Option<Report>,
}

/// Postgres statements (if counted) and rows written per saga.
#[derive(Debug, Clone, Copy, Default)]
struct Costs {
    statements: Option<f64>,
    rows: f64,
}

/// Runs `scripts/<name> <args>` from the repository's root, its output
/// passed through.
fn script(root: &Path, name: &str, args: &[&str]) -> Result<()> {
    let status = Command::new("bash")
        .arg(root.join("scripts").join(name))
        .args(args)
        .current_dir(root)
        .stdout(Stdio::null())
        .status()
        .with_context(|| format!("run scripts/{name}"))?;
    anyhow::ensure!(
        status.success(),
        "scripts/{name} {}: {status}",
        args.join(" ")
    );
    Ok(())
}

/// The server-wide counters of the local Postgres: statements by database
/// (pg_stat_statements) and rows written (pg_stat_database).
struct PgCounters {
    conn: PgConnection,
    port: u16,
    /// Whether pg_stat_statements is loaded (it must be preloaded).
    statements: bool,
}

impl PgCounters {
    async fn connect(port: u16) -> Result<PgCounters> {
        let mut conn = PgConnection::connect(&admin_url(port, "postgres"))
            .await
            .context("connect to the local Postgres")?;
        let preload: String =
            sqlx::query_scalar("SELECT current_setting('shared_preload_libraries')")
                .fetch_one(&mut conn)
                .await?;
        let statements = preload.contains("pg_stat_statements");
        if statements {
            sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
                .execute(&mut conn)
                .await?;
        } else {
            eprintln!(
                "warning: pg_stat_statements is not loaded, statements per saga are not counted \
                 (shared_preload_libraries = 'pg_stat_statements', pg_stat_statements.track = all, \
                 and a restart)"
            );
        }
        Ok(PgCounters {
            conn,
            port,
            statements,
        })
    }

    /// Statements sent (top level) and rows written so far by the databases
    /// whose names are LIKE `like`, once the backends have reported them:
    /// a backend flushes its counters within a second of going idle, so
    /// this reads until two readings half a second apart agree (5 s at
    /// most).
    async fn now(&mut self, like: &str) -> Result<(Option<f64>, f64)> {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let mut last = self.read(like).await?;
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let next = self.read(like).await?;
            if next == last || std::time::Instant::now() >= deadline {
                return Ok(next);
            }
            last = next;
        }
    }

    async fn execute(&mut self, sql: String) -> Result<()> {
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&mut self.conn)
            .await?;
        Ok(())
    }

    async fn read(&mut self, like: &str) -> Result<(Option<f64>, f64)> {
        let rows: f64 = sqlx::query_scalar(
            "SELECT coalesce(sum(tup_inserted + tup_updated + tup_deleted), 0)::float8
             FROM pg_stat_database WHERE datname LIKE $1",
        )
        .bind(like)
        .fetch_one(&mut self.conn)
        .await?;
        let statements = match self.statements {
            false => None,
            true => Some(
                sqlx::query_scalar(
                    "SELECT coalesce(sum(s.calls), 0)::float8 FROM pg_stat_statements s
                     JOIN pg_database d ON d.oid = s.dbid
                     WHERE d.datname LIKE $1 AND s.toplevel",
                )
                .bind(like)
                .fetch_one(&mut self.conn)
                .await?,
            ),
        };
        Ok((statements, rows))
    }

    /// Runs `work` (one of our runs) and counts its Postgres costs per
    /// completed saga in the databases LIKE `like`.
    async fn measure(
        &mut self,
        like: &str,
        work: impl Future<Output = Result<Report>>,
    ) -> Result<(Report, Costs)> {
        let before = self.now(like).await?;
        let report = work.await?;
        let after = self.now(like).await?;
        Ok((
            report.clone(),
            per_saga(before, after, report.completed as f64),
        ))
    }
}

/// The costs between two readings, per saga.
fn per_saga(before: (Option<f64>, f64), after: (Option<f64>, f64), sagas: f64) -> Costs {
    let sagas = sagas.max(1.0);
    Costs {
        statements: before.0.zip(after.0).map(|(b, a)| (a - b) / sagas),
        rows: (after.1 - before.1) / sagas,
    }
}

fn admin_url(port: u16, database: &str) -> String {
    format!("postgres://postgres@127.0.0.1:{port}/{database}?sslmode=disable")
}

/// The reference, built: its `sagabench` binary and the broker it runs on.
struct Reference {
    binary: PathBuf,
    nats_server: PathBuf,
}

/// What one run of the reference measured.
struct ReferenceRun {
    /// Throughput and latency; CPU ms per saga by part.
    report: Report,
    costs: Costs,
}

impl Reference {
    /// Builds the reference in `dir` into `target` (its own target
    /// directory, so our build's is left alone).
    fn build(dir: &Path, target: &Path, local: &stack::local::Local) -> Result<Reference> {
        anyhow::ensure!(
            dir.join("Cargo.toml").is_file(),
            "no reference saga at {} (a cargo project with a `sagabench` binary)",
            dir.display()
        );
        println!("==> building the reference in {}", dir.display());
        let status = Command::new("cargo")
            .args(["build", "--quiet", "--release"])
            .current_dir(dir)
            .env("CARGO_TARGET_DIR", target)
            .status()
            .context("run cargo for the reference")?;
        anyhow::ensure!(status.success(), "building the reference: {status}");
        Ok(Reference {
            binary: target.join("release/sagabench"),
            nats_server: local.nats_server_bin.clone(),
        })
    }

    /// One run with `inflight` sagas in flight (or, for a copy that places
    /// at a fixed rate, `rate` per second), measured over `seconds` after 3
    /// s of warm-up, on a broker (fsync on every write, as ours ships),
    /// Redis and database of its own.
    async fn run(
        &self,
        pg: &mut PgCounters,
        inflight: u32,
        rate: Option<f64>,
        seconds: u32,
    ) -> Result<ReferenceRun> {
        let work = stack::infra::scratch_dir("reference")?;
        let ports = stack::infra::free_ports(2)?;
        let (nats_port, redis_port) = (ports[0], ports[1]);
        let conf = work.join("nats.conf");
        std::fs::write(
            &conf,
            format!(
                "listen: 127.0.0.1:{nats_port}\njetstream {{\n  store_dir: \"{}\"\n  sync_interval: always\n}}\n",
                work.join("js").display()
            ),
        )?;
        let nats = Killed(
            Command::new(&self.nats_server)
                .arg("-c")
                .arg(&conf)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .with_context(|| format!("start {}", self.nats_server.display()))?,
        );
        let redis = Killed(
            Command::new("redis-server")
                .args(["--port", &redis_port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .stdout(Stdio::null())
                .spawn()
                .context("start redis-server")?,
        );
        for port in [nats_port, redis_port] {
            stack::eventually(
                &format!("port {port} to accept"),
                Duration::from_secs(20),
                || async move {
                    Ok(tokio::net::TcpStream::connect(("127.0.0.1", port))
                        .await
                        .ok()
                        .map(drop))
                },
            )
            .await?;
        }
        let db = format!("reference_bench_{}", std::process::id());
        pg.execute(format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
            .await?;
        pg.execute(format!("CREATE DATABASE {db}")).await?;
        let postmaster = postmaster_pid(&mut pg.conn).await.unwrap_or(0);

        let before = pg.now(&db).await?;
        let output = tokio::process::Command::new(&self.binary)
            .env("NATS_URL", format!("127.0.0.1:{nats_port}"))
            .env("REDIS_URL", format!("redis://127.0.0.1:{redis_port}/"))
            .env("PGHOST", "127.0.0.1")
            .env("PGPORT", pg.port.to_string())
            .env("PGUSER", "postgres")
            .env("PGDATABASE", &db)
            .env("NATS_PID", nats.0.id().to_string())
            .env("REDIS_PID", redis.0.id().to_string())
            .env("PG_PID", postmaster.to_string())
            .env("INFLIGHT", inflight.to_string())
            .env("RATE", rate.unwrap_or(0.0).to_string())
            .env("WARMUP_S", "3")
            .env("MEASURE_S", seconds.to_string())
            .kill_on_drop(true)
            .output()
            .await
            .with_context(|| format!("run {}", self.binary.display()))?;
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        print!("{text}");
        let after = pg.now(&db).await?;
        // Six state rows a saga (its start and five consumers): the sagas
        // it ran, those still in flight at the end counted by their share.
        let sagas: f64 = {
            let mut conn = PgConnection::connect(&admin_url(pg.port, &db)).await?;
            let n = sqlx::query_scalar("SELECT count(*)::float8 / 6 FROM saga_state")
                .fetch_one(&mut conn)
                .await;
            conn.close().await.ok();
            n.context("count the reference's sagas (its saga_state table)")?
        };
        pg.execute(format!("DROP DATABASE {db} WITH (FORCE)"))
            .await?;
        drop((nats, redis));
        let _ = std::fs::remove_dir_all(&work);
        let report =
            parse_reference(&text).with_context(|| format!("the reference's output:\n{text}"))?;
        Ok(ReferenceRun {
            report,
            costs: per_saga(before, after, sagas),
        })
    }
}

/// A child process killed (and reaped) when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The postmaster's pid (from its data directory's `postmaster.pid`): the
/// reference counts it and its children as Postgres.
async fn postmaster_pid(conn: &mut PgConnection) -> Option<u32> {
    let dir: String = sqlx::query_scalar("SELECT current_setting('data_directory')")
        .fetch_one(conn)
        .await
        .ok()?;
    std::fs::read_to_string(Path::new(&dir).join("postmaster.pid"))
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

/// The reference's figures from its output:
///
/// ```text
///   completed in window: 6795 -> 453 sagas/s | latency n=6795 avg=… p50=540.12ms p90=… p99=771.00ms max=…
///   cpu cores used (window avg): bench(services+relay+driver)=0.32 nats-server=0.38 other=0.05 postgres=0.66 redis-server=0.04 | machine busy=1.98 cores
/// ```
///
/// Cores become CPU ms per saga at its rate; "other" (whatever else ran on
/// the machine) is left out, as ours counts only its own processes.
fn parse_reference(text: &str) -> Result<Report> {
    let window = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("completed in window:"))
        .context("no 'completed in window' line")?;
    let (count, rest) = window.split_once("->").context("no '->'")?;
    let rate: f64 = rest
        .split_whitespace()
        .next()
        .and_then(|r| r.parse().ok())
        .context("no rate")?;
    let ms = |key: &str| -> Result<f64> {
        rest.split_whitespace()
            .find_map(|w| w.strip_prefix(key)?.strip_suffix("ms")?.parse().ok())
            .with_context(|| format!("no {key}"))
    };
    let cores = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("cpu cores used (window avg):"))
        .context("no 'cpu cores used' line")?;
    let cores = cores.split('|').next().unwrap_or_default();
    if rate <= 0.0 {
        bail!("the reference completed nothing");
    }
    let cpu_ms_per_saga = cores
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .filter(|(k, _)| *k != "other")
        .map(|(k, v)| {
            let name = if k.starts_with("bench") {
                "its process"
            } else {
                k
            };
            Ok((name.to_string(), v.parse::<f64>()? * 1000.0 / rate))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Report {
        throughput: rate,
        p50_ms: ms("p50=")?,
        p99_ms: ms("p99=")?,
        completed: count.trim().parse().context("no count")?,
        cpu_ms_per_saga,
        memory: Vec::new(),
    })
}

/// An open loop's rows: latency, and CPU per saga in all and by part (at
/// a rate below saturation, CPU per saga is what decides how much of the
/// machine is left, and so how long work waits for it).
fn print_open_loop(open: &OpenLoop) {
    let latency = |r: &Report| {
        format!(
            "{} / {}",
            number(Some(r.p50_ms), 0),
            number(Some(r.p99_ms), 0)
        )
    };
    let (ours_cpu, ours_parts) = cpu(&open.ours.cpu_ms_per_saga);
    let (reference_latency, latency_ratio, reference_cpu, reference_parts) = match &open.reference {
        Some(r) => {
            let (cpu, parts) = cpu(&r.cpu_ms_per_saga);
            let ratios = format!(
                "{} / {}",
                ratio(Some(open.ours.p50_ms), Some(r.p50_ms)),
                ratio(Some(open.ours.p99_ms), Some(r.p99_ms))
            );
            (latency(r), ratios, cpu, parts)
        }
        None => (
            "(--fixed-rate-reference not given)".into(),
            String::new(),
            None,
            String::new(),
        ),
    };
    let at = format!(
        "open loop at {:.0}/s ({} the reference's saturation)",
        open.rate, open.named
    );
    println!(
        "| {at}: p50 / p99 ms | {} | {reference_latency} | {latency_ratio} |",
        latency(&open.ours)
    );
    println!(
        "| {at}: CPU ms per saga | {} | {} | {} |",
        number(ours_cpu, 2),
        number(reference_cpu, 2),
        ratio(ours_cpu, reference_cpu)
    );
    println!("| {at}: CPU ms per saga by part | {ours_parts} | {reference_parts} | |");
}

/// CPU per saga in all, and by part (the services summed as one part).
fn cpu(parts: &[(String, f64)]) -> (Option<f64>, String) {
    if parts.is_empty() {
        return (None, "?".into());
    }
    let services: f64 = parts
        .iter()
        .filter(|(g, _)| common::roster::names().any(|n| n == g))
        .map(|p| p.1)
        .sum();
    let mut shown: Vec<String> = Vec::new();
    if services > 0.0 {
        shown.push(format!("services {services:.2}"));
    }
    for (g, v) in parts {
        if !common::roster::names().any(|n| n == g) {
            shown.push(format!("{g} {v:.2}"));
        }
    }
    (Some(parts.iter().map(|p| p.1).sum()), shown.join(", "))
}

fn number(v: Option<f64>, digits: usize) -> String {
    v.filter(|v| v.is_finite())
        .map_or("?".into(), |v| format!("{v:.digits$}"))
}

fn ratio(ours: Option<f64>, reference: Option<f64>) -> String {
    match (ours, reference) {
        (Some(a), Some(b)) if b > 0.0 && a.is_finite() => format!("**{:.2}x**", a / b),
        _ => "?".into(),
    }
}

fn print_table(pairs: &[Pair]) {
    let today = chrono::Utc::now().date_naive();
    println!(
        "\nMeasured {today} on this machine ({} pair(s), each of ours right after the reference's):\n",
        pairs.len()
    );
    println!("| measure | ours | reference | ratio |");
    println!("|---|---|---|---|");
    for (i, p) in pairs.iter().enumerate() {
        let tag = if pairs.len() > 1 {
            format!(" (pair {})", i + 1)
        } else {
            String::new()
        };
        let (us, us_costs) = &p.ours;
        let (reference, ref_costs) = (&p.reference.report, &p.reference.costs);
        let (us_cpu, us_parts) = cpu(&us.cpu_ms_per_saga);
        let (ref_cpu, ref_parts) = cpu(&reference.cpu_ms_per_saga);
        let rows = [
            (
                format!("saturation, {SATURATION} in flight: sagas/s{tag}"),
                Some(us.throughput),
                Some(reference.throughput),
                0,
            ),
            ("CPU ms per saga at saturation".into(), us_cpu, ref_cpu, 2),
            (
                "Postgres statements per saga".into(),
                us_costs.statements,
                ref_costs.statements,
                1,
            ),
            (
                "Postgres rows written per saga".into(),
                Some(us_costs.rows),
                Some(ref_costs.rows),
                1,
            ),
            (
                "one saga in flight: p50 ms".into(),
                Some(p.ours_one.p50_ms),
                Some(p.reference_one.p50_ms),
                1,
            ),
            (
                "one saga in flight: p99 ms".into(),
                Some(p.ours_one.p99_ms),
                Some(p.reference_one.p99_ms),
                1,
            ),
        ];
        for (name, a, b, digits) in rows {
            println!(
                "| {name} | {} | {} | {} |",
                number(a, digits),
                number(b, digits),
                ratio(a, b)
            );
        }
        println!("| CPU ms per saga by part | {us_parts} | {ref_parts} | |");
        for open in &p.open_loops {
            print_open_loop(open);
        }
        let rss: Vec<String> = us
            .memory
            .iter()
            .map(|(name, idle, peak)| format!("{name} {} / {}", number(*idle, 0), number(*peak, 0)))
            .collect();
        println!(
            "| RSS MB, idle / peak at saturation | {} | | |",
            rss.join(", ")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reference_output_becomes_rates_latencies_and_cpu_per_saga() {
        let text = "saga inflight=256 conc=8 pool=12 relays=1 notify=true poll=50ms sync_commit=on double_ack=false\n  completed in window: 6795 -> 453 sagas/s | latency n=6795 avg=560.00ms p50=540.12ms p90=700.00ms p99=771.00ms max=900.00ms\n  cpu cores used (window avg): bench(services+relay+driver)=0.32 nats-server=0.38 other=0.05 postgres=0.66 redis-server=0.04 | machine busy=1.98 cores\n";
        let r = parse_reference(text).unwrap();
        assert_eq!(r.throughput, 453.0);
        assert_eq!(r.completed, 6795);
        assert_eq!((r.p50_ms, r.p99_ms), (540.12, 771.0));
        let parts: Vec<&str> = r.cpu_ms_per_saga.iter().map(|p| p.0.as_str()).collect();
        assert_eq!(
            parts,
            ["its process", "nats-server", "postgres", "redis-server"]
        );
        let all: f64 = r.cpu_ms_per_saga.iter().map(|p| p.1).sum();
        assert!((all - 1.40 * 1000.0 / 453.0).abs() < 1e-9, "{all}");
    }

    #[test]
    fn a_reference_that_completed_nothing_is_an_error() {
        let text = "  completed in window: 0 -> 0 sagas/s | latency n/a\n  cpu cores used (window avg): other=0.01 | machine busy=0.01 cores\n";
        assert!(parse_reference(text).is_err());
    }
}
