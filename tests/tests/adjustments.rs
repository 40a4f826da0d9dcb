//! Stock and balances change by deltas that compose with the sagas running
//! at the same time; an absolute overwrite must name the version it read.

use anyhow::{Context, Result};
use reqwest::Method;
use saga_tests::{Stack, assert_refused, order_body};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restocks_racing_reservations_lose_no_units_and_top_ups_racing_charges_lose_no_money()
-> Result<()> {
    let stack = Stack::stocked(100_000, 20).await?;

    // 20 orders of one widget each race 20 restocks of one and 20 deposits of 50.
    let body = order_body("alice", &[("widget", 1, 100)], "US");
    let orders = (0..20).map(|_| stack.place_order(&body));
    let post = |service, path, body| stack.call(Method::POST, service, path, Some(body), None);
    let restocks = (0..20).map(|_| {
        post(
            "inventory",
            "/stock/widget/adjustments",
            json!({"delta": 1}),
        )
    });
    let deposits =
        (0..20).map(|_| post("payment", "/accounts/alice/deposits", json!({"amount": 50})));
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
        .assert_invariants_from(&[("alice", 100_000 + 20 * 50)], &[("widget", 40)])
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absolute_put_must_match_the_version_it_read() -> Result<()> {
    let stack = Stack::stocked(10_000, 5).await?;

    // Read, then a charge happens, then the stale overwrite is refused.
    let (status, etag, account) = stack
        .call(Method::GET, "payment", "/accounts/alice", None, None)
        .await?;
    assert_eq!(status, 200);
    let etag = etag.context("an ETag")?;
    assert_eq!(etag, format!("\"{}\"", account["version"]));
    let id = stack.place("alice", &[("widget", 1, 1_000)], "US").await?;
    stack.wait_for_outcome(id).await?;
    let stack = &stack;
    let put = |balance: i64, if_match: Option<String>| async move {
        let body = json!({ "balance": balance });
        stack
            .call(
                Method::PUT,
                "payment",
                "/accounts/alice",
                Some(body),
                if_match.as_deref(),
            )
            .await
    };
    let (status, _, v) = put(20_000, Some(etag.clone())).await?;
    assert_refused(status, &v, 412, "changed since");
    assert_eq!(stack.balance("alice").await?, 9_000);

    let (status, _, v) = put(20_000, None).await?;
    assert_refused(status, &v, 428, "If-Match");

    let (_, fresh, _) = stack
        .call(Method::GET, "payment", "/accounts/alice", None, None)
        .await?;
    let (status, _, v) = put(20_000, fresh).await?;
    assert_eq!((status, v["balance"].as_i64()), (200, Some(20_000)), "{v}");
    let (status, _, _) = put(30_000, Some("*".into())).await?;
    assert_eq!(status, 200);
    let (status, _, v) = put(1, Some("not-a-tag".into())).await?;
    assert_eq!(status, 400, "{v}");

    // The same for stock; and a new product is created without a precondition.
    let (status, etag, _) = stack
        .call(Method::GET, "inventory", "/stock/widget", None, None)
        .await?;
    assert_eq!(status, 200);
    let id = stack.place("alice", &[("widget", 1, 1_000)], "US").await?;
    stack.wait_for_outcome(id).await?;
    let (status, _, v) = stack
        .call(
            Method::PUT,
            "inventory",
            "/stock/widget",
            Some(json!({"available": 100})),
            Some(&etag.context("an ETag")?),
        )
        .await?;
    assert_eq!(status, 412, "{v}");
    // Created without a precondition; refusals that say why, in order.
    type Case<'a> = (
        Method,
        &'a str,
        &'a str,
        Value,
        Option<&'a str>,
        u16,
        &'a str,
    );
    let cases: [Case; 5] = [
        (
            Method::PUT,
            "inventory",
            "/stock/gadget",
            json!({"available": 3}),
            None,
            201,
            "",
        ),
        // A version named for something that does not exist is not a creation.
        (
            Method::PUT,
            "inventory",
            "/stock/gizmo",
            json!({"available": 3}),
            Some("\"1\""),
            412,
            "does not exist",
        ),
        // Deltas have bounds and say why.
        (
            Method::POST,
            "inventory",
            "/stock/gadget/adjustments",
            json!({"delta": -4}),
            None,
            409,
            "only 3 available",
        ),
        (
            Method::POST,
            "payment",
            "/accounts/nobody/deposits",
            json!({"amount": 5}),
            None,
            404,
            "",
        ),
        (
            Method::POST,
            "payment",
            "/accounts/alice/deposits",
            json!({"amount": -5}),
            None,
            422,
            "",
        ),
    ];
    for (method, service, path, body, if_match, expected, message) in cases {
        let case = format!("{method} {path} {body}");
        let (status, _, v) = stack
            .call(method, service, path, Some(body), if_match)
            .await?;
        assert_eq!(status, expected, "{case}: {v}");
        let error = v["error"].as_str().unwrap_or_default();
        assert!(error.contains(message), "{case}: {v}");
    }
    Ok(())
}
