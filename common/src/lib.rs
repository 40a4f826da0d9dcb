//! The runtime every saga service shares: JetStream topology, the
//! transactional outbox and its relay, the idempotent consumer runtime,
//! configuration, telemetry, health and the HTTP shell, and the roster of
//! services. What crosses the wire (envelope, catalog, limits, subjects) is
//! the `contracts` crate in `common/contracts/`, re-exported here so a
//! service depends on one crate.

pub mod api_doc;
pub mod backoff;
pub mod broker;
pub mod cancels;
pub mod cli;
pub mod compensation;
pub mod config;
pub mod consumer;
pub mod counter;
pub mod dlq;
pub mod health;
pub mod http;
pub mod http_shell;
pub mod idempotency;
pub mod janitor;
pub mod meter;
pub mod outbox;
pub mod permissions;
pub mod progress;
pub mod relay_lease;
pub mod roster;
pub mod service;
pub mod sql;
pub mod telemetry;
pub mod topology;
pub mod trace;

pub use config::{Config, ConfigArgs};
pub use consumer::{Applying, Handler, HandlerError, Outcome};
pub use contracts::{
    Envelope, Event, EventKind, Subjects, event, limits, operator, product, subjects,
};
pub use service::{Infra, Service, StartError};

/// The value after `key` on the first line of `text` that starts with it
/// (leading blanks ignored): how tests read one setting of a shipped file.
#[cfg(test)]
pub(crate) fn setting<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines().find_map(|l| l.trim().strip_prefix(key))
}
