//! Subject and stream names, all derived from one prefix so that several
//! systems (or tests) can share a broker without seeing each other.

use crate::event::EventKind;

/// Names for one subject prefix (default `saga`).
#[derive(Debug, Clone)]
pub struct Subjects {
    prefix: String,
}

impl Subjects {
    pub fn new(prefix: impl Into<String>) -> Subjects {
        Subjects {
            prefix: prefix.into(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `saga.order.placed` and so on.
    pub fn event(&self, kind: EventKind) -> String {
        format!("{}.{}", self.prefix, kind.subject_token())
    }

    /// What a consumer filters on to get every event of `kind`: its subject,
    /// and `.*` after it for a kind [keyed by order](EventKind::keyed_by_order).
    pub fn filter(&self, kind: EventKind) -> String {
        if kind.keyed_by_order() {
            format!("{}.*", self.event(kind))
        } else {
            self.event(kind)
        }
    }

    /// The subject an event of `kind` about `order_id` is published on: the
    /// type's, and for a kind [keyed by order](EventKind::keyed_by_order)
    /// `.<order_id>` after it.
    pub fn event_of(&self, kind: EventKind, order_id: uuid::Uuid) -> String {
        if kind.keyed_by_order() {
            format!("{}.{order_id}", self.event(kind))
        } else {
            self.event(kind)
        }
    }

    /// Every subject an order's ending from outside its saga can be
    /// published on (`saga.order.*.<orderId>`: the customer's cancel, the
    /// operator's resolution; the kinds [keyed by
    /// order](EventKind::keyed_by_order), all of them the order's): the
    /// stream's last message on it says whether, and how, the order ended
    /// that way.
    pub fn ended_from_outside(&self, order_id: uuid::Uuid) -> String {
        format!("{}.order.*.{order_id}", self.prefix)
    }

    /// Everything: `saga.>` (events, dead letters and commands).
    pub fn all(&self) -> String {
        format!("{}.>", self.prefix)
    }

    /// Dead letters of one consumer: `saga.dlq.payment`.
    pub fn dead_letter(&self, consumer: &str) -> String {
        format!("{}.dlq.{consumer}", self.prefix)
    }

    /// An operator action's audit record: `saga.operator.dlq-redrive`.
    pub fn operator(&self, action: &str) -> String {
        format!("{}.operator.{action}", self.prefix)
    }

    /// Whether `subject` is an operator action's.
    pub fn is_operator(&self, subject: &str) -> bool {
        subject
            .strip_prefix(&self.prefix)
            .is_some_and(|rest| rest.starts_with(".operator."))
    }

    /// Request-reply command to place an order: `saga.cmd.order.place`.
    pub fn place_order_command(&self) -> String {
        format!("{}.cmd.order.place", self.prefix)
    }

    /// Request-reply command to cancel an order: `saga.cmd.order.cancel`.
    pub fn cancel_order_command(&self) -> String {
        format!("{}.cmd.order.cancel", self.prefix)
    }

    /// Every request-reply command of the order service: `saga.cmd.order.*`.
    pub fn order_commands(&self) -> String {
        format!("{}.cmd.order.*", self.prefix)
    }

    /// A product's catalog events: `saga.catalog.product.<token>`, the
    /// token made by [`crate::product::subject_token`].
    pub fn product(&self, product_id: &str) -> String {
        format!(
            "{}.catalog.product.{}",
            self.prefix,
            crate::product::subject_token(product_id)
        )
    }

    /// Every catalog event: `saga.catalog.>`.
    pub fn catalog(&self) -> String {
        format!("{}.catalog.>", self.prefix)
    }

    /// Whether `subject` is a catalog event's (in the catalog's stream).
    pub fn is_catalog(&self, subject: &str) -> bool {
        subject
            .strip_prefix(self.prefix.as_str())
            .is_some_and(|rest| rest.starts_with(".catalog."))
    }

    /// `SAGA_CATALOG` for prefix `saga`: the latest catalog event of each product.
    pub fn catalog_stream(&self) -> String {
        self.stream_name("SAGA_CATALOG")
    }

    /// `SAGA_EVENTS` for prefix `saga`.
    pub fn events_stream(&self) -> String {
        self.stream_name("SAGA_EVENTS")
    }

    /// `SAGA_DLQ` for prefix `saga`.
    pub fn dead_letter_stream(&self) -> String {
        self.stream_name("SAGA_DLQ")
    }

    /// Rewrites a name written for the default prefix (`saga.x`, `SAGA_X`)
    /// to this prefix. The topology files in `nats/` are written for `saga`.
    pub fn rewrite_subject(&self, subject: &str) -> String {
        match subject.strip_prefix("saga.") {
            Some(rest) => format!("{}.{rest}", self.prefix),
            None => subject.to_string(),
        }
    }

    pub fn stream_name(&self, default_name: &str) -> String {
        match default_name.strip_prefix("SAGA_") {
            Some(rest) => format!("{}_{rest}", self.prefix.to_uppercase().replace('-', "_")),
            None => default_name.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_prefix() {
        let s = Subjects::new("t-9");
        assert_eq!(
            s.event(EventKind::InventoryReservationFailed),
            "t-9.inventory.reservation_failed"
        );
        assert_eq!(s.events_stream(), "T_9_EVENTS");
        assert_eq!(s.rewrite_subject("saga.order.>"), "t-9.order.>");
        assert_eq!(s.dead_letter("payment"), "t-9.dlq.payment");
    }

    /// The wildcard a service asks the stream with covers every kind keyed
    /// by order, and no other subject an event can be published on.
    #[test]
    fn an_order_ended_from_outside_is_found_under_one_wildcard() {
        let s = Subjects::new("saga");
        let order = uuid::Uuid::now_v7();
        let pattern = s.ended_from_outside(order);
        let matches = |subject: &str| {
            let (p, t): (Vec<_>, Vec<_>) =
                (pattern.split('.').collect(), subject.split('.').collect());
            p.len() == t.len() && p.iter().zip(&t).all(|(p, t)| *p == "*" || p == t)
        };
        for kind in EventKind::ALL.iter().copied() {
            assert_eq!(
                matches(&s.event_of(kind, order)),
                kind.keyed_by_order(),
                "{kind:?}"
            );
        }
        assert!(!matches(&s.event_of(
            EventKind::OrderCancelledByCustomer,
            uuid::Uuid::now_v7()
        )));
    }
}
