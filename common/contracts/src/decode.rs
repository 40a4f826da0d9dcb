//! Wire bytes to a typed event, on every read path (an event consumed from
//! the broker, an event store's load, a projection's replay, a dead letter
//! redriven): parse the envelope, bring an older schema version up to the
//! current one ([`upcast`]), decode the payload, and check that the
//! envelope agrees with it.

use crate::{
    event::{DecodeError, Envelope, Event, EventKind},
    limits, upcast,
};

impl Envelope {
    /// Parses wire bytes into an envelope and a typed event, bringing an
    /// older schema version up to the current one ([`upcast`]): the
    /// envelope returned carries the current version and payload.
    pub fn decode(bytes: &[u8]) -> Result<(Envelope, Event), DecodeError> {
        let mut envelope: Envelope =
            serde_json::from_slice(bytes).map_err(|e| DecodeError::Envelope(e.to_string()))?;
        envelope.upcast()?;
        let event = Event::from_envelope(&envelope)?;
        envelope.check_consistent(&event)?;
        Ok((envelope, event))
    }

    fn upcast(&mut self) -> Result<(), DecodeError> {
        let kind = EventKind::from_name(&self.event_type)
            .ok_or_else(|| DecodeError::UnknownType(self.event_type.clone()))?;
        if self.schema_version == kind.schema_version() {
            return Ok(());
        }
        let payload = std::mem::take(&mut self.payload);
        self.payload =
            upcast::upcast(kind, self.schema_version, payload).map_err(
                |refused| match refused {
                    None => DecodeError::UnsupportedVersion {
                        event_type: self.event_type.clone(),
                        version: self.schema_version,
                        oldest: upcast::oldest_version(kind),
                        newest: kind.schema_version(),
                    },
                    Some(reason) => DecodeError::Payload {
                        event_type: self.event_type.clone(),
                        reason,
                    },
                },
            )?;
        self.schema_version = kind.schema_version();
        Ok(())
    }

    /// What the envelope says must agree with its payload: the owning
    /// aggregate type, a positive version, a bounded aggregate id, and the
    /// saga it belongs to (`correlationId` is always the order id).
    fn check_consistent(&self, event: &Event) -> Result<(), DecodeError> {
        let invalid = |reason: String| DecodeError::Payload {
            event_type: self.event_type.clone(),
            reason,
        };
        let kind = event.kind();
        if self.aggregate_type != kind.aggregate_type() {
            return Err(invalid(format!(
                "aggregateType '{}' is not '{}'",
                self.aggregate_type,
                kind.aggregate_type()
            )));
        }
        limits::check_id("aggregateId", &self.aggregate_id).map_err(invalid)?;
        if self.version < 1 {
            return Err(invalid(format!(
                "version must be positive, got {}",
                self.version
            )));
        }
        if self.metadata.correlation_id != event.order_id() {
            return Err(invalid(format!(
                "metadata.correlationId {} is not the payload's orderId {}",
                self.metadata.correlation_id,
                event.order_id()
            )));
        }
        Ok(())
    }
}
