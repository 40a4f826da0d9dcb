//! Dead-lettering a delivery that can never be applied: its original bytes
//! and the reason go to the dead-letter stream ([`crate::dlq`]), then the
//! delivery is terminated. Never dropped: while the dead-letter stream
//! refuses it, the delivery is retried.

use std::time::Duration;

use async_nats::jetstream::AckKind;

use super::{
    Applier, HEALTH_DEAD_LETTERS, Handler,
    apply::{Disposition, ack},
    received::Delivery,
};
use crate::{
    backoff::backoff,
    dlq::{self, About, Letter},
    event::Envelope,
    health::Condition,
};

impl<H: Handler> Applier<H> {
    /// Publishes the original bytes with the reason to the dead-letter stream,
    /// then terminates the delivery. If the dead-letter publish fails the
    /// event is nak'ed instead: it is never dropped.
    pub(super) async fn dead_letter(
        &self,
        d: &Delivery<'_>,
        envelope: Option<&Envelope>,
        reason: String,
    ) -> Disposition {
        let letter = Letter {
            consumer: &self.name,
            msg: d.msg,
            delivered: d.delivered,
            stream_seq: d.stream_seq,
            stream: self.subjects.events_stream(),
            about: envelope.map(About::saga_event),
            reason: &reason,
        };
        match dlq::send(&self.js, &self.subjects, self.max_payload, letter).await {
            Ok(()) => {
                if self.health.ok(HEALTH_DEAD_LETTERS) {
                    tracing::info!(consumer = %self.name, "dead letters are accepted again");
                }
                tracing::error!(consumer = %self.name, subject = %d.msg.subject, stream_seq = d.stream_seq, %reason, "event dead-lettered");
                ack(d.msg, AckKind::Term).await;
                Disposition::DeadLettered(reason)
            }
            Err(e) => {
                let detail = format!(
                    "the dead-letter stream refuses messages ({e}); events that cannot be applied are retried meanwhile"
                );
                if (self.health).report(HEALTH_DEAD_LETTERS, Condition::Failing(detail)) {
                    tracing::error!(consumer = %self.name, error = %e, "cannot dead-letter");
                }
                let delay = backoff(d.delivered, Duration::from_secs(10));
                ack(d.msg, AckKind::Nak(Some(delay))).await;
                Disposition::Retry(format!("dead-letter publish failed ({e}) for: {reason}"))
            }
        }
    }
}
