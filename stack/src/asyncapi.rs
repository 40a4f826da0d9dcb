//! The event contracts as files: the JSON Schema of every event type and
//! version (`contracts::schema`) and an AsyncAPI 3.1 document that lists each
//! subject, who publishes it and who consumes it, worked out from the
//! catalog and the durable consumers' filters in `nats/consumers/` — so it
//! cannot say otherwise than the broker is told. `stack contracts --write`
//! rewrites them; a test fails when the committed files differ.

use common::{
    EventKind, Subjects,
    topology::{self, Stream, WATCHES},
};
use contracts::schema::{self, EventSchema};
use serde_json::{Map, Value, json};

/// The AsyncAPI document, from the repository's root.
pub const ASYNCAPI: &str = "common/contracts/asyncapi.json";

/// Every generated file: path from the repository's root, and contents.
pub fn generated_files() -> Vec<(String, String)> {
    let mut files: Vec<(String, String)> = schema::files()
        .into_iter()
        .map(|(name, text)| (format!("{}/{name}", schema::DIR), text))
        .collect();
    let pretty = serde_json::to_string_pretty(&document()).expect("the document prints") + "\n";
    files.push((ASYNCAPI.into(), pretty));
    files
}

/// Whether subject `pattern` (NATS wildcards: `*` one token, `>` the rest)
/// matches `subject`.
fn matches(pattern: &str, subject: &str) -> bool {
    let mut subject = subject.split('.');
    for token in pattern.split('.') {
        match (token, subject.next()) {
            (">", Some(_)) => return true,
            ("*", Some(_)) => {}
            (t, Some(s)) if t == s => {}
            _ => return false,
        }
    }
    subject.next().is_none()
}

/// A channel: its address (with `{parameter}` where a subject carries an
/// id), an example subject, and its stream.
struct Channel {
    address: String,
    parameter: Option<(&'static str, &'static str)>,
    example: String,
    stream: Stream,
}

fn channel_of(event: &EventSchema, subjects: &Subjects) -> Channel {
    if event.event_type == contracts::product::PRODUCT_PRICED {
        return Channel {
            address: format!("{}.catalog.product.{{productId}}", subjects.prefix()),
            parameter: Some((
                "productId",
                "The product id (not a plain token: `~` and its hex)",
            )),
            example: subjects.product("widget"),
            stream: Stream::Catalog,
        };
    }
    let kind = EventKind::from_name(event.event_type).expect("a catalog event");
    let base = subjects.event(kind);
    match kind.keyed_by_order() {
        true => Channel {
            address: format!("{base}.{{orderId}}"),
            parameter: Some(("orderId", "The order id: one subject per order")),
            example: subjects.event_of(kind, uuid::Uuid::nil()),
            stream: Stream::Events,
        },
        false => Channel {
            example: base.clone(),
            address: base,
            parameter: None,
            stream: Stream::Events,
        },
    }
}

/// Who consumes `channel` (a durable consumer's name) and why: each
/// service whose consumer's filters take it, and each watch of the order
/// service on its stream.
fn consumers_of(channel: &Channel, subjects: &Subjects) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for service in common::roster::names() {
        let config = topology::consumer_config(subjects, service).expect("consumers parse");
        if channel.stream == Stream::Events
            && config
                .filter_subjects
                .iter()
                .any(|f| matches(f, &channel.example))
        {
            let what = format!("{service}: {}", config.description.unwrap_or_default());
            out.push((service.to_string(), what));
        }
    }
    for watch in WATCHES.iter().filter(|w| w.on == channel.stream) {
        let config = topology::watch_config(subjects, watch).expect("watches parse");
        let filters: Vec<&String> = config
            .filter_subjects
            .iter()
            .chain(Some(&config.filter_subject).filter(|f| !f.is_empty()))
            .collect();
        if filters.is_empty() || filters.iter().any(|f| matches(f, &channel.example)) {
            let what = format!(
                "the order service's {}: {}",
                watch.name,
                config.description.unwrap_or_default()
            );
            out.push((watch.name.to_string(), what));
        }
    }
    out
}

/// The AsyncAPI 3 document.
pub fn document() -> Value {
    let subjects = Subjects::new("saga");
    let events = schema::events();
    let mut channels = Map::new();
    let mut operations = Map::new();
    let mut messages = Map::new();
    let headers = json!({
        "type": "object",
        "properties": {
            "Nats-Msg-Id": {
                "type": "string",
                "description": "The event id: the broker drops a republish of it within the stream's duplicate window, and each consumer applies it once."
            }
        }
    });
    // One channel per event type; an older version that still reads is a
    // second message on it.
    for event in &events {
        let message = match event.version == current_version(event) {
            true => event.event_type.to_string(),
            false => format!("{}V{}", event.event_type, event.version),
        };
        messages.insert(
            message.clone(),
            json!({
                "name": event.event_type,
                "title": format!("{} (schema version {})", event.event_type, event.version),
                "contentType": "application/json",
                "headers": headers,
                "payload": { "$ref": format!("schemas/{}", event.file_name()) },
            }),
        );
        let channel = channel_of(event, &subjects);
        let entry = channels
            .entry(event.event_type.to_string())
            .or_insert_with(|| {
                let mut c = json!({
                    "address": channel.address,
                    "messages": {},
                    "description": format!("In the {} stream.", channel.stream.name(&subjects)),
                });
                if let Some((name, description)) = channel.parameter {
                    c["parameters"] = json!({ name: { "description": description } });
                }
                c
            });
        entry["messages"][&message] = json!({ "$ref": format!("#/components/messages/{message}") });
        if event.version != current_version(event) {
            continue;
        }
        let reference = json!({ "$ref": format!("#/channels/{}", event.event_type) });
        let publisher = match event.aggregate_type {
            "product" => "inventory",
            service => service,
        };
        operations.insert(
            format!("{publisher}.sends.{}", event.event_type),
            json!({
                "action": "send",
                "channel": reference,
                "summary": format!("{publisher} publishes {} through its outbox", event.event_type),
            }),
        );
        for (consumer, summary) in consumers_of(&channel, &subjects) {
            operations.insert(
                format!("{consumer}.receives.{}", event.event_type),
                json!({ "action": "receive", "channel": reference, "summary": summary }),
            );
        }
    }
    // The operator's audit records.
    messages.insert(
        "OperatorAction".into(),
        json!({
            "name": "OperatorAction",
            "contentType": "application/json",
            "headers": headers,
            "payload": { "$ref": "schemas/OperatorAction.json" },
        }),
    );
    channels.insert(
        "OperatorAction".into(),
        json!({
            "address": format!("{}.operator.{{action}}", subjects.prefix()),
            "parameters": { "action": { "description": "What the operator did: dlq-redrive, …" } },
            "messages": { "OperatorAction": { "$ref": "#/components/messages/OperatorAction" } },
            "description": format!("In the {} stream: an audit record, published without an envelope.", subjects.events_stream()),
        }),
    );
    operations.insert(
        "sagactl.sends.OperatorAction".into(),
        json!({
            "action": "send",
            "channel": { "$ref": "#/channels/OperatorAction" },
            "summary": "sagactl publishes an audit record of each operator action",
        }),
    );
    operations.insert(
        "order-timeline.receives.OperatorAction".into(),
        json!({
            "action": "receive",
            "channel": { "$ref": "#/channels/OperatorAction" },
            "summary": "the order service's timeline observer records it in the saga's timeline",
        }),
    );
    json!({
        "asyncapi": "3.1.0",
        "info": {
            "title": "Choreography saga events",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Every event the four services publish and consume on NATS JetStream, with the default subject prefix `saga` (SUBJECT_PREFIX replaces it). Generated by `cargo run -p stack -- contracts --write`; each payload is a JSON Schema under schemas/. docs/events.md says how versions evolve."
        },
        "defaultContentType": "application/json",
        "servers": {
            "local": {
                "host": "127.0.0.1:4222",
                "protocol": "nats",
                "description": "The broker scripts/up.sh starts (JetStream, sync_interval: always)."
            }
        },
        "channels": channels,
        "operations": operations,
        "components": { "messages": messages },
    })
}

/// The current version of the event type `event` is a version of.
fn current_version(event: &EventSchema) -> u32 {
    EventKind::from_name(event.event_type).map_or(event.version, EventKind::schema_version)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_match_as_the_broker_matches_them() {
        assert!(matches("saga.order.placed", "saga.order.placed"));
        assert!(matches("saga.order.*.x", "saga.order.cancelled.x"));
        assert!(matches("saga.>", "saga.order.placed"));
        assert!(!matches("saga.order.*", "saga.order.placed.x"));
        assert!(!matches("saga.order.placed", "saga.order"));
        assert!(!matches("saga.>", "saga"));
    }

    #[test]
    fn each_step_has_its_publisher_and_its_consumer() {
        let doc = document();
        let ops = doc["operations"].as_object().unwrap();
        for (op, present) in [
            ("order.sends.OrderPlaced", true),
            ("payment.receives.OrderPlaced", true),
            ("inventory.receives.PaymentProcessed", true),
            ("shipping.receives.InventoryReserved", true),
            ("order.receives.ShipmentCreated", true),
            ("shipping.receives.OrderManuallyCompensated", true),
            ("inventory.sends.ProductPriced", true),
            ("order-catalog.receives.ProductPriced", true),
            ("order-timeline.receives.PaymentRefundFailed", true),
            ("payment.receives.ShipmentCreated", false),
        ] {
            assert_eq!(ops.contains_key(op), present, "{op}: {:?}", ops.keys());
        }
        assert_eq!(
            doc["channels"]["OrderManuallyCompensated"]["address"],
            "saga.order.manually_compensated.{orderId}"
        );
        let placed = doc["channels"]["OrderPlaced"]["messages"]
            .as_object()
            .unwrap();
        assert!(placed.contains_key("OrderPlaced") && placed.contains_key("OrderPlacedV1"));
    }
}
