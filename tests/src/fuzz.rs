//! Generators of hostile input for the property tests: order bodies and event
//! envelopes that are mostly almost right, with huge and negative numbers,
//! long strings, NUL and other control characters, deep nesting, many lines,
//! unknown and missing fields; plus plain garbage bytes.
//!
//! Generation is seeded ([`runner`]), so a run is repeatable; set
//! `FUZZ_SEED` to explore other inputs.

use common::{EventKind, Subjects};
use proptest::{
    prelude::*,
    strategy::ValueTree,
    test_runner::{Config, RngAlgorithm, TestRng, TestRunner},
};
use serde_json::{Map, Value, json};
use uuid::Uuid;

/// Customers with accounts in the property tests, and products with stock,
/// priced in the catalog at [`PRICES`].
pub const CUSTOMERS: [&str; 2] = ["alice", "bob"];
pub const PRODUCTS: [&str; 3] = ["widget", "gadget", "gizmo"];
pub const PRICES: [i64; 3] = [1_000, 250, 99_999];

/// A deterministic runner (`FUZZ_SEED` picks another seed).
pub fn runner() -> TestRunner {
    let seed: u64 = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20261124);
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    TestRunner::new_with_rng(
        Config::default(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &bytes),
    )
}

/// `n` values drawn from `strategy` with `runner`.
pub fn sample<S: Strategy>(runner: &mut TestRunner, strategy: S, n: usize) -> Vec<S::Value> {
    (0..n)
        .map(|_| {
            strategy
                .new_tree(runner)
                .expect("strategy generates")
                .current()
        })
        .collect()
}

/// Strings, from ordinary to hostile.
pub fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        60 => "[a-z][a-z0-9-]{0,11}",
        1 => Just(String::new()),
        1 => Just("   ".to_string()),
        1 => "\\PC{0,40}",
        1 => ".{0,20}",
        1 => "[a-z]{0,4}[\u{0}-\u{1f}\u{7f}][a-z]{0,4}",
        1 => (129usize..4000).prop_map(|n| "x".repeat(n)),
        1 => (1usize..200).prop_map(|n| "é".repeat(n)),
        1 => " [a-z]{1,5} ",
    ]
}

/// Numbers, from ordinary to hostile (and some that are not integers).
pub fn number() -> impl Strategy<Value = Value> {
    prop_oneof![
        60 => (1i64..2_000).prop_map(Value::from),
        1 => any::<i64>().prop_map(Value::from),
        1 => prop_oneof![Just(i64::MAX), Just(i64::MIN), Just(0), Just(-1), Just(1_000_001), Just(1_000_000_001)]
            .prop_map(Value::from),
        1 => any::<u64>().prop_map(Value::from),
        1 => (-1e20f64..1e20).prop_map(|f| json!(f)),
        1 => Just(json!("12")),
        1 => Just(Value::Null),
    ]
}

fn one_of(names: &'static [&'static str]) -> impl Strategy<Value = String> {
    prop_oneof![4 => proptest::sample::select(names).prop_map(str::to_string), 1 => text()]
}

/// Rewrites an object: drops a field, adds an unknown one, or swaps a value
/// for a deeply nested one, each now and then.
fn mutate(value: Value) -> impl Strategy<Value = Value> {
    let keys: Vec<String> = value
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    let n = keys.len().max(1);
    (0u8..20, 0..n, 1usize..300).prop_map(move |(what, i, depth)| {
        let mut v = value.clone();
        let Some(map) = v.as_object_mut() else {
            return v;
        };
        let key = keys.get(i).cloned().unwrap_or_default();
        match what {
            0 => {
                map.remove(&key);
            }
            1 => {
                map.insert("surprise".into(), json!(1));
            }
            2 => {
                let mut nested = json!(1);
                for _ in 0..depth {
                    nested = json!([nested]);
                }
                map.insert(key, nested);
            }
            _ => {}
        }
        v
    })
}

/// Products nobody stocks: events about them can never take real stock.
const PHANTOMS: [&str; 1] = ["phantom"];

fn line(products: &'static [&'static str]) -> impl Strategy<Value = Value> {
    (one_of(products), number(), number()).prop_flat_map(|(product, quantity, price)| {
        mutate(json!({"productId": product, "quantity": quantity, "unitPrice": price}))
    })
}

/// A line of a placement: its price left out, the catalog's, or any number.
fn placement_line() -> impl Strategy<Value = Value> {
    (0..PRODUCTS.len(), number(), 0..5u8).prop_flat_map(|(i, quantity, how)| {
        let mut line = json!({"productId": PRODUCTS[i], "quantity": quantity});
        match how {
            0 | 1 => {}
            2 | 3 => line["unitPrice"] = json!(PRICES[i]),
            _ => line["unitPrice"] = json!(1),
        }
        mutate(line)
    })
}

fn address() -> impl Strategy<Value = Value> {
    (
        text(),
        text(),
        text(),
        prop_oneof![3 => Just("12345".to_string()), 1 => text()],
        prop_oneof![3 => Just("US".to_string()), 1 => Just("ZZ".to_string()), 1 => text()],
    )
        .prop_flat_map(|(name, street, city, postal, country)| {
            mutate(json!({"name": name, "street": street, "city": city, "postalCode": postal, "country": country}))
        })
}

fn lines(products: &'static [&'static str]) -> impl Strategy<Value = Vec<Value>> {
    prop_oneof![
        20 => proptest::collection::vec(line(products), 1..4),
        1 => Just(Vec::new()),
        1 => proptest::collection::vec(line(products), 95..130),
    ]
}

fn placement_lines() -> impl Strategy<Value = Vec<Value>> {
    prop_oneof![
        20 => proptest::collection::vec(placement_line(), 1..4),
        1 => Just(Vec::new()),
        1 => proptest::collection::vec(placement_line(), 95..130),
    ]
}

/// A `POST /orders` body, as JSON (most near-valid, many not).
pub fn order_body() -> impl Strategy<Value = Value> {
    (one_of(&CUSTOMERS), placement_lines(), address()).prop_flat_map(
        |(customer, lines, address)| {
            mutate(json!({"customerId": customer, "lines": lines, "shippingAddress": address}))
        },
    )
}

/// Any JSON value, from ordinary to hostile.
fn value() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => number(),
        4 => text().prop_map(Value::from),
        1 => any::<bool>().prop_map(Value::from),
        1 => Just(Value::Null),
        1 => proptest::collection::vec(number(), 0..5).prop_map(Value::from),
        1 => proptest::collection::vec(text(), 0..5).prop_map(Value::from),
        1 => (text(), number()).prop_map(|(k, v)| json!({ k: v })),
        1 => Just(json!({"charges": "fail", "refunds": "ok", "latencyMs": 1})),
    ]
}

/// A request body with fields named from `keys` (and now and then others),
/// values of any kind; now and then not an object, or not JSON at all.
pub fn body(keys: &'static [&'static str]) -> impl Strategy<Value = Vec<u8>> {
    let object = proptest::collection::vec((one_of(keys), value()), 0..6)
        .prop_map(|fields| Value::Object(fields.into_iter().collect()))
        .prop_flat_map(mutate);
    prop_oneof![
        12 => object.prop_map(|v| serde_json::to_vec(&v).unwrap()),
        1 => value().prop_map(|v| serde_json::to_vec(&v).unwrap()),
        1 => proptest::collection::vec(any::<u8>(), 0..300),
        1 => Just(b"{\"".to_vec()),
    ]
}

/// Bytes for `POST /orders` or for the broker: a generated body, or garbage.
pub fn order_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        12 => order_body().prop_map(|v| serde_json::to_vec(&v).unwrap()),
        1 => proptest::collection::vec(any::<u8>(), 0..300),
        1 => Just(b"{\"customerId\": \"alice\", \"lines\": [".to_vec()),
    ]
}

/// The payload an event of `kind` would carry, near-valid, for an order
/// and customers nobody placed or holds (so a valid one acts on nothing real).
fn payload(kind: EventKind, order_id: Uuid) -> BoxedStrategy<Value> {
    let id = order_id.to_string();
    let stranger = prop_oneof![3 => Just("stranger".to_string()), 1 => text()];
    let reason = prop_oneof![3 => Just("because".to_string()), 1 => text()];
    match kind {
        EventKind::OrderPlaced | EventKind::PaymentProcessed => {
            (stranger, lines(&PHANTOMS), address(), number())
                .prop_map(move |(customer, lines, address, total)| {
                    let mut m = Map::new();
                    m.insert("orderId".into(), json!(id));
                    m.insert("customerId".into(), json!(customer));
                    m.insert("lines".into(), json!(lines));
                    m.insert("shippingAddress".into(), address);
                    if kind == EventKind::OrderPlaced {
                        m.insert("total".into(), total);
                    } else {
                        m.insert("amount".into(), total);
                        m.insert("paymentId".into(), json!(Uuid::now_v7()));
                    }
                    Value::Object(m)
                })
                .prop_flat_map(mutate)
                .boxed()
        }
        EventKind::InventoryReserved => (lines(&PHANTOMS), address())
            .prop_map(move |(lines, address)| json!({"orderId": id, "lines": lines, "shippingAddress": address}))
            .prop_flat_map(mutate)
            .boxed(),
        EventKind::InventoryReleased => (lines(&PHANTOMS), reason)
            .prop_map(move |(lines, reason)| json!({"orderId": id, "lines": lines, "reason": reason}))
            .prop_flat_map(mutate)
            .boxed(),
        EventKind::PaymentFailed | EventKind::PaymentRefunded => (stranger, number(), reason)
            .prop_map(move |(customer, amount, reason)| {
                json!({"orderId": id, "paymentId": Uuid::now_v7(), "customerId": customer, "amount": amount, "reason": reason})
            })
            .prop_flat_map(mutate)
            .boxed(),
        EventKind::ShipmentCreated => text()
            .prop_map(move |tracking| json!({"orderId": id, "shipmentId": Uuid::now_v7(), "trackingNumber": tracking}))
            .prop_flat_map(mutate)
            .boxed(),
        _ => reason
            .prop_map(move |reason| json!({"orderId": id, "reason": reason}))
            .prop_flat_map(mutate)
            .boxed(),
    }
}

/// An event envelope of a kind some consumer handles, near-valid, about an
/// order nobody placed: (subject it is published on, bytes).
pub fn envelope(subjects: Subjects) -> impl Strategy<Value = (String, Vec<u8>)> {
    let consumed = [
        EventKind::OrderPlaced,
        EventKind::PaymentProcessed,
        EventKind::PaymentFailed,
        EventKind::PaymentRefunded,
        EventKind::InventoryReserved,
        EventKind::InventoryReservationFailed,
        EventKind::InventoryReleased,
        EventKind::ShipmentCreated,
        EventKind::ShipmentFailed,
    ];
    (
        proptest::sample::select(consumed.to_vec()),
        proptest::sample::select(consumed.to_vec()),
        0u8..12,
        number(),
    )
        .prop_flat_map(move |(kind, subject_kind, twist, version)| {
            let order_id = Uuid::now_v7();
            let subjects = subjects.clone();
            payload(kind, order_id).prop_flat_map(move |payload| {
                let subject = subjects.event(if twist == 0 { subject_kind } else { kind });
                let envelope = json!({
                    "eventId": Uuid::now_v7(),
                    "eventType": if twist == 1 { "OrderTeleported" } else { kind.name() },
                    "schemaVersion": if twist == 2 { 9 } else { kind.schema_version() },
                    "aggregateType": kind.aggregate_type(),
                    "aggregateId": order_id.to_string(),
                    "version": if twist == 3 { version.clone() } else { json!(1) },
                    "timestamp": "2026-11-24T08:00:00Z",
                    "metadata": {
                        "correlationId": if twist == 4 { Uuid::now_v7() } else { order_id },
                        "causationId": Uuid::now_v7(),
                    },
                    "payload": payload,
                });
                (Just(subject), mutate(envelope), 0u8..20).prop_map(|(subject, env, garbage)| {
                    let bytes = if garbage == 0 {
                        b"\x00\xff not json".to_vec()
                    } else {
                        serde_json::to_vec(&env).unwrap()
                    };
                    (subject, bytes)
                })
            })
        })
}
