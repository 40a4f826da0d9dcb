//! The JetStream consumer runtime every service uses: pull, deduplicate, apply
//! in one Postgres transaction with the outbox, then ack; nak with backoff on
//! transient failures; dead-letter what can never be applied.
//!
//! A service only supplies a [`Handler`]: given the open transaction and a
//! decoded event, say what happened ([`Outcome`]).

use std::{future::Future, sync::Arc, time::Duration};

use async_nats::{
    HeaderMap,
    jetstream::{self, AckKind, consumer::pull},
};
use futures::StreamExt;
use sqlx::{PgConnection, PgPool};
use tokio::{sync::Semaphore, task::JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{
    event::{Envelope, Event},
    idempotency::{self, Claim, IdempotencyStore},
    outbox::{self, OutboxSignal},
    subjects::Subjects,
};

/// What applying one event came to.
#[derive(Debug)]
pub enum Outcome {
    /// State changed; these events are committed to the outbox with it.
    Applied(Vec<Envelope>),
    /// Nothing to change (the state already reflects the event). Recorded as
    /// consumed so it is never looked at again.
    Skipped(String),
    /// The event depends on one this service has not applied yet (it arrived
    /// early or the other is late). Retried with backoff, then dead-lettered.
    NotYet(String),
    /// Well-formed but can never be applied here: dead-lettered.
    Rejected(String),
}

impl Outcome {
    /// An event on the consumer's subjects that its handler has no use for
    /// (published by hand, or a filter that grew): dead-lettered, named.
    pub fn not_handled(consumer: &str, event: &Event) -> Outcome {
        Outcome::Rejected(format!(
            "{consumer} does not handle {}",
            event.kind().name()
        ))
    }
}

/// Failures that are worth retrying: the same event may well succeed later.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    /// Optimistic concurrency lost against a concurrent writer.
    #[error("concurrent update of {0}; retrying")]
    Conflict(String),
}

/// A service's reaction to the events its consumer receives.
pub trait Handler: Send + Sync + 'static {
    /// Applies `event` within `tx`. Must not commit, and must do no I/O
    /// outside `tx`: the runtime commits the effect, the guard and the
    /// emitted events together, or none of them. A handler may be run for a
    /// duplicate whose transaction is then rolled back, so it must not act
    /// outside the transaction.
    fn handle<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        envelope: &'a Envelope,
        event: Event,
    ) -> impl Future<Output = Result<Outcome, HandlerError>> + Send + 'a;
}

/// Deliveries an early event is retried for before it is dead-lettered
/// (about 13 s in all). Within the saga every compensation is caused by an
/// event the same service committed first, so only events published by hand
/// or by a foreign system can be early; they should not wait long to be seen.
pub const MAX_NOT_YET_DELIVERIES: i64 = 12;
const NOT_YET_BACKOFF_CAP: Duration = Duration::from_secs(2);

/// Backoff for the `delivered`-th attempt: 50 ms doubling, capped at `cap`.
pub fn backoff(delivered: i64, cap: Duration) -> Duration {
    let exp = delivered.clamp(1, 16) as u32 - 1;
    Duration::from_millis(50u64.saturating_mul(1 << exp)).min(cap)
}

/// Names the dead-letter headers; the body is the original bytes, unchanged.
pub mod dlq_headers {
    pub const REASON: &str = "Saga-Dlq-Reason";
    pub const CONSUMER: &str = "Saga-Dlq-Consumer";
    pub const SUBJECT: &str = "Saga-Dlq-Subject";
    pub const STREAM_SEQUENCE: &str = "Saga-Dlq-Stream-Sequence";
    pub const DELIVERIES: &str = "Saga-Dlq-Deliveries";
    pub const MSG_ID: &str = "Saga-Dlq-Msg-Id";
}

/// Runs one durable consumer with a [`Handler`].
pub struct ConsumerRuntime<H> {
    inner: Arc<Inner<H>>,
    concurrency: usize,
}

struct Inner<H> {
    name: String,
    handler: H,
    pool: PgPool,
    js: jetstream::Context,
    idempotency: IdempotencyStore,
    subjects: Subjects,
    outbox: OutboxSignal,
}

/// What became of one delivery (logged; returned for tests of one step).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    Applied,
    Skipped,
    Duplicate,
    Retry(String),
    DeadLettered(String),
}

#[allow(clippy::too_many_arguments)]
impl<H: Handler> ConsumerRuntime<H> {
    pub fn new(
        name: &str,
        handler: H,
        pool: PgPool,
        js: jetstream::Context,
        idempotency: IdempotencyStore,
        subjects: Subjects,
        outbox: OutboxSignal,
        concurrency: usize,
    ) -> Self {
        ConsumerRuntime {
            inner: Arc::new(Inner {
                name: name.to_string(),
                handler,
                pool,
                js,
                idempotency,
                subjects,
                outbox,
            }),
            concurrency: concurrency.max(1),
        }
    }

    /// Pulls and applies until `shutdown`, then waits for in-flight events.
    ///
    /// Pulls are bounded batches (at most `concurrency` events, expiring after
    /// a second) rather than an endless prefetch: every event the broker hands
    /// over belongs to a batch that ends soon, and is applied and acked even
    /// during shutdown. Nothing is left in a dead inbox to wait out the ack wait.
    pub async fn run(
        self,
        consumer: jetstream::consumer::Consumer<pull::Config>,
        shutdown: CancellationToken,
    ) {
        let permits = Arc::new(Semaphore::new(self.concurrency));
        let mut tasks = JoinSet::new();
        let mut failures = 0u32;
        while !shutdown.is_cancelled() {
            let batch = consumer
                .batch()
                .max_messages(self.concurrency)
                .expires(PULL_EXPIRY)
                .messages()
                .await;
            let mut batch = match batch {
                Ok(b) => b,
                Err(e) => {
                    failures += 1;
                    tracing::warn!(consumer = %self.inner.name, error = %e, "cannot pull; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(backoff(failures as i64, Duration::from_secs(2))) => continue,
                    }
                }
            };
            while let Some(next) = batch.next().await {
                while tasks.try_join_next().is_some() {}
                match next {
                    Ok(msg) => {
                        failures = 0;
                        let permit = permits
                            .clone()
                            .acquire_owned()
                            .await
                            .expect("semaphore never closes");
                        let inner = self.inner.clone();
                        tasks.spawn(async move {
                            inner.process(msg).await;
                            drop(permit);
                        });
                    }
                    Err(e) => {
                        tracing::warn!(consumer = %self.inner.name, error = %e, "pull interrupted");
                        break;
                    }
                }
            }
        }
        // Graceful drain: every event already taken is applied and acked.
        while tasks.join_next().await.is_some() {}
        tracing::info!(consumer = %self.inner.name, "consumer drained");
    }
}

/// How long one pull waits for events before the next is issued.
const PULL_EXPIRY: Duration = Duration::from_secs(1);

impl<H: Handler> Inner<H> {
    async fn process(&self, msg: jetstream::Message) -> Disposition {
        let (delivered, stream_seq) = msg
            .info()
            .map(|i| (i.delivered, i.stream_sequence))
            .unwrap_or((1, 0));
        let (envelope, event) = match Envelope::decode(&msg.payload) {
            Ok(v) => v,
            Err(e) => {
                return self
                    .dead_letter(&msg, delivered, stream_seq, e.to_string())
                    .await;
            }
        };
        let expected = self.subjects.event(event.kind());
        if msg.subject.as_str() != expected {
            let reason = crate::event::DecodeError::WrongSubject {
                event_type: envelope.event_type.clone(),
                subject: msg.subject.to_string(),
                expected,
            }
            .to_string();
            return self.dead_letter(&msg, delivered, stream_seq, reason).await;
        }
        let span = tracing::info_span!(
            "event",
            consumer = %self.name,
            event_type = %envelope.event_type,
            event_id = %envelope.event_id,
            correlation_id = %envelope.metadata.correlation_id,
            delivered,
        );
        async {
            let disposition = self
                .apply(&msg, &envelope, event, delivered, stream_seq)
                .await;
            match &disposition {
                Disposition::Applied => tracing::info!("applied"),
                Disposition::Skipped | Disposition::Duplicate => tracing::debug!(?disposition),
                Disposition::Retry(reason) => tracing::warn!(%reason, "will retry"),
                Disposition::DeadLettered(reason) => tracing::error!(%reason, "dead-lettered"),
            }
            disposition
        }
        .instrument(span)
        .await
    }

    async fn apply(
        &self,
        msg: &jetstream::Message,
        envelope: &Envelope,
        event: Event,
        delivered: i64,
        stream_seq: u64,
    ) -> Disposition {
        let id = envelope.event_id;
        match self.idempotency.claim(id).await {
            Ok(Claim::Claimed) => {}
            Ok(Claim::Done) => {
                ack(msg, AckKind::Ack).await;
                return Disposition::Duplicate;
            }
            Ok(Claim::InProgress) => {
                let reason = "another delivery of this event is being applied".to_string();
                ack(msg, AckKind::Nak(Some(idempotency::STARTED_TTL / 10))).await;
                return Disposition::Retry(reason);
            }
            Err(e) => {
                let reason = format!("redis unavailable: {e}");
                ack(
                    msg,
                    AckKind::Nak(Some(backoff(delivered, Duration::from_secs(5)))),
                )
                .await;
                return Disposition::Retry(reason);
            }
        }

        match self.transact(envelope, event).await {
            Ok(Committed::Applied) => {
                // Wake the relay first: the next hop of the saga waits on it,
                // not on our bookkeeping. (Handlers may also write the outbox
                // themselves, as the order service does with its event store.)
                self.outbox.notify();
                self.finish(msg, id).await;
                Disposition::Applied
            }
            Ok(Committed::Skipped(reason)) => {
                tracing::debug!(%reason, "skipped");
                self.finish(msg, id).await;
                Disposition::Skipped
            }
            Ok(Committed::AlreadyConsumed) => {
                self.finish(msg, id).await;
                Disposition::Duplicate
            }
            Ok(Committed::Nothing(Outcome::NotYet(reason))) => {
                self.release(id).await;
                if delivered >= MAX_NOT_YET_DELIVERIES {
                    let reason = format!("gave up after {delivered} deliveries: {reason}");
                    return self.dead_letter(msg, delivered, stream_seq, reason).await;
                }
                ack(
                    msg,
                    AckKind::Nak(Some(backoff(delivered, NOT_YET_BACKOFF_CAP))),
                )
                .await;
                Disposition::Retry(reason)
            }
            Ok(Committed::Nothing(Outcome::Rejected(reason))) => {
                self.release(id).await;
                self.dead_letter(msg, delivered, stream_seq, reason).await
            }
            Ok(Committed::Nothing(other)) => unreachable!("transact commits {other:?}"),
            Err(e) => {
                self.release(id).await;
                let delay = match e {
                    HandlerError::Conflict(_) => Duration::from_millis(10),
                    HandlerError::Db(_) => backoff(delivered, Duration::from_secs(10)),
                };
                ack(msg, AckKind::Nak(Some(delay))).await;
                Disposition::Retry(e.to_string())
            }
        }
    }

    /// Effect, guard and outbox in one transaction. The guard is written last,
    /// together with the emitted events: a duplicate that got this far (Redis
    /// forgot it) does its reads, finds the guard taken and rolls back.
    async fn transact(&self, envelope: &Envelope, event: Event) -> Result<Committed, HandlerError> {
        let mut tx = self.pool.begin().await?;
        let result = self.apply_in(&mut tx, envelope, event).await;
        match result {
            Ok(Committed::Applied | Committed::Skipped(_)) => tx.commit().await?,
            // Roll back now, not when the connection is next used: until then
            // the transaction would keep its row locks.
            _ => {
                if let Err(e) = tx.rollback().await {
                    tracing::warn!(error = %e, "rollback failed; the connection is discarded");
                }
            }
        }
        result
    }

    async fn apply_in(
        &self,
        tx: &mut PgConnection,
        envelope: &Envelope,
        event: Event,
    ) -> Result<Committed, HandlerError> {
        let (events, skipped) = match self.handler.handle(tx, envelope, event).await? {
            Outcome::Applied(events) => (events, None),
            Outcome::Skipped(reason) => (vec![], Some(reason)),
            other => return Ok(Committed::Nothing(other)),
        };
        if !outbox::enqueue_once(tx, &self.subjects, &self.name, envelope, &events).await? {
            return Ok(Committed::AlreadyConsumed);
        }
        Ok(match skipped {
            None => Committed::Applied,
            Some(reason) => Committed::Skipped(reason),
        })
    }

    async fn finish(&self, msg: &jetstream::Message, id: uuid::Uuid) {
        if let Err(e) = self.idempotency.mark_done(id).await {
            // Postgres already holds the guarantee; a redelivery will find the guard row.
            tracing::warn!(error = %e, "could not mark event done in redis");
        }
        ack(msg, AckKind::Ack).await;
    }

    async fn release(&self, id: uuid::Uuid) {
        if let Err(e) = self.idempotency.release(id).await {
            tracing::warn!(error = %e, "could not release redis claim; it expires by itself");
        }
    }

    /// Publishes the original bytes with the reason to the dead-letter stream,
    /// then terminates the delivery. If the dead-letter publish fails the
    /// event is nak'ed instead: it is never dropped.
    async fn dead_letter(
        &self,
        msg: &jetstream::Message,
        delivered: i64,
        stream_seq: u64,
        reason: String,
    ) -> Disposition {
        let mut headers = HeaderMap::new();
        headers.insert(
            "Nats-Msg-Id",
            format!("{}-{stream_seq}", self.name).as_str(),
        );
        headers.insert(dlq_headers::REASON, header_safe(&reason).as_str());
        headers.insert(dlq_headers::CONSUMER, self.name.as_str());
        headers.insert(dlq_headers::SUBJECT, msg.subject.as_str());
        headers.insert(
            dlq_headers::STREAM_SEQUENCE,
            stream_seq.to_string().as_str(),
        );
        headers.insert(dlq_headers::DELIVERIES, delivered.to_string().as_str());
        if let Some(id) = msg.headers.as_ref().and_then(|h| h.get("Nats-Msg-Id")) {
            headers.insert(dlq_headers::MSG_ID, id.as_str());
        }
        let published = match self
            .js
            .publish_with_headers(
                self.subjects.dead_letter(&self.name),
                headers,
                msg.payload.clone(),
            )
            .await
        {
            Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match published {
            Ok(()) => {
                tracing::error!(consumer = %self.name, subject = %msg.subject, stream_seq, %reason, "event dead-lettered");
                ack(msg, AckKind::Term).await;
                Disposition::DeadLettered(reason)
            }
            Err(e) => {
                ack(
                    msg,
                    AckKind::Nak(Some(backoff(delivered, Duration::from_secs(10)))),
                )
                .await;
                Disposition::Retry(format!("dead-letter publish failed ({e}) for: {reason}"))
            }
        }
    }
}

enum Committed {
    Applied,
    Skipped(String),
    AlreadyConsumed,
    Nothing(Outcome),
}

async fn ack(msg: &jetstream::Message, kind: AckKind) {
    if let Err(e) = msg.ack_with(kind).await {
        // The broker redelivers after ack_wait; idempotency makes that harmless.
        tracing::warn!(error = %e, "ack not sent");
    }
}

/// Header values are one line of visible ASCII.
fn header_safe(s: &str) -> String {
    let cleaned: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                ' '
            }
        })
        .collect();
    cleaned.chars().take(1024).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_fifty_milliseconds_up_to_the_cap() {
        let cap = Duration::from_secs(5);
        assert_eq!(backoff(1, cap), Duration::from_millis(50));
        assert_eq!(backoff(2, cap), Duration::from_millis(100));
        assert_eq!(backoff(4, cap), Duration::from_millis(400));
        assert_eq!(backoff(30, cap), cap);
    }

    #[test]
    fn header_values_lose_newlines_but_keep_the_words() {
        assert_eq!(header_safe("bad\r\nthing"), "bad  thing");
    }
}
