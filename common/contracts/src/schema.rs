//! The JSON Schema of every event on the wire, generated from the types
//! that read it (schemars): one document per event type and schema version
//! (`<EventType>.v<N>.json` under [`DIR`]), each the envelope with its
//! `eventType`, `schemaVersion` and `aggregateType` fixed and its payload
//! typed, and one for the operator's audit record. What the types refuse
//! beyond their shape (bounds, sums) is in [`crate::limits`] and
//! docs/events.md.

use schemars::{JsonSchema, Schema, schema_for};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use uuid::Uuid;

use crate::{
    Envelope, EventKind,
    event::{Money, OrderLine},
    operator::OperatorAction,
    product,
};

/// Where the documents are kept, from the repository's root.
pub const DIR: &str = "common/contracts/schemas";

/// One event type at one schema version, as a JSON Schema document.
#[derive(Debug, Clone)]
pub struct EventSchema {
    pub event_type: &'static str,
    pub version: u32,
    /// Who publishes it (the envelope's `aggregateType`: a service, or
    /// `product` for inventory's catalog).
    pub aggregate_type: &'static str,
    pub schema: Value,
}

impl EventSchema {
    /// Its file under [`DIR`].
    pub fn file_name(&self) -> String {
        format!("{}.v{}.json", self.event_type, self.version)
    }
}

/// OrderPlaced as schema version 1 had it: the shipping address as one
/// line. Still read (upcast to version 2), so still described.
#[derive(Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct OrderPlacedV1 {
    order_id: Uuid,
    customer_id: String,
    lines: Vec<OrderLine>,
    total: Money,
    /// "name, street, city, postal code, country".
    shipping_address: String,
}

/// Every event type at its current version, and every older version that
/// still reads (see [`crate::upcast`]), ProductPriced included.
pub fn events() -> Vec<EventSchema> {
    let mut out: Vec<EventSchema> = EventKind::ALL
        .iter()
        .map(|&kind| EventSchema {
            event_type: kind.name(),
            version: kind.schema_version(),
            aggregate_type: kind.aggregate_type(),
            schema: envelope_of(
                kind.name(),
                kind.schema_version(),
                kind.aggregate_type(),
                kind.payload_schema(),
            ),
        })
        .collect();
    out.push(EventSchema {
        event_type: EventKind::OrderPlaced.name(),
        version: 1,
        aggregate_type: EventKind::OrderPlaced.aggregate_type(),
        schema: envelope_of(
            EventKind::OrderPlaced.name(),
            1,
            EventKind::OrderPlaced.aggregate_type(),
            schema_for!(OrderPlacedV1),
        ),
    });
    out.push(EventSchema {
        event_type: product::PRODUCT_PRICED,
        version: product::SCHEMA_VERSION,
        aggregate_type: product::AGGREGATE_TYPE,
        schema: envelope_of(
            product::PRODUCT_PRICED,
            product::SCHEMA_VERSION,
            product::AGGREGATE_TYPE,
            schema_for!(product::ProductPriced),
        ),
    });
    out.sort_by(|a, b| (a.event_type, a.version).cmp(&(b.event_type, b.version)));
    out
}

/// The schema of `event_type` at `version`, if there is one.
pub fn event(event_type: &str, version: u32) -> Option<EventSchema> {
    events()
        .into_iter()
        .find(|s| s.event_type == event_type && s.version == version)
}

/// The operator's audit record (published as it is, without an envelope,
/// on `<prefix>.operator.<action>`).
pub fn operator_action() -> Value {
    let mut schema = schema_for!(OperatorAction).to_value();
    schema["title"] = json!("OperatorAction");
    schema
}

/// Every document with its file name under [`DIR`], pretty-printed as it
/// is committed.
pub fn files() -> Vec<(String, String)> {
    let pretty = |v: &Value| serde_json::to_string_pretty(v).expect("a schema prints") + "\n";
    let mut files: Vec<(String, String)> = events()
        .iter()
        .map(|s| (s.file_name(), pretty(&s.schema)))
        .collect();
    files.push(("OperatorAction.json".into(), pretty(&operator_action())));
    files
}

/// The envelope's schema with the type, version and owner fixed and the
/// payload's schema in place (its definitions moved to the document's
/// root, where its references point).
fn envelope_of(event_type: &str, version: u32, aggregate_type: &str, payload: Schema) -> Value {
    let mut schema = schema_for!(Envelope).to_value();
    let mut payload = payload.to_value();
    let payload_map = payload
        .as_object_mut()
        .expect("a payload schema is an object");
    let payload_defs = payload_map.remove("$defs");
    payload_map.remove("$schema");
    payload_map.remove("title");
    let root = schema
        .as_object_mut()
        .expect("the envelope schema is an object");
    root.insert(
        "title".into(),
        json!(format!("{event_type} (schema version {version})")),
    );
    root.insert(
        "description".into(),
        json!(format!(
            "A {event_type} event at schema version {version}, in its envelope, as published by {aggregate_type}."
        )),
    );
    if let Some(Value::Object(defs)) = payload_defs {
        let root_defs = root
            .entry("$defs")
            .or_insert_with(|| Value::Object(Map::new()))
            .as_object_mut()
            .expect("$defs is an object");
        root_defs.extend(defs);
    }
    let properties = root
        .get_mut("properties")
        .and_then(Value::as_object_mut)
        .expect("the envelope has properties");
    properties.insert("eventType".into(), json!({ "const": event_type }));
    properties.insert("schemaVersion".into(), json!({ "const": version }));
    properties.insert("aggregateType".into(), json!({ "const": aggregate_type }));
    properties.insert("payload".into(), payload);
    schema
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_event_type_has_a_schema_at_its_current_version() {
        let all = events();
        for kind in EventKind::ALL {
            assert!(
                all.iter()
                    .any(|s| s.event_type == kind.name() && s.version == kind.schema_version()),
                "{kind:?}"
            );
        }
        let order_placed = event("OrderPlaced", 2).unwrap().schema;
        assert_eq!(
            order_placed["properties"]["eventType"]["const"],
            "OrderPlaced"
        );
        assert_eq!(
            order_placed["properties"]["payload"]["properties"]["shippingAddress"]["$ref"],
            "#/$defs/Address"
        );
        assert!(order_placed["$defs"]["Address"].is_object());
        let v1 = event("OrderPlaced", 1).unwrap().schema;
        assert_eq!(
            v1["properties"]["payload"]["properties"]["shippingAddress"]["type"],
            "string"
        );
    }
}
