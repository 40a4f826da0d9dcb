//! The order service's watches (the dead-letter watch, the timeline
//! observer, the catalog): the runtime's pull loop
//! ([`common::consumer::pull`]) on a durable consumer of a whole stream,
//! handing each message, or each batch of them, to the watch.

use std::{future::Future, time::Duration};

use async_nats::jetstream::{self, AckKind};
use common::{
    Subjects,
    consumer::pull::{PullLoop, Pulled, Receive},
    health::Health,
    topology::{self, Durable, WatchSpec},
};
use futures::FutureExt;
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
        let consumer =
            topology::bind_consumer(&self.js, &self.subjects, Durable::Watch(&spec)).await;
        if let Err(e) = &consumer {
            tracing::error!(watch = spec.name, error = %e, "the watch's consumer cannot be used yet");
        }
        Ok(async move {
            let mut batches = Batches { linger, process };
            PullLoop {
                js: &self.js,
                subjects: &self.subjects,
                durable: Durable::Watch(&spec),
                health: &self.health,
                health_part: health_name,
                max_messages: PULL,
            }
            .run(consumer, &shutdown, &mut batches)
            .await
        })
    }
}

/// Hands a pull's messages over in batches (see [`Source::watch_batches`]).
struct Batches<F> {
    linger: Duration,
    process: F,
}

impl<F, Fut> Receive for Batches<F>
where
    F: Fn(Vec<jetstream::Message>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    async fn receive(&mut self, pulled: &mut Pulled) -> Result<(), String> {
        loop {
            let Some(first) = pulled.next().await else {
                return Ok(());
            };
            let mut msgs = vec![first?];
            let mut failed = None;
            let mut ended = false;
            let until = tokio::time::Instant::now() + self.linger;
            while msgs.len() < BATCH {
                let next = if self.linger.is_zero() {
                    pulled.next().now_or_never()
                } else {
                    tokio::time::timeout_at(until, pulled.next()).await.ok()
                };
                match next {
                    Some(Some(Ok(msg))) => msgs.push(msg),
                    Some(Some(Err(e))) => {
                        failed = Some(e);
                        break;
                    }
                    Some(None) => {
                        ended = true;
                        break;
                    }
                    None => break,
                }
            }
            (self.process)(msgs).await;
            if let Some(e) = failed {
                return Err(e);
            }
            if ended {
                return Ok(());
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
