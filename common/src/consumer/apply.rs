//! Applying what a lane took, the one way for one event or many: claim the
//! events in Redis, then apply them in order in one transaction with their
//! guards and the events they emit, committed only if each was applied or
//! skipped. A batch of several that is refused is applied again one event
//! at a time (each a batch of one), so an event that cannot be applied
//! costs only itself; a batch of one that is refused is retried or
//! dead-lettered for its reason ([`Refusal`]).

use std::{panic::AssertUnwindSafe, time::Duration};

use async_nats::jetstream::{self, AckKind};
use futures::FutureExt;
use sqlx::PgConnection;
use tracing::Instrument;
use uuid::Uuid;

use super::{
    Applier, BeforeApply, Handler, HandlerError, MAX_NOT_YET_DELIVERIES,
    PERMANENT_FAILURE_DELIVERIES, Prepared, TRANSIENT_BACKOFF_CAP,
    handler::{Applying, Outcome},
    lane_connection::LaneConnection,
    received::Received,
};
use crate::{
    backoff::backoff,
    event::Envelope,
    idempotency::{self, Claim},
    meter,
    outbox::{self, Enqueued, Handover},
    trace::Trace,
};

/// The longest a batch's transaction waits for any one lock. A batch's
/// rows are taken in one order (see the service's [`BeforeApply`]), so a
/// wait is for other lanes' batches ahead of it on a hot row; any other
/// deadlock Postgres finds after `deadlock_timeout` (1 s by default). A
/// batch of one waits as long as it takes.
const BATCH_LOCK_TIMEOUT: Duration = Duration::from_secs(1);
const NOT_YET_BACKOFF_CAP: Duration = Duration::from_secs(2);
const PERMANENT_BACKOFF_CAP: Duration = Duration::from_secs(1);

/// Why a batch's transaction did not commit.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    /// An event's handler answered with an outcome that is not committed
    /// (not yet, rejected, unhandled).
    #[error("{0:?}")]
    Outcome(Outcome),
    /// An event's handler failed, or the transaction could not begin or
    /// commit.
    #[error("{0}")]
    Failed(#[from] HandlerError),
    #[error("handler panicked: {0}")]
    Panicked(String),
    /// An event of the batch was consumed already (its guard row is there:
    /// Redis did not know, or was away).
    #[error("already consumed")]
    AlreadyConsumed,
    /// The events it emits do not fit the broker.
    #[error("{0}")]
    TooLarge(String),
}

/// What became of one delivery (logged and metered).
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

/// A received event with what Redis said of it.
type Claimed = (Received, Claim);

impl<H: Handler> Applier<H> {
    /// Disposes of what a lane took.
    pub(super) async fn apply_all(&self, received: Vec<Received>, conn: &mut LaneConnection) {
        let arriving: Vec<_> = received.iter().map(Received::arriving).collect();
        // Started now, answered by the time the transaction begins.
        let prepared = self.handler.before().arrived(&arriving);
        drop(arriving);
        let ids: Vec<Uuid> = received.iter().map(|r| r.envelope.event_id).collect();
        let claims = self.idempotency.claim_all(&ids).await;
        let mut batch: Vec<Claimed> = Vec::with_capacity(received.len());
        for (r, claim) in received.into_iter().zip(claims) {
            match claim {
                Claim::Claimed | Claim::Unavailable => batch.push((r, claim)),
                // Applied already, or being applied by another delivery:
                // acked or retried without a transaction.
                Claim::Done => {
                    ack(&r.msg, AckKind::Ack).await;
                    self.record(&r, &Disposition::Duplicate);
                }
                Claim::InProgress => {
                    let reason = "another delivery of this event is being applied".to_string();
                    ack(&r.msg, AckKind::Nak(Some(idempotency::STARTED_TTL / 10))).await;
                    self.record(&r, &Disposition::Retry(reason));
                }
            }
        }
        if batch.len() > 1 {
            match self.transact(conn, &batch, &prepared).await {
                Ok((outcomes, handover)) => {
                    self.meter.batch(&self.name, "committed", batch.len());
                    return self.committed(&batch, outcomes, handover).await;
                }
                Err((event_id, why)) => {
                    self.meter.batch(&self.name, "one_by_one", batch.len());
                    tracing::info!(consumer = %self.name, events = batch.len(), %event_id, %why, "batch not committed; applying its events one by one");
                }
            }
        }
        for one in batch {
            let span = self.span(&one.0);
            let one = [one];
            async {
                match self.transact(conn, &one, &prepared).await {
                    Ok((outcomes, handover)) => self.committed(&one, outcomes, handover).await,
                    Err(refusal) => {
                        let [(received, claim)] = one;
                        self.refused(received, claim, refusal).await
                    }
                }
            }
            .instrument(span)
            .await;
        }
    }

    /// `batch`'s events applied in order in one transaction on the lane's
    /// connection, with their guards and emitted events: committed only if
    /// each was applied or skipped (with the outbox rows it wrote, for the
    /// relay); otherwise all of it is rolled back, and why.
    async fn transact(
        &self,
        conn: &mut LaneConnection,
        batch: &[Claimed],
        prepared: &Prepared<H>,
    ) -> Result<(Vec<Outcome>, Handover), (Uuid, Refusal)> {
        let first = batch.first().map(|(r, _)| r.envelope.event_id);
        let mut taken = (conn.take().await)
            .map_err(|e| (first.unwrap_or_default(), Refusal::Failed(e.into())))?;
        let transacted = self.transact_on(&mut taken, batch, prepared).await;
        conn.give_back(taken, transacted.is_ok());
        transacted
    }

    async fn transact_on(
        &self,
        conn: &mut PgConnection,
        batch: &[Claimed],
        prepared: &Prepared<H>,
    ) -> Result<(Vec<Outcome>, Handover), (Uuid, Refusal)> {
        let first = batch.first().map(|(r, _)| r.envelope.event_id);
        let whole = |e: HandlerError| (first.unwrap_or_default(), Refusal::Failed(e));
        let events: Vec<_> = batch.iter().map(|(r, _)| &r.event).collect();
        let lock_timeout = (batch.len() > 1).then_some(BATCH_LOCK_TIMEOUT);
        let (mut tx, prepared) = (self.handler.before())
            .begin(&self.pool, conn, lock_timeout, &events, prepared)
            .await
            .map_err(whole)?;
        let meter = self.meter.holding();
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut refused = None;
        for (r, _) in batch {
            let cx = Applying {
                tx: &mut tx,
                cause: &r.envelope,
                meter: &meter,
                delivered: r.delivered,
                prepared: &prepared,
            };
            let handled = AssertUnwindSafe(self.handler.handle(cx, r.event.clone()))
                .catch_unwind()
                .await;
            let why = match handled {
                Ok(Ok(outcome)) if outcome.committed().is_some() => {
                    outcomes.push(outcome);
                    continue;
                }
                Ok(Ok(outcome)) => Refusal::Outcome(outcome),
                Ok(Err(e)) => Refusal::Failed(e),
                Err(panic) => Refusal::Panicked(panic_message(&*panic)),
            };
            refused = Some((r.envelope.event_id, why));
            break;
        }
        // Every event's guard and emitted events in one statement.
        let mut handover = Handover::default();
        if refused.is_none() {
            let applied: Vec<outbox::Consumed> = batch
                .iter()
                .zip(&outcomes)
                .map(|((r, _), outcome)| {
                    let emitted = outcome.committed().unwrap_or_default();
                    (&r.envelope, Some(&r.work.trace), emitted)
                })
                .collect();
            refused = match self.guard(&mut tx, &applied).await {
                Ok(Enqueued::Done(written)) => {
                    handover = written;
                    None
                }
                Ok(Enqueued::AlreadyConsumed) => Some(Refusal::AlreadyConsumed),
                Ok(Enqueued::TooLarge(reason)) => Some(Refusal::TooLarge(reason)),
                Err(e) => Some(Refusal::Failed(e.into())),
            }
            .map(|why| (first.unwrap_or_default(), why));
        }
        if let Some(refused) = refused {
            // Rolled back now, not when the connection is next used: until
            // then the transaction would keep its row locks.
            if let Err(e) = tx.rollback().await {
                tracing::warn!(error = %e, "rollback failed; the connection is discarded");
            }
            // A lone event's attempt is counted (a refund the gateway
            // refused is an attempt that failed); a batch's events are
            // counted when each is applied on its own.
            if batch.len() == 1 {
                meter.release();
            }
            return Err(refused);
        }
        tx.commit().await.map_err(|e| whole(e.into()))?;
        meter.release();
        Ok((outcomes, handover))
    }

    /// What follows a commit: the rows written handed to the relay (the
    /// next hop of the saga waits on it, not on our bookkeeping), Redis
    /// told, the deliveries acked.
    async fn committed(&self, batch: &[Claimed], outcomes: Vec<Outcome>, handover: Handover) {
        if outcomes.iter().any(|o| matches!(o, Outcome::Applied(_))) {
            self.outbox.hand_over(handover);
        }
        let ids: Vec<Uuid> = batch.iter().map(|(r, _)| r.envelope.event_id).collect();
        // On the next claim's round trip. A lost marker is fine: Postgres
        // holds the guarantee, and a redelivery finds the guard row.
        self.idempotency.mark_done_soon(&ids);
        futures::future::join_all(batch.iter().map(|(r, _)| ack(&r.msg, AckKind::Ack))).await;
        for ((r, _), outcome) in batch.iter().zip(outcomes) {
            let disposition = match outcome {
                Outcome::Skipped(reason) => {
                    tracing::debug!(%reason, "skipped");
                    Disposition::Skipped
                }
                _ => Disposition::Applied,
            };
            self.record(r, &disposition);
        }
    }

    /// What follows a lone event's refusal: acked if it was consumed
    /// already; otherwise its Redis claim released and the delivery
    /// retried or dead-lettered.
    async fn refused(&self, r: Received, claim: Claim, (_, why): (Uuid, Refusal)) {
        let id = r.envelope.event_id;
        if let Refusal::AlreadyConsumed = why {
            let _ = self.idempotency.mark_done(&[id]).await;
            ack(&r.msg, AckKind::Ack).await;
            return self.record(&r, &Disposition::Duplicate);
        }
        if matches!(claim, Claim::Claimed) {
            // If this fails the claim expires by itself (STARTED_TTL).
            let _ = self.idempotency.release(&[id]).await;
        }
        let disposition = self.retry_or_dead_letter(&r, why).await;
        self.record(&r, &disposition);
    }

    async fn retry_or_dead_letter(&self, r: &Received, why: Refusal) -> Disposition {
        let (msg, delivered, d) = (&r.msg, r.delivered, &r.delivery());
        let envelope = Some(&r.envelope);
        let reason = match why {
            Refusal::AlreadyConsumed => unreachable!("acked as a duplicate"),
            Refusal::Outcome(Outcome::NotYet(reason)) => {
                if delivered >= MAX_NOT_YET_DELIVERIES {
                    let reason = format!("gave up after {delivered} deliveries: {reason}");
                    return self.dead_letter(d, envelope, reason).await;
                }
                let delay = backoff(delivered, NOT_YET_BACKOFF_CAP);
                ack(msg, AckKind::Nak(Some(delay))).await;
                return Disposition::Retry(reason);
            }
            Refusal::Outcome(Outcome::Unhandled) => {
                format!("{} does not handle {}", self.name, r.envelope.event_type)
            }
            Refusal::Outcome(Outcome::Rejected(reason)) | Refusal::TooLarge(reason) => reason,
            Refusal::Outcome(committed @ (Outcome::Applied(_) | Outcome::Skipped(_))) => {
                unreachable!("{committed:?} is committed, not refused")
            }
            Refusal::Panicked(message) => format!("handler panicked: {message}"),
            Refusal::Failed(HandlerError::Unavailable {
                reason,
                retries,
                report,
            }) => {
                if let Some(report) = report {
                    self.report(&report, &r.work.trace).await;
                }
                let Some(delay) = usize::try_from(delivered - 1)
                    .ok()
                    .and_then(|n| retries.get(n))
                else {
                    let reason = format!("gave up after {delivered} attempts: {reason}");
                    return self.dead_letter(d, envelope, reason).await;
                };
                ack(msg, AckKind::Nak(Some(*delay))).await;
                return Disposition::Retry(reason);
            }
            Refusal::Failed(e) => {
                let permanent = e.is_permanent();
                let (budget, cap) = if permanent {
                    (PERMANENT_FAILURE_DELIVERIES, PERMANENT_BACKOFF_CAP)
                } else {
                    (self.max_deliveries, TRANSIENT_BACKOFF_CAP)
                };
                if delivered < budget {
                    let delay = match e {
                        HandlerError::Conflict(_) => Duration::from_millis(10),
                        _ => backoff(delivered, cap),
                    };
                    ack(msg, AckKind::Nak(Some(delay))).await;
                    return Disposition::Retry(e.to_string());
                }
                let kind = if permanent { "permanent" } else { "transient" };
                format!("gave up after {delivered} deliveries ({kind} failure): {e}")
            }
        };
        self.dead_letter(d, envelope, reason).await
    }

    /// Guards the applied events and appends what they emitted, in one
    /// statement ([`outbox::enqueue_once`]).
    async fn guard(
        &self,
        tx: &mut PgConnection,
        applied: &[outbox::Consumed<'_>],
    ) -> Result<Enqueued, sqlx::Error> {
        outbox::enqueue_once(tx, &self.subjects, &self.name, applied, self.max_payload).await
    }

    /// Commits a failed attempt's report to the outbox in a transaction of
    /// its own. Best effort: the attempt is retried whether or not this
    /// lands, and a lost report is logged.
    async fn report(&self, report: &Envelope, trace: &Trace) {
        let written = async {
            let mut conn = self.pool.acquire().await?;
            let report = [(report, Some(trace))];
            outbox::enqueue_traced(&mut conn, &self.subjects, &report, self.max_payload).await
        }
        .await;
        match written {
            Ok(()) => self.outbox.notify(),
            Err(e) => tracing::warn!(error = %e, "failed attempt's report not written"),
        }
    }

    /// The span an event's log lines are in.
    fn span(&self, r: &Received) -> tracing::Span {
        tracing::info_span!(
            "event",
            consumer = %self.name,
            event_type = %r.envelope.event_type,
            event_id = %r.envelope.event_id,
            correlation_id = %r.envelope.metadata.correlation_id,
            trace_id = %r.work.trace.trace_id(),
            delivered = r.delivered,
        )
    }

    /// Logs and meters what became of one delivery. An event applied,
    /// skipped or a duplicate is logged at debug (the metrics count them;
    /// at info every event would cost a log line): its span is made only
    /// when that level is on.
    fn record(&self, r: &Received, disposition: &Disposition) {
        let routine = matches!(
            disposition,
            Disposition::Applied | Disposition::Skipped | Disposition::Duplicate
        );
        if !routine || tracing::enabled!(tracing::Level::DEBUG) {
            let _in = self.span(r).entered();
            match disposition {
                Disposition::Applied => tracing::debug!("applied"),
                Disposition::Skipped | Disposition::Duplicate => tracing::debug!(?disposition),
                Disposition::Retry(reason) => tracing::warn!(%reason, "will retry"),
                Disposition::DeadLettered(reason) => tracing::error!(%reason, "dead-lettered"),
            }
        }
        let failed = match disposition {
            Disposition::Retry(reason) | Disposition::DeadLettered(reason) => Some(reason.as_str()),
            _ => None,
        };
        r.work.end(failed, || {
            vec![opentelemetry::KeyValue::new(
                "saga.disposition",
                disposition.label(),
            )]
        });
        let since_publish = match disposition {
            Disposition::Applied => r.published.map(meter::age),
            _ => None,
        };
        self.meter.delivery(
            &self.name,
            r.event.kind().name(),
            disposition.label(),
            r.started.elapsed(),
            since_publish,
        );
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

/// Acks (or naks, or terminates) a delivery; a lost ack means a
/// redelivery, which idempotency makes harmless.
pub(super) async fn ack(msg: &jetstream::Message, kind: AckKind) {
    if let Err(e) = msg.ack_with(kind).await {
        tracing::warn!(error = %e, "ack not sent");
    }
}
