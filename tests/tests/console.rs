//! The operator console (`sagactl console`) over HTTP: it acts only with
//! the admin token and answers CORS for the page's origin only; it refuses
//! what is malformed with a message; a dry run moves nothing; a retry
//! pressed twice at once refunds once; a dead letter of a saga that has
//! ended is refused unless forced.

use anyhow::Result;
use saga_tests::{
    ADMIN_TOKEN, DEADLINE, assert_refused, eventually,
    halted::{halted_refund, refunds_refused_stack_with_console, timeline_until},
};
use serde_json::{Value, json};

/// POSTs `body` to the console's `path` with `token` as the bearer.
async fn post(url: &str, token: Option<&str>, body: &Value) -> Result<(u16, Value)> {
    let mut request = reqwest::Client::new().post(url).json(body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let answer = request.send().await?;
    let status = answer.status().as_u16();
    Ok((status, answer.json().await.unwrap_or(Value::Null)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_acts_only_for_the_operator_and_answers_cors_for_the_page_only() -> Result<()> {
    let (stack, console) = refunds_refused_stack_with_console().await?;
    let (id, _) = halted_refund(&stack).await?;
    let retry = console.url(&format!("/sagas/{id}/retry"));
    let dry = json!({ "dryRun": true });

    let (status, body) = post(&retry, None, &dry).await?;
    assert_refused(
        status,
        &body,
        401,
        "send Authorization: Bearer <ADMIN_TOKEN>",
    );
    let (status, body) = post(&retry, Some("not-the-token-at-all"), &dry).await?;
    assert_refused(status, &body, 401, "wrong admin token");

    // Malformed asks are refused with what is wrong.
    let with = |path: &str| console.url(path);
    for (url, body, expected, message) in [
        (retry.clone(), json!({}), 422, "operator must not be empty"),
        (
            retry.clone(),
            json!({ "operator": "ada" }),
            422,
            "note must not be empty",
        ),
        (
            retry.clone(),
            json!({ "operator": "ada", "note": "x\u{0}" }),
            422,
            "control characters",
        ),
        (
            retry.clone(),
            json!({ "dryRun": true, "extra": 1 }),
            422,
            "unknown field",
        ),
        (
            with("/sagas/nope/retry"),
            dry.clone(),
            400,
            "is not a saga id",
        ),
        (
            with("/dead-letters/0/redrive"),
            dry.clone(),
            400,
            "is not a dead letter's sequence",
        ),
        (
            with("/dead-letters/-3/redrive"),
            dry.clone(),
            400,
            "is not a dead letter's sequence",
        ),
        (
            with("/dead-letters/999999/redrive"),
            dry.clone(),
            404,
            "no dead letter 999999",
        ),
        (
            with(&format!("/sagas/{}/retry", uuid::Uuid::now_v7())),
            dry.clone(),
            404,
            "has no dead letter",
        ),
    ] {
        let (status, answer) = post(&url, Some(ADMIN_TOKEN), &body).await?;
        assert_refused(status, &answer, expected, message);
    }

    // The page's origin may call it from a browser; another may not.
    let page_origin = stack.url("order", "");
    let preflight = |origin: String| {
        reqwest::Client::new()
            .request(reqwest::Method::OPTIONS, retry.clone())
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization,content-type",
            )
            .send()
    };
    let admitted = preflight(page_origin.clone()).await?;
    assert!(admitted.status().is_success(), "{}", admitted.status());
    assert_eq!(
        admitted.headers()["access-control-allow-origin"],
        page_origin.as_str()
    );
    let allowed = admitted.headers()["access-control-allow-headers"]
        .to_str()?
        .to_ascii_lowercase();
    assert!(allowed.contains("authorization"), "{allowed}");
    let stranger = preflight("http://evil.example".into()).await?;
    assert!(
        stranger
            .headers()
            .get("access-control-allow-origin")
            .is_none(),
        "{:?}",
        stranger.headers()
    );

    let health = reqwest::get(console.url("/health/ready")).await?;
    assert_eq!(health.status(), 200);
    // Refusals and dry runs moved nothing.
    assert_eq!(stack.order(id).await?["status"], "REQUIRES_INTERVENTION");
    assert_eq!(stack.balance("alice").await?, 7_500);
    console.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_pressed_twice_at_once_refunds_once() -> Result<()> {
    let (stack, console) = refunds_refused_stack_with_console().await?;
    let (id, _) = halted_refund(&stack).await?;
    let retry = console.url(&format!("/sagas/{id}/retry"));

    // A dry run says what would go out, twice alike, and moves nothing.
    let (status, first) = post(&retry, Some(ADMIN_TOKEN), &json!({ "dryRun": true })).await?;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["results"][0]["outcome"], "would redrive", "{first}");
    assert_eq!(first["notRedriven"], 0, "{first}");
    let (_, second) = post(&retry, Some(ADMIN_TOKEN), &json!({ "dryRun": true })).await?;
    assert_eq!(first, second);
    assert_eq!(stack.balance("alice").await?, 7_500);

    // The gateway is back; two operators press retry at the same moment.
    let (status, rules) = stack.put("payment", "/admin/gateway", json!({})).await?;
    assert_eq!(status, 200, "{rules}");
    let ask = json!({ "operator": "ada", "note": "gateway back" });
    let (a, b) = tokio::join!(
        post(&retry, Some(ADMIN_TOKEN), &ask),
        post(&retry, Some(ADMIN_TOKEN), &ask)
    );
    let mut answers = [a?, b?];
    answers.sort_by_key(|(status, _)| *status);
    let [(ok, done), (missing, none)] = answers;
    assert_eq!(ok, 200, "{done}");
    assert_eq!(done["results"][0]["outcome"], "redrove", "{done}");
    assert_refused(missing, &none, 404, "has no dead letter");

    let entries = timeline_until(&stack, id, "OrderCancelled").await?;
    let refunds = entries
        .iter()
        .filter(|e| e["eventType"] == "PaymentRefunded")
        .count();
    assert_eq!(refunds, 1, "{entries:#?}");
    let redrives = entries.iter().filter(|e| e["kind"] == "operator").count();
    assert_eq!(redrives, 1, "{entries:#?}");
    stack.settle().await?;
    assert_eq!(stack.balance("alice").await?, 10_000);
    stack.assert_invariants().await?;
    console.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_of_a_saga_resolved_by_hand_is_refused_unless_forced() -> Result<()> {
    let (stack, console) = refunds_refused_stack_with_console().await?;
    let (id, entries) = halted_refund(&stack).await?;
    let seq = entries
        .iter()
        .find(|e| e["kind"] == "dead_letter")
        .and_then(|e| e["streamSeq"].as_u64())
        .expect("a dead letter");
    stack
        .sagactl(&format!(
            "resolve {id} --manually-compensated --note \"refunded by hand\" --operator ada"
        ))
        .await?;
    // At once, before the read model has caught up: the order service
    // answers from its event store when asked for the latest state, and
    // the console asks for it, so the redrive is refused, dry run or not.
    let (status, latest) = stack
        .get_json("order", &format!("/orders/{id}?latest=true"))
        .await?;
    assert_eq!(
        (status, &latest["status"]),
        (200, &json!("MANUALLY_COMPENSATED")),
        "{latest}"
    );
    let (status, body) = stack
        .get_json("order", &format!("/orders/{id}?latest=true&minVersion=1"))
        .await?;
    assert_refused(
        status,
        &body,
        400,
        "at most one of atVersion, asOf, minVersion and latest",
    );
    let redrive = console.url(&format!("/dead-letters/{seq}/redrive"));
    for ask in [
        json!({ "dryRun": true }),
        json!({ "operator": "ada", "note": "again" }),
    ] {
        let (status, answer) = post(&redrive, Some(ADMIN_TOKEN), &ask).await?;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(
            answer["results"][0]["outcome"], "refused",
            "{ask}: {answer}"
        );
        assert_eq!(answer["notRedriven"], 1, "{answer}");
        let why = answer["results"][0]["detail"].as_str().unwrap_or_default();
        assert!(why.contains("has ended (MANUALLY_COMPENSATED)"), "{why}");
    }
    eventually("the refund by hand to be recorded", DEADLINE, || async {
        Ok((stack.balance("alice").await? == 10_000).then_some(()))
    })
    .await?;
    // The gateway is back: a redrive now would refund a second time.
    let (status, rules) = stack.put("payment", "/admin/gateway", json!({})).await?;
    assert_eq!(status, 200, "{rules}");
    // Forced, the redrive goes out; the payment service, which recorded the
    // refund by hand, refunds nothing more.
    let (status, answer) = post(
        &redrive,
        Some(ADMIN_TOKEN),
        &json!({ "operator": "ada", "note": "clearing", "force": "clearing the stream" }),
    )
    .await?;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["results"][0]["outcome"], "redrove", "{answer}");
    stack.settle().await?;
    assert_eq!(stack.balance("alice").await?, 10_000);
    assert_eq!(stack.order(id).await?["status"], "MANUALLY_COMPENSATED");
    stack.assert_invariants().await?;
    console.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_serves_its_committed_document_and_schemathesis_finds_nothing_wrong()
-> Result<()> {
    let (stack, console) = refunds_refused_stack_with_console().await?;
    let served: Value = reqwest::get(console.url("/openapi.json"))
        .await?
        .error_for_status()?
        .json()
        .await?;
    let path = format!("{}/console.json", stack::openapi::DIR);
    let committed: Value =
        serde_json::from_str(&std::fs::read_to_string(stack::repo_root().join(&path))?)?;
    assert!(
        served == committed,
        "the console serves another document than {path}: run `cargo run -p stack -- contracts --write`"
    );
    // Against a halted saga's dead letter too: every answer documented,
    // none a 5xx, each refusal with a message.
    halted_refund(&stack).await?;
    let report = saga_tests::api_fuzz::schemathesis_at(&console.url, "console").await?;
    println!("{}", report.output);
    assert!(report.passed, "schemathesis:\n{}", report.output);
    console.stop().await
}
