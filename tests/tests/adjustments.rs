//! Stock and balances change by deltas that compose with the sagas running
//! at the same time; an absolute overwrite must name the version it read.

use anyhow::{Context, Result};
use saga_tests::{Stack, order_body};
use serde_json::{Value, json};

async fn send(req: reqwest::RequestBuilder) -> Result<(u16, Option<String>, Value)> {
    let r = req.send().await?;
    let status = r.status().as_u16();
    let etag = r
        .headers()
        .get("etag")
        .map(|v| v.to_str().unwrap_or_default().to_string());
    Ok((status, etag, r.json().await.unwrap_or(Value::Null)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restocks_racing_reservations_lose_no_units_and_top_ups_racing_charges_lose_no_money()
-> Result<()> {
    let stack = Stack::start().await?;
    stack.set_balance("alice", 100_000).await?;
    stack.set_stock("widget", 20).await?;

    // 20 orders of one widget each race 20 restocks of one and 20 deposits of 50.
    let body = order_body("alice", &[("widget", 1, 100)], "US");
    let orders = (0..20).map(|_| stack.place_order(&body));
    let restocks = (0..20).map(|_| {
        send(
            stack
                .http
                .post(stack.url("inventory", "/stock/widget/adjustments"))
                .json(&json!({"delta": 1})),
        )
    });
    let deposits = (0..20).map(|_| {
        send(
            stack
                .http
                .post(stack.url("payment", "/accounts/alice/deposits"))
                .json(&json!({"amount": 50})),
        )
    });
    let (ids, restocked, deposited) = tokio::try_join!(
        futures::future::try_join_all(orders),
        futures::future::try_join_all(restocks),
        futures::future::try_join_all(deposits),
    )?;
    assert!(restocked.iter().all(|(s, _, _)| *s == 200), "{restocked:?}");
    assert!(deposited.iter().all(|(s, _, _)| *s == 200), "{deposited:?}");
    for id in ids {
        assert_eq!(stack.wait_for_outcome(id).await?["status"], "CONFIRMED");
    }
    stack.settle().await?;
    assert_eq!(stack.stock("widget").await?, (20 + 20 - 20, 20));
    assert_eq!(stack.balance("alice").await?, 100_000 + 20 * 50 - 20 * 100);
    stack
        .assert_invariants(&[("alice", 100_000 + 20 * 50)], &[("widget", 40)])
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absolute_put_must_match_the_version_it_read() -> Result<()> {
    let stack = Stack::start().await?;
    stack.set_balance("alice", 10_000).await?;
    stack.set_stock("widget", 5).await?;

    // Read, then a charge happens, then the stale overwrite is refused.
    let (status, etag, account) =
        send(stack.http.get(stack.url("payment", "/accounts/alice"))).await?;
    assert_eq!(status, 200);
    let etag = etag.context("an ETag")?;
    assert_eq!(etag, format!("\"{}\"", account["version"]));
    let id = stack
        .place_order(&order_body("alice", &[("widget", 1, 1_000)], "US"))
        .await?;
    stack.wait_for_outcome(id).await?;
    let put = |balance: i64, if_match: Option<&str>| {
        let mut req = stack
            .http
            .put(stack.url("payment", "/accounts/alice"))
            .json(&json!({ "balance": balance }));
        if let Some(tag) = if_match {
            req = req.header("If-Match", tag);
        }
        send(req)
    };
    let (status, _, v) = put(20_000, Some(&etag)).await?;
    assert_eq!(status, 412, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("changed since"),
        "{v}"
    );
    assert_eq!(stack.balance("alice").await?, 9_000);

    let (status, _, v) = put(20_000, None).await?;
    assert_eq!(status, 428, "{v}");
    assert!(v["error"].as_str().unwrap().contains("If-Match"), "{v}");

    let (_, fresh, _) = send(stack.http.get(stack.url("payment", "/accounts/alice"))).await?;
    let (status, _, v) = put(20_000, fresh.as_deref()).await?;
    assert_eq!((status, v["balance"].as_i64()), (200, Some(20_000)), "{v}");
    let (status, _, _) = put(30_000, Some("*")).await?;
    assert_eq!(status, 200);
    let (status, _, v) = put(1, Some("not-a-tag")).await?;
    assert_eq!(status, 400, "{v}");

    // The same for stock; and a new product is created without a precondition.
    let (status, etag, _) = send(stack.http.get(stack.url("inventory", "/stock/widget"))).await?;
    assert_eq!(status, 200);
    let id = stack
        .place_order(&order_body("alice", &[("widget", 1, 1_000)], "US"))
        .await?;
    stack.wait_for_outcome(id).await?;
    let (status, _, v) = send(
        stack
            .http
            .put(stack.url("inventory", "/stock/widget"))
            .header("If-Match", etag.context("an ETag")?)
            .json(&json!({"available": 100})),
    )
    .await?;
    assert_eq!(status, 412, "{v}");
    let (status, _, _) = send(
        stack
            .http
            .put(stack.url("inventory", "/stock/gadget"))
            .json(&json!({"available": 3})),
    )
    .await?;
    assert_eq!(status, 201);
    // A version named for something that does not exist is not a creation.
    let (status, _, v) = send(
        stack
            .http
            .put(stack.url("inventory", "/stock/gizmo"))
            .header("If-Match", "\"1\"")
            .json(&json!({"available": 3})),
    )
    .await?;
    assert_eq!(status, 412, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("does not exist"),
        "{v}"
    );

    // Deltas have bounds and say why.
    let (status, _, v) = send(
        stack
            .http
            .post(stack.url("inventory", "/stock/gadget/adjustments"))
            .json(&json!({"delta": -4})),
    )
    .await?;
    assert_eq!(status, 409, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("only 3 available"),
        "{v}"
    );
    let (status, _, _) = send(
        stack
            .http
            .post(stack.url("payment", "/accounts/nobody/deposits"))
            .json(&json!({"amount": 5})),
    )
    .await?;
    assert_eq!(status, 404);
    let (status, _, v) = send(
        stack
            .http
            .post(stack.url("payment", "/accounts/alice/deposits"))
            .json(&json!({"amount": -5})),
    )
    .await?;
    assert_eq!(status, 422, "{v}");
    Ok(())
}
