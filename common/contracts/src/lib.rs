//! What crosses the wire between the saga's services, and nothing that runs:
//! the event envelope and catalog ([`event`]), the bounds every input is
//! held to ([`limits`]), the operator audit record ([`operator`]), the product catalog's events
//! ([`product`]), subject
//! and stream names ([`subjects`]), how older schema versions of an
//! event read as the current one ([`upcast`]), and decoding, which brings
//! them up ([`decode`]); with the `schema` feature, the JSON Schema of
//! every event type and version ([`schema`]). An
//! outside producer, or a test that only speaks the protocol, depends on
//! this crate alone; the runtime (`common`) builds on it.

pub mod decode;
pub mod event;
pub mod limits;
pub mod operator;
pub mod product;
#[cfg(feature = "schema")]
pub mod schema;
pub mod subjects;
pub mod upcast;

pub use event::{Envelope, Event, EventKind};
pub use subjects::Subjects;
