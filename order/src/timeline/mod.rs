//! A saga's story as its observer tells it: what each event did, where the
//! saga stands after it and who owes the next event. Pure: the observer
//! (`observer.rs`) records, this module reads; the SQL of both is in
//! [`store`].

use chrono::{DateTime, Utc};
use common::{Event, EventKind, event::OrderLine};
use uuid::Uuid;

use crate::domain::OrderStatus;

pub mod store;

pub use store::{EntryKind, EntryRow, NewEntry, SagaFilter, SagaRow};

/// Who owes the saga's next event, and what it is waiting for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Waiting {
    /// A service of the roster, or `operator` for a saga that needs a person.
    pub service: &'static str,
    /// What that service is expected to do: `charge the payment`.
    pub step: &'static str,
}

/// Where a saga stands after an event of `kind`: its status and, unless it
/// is finished, who owes the next event.
pub fn after(kind: EventKind) -> (OrderStatus, Option<Waiting>) {
    use EventKind::*;
    let waiting = |service, step| (OrderStatus::Pending, Some(Waiting { service, step }));
    match kind {
        OrderPlaced => waiting("payment", "charge the payment"),
        PaymentProcessed => waiting("inventory", "reserve the stock"),
        InventoryReserved => waiting("shipping", "create the shipment"),
        ShipmentCreated => waiting("order", "confirm the order"),
        PaymentFailed => waiting("order", "cancel the order"),
        InventoryReservationFailed => waiting("payment", "refund the payment"),
        ShipmentFailed | ShipmentCancelled => waiting("inventory", "release the stock"),
        InventoryReleased | PaymentRefundFailed => waiting("payment", "refund the payment"),
        PaymentRefunded => waiting("order", "cancel the order"),
        OrderConfirmed => (OrderStatus::Confirmed, None),
        OrderCancelled | OrderCancelledByCustomer => (OrderStatus::Cancelled, None),
        OrderManuallyCompensated => (OrderStatus::ManuallyCompensated, None),
        OrderRequiresIntervention => (
            OrderStatus::RequiresIntervention,
            Some(Waiting {
                service: "operator",
                step: "resolve the intervention",
            }),
        ),
    }
}

/// How a saga ended, as a metrics label, if an event of `kind` ends it.
pub fn ending(kind: EventKind) -> Option<&'static str> {
    match after(kind).0 {
        OrderStatus::Pending => None,
        OrderStatus::Confirmed => Some("confirmed"),
        OrderStatus::Cancelled => Some("cancelled"),
        OrderStatus::RequiresIntervention => Some("intervention"),
        OrderStatus::ManuallyCompensated => Some("manually_compensated"),
    }
}

/// Whether the event undoes an earlier step (drawn going backwards).
pub fn is_compensation(kind: EventKind) -> bool {
    matches!(
        kind,
        EventKind::InventoryReleased | EventKind::PaymentRefunded | EventKind::ShipmentCancelled
    )
}

/// Whether the event reports a step that failed.
pub fn is_failure(kind: EventKind) -> bool {
    use EventKind::*;
    matches!(
        kind,
        PaymentFailed
            | PaymentRefundFailed
            | InventoryReservationFailed
            | ShipmentFailed
            | OrderRequiresIntervention
    )
}

/// What the event did, in a few words: `charged 2500 to alice`.
pub fn effect(event: &Event) -> String {
    match event {
        Event::OrderPlaced(e) => format!(
            "placed {} for {} (total {})",
            lines(&e.lines),
            e.customer_id,
            e.total
        ),
        Event::PaymentProcessed(e) => format!("charged {} to {}", e.amount, e.customer_id),
        Event::PaymentFailed(e) => format!("declined {} for {}", e.amount, e.customer_id),
        Event::PaymentRefunded(e) => format!("refunded {} to {}", e.amount, e.customer_id),
        Event::PaymentRefundFailed(e) => format!(
            "refund of {} to {} not done (attempt {})",
            e.amount, e.customer_id, e.attempt
        ),
        Event::InventoryReserved(e) => format!("reserved {}", lines(&e.lines)),
        Event::InventoryReservationFailed(_) => "reserved nothing".into(),
        Event::InventoryReleased(e) => format!("released {}", lines(&e.lines)),
        Event::ShipmentCreated(e) => format!(
            "shipment {} (tracking {})",
            e.shipment_id, e.tracking_number
        ),
        Event::ShipmentFailed(_) => "shipped nothing".into(),
        Event::ShipmentCancelled(e) => format!("called off shipment {}", e.shipment_id),
        Event::OrderConfirmed(e) => format!("confirmed with shipment {}", e.shipment_id),
        Event::OrderCancelled(_) => "cancelled".into(),
        Event::OrderCancelledByCustomer(_) => "cancelled by the customer".into(),
        Event::OrderRequiresIntervention(_) => "halted for an operator".into(),
        Event::OrderManuallyCompensated(e) => format!("compensated by hand by {}", e.operator),
    }
}

/// The reason an event carries, if it is about a failure or a compensation.
pub fn reason(event: &Event) -> Option<&str> {
    match event {
        Event::PaymentFailed(e) => Some(&e.reason),
        Event::PaymentRefunded(e) => Some(&e.reason),
        Event::PaymentRefundFailed(e) => Some(&e.reason),
        Event::InventoryReservationFailed(e) => Some(&e.reason),
        Event::InventoryReleased(e) => Some(&e.reason),
        Event::ShipmentFailed(e) => Some(&e.reason),
        Event::OrderCancelled(e) => Some(&e.reason),
        Event::OrderCancelledByCustomer(e) => Some(&e.reason),
        Event::ShipmentCancelled(e) => Some(&e.reason),
        Event::OrderRequiresIntervention(e) => Some(&e.reason),
        Event::OrderManuallyCompensated(e) => Some(&e.note),
        Event::OrderPlaced(_)
        | Event::PaymentProcessed(_)
        | Event::InventoryReserved(_)
        | Event::ShipmentCreated(_)
        | Event::OrderConfirmed(_) => None,
    }
}

/// `2 x widget, 1 x gadget`.
fn lines(lines: &[OrderLine]) -> String {
    let each: Vec<String> = lines
        .iter()
        .map(|l| format!("{} x {}", l.quantity, l.product_id))
        .collect();
    each.join(", ")
}

/// One more event of `kind` for a saga that is `over` (has ended) or not:
/// where it then stands, or `None` if the event does not count. The
/// order's own outcomes always count (it may still move an ended saga to
/// REQUIRES_INTERVENTION); a step's event counts only while the saga is
/// not over: a late or redelivered event does not reopen an ended saga, or
/// one halted by a contradiction after it ended, while a saga halted by a
/// dead letter goes on when its event is redriven (as the order does).
fn advance(over: &mut bool, kind: EventKind) -> Option<(OrderStatus, Option<Waiting>)> {
    let next = after(kind);
    match next.0 {
        OrderStatus::Confirmed | OrderStatus::Cancelled | OrderStatus::ManuallyCompensated => {
            *over = true
        }
        OrderStatus::RequiresIntervention => {}
        OrderStatus::Pending if *over => return None,
        OrderStatus::Pending => {}
    }
    Some(next)
}

/// What a saga's summary is folded from: one entry of its timeline.
#[derive(Debug, Clone)]
pub struct Seen<'a> {
    pub kind: EntryKind,
    pub event_type: &'a str,
    pub occurred_at: DateTime<Utc>,
}

/// The summary of saga `id` after `entries` (its timeline's order) that
/// follow those `from` summarises (`None`: it had none). `None` if they
/// cannot be folded onto it, and the whole timeline must be folded again:
/// when one of them happened no later than the summary's last entry (it
/// arrived late, and falls among the entries already folded), or when the
/// saga stands at REQUIRES_INTERVENTION, which it reaches ended or not.
pub fn fold_onto(id: Uuid, from: Option<SagaRow>, entries: &[Seen<'_>]) -> Option<SagaRow> {
    let first = entries.first()?;
    let (mut row, mut over) = match from {
        None => (
            SagaRow {
                correlation_id: id,
                status: OrderStatus::Pending,
                waiting_for: None,
                step: None,
                started_at: first.occurred_at,
                last_event_at: first.occurred_at,
                last_event_type: String::new(),
                dead_letters: 0,
            },
            false,
        ),
        Some(row) if first.occurred_at <= row.last_event_at => return None,
        Some(row) => {
            let over = match row.status {
                OrderStatus::Pending => false,
                OrderStatus::Confirmed
                | OrderStatus::Cancelled
                | OrderStatus::ManuallyCompensated => true,
                OrderStatus::RequiresIntervention => return None,
            };
            (row, over)
        }
    };
    for entry in entries {
        match entry.kind {
            EntryKind::Event => {
                if let Some((status, waiting)) =
                    EventKind::from_name(entry.event_type).and_then(|kind| advance(&mut over, kind))
                {
                    row.status = status;
                    row.waiting_for = waiting.map(|w| w.service.to_string());
                    row.step = waiting.map(|w| w.step.to_string());
                }
            }
            EntryKind::DeadLetter => row.dead_letters = row.dead_letters.saturating_add(1),
            EntryKind::Operator => {}
        }
        row.last_event_at = row.last_event_at.max(entry.occurred_at);
        row.last_event_type = entry.event_type.to_string();
    }
    Some(row)
}

#[cfg(test)]
mod tests {
    use super::*;
    use EventKind::*;
    use proptest::prelude::*;

    /// Entries of one saga in the timeline's order: names, kinds and
    /// times drawn from a few, so that times tie and kinds mix.
    fn entries() -> impl Strategy<Value = Vec<(EntryKind, &'static str, DateTime<Utc>)>> {
        let kind = prop_oneof![
            6 => Just(EntryKind::Event),
            1 => Just(EntryKind::DeadLetter),
            1 => Just(EntryKind::Operator),
        ];
        let name = prop::sample::select(EventKind::ALL).prop_map(|k| k.name());
        let entry = (kind, name, 0..20i64).prop_map(|(kind, name, s)| {
            (
                kind,
                name,
                DateTime::UNIX_EPOCH + chrono::Duration::seconds(s),
            )
        });
        prop::collection::vec(entry, 1..30).prop_map(|mut v| {
            v.sort_by_key(|(kind, _, at)| (*at, *kind));
            v
        })
    }

    fn seen<'a>(entries: &'a [(EntryKind, &'static str, DateTime<Utc>)]) -> Vec<Seen<'a>> {
        entries
            .iter()
            .map(|(kind, event_type, occurred_at)| Seen {
                kind: *kind,
                event_type,
                occurred_at: *occurred_at,
            })
            .collect()
    }

    proptest! {
        /// Folding the later entries onto the summary of the earlier ones
        /// gives what folding them all does, whenever it folds at all; and
        /// it does whenever they all come later and the saga does not stand
        /// at REQUIRES_INTERVENTION.
        #[test]
        fn folding_onto_a_summary_is_folding_the_whole_timeline(all in entries(), cut in 0usize..30) {
            let id = Uuid::from_u128(1);
            let cut = cut.min(all.len() - 1);
            let whole = fold_onto(id, None, &seen(&all)).expect("a saga with entries");
            let before = fold_onto(id, None, &seen(&all[..cut]));
            let later = seen(&all[cut..]);
            let may_fold = before.as_ref().is_none_or(|b| {
                b.status != OrderStatus::RequiresIntervention && later[0].occurred_at > b.last_event_at
            });
            match fold_onto(id, before, &later) {
                Some(onto) => prop_assert_eq!(onto, whole),
                None => prop_assert!(!may_fold, "refused to fold"),
            }
        }
    }

    /// Status and who owes the next event after `kinds`, one a second.
    fn owes(kinds: &[EventKind]) -> (OrderStatus, Option<String>) {
        let entries: Vec<Seen<'_>> = kinds
            .iter()
            .zip(0..)
            .map(|(kind, s)| Seen {
                kind: EntryKind::Event,
                event_type: kind.name(),
                occurred_at: DateTime::UNIX_EPOCH + chrono::Duration::seconds(s),
            })
            .collect();
        let row = fold_onto(Uuid::nil(), None, &entries).expect("a saga with entries");
        (row.status, row.waiting_for)
    }

    #[test]
    fn each_step_of_the_happy_path_names_who_owes_the_next_event() {
        let path = [
            OrderPlaced,
            PaymentProcessed,
            InventoryReserved,
            ShipmentCreated,
        ];
        let owed = ["payment", "inventory", "shipping", "order"];
        for (n, service) in owed.iter().enumerate() {
            assert_eq!(
                owes(&path[..=n]),
                (OrderStatus::Pending, Some(service.to_string())),
                "after {:?}",
                path[n]
            );
        }
        let done = [&path[..], &[OrderConfirmed]].concat();
        assert_eq!(owes(&done), (OrderStatus::Confirmed, None));
    }

    #[test]
    fn a_compensation_is_owed_backwards_until_the_order_is_cancelled() {
        let mut kinds = vec![
            OrderPlaced,
            PaymentProcessed,
            InventoryReserved,
            ShipmentFailed,
        ];
        assert_eq!(
            owes(&kinds),
            (OrderStatus::Pending, Some("inventory".to_string()))
        );
        kinds.push(InventoryReleased);
        assert_eq!(
            owes(&kinds),
            (OrderStatus::Pending, Some("payment".to_string()))
        );
        kinds.push(PaymentRefunded);
        assert_eq!(
            owes(&kinds),
            (OrderStatus::Pending, Some("order".to_string()))
        );
        kinds.push(OrderCancelled);
        assert_eq!(owes(&kinds), (OrderStatus::Cancelled, None));
    }

    #[test]
    fn a_finished_saga_is_not_reopened_by_a_late_event() {
        let kinds = [OrderPlaced, PaymentFailed, OrderCancelled, PaymentProcessed];
        assert_eq!(owes(&kinds), (OrderStatus::Cancelled, None));
    }

    #[test]
    fn an_ended_saga_can_still_need_an_operator_and_stays_halted() {
        let mut kinds = vec![
            OrderPlaced,
            PaymentFailed,
            OrderCancelled,
            OrderRequiresIntervention,
        ];
        let halted = (
            OrderStatus::RequiresIntervention,
            Some("operator".to_string()),
        );
        assert_eq!(owes(&kinds), halted);
        kinds.push(ShipmentCreated);
        assert_eq!(owes(&kinds), halted, "a late step does not reopen it");
    }

    #[test]
    fn a_saga_halted_by_a_dead_letter_goes_on_when_it_is_redriven() {
        let mut kinds = vec![OrderPlaced, PaymentProcessed, OrderRequiresIntervention];
        kinds.push(InventoryReserved);
        assert_eq!(
            owes(&kinds),
            (OrderStatus::Pending, Some("shipping".to_string()))
        );
        kinds.extend([ShipmentCreated, OrderConfirmed]);
        assert_eq!(owes(&kinds), (OrderStatus::Confirmed, None));
    }

    #[test]
    fn an_intervention_waits_for_an_operator() {
        let kinds = [OrderPlaced, OrderRequiresIntervention];
        assert_eq!(
            owes(&kinds),
            (
                OrderStatus::RequiresIntervention,
                Some("operator".to_string())
            )
        );
    }

    #[test]
    fn only_the_order_s_outcomes_end_a_saga() {
        let ends: Vec<_> = EventKind::ALL
            .iter()
            .filter_map(|k| ending(*k).map(|e| (*k, e)))
            .collect();
        assert_eq!(
            ends,
            [
                (OrderConfirmed, "confirmed"),
                (OrderCancelled, "cancelled"),
                (OrderRequiresIntervention, "intervention"),
                (OrderManuallyCompensated, "manually_compensated"),
                (OrderCancelledByCustomer, "cancelled")
            ]
        );
    }

    #[test]
    fn compensations_and_failures_are_told_apart() {
        let compensations: Vec<_> = EventKind::ALL
            .iter()
            .filter(|k| is_compensation(**k))
            .collect();
        assert_eq!(
            compensations,
            [&PaymentRefunded, &InventoryReleased, &ShipmentCancelled]
        );
        assert!(is_failure(ShipmentFailed) && !is_failure(ShipmentCreated));
    }
}
