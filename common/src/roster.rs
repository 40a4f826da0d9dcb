//! The services of the saga, defined once. Everything that names them (the
//! default ports, the JetStream consumers, the databases, the stack tool, the
//! test harness, docker-compose.yml and its init SQL) derives from this list
//! or is checked against it by a test.

/// One service of the saga, as the infrastructure around it sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceSpec {
    /// Crate, binary, durable consumer, Redis namespace and database suffix.
    pub name: &'static str,
    /// HTTP port when started locally (`HTTP_ADDR` overrides it).
    pub default_port: u16,
    /// Its durable pull consumer on the events stream (`nats/consumers/<name>.json`).
    pub consumer: &'static str,
}

impl ServiceSpec {
    /// Its database on the shared Postgres: `saga_<name>`.
    pub fn database(&self) -> String {
        format!("saga_{}", self.name)
    }

    /// The environment variable that overrides its local port: `ORDER_PORT`, ….
    pub fn port_variable(&self) -> String {
        format!("{}_PORT", self.name.to_ascii_uppercase())
    }
}

/// The saga's services, in the order a saga reaches them.
pub const SERVICES: [ServiceSpec; 4] = [
    spec(
        "order",
        8081,
        include_str!("../../nats/consumers/order.json"),
    ),
    spec(
        "payment",
        8082,
        include_str!("../../nats/consumers/payment.json"),
    ),
    spec(
        "inventory",
        8083,
        include_str!("../../nats/consumers/inventory.json"),
    ),
    spec(
        "shipping",
        8084,
        include_str!("../../nats/consumers/shipping.json"),
    ),
];

const fn spec(name: &'static str, default_port: u16, consumer: &'static str) -> ServiceSpec {
    ServiceSpec {
        name,
        default_port,
        consumer,
    }
}

/// The service called `name`.
pub fn find(name: &str) -> Option<&'static ServiceSpec> {
    SERVICES.iter().find(|s| s.name == name)
}

/// The names, in roster order.
pub fn names() -> impl Iterator<Item = &'static str> {
    SERVICES.iter().map(|s| s.name)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn names_and_ports_are_unique() {
        let names: BTreeSet<_> = names().collect();
        let ports: BTreeSet<_> = SERVICES.iter().map(|s| s.default_port).collect();
        assert_eq!(names.len(), SERVICES.len());
        assert_eq!(ports.len(), SERVICES.len());
    }

    #[test]
    fn each_consumer_file_is_the_services_own() {
        for s in SERVICES {
            let c: serde_json::Value = serde_json::from_str(s.consumer).unwrap();
            assert_eq!(c["durable_name"], s.name, "nats/consumers/{}.json", s.name);
        }
    }

    /// A consumer file without a service (or a service whose file was not
    /// added) fails here: the folder holds the roster plus the order
    /// service's watches (dead letters, timeline).
    #[test]
    fn the_consumer_folder_holds_exactly_the_roster() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../nats/consumers");
        let found: BTreeSet<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        let mut expected: BTreeSet<String> = names().map(|n| format!("{n}.json")).collect();
        expected.extend(crate::topology::WATCHES.map(|w| format!("{}.json", w.name)));
        assert_eq!(found, expected);
    }

    /// Every workspace member but the shared and tooling crates is a service
    /// of the roster, and every service is a member.
    #[test]
    fn the_workspace_members_are_the_roster_and_the_shared_crates() {
        let manifest = include_str!("../../Cargo.toml");
        let members =
            crate::setting(manifest, "members = ").expect("workspace members on one line");
        let members: BTreeSet<&str> = members
            .trim_matches(|c| c == '[' || c == ']')
            .split(',')
            .map(|m| m.trim().trim_matches('"'))
            .filter(|m| !m.is_empty())
            .collect();
        let mut expected: BTreeSet<&str> = names().collect();
        expected.extend(["common", "common/contracts", "stack", "sagactl", "tests"]);
        assert_eq!(members, expected);
    }
}
