//! The order service's watch on the dead-letter stream.
//!
//! When any service dead-letters an event of a saga (it could not apply it
//! and gave up: a permanent failure, an exhausted retry budget, a handler
//! panic, an event refused as invalid), that saga cannot go on by itself. If
//! its order is still pending, it moves to REQUIRES_INTERVENTION with the
//! service, the event and the reason, so no saga waits silently forever.
//! Dead letters of finished orders, and of orders this service never placed,
//! change nothing.
//!
//! Only dead letters whose body decoded carry the saga's id
//! (`Saga-Dlq-Correlation-Id`); bytes that are not an event belong to no saga.

use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use common::{
    Subjects,
    dlq::dlq_headers,
    limits,
    outbox::{self, EnqueueError},
    topology::DEAD_LETTER_WATCH,
};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    domain::{Command, DomainError},
    store::{self, ExecError, Snapshots},
    watch::{Source, Started, Watcher, ack},
};

/// Name of the watch in the health board.
pub const HEALTH_WATCH: &str = "deadLetterWatch";

/// Everything the watch needs besides its source.
pub struct DeadLetterWatch {
    pub pool: PgPool,
    pub subjects: Subjects,
    pub max_payload: usize,
    pub outbox: common::outbox::OutboxSignal,
    pub snapshots: Snapshots,
}

impl DeadLetterWatch {
    /// Creates the durable consumer now, then returns the loop to run.
    pub async fn start(self, source: Source, shutdown: CancellationToken) -> Started {
        source
            .watch(DEAD_LETTER_WATCH, HEALTH_WATCH, shutdown, self)
            .await
    }
}

impl Watcher for DeadLetterWatch {
    async fn process(&self, msg: &jetstream::Message) {
        let header = |name: &str| crate::watch::header(msg, name);
        let Some(order_id) =
            header(dlq_headers::CORRELATION_ID).and_then(|v| v.parse::<Uuid>().ok())
        else {
            ack(msg, AckKind::Ack).await;
            return;
        };
        let reason = limits::reason(format!(
            "{} dead-lettered {} {}: {}",
            header(dlq_headers::CONSUMER).unwrap_or_else(|| "a service".into()),
            header(dlq_headers::EVENT_TYPE).unwrap_or_else(|| "an event".into()),
            header(dlq_headers::EVENT_ID).unwrap_or_default(),
            header(dlq_headers::REASON).unwrap_or_default(),
        ));
        match self.halt(order_id, reason.clone()).await {
            Ok(halted) => {
                if halted {
                    tracing::error!(%order_id, correlation_id = %order_id, %reason, "saga halted by a dead letter; the order requires intervention");
                    self.outbox.notify();
                }
                ack(msg, AckKind::Ack).await;
            }
            Err(e @ (ExecError::Db(_) | ExecError::Conflict(_))) => {
                tracing::warn!(%order_id, error = %e, "cannot record a dead letter against its order; retrying");
                ack(msg, AckKind::Nak(Some(Duration::from_secs(1)))).await;
            }
            Err(e) => {
                // The order itself cannot take an event (its history does not
                // decode): retrying cannot help; the dead letter stays in its stream.
                tracing::error!(%order_id, correlation_id = %order_id, error = %e, %reason, "a dead letter could not halt its saga");
                ack(msg, AckKind::Ack).await;
            }
        }
    }
}

impl DeadLetterWatch {
    /// Moves a pending order to REQUIRES_INTERVENTION; `true` if it did.
    async fn halt(&self, order_id: Uuid, reason: String) -> Result<bool, ExecError> {
        let mut tx = self.pool.begin().await?;
        let result = store::execute(
            &mut tx,
            &self.snapshots,
            order_id,
            Command::RequireIntervention { reason },
            order_id,
            Uuid::now_v7(),
        )
        .await;
        match result {
            Ok((_, emitted)) if !emitted.is_empty() => {
                match outbox::enqueue(&mut tx, &self.subjects, &emitted, self.max_payload).await {
                    Ok(()) => {}
                    Err(EnqueueError::Db(e)) => return Err(e.into()),
                    Err(EnqueueError::TooLarge(too_large)) => {
                        // Cannot happen for a bounded reason; refuse rather than jam.
                        let _ = tx.rollback().await;
                        tracing::error!(%order_id, reason = %too_large, "intervention event too large");
                        return Ok(false);
                    }
                }
                tx.commit().await?;
                Ok(true)
            }
            Ok(_) | Err(ExecError::Domain(DomainError::NotFound)) => {
                tx.rollback().await?;
                Ok(false)
            }
            Err(e) => {
                let _ = tx.rollback().await;
                Err(e)
            }
        }
    }
}
