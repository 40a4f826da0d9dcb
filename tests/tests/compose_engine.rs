//! `tests/compose/images.sh` starting a Docker engine where none answers:
//! the engine it starts outlives it on its own, holding none of the
//! script's output and outside the caller's session. A test runner that
//! reads the script's output until it ends must see it end when the script
//! does, and a runner that kills a timed-out test's process group must not
//! take the engine with it (the next test would find none, and a stale one
//! half-stopped). Run against stand-in `docker` and `dockerd` commands, so
//! that no engine is touched.

use std::{
    io::Read,
    os::unix::fs::PermissionsExt,
    path::Path,
    process::{Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use stack::repo_root;
use uuid::Uuid;

/// How long the stand-in engine lives: far longer than the script may take.
const ENGINE_LIFETIME_S: u64 = 60;

fn script(path: &Path, body: &str) -> Result<()> {
    std::fs::write(path, format!("#!/bin/sh\n{body}"))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// Field `n` (1-based) of /proc/<pid>/stat, whose second field is the
/// command name in parentheses (here never with spaces).
fn stat_field(pid: &str, n: usize) -> Result<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    stat.split_whitespace()
        .nth(n - 1)
        .map(String::from)
        .context("short /proc stat")
}

struct Kill(Option<String>);

impl Drop for Kill {
    fn drop(&mut self) {
        if let Some(pid) = &self.0 {
            let _ = Command::new("kill").arg(pid).status();
        }
    }
}

#[test]
fn the_engine_images_sh_starts_holds_none_of_its_output_and_is_not_in_its_session() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("engine-{}", Uuid::new_v4().simple()));
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin)?;
    let up = dir.join("up");
    let pid_file = dir.join("dockerd.pid");
    // `docker info` answers once the engine is up; every image is present.
    script(
        &bin.join("docker"),
        &format!(
            "if [ \"$1\" = info ]; then test -e {up}; else exit 0; fi\n",
            up = up.display()
        ),
    )?;
    script(
        &bin.join("dockerd"),
        &format!(
            "echo $$ > {pid}.tmp && mv {pid}.tmp {pid}\ntouch {up}\nexec sleep {ENGINE_LIFETIME_S}\n",
            pid = pid_file.display(),
            up = up.display()
        ),
    )?;
    script(&bin.join("debootstrap"), "exit 0\n")?;

    let path = format!("{}:{}", bin.display(), std::env::var("PATH")?);
    let mut child = Command::new("bash")
        .arg(repo_root().join("tests/compose/images.sh"))
        .env("PATH", path)
        .env("DOCKERD_LOG", dir.join("dockerd.log"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut stdout = child.stdout.take().context("stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut out = String::new();
        let read = stdout.read_to_string(&mut out).map(|_| out);
        let _ = tx.send(read);
    });
    let status = child.wait()?;
    let engine = Kill(
        std::fs::read_to_string(&pid_file)
            .ok()
            .map(|p| p.trim().to_string()),
    );
    ensure!(status.success(), "images.sh: {status}");
    let pid = engine
        .0
        .clone()
        .context("images.sh did not start dockerd")?;

    let out = rx.recv_timeout(Duration::from_secs(10)).map_err(|_| {
        anyhow::anyhow!(
            "images.sh has ended, but its output is still open after 10 s: \
             the engine it started holds it"
        )
    })??;
    ensure!(out.trim() == "docker compose", "images.sh printed {out:?}");

    let ours = stat_field("self", 6)?;
    let its = stat_field(&pid, 6)?;
    ensure!(
        its != ours,
        "the engine shares the test's session ({ours}): a runner's kill of it takes the engine"
    );
    drop(engine);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
