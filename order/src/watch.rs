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
use futures::{FutureExt, StreamExt};
use tokio_util::sync::CancellationToken;

/// A watch whose consumers exist, as the loop to run (or why they could not
/// be created: a start-up error).
pub type Started = Result<futures::future::BoxFuture<'static, ()>, topology::TopologyError>;

/// What a watch does with each message it is handed, acking it.
pub trait Watcher: Send + Sync + 'static {
    fn process(&self, msg: &jetstream::Message) -> impl Future<Output = ()> + Send;
}

/// Where a watch pulls from and reports to.
#[derive(Clone)]
pub struct Source {
    pub js: jetstream::Context,
    pub subjects: Subjects,
    pub health: Health,
}

impl Source {
    /// Creates the durable consumer now (a start-up error if it cannot be),
    /// then returns the loop that hands every message, one at a time, to
    /// `watcher`, which acks it.
    pub async fn watch<W: Watcher>(
        self,
        spec: WatchSpec,
        health_name: &'static str,
        shutdown: CancellationToken,
        watcher: W,
    ) -> Started {
        let watcher = std::sync::Arc::new(watcher);
        self.watch_batches(spec, health_name, shutdown, Duration::ZERO, move |msgs| {
            let watcher = watcher.clone();
            async move {
                for msg in msgs {
                    watcher.process(&msg).await;
                }
            }
        })
        .await
        .map(|run| Box::pin(run) as _)
    }

    /// Like [`Self::watch`], but hands `process` every message that is
    /// waiting (at most [`BATCH`], in stream order), so it can record them
    /// in one transaction; with a `linger`, the messages that arrive within
    /// it after the first one too, so that a trickle of messages is handed
    /// over in a few batches instead of one by one.
    pub async fn watch_batches<F, Fut>(
        self,
        spec: WatchSpec,
        health_name: &'static str,
        shutdown: CancellationToken,
        linger: Duration,
        process: F,
    ) -> Result<impl Future<Output = ()> + Send + 'static, topology::TopologyError>
    where
        F: Fn(Vec<jetstream::Message>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        // Provisioned by a step of its own: until it is there (and as its
        // file says), the watch says so in readiness and looks again.
        let consumer = match self.bind(&spec).await {
            Ok(c) => {
                self.health.ok(health_name);
                Some(c)
            }
            Err(e) => {
                tracing::error!(watch = spec.name, error = %e, "the watch's consumer cannot be used yet");
                self.health
                    .report(health_name, Condition::Failing(e.to_string()));
                None
            }
        };
        Ok(self.run(spec, health_name, consumer, shutdown, linger, process))
    }

    /// The watch's durable consumer as the broker has it (never created here).
    async fn bind(
        &self,
        spec: &WatchSpec,
    ) -> Result<jetstream::consumer::Consumer<pull::Config>, topology::TopologyError> {
        topology::bind_consumer(&self.js, &self.subjects, topology::Durable::Watch(spec)).await
    }

    async fn run<F, Fut>(
        self,
        spec: WatchSpec,
        health_name: &'static str,
        mut consumer: Option<jetstream::consumer::Consumer<pull::Config>>,
        shutdown: CancellationToken,
        linger: Duration,
        process: F,
    ) where
        F: Fn(Vec<jetstream::Message>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let mut failures = 0u32;
        while !shutdown.is_cancelled() {
            let Some(bound) = consumer.as_mut() else {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(backoff(failures as i64, Duration::from_secs(2))) => {}
                }
                failures = failures.saturating_add(1);
                match self.bind(&spec).await {
                    Ok(c) => {
                        consumer = Some(c);
                        failures = 0;
                        self.health.ok(health_name);
                    }
                    Err(e) => {
                        self.health
                            .report(health_name, Condition::Failing(e.to_string()));
                    }
                }
                continue;
            };
            let result = async {
                let mut batch = bound
                    .batch()
                    .max_messages(PULL)
                    .expires(Duration::from_secs(1))
                    .messages()
                    .await
                    .map_err(|e| e.to_string())?;
                loop {
                    let Some(first) = batch.next().await else {
                        return Ok(());
                    };
                    let mut msgs = vec![first.map_err(|e| e.to_string())?];
                    let mut failed = None;
                    let mut ended = false;
                    let until = tokio::time::Instant::now() + linger;
                    while msgs.len() < BATCH {
                        let next = if linger.is_zero() {
                            batch.next().now_or_never()
                        } else {
                            tokio::time::timeout_at(until, batch.next()).await.ok()
                        };
                        match next {
                            Some(Some(Ok(msg))) => msgs.push(msg),
                            Some(Some(Err(e))) => {
                                failed = Some(e.to_string());
                                break;
                            }
                            Some(None) => {
                                ended = true;
                                break;
                            }
                            None => break,
                        }
                    }
                    process(msgs).await;
                    if let Some(e) = failed {
                        return Err(e);
                    }
                    if ended {
                        return Ok::<_, String>(());
                    }
                }
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
    }
}

/// Most messages a watch hands over together.
pub const BATCH: usize = 64;
/// Most messages one pull asks for: many batches' worth, so that the
/// broker's answer to the next pull (tens of milliseconds when it is busy
/// writing) is waited for once per many batches, not once per batch. The
/// messages arrive and are handed over as the broker sends them.
const PULL: usize = 16 * BATCH;

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
