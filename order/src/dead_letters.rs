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

use async_nats::jetstream::{self, AckKind, consumer::pull};
use common::{
    Subjects,
    backoff::backoff,
    consumer::dlq_headers,
    health::{Condition, Health},
    limits, outbox, topology,
};
use futures::StreamExt;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    domain::{Command, DomainError},
    store::{self, ExecError},
};

/// Name of the watch in the health board.
pub const HEALTH_WATCH: &str = "deadLetterWatch";

/// Everything the watch needs.
pub struct Watch {
    pub pool: PgPool,
    pub js: jetstream::Context,
    pub subjects: Subjects,
    pub health: Health,
    pub max_payload: usize,
    pub outbox: common::outbox::OutboxSignal,
}

impl Watch {
    /// Creates the durable consumer now, then returns the loop to run.
    pub async fn start(
        self,
        shutdown: CancellationToken,
    ) -> Result<impl std::future::Future<Output = ()>, topology::TopologyError> {
        let consumer = topology::apply_dead_letter_watch(&self.js, &self.subjects).await?;
        self.health.ok(HEALTH_WATCH);
        Ok(self.run(consumer, shutdown))
    }

    async fn run(
        self,
        mut consumer: jetstream::consumer::Consumer<pull::Config>,
        shutdown: CancellationToken,
    ) {
        let mut failures = 0u32;
        while !shutdown.is_cancelled() {
            let result = async {
                let mut batch = consumer
                    .batch()
                    .max_messages(64)
                    .expires(Duration::from_secs(1))
                    .messages()
                    .await
                    .map_err(|e| e.to_string())?;
                while let Some(msg) = batch.next().await {
                    let msg = msg.map_err(|e| e.to_string())?;
                    self.process(&msg).await;
                }
                Ok::<_, String>(())
            }
            .await;
            match result {
                Ok(()) => {
                    if failures > 0 {
                        self.health.ok(HEALTH_WATCH);
                    }
                    failures = 0;
                }
                Err(e) => {
                    failures += 1;
                    tracing::warn!(error = %e, failures, "cannot pull dead letters; retrying");
                    if failures >= 2 {
                        self.health.report(
                            HEALTH_WATCH,
                            Condition::Failing(format!("cannot watch dead letters: {e}")),
                        );
                        if let Ok(c) =
                            topology::apply_dead_letter_watch(&self.js, &self.subjects).await
                        {
                            consumer = c;
                        }
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(backoff(failures as i64, Duration::from_secs(2))) => {}
                    }
                }
            }
        }
    }

    async fn process(&self, msg: &jetstream::Message) {
        let header = |name: &str| {
            msg.headers
                .as_ref()
                .and_then(|h| h.get(name))
                .map(|v| v.as_str().to_string())
        };
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

    /// Moves a pending order to REQUIRES_INTERVENTION; `true` if it did.
    async fn halt(&self, order_id: Uuid, reason: String) -> Result<bool, ExecError> {
        let mut tx = self.pool.begin().await?;
        let result = store::execute(
            &mut tx,
            order_id,
            Command::RequireIntervention { reason },
            order_id,
            Uuid::now_v7(),
        )
        .await;
        match result {
            Ok((_, emitted)) if !emitted.is_empty() => {
                if let Err(too_large) =
                    outbox::enqueue(&mut tx, &self.subjects, &emitted, self.max_payload).await?
                {
                    // Cannot happen for a bounded reason; refuse rather than jam.
                    let _ = tx.rollback().await;
                    tracing::error!(%order_id, reason = %too_large, "intervention event too large");
                    return Ok(false);
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

async fn ack(msg: &jetstream::Message, kind: AckKind) {
    if let Err(e) = msg.ack_with(kind).await {
        tracing::warn!(error = %e, "dead-letter ack not sent");
    }
}
