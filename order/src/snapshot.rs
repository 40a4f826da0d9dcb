//! Snapshots of the Order aggregate: its state at a version, so that a load
//! reads the latest snapshot and only the events after it (`store::load`).
//! Pure: encoding, decoding and when one is due; the store keeps them.
//!
//! A snapshot is trusted only when it was written in the format the code
//! reads now ([`format`]): the fields of [`Order`] (a fingerprint of its
//! serialized shape, computed, so adding, removing or renaming a field
//! changes it by itself) and [`SEMANTICS`], raised by hand when `evolve`
//! folds the same events into a different state. A snapshot in another
//! format, or one that does not decode to the order and version it is stored
//! under, is ignored: the order is replayed in full, and the next write takes
//! a new snapshot in the current format.

use std::sync::OnceLock;

use chrono::{TimeZone, Utc};
use common::event::{Address, OrderLine};
use serde_json::Value;
use uuid::Uuid;

use crate::domain::{Order, OrderStatus};

/// Raise when `evolve` gives a different state for the same events (a fix
/// of how a status or a field is derived): older snapshots are then ignored.
pub const SEMANTICS: u32 = 1;

/// The snapshot format this code writes and reads: `order/<semantics>/<shape>`.
pub fn format() -> &'static str {
    static FORMAT: OnceLock<String> = OnceLock::new();
    FORMAT.get_or_init(|| format!("order/{SEMANTICS}/{:016x}", shape_fingerprint()))
}

/// The state as stored.
pub fn encode(order: &Order) -> String {
    serde_json::to_string(order).expect("an order always serializes")
}

/// The state stored for `order_id` at `version` in `format`, if it is one
/// this code can trust; `Err` says why not.
pub fn decode(order_id: Uuid, version: i64, format: &str, state: &str) -> Result<Order, String> {
    if format != self::format() {
        return Err(format!(
            "written in format {format}, this code reads {}",
            self::format()
        ));
    }
    let order: Order = serde_json::from_str(state).map_err(|e| e.to_string())?;
    if order.id != order_id || order.version != version {
        return Err(format!(
            "holds order {} at version {}, stored as {order_id} at {version}",
            order.id, order.version
        ));
    }
    Ok(order)
}

/// Whether a write that brings the order to `version` takes a snapshot,
/// `every` events after the last one the load could use (`0`: none).
pub fn due(last: i64, version: i64, every: i64) -> bool {
    version - last >= every
}

/// A fingerprint of the serialized shape of [`Order`]: every key path, with
/// every optional field filled and every list non-empty. FNV-1a, so it is
/// the same whatever compiles it.
fn shape_fingerprint() -> u64 {
    let at = Utc.timestamp_opt(0, 0).unwrap();
    let sample = Order {
        id: Uuid::nil(),
        customer_id: String::new(),
        lines: vec![OrderLine {
            product_id: String::new(),
            quantity: 0,
            unit_price: 0,
        }],
        total: 0,
        shipping_address: Address::unsplit(""),
        status: OrderStatus::Pending,
        failure_reason: Some(String::new()),
        shipment_id: Some(Uuid::nil()),
        halted: false,
        cancelled_by_customer: false,
        version: 0,
        created_at: at,
        updated_at: at,
    };
    let mut paths = Vec::new();
    key_paths(
        &serde_json::to_value(sample).expect("serializes"),
        "",
        &mut paths,
    );
    paths.sort();
    paths
        .join(",")
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
        })
}

fn key_paths(value: &Value, at: &str, out: &mut Vec<String>) {
    match value {
        Value::Object(fields) => {
            for (key, value) in fields {
                let path = format!("{at}.{key}");
                key_paths(value, &path, out);
                out.push(path);
            }
        }
        Value::Array(items) => {
            for item in items {
                key_paths(item, &format!("{at}[]"), out);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use chrono::{DateTime, Duration};
    use common::event::{
        OrderCancelled, OrderConfirmed, OrderManuallyCompensated, OrderRequiresIntervention,
    };
    use proptest::prelude::*;

    use super::*;
    use crate::domain::{Command, OrderEvent, PaymentClaim, decide, evolve};

    const ORDER: Uuid = Uuid::from_u128(7);

    fn place() -> Command {
        Command::Place {
            order_id: ORDER,
            customer_id: "alice".into(),
            lines: vec![OrderLine {
                product_id: "widget".into(),
                quantity: 2,
                unit_price: 500,
            }],
            shipping_address: Address::example(),
        }
    }

    /// Any command the order may receive, valid for it or not.
    fn command() -> impl Strategy<Value = Command> {
        let claim = (any::<bool>(), prop_oneof![Just(1_000i64), 1..5_000i64]).prop_map(
            |(refunded, amount)| PaymentClaim {
                event_type: if refunded {
                    "PaymentRefunded"
                } else {
                    "PaymentFailed"
                },
                customer_id: "alice".into(),
                amount,
            },
        );
        prop_oneof![
            Just(place()),
            any::<u128>().prop_map(|id| Command::Confirm {
                shipment_id: Uuid::from_u128(id)
            }),
            ("[a-z ]{1,20}", proptest::option::of(claim))
                .prop_map(|(reason, payment)| Command::Cancel { reason, payment }),
            "[a-z ]{1,20}".prop_map(|reason| Command::RequireIntervention { reason }),
            ("[a-z]{1,8}", "[a-z ]{1,20}")
                .prop_map(|(operator, note)| Command::ResolveManually { operator, note }),
        ]
    }

    /// The events the commands decide, in order, each with its time.
    fn history(commands: Vec<Command>) -> Vec<(OrderEvent, DateTime<Utc>)> {
        let start = Utc.timestamp_opt(1_780_000_000, 0).unwrap();
        let mut state: Option<Order> = None;
        let mut events = Vec::new();
        for command in commands {
            let Ok(decided) = decide(state.as_ref(), command) else {
                continue;
            };
            for event in decided {
                let at = start + Duration::seconds(events.len() as i64);
                state = evolve(state, &event, at);
                events.push((event, at));
            }
        }
        events
    }

    fn fold<'a>(
        state: Option<Order>,
        events: impl IntoIterator<Item = &'a (OrderEvent, DateTime<Utc>)>,
    ) -> Option<Order> {
        events
            .into_iter()
            .fold(state, |s, (event, at)| evolve(s, event, *at))
    }

    proptest! {
        #[test]
        fn a_snapshot_and_the_events_after_it_give_the_state_of_a_full_replay(
            commands in proptest::collection::vec(command(), 1..12),
            cut in any::<prop::sample::Index>(),
        ) {
            let events = history(commands);
            prop_assume!(!events.is_empty());
            let full = fold(None, &events);
            let at = cut.index(events.len()) + 1;
            let before = fold(None, &events[..at]).expect("placed first");
            let stored = encode(&before);
            let snapshot = decode(ORDER, before.version, format(), &stored).unwrap();
            prop_assert_eq!(&snapshot, &before);
            prop_assert_eq!(fold(Some(snapshot), &events[at..]), full);
        }
    }

    fn order_after(events: &[OrderEvent]) -> Order {
        let at = Utc.timestamp_opt(1_780_000_000, 0).unwrap();
        events
            .iter()
            .fold(None, |s, e| evolve(s, e, at))
            .expect("placed")
    }

    fn placed() -> OrderEvent {
        let Ok(mut events) = decide(None, place()) else {
            unreachable!()
        };
        events.remove(0)
    }

    #[test]
    fn every_order_event_survives_a_snapshot() {
        let events = [
            placed(),
            OrderEvent::RequiresIntervention(OrderRequiresIntervention {
                order_id: ORDER,
                reason: "payment dead-lettered OrderPlaced".into(),
            }),
            OrderEvent::Confirmed(OrderConfirmed {
                order_id: ORDER,
                shipment_id: Uuid::from_u128(9),
            }),
            OrderEvent::Cancelled(OrderCancelled {
                order_id: ORDER,
                reason: "declined".into(),
            }),
            OrderEvent::ManuallyCompensated(OrderManuallyCompensated {
                order_id: ORDER,
                operator: "ada".into(),
                note: "refunded by hand".into(),
            }),
        ];
        for n in 1..=events.len() {
            let order = order_after(&events[..n]);
            let back = decode(ORDER, order.version, format(), &encode(&order));
            assert_eq!(back.as_ref(), Ok(&order));
        }
    }

    #[test]
    fn a_snapshot_in_another_format_is_not_trusted() {
        let order = order_after(&[placed()]);
        let stored = encode(&order);
        let err = decode(ORDER, 1, "order/0/0000000000000000", &stored).unwrap_err();
        assert!(err.contains("this code reads order/1/"), "{err}");
    }

    #[test]
    fn a_snapshot_missing_a_field_or_with_an_unknown_one_is_not_trusted() {
        let order = order_after(&[placed()]);
        let mut stored: Value = serde_json::from_str(&encode(&order)).unwrap();
        stored.as_object_mut().unwrap().remove("halted");
        assert!(decode(ORDER, 1, format(), &stored.to_string()).is_err());
        stored["halted"] = false.into();
        stored["discount"] = 5.into();
        assert!(decode(ORDER, 1, format(), &stored.to_string()).is_err());
    }

    #[test]
    fn a_snapshot_of_another_order_or_version_is_not_trusted() {
        let order = order_after(&[placed()]);
        let stored = encode(&order);
        assert!(decode(Uuid::from_u128(8), 1, format(), &stored).is_err());
        assert!(decode(ORDER, 2, format(), &stored).is_err());
    }

    #[test]
    fn the_format_names_the_shape_and_the_semantics() {
        assert!(format().starts_with(&format!("order/{SEMANTICS}/")));
        assert_eq!(format().len(), "order/1/".len() + 16);
    }

    #[test]
    fn a_snapshot_is_due_every_n_events_after_the_last() {
        assert!(!due(0, 99, 100));
        assert!(due(0, 100, 100));
        assert!(!due(100, 150, 100));
        assert!(due(100, 201, 100));
        assert!(due(0, 1, 1));
    }
}
