//! The JetStream consumer runtime every service uses: pull, deduplicate, apply
//! in one Postgres transaction with the outbox, then ack; nak with backoff on
//! transient failures; dead-letter what can never be applied.
//!
//! A service only supplies a [`Handler`]: given the open transaction and a
//! decoded event, say what happened ([`Outcome`]); and what it does to a
//! batch before its events are applied ([`BeforeApply`]). By concern:
//!
//! - [`pull`]: the loop that pulls from a durable consumer (shared with the
//!   order service's watches);
//! - `received`: a delivery decoded and checked against its subject;
//! - `lanes`: events of different orders applied side by side, one
//!   order's in order; `lane_connection`: the connection a lane keeps
//!   from one batch to the next;
//! - `apply`: the one apply path (a single event is a batch of one);
//! - `dead_letter`: what can never be applied, with its reason.

mod apply;
mod dead_letter;
mod handler;
mod lane_connection;
mod lanes;
pub mod pull;
mod received;

use std::{ops::Deref, sync::Arc, time::Duration};

use async_nats::jetstream;
use sqlx::PgPool;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

pub use apply::{Disposition, panic_message};
pub use handler::{
    Applying, Arriving, BeforeApply, GENERIC_PLANS, Handler, HandlerError, NothingBefore, Outcome,
    Prepared, begin, begin_pooled, db_error_is_permanent,
};
pub use lanes::lane_of;

use crate::{
    health::Health,
    idempotency::IdempotencyStore,
    meter::Meter,
    outbox::OutboxSignal,
    subjects::Subjects,
    topology::{Durable, TopologyError},
};
use lanes::Lanes;
use pull::{PullConsumer, PullLoop, Pulled, Receive};

/// Deliveries an early event is retried for before it is dead-lettered
/// (about 13 s in all). Within the saga every compensation is caused by an
/// event the same service committed first, so only events published by hand
/// or by a foreign system can be early; they should not wait long to be seen.
pub const MAX_NOT_YET_DELIVERIES: i64 = 12;
/// Deliveries a permanent failure gets (a second and third look, in case
/// what looked deterministic was a fluke) before it is dead-lettered.
pub const PERMANENT_FAILURE_DELIVERIES: i64 = 3;
/// Longest wait between two deliveries of an event failing transiently.
pub const TRANSIENT_BACKOFF_CAP: Duration = Duration::from_secs(30);

/// Names of this runtime's parts in the health board.
pub const HEALTH_CONSUMER: &str = "consumer";
pub const HEALTH_DEAD_LETTERS: &str = "deadLetters";

/// Runs one durable consumer with a [`Handler`].
pub struct ConsumerRuntime<H> {
    applier: Arc<Applier<H>>,
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
    /// Lanes applying events side by side (see `lanes`).
    pub lanes: usize,
    /// Most events one lane commits in one transaction; 1 applies each on
    /// its own.
    pub batch: usize,
    /// Deliveries a transiently failing event gets before it is dead-lettered.
    pub max_deliveries: i64,
    /// The broker's `max_payload` ([`crate::broker::max_payload`]): no
    /// event larger is written, no dead letter larger is published.
    pub max_payload: usize,
    /// Where each applied event's span goes (its trace context is carried
    /// on either way).
    pub tracing: crate::trace::Tracing,
}

/// What the lanes share: the handler and the runtime's parts.
struct Applier<H> {
    handler: H,
    parts: RuntimeParts,
}

impl<H> Deref for Applier<H> {
    type Target = RuntimeParts;
    fn deref(&self) -> &RuntimeParts {
        &self.parts
    }
}

impl<H: Handler> ConsumerRuntime<H> {
    pub fn new(handler: H, parts: RuntimeParts) -> Self {
        let concurrency = parts.concurrency.max(1);
        ConsumerRuntime {
            applier: Arc::new(Applier { handler, parts }),
            concurrency,
        }
    }

    /// Pulls and applies until `shutdown`, then waits for in-flight events.
    ///
    /// Pulls are bounded batches (at most `concurrency` events, expiring
    /// after a second) rather than an endless prefetch: every event the
    /// broker hands over belongs to a batch that ends soon, and is applied
    /// and acked even during shutdown. Nothing is left in a dead inbox to
    /// wait out the ack wait. Each event received is decoded and handed to
    /// its lane.
    ///
    /// A consumer that cannot be used (not provisioned yet, or not as its
    /// file says) is looked up again, never created: the service reports
    /// itself unready, saying why, until it is there.
    pub async fn run(
        self,
        consumer: Result<PullConsumer, TopologyError>,
        shutdown: CancellationToken,
    ) {
        let parts = &self.applier.parts;
        let mut receiver = ToLanes {
            applier: self.applier.clone(),
            places: Arc::new(Semaphore::new(self.concurrency)),
            lanes: Lanes::new(self.applier.clone(), self.concurrency),
        };
        PullLoop {
            js: &parts.js,
            subjects: &parts.subjects,
            durable: Durable::Service(&parts.name),
            health: &parts.health,
            health_part: HEALTH_CONSUMER,
            max_messages: self.concurrency,
        }
        .run(consumer, &shutdown, &mut receiver)
        .await;
        // Graceful drain: every event already received is applied and acked.
        receiver.lanes.drain().await;
        let _ = parts.idempotency.flush_done().await;
        tracing::info!(consumer = %parts.name, "consumer drained");
    }
}

/// Hands each pulled delivery to its lane, once one of the places in
/// flight (`concurrency`) is free.
struct ToLanes<H> {
    applier: Arc<Applier<H>>,
    places: Arc<Semaphore>,
    lanes: Lanes<H>,
}

impl<H: Handler> Receive for ToLanes<H> {
    async fn receive(&mut self, pulled: &mut Pulled) -> Result<(), String> {
        while let Some(msg) = pulled.next().await {
            let place = (self.places.clone().acquire_owned().await).expect("never closed");
            // Decoded here, for the lane it goes down; what does not
            // decode is dead-lettered.
            if let Some(received) = self.applier.receive(msg?).await {
                self.lanes.send(received, place).await;
            }
        }
        Ok(())
    }
}
