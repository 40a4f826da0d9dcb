//! The `stack` command against the real thing: it starts our nats-server and
//! every roster service as processes on the local Postgres and Redis, runs
//! the demo, reports status and stops everything again; a start-up that
//! fails leaves nothing of itself running. Each test has its own run
//! directory, ports, databases and subject prefix.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use anyhow::Result;
use uuid::Uuid;

/// A scratch run directory, removed on drop.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A free port below the kernel's ephemeral range: the other tests bind
/// port 0 for their brokers and services, and a port handed out that way
/// could be taken again by one of them before the stack binds it.
/// Ports one private stack may use: a block of this many, all free when
/// chosen (replica k of a service listens 10 × (k − 1) above the first).
const BLOCK: u16 = 20;

/// The first port of a block of [`BLOCK`] free ports below the ephemeral
/// range, at a random place: two tests running side by side take the same
/// block only by a 1-in-hundreds chance, and never overlap otherwise.
fn free_block() -> Result<u16> {
    let ephemeral_start: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    let low = 20_000.min(ephemeral_start.saturating_sub(2_000));
    let blocks = (ephemeral_start.saturating_sub(low) / BLOCK).max(1);
    for _ in 0..200 {
        let base = low + (Uuid::new_v4().as_u128() % blocks as u128) as u16 * BLOCK;
        if (base..base + BLOCK).all(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok()) {
            return Ok(base);
        }
    }
    anyhow::bail!("no block of {BLOCK} free ports in {low}..{ephemeral_start}")
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// One private local stack: run directory, ports, databases, prefix.
struct Private {
    run: Scratch,
    tag: String,
    env: Vec<(String, String)>,
}

impl Private {
    fn new() -> Result<Private> {
        let tag = format!("clitest{}", &Uuid::new_v4().simple().to_string()[..10]);
        let run = Scratch(std::env::temp_dir().join(format!("stack-run-{tag}")));
        let base = free_block()?;
        // The broker's two ports, then the services', below their replicas'.
        assert!(2 + common::roster::SERVICES.len() <= 10);
        let mut env = vec![
            ("RUN_DIR".to_string(), run.0.display().to_string()),
            ("NATS_PORT".into(), base.to_string()),
            ("NATS_MONITOR_PORT".into(), (base + 1).to_string()),
            ("DATABASE_PREFIX".into(), tag.clone()),
            ("SUBJECT_PREFIX".into(), tag.clone()),
        ];
        for (i, spec) in common::roster::SERVICES.iter().enumerate() {
            env.push((spec.port_variable(), (base + 2 + i as u16).to_string()));
        }
        // The operator console: the block's last port, above the replicas'
        // and the cluster's.
        env.push(("CONSOLE_PORT".into(), (base + BLOCK - 1).to_string()));
        Ok(Private { run, tag, env })
    }

    /// The first port of its block (the broker's).
    fn base(&self) -> u16 {
        let (_, port) = self.env.iter().find(|(k, _)| k == "NATS_PORT").unwrap();
        port.parse().unwrap()
    }

    fn stack(&self, args: &[&str], extra: &[(&str, &str)]) -> Result<Output> {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_stack"));
        cmd.args(args)
            .current_dir(repo_root())
            .envs(self.env.clone());
        for (k, v) in extra {
            cmd.env(k, v);
        }
        Ok(cmd.output()?)
    }

    /// Pids of processes started for this stack: their environment or
    /// command line carries its unique tag.
    fn processes(&self) -> Vec<u32> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if pid == std::process::id() {
                continue;
            }
            let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
            if stat
                .rsplit_once(") ")
                .is_some_and(|(_, r)| r.starts_with('Z'))
            {
                continue;
            }
            let mut text = std::fs::read(entry.path().join("environ")).unwrap_or_default();
            text.extend(std::fs::read(entry.path().join("cmdline")).unwrap_or_default());
            if String::from_utf8_lossy(&text).contains(&self.tag) {
                found.push(pid);
            }
        }
        found
    }

    fn pid_files(&self) -> Vec<String> {
        std::fs::read_dir(&self.run.0)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .filter(|n| n.ends_with(".pid"))
            .collect()
    }
}

impl Drop for Private {
    fn drop(&mut self) {
        // Whatever the test left behind, never leave a stack running.
        let _ = self.stack(&["down", "--purge"], &[]);
    }
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn up_runs_the_demo_status_sees_every_process_and_down_stops_them_all() -> Result<()> {
    let stack = Private::new()?;

    let up = stack.stack(&["up"], &[])?;
    let shown = text(&up);
    assert!(up.status.success(), "{shown}");
    assert!(shown.contains("starting nats-server"), "{shown}");
    for name in common::roster::names() {
        assert!(shown.contains(&format!("==> {name} ready on")), "{shown}");
    }
    assert!(shown.contains(": \"CONFIRMED\""), "{shown}");
    assert!(shown.contains(": \"CANCELLED\" (failureReason"), "{shown}");
    assert!(shown.contains("demo-alice balance: 7500"), "{shown}");
    let env_file = std::fs::read_to_string(stack.run.0.join("stack.env"))?;
    assert!(
        env_file.contains("export ORDER_URL=http://127.0.0.1:"),
        "{env_file}"
    );
    // The environment carries what sagactl needs: its audit reads each
    // service's <SERVICE>_DATABASE_URL, here this stack's databases
    // (DATABASE_PREFIX), not the default ones.
    for spec in &common::roster::SERVICES {
        let line = format!(
            "export {}_DATABASE_URL=postgres://postgres@127.0.0.1:",
            spec.name.to_ascii_uppercase()
        );
        let url = env_file
            .lines()
            .find_map(|l| l.strip_prefix(line.as_str()))
            .unwrap_or_else(|| panic!("no {line}… in {env_file}"));
        assert!(
            url.ends_with(&format!("/{}_{}?sslmode=disable", stack.tag, spec.name)),
            "{url}"
        );
    }

    let status = stack.stack(&["status"], &[])?;
    let shown = text(&status);
    assert!(status.status.success(), "{shown}");
    // Every service and the operator console.
    assert_eq!(
        shown.matches(" ready").count(),
        common::roster::SERVICES.len() + 1,
        "{shown}"
    );
    assert!(shown.contains("console "), "{shown}");
    assert!(shown.contains("healthy"), "{shown}");

    // Again: running services are restarted, the broker is kept.
    let again = stack.stack(&["up", "--no-demo"], &[])?;
    let shown = text(&again);
    assert!(again.status.success(), "{shown}");
    assert!(
        shown.contains("our nats-server is already running"),
        "{shown}"
    );
    assert!(shown.contains("stopping order"), "{shown}");

    let down = stack.stack(&["down", "--purge"], &[])?;
    assert!(down.status.success(), "{}", text(&down));
    assert_eq!(stack.processes(), Vec::<u32>::new(), "still running");
    assert!(!stack.run.0.exists(), "run directory left");
    let status = stack.stack(&["status"], &[])?;
    assert!(!status.status.success(), "{}", text(&status));
    Ok(())
}

#[test]
fn up_with_replicas_runs_each_service_twice_the_demo_goes_through_and_down_stops_them_all()
-> Result<()> {
    let stack = Private::new()?;
    let up = stack.stack(&["up", "--no-demo", "--replicas", "2"], &[])?;
    let shown = text(&up);
    assert!(up.status.success(), "{shown}");
    for name in common::roster::names() {
        for daemon in [name.to_string(), format!("{name}-2")] {
            assert!(shown.contains(&format!("==> {daemon} ready on")), "{shown}");
        }
    }
    let status = stack.stack(&["status"], &[])?;
    let shown = text(&status);
    assert!(status.status.success(), "{shown}");
    assert_eq!(
        shown.matches(" ready").count(),
        2 * common::roster::SERVICES.len() + 1,
        "{shown}"
    );
    // Prometheus is told of both processes of every service.
    for (i, spec) in common::roster::SERVICES.iter().enumerate() {
        let file = stack.run.0.join(format!("prometheus/{}.json", spec.name));
        let targets: serde_json::Value = serde_json::from_slice(&std::fs::read(&file)?)?;
        let port = stack.base() + 2 + i as u16;
        assert_eq!(
            targets,
            serde_json::json!([{"targets": [format!("127.0.0.1:{port}"), format!("127.0.0.1:{}", port + 10)]}]),
            "{}",
            file.display()
        );
    }
    let demo = stack.stack(&["demo"], &[])?;
    assert!(demo.status.success(), "{}", text(&demo));

    let down = stack.stack(&["down", "--purge"], &[])?;
    assert!(down.status.success(), "{}", text(&down));
    assert_eq!(stack.processes(), Vec::<u32>::new(), "still running");
    let refused = stack.stack(&["up", "--replicas", "9"], &[])?;
    assert!(!refused.status.success(), "{}", text(&refused));
    Ok(())
}

#[test]
fn up_with_a_cluster_runs_three_nodes_the_demo_goes_through_and_no_switch_loses_streams()
-> Result<()> {
    let stack = Private::new()?;
    let var = |name: &str| -> u16 {
        let (_, v) = stack.env.iter().find(|(k, _)| k == name).unwrap();
        v.parse().unwrap()
    };
    // Above the services' ports, within the block: clients, monitors,
    // routes, three of each.
    let base = var("NATS_PORT");
    let ports = [base + 6, base + 9, base + 12].map(|p| p.to_string());
    let cluster = [
        ("NATS_PORT", ports[0].as_str()),
        ("NATS_MONITOR_PORT", ports[1].as_str()),
        ("NATS_CLUSTER_PORT", ports[2].as_str()),
    ];
    let up = stack.stack(&["up", "--cluster"], &cluster)?;
    let shown = text(&up);
    assert!(up.status.success(), "{shown}");
    for node in ["nats", "nats-2", "nats-3"] {
        assert!(
            shown.contains(&format!("starting nats-server {node} on")),
            "{shown}"
        );
    }
    assert!(shown.contains(": \"CONFIRMED\""), "{shown}");
    let seeds: Vec<String> = (0..3)
        .map(|k| format!("nats://127.0.0.1:{}", base + 6 + k))
        .collect();
    let env = std::fs::read_to_string(stack.run.0.join("stack.env"))?;
    assert!(env.contains("export NATS_USER=operator\n"), "{env}");
    assert!(env.contains("nats-password-operator"), "{env}");
    assert!(
        env.contains(&format!("export NATS_URL={}\n", seeds.join(","))),
        "{env}"
    );

    let status = stack.stack(&["status"], &cluster)?;
    let shown = text(&status);
    assert!(status.status.success(), "{shown}");
    assert_eq!(shown.matches(" healthy").count(), 3, "{shown}");

    // A single server would start with empty streams: refused, and the
    // running stack is left as it was.
    let single = stack.stack(&["up", "--no-demo"], &cluster)?;
    let shown = text(&single);
    assert!(!single.status.success(), "{shown}");
    assert!(shown.contains("Nothing was stopped"), "{shown}");
    assert!(stack.stack(&["status"], &cluster)?.status.success());

    let down = stack.stack(&["down", "--purge"], &cluster)?;
    assert!(down.status.success(), "{}", text(&down));
    assert_eq!(stack.processes(), Vec::<u32>::new(), "still running");
    assert_eq!(stack.pid_files(), Vec::<String>::new());
    Ok(())
}

#[test]
fn a_service_that_exits_during_start_up_stops_everything_this_run_started() -> Result<()> {
    let stack = Private::new()?;
    // Every service refuses this configuration and exits at once.
    let out = stack.stack(
        &["up", "--no-demo"],
        &[("CONSUMER_CONCURRENCY", "not-a-number")],
    )?;
    let shown = text(&out);
    assert!(!out.status.success(), "{shown}");
    assert!(shown.contains("starting nats-server"), "{shown}");
    assert!(shown.contains("order exited during start-up"), "{shown}");
    assert!(
        shown.contains("CONSUMER_CONCURRENCY"),
        "the log tail names the cause: {shown}"
    );
    assert!(
        shown.contains("stopping what this run started: nats order payment inventory shipping"),
        "{shown}"
    );
    assert_eq!(stack.processes(), Vec::<u32>::new(), "still running");
    assert_eq!(stack.pid_files(), Vec::<String>::new());
    Ok(())
}

#[test]
fn a_port_held_by_another_program_is_named_and_nothing_is_left_running() -> Result<()> {
    let stack = Private::new()?;
    let port: u16 = stack
        .env
        .iter()
        .find(|(k, _)| k == "PAYMENT_PORT")
        .map(|(_, v)| v.parse())
        .unwrap()?;
    let _holder = std::net::TcpListener::bind(("127.0.0.1", port))?;
    let out = stack.stack(&["up", "--no-demo"], &[])?;
    let shown = text(&out);
    assert!(!out.status.success(), "{shown}");
    assert!(
        shown.contains(&format!("port {port} (for payment) is already in use")),
        "{shown}"
    );
    assert!(shown.contains("set PAYMENT_PORT"), "{shown}");
    assert_eq!(stack.processes(), Vec::<u32>::new(), "still running");
    Ok(())
}

#[test]
fn the_scripts_parse_and_stay_small() -> Result<()> {
    let mut lines = 0;
    for entry in std::fs::read_dir(repo_root().join("scripts"))? {
        let path = entry?.path();
        lines += std::fs::read_to_string(&path)?.lines().count();
        if path.extension().is_some_and(|e| e == "sh") {
            let out = Command::new("bash").arg("-n").arg(&path).output()?;
            assert!(out.status.success(), "{}: {}", path.display(), text(&out));
        }
    }
    // (compose-env.sh is there so that compose users need no Rust.)
    assert!(
        lines < 340,
        "scripts/ has {lines} lines: tooling belongs in the stack crate"
    );
    Ok(())
}

/// scripts/compose-env.sh writes every secret the compose files read, each
/// fresh, into an .env only its owner can read, and never overwrites one.
#[test]
fn compose_env_writes_every_secret_once_for_its_owner_only() -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("compose-env-{}", Uuid::new_v4()));
    std::fs::create_dir_all(dir.join("scripts"))?;
    let script = dir.join("scripts/compose-env.sh");
    std::fs::copy(repo_root().join("scripts/compose-env.sh"), &script)?;
    let run = || Command::new("bash").arg(&script).output();
    let out = run()?;
    assert!(out.status.success(), "{}", text(&out));
    let env = dir.join(".env");
    assert_eq!(std::fs::metadata(&env)?.permissions().mode() & 0o777, 0o600);
    let written = std::fs::read_to_string(&env)?;
    let values: std::collections::HashMap<&str, &str> = written
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .collect();
    for secret in stack::compose::secrets() {
        let value = values.get(secret.as_str()).copied().unwrap_or_default();
        assert!(value.len() >= 32, "{secret} is not written: {written}");
    }
    let distinct: std::collections::HashSet<&&str> = values.values().collect();
    assert_eq!(distinct.len(), values.len(), "every secret is its own");
    // Every `${VARIABLE:?` the compose files read is one of them.
    for file in ["docker-compose.yml", "docker-compose.cluster.yml"] {
        let compose = std::fs::read_to_string(repo_root().join(file))?;
        for piece in compose.split("${").skip(1) {
            if let Some((variable, _)) = piece.split_once(":?") {
                assert!(values.contains_key(variable), "{file} reads {variable}");
            }
        }
    }
    let again = run()?;
    assert!(!again.status.success(), "an .env is never overwritten");
    assert_eq!(std::fs::read_to_string(&env)?, written);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// A service's command line: `--help` lists the shared and the service's
/// own settings with their variables and exits without starting anything
/// (the database and broker named here do not exist); a bad value is a
/// usage error that names it, before any connection is tried.
#[test]
fn a_service_answers_help_and_refuses_a_bad_setting_without_starting() -> Result<()> {
    let serve = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_stack"))
            .arg("serve")
            .args(args)
            .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")
            .env("NATS_URL", "nats://127.0.0.1:1")
            .env_remove("ADMIN_TOKEN")
            .output()
    };
    let help = serve(&["payment", "--help"])?;
    let shown = text(&help);
    assert!(help.status.success(), "{shown}");
    for expected in [
        "payment service",
        "--consumer-lanes",
        "CONSUMER_LANES",
        "--gateway-timeout-ms",
        "GATEWAY_TIMEOUT_MS",
    ] {
        assert!(shown.contains(expected), "{expected}: {shown}");
    }
    assert!(!shown.contains("SNAPSHOT_EVERY"), "order's own: {shown}");

    let help = serve(&["order", "--help"])?;
    let shown = text(&help);
    assert!(help.status.success(), "{shown}");
    assert!(shown.contains("rebuild-projection"), "{shown}");
    assert!(shown.contains("SNAPSHOT_EVERY"), "{shown}");

    let bad = serve(&["inventory", "--consumer-lanes=0"])?;
    let shown = text(&bad);
    assert_eq!(bad.status.code(), Some(2), "{shown}");
    assert!(shown.contains("CONSUMER_LANES"), "{shown}");

    let version = serve(&["shipping", "--version"])?;
    assert!(version.status.success(), "{}", text(&version));
    assert!(text(&version).contains(env!("CARGO_PKG_VERSION")));
    Ok(())
}
