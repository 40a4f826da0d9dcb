//! Operator endpoints (setting balances and stock, steering the payment
//! gateway, redriving dead letters, resolving an order) need the admin token: 401 with a message without it or with a
//! wrong one, and refused by a service that has none. Reads need nothing.

use anyhow::Result;
use reqwest::{Method, StatusCode};
use saga_tests::{ADMIN_TOKEN, Stack};
use serde_json::{Value, json};

/// `method path body` on `service`, with `token` as bearer if any.
async fn send(
    stack: &Stack,
    method: Method,
    service: &str,
    path: &str,
    body: Option<Value>,
    token: Option<&str>,
) -> Result<(StatusCode, Option<String>, Value)> {
    let mut request = reqwest::Client::new().request(method, stack.url(service, path));
    if let Some(body) = body {
        request = request.json(&body);
    }
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let r = request.send().await?;
    let challenge = r
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap_or_default().to_string());
    Ok((r.status(), challenge, r.json().await.unwrap_or(Value::Null)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_endpoints_and_customers_data_need_the_admin_token_and_stock_does_not()
-> Result<()> {
    let stack = Stack::stocked(10_000, 5).await?;
    let changes = [
        (
            Method::PUT,
            "payment",
            "/accounts/alice",
            json!({"balance": 1}),
        ),
        (
            Method::POST,
            "payment",
            "/accounts/alice/deposits",
            json!({"amount": 1}),
        ),
        (
            Method::PUT,
            "inventory",
            "/stock/widget",
            json!({"available": 1}),
        ),
        (
            Method::POST,
            "inventory",
            "/stock/widget/adjustments",
            json!({"delta": 1}),
        ),
        (
            Method::PUT,
            "payment",
            "/admin/gateway",
            json!({"all": {"charges": "fail"}}),
        ),
        (
            Method::POST,
            "order",
            "/orders/00000000-0000-0000-0000-000000000000/resolution",
            json!({"resolution": "manually-compensated", "note": "x", "operator": "ada"}),
        ),
    ];
    // The gateway's rules and what it holds for a payment are the
    // operator's to read too: they say whose charges fail.
    let operator_reads = [
        (Method::GET, "payment", "/admin/gateway", Value::Null),
        (
            Method::GET,
            "payment",
            "/admin/gateway/payments/00000000-0000-0000-0000-000000000000",
            Value::Null,
        ),
    ];
    for (method, service, path, body) in changes.iter().chain(&operator_reads) {
        let body = (!body.is_null()).then(|| body.clone());
        for (token, says) in [
            (None, "send Authorization: Bearer <ADMIN_TOKEN>"),
            (Some("not-the-token-at-all"), "wrong admin token"),
        ] {
            let (status, challenge, reply) =
                send(&stack, method.clone(), service, path, body.clone(), token).await?;
            assert_eq!(status, 401, "{method} {path} with {token:?}: {reply}");
            assert_eq!(challenge.as_deref(), Some("Bearer"));
            assert!(
                reply["error"].as_str().unwrap_or_default().contains(says),
                "{reply}"
            );
        }
    }
    // Nothing changed.
    assert_eq!(stack.balance("alice").await?, 10_000);
    assert_eq!(stack.stock("widget").await?, (5, 0));
    let (status, _, reply) = send(
        &stack,
        Method::GET,
        "inventory",
        "/stock/widget",
        None,
        None,
    )
    .await?;
    assert_eq!(status, 200, "a product's stock is public: {reply}");
    for (_, service, path, _) in &operator_reads {
        let (status, _, reply) =
            send(&stack, Method::GET, service, path, None, Some(ADMIN_TOKEN)).await?;
        assert_eq!(status, 200, "GET {path} with the token: {reply}");
    }

    // With the token: the gateway is told to decline alice's charges, from
    // the next order on, and her saga is cancelled.
    let rules = json!({"customers": {"alice": {"charges": "fail"}}});
    let (status, _, reply) = send(
        &stack,
        Method::PUT,
        "payment",
        "/admin/gateway",
        Some(rules),
        Some(ADMIN_TOKEN),
    )
    .await?;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["customers"]["alice"]["charges"], "fail");
    let id = stack.place("alice", &[("widget", 1, 100)], "US").await?;
    let order = stack.wait_for_outcome(id).await?;
    assert_eq!(order["status"], "CANCELLED");
    assert!(
        order["failureReason"]
            .as_str()
            .unwrap_or_default()
            .contains("by the gateway")
    );
    let (status, _, reply) = send(
        &stack,
        Method::PUT,
        "payment",
        "/admin/gateway",
        Some(json!({"all": {"latencyMs": 3600000}})),
        Some(ADMIN_TOKEN),
    )
    .await?;
    assert_eq!(status, 422, "bounded: {reply}");
    stack.assert_invariants().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_without_an_admin_token_refuses_every_operator() -> Result<()> {
    let mut stack = Stack::start_with(&[]).await?;
    stack
        .start_service_with("inventory", |l| l.config.admin_token = None)
        .await?;
    let (status, _, reply) = send(
        &stack,
        Method::PUT,
        "inventory",
        "/stock/widget",
        Some(json!({"available": 1})),
        Some(ADMIN_TOKEN),
    )
    .await?;
    assert_eq!(status, 401);
    assert!(
        reply["error"]
            .as_str()
            .unwrap_or_default()
            .contains("disabled"),
        "{reply}"
    );
    Ok(())
}
