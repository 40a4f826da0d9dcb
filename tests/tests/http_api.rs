//! The HTTP APIs: bad input gets a 4xx with a message, reads and paging work.

use anyhow::{Context, Result};
use saga_tests::{Stack, order_body};
use serde_json::{Value, json};

async fn post(stack: &Stack, body: &str) -> Result<(u16, Value)> {
    let r = stack
        .http
        .post(stack.url("order", "/orders"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await?;
    Ok((r.status().as_u16(), r.json().await.unwrap_or(Value::Null)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_orders_are_refused_with_a_message_and_start_no_saga() -> Result<()> {
    let stack = Stack::start().await?;
    stack.price("widget", 100).await?;
    let valid = order_body("alice", &[("widget", 1, 100)], "US");

    let cases: Vec<(String, u16, &str)> = vec![
        (
            "{not json".into(),
            400,
            "Failed to parse the request body as JSON",
        ),
        (
            json!({"customerId": "alice"}).to_string(),
            422,
            "missing field `lines`",
        ),
        (
            {
                let mut b = valid.clone();
                b["lines"] = json!([]);
                b.to_string()
            },
            422,
            "lines must not be empty",
        ),
        (
            {
                let mut b = valid.clone();
                b["lines"][0]["quantity"] = json!(0);
                b.to_string()
            },
            422,
            "lines[0].quantity must be positive",
        ),
        (
            {
                let mut b = valid.clone();
                b["lines"][0]["unitPrice"] = json!(9.99);
                b.to_string()
            },
            422,
            "unitPrice",
        ),
        (
            {
                let mut b = valid.clone();
                b["customerId"] = json!("  ");
                b.to_string()
            },
            422,
            "customerId must not be empty",
        ),
        (
            {
                let mut b = valid.clone();
                b["shippingAddress"]["street"] = json!("");
                b.to_string()
            },
            422,
            "shippingAddress.street must not be empty",
        ),
        (
            {
                let mut b = valid.clone();
                b["lines"][0]["quantity"] = json!(i64::MAX);
                b["lines"][0]["unitPrice"] = json!(2);
                b.to_string()
            },
            422,
            "lines[0].quantity must be at most 1000000",
        ),
        (
            {
                let mut b = valid.clone();
                b["discount"] = json!(5);
                b.to_string()
            },
            422,
            "unknown field `discount`",
        ),
    ];
    for (body, status, message) in cases {
        let (got, v) = post(&stack, &body).await?;
        assert_eq!(got, status, "{body} -> {v}");
        let error = v["error"].as_str().unwrap_or_default();
        assert!(
            error.contains(message),
            "{body}: expected '{message}' in '{error}'"
        );
    }
    assert_eq!(stack.rows("order", "order_events").await?, 0);
    assert_eq!(stack.rows("order", "outbox").await?, 0);

    let (status, v) = stack.get_json("order", "/orders/not-a-uuid").await?;
    assert_eq!(
        (status, v["error"].as_str().unwrap()),
        (400, "'not-a-uuid' is not an order id (a UUID)")
    );
    let (status, _) = stack
        .get_json("order", &format!("/orders/{}", uuid::Uuid::now_v7()))
        .await?;
    assert_eq!(status, 404);
    let (status, v) = stack.get_json("order", "/orders?status=LOST").await?;
    assert_eq!(status, 400);
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("REQUIRES_INTERVENTION")
    );
    let (status, _) = stack.get_json("order", "/orders?limit=0").await?;
    assert_eq!(status, 400);

    let (status, _) = stack
        .put("payment", "/accounts/alice", json!({"balance": -1}))
        .await?;
    assert_eq!(status, 422);
    let (status, _) = stack
        .put("inventory", "/stock/widget", json!({"available": "many"}))
        .await?;
    assert_eq!(status, 422);
    let (status, _) = stack.get_json("payment", "/accounts/nobody").await?;
    assert_eq!(status, 404);
    let (status, _) = stack.get_json("inventory", "/stock/nothing").await?;
    assert_eq!(status, 404);
    let (status, _) = stack
        .get_json("shipping", &format!("/shipments/{}", uuid::Uuid::now_v7()))
        .await?;
    assert_eq!(status, 404);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_are_listed_by_customer_and_status_in_pages() -> Result<()> {
    let stack = Stack::stocked(10_000, 100).await?;
    let mut confirmed = Vec::new();
    for _ in 0..3 {
        confirmed.push(stack.place("alice", &[("widget", 1, 100)], "US").await?);
    }
    let cancelled = stack.place("alice", &[("widget", 1, 100)], "ZZ").await?;
    let other = stack.place("bob", &[("widget", 1, 100)], "US").await?;
    for id in confirmed.iter().chain([&cancelled, &other]) {
        stack.wait_for_outcome(*id).await?;
    }
    // Lists come from the read model, a moment behind the event store.
    stack.projected().await?;

    let (_, page) = stack
        .get_json("order", "/orders?customerId=alice&status=CONFIRMED&limit=2")
        .await?;
    assert_eq!(page["orders"].as_array().unwrap().len(), 2);
    assert_eq!(page["nextOffset"], 2);
    let (_, rest) = stack
        .get_json(
            "order",
            "/orders?customerId=alice&status=CONFIRMED&limit=2&offset=2",
        )
        .await?;
    assert_eq!(rest["orders"].as_array().unwrap().len(), 1);
    assert!(rest["nextOffset"].is_null());
    let (_, c) = stack
        .get_json("order", "/orders?customerId=alice&status=CANCELLED")
        .await?;
    assert_eq!(c["orders"][0]["orderId"], cancelled.to_string());
    let (_, all) = stack.get_json("order", "/orders").await?;
    assert_eq!(all["orders"].as_array().unwrap().len(), 5);

    // The account shows its payments; the order shows its own history.
    let (_, account) = stack.get_json("payment", "/accounts/alice").await?;
    assert_eq!(account["payments"].as_array().unwrap().len(), 4);
    let (_, events) = stack
        .get_json("order", &format!("/orders/{cancelled}/events"))
        .await?;
    let types: Vec<&str> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["eventType"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["OrderPlaced", "OrderCancelled"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_placement_with_the_same_idempotency_key_places_one_order() -> Result<()> {
    let stack = Stack::stocked(10_000, 10).await?;
    stack.price("widget", 100).await?;
    let body = order_body("alice", &[("widget", 1, 100)], "US");
    let send = || {
        stack
            .http
            .post(stack.url("order", "/orders"))
            .header("Idempotency-Key", "checkout-42")
            .json(&body)
            .send()
    };

    let first = send().await?;
    assert_eq!(first.status().as_u16(), 201);
    let first: Value = first.json().await?;
    let second = send().await?;
    assert_eq!(second.status().as_u16(), 200);
    let second: Value = second.json().await?;
    assert_eq!(first["orderId"], second["orderId"]);

    stack
        .wait_for_outcome(first["orderId"].as_str().unwrap().parse()?)
        .await?;
    stack.settle().await?;
    assert_eq!(stack.rows("order", "orders").await?, 1);
    assert_eq!(stack.balance("alice").await?, 10_000 - 100);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_reports_each_dependency() -> Result<()> {
    let stack = Stack::start().await?;
    for s in saga_tests::SERVICES {
        let (status, v) = stack.get_json(s, "/health/ready").await?;
        assert_eq!(status, 200, "{s}: {v}");
        assert_eq!(
            v["checks"],
            json!({"postgres": "ok", "redis": "ok", "nats": "ok"})
        );
        let (status, _) = stack.get_json(s, "/health/live").await?;
        assert_eq!(status, 200);
    }
    Ok(())
}

/// A client that sends more than the body limit gets the 413 and its
/// message, not a connection reset in the middle of its upload: the rest of
/// a moderately oversized body is read and discarded before the answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_body_gets_a_413_not_a_reset() -> Result<()> {
    let stack = Stack::start_with(&["order", "payment"]).await?;
    for (service, path) in [("order", "/orders"), ("payment", "/accounts/alice")] {
        for size in [300 << 10, 1 << 20, 4 << 20] {
            let body = format!("{{\"pad\": \"{}\"}}", "x".repeat(size));
            let method = if service == "order" { "POST" } else { "PUT" };
            let response = stack
                .http
                .request(method.parse()?, stack.url(service, path))
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .with_context(|| format!("{method} {path} with {size} bytes"))?;
            assert_eq!(response.status().as_u16(), 413, "{path} {size}");
            let v: Value = response.json().await?;
            assert!(
                v["error"].as_str().unwrap_or_default().contains("bytes"),
                "{v}"
            );
        }
    }
    Ok(())
}

/// Every answer carries a request id: the caller's when it is a sane one,
/// else a new one; and every request is counted and timed by route (its
/// pattern, not its path) and status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_has_an_id_and_is_counted_by_route_and_status() -> Result<()> {
    let stack = Stack::start().await?;
    let unknown = uuid::Uuid::now_v7();
    let get = |path: String, id: Option<String>| {
        let mut request = stack.http.get(stack.url("order", &path));
        if let Some(id) = id {
            request = request.header("x-request-id", id);
        }
        async move {
            let r = request.send().await?;
            let id = r
                .headers()
                .get("x-request-id")
                .context("no x-request-id in the answer")?
                .to_str()?
                .to_string();
            Ok::<_, anyhow::Error>((r.status().as_u16(), id))
        }
    };
    let (status, id) = get(format!("/orders/{unknown}"), Some("trace-me-42".into())).await?;
    assert_eq!((status, id.as_str()), (404, "trace-me-42"));
    let (_, made) = get("/health/live".into(), None).await?;
    assert!(uuid::Uuid::parse_str(&made).is_ok(), "{made}");
    for forged in ["x".repeat(129), "a b".into(), "<script>".into()] {
        let (_, replaced) = get("/health/live".into(), Some(forged.clone())).await?;
        assert_ne!(replaced, forged);
        assert!(uuid::Uuid::parse_str(&replaced).is_ok(), "{replaced}");
    }

    let metrics = stack.metrics("order").await?;
    let by = |route: &str, status: &str| {
        metrics.sum(
            "saga_http_requests_total",
            &[
                ("service", "order"),
                ("method", "GET"),
                ("route", route),
                ("status", status),
            ],
        )
    };
    assert_eq!(by("/orders/{orderId}", "404"), 1.0);
    assert!(by("/health/live", "200") >= 4.0);
    assert!(
        metrics.has(
            "saga_http_request_seconds_count",
            &[("route", "/orders/{orderId}"), ("status", "404")]
        ),
        "the latency histogram"
    );
    // An unknown path is counted as unmatched: paths never become labels.
    let r = stack
        .http
        .get(stack.url("order", &format!("/nope/{unknown}")))
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 404);
    let metrics = stack.metrics("order").await?;
    assert!(metrics.has("saga_http_requests_total", &[("route", "unmatched")]));
    assert!(!format!("{metrics:?}").contains(&unknown.to_string()));
    Ok(())
}
