//! Long-running processes of the local stack, each with a pid file and a log
//! in the run directory. A pid file is trusted only while the process it
//! names still runs the command line recorded with it, so a stale file never
//! makes us signal a stranger.

use std::{
    fs::OpenOptions,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

/// A named process of the run directory: `<dir>/<name>.pid`, `<dir>/<name>.log`.
#[derive(Debug, Clone)]
pub struct Daemon {
    pub name: String,
    dir: PathBuf,
}

impl Daemon {
    pub fn new(dir: &Path, name: &str) -> Daemon {
        Daemon {
            name: name.to_string(),
            dir: dir.to_path_buf(),
        }
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join(format!("{}.log", self.name))
    }

    fn pid_path(&self) -> PathBuf {
        self.dir.join(format!("{}.pid", self.name))
    }

    /// Whether a start of this daemon was recorded (it may have exited since).
    pub fn recorded(&self) -> bool {
        self.pid_path().exists()
    }

    /// Starts `command` in its own process group (a Ctrl-C in the terminal
    /// that ran `stack up` does not reach it), appending its output to the
    /// log, and records its pid and command line.
    pub fn spawn(&self, command: &mut Command) -> Result<Child> {
        std::fs::create_dir_all(&self.dir)?;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .with_context(|| format!("open {}", self.log_path().display()))?;
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .with_context(|| format!("start {}", self.name))?;
        // The command line as the kernel will show it once exec completes
        // (reading /proc right after spawn can still show the parent's).
        let mut cmdline = Vec::new();
        for part in std::iter::once(command.get_program()).chain(command.get_args()) {
            cmdline.extend_from_slice(part.as_encoded_bytes());
            cmdline.push(0);
        }
        let record = format!("{}\n{}\n", child.id(), hex(&cmdline));
        std::fs::write(self.pid_path(), record)?;
        Ok(child)
    }

    /// The pid of this daemon if it is running (checked against the recorded
    /// command line). A process still between fork and exec does not count
    /// yet; a stale pid file is left for the next start to overwrite.
    pub fn running(&self) -> Option<i32> {
        let text = std::fs::read_to_string(self.pid_path()).ok()?;
        let mut lines = text.lines();
        let pid: i32 = lines.next()?.trim().parse().ok()?;
        let recorded = lines.next().unwrap_or_default();
        let current = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        (alive(pid) && hex(&current) == recorded).then_some(pid)
    }

    /// The end of the log, at most `n` lines: from the last `Error:` line a
    /// process printed as it exited (its backtrace would push the cause
    /// out of a plain tail), else the last lines.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let start = lines
            .iter()
            .rposition(|l| l.starts_with("Error: "))
            .unwrap_or(lines.len().saturating_sub(n));
        lines[start..lines.len().min(start + n)].join("\n")
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// True while `pid` runs; a zombie waiting to be reaped counts as gone.
pub fn alive(pid: i32) -> bool {
    if kill(Pid::from_raw(pid), None).is_err() {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

/// Sends SIGTERM to every running daemon of `daemons` at once, waits up to
/// `grace` for them to exit, then sends SIGKILL to the rest; removes their
/// pid files, stale ones included. Returns the names of those that ran.
pub fn stop_all(daemons: &[Daemon], grace: Duration) -> Vec<String> {
    let running: Vec<(Daemon, i32)> = daemons
        .iter()
        .filter_map(|d| d.running().map(|pid| (d.clone(), pid)))
        .collect();
    stop_pids(&running, grace);
    for d in daemons {
        let _ = std::fs::remove_file(d.pid_path());
    }
    running.into_iter().map(|(d, _)| d.name).collect()
}

/// [`stop_all`] for processes known by pid: the ones this process started.
pub fn stop_pids(processes: &[(Daemon, i32)], grace: Duration) {
    for (d, pid) in processes {
        if alive(*pid) {
            println!("==> stopping {} (pid {pid})", d.name);
            let _ = kill(Pid::from_raw(*pid), Signal::SIGTERM);
        }
    }
    let deadline = Instant::now() + grace;
    for (d, pid) in processes {
        while alive(*pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if alive(*pid) {
            eprintln!(
                "warning: {} (pid {pid}) still running after {grace:?}; sending SIGKILL",
                d.name
            );
            let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
            let killed = Instant::now() + Duration::from_secs(5);
            while alive(*pid) && Instant::now() < killed {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let _ = std::fs::remove_file(d.pid_path());
    }
}

/// True if something accepts TCP connections on 127.0.0.1:`port`.
pub fn port_in_use(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(2),
    )
    .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pid once the child has finished exec.
    fn running_soon(d: &Daemon) -> Option<i32> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match d.running() {
                Some(pid) => return Some(pid),
                None if Instant::now() > deadline => return None,
                None => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }

    #[test]
    fn a_pid_file_naming_another_program_is_not_trusted() {
        let dir = std::env::temp_dir().join(format!("stack-proc-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let d = Daemon::new(&dir, "sleeper");
        let mut child = d.spawn(Command::new("sleep").arg("30")).unwrap();
        let pid = child.id() as i32;
        assert_eq!(running_soon(&d), Some(pid));
        // The same pid recorded with another command line: a stranger.
        std::fs::write(
            dir.join("sleeper.pid"),
            format!("{pid}\n{}\n", hex(b"other")),
        )
        .unwrap();
        assert_eq!(d.running(), None);
        child.kill().unwrap();
        child.wait().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn stopping_sends_sigterm_and_removes_the_pid_file() {
        let dir = std::env::temp_dir().join(format!("stack-proc-{}", uuid::Uuid::new_v4()));
        let d = Daemon::new(&dir, "sleeper");
        let mut child = d.spawn(Command::new("sleep").arg("30")).unwrap();
        assert!(running_soon(&d).is_some());
        // Reap it as it exits so it is not left a zombie.
        let waiter = std::thread::spawn(move || child.wait().unwrap());
        let stopped = stop_all(std::slice::from_ref(&d), Duration::from_secs(5));
        assert_eq!(stopped, vec!["sleeper".to_string()]);
        assert!(!waiter.join().unwrap().success());
        assert_eq!(d.running(), None);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
