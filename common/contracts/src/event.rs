//! The event envelope every service publishes and consumes, and the catalog of
//! event types with their stable names, schema versions and subjects.
//!
//! Type names are explicit strings, never derived from Rust type names, so a
//! rename in code can never change what is on the wire.

use chrono::{DateTime, SubsecRound, Utc};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use uuid::Uuid;

use crate::limits;

/// Wire envelope. Field names follow the design documents
/// (`eventId`, `eventType`, `aggregateId`, `version`, `timestamp`,
/// `metadata.correlationId` / `metadata.causationId`, `payload`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Envelope {
    pub event_id: Uuid,
    pub event_type: String,
    pub schema_version: u32,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub version: i64,
    pub timestamp: DateTime<Utc>,
    pub metadata: Metadata,
    pub payload: serde_json::Value,
}

/// Tracing ids that tie every event of one saga together.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Metadata {
    /// The saga: always the order id.
    pub correlation_id: Uuid,
    /// The event (or command) that caused this event.
    pub causation_id: Uuid,
}

/// Why bytes from the wire are not a usable event. Carried to the dead-letter
/// stream verbatim, so it must say what is wrong in words an operator can act on.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DecodeError {
    #[error("not a valid event envelope: {0}")]
    Envelope(String),
    #[error("unknown event type '{0}'")]
    UnknownType(String),
    #[error(
        "unsupported schema version {version} for {event_type} (supported: {oldest} to {newest})"
    )]
    UnsupportedVersion {
        event_type: String,
        version: u32,
        oldest: u32,
        newest: u32,
    },
    #[error("invalid {event_type} payload: {reason}")]
    Payload { event_type: String, reason: String },
    #[error("event {event_type} published on subject '{subject}', expected '{expected}'")]
    WrongSubject {
        event_type: String,
        subject: String,
        expected: String,
    },
}

impl Envelope {
    /// Builds the envelope of `event`, caused by `cause` (an event id or command id).
    pub fn new(
        event: &Event,
        aggregate_id: impl Into<String>,
        version: i64,
        correlation_id: Uuid,
        causation_id: Uuid,
    ) -> Envelope {
        let kind = event.kind();
        Envelope {
            event_id: Uuid::now_v7(),
            event_type: kind.name().to_string(),
            schema_version: kind.schema_version(),
            aggregate_type: kind.aggregate_type().to_string(),
            aggregate_id: aggregate_id.into(),
            version,
            // Microseconds, as Postgres keeps them: an event's time reads the
            // same from its envelope, a timestamp column and a read model.
            timestamp: Utc::now().trunc_subsecs(6),
            metadata: Metadata {
                correlation_id,
                causation_id,
            },
            payload: event.payload_json(),
        }
    }

    /// Envelope for an event caused by `cause`, in the same saga.
    pub fn caused_by(
        cause: &Envelope,
        event: &Event,
        aggregate_id: impl Into<String>,
        version: i64,
    ) -> Envelope {
        Envelope::new(
            event,
            aggregate_id,
            version,
            cause.metadata.correlation_id,
            cause.event_id,
        )
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an envelope always serializes")
    }

    pub fn kind(&self) -> Option<EventKind> {
        EventKind::from_name(&self.event_type)
    }
}

impl EventKind {
    /// Published under a subject of its own per order (the type's subject
    /// and `.<orderId>`), so that a service can ask the stream whether one
    /// exists for an order: what ends an order from outside its saga — the
    /// customer's cancel and the operator's resolution — which a service
    /// must know of before it takes its step even when it waits in its
    /// queue ([`crate::Subjects::ended_from_outside`]).
    pub fn keyed_by_order(self) -> bool {
        matches!(
            self,
            EventKind::OrderCancelledByCustomer | EventKind::OrderManuallyCompensated
        )
    }
}

macro_rules! catalog {
    ($( $variant:ident => $payload:ident, $aggregate:literal, $token:literal, $schema:literal; )*) => {
        /// The closed set of event types. One line per type: stable name,
        /// schema version, owning aggregate and subject token.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum EventKind { $($variant),* }

        impl EventKind {
            pub const ALL: &'static [EventKind] = &[$(EventKind::$variant),*];

            /// Stable type name on the wire (`eventType`).
            pub fn name(self) -> &'static str {
                match self { $(EventKind::$variant => stringify!($variant)),* }
            }
            pub fn schema_version(self) -> u32 {
                match self { $(EventKind::$variant => $schema),* }
            }
            pub fn aggregate_type(self) -> &'static str {
                match self { $(EventKind::$variant => $aggregate),* }
            }
            /// Subject suffix after the prefix, e.g. `order.placed`.
            pub fn subject_token(self) -> &'static str {
                match self { $(EventKind::$variant => concat!($aggregate, ".", $token)),* }
            }
            pub fn from_name(name: &str) -> Option<EventKind> {
                match name { $(stringify!($variant) => Some(EventKind::$variant),)* _ => None }
            }
            /// The JSON Schema of its current payload.
            #[cfg(feature = "schema")]
            pub fn payload_schema(self) -> schemars::Schema {
                match self { $(EventKind::$variant => schemars::schema_for!($payload)),* }
            }
        }

        /// A decoded event with its typed payload.
        #[derive(Debug, Clone, PartialEq)]
        pub enum Event { $($variant($payload)),* }

        impl Event {
            pub fn kind(&self) -> EventKind {
                match self { $(Event::$variant(_) => EventKind::$variant),* }
            }
            fn payload_json(&self) -> serde_json::Value {
                match self {
                    $(Event::$variant(p) => serde_json::to_value(p).expect("payloads always serialize")),*
                }
            }
            pub(crate) fn from_envelope(env: &Envelope) -> Result<Event, DecodeError> {
                let kind = EventKind::from_name(&env.event_type)
                    .ok_or_else(|| DecodeError::UnknownType(env.event_type.clone()))?;
                debug_assert_eq!(env.schema_version, kind.schema_version(), "upcast first");
                match kind {
                    $(EventKind::$variant => decode_payload::<$payload>(env).map(Event::$variant)),*
                }
            }
        }
    };
}

catalog! {
    OrderPlaced => OrderPlaced, "order", "placed", 2;
    OrderConfirmed => OrderConfirmed, "order", "confirmed", 1;
    OrderCancelled => OrderCancelled, "order", "cancelled", 1;
    OrderRequiresIntervention => OrderRequiresIntervention, "order", "requires_intervention", 1;
    OrderManuallyCompensated => OrderManuallyCompensated, "order", "manually_compensated", 1;
    OrderCancelledByCustomer => OrderCancelledByCustomer, "order", "cancelled_by_customer", 1;
    PaymentProcessed => PaymentProcessed, "payment", "processed", 1;
    PaymentFailed => PaymentFailed, "payment", "failed", 1;
    PaymentRefunded => PaymentRefunded, "payment", "refunded", 1;
    PaymentRefundFailed => PaymentRefundFailed, "payment", "refund_failed", 1;
    InventoryReserved => InventoryReserved, "inventory", "reserved", 1;
    InventoryReservationFailed => InventoryReservationFailed, "inventory", "reservation_failed", 1;
    InventoryReleased => InventoryReleased, "inventory", "released", 1;
    ShipmentCreated => ShipmentCreated, "shipping", "created", 1;
    ShipmentFailed => ShipmentFailed, "shipping", "failed", 1;
    ShipmentCancelled => ShipmentCancelled, "shipping", "cancelled", 1;
}

fn decode_payload<T: DeserializeOwned + Validate>(env: &Envelope) -> Result<T, DecodeError> {
    let payload_error = |reason: String| DecodeError::Payload {
        event_type: env.event_type.clone(),
        reason,
    };
    // Read from the tree in place: no copy of it.
    let payload = T::deserialize(&env.payload).map_err(|e| payload_error(e.to_string()))?;
    payload.validate().map_err(payload_error)?;
    Ok(payload)
}

/// Structural checks a payload must pass before any service acts on it.
pub trait Validate {
    fn validate(&self) -> Result<(), String> {
        Ok(())
    }
}

/// Amounts are integer minor units (cents); never floats.
pub type Money = i64;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OrderLine {
    pub product_id: String,
    pub quantity: i64,
    /// Minor units.
    #[cfg_attr(feature = "openapi", schema(value_type = i64))]
    pub unit_price: Money,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Address {
    pub name: String,
    pub street: String,
    pub city: String,
    pub postal_code: String,
    pub country: String,
}

impl Address {
    /// What the fields of an address line that could not be split hold.
    pub const NOT_GIVEN: &'static str = "?";

    /// A well-formed address in a served country, for examples and tests.
    pub fn example() -> Address {
        Address {
            name: "Ada".into(),
            street: "1 Main St".into(),
            city: "Springfield".into(),
            postal_code: "12345".into(),
            country: "US".into(),
        }
    }

    /// An address line kept whole (an OrderPlaced v1 address that could not
    /// be split into fields): the line in `street`, the other fields
    /// [`Address::NOT_GIVEN`].
    pub fn unsplit(line: &str) -> Address {
        Address {
            name: Address::NOT_GIVEN.into(),
            street: line.into(),
            city: Address::NOT_GIVEN.into(),
            postal_code: Address::NOT_GIVEN.into(),
            country: Address::NOT_GIVEN.into(),
        }
    }

    /// Made by [`Address::unsplit`].
    pub fn is_unsplit(&self) -> bool {
        [&self.name, &self.city, &self.postal_code, &self.country]
            .iter()
            .all(|f| f.as_str() == Address::NOT_GIVEN)
    }
}

/// Checks shared by every payload that carries order lines: a bounded
/// number of lines, each with a valid product id, a quantity and a unit price
/// within [`limits`], so that no sum over them can overflow.
pub fn validate_lines(lines: &[OrderLine]) -> Result<(), String> {
    check_lines(
        lines
            .iter()
            .map(|l| (l.product_id.as_str(), l.quantity, Some(l.unit_price))),
    )
}

/// The bounds of lines given as (product id, quantity, unit price if the
/// line has one yet): at least one line and at most [`limits::MAX_LINES`],
/// each field within [`limits`]. A placement's lines, priced later, and an
/// event's are held to the same words.
pub fn check_lines<'a>(
    lines: impl ExactSizeIterator<Item = (&'a str, i64, Option<Money>)>,
) -> Result<(), String> {
    if lines.len() == 0 {
        return Err("lines must not be empty".into());
    }
    if lines.len() > limits::MAX_LINES {
        return Err(format!(
            "lines must hold at most {} lines, got {}",
            limits::MAX_LINES,
            lines.len()
        ));
    }
    for (i, (product_id, quantity, unit_price)) in lines.enumerate() {
        limits::check_id(&format!("lines[{i}].productId"), product_id)?;
        limits::check_range(
            &format!("lines[{i}].quantity"),
            quantity,
            1,
            limits::MAX_QUANTITY,
        )?;
        if let Some(price) = unit_price {
            limits::check_range(
                &format!("lines[{i}].unitPrice"),
                price,
                1,
                limits::MAX_UNIT_PRICE,
            )?;
        }
    }
    Ok(())
}

/// Every field of an address present, bounded and free of control characters.
/// Whether it can be delivered to is shipping's call.
pub fn validate_address(field: &str, a: &Address) -> Result<(), String> {
    for (name, value) in [
        ("name", &a.name),
        ("street", &a.street),
        ("city", &a.city),
        ("postalCode", &a.postal_code),
        ("country", &a.country),
    ] {
        limits::check_text(
            &format!("{field}.{name}"),
            value,
            limits::MAX_ADDRESS_FIELD_CHARS,
        )?;
    }
    Ok(())
}

/// Order total in minor units; `None` on overflow.
pub fn lines_total(lines: &[OrderLine]) -> Option<Money> {
    lines.iter().try_fold(0i64, |acc, l| {
        l.quantity
            .checked_mul(l.unit_price)
            .and_then(|v| acc.checked_add(v))
    })
}

/// `amount` is what `lines` add up to.
fn validate_amount_of_lines(field: &str, amount: Money, lines: &[OrderLine]) -> Result<(), String> {
    validate_lines(lines)?;
    match lines_total(lines) {
        Some(t) if t == amount => Ok(()),
        Some(t) => Err(format!("{field} {amount} does not match the lines ({t})")),
        None => Err(format!("{field} overflows")),
    }
}

/// A positive amount no larger than any order can be.
fn validate_amount(field: &str, amount: Money) -> Result<(), String> {
    limits::check_range(field, amount, 1, limits::MAX_TOTAL)
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OrderPlaced {
    pub order_id: Uuid,
    pub customer_id: String,
    pub lines: Vec<OrderLine>,
    pub total: Money,
    pub shipping_address: Address,
}
impl Validate for OrderPlaced {
    fn validate(&self) -> Result<(), String> {
        limits::check_id("customerId", &self.customer_id)?;
        validate_amount_of_lines("total", self.total, &self.lines)?;
        validate_address("shippingAddress", &self.shipping_address)
    }
}

/// Payloads that carry only the saga and why it failed or halted.
macro_rules! reason_payloads {
    ($( $(#[$doc:meta])* $name:ident; )*) => {$(
        $(#[$doc])*
        #[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
        #[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
        #[serde(rename_all = "camelCase", deny_unknown_fields)]
        pub struct $name {
            pub order_id: Uuid,
            pub reason: String,
        }
        impl Validate for $name {
            fn validate(&self) -> Result<(), String> {
                limits::check_reason("reason", &self.reason)
            }
        }
    )*};
}

reason_payloads! {
    /// The saga failed: the order is cancelled for `reason`.
    OrderCancelled;
    /// The saga reached a contradiction only a person can resolve.
    OrderRequiresIntervention;
    /// Not every line could be reserved.
    InventoryReservationFailed;
    /// The carrier refused the shipment (the address, usually).
    ShipmentFailed;
    /// The customer cancelled the order while its saga ran: the order is
    /// cancelled, and every service undoes its own step (or never takes
    /// it), whatever the others are doing.
    OrderCancelledByCustomer;
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OrderConfirmed {
    pub order_id: Uuid,
    pub shipment_id: Uuid,
}
impl Validate for OrderConfirmed {}

/// Carries the order context forward so the next step needs no lookup.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PaymentProcessed {
    pub order_id: Uuid,
    pub payment_id: Uuid,
    pub customer_id: String,
    pub amount: Money,
    pub lines: Vec<OrderLine>,
    pub shipping_address: Address,
}
impl Validate for PaymentProcessed {
    fn validate(&self) -> Result<(), String> {
        limits::check_id("customerId", &self.customer_id)?;
        validate_amount_of_lines("amount", self.amount, &self.lines)?;
        validate_address("shippingAddress", &self.shipping_address)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PaymentFailed {
    pub order_id: Uuid,
    pub customer_id: String,
    pub amount: Money,
    pub reason: String,
}
impl Validate for PaymentFailed {
    fn validate(&self) -> Result<(), String> {
        validate_payment_outcome(&self.customer_id, self.amount, &self.reason)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PaymentRefunded {
    pub order_id: Uuid,
    pub payment_id: Uuid,
    pub customer_id: String,
    pub amount: Money,
    /// The failure that started the compensation.
    pub reason: String,
}
impl Validate for PaymentRefunded {
    fn validate(&self) -> Result<(), String> {
        validate_payment_outcome(&self.customer_id, self.amount, &self.reason)
    }
}

/// An operator's resolution of an order that required intervention: what
/// the saga could not undo, the operator undid by hand (a refund in the
/// gateway's console, stock put back). Payment records the charge as
/// refunded, inventory releases what it still holds; neither calls anyone.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OrderManuallyCompensated {
    pub order_id: Uuid,
    /// Who resolved it.
    pub operator: String,
    /// What they did, in their words.
    pub note: String,
}
impl OrderManuallyCompensated {
    /// Why a step was undone, as its record keeps it.
    pub fn reason(&self) -> String {
        limits::reason(format!(
            "compensated by hand by {}: {}",
            self.operator, self.note
        ))
    }
}
impl OrderCancelledByCustomer {
    /// Why a service undid its step, or never took it.
    pub fn step_reason(&self) -> String {
        limits::reason(format!("cancelled by the customer: {}", self.reason))
    }
}

impl Validate for OrderManuallyCompensated {
    fn validate(&self) -> Result<(), String> {
        limits::check_id("operator", &self.operator)?;
        limits::check_reason("note", &self.note)
    }
}

/// One refund attempt the payment gateway did not carry out. Reported for
/// every attempt (the delivery is retried on a schedule, then
/// dead-lettered); nothing acts on it, the timeline and operators read it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PaymentRefundFailed {
    pub order_id: Uuid,
    pub payment_id: Uuid,
    pub customer_id: String,
    pub amount: Money,
    /// 1 for the first attempt.
    pub attempt: i64,
    /// What the gateway said, or that it did not answer.
    pub reason: String,
}
impl Validate for PaymentRefundFailed {
    fn validate(&self) -> Result<(), String> {
        limits::check_range("attempt", self.attempt, 1, i64::from(u16::MAX))?;
        validate_payment_outcome(&self.customer_id, self.amount, &self.reason)
    }
}

/// A declined or refunded payment: whose, how much, and why.
fn validate_payment_outcome(customer_id: &str, amount: Money, reason: &str) -> Result<(), String> {
    limits::check_id("customerId", customer_id)?;
    validate_amount("amount", amount)?;
    limits::check_reason("reason", reason)
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InventoryReserved {
    pub order_id: Uuid,
    pub lines: Vec<OrderLine>,
    pub shipping_address: Address,
}
impl Validate for InventoryReserved {
    fn validate(&self) -> Result<(), String> {
        validate_lines(&self.lines)?;
        validate_address("shippingAddress", &self.shipping_address)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InventoryReleased {
    pub order_id: Uuid,
    pub lines: Vec<OrderLine>,
    /// The failure that started the compensation.
    pub reason: String,
}
impl Validate for InventoryReleased {
    fn validate(&self) -> Result<(), String> {
        validate_lines(&self.lines)?;
        limits::check_reason("reason", &self.reason)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ShipmentCreated {
    pub order_id: Uuid,
    pub shipment_id: Uuid,
    pub tracking_number: String,
}
impl Validate for ShipmentCreated {
    fn validate(&self) -> Result<(), String> {
        limits::check_id("trackingNumber", &self.tracking_number)
    }
}

/// A shipment called off: the customer cancelled the order after it was
/// created (shipping's compensation).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ShipmentCancelled {
    pub order_id: Uuid,
    pub shipment_id: Uuid,
    pub reason: String,
}
impl Validate for ShipmentCancelled {
    fn validate(&self) -> Result<(), String> {
        limits::check_reason("reason", &self.reason)
    }
}

impl Event {
    /// The order (saga) this event belongs to.
    pub fn order_id(&self) -> Uuid {
        match self {
            Event::OrderPlaced(p) => p.order_id,
            Event::OrderConfirmed(p) => p.order_id,
            Event::OrderCancelled(p) => p.order_id,
            Event::OrderRequiresIntervention(p) => p.order_id,
            Event::OrderManuallyCompensated(p) => p.order_id,
            Event::OrderCancelledByCustomer(p) => p.order_id,
            Event::PaymentProcessed(p) => p.order_id,
            Event::PaymentFailed(p) => p.order_id,
            Event::PaymentRefunded(p) => p.order_id,
            Event::PaymentRefundFailed(p) => p.order_id,
            Event::InventoryReserved(p) => p.order_id,
            Event::InventoryReservationFailed(p) => p.order_id,
            Event::InventoryReleased(p) => p.order_id,
            Event::ShipmentCreated(p) => p.order_id,
            Event::ShipmentFailed(p) => p.order_id,
            Event::ShipmentCancelled(p) => p.order_id,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn placed() -> Event {
        Event::OrderPlaced(OrderPlaced {
            order_id: Uuid::nil(),
            customer_id: "c1".into(),
            lines: vec![OrderLine {
                product_id: "p1".into(),
                quantity: 2,
                unit_price: 150,
            }],
            total: 300,
            shipping_address: Address::example(),
        })
    }

    #[test]
    fn an_envelope_round_trips_through_its_wire_bytes() {
        let env = Envelope::new(&placed(), "o1", 1, Uuid::nil(), Uuid::nil());
        let (back, event) = Envelope::decode(&env.to_bytes()).unwrap();
        assert_eq!(back, env);
        assert_eq!(event, placed());
        assert_eq!(back.event_type, "OrderPlaced");
    }

    #[test]
    fn an_unknown_event_type_is_named_in_the_error() {
        let mut env = Envelope::new(&placed(), "o1", 1, Uuid::nil(), Uuid::nil());
        env.event_type = "OrderTeleported".into();
        let err = Envelope::decode(&env.to_bytes()).unwrap_err();
        assert_eq!(err.to_string(), "unknown event type 'OrderTeleported'");
    }

    #[test]
    fn a_payload_whose_total_disagrees_with_its_lines_is_rejected() {
        let mut env = Envelope::new(&placed(), "o1", 1, Uuid::nil(), Uuid::nil());
        env.payload["total"] = 1.into();
        let err = Envelope::decode(&env.to_bytes()).unwrap_err();
        assert!(
            err.to_string().contains("does not match the lines"),
            "{err}"
        );
    }

    #[test]
    fn a_missing_payload_field_is_named_in_the_error() {
        let mut env = Envelope::new(&placed(), "o1", 1, Uuid::nil(), Uuid::nil());
        env.payload.as_object_mut().unwrap().remove("customerId");
        let err = Envelope::decode(&env.to_bytes()).unwrap_err();
        assert!(err.to_string().contains("customerId"), "{err}");
    }

    #[test]
    fn garbage_bytes_are_not_an_envelope() {
        assert!(matches!(
            Envelope::decode(b"{not json"),
            Err(DecodeError::Envelope(_))
        ));
    }

    #[test]
    fn a_newer_schema_version_is_refused_rather_than_misread() {
        let mut env = Envelope::new(&placed(), "o1", 1, Uuid::nil(), Uuid::nil());
        env.schema_version = 3;
        let err = Envelope::decode(&env.to_bytes()).unwrap_err();
        assert!(matches!(err, DecodeError::UnsupportedVersion { .. }));
        assert_eq!(
            err.to_string(),
            "unsupported schema version 3 for OrderPlaced (supported: 1 to 2)"
        );
    }

    #[test]
    fn every_kind_has_a_distinct_name_and_subject() {
        let mut names: Vec<_> = EventKind::ALL.iter().map(|k| k.name()).collect();
        let mut subjects: Vec<_> = EventKind::ALL.iter().map(|k| k.subject_token()).collect();
        names.sort();
        names.dedup();
        subjects.sort();
        subjects.dedup();
        assert_eq!(names.len(), EventKind::ALL.len());
        assert_eq!(subjects.len(), EventKind::ALL.len());
        assert!(
            EventKind::ALL
                .iter()
                .all(|k| EventKind::from_name(k.name()) == Some(*k))
        );
    }
}
