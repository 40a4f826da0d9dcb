//! Who may publish and subscribe to what on the broker: each service of the
//! roster connects as its own user (`NATS_USER`, `NATS_PASSWORD`) and may
//! publish only its own events, its own dead letters and the JetStream API
//! calls its consumers and streams need, and subscribe only to replies (and,
//! for the order service, its commands). A forged `PaymentRefunded` from
//! inventory's credentials is refused by the broker. The operator user may do
//! everything (hand-published events, `sagactl`).
//!
//! The order service also republishes dead letters on an operator's request
//! (`POST /dead-letters/redrive`, behind the admin token), so it may publish
//! on every subject of the events and catalog streams.
//!
//! [`authorization`] writes the server's `authorization` block for a prefix;
//! `stack compose --write` generates `nats/auth.conf` from it, and the test
//! harness writes one per test.

use crate::{
    Subjects, roster,
    topology::{self, Stream, WATCHES},
};

/// The user hand-published events and `sagactl` connect as: every subject.
pub const OPERATOR: &str = "operator";

/// Subjects a user may publish and subscribe to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permissions {
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
}

/// The durable consumers `service` reads through, with their streams: its
/// inputs on the events stream and, for the order service, its watches.
fn durables(service: &str) -> Vec<(Stream, &'static str)> {
    let mut out = Vec::new();
    if let Some(spec) = roster::find(service) {
        out.push((Stream::Events, spec.name));
    }
    out.extend(
        WATCHES
            .iter()
            .filter(|w| owner_of_watch(w.name) == service)
            .map(|w| (w.on, w.name)),
    );
    out
}

/// Every watch is the order service's (`order-…`).
fn owner_of_watch(name: &str) -> &str {
    name.split('-').next().unwrap_or(name)
}

const STREAMS: [Stream; 3] = [Stream::Events, Stream::DeadLetters, Stream::Catalog];

/// What roster service `service` may do on the broker under `subjects`.
pub fn of_service(subjects: &Subjects, service: &str) -> Permissions {
    let p = subjects.prefix();
    let mut publish = vec![format!("{p}.{service}.>")];
    if service == "inventory" {
        // Inventory owns the catalog: its price events.
        publish.push(subjects.catalog());
    }
    if service == "order" {
        // Redrive republishes a dead letter on its own subject, and records
        // the operator's action.
        let streams = topology::stream_configs(subjects)
            .expect("the stream files are compiled in and parse (topology tests)");
        for config in streams
            .iter()
            .filter(|c| c.name != subjects.dead_letter_stream())
        {
            publish.extend(config.subjects.iter().cloned());
        }
    }
    publish.push("$JS.API.INFO".into());
    for stream in STREAMS {
        let s = stream.name(subjects);
        // Every service applies every stream at start-up and reads them
        // (a dead letter it wrote, an order's cancel, consumer lag).
        for verb in ["INFO", "CREATE", "UPDATE", "MSG.GET"] {
            publish.push(format!("$JS.API.STREAM.{verb}.{s}"));
        }
        publish.push(format!("$JS.API.DIRECT.GET.{s}"));
        publish.push(format!("$JS.API.DIRECT.GET.{s}.>"));
    }
    for (stream, durable) in durables(service) {
        let s = stream.name(subjects);
        publish.push(subjects.dead_letter(durable));
        publish.push(format!("$JS.API.CONSUMER.CREATE.{s}.{durable}"));
        publish.push(format!("$JS.API.CONSUMER.CREATE.{s}.{durable}.>"));
        publish.push(format!("$JS.API.CONSUMER.DURABLE.CREATE.{s}.{durable}"));
        publish.push(format!("$JS.API.CONSUMER.INFO.{s}.{durable}"));
        publish.push(format!("$JS.API.CONSUMER.MSG.NEXT.{s}.{durable}"));
        publish.push(format!("$JS.ACK.{s}.{durable}.>"));
    }
    let mut subscribe = vec!["_INBOX.>".to_string()];
    if service == "order" {
        let dlq = Stream::DeadLetters.name(subjects);
        let catalog = Stream::Catalog.name(subjects);
        // Redrive deletes what it republished; the catalog is rebuilt
        // through an ordered consumer of its own.
        publish.push(format!("$JS.API.STREAM.MSG.DELETE.{dlq}"));
        // Where each service's consumer stands: how far a saga's next step
        // is behind (stalls, the page).
        publish.push(format!(
            "$JS.API.CONSUMER.INFO.{}.*",
            Stream::Events.name(subjects)
        ));
        publish.push(format!("$JS.API.CONSUMER.*.{catalog}.>"));
        publish.push(format!("$JS.API.CONSUMER.*.{catalog}"));
        subscribe.push(subjects.order_commands());
    }
    publish.sort();
    publish.dedup();
    Permissions { publish, subscribe }
}

/// The `authorization` block of a nats-server configuration: a user per
/// roster service and the operator, each with the password `password`
/// gives it (for the shipped file, a reference to an environment variable:
/// `$NATS_PASSWORD_ORDER`).
pub fn authorization(subjects: &Subjects, password: impl Fn(&str) -> String) -> String {
    let list = |subjects: &[String]| {
        let quoted: Vec<String> = subjects.iter().map(|s| format!("{s:?}")).collect();
        format!("[{}]", quoted.join(", "))
    };
    let mut out = String::from("authorization {\n  users: [\n");
    for service in roster::names() {
        let perms = of_service(subjects, service);
        out += &format!(
            "    {{\n      user: {service:?}\n      password: {}\n      permissions: {{\n        publish: {{ allow: {} }}\n        subscribe: {{ allow: {} }}\n        allow_responses: true\n      }}\n    }}\n",
            password(service),
            list(&perms.publish),
            list(&perms.subscribe),
        );
    }
    out += &format!(
        "    {{ user: {OPERATOR:?}, password: {} }}\n  ]\n}}\n",
        password(OPERATOR)
    );
    out
}

/// The environment variable the shipped configuration reads `user`'s
/// password from: `NATS_PASSWORD_ORDER`, …, `NATS_PASSWORD_OPERATOR`.
pub fn password_variable(user: &str) -> String {
    format!("NATS_PASSWORD_{}", user.to_ascii_uppercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether NATS subject pattern `pattern` matches `subject`.
    fn matches(pattern: &str, subject: &str) -> bool {
        let (mut p, mut s) = (pattern.split('.'), subject.split('.'));
        loop {
            match (p.next(), s.next()) {
                (Some(">"), Some(_)) => return true,
                (Some("*"), Some(_)) => {}
                (Some(a), Some(b)) if a == b => {}
                (None, None) => return true,
                _ => return false,
            }
        }
    }

    fn may_publish(service: &str, subject: &str) -> bool {
        of_service(&Subjects::new("saga"), service)
            .publish
            .iter()
            .any(|p| matches(p, subject))
    }

    #[test]
    fn a_service_publishes_its_own_events_and_dead_letters_only() {
        let s = Subjects::new("saga");
        for kind in crate::EventKind::ALL {
            let subject = s.event_of(*kind, uuid::Uuid::nil());
            for service in roster::names() {
                let own = kind.aggregate_type() == service || service == "order";
                assert_eq!(may_publish(service, &subject), own, "{service} {subject}");
            }
        }
        assert!(may_publish("inventory", &s.product("widget")));
        assert!(!may_publish("payment", &s.product("widget")));
        assert!(may_publish("payment", "saga.dlq.payment"));
        assert!(!may_publish("payment", "saga.dlq.inventory"));
        for w in WATCHES {
            assert!(may_publish("order", &s.dead_letter(w.name)), "{}", w.name);
            assert!(!may_publish("shipping", &s.dead_letter(w.name)));
        }
        assert!(!may_publish("inventory", "saga.operator.dlq-redrive"));
        assert!(may_publish("order", "saga.operator.dlq-redrive"));
    }

    #[test]
    fn a_service_reads_its_own_consumers_and_may_not_delete_streams() {
        assert!(may_publish(
            "payment",
            "$JS.API.CONSUMER.MSG.NEXT.SAGA_EVENTS.payment"
        ));
        assert!(may_publish(
            "payment",
            "$JS.ACK.SAGA_EVENTS.payment.1.2.3.4.5"
        ));
        assert!(!may_publish(
            "payment",
            "$JS.API.CONSUMER.MSG.NEXT.SAGA_EVENTS.inventory"
        ));
        assert!(!may_publish(
            "payment",
            "$JS.ACK.SAGA_EVENTS.inventory.1.2.3.4.5"
        ));
        assert!(may_publish(
            "order",
            "$JS.API.CONSUMER.MSG.NEXT.SAGA_DLQ.order-timeline-dead-letters"
        ));
        for service in roster::names() {
            for verb in ["DELETE", "PURGE"] {
                assert!(!may_publish(
                    service,
                    &format!("$JS.API.STREAM.{verb}.SAGA_EVENTS")
                ));
            }
            assert!(!may_publish(
                service,
                "$JS.API.STREAM.MSG.DELETE.SAGA_EVENTS"
            ));
        }
    }

    #[test]
    fn only_the_order_service_sees_where_other_consumers_stand() {
        let info = "$JS.API.CONSUMER.INFO.SAGA_EVENTS.inventory";
        assert!(may_publish("order", info));
        assert!(!may_publish("payment", info));
        assert!(!may_publish(
            "order",
            "$JS.API.CONSUMER.MSG.NEXT.SAGA_EVENTS.inventory"
        ));
    }

    #[test]
    fn every_watch_belongs_to_a_roster_service() {
        for w in WATCHES {
            assert!(roster::find(owner_of_watch(w.name)).is_some(), "{}", w.name);
        }
    }

    #[test]
    fn the_authorization_block_names_every_user_once() {
        let text = authorization(&Subjects::new("t1"), |u| {
            format!("${}", password_variable(u))
        });
        for user in roster::names().chain([OPERATOR]) {
            assert_eq!(
                text.matches(&format!("user: {user:?}")).count(),
                1,
                "{user}"
            );
            assert!(text.contains(&format!("$NATS_PASSWORD_{}", user.to_ascii_uppercase())));
        }
        assert!(text.contains("\"t1.payment.>\""));
        assert!(!text.contains("saga."));
    }
}
