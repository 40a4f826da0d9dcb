//! A delivery as the runtime receives it: decoded once, checked against
//! the subject its event belongs on, or dead-lettered.

use std::time::Instant;

use async_nats::jetstream;

use opentelemetry::{KeyValue, trace::SpanKind};

use super::{Applier, Arriving, Handler};
use crate::{
    event::{DecodeError, Envelope, Event},
    trace::{self, Work},
};

/// One delivery of a message: how many times it has been delivered, and
/// where it is in the stream.
#[derive(Clone, Copy)]
pub(super) struct Delivery<'a> {
    pub msg: &'a jetstream::Message,
    pub delivered: i64,
    pub stream_seq: u64,
}

/// A delivery received: decoded, and on the subject its event belongs on.
pub(super) struct Received {
    pub msg: jetstream::Message,
    pub delivered: i64,
    pub stream_seq: u64,
    /// See [`Arriving::nothing_behind`].
    pub nothing_behind: bool,
    /// When the broker stored it (nanoseconds since the epoch).
    pub published: Option<i128>,
    /// When this service received it.
    pub started: Instant,
    pub envelope: Envelope,
    pub event: Event,
    /// Its applying, in the trace its message carried (`traceparent`).
    pub work: Work,
}

impl Received {
    pub fn delivery(&self) -> Delivery<'_> {
        Delivery {
            msg: &self.msg,
            delivered: self.delivered,
            stream_seq: self.stream_seq,
        }
    }

    pub fn arriving(&self) -> Arriving<'_> {
        Arriving {
            event: &self.event,
            nothing_behind: self.nothing_behind,
        }
    }
}

impl<H: Handler> Applier<H> {
    /// Decodes a delivery and checks its subject; one that fails either is
    /// dead-lettered here, and `None`.
    pub(super) async fn receive(&self, msg: jetstream::Message) -> Option<Received> {
        let started = Instant::now();
        let (delivered, stream_seq, published, nothing_behind) = match msg.info() {
            Ok(i) => (
                i.delivered,
                i.stream_sequence,
                Some(i.published.unix_timestamp_nanos()),
                i.delivered == 1 && i.pending == 0,
            ),
            Err(_) => (1, 0, None, false),
        };
        let (event_type, envelope, reason) = match Envelope::decode(&msg.payload) {
            Err(e) => ("undecodable", None, e.to_string()),
            Ok((envelope, event)) => {
                let expected = self.subjects.event_of(event.kind(), event.order_id());
                if msg.subject.as_str() == expected {
                    let parent = msg
                        .headers
                        .as_ref()
                        .and_then(|h| h.get(trace::TRACEPARENT))
                        .map(|v| v.as_str());
                    let work = self
                        .tracing
                        .start(SpanKind::Consumer, trace::parse(parent), || {
                            (
                                format!("apply {}", envelope.event_type),
                                vec![
                                    KeyValue::new("messaging.system", "nats"),
                                    KeyValue::new(
                                        "messaging.destination.name",
                                        msg.subject.to_string(),
                                    ),
                                    KeyValue::new(
                                        "messaging.message.id",
                                        envelope.event_id.to_string(),
                                    ),
                                    KeyValue::new(
                                        "messaging.consumer.group.name",
                                        self.name.clone(),
                                    ),
                                    KeyValue::new(
                                        "saga.correlation_id",
                                        envelope.metadata.correlation_id.to_string(),
                                    ),
                                    KeyValue::new("saga.delivered", delivered),
                                ],
                            )
                        });
                    return Some(Received {
                        work,
                        delivered,
                        stream_seq,
                        nothing_behind,
                        published,
                        started,
                        envelope,
                        event,
                        msg,
                    });
                }
                let reason = DecodeError::WrongSubject {
                    event_type: envelope.event_type.clone(),
                    subject: msg.subject.to_string(),
                    expected,
                }
                .to_string();
                (event.kind().name(), Some(envelope), reason)
            }
        };
        let delivery = Delivery {
            msg: &msg,
            delivered,
            stream_seq,
        };
        let disposition = self.dead_letter(&delivery, envelope.as_ref(), reason).await;
        self.meter.delivery(
            &self.name,
            event_type,
            disposition.label(),
            started.elapsed(),
            None,
        );
        None
    }
}
