//! Every event checked against its published JSON Schema
//! (common/contracts/schemas/, generated from the contracts crate), by a
//! validating library: what the services publish is what the contracts
//! promise an outside consumer.

use std::{collections::HashMap, sync::OnceLock};

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// Each schema, compiled once: by (event type, schema version), and the
/// operator's audit record.
struct Validators {
    events: HashMap<(String, u32), jsonschema::Validator>,
    operator_action: jsonschema::Validator,
}

fn compile(schema: &Value) -> jsonschema::Validator {
    jsonschema::options()
        .should_validate_formats(true)
        .build(schema)
        .expect("every generated schema compiles")
}

fn validators() -> &'static Validators {
    static VALIDATORS: OnceLock<Validators> = OnceLock::new();
    VALIDATORS.get_or_init(|| Validators {
        events: ::contracts::schema::events()
            .into_iter()
            .map(|s| ((s.event_type.to_string(), s.version), compile(&s.schema)))
            .collect(),
        operator_action: compile(&::contracts::schema::operator_action()),
    })
}

/// Checks `body` (an event in its envelope; with `operator`, an operator's
/// audit record) against its schema: every violation, with where it is.
pub fn check(body: &[u8], operator: bool) -> Result<()> {
    let value: Value = serde_json::from_slice(body).context("not JSON")?;
    let validators = validators();
    let validator = match operator {
        true => &validators.operator_action,
        false => {
            let event_type = value["eventType"].as_str().context("no eventType")?;
            let version = value["schemaVersion"]
                .as_u64()
                .context("no schemaVersion")? as u32;
            validators
                .events
                .get(&(event_type.to_string(), version))
                .with_context(|| format!("no schema for {event_type} version {version}"))?
        }
    };
    let errors: Vec<String> = validator
        .iter_errors(&value)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    if !errors.is_empty() {
        bail!("{}", errors.join("; "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ::contracts::{Envelope, Event, event::ShipmentFailed};
    use uuid::Uuid;

    #[test]
    fn an_event_as_the_services_write_it_validates_and_a_broken_one_does_not() {
        let id = Uuid::now_v7();
        let event = Event::ShipmentFailed(ShipmentFailed {
            order_id: id,
            reason: "courier strike".into(),
        });
        let good = Envelope::new(&event, id.to_string(), 1, id, Uuid::now_v7()).to_bytes();
        check(&good, false).unwrap();
        let mut broken: Value = serde_json::from_slice(&good).unwrap();
        broken["payload"].as_object_mut().unwrap().remove("reason");
        broken["payload"]["extra"] = Value::from(1);
        broken["metadata"]["correlationId"] = Value::from("not a uuid");
        let why = check(&serde_json::to_vec(&broken).unwrap(), false)
            .unwrap_err()
            .to_string();
        for part in ["reason", "extra", "not a uuid"] {
            assert!(why.contains(part), "{part}: {why}");
        }
        broken["schemaVersion"] = Value::from(2);
        let why = check(&serde_json::to_vec(&broken).unwrap(), false).unwrap_err();
        assert!(
            why.to_string()
                .contains("no schema for ShipmentFailed version 2")
        );
    }
}
