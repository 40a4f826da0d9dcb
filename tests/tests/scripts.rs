//! The native stack scripts: `scripts/up.sh` starts the binaries where cargo
//! built them (CARGO_TARGET_DIR honoured), and a start-up that fails leaves
//! nothing of itself running.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use anyhow::{Context, Result};
use uuid::Uuid;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(kind: &str) -> Result<Scratch> {
        let dir = std::env::temp_dir().join(format!("saga-{kind}-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir)?;
        Ok(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A free port below the kernel's ephemeral range: the other tests bind
/// port 0 for their brokers and services, and a port handed out that way
/// could be taken again by one of them before up.sh binds it.
fn free_port() -> Result<u16> {
    let ephemeral_start: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    let low = 20_000.min(ephemeral_start.saturating_sub(2_000));
    let span = ephemeral_start.saturating_sub(low).max(1);
    for _ in 0..200 {
        let port = low + (Uuid::new_v4().as_u128() % span as u128) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    anyhow::bail!("no free port in {low}..{ephemeral_start}")
}

fn bash(script: &str, env: &[(&str, String)]) -> Result<Output> {
    let mut cmd = Command::new("bash");
    cmd.arg("-c").arg(script).current_dir(repo_root());
    for (k, v) in env {
        cmd.env(k, v);
    }
    Ok(cmd.output()?)
}

/// Processes whose command line mentions `needle`, with their pids.
fn processes_mentioning(needle: &str) -> Vec<(u32, String)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(needle) && pid != std::process::id() {
            found.push((pid, cmdline));
        }
    }
    found
}

#[test]
fn service_binaries_are_found_where_cargo_target_dir_puts_them() -> Result<()> {
    let target = Scratch::new("target")?;
    let run = Scratch::new("run")?;
    let out = bash(
        "source scripts/lib.sh && service_bin order",
        &[
            ("CARGO_TARGET_DIR", target.0.display().to_string()),
            ("RUN_DIR", run.0.display().to_string()),
        ],
    )?;
    let printed = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        printed,
        target.0.join("release/order").display().to_string()
    );
    Ok(())
}

#[test]
fn a_failed_start_up_leaves_nothing_of_itself_running() -> Result<()> {
    let target = Scratch::new("target")?;
    let run = Scratch::new("run")?;
    // A broken build: every service exits at once.
    let release = target.0.join("release");
    std::fs::create_dir_all(&release)?;
    for s in ["order", "payment", "inventory", "shipping"] {
        let bin = release.join(s);
        std::fs::write(&bin, "#!/bin/sh\necho 'broken build' >&2\nexit 1\n")?;
        let status = Command::new("chmod").arg("+x").arg(&bin).status()?;
        anyhow::ensure!(status.success());
    }
    let mut env = vec![
        ("CARGO_TARGET_DIR", target.0.display().to_string()),
        ("RUN_DIR", run.0.display().to_string()),
        ("NATS_PORT", free_port()?.to_string()),
        ("NATS_MONITOR_PORT", free_port()?.to_string()),
    ];
    for name in [
        "ORDER_PORT",
        "PAYMENT_PORT",
        "INVENTORY_PORT",
        "SHIPPING_PORT",
    ] {
        env.push((name, free_port()?.to_string()));
    }
    let out = bash("scripts/up.sh --no-build", &env)?;
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();

    assert!(!out.status.success(), "up.sh succeeded: {stdout}");
    assert!(
        stdout.contains("starting nats-server"),
        "the broker should have been started first: {stdout}\n{stderr}"
    );
    assert!(
        stderr.contains("order exited during start-up") && stderr.contains("broken build"),
        "{stderr}"
    );
    assert!(
        stderr.contains("stopping what this run started: nats order"),
        "{stderr}"
    );
    let leftovers = processes_mentioning(&run.0.display().to_string());
    assert!(leftovers.is_empty(), "still running: {leftovers:?}");
    let pid_files: Vec<_> = std::fs::read_dir(&run.0)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.ends_with(".pid"))
        .collect();
    assert!(pid_files.is_empty(), "pid files left: {pid_files:?}");
    Ok(())
}

#[test]
fn no_build_with_nothing_built_stops_before_starting_anything() -> Result<()> {
    let target = Scratch::new("target")?;
    let run = Scratch::new("run")?;
    let out = bash(
        "scripts/up.sh --no-build",
        &[
            ("CARGO_TARGET_DIR", target.0.display().to_string()),
            ("RUN_DIR", run.0.display().to_string()),
            ("NATS_PORT", free_port()?.to_string()),
            ("NATS_MONITOR_PORT", free_port()?.to_string()),
        ],
    )?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    let expected = target.0.join("release/order").display().to_string();
    assert!(
        stderr.contains("not built") && stderr.contains(&expected),
        "{stderr}"
    );
    assert!(processes_mentioning(&run.0.display().to_string()).is_empty());
    Ok(())
}

#[test]
fn the_scripts_parse() -> Result<()> {
    for script in ["up.sh", "down.sh", "test.sh", "lib.sh"] {
        let path = repo_root().join("scripts").join(script);
        let out = Command::new("bash")
            .arg("-n")
            .arg(&path)
            .output()
            .with_context(|| format!("bash -n {script}"))?;
        assert!(
            out.status.success(),
            "{script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}
