//! The loop behind each of the order service's watches (the dead-letter
//! watch, the timeline observer): pull a batch from a durable consumer,
//! process each message, and survive a broker that comes and goes, saying
//! so on the health board.

use std::{future::Future, time::Duration};

use async_nats::jetstream::{self, AckKind, consumer::pull};
use common::{
    Subjects,
    backoff::backoff,
    health::{Condition, Health},
    topology::{self, WatchSpec},
};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

/// A watch whose consumers exist, as the loop to run (or why they could not
/// be created: a start-up error).
pub type Started = Result<futures::future::BoxFuture<'static, ()>, topology::TopologyError>;

/// Where a watch pulls from and reports to.
#[derive(Clone)]
pub struct Source {
    pub js: jetstream::Context,
    pub subjects: Subjects,
    pub health: Health,
}

impl Source {
    /// Creates the durable consumer now (a start-up error if it cannot be),
    /// then returns the loop that hands every message to `process`, which
    /// acks it.
    pub async fn watch<F, Fut>(
        self,
        spec: WatchSpec,
        health_name: &'static str,
        shutdown: CancellationToken,
        process: F,
    ) -> Result<impl Future<Output = ()> + Send + 'static, topology::TopologyError>
    where
        F: Fn(jetstream::Message) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let consumer =
            topology::apply_consumer(&self.js, &self.subjects, topology::Durable::Watch(&spec))
                .await?;
        self.health.ok(health_name);
        Ok(self.run(spec, health_name, consumer, shutdown, process))
    }

    async fn run<F, Fut>(
        self,
        spec: WatchSpec,
        health_name: &'static str,
        mut consumer: jetstream::consumer::Consumer<pull::Config>,
        shutdown: CancellationToken,
        process: F,
    ) where
        F: Fn(jetstream::Message) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
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
                    process(msg.map_err(|e| e.to_string())?).await;
                }
                Ok::<_, String>(())
            }
            .await;
            match result {
                Ok(()) => {
                    if failures > 0 {
                        self.health.ok(health_name);
                    }
                    failures = 0;
                }
                Err(e) => {
                    failures += 1;
                    tracing::warn!(watch = spec.name, error = %e, failures, "cannot pull; retrying");
                    if failures >= 2 {
                        self.health.report(
                            health_name,
                            Condition::Failing(format!("{} cannot pull: {e}", spec.name)),
                        );
                        if let Ok(c) = topology::apply_consumer(
                            &self.js,
                            &self.subjects,
                            topology::Durable::Watch(&spec),
                        )
                        .await
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
}

/// Acks (or naks) a watched message; a lost ack means a redelivery, which
/// every watch tolerates.
pub async fn ack(msg: &jetstream::Message, kind: AckKind) {
    if let Err(e) = msg.ack_with(kind).await {
        tracing::warn!(error = %e, "watch ack not sent");
    }
}

/// The value of a header of `msg`, if present.
pub fn header(msg: &jetstream::Message, name: &str) -> Option<String> {
    msg.headers
        .as_ref()
        .and_then(|h| h.get(name))
        .map(|v| v.as_str().to_string())
}
