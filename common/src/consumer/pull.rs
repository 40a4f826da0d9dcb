//! The one loop that pulls from a durable consumer, used by every service's
//! consumer and by the order service's watches: pull a bounded batch, hand
//! its messages over as they arrive, and survive a broker that comes and
//! goes, saying so on the health board. A consumer that is missing (not
//! provisioned yet, or deleted) or keeps failing to pull is looked up
//! again, never created.

use std::{future::Future, time::Duration};

use async_nats::jetstream::{self, consumer::pull};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::{
    backoff::backoff,
    health::{Condition, Health},
    subjects::Subjects,
    topology::{self, Durable, TopologyError},
};

/// How long one pull waits for messages before the next is issued.
pub const PULL_EXPIRY: Duration = Duration::from_secs(1);
/// Longest wait before pulling again, or looking the consumer up again.
const RETRY_CAP: Duration = Duration::from_secs(2);

pub type PullConsumer = jetstream::consumer::Consumer<pull::Config>;

/// Where a loop pulls from and reports to.
pub struct PullLoop<'a> {
    pub js: &'a jetstream::Context,
    pub subjects: &'a Subjects,
    pub durable: Durable<'a>,
    pub health: &'a Health,
    /// Its part's name on the health board.
    pub health_part: &'a str,
    /// Most messages one pull asks for.
    pub max_messages: usize,
}

/// What is done with the messages of each pull.
pub trait Receive: Send {
    /// Takes the pull's messages as they arrive, until it ends (`Ok`) or
    /// fails (the error).
    fn receive(&mut self, pulled: &mut Pulled) -> impl Future<Output = Result<(), String>> + Send;
}

/// One pull's messages, as they arrive.
pub struct Pulled {
    batch: pull::Batch,
    received: bool,
}

impl Pulled {
    /// The next message; `None` once the pull has ended.
    pub async fn next(&mut self) -> Option<Result<jetstream::Message, String>> {
        let next = self.batch.next().await?;
        self.received |= next.is_ok();
        Some(next.map_err(|e| e.to_string()))
    }
}

impl PullLoop<'_> {
    /// Pulls from `consumer` (or, while it cannot be used, looks it up
    /// again) and hands every pull to `receiver` until `shutdown`.
    pub async fn run<R: Receive>(
        &self,
        consumer: Result<PullConsumer, TopologyError>,
        shutdown: &CancellationToken,
        receiver: &mut R,
    ) {
        let name = self.durable.name();
        let mut consumer = match consumer {
            Ok(c) => {
                self.health.ok(self.health_part);
                Some(c)
            }
            Err(e) => {
                self.health
                    .report(self.health_part, Condition::Failing(e.to_string()));
                None
            }
        };
        let mut failures = 0u32;
        while !shutdown.is_cancelled() {
            let Some(bound) = consumer.as_mut() else {
                consumer = self.look_up(shutdown, &mut failures).await;
                continue;
            };
            let (received, result) = match bound
                .batch()
                .max_messages(self.max_messages)
                .expires(PULL_EXPIRY)
                .messages()
                .await
            {
                Ok(batch) => {
                    let mut pulled = Pulled {
                        batch,
                        received: false,
                    };
                    let result = receiver.receive(&mut pulled).await;
                    (pulled.received, result)
                }
                Err(e) => (false, Err(e.to_string())),
            };
            if received || result.is_ok() {
                if failures > 0 && self.health.ok(self.health_part) {
                    tracing::info!(consumer = name, "pulling again");
                }
                failures = 0;
            }
            let Err(e) = result else { continue };
            failures += 1;
            tracing::warn!(consumer = name, error = %e, failures, "cannot pull; retrying");
            if failures >= 2 {
                self.health.report(
                    self.health_part,
                    Condition::Failing(format!("cannot pull from consumer '{name}': {e}")),
                );
                // Looked up again (it may have been deleted and provisioned
                // again); never created here.
                consumer = None;
                continue;
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(backoff(failures as i64, RETRY_CAP)) => {}
            }
        }
    }

    /// Looks the consumer up, after a backoff that grows with `failures`;
    /// `None` (and readiness saying why) while it is missing or not as its
    /// file says, or the broker does not answer.
    async fn look_up(
        &self,
        shutdown: &CancellationToken,
        failures: &mut u32,
    ) -> Option<PullConsumer> {
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(backoff(*failures as i64, RETRY_CAP)) => {}
        }
        *failures = failures.saturating_add(1);
        match topology::bind_consumer(self.js, self.subjects, self.durable).await {
            Ok(c) => {
                *failures = 0;
                if self.health.ok(self.health_part) {
                    tracing::info!(consumer = self.durable.name(), "consumer found; pulling");
                }
                Some(c)
            }
            Err(e) => {
                if (self.health).report(self.health_part, Condition::Failing(e.to_string())) {
                    tracing::error!(consumer = self.durable.name(), error = %e, "cannot use the consumer");
                }
                None
            }
        }
    }
}
