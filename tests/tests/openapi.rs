//! The OpenAPI documents: each service serves at `GET /openapi.json` the
//! document its handlers generate, the one committed under
//! common/contracts/openapi/; and schemathesis, driven by it against the
//! live services, finds no 5xx, no answer outside the document, no
//! refusal without a message and no hang.

use anyhow::{Context, Result, ensure};
use saga_tests::{ADMIN_TOKEN, Stack};
use serde_json::Value;

const SERVICES: [&str; 4] = ["order", "payment", "inventory", "shipping"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_serves_the_document_its_handlers_generate() -> Result<()> {
    let stack = Stack::start().await?;
    for service in SERVICES {
        let served: Value = stack
            .http
            .get(stack.url(service, "/openapi.json"))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let path = format!("{}/{service}.json", stack::openapi::DIR);
        let committed: Value = serde_json::from_str(
            &std::fs::read_to_string(stack::repo_root().join(&path))
                .with_context(|| format!("read {path}"))?,
        )?;
        ensure!(
            served == committed,
            "{service} serves another document than {path}: run `cargo run -p stack -- contracts --write`"
        );
        ensure!(
            served["openapi"]
                .as_str()
                .is_some_and(|v| v.starts_with("3.1")),
            "{service}: OpenAPI 3.1"
        );
        // Every documented route is routed: a GET of each answers, and not
        // with the router's "no route".
        for (route, item) in served["paths"].as_object().context("paths")? {
            if item.get("get").is_none() || route.contains('{') {
                continue;
            }
            let answer = stack
                .http
                .get(stack.url(service, route))
                .bearer_auth(ADMIN_TOKEN)
                .send()
                .await?;
            let status = answer.status();
            let body = answer.text().await?;
            ensure!(
                !body.contains("no route"),
                "{service} GET {route}: {status} {body}"
            );
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_error_no_undocumented_answer_and_no_hang() -> Result<()> {
    let stack = Stack::start().await?;
    stack.price("widget", 100).await?;
    let mut failed = Vec::new();
    for service in SERVICES {
        let report = saga_tests::api_fuzz::schemathesis(&stack, service).await?;
        println!("{service}:\n{}", report.output);
        if !report.passed {
            failed.push(format!("{service}:\n{}", report.output));
        }
    }
    ensure!(
        failed.is_empty(),
        "schemathesis failed:\n{}",
        failed.join("\n")
    );
    stack.assert_invariants().await?;
    Ok(())
}
