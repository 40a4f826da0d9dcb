//! Who may publish and subscribe to what on the broker: each service of the
//! roster connects as its own user (`NATS_USER`, `NATS_PASSWORD`) and may
//! publish only its own events and its own dead letters, read the streams
//! and its own durable consumers (info, pull, ack), and subscribe only to
//! its own inbox prefix (`_INBOX_<user>.>`; and, for the order service,
//! its commands). It may not create, change, purge or delete a stream or a
//! consumer: the provisioning identity ([`PROVISIONER`]) does that, in a
//! step of its own. A forged `PaymentProcessed` from the order service's
//! credentials, or a `+TERM` sent for another service's delivery, is
//! refused by the broker.
//!
//! The operator user may do everything: hand-published events, `sagactl`
//! (which redrives dead letters under this identity).
//!
//! [`authorization`] writes the server's `authorization` block for a prefix;
//! `stack compose --write` generates `nats/auth.conf` from it, and the test
//! harness writes one per test.

use crate::{
    Subjects, roster,
    topology::{Stream, WATCHES},
};

/// The user hand-published events and `sagactl` connect as: every subject.
pub const OPERATOR: &str = "operator";

/// The user that creates and updates the streams and durable consumers
/// (`stack provision`, the compose `provision` service).
pub const PROVISIONER: &str = "provisioner";

/// Subjects a user may publish and subscribe to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permissions {
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
    /// May answer requests it received (once each): only the order service,
    /// which answers commands.
    pub answers_requests: bool,
}

/// The inbox prefix of `user`: replies to its requests (JetStream API
/// answers, pulled messages) arrive under it, and only it may subscribe
/// there (`_INBOX_payment`).
pub fn inbox_prefix(user: &str) -> String {
    format!("_INBOX_{user}")
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
    publish.push("$JS.API.INFO".into());
    for stream in STREAMS {
        let s = stream.name(subjects);
        // Every service checks the streams at start-up and reads them (a
        // dead letter it wrote, an order's cancel, consumer lag).
        for verb in ["INFO", "MSG.GET"] {
            publish.push(format!("$JS.API.STREAM.{verb}.{s}"));
        }
        publish.push(format!("$JS.API.DIRECT.GET.{s}"));
        publish.push(format!("$JS.API.DIRECT.GET.{s}.>"));
    }
    for (stream, durable) in durables(service) {
        let s = stream.name(subjects);
        publish.push(subjects.dead_letter(durable));
        publish.push(format!("$JS.API.CONSUMER.INFO.{s}.{durable}"));
        publish.push(format!("$JS.API.CONSUMER.MSG.NEXT.{s}.{durable}"));
        publish.push(format!("$JS.ACK.{s}.{durable}.>"));
    }
    let mut subscribe = vec![format!("{}.>", inbox_prefix(service))];
    if service == "order" {
        let catalog = Stream::Catalog.name(subjects);
        // Where each service's consumer stands: how far a saga's next step
        // is behind (stalls, the page).
        publish.push(format!(
            "$JS.API.CONSUMER.INFO.{}.*",
            Stream::Events.name(subjects)
        ));
        // The catalog is rebuilt through an ordered consumer of its own
        // (created and deleted on the catalog's stream only).
        publish.push(format!("$JS.API.CONSUMER.CREATE.{catalog}"));
        publish.push(format!("$JS.API.CONSUMER.CREATE.{catalog}.>"));
        publish.push(format!("$JS.API.CONSUMER.DELETE.{catalog}.>"));
        publish.push(format!("$JS.API.CONSUMER.INFO.{catalog}.>"));
        publish.push(format!("$JS.API.CONSUMER.MSG.NEXT.{catalog}.>"));
        publish.push(format!("$JS.ACK.{catalog}.>"));
        subscribe.push(subjects.order_commands());
    }
    publish.sort();
    publish.dedup();
    Permissions {
        publish,
        subscribe,
        answers_requests: service == "order",
    }
}

/// What the provisioning identity may do: create and update our streams
/// and durable consumers, and read them; never purge or delete them, and
/// publish no event.
pub fn of_provisioner(subjects: &Subjects) -> Permissions {
    let mut publish = vec!["$JS.API.INFO".to_string()];
    for stream in STREAMS {
        let s = stream.name(subjects);
        for verb in ["INFO", "CREATE", "UPDATE"] {
            publish.push(format!("$JS.API.STREAM.{verb}.{s}"));
        }
    }
    let durables = roster::names()
        .map(|name| (Stream::Events, name))
        .chain(WATCHES.iter().map(|w| (w.on, w.name)));
    for (stream, durable) in durables {
        let s = stream.name(subjects);
        publish.push(format!("$JS.API.CONSUMER.CREATE.{s}.{durable}"));
        publish.push(format!("$JS.API.CONSUMER.CREATE.{s}.{durable}.>"));
        publish.push(format!("$JS.API.CONSUMER.DURABLE.CREATE.{s}.{durable}"));
        publish.push(format!("$JS.API.CONSUMER.INFO.{s}.{durable}"));
    }
    publish.sort();
    publish.dedup();
    Permissions {
        publish,
        subscribe: vec![format!("{}.>", inbox_prefix(PROVISIONER))],
        answers_requests: false,
    }
}

/// The permissions of every user but the operator, by user.
pub fn users(subjects: &Subjects) -> Vec<(&'static str, Permissions)> {
    roster::names()
        .map(|service| (service, of_service(subjects, service)))
        .chain([(PROVISIONER, of_provisioner(subjects))])
        .collect()
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
    for (user, perms) in users(subjects) {
        let responses = if perms.answers_requests {
            "\n        allow_responses: { max: 1 }"
        } else {
            ""
        };
        out += &format!(
            "    {{\n      user: {user:?}\n      password: {}\n      permissions: {{\n        publish: {{ allow: {} }}\n        subscribe: {{ allow: {} }}{responses}\n      }}\n    }}\n",
            password(user),
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
                let own = kind.aggregate_type() == service;
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
        for service in roster::names() {
            assert!(
                !may_publish(service, "saga.operator.dlq-redrive"),
                "{service}"
            );
            assert!(!may_publish(service, &s.catalog_stream()), "{service}");
        }
        assert!(!may_publish("order", &s.product("widget")));
    }

    #[test]
    fn no_service_may_change_a_stream_or_a_consumer_and_the_provisioner_publishes_nothing_else() {
        let provisioner = of_provisioner(&Subjects::new("saga"));
        let provisions = |subject: &str| provisioner.publish.iter().any(|p| matches(p, subject));
        for service in roster::names() {
            for verb in ["CREATE", "UPDATE", "DELETE", "PURGE"] {
                let subject = format!("$JS.API.STREAM.{verb}.SAGA_EVENTS");
                assert!(!may_publish(service, &subject), "{service} {subject}");
            }
            for verb in ["CREATE", "DURABLE.CREATE", "DELETE"] {
                let subject = format!("$JS.API.CONSUMER.{verb}.SAGA_EVENTS.{service}");
                assert!(!may_publish(service, &subject), "{service} {subject}");
                assert!(
                    !may_publish(service, &format!("{subject}.x")),
                    "{service} {subject}"
                );
            }
            assert!(provisions(&format!(
                "$JS.API.CONSUMER.CREATE.SAGA_EVENTS.{service}"
            )));
            assert!(!provisions(&format!(
                "$JS.API.CONSUMER.DELETE.SAGA_EVENTS.{service}"
            )));
            assert_eq!(
                of_service(&Subjects::new("saga"), service).subscribe[0],
                format!("_INBOX_{service}.>")
            );
        }
        assert!(provisions("$JS.API.STREAM.UPDATE.SAGA_EVENTS"));
        assert!(!provisions("$JS.API.STREAM.PURGE.SAGA_EVENTS"));
        assert!(!provisions("$JS.API.STREAM.DELETE.SAGA_DLQ"));
        assert!(!provisions("saga.order.placed"));
        assert_eq!(
            provisioner.subscribe,
            vec!["_INBOX_provisioner.>".to_string()]
        );
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
        for user in roster::names().chain([OPERATOR, PROVISIONER]) {
            assert_eq!(
                text.matches(&format!("user: {user:?}")).count(),
                1,
                "{user}"
            );
            assert!(text.contains(&format!("$NATS_PASSWORD_{}", user.to_ascii_uppercase())));
        }
        assert!(text.contains("\"t1.payment.>\""));
        assert!(!text.contains("saga."));
        assert_eq!(
            text.matches("allow_responses").count(),
            1,
            "only the order service answers"
        );
    }
}
