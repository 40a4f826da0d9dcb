//! What every saga service shares: the event envelope and catalog, subject
//! names and JetStream topology, the transactional outbox and its relay, the
//! idempotent consumer runtime, configuration, telemetry and the HTTP shell.

pub mod backoff;
pub mod config;
pub mod consumer;
pub mod event;
pub mod health;
pub mod http;
pub mod idempotency;
pub mod limits;
pub mod outbox;
pub mod roster;
pub mod service;
pub mod subjects;
pub mod telemetry;
pub mod topology;

pub use config::Config;
pub use consumer::{Handler, HandlerError, Outcome};
pub use event::{Envelope, Event, EventKind};
pub use service::{Infra, Service, StartError};
pub use subjects::Subjects;
