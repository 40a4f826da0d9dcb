//! The saga stack as one thing: the roster's services and how to build each
//! ([`services`]), the infrastructure they run on ([`infra`]: nats-server,
//! Redis, databases), the local stack the `stack` command starts, stops and
//! demos ([`local`], [`demo`]), and docker-compose.yml derived from the
//! roster ([`compose`]). The integration tests' harness builds on the same
//! code.

pub mod asyncapi;
pub mod auth_conf;
pub mod compose;
pub mod config_reference;
pub mod demo;
pub mod infra;
pub mod local;
pub mod openapi;
pub mod process;
pub mod services;

use std::time::{Duration, Instant};

use anyhow::{Result, bail};

/// Polls `check` until it returns `Some`, or fails after `deadline` with `what`.
pub async fn eventually<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let start = Instant::now();
    let mut last_err = None;
    loop {
        match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if start.elapsed() > deadline {
            match last_err {
                Some(e) => {
                    bail!("timed out after {deadline:?} waiting for {what}; last error: {e:#}")
                }
                None => bail!("timed out after {deadline:?} waiting for {what}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The repository the stack's files (nats/, docker-compose.yml) come from.
pub fn repo_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}
