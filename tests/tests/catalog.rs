//! Prices the server owns: inventory's catalog (`PUT /products/{id}`)
//! reaches the order service as ProductPriced events on the catalog
//! stream, and every order line is priced from the order service's copy.

use std::time::Duration;

use anyhow::{Context, Result};
use common::{
    dlq::dlq_headers,
    product::{self, ProductPriced},
};
use reqwest::Method;
use saga_tests::{DEADLINE, Stack, assert_refused, eventually, order_body, raw_nats::RawNats};
use serde_json::{Value, json};
use uuid::Uuid;

/// The order service's catalog entry of `product`, once it has `version`.
async fn catalog_at(stack: &Stack, product: &str, version: i64) -> Result<Value> {
    let path = format!("/products/{product}");
    eventually(
        &format!("{product} v{version} in the catalog"),
        DEADLINE,
        || async {
            let (status, entry) = stack.get_json("order", &path).await?;
            Ok((status == 200 && entry["version"] == version).then_some(entry))
        },
    )
    .await
}

/// `POST /orders` of `body`: status and reply.
async fn post_order(stack: &Stack, body: Value) -> Result<(u16, Value)> {
    let (status, _, reply) = stack
        .call(Method::POST, "order", "/orders", Some(body), None)
        .await?;
    Ok((status, reply))
}

/// An order body whose lines send no price: `(product, quantity)`.
fn unpriced(customer: &str, lines: &[(&str, i64)]) -> Value {
    let mut body = order_body(customer, &[("x", 1, 1)], "US");
    body["lines"] = lines
        .iter()
        .map(|(p, q)| json!({ "productId": p, "quantity": q }))
        .collect();
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_is_priced_from_the_catalog_and_a_price_the_client_sends_must_be_it() -> Result<()>
{
    let stack = Stack::stocked(100_000, 10).await?;
    let (status, etag, product) = stack
        .call(
            Method::PUT,
            "inventory",
            "/products/widget",
            Some(json!({ "name": "Widget", "unitPrice": 1_250 })),
            None,
        )
        .await?;
    assert_eq!(status, 201, "{product}");
    assert_eq!(etag.as_deref(), Some("\"1\""));
    assert_eq!(product["version"], 1);
    let entry = catalog_at(&stack, "widget", 1).await?;
    assert_eq!(entry["unitPrice"], 1_250);
    assert_eq!(entry["name"], "Widget");

    // No price sent: the catalog's.
    let (status, order) = post_order(&stack, unpriced("alice", &[("widget", 2)])).await?;
    assert_eq!(status, 201, "{order}");
    assert_eq!(order["total"], 2_500);
    assert_eq!(order["lines"][0]["unitPrice"], 1_250);
    // The catalog's price sent: accepted.
    let (status, order) =
        post_order(&stack, order_body("alice", &[("widget", 1, 1_250)], "US")).await?;
    assert_eq!(status, 201, "{order}");
    // Any other price, 0 and the client's own discount included: refused,
    // and nothing is placed.
    for sent in [1, 1_249, 1_000_000] {
        let (status, reply) =
            post_order(&stack, order_body("alice", &[("widget", 1, sent)], "US")).await?;
        assert_refused(
            status,
            &reply,
            422,
            &format!(
                "lines[0].unitPrice {sent} is not the catalog price 1250 of product 'widget' (version 1)"
            ),
        );
    }
    let (status, reply) =
        post_order(&stack, order_body("alice", &[("widget", 1, 0)], "US")).await?;
    assert_refused(status, &reply, 422, "lines[0].unitPrice must be positive");
    // A product the catalog does not have: refused by name.
    let (status, reply) =
        post_order(&stack, unpriced("alice", &[("widget", 1), ("gizmo", 1)])).await?;
    assert_refused(
        status,
        &reply,
        422,
        "lines[1]: product 'gizmo' is not in the catalog",
    );
    let (status, reply) = stack.get_json("order", "/products/gizmo").await?;
    assert_refused(status, &reply, 404, "not in the catalog");
    assert_eq!(stack.rows("order", "orders").await?, 2);

    stack.settle().await?;
    assert_eq!(stack.balance("alice").await?, 100_000 - 2_500 - 1_250);
    stack.assert_invariants().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_price_change_while_a_saga_runs_does_not_change_what_it_charges() -> Result<()> {
    let mut stack = Stack::stocked(100_000, 10).await?;
    stack.price("widget", 1_000).await?;
    // Payment holds the saga back while the price changes.
    stack.stop_service("payment").await?;
    let (status, held) = post_order(&stack, unpriced("alice", &[("widget", 3)])).await?;
    assert_eq!(status, 201, "{held}");
    let held: Uuid = held["orderId"].as_str().context("orderId")?.parse()?;
    stack.price("widget", 4_000).await?;
    let (status, later) = post_order(&stack, unpriced("alice", &[("widget", 1)])).await?;
    assert_eq!(status, 201, "{later}");
    assert_eq!(later["total"], 4_000);
    stack.start_service("payment").await?;

    let order = stack.wait_for_outcome(held).await?;
    assert_eq!(order["status"], "CONFIRMED", "{order}");
    assert_eq!(order["total"], 3_000);
    stack.settle().await?;
    assert_eq!(stack.balance("alice").await?, 100_000 - 3_000 - 4_000);
    stack.assert_invariants().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inventory_keeps_its_catalog_data_behind_the_operator_token_and_versions() -> Result<()> {
    let stack = Stack::start_with(&["inventory", "order"]).await?;
    let put = |body: Value, if_match: Option<&'static str>| {
        let stack = &stack;
        async move {
            stack
                .call(
                    Method::PUT,
                    "inventory",
                    "/products/widget",
                    Some(body),
                    if_match,
                )
                .await
        }
    };
    let anonymous = reqwest::Client::new()
        .put(stack.url("inventory", "/products/widget"))
        .json(&json!({ "name": "Widget", "unitPrice": 100 }))
        .send()
        .await?;
    assert_eq!(anonymous.status().as_u16(), 401);
    for (body, message) in [
        (
            json!({ "name": "Widget", "unitPrice": 0 }),
            "unitPrice must be positive",
        ),
        (
            json!({ "name": "Widget", "unitPrice": -5 }),
            "unitPrice must be positive",
        ),
        (
            json!({ "name": "Widget", "unitPrice": 1_000_000_001i64 }),
            "unitPrice must be at most",
        ),
        (
            json!({ "name": " ", "unitPrice": 100 }),
            "name must not be empty",
        ),
        (
            json!({ "name": "x".repeat(201), "unitPrice": 100 }),
            "name must be at most 200",
        ),
        (
            json!({ "name": "Widget", "unitPrice": 100, "stock": 5 }),
            "unknown field `stock`",
        ),
        (json!({ "name": "Widget" }), "missing field `unitPrice`"),
    ] {
        let (status, _, reply) = put(body.clone(), None).await?;
        assert!(status == 422 || status == 400, "{body}: {status} {reply}");
        assert!(
            reply["error"]
                .as_str()
                .unwrap_or_default()
                .contains(message),
            "{body}: {reply}"
        );
    }
    let (status, _, _) = put(json!({ "name": "Widget", "unitPrice": 100 }), None).await?;
    assert_eq!(status, 201);
    let (status, _, reply) = put(json!({ "name": "Widget", "unitPrice": 200 }), None).await?;
    assert_refused(status, &reply, 428, "If-Match");
    let (status, _, reply) =
        put(json!({ "name": "Widget", "unitPrice": 200 }), Some("\"7\"")).await?;
    assert_refused(status, &reply, 412, "is at version 1, not 7");
    let (status, etag, reply) =
        put(json!({ "name": "Widget", "unitPrice": 200 }), Some("\"1\"")).await?;
    assert_eq!((status, etag.as_deref()), (200, Some("\"2\"")), "{reply}");
    // The same data again changes nothing and publishes nothing.
    let (status, etag, _) = put(json!({ "name": "Widget", "unitPrice": 200 }), Some("*")).await?;
    assert_eq!((status, etag.as_deref()), (200, Some("\"2\"")));
    let (status, reply) = stack.get_json("inventory", "/products/widget").await?;
    assert_eq!((status, &reply["unitPrice"]), (200, &json!(200)), "{reply}");
    let (status, reply) = stack.get_json("inventory", "/products/gadget").await?;
    assert_refused(status, &reply, 404, "no product 'gadget'");

    catalog_at(&stack, "widget", 2).await?;
    let catalog = stack.js.get_stream(stack.subjects.catalog_stream()).await?;
    // One message per product is kept: version 2's.
    let info = catalog.get_info().await?;
    assert_eq!(info.state.messages, 1);
    let last = catalog
        .get_last_raw_message_by_subject(&stack.subjects.product("widget"))
        .await?;
    let (envelope, priced) = ProductPriced::decode(&last.payload)?;
    assert_eq!((envelope.version, priced.unit_price), (2, 200));
    Ok(())
}

/// A ProductPriced as an operator (or a late replica) would publish it by hand.
fn priced(product: &str, unit_price: i64, version: i64) -> Vec<u8> {
    ProductPriced {
        product_id: product.into(),
        name: format!("{product} by hand"),
        unit_price,
    }
    .envelope(version, Uuid::now_v7())
    .to_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_events_late_repeated_or_malformed_never_take_a_price_back() -> Result<()> {
    let stack = Stack::start_with(&["order"]).await?;
    let mut nats = RawNats::connect(&stack.cli_url()).await?;
    let subject = stack.subjects.product("widget");
    nats.publish(&subject, &priced("widget", 2_000, 2)).await?;
    catalog_at(&stack, "widget", 2).await?;
    // Version 1 arrives late, and version 2 again under another event id.
    nats.publish(&subject, &priced("widget", 1_000, 1)).await?;
    nats.publish(&subject, &priced("widget", 2_500, 2)).await?;
    // Bad ones: dead-lettered with the reason, naming no saga. The stream
    // keeps one event per product: the next on the same subject replaces
    // the bad one unless the catalog has taken it first.
    nats.publish(&subject, &priced("widget", 0, 3)).await?;
    stack.wait_for_dead_letters(1).await?;
    nats.publish(&stack.subjects.product("gadget"), &priced("widget", 9, 4))
        .await?;
    nats.publish(&subject, b"{\"not\": \"an event\"}").await?;
    let letters = stack.wait_for_dead_letters(3).await?;
    let reasons: Vec<String> = letters
        .iter()
        .map(|(h, _)| {
            assert_eq!(
                h.get(dlq_headers::CONSUMER).map(|v| v.as_str()),
                Some("order-catalog")
            );
            assert!(h.get(dlq_headers::CORRELATION_ID).is_none());
            h.get(dlq_headers::REASON)
                .map(|v| v.as_str().to_string())
                .unwrap_or_default()
        })
        .collect();
    for expected in [
        "unitPrice must be positive",
        &format!("expected '{subject}'"),
        "not a valid event envelope",
    ] {
        assert!(
            reasons.iter().any(|r| r.contains(expected)),
            "{expected}: {reasons:?}"
        );
    }
    // Still version 2 at its first price; no saga came of any of it.
    let entry = catalog_at(&stack, "widget", 2).await?;
    assert_eq!(entry["unitPrice"], 2_000);
    let (_, sagas) = stack.get_json("order", "/sagas").await?;
    assert_eq!(sagas["sagas"], json!([]), "{sagas}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_catalog_is_rebuilt_from_the_stream_alone_while_it_keeps_answering() -> Result<()> {
    let stack = Stack::start_with(&["inventory", "order"]).await?;
    let products = ["widget", "a.b c", "gadget"];
    for (i, p) in products.iter().enumerate() {
        stack.price(p, 100 * (i as i64 + 1)).await?;
    }
    stack.price("widget", 150).await?;
    // Lost, changed by hand, and never there.
    let pool = stack.pool("order").await?;
    sqlx::query("DELETE FROM catalog WHERE product_id = 'gadget'")
        .execute(&pool)
        .await?;
    sqlx::query("UPDATE catalog SET unit_price = 1 WHERE product_id = 'a.b c'")
        .execute(&pool)
        .await?;
    sqlx::query(
        "INSERT INTO catalog (product_id, name, unit_price, version, event_id, priced_at, stream_seq)
         VALUES ('ghost', 'ghost', 5, 1, gen_random_uuid(), now(), 0)",
    )
    .execute(&pool)
    .await?;

    let reads = async {
        for _ in 0..50 {
            let (status, entry) = stack.get_json("order", "/products/widget").await?;
            anyhow::ensure!(
                status == 200,
                "widget unreadable during the rebuild: {entry}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    };
    // What `order rebuild-projection catalog` runs.
    let rebuild = async {
        let mut seen = Vec::new();
        let mut progress = |done: u64, total: u64| seen.push((done, total));
        let read =
            order::catalog::rebuild(&pool, &stack.js, &stack.subjects, &mut progress).await?;
        anyhow::ensure!(seen.last() == Some(&(3, 3)), "progress {seen:?}");
        Ok(read)
    };
    let (_, read) = tokio::try_join!(reads, rebuild)?;
    assert_eq!(read, 3);
    let rows: Vec<(String, i64, i64)> =
        sqlx::query_as("SELECT product_id, unit_price, version FROM catalog ORDER BY product_id")
            .fetch_all(&pool)
            .await?;
    assert_eq!(
        rows,
        vec![
            ("a.b c".to_string(), 200, 1),
            ("gadget".to_string(), 300, 1),
            ("widget".to_string(), 150, 2),
        ]
    );
    assert_eq!(
        stack.subjects.product("a.b c"),
        format!("{}.catalog.product.~612e622063", stack.prefix)
    );
    assert_eq!(product::subject_token("widget"), "widget");
    Ok(())
}
