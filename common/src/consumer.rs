//! The JetStream consumer runtime every service uses: pull, deduplicate, apply
//! in one Postgres transaction with the outbox, then ack; nak with backoff on
//! transient failures; dead-letter what can never be applied.
//!
//! A service only supplies a [`Handler`]: given the open transaction and a
//! decoded event, say what happened ([`Outcome`]). Events of different
//! orders are applied side by side in lanes, and several events waiting in a
//! lane in one transaction ([`Lanes`]).

use std::{
    collections::HashMap,
    future::Future,
    panic::AssertUnwindSafe,
    sync::Arc,
    time::{Duration, Instant},
};

use async_nats::jetstream::{self, AckKind, consumer::pull};
use futures::{FutureExt, StreamExt};
use sqlx::{PgConnection, PgPool};
use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore, mpsc},
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use crate::{
    backoff::backoff,
    compensation::{Cancels, STEP_VERSION},
    event::{Envelope, Event, EventKind},
    health::{Condition, Health},
    idempotency::{self, Claim, IdempotencyStore},
    meter::{self, Meter},
    outbox::{self, OutboxSignal},
    subjects::Subjects,
    topology,
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
    /// An event on the consumer's subjects that its handler has no use for
    /// (published by hand, or a filter that grew): dead-lettered, naming the
    /// consumer and the event's type.
    Unhandled,
}

/// One event being applied: the open transaction, and the envelope the
/// event came in (the cause of whatever the handler emits).
pub struct Applying<'a> {
    pub tx: &'a mut PgConnection,
    pub cause: &'a Envelope,
    pub meter: &'a Meter,
    /// Which delivery of the cause this is (1 for the first).
    pub delivered: i64,
    /// Whether the customer cancelled an order ([`Cancels::before`]).
    pub cancels: &'a Cancels,
}

impl Applying<'_> {
    /// The step's outcome: `event`, emitted under `aggregate_id` as the
    /// first event of that aggregate ([`STEP_VERSION`]), caused by this one.
    pub fn emit(&self, event: &Event, aggregate_id: String) -> Outcome {
        let envelope = Envelope::caused_by(self.cause, event, aggregate_id, STEP_VERSION);
        Outcome::Applied(vec![envelope])
    }
}

/// Why applying an event failed, short of a domain answer ([`Outcome`]).
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    /// Optimistic concurrency lost against a concurrent writer.
    #[error("concurrent update of {0}; retrying")]
    Conflict(String),
    /// The event can never be applied here, whatever is retried.
    #[error("{0}")]
    Permanent(String),
    /// The broker did not answer a question the handler asked it; retried
    /// like a database that is away.
    #[error("broker: {0}")]
    Broker(String),
    /// A party outside the service (a payment gateway) did not do its part.
    /// The delivery is retried after each delay of `retries` in turn, then
    /// dead-lettered. `report`, an event saying so, is committed to the
    /// outbox on its own (the delivery's transaction is rolled back), so
    /// every failed attempt is on record.
    #[error("{reason}")]
    Unavailable {
        reason: String,
        retries: Vec<Duration>,
        report: Option<Box<Envelope>>,
    },
}

impl HandlerError {
    /// Whether trying again can only fail the same way: a value Postgres
    /// refuses (a NUL in a text, a number out of range), a violated CHECK, a
    /// row that does not decode. Connection losses, timeouts, deadlocks,
    /// serialization failures and lost races are transient.
    pub fn is_permanent(&self) -> bool {
        match self {
            HandlerError::Permanent(_) => true,
            HandlerError::Conflict(_)
            | HandlerError::Unavailable { .. }
            | HandlerError::Broker(_) => false,
            HandlerError::Db(e) => db_error_is_permanent(e),
        }
    }
}

/// Classifies a database error by its kind and SQLSTATE class.
pub fn db_error_is_permanent(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            match code.get(..2).unwrap_or_default() {
                // data exception (22003 out of range, 22021 bad encoding, 22P05 NUL),
                // integrity constraint (CHECK, NOT NULL, foreign key) but not a
                // unique violation, which is a race another attempt resolves
                "22" => true,
                "23" => code != "23505",
                // syntax or access rule, program limit (an index row too large),
                // feature not supported, invalid transaction initiation
                "42" | "54" | "0A" | "2B" => true,
                _ => false,
            }
        }
        sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::Decode(_)
        | sqlx::Error::Encode(_)
        | sqlx::Error::TypeNotFound { .. }
        | sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::ColumnIndexOutOfBounds { .. }
        | sqlx::Error::RowNotFound => true,
        _ => false,
    }
}

/// A service's reaction to the events its consumer receives.
pub trait Handler: Send + Sync + 'static {
    /// Applies `event` within `tx`. Must not commit, and must do no I/O
    /// outside `tx`: the runtime commits the effect, the guard and the
    /// emitted events together, or none of them. A handler may be run for a
    /// duplicate whose transaction is then rolled back, so it must not act
    /// outside the transaction. A panic is caught: the transaction is rolled
    /// back and the event dead-lettered with the panic's message.
    fn handle<'a>(
        &'a self,
        cx: Applying<'a>,
        event: Event,
    ) -> impl Future<Output = Result<Outcome, HandlerError>> + Send + 'a;

    /// The event that makes this service take its forward step, if it has
    /// one: a step that first asks whether the customer cancelled the order
    /// ([`Cancels::before`]). The consumer asks the broker about every
    /// step it took at once, as soon as it took them
    /// ([`Cancels::ask_ahead`]), and holds their orders from the first
    /// statement of their transaction ([`Cancels::begin`]).
    const STEP: Option<EventKind> = None;

    /// The order whose forward step `event` is, if it is one.
    fn step_of(&self, event: &Event) -> Option<Uuid> {
        (Some(event.kind()) == Self::STEP).then(|| event.order_id())
    }

    /// Takes, before a batch's events are applied together in `tx`, the
    /// row locks they will take (one customer's account, one product's
    /// stock), all at once and in the one order every such statement of
    /// the service follows (sorted by key). Lanes' batches that touch the
    /// same rows then queue for each other instead of each holding one row
    /// and waiting for another's (a deadlock, which costs both batches
    /// their transaction). Default: none.
    fn lock_ahead<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        batch: &'a Ahead<'a>,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send + 'a {
        let _ = (tx, batch);
        async { Ok(()) }
    }
}

/// A batch about to be applied, as [`Handler::lock_ahead`] sees it.
pub struct Ahead<'a> {
    /// Its forward-step events ([`Handler::STEP`]).
    pub steps: Vec<&'a Event>,
    /// The orders its other events are about (compensations).
    pub undoing: Vec<Uuid>,
}

/// Deliveries an early event is retried for before it is dead-lettered
/// (about 13 s in all). Within the saga every compensation is caused by an
/// event the same service committed first, so only events published by hand
/// or by a foreign system can be early; they should not wait long to be seen.
pub const MAX_NOT_YET_DELIVERIES: i64 = 12;
const NOT_YET_BACKOFF_CAP: Duration = Duration::from_secs(2);
/// Deliveries a permanent failure gets (a second and third look, in case
/// what looked deterministic was a fluke) before it is dead-lettered.
pub const PERMANENT_FAILURE_DELIVERIES: i64 = 3;
const PERMANENT_BACKOFF_CAP: Duration = Duration::from_secs(1);
/// Longest wait between two deliveries of an event failing transiently.
pub const TRANSIENT_BACKOFF_CAP: Duration = Duration::from_secs(30);

/// Names of this runtime's parts in the health board.
pub const HEALTH_CONSUMER: &str = "consumer";
pub const HEALTH_DEAD_LETTERS: &str = "deadLetters";

/// Runs one durable consumer with a [`Handler`].
pub struct ConsumerRuntime<H> {
    inner: Arc<Inner<H>>,
    concurrency: usize,
}

/// Everything the runtime needs besides the handler.
#[derive(Clone)]
pub struct RuntimeParts {
    pub name: String,
    pub pool: PgPool,
    pub js: jetstream::Context,
    pub idempotency: IdempotencyStore,
    pub subjects: Subjects,
    pub outbox: OutboxSignal,
    pub health: Health,
    pub meter: Meter,
    pub concurrency: usize,
    /// Lanes applying events side by side (see [`Lanes`]).
    pub lanes: usize,
    /// Most events one lane commits in one transaction; 1 applies each on
    /// its own.
    pub batch: usize,
    /// Deliveries a transiently failing event gets before it is dead-lettered.
    pub max_deliveries: i64,
    /// The broker's `max_payload` ([`max_payload`]): no event larger is
    /// written, no dead letter larger is published.
    pub max_payload: usize,
}

struct Inner<H> {
    handler: H,
    parts: RuntimeParts,
    cancels: Cancels,
}

impl<H> std::ops::Deref for Inner<H> {
    type Target = RuntimeParts;
    fn deref(&self) -> &RuntimeParts {
        &self.parts
    }
}

/// One delivery of a message: how many times it has been delivered, and
/// where it is in the stream.
#[derive(Clone, Copy)]
struct Delivery<'a> {
    msg: &'a jetstream::Message,
    delivered: i64,
    stream_seq: u64,
}

/// A delivery taken from the broker: decoded, and on the subject its event
/// belongs on.
struct Taken {
    msg: jetstream::Message,
    delivered: i64,
    stream_seq: u64,
    /// Whether the stream held nothing else for this consumer when it was
    /// delivered, the first time: no cancel of its order can have been
    /// waiting behind it then.
    last_first: bool,
    /// When the broker stored it (nanoseconds since the epoch).
    published: Option<i128>,
    /// When this service took it.
    started: Instant,
    envelope: Envelope,
    event: Event,
}

impl Taken {
    fn delivery(&self) -> Delivery<'_> {
        Delivery {
            msg: &self.msg,
            delivered: self.delivered,
            stream_seq: self.stream_seq,
        }
    }
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

impl Disposition {
    /// Its name as a metrics label.
    pub fn label(&self) -> &'static str {
        match self {
            Disposition::Applied => "applied",
            Disposition::Skipped => "skipped",
            Disposition::Duplicate => "duplicate",
            Disposition::Retry(_) => "retry",
            Disposition::DeadLettered(_) => "dead_lettered",
        }
    }
}

impl<H: Handler> ConsumerRuntime<H> {
    pub fn new(handler: H, parts: RuntimeParts) -> Self {
        let concurrency = parts.concurrency.max(1);
        ConsumerRuntime {
            inner: Arc::new(Inner {
                handler,
                cancels: Cancels::new(parts.js.clone(), parts.subjects.clone()),
                parts,
            }),
            concurrency,
        }
    }

    /// Pulls and applies until `shutdown`, then waits for in-flight events.
    ///
    /// Pulls are bounded batches (at most `concurrency` events, expiring after
    /// a second) rather than an endless prefetch: every event the broker hands
    /// over belongs to a batch that ends soon, and is applied and acked even
    /// during shutdown. Nothing is left in a dead inbox to wait out the ack wait.
    /// Each event taken is decoded and handed to its [`Lanes`] lane.
    ///
    /// A consumer that is missing (`None`, not provisioned yet, or deleted)
    /// or keeps failing to pull is looked up again, never created: the
    /// service reports itself unready, naming it and how to provision it,
    /// until it is there.
    pub async fn run(
        self,
        consumer: Option<jetstream::consumer::Consumer<pull::Config>>,
        shutdown: CancellationToken,
    ) {
        let name = self.inner.name.clone();
        let health = self.inner.health.clone();
        let permits = Arc::new(Semaphore::new(self.concurrency));
        let mut lanes = Lanes::new(self.inner.clone(), self.concurrency);
        let mut failures = 0u32;
        let mut consumer = consumer;
        match &consumer {
            Some(_) => health.ok(HEALTH_CONSUMER),
            None => health.report(
                HEALTH_CONSUMER,
                Condition::Failing(format!(
                    "consumer '{name}' is missing: {}",
                    topology::PROVISION_HINT
                )),
            ),
        };
        while !shutdown.is_cancelled() {
            let Some(bound) = consumer.as_mut() else {
                consumer = self.rebind(&shutdown, &mut failures).await;
                if consumer.is_some() && health.ok(HEALTH_CONSUMER) {
                    tracing::info!(consumer = %name, "consumer found; pulling");
                }
                continue;
            };
            let pulled = match bound
                .batch()
                .max_messages(self.concurrency)
                .expires(PULL_EXPIRY)
                .messages()
                .await
            {
                Ok(mut batch) => {
                    let mut error = None;
                    while let Some(next) = batch.next().await {
                        match next {
                            Ok(msg) => {
                                if failures > 0 {
                                    failures = 0;
                                    if health.ok(HEALTH_CONSUMER) {
                                        tracing::info!(consumer = %name, "pulling again");
                                    }
                                }
                                let permit = permits
                                    .clone()
                                    .acquire_owned()
                                    .await
                                    .expect("semaphore never closes");
                                // Decoded here, for the lane it goes down;
                                // what does not decode is dead-lettered.
                                if let Some(t) = self.inner.take(msg, Instant::now()).await {
                                    lanes.send(t, permit).await;
                                }
                            }
                            Err(e) => {
                                error = Some(e.to_string());
                                break;
                            }
                        }
                    }
                    error.map_or(Ok(()), Err)
                }
                Err(e) => Err(e.to_string()),
            };
            match pulled {
                Ok(()) => {
                    if failures > 0 && health.ok(HEALTH_CONSUMER) {
                        tracing::info!(consumer = %name, "pulling again");
                    }
                    failures = 0;
                }
                Err(e) => {
                    failures += 1;
                    tracing::warn!(consumer = %name, error = %e, failures, "cannot pull; retrying");
                    if failures >= 2 {
                        health.report(
                            HEALTH_CONSUMER,
                            Condition::Failing(format!("cannot pull from consumer '{name}': {e}")),
                        );
                        // Looked up again (it may have been deleted and
                        // provisioned again); never created here.
                        consumer = None;
                        continue;
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(backoff(failures as i64, Duration::from_secs(2))) => {}
                    }
                }
            }
        }
        // Graceful drain: every event already taken is applied and acked.
        lanes.drain().await;
        tracing::info!(consumer = %name, "consumer drained");
    }
}

impl<H: Handler> ConsumerRuntime<H> {
    /// Looks the consumer up, after a backoff that grows with `failures`;
    /// `None` (and readiness saying why) while it is missing or not as its
    /// file says, or the broker does not answer.
    async fn rebind(
        &self,
        shutdown: &CancellationToken,
        failures: &mut u32,
    ) -> Option<jetstream::consumer::Consumer<pull::Config>> {
        let name = &self.inner.name;
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(backoff(*failures as i64, Duration::from_secs(2))) => {}
        }
        *failures = failures.saturating_add(1);
        let bound = topology::bind_consumer(
            &self.inner.js,
            &self.inner.subjects,
            topology::Durable::Service(name),
        )
        .await;
        match bound {
            Ok(c) => {
                *failures = 0;
                Some(c)
            }
            Err(e) => {
                if self
                    .inner
                    .health
                    .report(HEALTH_CONSUMER, Condition::Failing(e.to_string()))
                {
                    tracing::error!(consumer = %name, error = %e, "cannot use the consumer");
                }
                None
            }
        }
    }
}

/// The consumer's lanes: each applies its deliveries in the order they
/// came, together when several are waiting (one transaction, see
/// [`Inner::process_all`]); the lanes run side by side. A delivery's lane
/// follows from its event's order id, so one order's events are applied in
/// the order the consumer got them, and never two at once.
struct Lanes<H> {
    inner: Arc<Inner<H>>,
    senders: Vec<mpsc::Sender<Taking>>,
    tasks: JoinSet<()>,
    capacity: usize,
}

/// A delivery on its way to a lane, with its place among those in flight.
type Taking = (Taken, OwnedSemaphorePermit);

impl<H: Handler> Lanes<H> {
    fn new(inner: Arc<Inner<H>>, capacity: usize) -> Lanes<H> {
        let mut lanes = Lanes {
            senders: Vec::new(),
            tasks: JoinSet::new(),
            capacity,
            inner,
        };
        for _ in 0..lanes.inner.lanes.max(1) {
            let sender = lanes.spawn();
            lanes.senders.push(sender);
        }
        lanes
    }

    fn spawn(&mut self) -> mpsc::Sender<Taking> {
        let (sender, mut receiver) = mpsc::channel::<Taking>(self.capacity);
        let inner = self.inner.clone();
        let most = inner.batch.max(1);
        self.tasks.spawn(async move {
            while let Some(first) = receiver.recv().await {
                let mut taken = vec![first];
                while taken.len() < most {
                    match receiver.try_recv() {
                        Ok(next) => taken.push(next),
                        Err(_) => break,
                    }
                }
                let (taken, permits): (Vec<_>, Vec<_>) = taken.into_iter().unzip();
                inner.process_all(taken).await;
                drop(permits);
            }
        });
        sender
    }

    /// Hands `t` to its lane (waiting while the lane is full).
    async fn send(&mut self, t: Taken, permit: OwnedSemaphorePermit) {
        let lane = lane_of(t.event.order_id(), self.senders.len());
        if let Err(mpsc::error::SendError(taking)) = self.senders[lane].send((t, permit)).await {
            // The lane's task ended, which only a bug can do: a new lane
            // takes over, and this delivery with it.
            tracing::error!(consumer = %self.inner.name, lane, "a consumer lane ended; restarting it");
            self.senders[lane] = self.spawn();
            let _ = self.senders[lane].send(taking).await;
        }
    }

    /// Waits until every delivery handed over is applied and acked.
    async fn drain(mut self) {
        self.senders.clear();
        while self.tasks.join_next().await.is_some() {}
    }
}

/// The lane of `lanes` an order's events go down (all of them, in order).
pub fn lane_of(order_id: Uuid, lanes: usize) -> usize {
    (order_id.as_u128() % lanes.max(1) as u128) as usize
}

/// The longest a batch's transaction waits for any one lock. The rows a
/// handler locks ahead cannot deadlock, so a wait is for other lanes'
/// batches ahead of it on a hot row; any other deadlock Postgres finds
/// after `deadlock_timeout` (1 s by default).
const BATCH_LOCK_TIMEOUT: Duration = Duration::from_secs(1);

/// How long one pull waits for events before the next is issued.
const PULL_EXPIRY: Duration = Duration::from_secs(1);

impl<H: Handler> Inner<H> {
    /// Disposes of what a lane took: one delivery alone, more together.
    async fn process_all(&self, taken: Vec<Taken>) {
        let ids: Vec<Uuid> = taken.iter().map(|t| t.envelope.event_id).collect();
        // The stream is asked about the orders' cancels while Redis is
        // asked about the events, and answers by the time a step wants it.
        // It is not asked about an event that was the last it held for this
        // consumer when first delivered: a cancel published before that is
        // delivered before it (or recorded: the step's transaction reads
        // that once it holds the order), and one published after finds the
        // step taken, or waits for its hold, and undoes it.
        let (last, ask): (Vec<&Taken>, Vec<&Taken>) = taken.iter().partition(|t| t.last_first);
        let steps = |ts: Vec<&Taken>| -> Vec<Uuid> {
            ts.iter()
                .filter_map(|t| self.handler.step_of(&t.event))
                .collect()
        };
        let cancels = self.cancels.ask_ahead(steps(ask), steps(last));
        let claims = self.idempotency.claim_all(&ids).await;
        let mut batch = Vec::with_capacity(taken.len());
        for (t, claim) in taken.into_iter().zip(claims) {
            match claim {
                Claim::Claimed | Claim::Unavailable => batch.push((t, claim)),
                // Already applied, or being applied by another delivery:
                // acked or retried without a transaction.
                Claim::Done | Claim::InProgress => {
                    self.settle(t, claim, &cancels).await;
                }
            }
        }
        // One event alone (as when the lane is not busy) goes the single way.
        if batch.len() < 2 {
            for (t, claim) in batch {
                self.settle(t, claim, &cancels).await;
            }
            return;
        }
        match self.transact_batch(&batch, &cancels).await {
            Ok(outcomes) => {
                self.meter.batch(&self.name, "committed", batch.len());
                if outcomes.iter().any(|o| matches!(o, Outcome::Applied(_))) {
                    self.outbox.notify();
                }
                let ids: Vec<Uuid> = batch.iter().map(|(t, _)| t.envelope.event_id).collect();
                // A failure is fine: Postgres holds the guarantee.
                let _ = self.idempotency.mark_done(&ids).await;
                futures::future::join_all(batch.iter().map(|(t, _)| ack(&t.msg, AckKind::Ack)))
                    .await;
                for ((t, _), outcome) in batch.iter().zip(outcomes) {
                    let disposition = match outcome {
                        Outcome::Skipped(reason) => {
                            tracing::debug!(%reason, "skipped");
                            Disposition::Skipped
                        }
                        _ => Disposition::Applied,
                    };
                    self.record(t, &disposition);
                }
            }
            Err(why) => {
                // Each event on its own now: one that cannot be applied costs
                // only itself, and the others are applied as if alone.
                self.meter.batch(&self.name, "one_by_one", batch.len());
                tracing::info!(consumer = %self.name, events = batch.len(), %why, "batch not committed; applying its events one by one");
                for (t, claim) in batch {
                    self.settle(t, claim, &cancels).await;
                }
            }
        }
    }

    /// Decodes a delivery and checks its subject; one that fails either is
    /// dead-lettered here, and `None`.
    async fn take(&self, msg: jetstream::Message, started: Instant) -> Option<Taken> {
        let (delivered, stream_seq, published, last_first) = match msg.info() {
            Ok(i) => (
                i.delivered,
                i.stream_sequence,
                Some(i.published.unix_timestamp_nanos()),
                i.delivered == 1 && i.pending == 0,
            ),
            Err(_) => (1, 0, None, false),
        };
        let d = Delivery {
            msg: &msg,
            delivered,
            stream_seq,
        };
        let refused = match Envelope::decode(&msg.payload) {
            Err(e) => ("undecodable", None, e.to_string()),
            Ok((envelope, event)) => {
                let expected = self.subjects.event_of(event.kind(), event.order_id());
                if msg.subject.as_str() == expected {
                    return Some(Taken {
                        delivered,
                        stream_seq,
                        last_first,
                        published,
                        started,
                        envelope,
                        event,
                        msg,
                    });
                }
                let reason = crate::event::DecodeError::WrongSubject {
                    event_type: envelope.event_type.clone(),
                    subject: msg.subject.to_string(),
                    expected,
                }
                .to_string();
                (event.kind().name(), Some(envelope), reason)
            }
        };
        let (event_type, envelope, reason) = refused;
        let disposition = self.dead_letter(&d, envelope.as_ref(), reason).await;
        self.meter.delivery(
            &self.name,
            event_type,
            disposition.label(),
            started.elapsed(),
            None,
        );
        None
    }

    /// The span an event's log lines are in.
    fn span(&self, t: &Taken) -> tracing::Span {
        tracing::info_span!(
            "event",
            consumer = %self.name,
            event_type = %t.envelope.event_type,
            event_id = %t.envelope.event_id,
            correlation_id = %t.envelope.metadata.correlation_id,
            delivered = t.delivered,
        )
    }

    /// Logs and meters what became of one delivery.
    fn record(&self, t: &Taken, disposition: &Disposition) {
        let _in = self.span(t).entered();
        match disposition {
            Disposition::Applied => tracing::info!("applied"),
            Disposition::Skipped | Disposition::Duplicate => tracing::debug!(?disposition),
            Disposition::Retry(reason) => tracing::warn!(%reason, "will retry"),
            Disposition::DeadLettered(reason) => tracing::error!(%reason, "dead-lettered"),
        }
        let since_publish = match disposition {
            Disposition::Applied => t.published.map(meter::age),
            _ => None,
        };
        self.meter.delivery(
            &self.name,
            t.event.kind().name(),
            disposition.label(),
            t.started.elapsed(),
            since_publish,
        );
    }

    /// Applies one event on its own, given what Redis said of it.
    async fn settle(&self, t: Taken, claim: Claim, cancels: &Cancels) -> Disposition {
        let disposition = self
            .settle_in_span(&t, claim, cancels)
            .instrument(self.span(&t))
            .await;
        self.record(&t, &disposition);
        disposition
    }

    async fn settle_in_span(&self, t: &Taken, claim: Claim, cancels: &Cancels) -> Disposition {
        let (msg, delivered, envelope) = (&t.msg, t.delivered, &t.envelope);
        let d = &t.delivery();
        let id = envelope.event_id;
        // Without Redis the Postgres guard alone decides (`Unavailable`).
        let claimed = match claim {
            Claim::Claimed => true,
            Claim::Unavailable => false,
            Claim::Done => {
                ack(msg, AckKind::Ack).await;
                return Disposition::Duplicate;
            }
            Claim::InProgress => {
                let reason = "another delivery of this event is being applied".to_string();
                ack(msg, AckKind::Nak(Some(idempotency::STARTED_TTL / 10))).await;
                return Disposition::Retry(reason);
            }
        };

        let result = self
            .transact(envelope, t.event.clone(), delivered, cancels)
            .await;
        if !matches!(
            result,
            Ok(None | Some(Outcome::Applied(_) | Outcome::Skipped(_)))
        ) && claimed
        {
            self.release(id).await;
        }
        match result {
            Ok(Some(Outcome::Applied(_))) => {
                // Wake the relay first: the next hop of the saga waits on it,
                // not on our bookkeeping.
                self.outbox.notify();
                self.finish(msg, id).await;
                Disposition::Applied
            }
            Ok(Some(Outcome::Skipped(reason))) => {
                tracing::debug!(%reason, "skipped");
                self.finish(msg, id).await;
                Disposition::Skipped
            }
            Ok(None) => {
                self.finish(msg, id).await;
                Disposition::Duplicate
            }
            Ok(Some(Outcome::NotYet(reason))) => {
                if delivered >= MAX_NOT_YET_DELIVERIES {
                    let reason = format!("gave up after {delivered} deliveries: {reason}");
                    return self.dead_letter(d, Some(envelope), reason).await;
                }
                ack(
                    msg,
                    AckKind::Nak(Some(backoff(delivered, NOT_YET_BACKOFF_CAP))),
                )
                .await;
                Disposition::Retry(reason)
            }
            Ok(Some(Outcome::Unhandled)) => {
                let reason = format!("{} does not handle {}", self.name, envelope.event_type);
                self.dead_letter(d, Some(envelope), reason).await
            }
            Ok(Some(Outcome::Rejected(reason))) => {
                self.dead_letter(d, Some(envelope), reason).await
            }
            Err(HandlerError::Unavailable {
                reason,
                retries,
                report,
            }) => {
                if let Some(report) = report {
                    self.report(&report).await;
                }
                let Some(delay) = usize::try_from(delivered - 1)
                    .ok()
                    .and_then(|n| retries.get(n))
                else {
                    let reason = format!("gave up after {delivered} attempts: {reason}");
                    return self.dead_letter(d, Some(envelope), reason).await;
                };
                ack(msg, AckKind::Nak(Some(*delay))).await;
                Disposition::Retry(reason)
            }
            Err(e) => {
                let permanent = e.is_permanent();
                let (budget, cap) = if permanent {
                    (PERMANENT_FAILURE_DELIVERIES, PERMANENT_BACKOFF_CAP)
                } else {
                    (self.max_deliveries, TRANSIENT_BACKOFF_CAP)
                };
                if delivered >= budget {
                    let kind = if permanent { "permanent" } else { "transient" };
                    let reason =
                        format!("gave up after {delivered} deliveries ({kind} failure): {e}");
                    return self.dead_letter(d, Some(envelope), reason).await;
                }
                let delay = match e {
                    HandlerError::Conflict(_) => Duration::from_millis(10),
                    _ => backoff(delivered, cap),
                };
                ack(msg, AckKind::Nak(Some(delay))).await;
                Disposition::Retry(e.to_string())
            }
        }
    }

    /// Effect, guard and outbox in one transaction, committed when the
    /// outcome is Applied or Skipped. The guard is written last, together with
    /// the emitted events: a duplicate that got this far (Redis forgot it, or
    /// is down) does its reads, finds the guard taken, rolls back and is
    /// `Ok(None)`.
    async fn transact(
        &self,
        envelope: &Envelope,
        event: Event,
        delivered: i64,
        cancels: &Cancels,
    ) -> Result<Option<Outcome>, HandlerError> {
        // A forward step's order is held from the transaction's first
        // statement on.
        let step: Vec<Uuid> = self.handler.step_of(&event).into_iter().collect();
        let (mut tx, cancels) = cancels.begin(&self.pool, None, &step).await?;
        let result = AssertUnwindSafe(self.apply_in(
            &mut tx,
            &self.meter,
            &cancels,
            envelope,
            event,
            delivered,
        ))
        .catch_unwind()
        .await
        .unwrap_or_else(|panic| {
            Ok(Some(Outcome::Rejected(format!(
                "handler panicked: {}",
                panic_message(&*panic)
            ))))
        });
        match result {
            Ok(Some(Outcome::Applied(_) | Outcome::Skipped(_))) => tx.commit().await?,
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

    /// A batch's events applied in order in one transaction, with their
    /// guards and emitted events: committed only if each was applied or
    /// skipped. Anything else (an event not yet applicable, rejected, a
    /// duplicate Redis did not know of, a failure, a panic) rolls all of it
    /// back and says why, and the caller applies them one by one.
    async fn transact_batch(
        &self,
        batch: &[(Taken, Claim)],
        cancels: &Cancels,
    ) -> Result<Vec<Outcome>, String> {
        // The broker's answers, asked when the events were taken, are
        // awaited before the batch takes its locks: it would otherwise wait
        // on the broker while holding them.
        cancels.answers().await;
        // The orders whose forward steps the batch takes are held from its
        // first statement, and the cancels recorded for them read at once;
        // an order the batch has another event for (its cancel, say) is
        // asked in its turn.
        //
        // Lanes' batches may lock the same rows (one customer's account,
        // one product's stock): the handler takes them all in one order
        // before applying any event ([`Handler::lock_ahead`]), so that
        // batches queue instead of deadlocking. Should one still wait too
        // long for a lock (a row it did not lock ahead, or a deadlock
        // Postgres found), it gives up and goes one by one.
        let mut events_of: HashMap<Uuid, usize> = HashMap::new();
        for (t, _) in batch {
            *events_of.entry(t.event.order_id()).or_default() += 1;
        }
        let alone: Vec<Uuid> = batch
            .iter()
            .filter_map(|(t, _)| self.handler.step_of(&t.event))
            .filter(|order_id| events_of.get(order_id) == Some(&1))
            .collect();
        let (mut tx, cancels) = cancels
            .begin(&self.pool, Some(BATCH_LOCK_TIMEOUT), &alone)
            .await
            .map_err(|e| format!("holding the batch's orders: {e}"))?;
        let mut ahead = Ahead {
            steps: Vec::new(),
            undoing: Vec::new(),
        };
        for (t, _) in batch {
            match self.handler.step_of(&t.event) {
                Some(_) => ahead.steps.push(&t.event),
                None => ahead.undoing.push(t.event.order_id()),
            }
        }
        let mut refused = (self.handler.lock_ahead(&mut tx, &ahead).await)
            .err()
            .map(|e| format!("locking the batch's rows: {e}"));
        let meter = self.meter.holding();
        let mut outcomes = Vec::with_capacity(batch.len());
        // Each event in turn, until one is refused (none, if the rows could
        // not be locked).
        for (t, _) in batch.iter().filter(|_| refused.is_none()) {
            let cx = Applying {
                tx: &mut tx,
                cause: &t.envelope,
                meter: &meter,
                delivered: t.delivered,
                cancels: &cancels,
            };
            let handled = AssertUnwindSafe(self.handler.handle(cx, t.event.clone()))
                .catch_unwind()
                .await;
            let why = match handled {
                Ok(Ok(outcome @ (Outcome::Applied(_) | Outcome::Skipped(_)))) => {
                    outcomes.push(outcome);
                    continue;
                }
                Ok(Ok(outcome)) => format!("{outcome:?}"),
                Ok(Err(e)) => e.to_string(),
                Err(panic) => format!("handler panicked: {}", panic_message(&*panic)),
            };
            refused = Some(format!("event {}: {why}", t.envelope.event_id));
            break;
        }
        // Every event's guard and emitted events in one statement.
        if refused.is_none() {
            let applied: Vec<(&Envelope, &[Envelope])> = batch
                .iter()
                .zip(&outcomes)
                .map(|((t, _), outcome)| (&t.envelope, emitted(outcome).unwrap_or_default()))
                .collect();
            refused = match self.guard(&mut tx, &applied).await {
                Ok(outbox::Enqueued::Done) => None,
                Ok(outbox::Enqueued::AlreadyConsumed) => {
                    Some("an event of the batch was already consumed".to_string())
                }
                Ok(outbox::Enqueued::TooLarge(reason)) => Some(reason),
                Err(e) => Some(e.to_string()),
            };
        }
        match refused {
            None => {
                tx.commit().await.map_err(|e| format!("commit: {e}"))?;
                meter.release();
                Ok(outcomes)
            }
            Some(why) => {
                if let Err(e) = tx.rollback().await {
                    tracing::warn!(error = %e, "rollback failed; the connection is discarded");
                }
                Err(why)
            }
        }
    }

    async fn apply_in(
        &self,
        tx: &mut PgConnection,
        meter: &Meter,
        cancels: &Cancels,
        envelope: &Envelope,
        event: Event,
        delivered: i64,
    ) -> Result<Option<Outcome>, HandlerError> {
        let cx = Applying {
            tx: &mut *tx,
            cause: envelope,
            meter,
            delivered,
            cancels,
        };
        let outcome = self.handler.handle(cx, event).await?;
        let Some(events) = emitted(&outcome) else {
            return Ok(Some(outcome));
        };
        Ok(match self.guard(tx, &[(envelope, events)]).await? {
            outbox::Enqueued::Done => Some(outcome),
            outbox::Enqueued::AlreadyConsumed => None,
            outbox::Enqueued::TooLarge(reason) => Some(Outcome::Rejected(reason)),
        })
    }

    /// Guards the applied events and appends what they emitted, in one
    /// statement ([`outbox::enqueue_once`]).
    async fn guard(
        &self,
        tx: &mut PgConnection,
        applied: &[(&Envelope, &[Envelope])],
    ) -> Result<outbox::Enqueued, sqlx::Error> {
        outbox::enqueue_once(tx, &self.subjects, &self.name, applied, self.max_payload).await
    }

    /// Commits a failed attempt's report to the outbox in a transaction of
    /// its own. Best effort: the attempt is retried whether or not this
    /// lands, and a lost report is logged.
    async fn report(&self, report: &Envelope) {
        let written = async {
            let mut conn = self.pool.acquire().await?;
            outbox::enqueue(
                &mut conn,
                &self.subjects,
                std::slice::from_ref(report),
                self.max_payload,
            )
            .await
        }
        .await;
        match written {
            Ok(Ok(())) => self.outbox.notify(),
            Ok(Err(e)) => tracing::warn!(error = %e, "failed attempt's report not written"),
            Err(e) => tracing::warn!(error = %e, "failed attempt's report not written"),
        }
    }

    async fn finish(&self, msg: &jetstream::Message, id: Uuid) {
        // A failure is fine: Postgres holds the guarantee, and a redelivery
        // finds the guard row. The Redis layer logs and reports it.
        let _ = self.idempotency.mark_done(&[id]).await;
        ack(msg, AckKind::Ack).await;
    }

    async fn release(&self, id: Uuid) {
        // If this fails the claim expires by itself (STARTED_TTL).
        let _ = self.idempotency.release(&[id]).await;
    }

    /// Publishes the original bytes with the reason to the dead-letter stream,
    /// then terminates the delivery. If the dead-letter publish fails the
    /// event is nak'ed instead: it is never dropped.
    async fn dead_letter(
        &self,
        d: &Delivery<'_>,
        envelope: Option<&Envelope>,
        reason: String,
    ) -> Disposition {
        let Delivery {
            msg,
            delivered,
            stream_seq,
        } = *d;
        let published = self.publish_dead_letter(d, envelope, &reason).await;
        match published {
            Ok(()) => {
                if self.health.ok(HEALTH_DEAD_LETTERS) {
                    tracing::info!(consumer = %self.name, "dead letters are accepted again");
                }
                tracing::error!(consumer = %self.name, subject = %msg.subject, stream_seq, %reason, "event dead-lettered");
                ack(msg, AckKind::Term).await;
                Disposition::DeadLettered(reason)
            }
            Err(e) => {
                let detail = format!(
                    "the dead-letter stream refuses messages ({e}); events that cannot be applied are retried meanwhile"
                );
                if self
                    .health
                    .report(HEALTH_DEAD_LETTERS, Condition::Failing(detail))
                {
                    tracing::error!(consumer = %self.name, error = %e, "cannot dead-letter");
                }
                ack(
                    msg,
                    AckKind::Nak(Some(backoff(delivered, Duration::from_secs(10)))),
                )
                .await;
                Disposition::Retry(format!("dead-letter publish failed ({e}) for: {reason}"))
            }
        }
    }

    async fn publish_dead_letter(
        &self,
        d: &Delivery<'_>,
        envelope: Option<&Envelope>,
        reason: &str,
    ) -> Result<(), String> {
        let letter = crate::dlq::Letter {
            consumer: &self.name,
            msg: d.msg,
            delivered: d.delivered,
            stream_seq: d.stream_seq,
            stream: self.subjects.events_stream(),
            about: envelope.map(crate::dlq::About::saga_event),
            reason,
        };
        crate::dlq::send(&self.js, &self.subjects, self.max_payload, letter).await
    }
}

/// The events an outcome emits, if it is one that is guarded (applied or
/// skipped: skipped emits none).
fn emitted(outcome: &Outcome) -> Option<&[Envelope]> {
    match outcome {
        Outcome::Applied(events) => Some(events),
        Outcome::Skipped(_) => Some(&[]),
        Outcome::NotYet(_) | Outcome::Rejected(_) | Outcome::Unhandled => None,
    }
}

/// What a caught panic said.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

async fn ack(msg: &jetstream::Message, kind: AckKind) {
    if let Err(e) = msg.ack_with(kind).await {
        // The broker redelivers after ack_wait; idempotency makes that harmless.
        tracing::warn!(error = %e, "ack not sent");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lost_connections_are_transient_and_undecodable_rows_permanent() {
        assert!(!HandlerError::Db(sqlx::Error::PoolTimedOut).is_permanent());
        assert!(!HandlerError::Conflict("o1".into()).is_permanent());
        assert!(HandlerError::Db(sqlx::Error::RowNotFound).is_permanent());
        assert!(HandlerError::Permanent("bad".into()).is_permanent());
    }
}
