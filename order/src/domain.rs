//! The Order aggregate, event-sourced: `decide` turns a command and the
//! current state into events (or a rejection), `evolve` folds an event into
//! the state. Both are pure.

use chrono::{DateTime, Utc};
use common::{
    Envelope,
    event::{
        self, Address, Event, Money, OrderCancelled, OrderCancelledByCustomer, OrderConfirmed,
        OrderLine, OrderManuallyCompensated, OrderPlaced, OrderRequiresIntervention,
    },
    limits,
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Where an order stands; stored and shown by its SCREAMING_SNAKE_CASE name.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, sqlx::Type, utoipa::ToSchema,
)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[sqlx(type_name = "text", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OrderStatus {
    /// Placed; the saga is under way.
    Pending,
    Confirmed,
    Cancelled,
    /// The saga reached a contradiction only a person can resolve.
    RequiresIntervention,
    /// An operator undid by hand what the saga could not.
    ManuallyCompensated,
}

impl OrderStatus {
    /// `CONFIRMED`, as stored and shown.
    pub fn name(self) -> &'static str {
        match self {
            OrderStatus::Pending => "PENDING",
            OrderStatus::Confirmed => "CONFIRMED",
            OrderStatus::Cancelled => "CANCELLED",
            OrderStatus::RequiresIntervention => "REQUIRES_INTERVENTION",
            OrderStatus::ManuallyCompensated => "MANUALLY_COMPENSATED",
        }
    }

    pub const ALL: [OrderStatus; 5] = [
        OrderStatus::Pending,
        OrderStatus::Confirmed,
        OrderStatus::Cancelled,
        OrderStatus::RequiresIntervention,
        OrderStatus::ManuallyCompensated,
    ];
}

/// Current state of one order (serialized as its snapshot, see
/// [`crate::snapshot`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Order {
    pub id: Uuid,
    pub customer_id: String,
    pub lines: Vec<OrderLine>,
    pub total: Money,
    pub shipping_address: Address,
    pub status: OrderStatus,
    pub failure_reason: Option<String>,
    pub shipment_id: Option<Uuid>,
    /// In REQUIRES_INTERVENTION because its saga was halted while pending
    /// (an event of it was dead-lettered), not because of a contradiction:
    /// once an operator redrives the event, the saga may still end
    /// normally.
    pub halted: bool,
    /// Cancelled on the customer's request: every service undoes its own
    /// step, so a shipment created meanwhile is called off, not confirmed.
    pub cancelled_by_customer: bool,
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl Order {
    /// Its saga is over for good: confirmed, cancelled, or resolved by an
    /// operator. Nothing moves it again (a dead letter of it is redriven
    /// only when forced, and then finds nothing to do).
    pub fn ended(&self) -> bool {
        matches!(
            self.status,
            OrderStatus::Confirmed | OrderStatus::Cancelled | OrderStatus::ManuallyCompensated
        )
    }

    /// Its saga may still end normally: pending, or halted by a dead letter
    /// that an operator may redrive (its saga then goes on).
    pub fn under_way(&self) -> bool {
        match self.status {
            OrderStatus::Pending => true,
            OrderStatus::RequiresIntervention => self.halted,
            OrderStatus::Confirmed | OrderStatus::Cancelled | OrderStatus::ManuallyCompensated => {
                false
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Place {
        order_id: Uuid,
        customer_id: String,
        lines: Vec<OrderLine>,
        shipping_address: Address,
    },
    /// Shipping created the shipment: the saga succeeded.
    Confirm { shipment_id: Uuid },
    /// Payment failed or was refunded: the saga failed for `reason`.
    /// `payment` is what the payment event says it was about; it must be
    /// this order's customer and total, or the event is refused.
    Cancel {
        reason: String,
        payment: Option<PaymentClaim>,
    },
    /// An event of this saga was dead-lettered: the saga cannot go on by
    /// itself. A pending order says so; a finished one is left as it is.
    RequireIntervention { reason: String },
    /// An operator compensated by hand what the halted saga could not.
    ResolveManually { operator: String, note: String },
    /// The customer calls the order off while its saga runs.
    CancelByCustomer { reason: String },
}

/// The customer and amount a payment event names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymentClaim {
    pub event_type: &'static str,
    pub customer_id: String,
    pub amount: Money,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DomainError {
    #[error("{0}")]
    Invalid(String),
    #[error("order already exists")]
    AlreadyExists,
    #[error("order does not exist")]
    NotFound,
    /// The command does not apply to the order as it stands.
    #[error("{0}")]
    Refused(String),
}

/// The Order aggregate's own events: what [`decide`] emits and [`evolve`]
/// folds, so the compiler sees every one handled. They travel as the wire
/// catalog's [`Event`]; on the way back any other event is refused.
#[derive(Debug, Clone, PartialEq)]
pub enum OrderEvent {
    Placed(OrderPlaced),
    Confirmed(OrderConfirmed),
    Cancelled(OrderCancelled),
    RequiresIntervention(OrderRequiresIntervention),
    ManuallyCompensated(OrderManuallyCompensated),
    CancelledByCustomer(OrderCancelledByCustomer),
}

impl From<OrderEvent> for Event {
    fn from(event: OrderEvent) -> Event {
        match event {
            OrderEvent::Placed(e) => Event::OrderPlaced(e),
            OrderEvent::Confirmed(e) => Event::OrderConfirmed(e),
            OrderEvent::Cancelled(e) => Event::OrderCancelled(e),
            OrderEvent::RequiresIntervention(e) => Event::OrderRequiresIntervention(e),
            OrderEvent::ManuallyCompensated(e) => Event::OrderManuallyCompensated(e),
            OrderEvent::CancelledByCustomer(e) => Event::OrderCancelledByCustomer(e),
        }
    }
}

impl TryFrom<Event> for OrderEvent {
    /// The event, given back: it is not one of the order's.
    type Error = Event;

    fn try_from(event: Event) -> Result<OrderEvent, Event> {
        match event {
            Event::OrderPlaced(e) => Ok(OrderEvent::Placed(e)),
            Event::OrderConfirmed(e) => Ok(OrderEvent::Confirmed(e)),
            Event::OrderCancelled(e) => Ok(OrderEvent::Cancelled(e)),
            Event::OrderRequiresIntervention(e) => Ok(OrderEvent::RequiresIntervention(e)),
            Event::OrderManuallyCompensated(e) => Ok(OrderEvent::ManuallyCompensated(e)),
            Event::OrderCancelledByCustomer(e) => Ok(OrderEvent::CancelledByCustomer(e)),
            other => Err(other),
        }
    }
}

/// Decides what `command` does to an order in `state` (`None`: not placed).
pub fn decide(state: Option<&Order>, command: Command) -> Result<Vec<OrderEvent>, DomainError> {
    match (state, command) {
        (
            None,
            Command::Place {
                order_id,
                customer_id,
                lines,
                shipping_address,
            },
        ) => place(order_id, customer_id, lines, shipping_address),
        (Some(_), Command::Place { .. }) => Err(DomainError::AlreadyExists),
        (None, _) => Err(DomainError::NotFound),
        (Some(order), Command::Confirm { shipment_id }) => Ok(confirm(order, shipment_id)),
        (Some(order), Command::RequireIntervention { reason }) => Ok(match order.status {
            OrderStatus::Pending => intervention(order, reason),
            _ => vec![],
        }),
        (Some(order), Command::ResolveManually { operator, note }) => {
            resolve_manually(order, operator, note)
        }
        (Some(order), Command::CancelByCustomer { reason }) => cancel_by_customer(order, reason),
        (Some(order), Command::Cancel { reason, payment }) => cancel(order, reason, payment),
    }
}

/// A new order, if its customer, lines and address are valid.
fn place(
    order_id: Uuid,
    customer_id: String,
    lines: Vec<OrderLine>,
    shipping_address: Address,
) -> Result<Vec<OrderEvent>, DomainError> {
    limits::check_id("customerId", &customer_id).map_err(DomainError::Invalid)?;
    event::validate_lines(&lines).map_err(DomainError::Invalid)?;
    event::validate_address("shippingAddress", &shipping_address).map_err(DomainError::Invalid)?;
    let total = event::lines_total(&lines)
        .ok_or_else(|| DomainError::Invalid("order total overflows".into()))?;
    Ok(vec![OrderEvent::Placed(OrderPlaced {
        order_id,
        customer_id,
        lines,
        total,
        shipping_address,
    })])
}

/// The shipment's creation reaching the order.
fn confirm(order: &Order, shipment_id: Uuid) -> Vec<OrderEvent> {
    match order.status {
        _ if order.under_way() => vec![OrderEvent::Confirmed(OrderConfirmed {
            order_id: order.id,
            shipment_id,
        })],
        OrderStatus::Pending | OrderStatus::Confirmed | OrderStatus::RequiresIntervention => {
            vec![]
        }
        // Shipping calls it off on hearing of the cancellation, or records
        // it as called off by hand on hearing of the resolution (a saga
        // resolved while a redriven event was under way): the resolved
        // saga does not move again.
        OrderStatus::Cancelled if order.cancelled_by_customer => vec![],
        OrderStatus::ManuallyCompensated => vec![],
        OrderStatus::Cancelled => intervention(
            order,
            format!(
                "shipment {shipment_id} was created for an order already cancelled ({})",
                order.failure_reason.as_deref().unwrap_or("no reason")
            ),
        ),
    }
}

/// An operator's resolution: only of an order that requires intervention.
fn resolve_manually(
    order: &Order,
    operator: String,
    note: String,
) -> Result<Vec<OrderEvent>, DomainError> {
    limits::check_id("operator", &operator).map_err(DomainError::Invalid)?;
    limits::check_reason("note", &note).map_err(DomainError::Invalid)?;
    match order.status {
        OrderStatus::RequiresIntervention => Ok(vec![OrderEvent::ManuallyCompensated(
            OrderManuallyCompensated {
                order_id: order.id,
                operator,
                note,
            },
        )]),
        status => Err(DomainError::Refused(format!(
            "order {} is {}: only an order that requires intervention can be resolved",
            order.id,
            status.name()
        ))),
    }
}

/// The customer's cancel: only of a pending order.
fn cancel_by_customer(order: &Order, reason: String) -> Result<Vec<OrderEvent>, DomainError> {
    limits::check_reason("reason", &reason).map_err(DomainError::Invalid)?;
    match order.status {
        OrderStatus::Pending => Ok(vec![OrderEvent::CancelledByCustomer(
            OrderCancelledByCustomer {
                order_id: order.id,
                reason,
            },
        )]),
        // Cancelled already (by the customer or by its saga): so be it.
        OrderStatus::Cancelled => Ok(vec![]),
        status => Err(DomainError::Refused(format!(
            "order {} is {}: it can no longer be cancelled",
            order.id,
            status.name()
        ))),
    }
}

/// The saga's failure reaching the order, with the payment event that
/// says so (which must be about this order's customer and total).
fn cancel(
    order: &Order,
    reason: String,
    payment: Option<PaymentClaim>,
) -> Result<Vec<OrderEvent>, DomainError> {
    if let Some(p) = payment
        && (p.customer_id != order.customer_id || p.amount != order.total)
    {
        return Err(DomainError::Invalid(limits::reason(format!(
            "{} for customer '{}' and amount {} does not match order {} (customer '{}', total {})",
            p.event_type, p.customer_id, p.amount, order.id, order.customer_id, order.total
        ))));
    }
    Ok(match order.status {
        _ if order.under_way() => vec![OrderEvent::Cancelled(OrderCancelled {
            order_id: order.id,
            reason,
        })],
        OrderStatus::Pending
        | OrderStatus::Cancelled
        | OrderStatus::RequiresIntervention
        | OrderStatus::ManuallyCompensated => vec![],
        OrderStatus::Confirmed => {
            intervention(order, format!("confirmed order was compensated: {reason}"))
        }
    })
}

fn intervention(order: &Order, reason: String) -> Vec<OrderEvent> {
    vec![OrderEvent::RequiresIntervention(
        OrderRequiresIntervention {
            order_id: order.id,
            reason: limits::reason(reason),
        },
    )]
}

/// Folds one event, recorded at `at`, into the state. Every order event is
/// matched by name: a new one does not compile until it is folded here.
pub fn evolve(state: Option<Order>, event: &OrderEvent, at: DateTime<Utc>) -> Option<Order> {
    let mut order = match (state, event) {
        (None, OrderEvent::Placed(p)) => {
            return Some(Order {
                id: p.order_id,
                customer_id: p.customer_id.clone(),
                lines: p.lines.clone(),
                total: p.total,
                shipping_address: p.shipping_address.clone(),
                status: OrderStatus::Pending,
                failure_reason: None,
                shipment_id: None,
                halted: false,
                cancelled_by_customer: false,
                version: 1,
                created_at: at,
                updated_at: at,
            });
        }
        // Only a placement starts an order, and only once (decide never
        // emits a second one; the primary key refuses a second version 1).
        (None, _) => return None,
        (Some(order), OrderEvent::Placed(_)) => return Some(order),
        (Some(order), _) => order,
    };
    match event {
        OrderEvent::Placed(_) => {}
        OrderEvent::Confirmed(e) => {
            order.status = OrderStatus::Confirmed;
            order.shipment_id = Some(e.shipment_id);
        }
        OrderEvent::Cancelled(e) => {
            order.status = OrderStatus::Cancelled;
            order.failure_reason = Some(e.reason.clone());
        }
        OrderEvent::CancelledByCustomer(e) => {
            order.status = OrderStatus::Cancelled;
            order.cancelled_by_customer = true;
            order.failure_reason = Some(limits::reason(format!(
                "cancelled by the customer: {}",
                e.reason
            )));
        }
        OrderEvent::ManuallyCompensated(_) => {
            order.status = OrderStatus::ManuallyCompensated;
            order.halted = false;
        }
        OrderEvent::RequiresIntervention(e) => {
            order.halted = order.status == OrderStatus::Pending;
            order.status = OrderStatus::RequiresIntervention;
            order.failure_reason = Some(e.reason.clone());
        }
    }
    order.version += 1;
    order.updated_at = at;
    Some(order)
}

/// What `command` decides for the order as loaded (`state`), without
/// reading or writing anything ([`decide`], then [`evolve`] with each event
/// enveloped): the order afterwards and the events it
/// emitted, enveloped in order after its version. No events: nothing to
/// write, the state as it was.
pub fn decide_enveloped(
    state: Option<Order>,
    order_id: Uuid,
    command: Command,
    correlation_id: Uuid,
    causation_id: Uuid,
) -> Result<(Option<Order>, Vec<Envelope>), DomainError> {
    let events = decide(state.as_ref(), command)?;
    let mut version = state.as_ref().map_or(0, |o| o.version);
    let mut state = state;
    let mut envelopes = Vec::with_capacity(events.len());
    for event in events {
        version += 1;
        let env = Envelope::new(
            &Event::from(event.clone()),
            order_id.to_string(),
            version,
            correlation_id,
            causation_id,
        );
        state = evolve(state, &event, env.timestamp);
        envelopes.push(env);
    }
    Ok((state, envelopes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn place() -> Command {
        Command::Place {
            order_id: Uuid::nil(),
            customer_id: "c1".into(),
            lines: vec![
                OrderLine {
                    product_id: "p1".into(),
                    quantity: 2,
                    unit_price: 250,
                },
                OrderLine {
                    product_id: "p2".into(),
                    quantity: 1,
                    unit_price: 100,
                },
            ],
            shipping_address: Address::example(),
        }
    }

    /// given `history`, when `command`: the events decided.
    fn given_when(
        history: &[OrderEvent],
        command: Command,
    ) -> Result<Vec<OrderEvent>, DomainError> {
        let state = history.iter().fold(None, |s, e| evolve(s, e, Utc::now()));
        decide(state.as_ref(), command)
    }

    fn confirm() -> Command {
        Command::Confirm {
            shipment_id: Uuid::nil(),
        }
    }

    /// A cancellation without a payment to check (payment failed before one).
    fn cancel(reason: &str) -> Command {
        Command::Cancel {
            reason: reason.into(),
            payment: None,
        }
    }

    /// A cancel caused by c1's refund of `amount`.
    fn refunded(amount: Money) -> Command {
        Command::Cancel {
            reason: "refund".into(),
            payment: Some(PaymentClaim {
                event_type: "PaymentRefunded",
                customer_id: "c1".into(),
                amount,
            }),
        }
    }

    fn placed() -> OrderEvent {
        given_when(&[], place()).unwrap().remove(0)
    }

    fn cancelled(reason: &str) -> OrderEvent {
        OrderEvent::Cancelled(OrderCancelled {
            order_id: Uuid::nil(),
            reason: reason.into(),
        })
    }

    #[test]
    fn placing_an_order_computes_its_total() {
        let OrderEvent::Placed(p) = placed() else {
            panic!()
        };
        assert_eq!(p.total, 600);
    }

    #[test]
    fn an_order_without_lines_is_refused() {
        let Command::Place {
            order_id,
            customer_id,
            shipping_address,
            ..
        } = place()
        else {
            panic!()
        };
        let err = given_when(
            &[],
            Command::Place {
                order_id,
                customer_id,
                lines: vec![],
                shipping_address,
            },
        )
        .unwrap_err();
        assert_eq!(err, DomainError::Invalid("lines must not be empty".into()));
    }

    #[test]
    fn a_blank_address_field_is_refused_by_name() {
        let Command::Place {
            order_id,
            customer_id,
            lines,
            mut shipping_address,
        } = place()
        else {
            panic!()
        };
        shipping_address.city = "".into();
        let err = given_when(
            &[],
            Command::Place {
                order_id,
                customer_id,
                lines,
                shipping_address,
            },
        )
        .unwrap_err();
        assert_eq!(
            err,
            DomainError::Invalid("shippingAddress.city must not be empty".into())
        );
    }

    #[test]
    fn an_order_cannot_be_placed_twice() {
        assert_eq!(
            given_when(&[placed()], place()),
            Err(DomainError::AlreadyExists)
        );
    }

    #[test]
    fn a_created_shipment_confirms_a_pending_order() {
        let events = given_when(&[placed()], confirm()).unwrap();
        assert!(matches!(events[..], [OrderEvent::Confirmed(_)]));
    }

    #[test]
    fn a_failed_payment_cancels_with_its_reason() {
        let events = given_when(&[placed()], cancel("insufficient funds")).unwrap();
        assert_eq!(events, vec![cancelled("insufficient funds")]);
        let state = [placed(), cancelled("insufficient funds")]
            .iter()
            .fold(None, |s, e| evolve(s, e, Utc::now()))
            .unwrap();
        assert_eq!(state.status, OrderStatus::Cancelled);
        assert_eq!(state.failure_reason.as_deref(), Some("insufficient funds"));
        assert_eq!(state.version, 2);
    }

    #[test]
    fn a_second_cancellation_changes_nothing() {
        let events = given_when(&[placed(), cancelled("x")], cancel("y")).unwrap();
        assert!(events.is_empty());
    }

    #[test]
    fn a_shipment_for_a_cancelled_order_requires_intervention() {
        let events = given_when(&[placed(), cancelled("x")], confirm()).unwrap();
        assert!(matches!(events[..], [OrderEvent::RequiresIntervention(_)]));
    }

    #[test]
    fn a_refund_of_a_confirmed_order_requires_intervention() {
        let confirmed = OrderEvent::Confirmed(OrderConfirmed {
            order_id: Uuid::nil(),
            shipment_id: Uuid::nil(),
        });
        let events = given_when(&[placed(), confirmed], cancel("refund")).unwrap();
        assert!(matches!(events[..], [OrderEvent::RequiresIntervention(_)]));
    }

    #[test]
    fn a_refund_naming_another_amount_is_refused() {
        let err = given_when(&[placed()], refunded(1)).unwrap_err();
        assert!(
            matches!(&err, DomainError::Invalid(m) if m.contains("does not match order")),
            "{err}"
        );
    }

    #[test]
    fn a_refund_naming_this_order_cancels_it() {
        let events = given_when(&[placed()], refunded(600)).unwrap();
        assert_eq!(events, vec![cancelled("refund")]);
    }

    #[test]
    fn a_dead_lettered_event_halts_a_pending_saga_only() {
        let halt = || Command::RequireIntervention {
            reason: "dead-lettered".into(),
        };
        assert!(matches!(
            given_when(&[placed()], halt()).unwrap()[..],
            [OrderEvent::RequiresIntervention(_)]
        ));
        assert!(
            given_when(&[placed(), cancelled("x")], halt())
                .unwrap()
                .is_empty()
        );
    }

    fn halted(reason: &str) -> OrderEvent {
        OrderEvent::RequiresIntervention(OrderRequiresIntervention {
            order_id: Uuid::nil(),
            reason: reason.into(),
        })
    }

    #[test]
    fn a_halted_saga_whose_dead_letter_was_redriven_ends_normally() {
        let given = [placed(), halted("payment dead-lettered OrderPlaced")];
        let events = given_when(&given, confirm()).unwrap();
        assert!(matches!(events[..], [OrderEvent::Confirmed(_)]));
        let events = given_when(&given, cancel("out of stock")).unwrap();
        assert_eq!(events, vec![cancelled("out of stock")]);
        // Once: a second outcome is a late event of an ended saga.
        let ended = [&given[..], &[cancelled("out of stock")]].concat();
        assert!(given_when(&ended, cancel("again")).unwrap().is_empty());
        assert!(matches!(
            given_when(&ended, confirm()).unwrap()[..],
            [OrderEvent::RequiresIntervention(_)]
        ));
    }

    #[test]
    fn a_contradiction_is_not_resolved_by_a_later_event() {
        // Cancelled, then a shipment: halted by the contradiction, not while
        // pending; neither a confirmation nor a cancellation ends it.
        let given = [
            placed(),
            cancelled("x"),
            halted("shipment for a cancelled order"),
        ];
        assert!(given_when(&given, confirm()).unwrap().is_empty());
        assert!(given_when(&given, cancel("refund")).unwrap().is_empty());
        let state = given
            .iter()
            .fold(None, |s, e| evolve(s, e, Utc::now()))
            .unwrap();
        assert!(!state.halted);
    }

    #[test]
    fn only_an_order_requiring_intervention_is_resolved_by_hand_and_then_stays_so() {
        let resolve = || Command::ResolveManually {
            operator: "ada".into(),
            note: "refunded in the gateway console".into(),
        };
        let given = [placed(), halted("payment dead-lettered InventoryReleased")];
        let events = given_when(&given, resolve()).unwrap();
        assert!(matches!(&events[..], [OrderEvent::ManuallyCompensated(e)] if e.operator == "ada"));
        let resolved = [&given[..], &events[..]].concat();
        let state = resolved
            .iter()
            .fold(None, |s, e| evolve(s, e, Utc::now()))
            .unwrap();
        assert_eq!(state.status, OrderStatus::ManuallyCompensated);
        // A late refund changes nothing; nor does a shipment (shipping
        // records it as called off when the resolution reaches it): a
        // resolved saga does not move again. A second resolution is refused.
        assert!(given_when(&resolved, cancel("refund")).unwrap().is_empty());
        assert!(given_when(&resolved, confirm()).unwrap().is_empty());
        assert!(matches!(
            given_when(&resolved, resolve()),
            Err(DomainError::Refused(_))
        ));
        let err = given_when(&[placed()], resolve()).unwrap_err();
        assert!(err.to_string().contains("is PENDING"), "{err}");
        let nobody = Command::ResolveManually {
            operator: String::new(),
            note: "x".into(),
        };
        assert!(matches!(
            given_when(&given, nobody),
            Err(DomainError::Invalid(_))
        ));
    }

    #[test]
    fn events_for_an_unknown_order_are_not_found() {
        assert_eq!(given_when(&[], cancel("x")), Err(DomainError::NotFound));
    }

    fn customer_cancels() -> Command {
        Command::CancelByCustomer {
            reason: "changed my mind".into(),
        }
    }

    fn cancelled_by_customer() -> OrderEvent {
        given_when(&[placed()], customer_cancels())
            .unwrap()
            .remove(0)
    }

    #[test]
    fn a_pending_order_is_cancelled_at_the_customers_request() {
        let events = given_when(&[placed()], customer_cancels()).unwrap();
        assert!(
            matches!(&events[..], [OrderEvent::CancelledByCustomer(e)] if e.reason == "changed my mind")
        );
        let order = [placed(), cancelled_by_customer()]
            .iter()
            .fold(None, |s, e| evolve(s, e, Utc::now()))
            .unwrap();
        assert_eq!(order.status, OrderStatus::Cancelled);
        assert_eq!(
            order.failure_reason.as_deref(),
            Some("cancelled by the customer: changed my mind")
        );
    }

    #[test]
    fn a_confirmed_order_can_no_longer_be_cancelled() {
        let confirmed = given_when(&[placed()], confirm()).unwrap().remove(0);
        let refused = given_when(&[placed(), confirmed], customer_cancels()).unwrap_err();
        assert!(
            matches!(refused, DomainError::Refused(ref m) if m.contains("CONFIRMED")),
            "{refused}"
        );
    }

    #[test]
    fn cancelling_a_cancelled_order_again_changes_nothing() {
        assert_eq!(
            given_when(&[placed(), cancelled_by_customer()], customer_cancels()),
            Ok(vec![])
        );
        assert_eq!(
            given_when(&[placed(), cancelled("declined")], customer_cancels()),
            Ok(vec![])
        );
    }

    #[test]
    fn a_shipment_created_after_the_customer_cancelled_does_not_confirm_nor_halt() {
        assert_eq!(
            given_when(&[placed(), cancelled_by_customer()], confirm()),
            Ok(vec![])
        );
        // Cancelled by the saga, a shipment is a contradiction.
        let halted = given_when(&[placed(), cancelled("declined")], confirm()).unwrap();
        assert!(matches!(&halted[..], [OrderEvent::RequiresIntervention(_)]));
    }

    #[test]
    fn a_refund_after_the_customer_cancelled_changes_nothing() {
        assert_eq!(
            given_when(&[placed(), cancelled_by_customer()], cancel("refunded")),
            Ok(vec![])
        );
    }

    #[test]
    fn a_cancel_reason_is_required_and_bounded() {
        let blank = Command::CancelByCustomer { reason: " ".into() };
        assert!(matches!(
            given_when(&[placed()], blank),
            Err(DomainError::Invalid(_))
        ));
    }

    #[test]
    fn statuses_round_trip_through_their_names() {
        for s in OrderStatus::ALL {
            let name = serde_json::to_value(s).unwrap();
            assert_eq!(name, s.name());
            assert_eq!(serde_json::from_value::<OrderStatus>(name).unwrap(), s);
        }
        assert_eq!(
            serde_json::to_value(OrderStatus::RequiresIntervention).unwrap(),
            "REQUIRES_INTERVENTION"
        );
    }

    /// The wire catalog and the aggregate's own events convert both ways,
    /// and another aggregate's event never passes for an order's.
    #[test]
    fn only_order_events_convert_to_order_events() {
        for event in [placed(), cancelled("x")] {
            assert_eq!(OrderEvent::try_from(Event::from(event.clone())), Ok(event));
        }
        let foreign = Event::ShipmentFailed(common::event::ShipmentFailed {
            order_id: Uuid::nil(),
            reason: "no carrier".into(),
        });
        assert_eq!(OrderEvent::try_from(foreign.clone()), Err(foreign));
    }
}
