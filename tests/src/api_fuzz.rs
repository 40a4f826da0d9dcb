//! schemathesis (PyPI, pinned in scripts/requirements-dev.txt, installed
//! into .venv by scripts/test.sh) against a live service, driven by the
//! service's own `GET /openapi.json`: bounded in examples per operation,
//! in time per request and in time for the whole run, with a fixed seed
//! so a run is repeatable (`API_FUZZ_SEED` explores others).

use std::{path::PathBuf, process::Stdio, time::Duration};

use anyhow::{Context, Result, bail};

use crate::{ADMIN_TOKEN, Stack};

/// Examples per operation and phase.
const MAX_EXAMPLES: &str = "30";
/// Longest a request may take before schemathesis calls it a hang, and
/// longest any answer may take (its `max_response_time` check).
const REQUEST_TIMEOUT_SECS: &str = "10";
const MAX_RESPONSE_SECS: &str = "5";
/// Longest the whole run of one service may take.
const RUN_DEADLINE: Duration = Duration::from_secs(300);

/// The checks: no 5xx, every status, content type, header and body as
/// documented, schema-violating input refused, a method not routed is
/// 405, a secured operation refuses a request without its credential, a
/// documented required header is required; and ours (tests/fuzz/refusals.py):
/// every refusal carries a message.
const CHECKS: &str = "not_a_server_error,status_code_conformance,content_type_conformance,\
     response_headers_conformance,response_schema_conformance,negative_data_rejection,\
     missing_required_header,unsupported_method,allow_header_conformance,ignored_auth,\
     refusal_has_a_message";

/// What a run found.
pub struct Report {
    pub passed: bool,
    /// What it printed.
    pub output: String,
}

/// `SCHEMATHESIS_BIN`, else the project venv's.
fn bin() -> PathBuf {
    std::env::var_os("SCHEMATHESIS_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| stack::repo_root().join(".venv/bin/schemathesis"))
}

/// Runs schemathesis against `service` of `stack`, with the operator's
/// token on every request (`ignored_auth` drops it on purpose).
pub async fn schemathesis(stack: &Stack, service: &str) -> Result<Report> {
    schemathesis_at(&stack.url(service, ""), service).await
}

/// [`schemathesis`] against the HTTP API at `base` (which serves its
/// document at `/openapi.json`), named `name` in what it reports.
pub async fn schemathesis_at(base: &str, name: &str) -> Result<Report> {
    let service = name;
    let bin = bin();
    if !bin.exists() {
        bail!(
            "{} not found: run scripts/test.sh (it installs scripts/requirements-dev.txt into .venv) or set SCHEMATHESIS_BIN",
            bin.display()
        );
    }
    let seed = std::env::var("API_FUZZ_SEED").unwrap_or_else(|_| "20261206".into());
    let reports = stack::infra::scratch_dir("schemathesis")?;
    let root = stack::repo_root();
    let mut command = tokio::process::Command::new(&bin);
    command
        .arg("run")
        .arg(format!("{base}/openapi.json"))
        .args(["--url", base])
        .args(["--checks", CHECKS])
        .args(["--max-examples", MAX_EXAMPLES])
        .args(["--seed", &seed])
        .args(["--phases", "examples,coverage,fuzzing,stateful"])
        .args(["--request-timeout", REQUEST_TIMEOUT_SECS])
        .args(["--max-response-time", MAX_RESPONSE_SECS])
        .args(["--workers", "1"])
        .args(["--no-color"])
        .args(["--header", &format!("Authorization: Bearer {ADMIN_TOKEN}")])
        .args(["--report-dir", &reports.to_string_lossy()])
        .env("SCHEMATHESIS_HOOKS", "refusals")
        .env("PYTHONPATH", root.join("tests/fuzz"))
        .env("NO_COLOR", "1")
        .current_dir(&reports)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = command
        .spawn()
        .with_context(|| format!("spawn {}", bin.display()))?;
    let out = tokio::time::timeout(RUN_DEADLINE, child.wait_with_output())
        .await
        .with_context(|| format!("schemathesis against {service} ran past {RUN_DEADLINE:?}"))??;
    let _ = std::fs::remove_dir_all(&reports);
    Ok(Report {
        passed: out.status.success(),
        output: format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    })
}
