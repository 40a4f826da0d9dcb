//! Schema evolution by upcasting: every read path (an event store's load, a
//! projection's replay, an event consumed from the broker, a dead letter
//! redriven) decodes through [`crate::Envelope::decode`], which brings an
//! older payload up to the current schema version, one step at a time,
//! before anything typed sees it. History is never rewritten: a stored or
//! published v1 event stays v1 bytes, and reads as the current version.
//!
//! Adding a schema version of an event type: raise its version in the
//! catalog (`event.rs`), write a pure `fn(Value) -> Result<Value, String>`
//! that turns the previous version's payload into the new one, and list it
//! in [`UPCASTERS`] with the version it starts from. Its unit tests feed it
//! genuine old payloads; `every_chain_reaches_the_current_version` checks
//! the registry.

use serde_json::Value;

use crate::{
    event::{Address, EventKind},
    limits,
};

/// One step of an event type's schema history.
pub struct Upcaster {
    pub kind: EventKind,
    /// The schema version it reads; it writes `from + 1`.
    pub from: u32,
    /// What changed, in a few words (for the README and error messages).
    pub change: &'static str,
    pub up: fn(Value) -> Result<Value, String>,
}

/// Every upcaster, by event type and version.
pub static UPCASTERS: &[Upcaster] = &[Upcaster {
    kind: EventKind::OrderPlaced,
    from: 1,
    change: "shippingAddress: one string -> name, street, city, postalCode, country",
    up: order_placed_v1_to_v2,
}];

/// The oldest schema version of `kind` that still decodes: the current one
/// minus the unbroken chain of upcasters below it.
pub fn oldest_version(kind: EventKind) -> u32 {
    let mut version = kind.schema_version();
    while version > 1 && step(kind, version - 1).is_some() {
        version -= 1;
    }
    version
}

fn step(kind: EventKind, from: u32) -> Option<&'static Upcaster> {
    UPCASTERS.iter().find(|u| u.kind == kind && u.from == from)
}

/// Brings `payload`, at schema `version` of `kind`, to the current version.
/// `Err(None)`: no chain from that version (too old, or newer than this
/// code); `Err(Some(reason))`: an upcaster refused the payload.
pub fn upcast(kind: EventKind, version: u32, payload: Value) -> Result<Value, Option<String>> {
    let current = kind.schema_version();
    if version > current || version < oldest_version(kind) {
        return Err(None);
    }
    (version..current).try_fold(payload, |payload, from| {
        let upcaster = step(kind, from).ok_or(None)?;
        (upcaster.up)(payload).map_err(|e| Some(format!("as schema version {from}: {e}")))
    })
}

/// OrderPlaced v1 (the design documents' first schema) carried the shipping
/// address as one line: `"name, street, city, postal code, country"`. v2
/// structures it. Split on commas (or line breaks): the first part is the
/// name, the last three are city, postal code and country, and everything in
/// between is the street (`"Ada, Flat 2, 12 Row, London, N1 1AA, GB"`). A
/// line with fewer than five parts cannot be split: it is kept whole in
/// `street`, and the fields it could not fill say so ([`Address::unsplit`]),
/// so shipping, which decides where it can deliver, refuses it with the
/// address in its reason instead of anyone guessing.
///
/// The first releases of this system already wrote the structured address
/// under schema version 1: an object is kept as it is.
fn order_placed_v1_to_v2(payload: Value) -> Result<Value, String> {
    let Value::Object(mut fields) = payload else {
        return Err("payload is not an object".into());
    };
    let address = match fields.remove("shippingAddress") {
        Some(Value::String(line)) => {
            // A bound before splitting: the structured fields are bounded
            // too, but only after this has run.
            let max = 5 * (limits::MAX_ADDRESS_FIELD_CHARS + 2);
            if line.chars().count() > max {
                return Err(format!("shippingAddress must be at most {max} characters"));
            }
            serde_json::to_value(split_address(&line)).map_err(|e| e.to_string())?
        }
        Some(object @ Value::Object(_)) => object,
        Some(_) => return Err("shippingAddress must be a string (v1) or an object".into()),
        None => return Err("missing field `shippingAddress`".into()),
    };
    fields.insert("shippingAddress".into(), address);
    Ok(Value::Object(fields))
}

fn split_address(line: &str) -> Address {
    let parts: Vec<&str> = line
        .split([',', '\n'])
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    match parts.as_slice() {
        [name, street @ .., city, postal_code, country] if !street.is_empty() => Address {
            name: name.to_string(),
            street: street.join(", "),
            city: city.to_string(),
            postal_code: postal_code.to_string(),
            country: country.to_string(),
        },
        _ => Address::unsplit(line.trim()),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::event::{Envelope, Event};

    fn v1(address: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "eventId": "0192f5a0-0000-7000-8000-000000000001",
            "eventType": "OrderPlaced",
            "schemaVersion": 1,
            "aggregateType": "order",
            "aggregateId": "0192f5a0-0000-7000-8000-0000000000aa",
            "version": 1,
            "timestamp": "2026-01-05T10:00:00Z",
            "metadata": {
                "correlationId": "0192f5a0-0000-7000-8000-0000000000aa",
                "causationId": "0192f5a0-0000-7000-8000-0000000000bb"
            },
            "payload": {
                "orderId": "0192f5a0-0000-7000-8000-0000000000aa",
                "customerId": "alice",
                "lines": [{"productId": "widget", "quantity": 2, "unitPrice": 500}],
                "total": 1000,
                "shippingAddress": address
            }
        }))
        .unwrap()
    }

    fn address_of(bytes: &[u8]) -> Result<Address, String> {
        match Envelope::decode(bytes).map_err(|e| e.to_string())? {
            (env, Event::OrderPlaced(p)) => {
                assert_eq!(env.schema_version, EventKind::OrderPlaced.schema_version());
                Ok(p.shipping_address)
            }
            (_, other) => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_v1_address_line_reads_as_a_structured_address() {
        let a = address_of(&v1(json!(
            "Ada Lovelace, 12 Analytical Row, London, N1 1AA, GB"
        )))
        .unwrap();
        assert_eq!(
            a,
            Address {
                name: "Ada Lovelace".into(),
                street: "12 Analytical Row".into(),
                city: "London".into(),
                postal_code: "N1 1AA".into(),
                country: "GB".into(),
            }
        );
    }

    #[test]
    fn the_parts_between_the_name_and_the_city_are_the_street() {
        let a = address_of(&v1(json!(
            "Ada\nFlat 2, 12 Analytical Row,\nLondon, N1 1AA, GB"
        )))
        .unwrap();
        assert_eq!(a.street, "Flat 2, 12 Analytical Row");
        assert_eq!((a.name.as_str(), a.country.as_str()), ("Ada", "GB"));
    }

    #[test]
    fn a_line_that_cannot_be_split_is_kept_whole_for_shipping_to_judge() {
        let a = address_of(&v1(json!("  behind the old mill, Springfield "))).unwrap();
        assert!(a.is_unsplit());
        assert_eq!(a.street, "behind the old mill, Springfield");
    }

    #[test]
    fn a_structured_v1_address_is_kept_as_it_is() {
        let structured = json!({"name": "Ada", "street": "1 Main St", "city": "Springfield",
                                "postalCode": "12345", "country": "US"});
        assert_eq!(address_of(&v1(structured)).unwrap().street, "1 Main St");
    }

    #[test]
    fn a_v1_address_that_is_neither_a_string_nor_an_object_is_refused_with_its_version() {
        let err = address_of(&v1(json!(42))).unwrap_err();
        assert!(
            err.contains("schema version 1") && err.contains("shippingAddress"),
            "{err}"
        );
        let huge = "x, ".repeat(5 * limits::MAX_ADDRESS_FIELD_CHARS);
        assert!(address_of(&v1(json!(huge))).is_err());
    }

    #[test]
    fn every_chain_reaches_the_current_version() {
        for u in UPCASTERS {
            assert!(
                u.from >= 1 && u.from < u.kind.schema_version(),
                "{}",
                u.change
            );
            let twins = UPCASTERS
                .iter()
                .filter(|o| o.kind == u.kind && o.from == u.from)
                .count();
            assert_eq!(twins, 1, "one upcaster per type and version");
            assert!(oldest_version(u.kind) <= u.from);
        }
        assert_eq!(oldest_version(EventKind::OrderPlaced), 1);
        assert_eq!(oldest_version(EventKind::PaymentProcessed), 1);
    }

    #[test]
    fn versions_outside_the_chain_are_refused() {
        let payload = json!({});
        assert_eq!(
            upcast(EventKind::OrderPlaced, 0, payload.clone()),
            Err(None)
        );
        assert_eq!(upcast(EventKind::OrderPlaced, 3, payload), Err(None));
    }
}
