//! The demo `stack up` ends with: one order that is confirmed, and one that
//! shipping refuses, so its payment is refunded and its stock released.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::local::Local;

const CUSTOMER: &str = "demo-alice";
const PRODUCT: &str = "demo-widget";
const BALANCE: i64 = 10_000;
const UNIT_PRICE: i64 = 1_250;
const QUANTITY: i64 = 2;

/// Runs the demo against the running local stack; `Ok(false)` when an order
/// did not end as expected within `timeout`.
pub async fn run(local: &Local, timeout: Duration) -> Result<bool> {
    // The demo arranges balances and stock: an operator's changes.
    let mut operator = reqwest::header::HeaderMap::new();
    operator.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {}", local.admin_token()?).parse()?,
    );
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .default_headers(operator)
        .build()?;
    let payment = local.service_url("payment");
    let inventory = local.service_url("inventory");
    println!(
        "\n==> demo: customer {CUSTOMER} gets a balance of {BALANCE}, product {PRODUCT} a stock of 100 and a price of {UNIT_PRICE}"
    );
    // If-Match: * sets them whatever they were: each run starts from the same state.
    send(
        http.put(format!("{payment}/accounts/{CUSTOMER}"))
            .header("If-Match", "*")
            .json(&json!({ "balance": BALANCE })),
    )
    .await?;
    send(
        http.put(format!("{inventory}/stock/{PRODUCT}"))
            .header("If-Match", "*")
            .json(&json!({ "available": 100 })),
    )
    .await?;
    send(
        http.put(format!("{inventory}/products/{PRODUCT}"))
            .header("If-Match", "*")
            .json(&json!({ "name": "Demo widget", "unitPrice": UNIT_PRICE })),
    )
    .await?;
    // The price reaches the order service's catalog as an event.
    let priced = format!("{}/products/{PRODUCT}", local.service_url("order"));
    let deadline = Instant::now() + timeout;
    loop {
        let entry = http.get(&priced).send().await;
        let ready = match entry {
            Ok(r) if r.status().is_success() => {
                r.json::<Value>().await.ok().map(|v| v["unitPrice"].clone())
                    == Some(json!(UNIT_PRICE))
            }
            _ => false,
        };
        if ready {
            break;
        }
        if Instant::now() >= deadline {
            bail!("{PRODUCT} did not reach the order service's catalog within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut ok = true;
    println!("==> demo: order {QUANTITY} x {PRODUCT} at {UNIT_PRICE}, shipped to the US");
    let order = place_and_settle(local, &http, "US", timeout).await?;
    println!("{}", serde_json::to_string_pretty(&order)?);
    summarize(&order, "total");
    if order["status"] != "CONFIRMED" {
        eprintln!(
            "warning: expected CONFIRMED, got {} ({})",
            order["status"], order["failureReason"]
        );
        ok = false;
    }

    println!("==> demo: the same order shipped to country ZZ, where no carrier delivers");
    let order = place_and_settle(local, &http, "ZZ", timeout).await?;
    summarize(&order, "failureReason");
    if order["status"] != "CANCELLED" {
        eprintln!("warning: expected CANCELLED, got {}", order["status"]);
        return Ok(false);
    }
    // The payment taken before shipping refused is refunded by compensation.
    let expected = BALANCE - QUANTITY * UNIT_PRICE;
    let deadline = Instant::now() + timeout;
    let balance = loop {
        let account = send(http.get(format!("{payment}/accounts/{CUSTOMER}"))).await?;
        let balance = account["balance"].as_i64().unwrap_or_default();
        if balance == expected || Instant::now() >= deadline {
            break balance;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    println!(
        "{CUSTOMER} balance: {balance} ({BALANCE} - {} for the confirmed order; the cancelled order's payment was refunded)",
        QUANTITY * UNIT_PRICE
    );
    Ok(ok && balance == expected)
}

async fn place_and_settle(
    local: &Local,
    http: &reqwest::Client,
    country: &str,
    timeout: Duration,
) -> Result<Value> {
    let order_url = local.service_url("order");
    let placed = send(http.post(format!("{order_url}/orders")).json(&json!({
        "customerId": CUSTOMER,
        "lines": [{ "productId": PRODUCT, "quantity": QUANTITY }],
        "shippingAddress": {
            "name": "Alice Demo", "street": "1 Main St", "city": "Springfield",
            "postalCode": "62701", "country": country
        }
    })))
    .await?;
    let id = placed["orderId"]
        .as_str()
        .context("POST /orders returned no orderId")?
        .to_string();
    let deadline = Instant::now() + timeout;
    loop {
        let order = send(http.get(format!("{order_url}/orders/{id}"))).await?;
        if order["status"] != "PENDING" || Instant::now() >= deadline {
            return Ok(order);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Sends a request; any status but 2xx is an error carrying the body.
async fn send(request: reqwest::RequestBuilder) -> Result<Value> {
    let response = request.send().await.context("no response")?;
    let status = response.status();
    let url = response.url().clone();
    let body = response.text().await?;
    if !status.is_success() {
        bail!("{url}: HTTP {status} {body}");
    }
    Ok(serde_json::from_str(&body).unwrap_or(Value::Null))
}

/// One line about a demo order: its id, status and the field that matters.
fn summarize(order: &Value, field: &str) {
    let id = order["orderId"].as_str().unwrap_or("?");
    println!(
        "demo order {id}: {} ({field} {})",
        order["status"], order[field]
    );
}
