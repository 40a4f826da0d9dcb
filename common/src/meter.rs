//! Prometheus metrics (`GET /metrics` on every service), recorded with the
//! `metrics` crate and rendered by its Prometheus exporter. Every series
//! carries the `service` label, so one process running several services
//! (the test harness) still tells them apart.
//!
//! Counters and histograms move as work is done ([`Meter`]); gauges that
//! describe a backlog (consumer pending counts, dead letters, outbox depth,
//! projection lag) are read from the broker and the database at each scrape
//! ([`Scrape`]), each read under a timeout, so a scrape never hangs on a
//! dependency and never shows a value older than itself.

use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, OnceLock},
    time::{Duration, SystemTime},
};

use async_nats::jetstream;
use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use futures::TryStreamExt;
use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use sqlx::PgPool;

use crate::subjects::Subjects;

/// Series names, in one place (the alert rules in `prometheus/` use them);
/// [`SERIES`] says what each is.
pub mod names {
    pub const EVENTS: &str = "saga_events_total";
    pub const HANDLER_SECONDS: &str = "saga_handler_seconds";
    pub const EVENT_LATENCY: &str = "saga_event_latency_seconds";
    pub const CONSUMER_PENDING: &str = "saga_consumer_pending";
    pub const CONSUMER_ACK_PENDING: &str = "saga_consumer_ack_pending";
    pub const PROJECTION_LAG: &str = "saga_projection_lag_seconds";
    pub const DEAD_LETTERS: &str = "saga_dead_letters";
    pub const OUTBOX_DEPTH: &str = "saga_outbox_depth";
    pub const OUTBOX_OLDEST: &str = "saga_outbox_oldest_seconds";
    pub const RELAY_PUBLISH: &str = "saga_relay_publish_seconds";
    pub const COMPENSATIONS: &str = "saga_compensations_total";
    pub const SAGAS_ENDED: &str = "saga_ended_total";
    pub const SAGAS_STALLED: &str = "saga_stalled";
    pub const STALLS: &str = "saga_stalls_total";
    pub const SCRAPE_ERRORS: &str = "saga_scrape_errors_total";
    pub const SNAPSHOTS: &str = "saga_snapshots_total";
    pub const BATCHES: &str = "saga_consumer_batches_total";
    pub const BATCHED_EVENTS: &str = "saga_consumer_batched_events_total";
    pub const RELAY_BATCHES: &str = "saga_relay_batches_total";
    pub const RELAY_BATCHED_EVENTS: &str = "saga_relay_batched_events_total";
    pub const JANITOR_DELETED: &str = "saga_janitor_deleted_total";
    pub const PLACEMENT_GROUPS: &str = "saga_placement_groups_total";
    pub const PLACEMENT_GROUPED: &str = "saga_placement_grouped_orders_total";
    pub const PLACEMENTS_WAITING: &str = "saga_placements_waiting";
    pub const HTTP_REQUESTS: &str = "saga_http_requests_total";
    pub const HTTP_SECONDS: &str = "saga_http_request_seconds";
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Every series: its name, kind and `# HELP` text. A `_seconds` series is
/// in seconds.
#[rustfmt::skip]
pub const SERIES: [(&str, Kind, &str); 26] = {
    use Kind::*;
    use names::*;
    [
        (EVENTS, Counter, "Deliveries handled, by consumer, event type and disposition"),
        (HANDLER_SECONDS, Histogram, "Time to handle one delivery (claim, transaction, ack)"),
        (EVENT_LATENCY, Histogram, "From an event's publish to its being applied"),
        (CONSUMER_PENDING, Gauge, "Events not yet delivered to the consumer"),
        (CONSUMER_ACK_PENDING, Gauge, "Events delivered to the consumer and not yet acknowledged"),
        (PROJECTION_LAG, Gauge, "Age of the oldest event the projection has not applied"),
        (DEAD_LETTERS, Gauge, "Dead letters of the consumer in the dead-letter stream"),
        (OUTBOX_DEPTH, Gauge, "Events committed and not yet published"),
        (OUTBOX_OLDEST, Gauge, "Age of the oldest unpublished event"),
        (RELAY_PUBLISH, Histogram, "From an event's write to the outbox to the broker's acknowledgement"),
        (COMPENSATIONS, Counter, "Compensation attempts, by step and result (undone, failed)"),
        (SAGAS_ENDED, Counter, "Sagas that ended, by outcome (confirmed, cancelled, intervention, manually_compensated)"),
        (SAGAS_STALLED, Gauge, "Sagas waiting at one step longer than the stall threshold"),
        (STALLS, Counter, "Stalls reported, each once"),
        (SCRAPE_ERRORS, Counter, "Reads of a /metrics scrape that failed or timed out"),
        (SNAPSHOTS, Counter, "Aggregate snapshots taken, and stored ones not used (another format, or not decodable), by outcome"),
        (BATCHES, Counter, "Batches of two or more events a consumer lane took together, by outcome (committed in one transaction, or applied one by one)"),
        (BATCHED_EVENTS, Counter, "Events in those batches, by outcome"),
        (RELAY_BATCHES, Counter, "Atomic batches the relay published, by outcome (stored as one, or refused and published one by one)"),
        (RELAY_BATCHED_EVENTS, Counter, "Events in those batches, by outcome"),
        (JANITOR_DELETED, Counter, "Rows the janitor deleted, by table: what can no longer come back"),
        (PLACEMENT_GROUPS, Counter, "Groups of two or more placements the order service wrote together, by outcome (committed in one transaction, or written one by one)"),
        (PLACEMENT_GROUPED, Counter, "Placements in those groups, by outcome"),
        (PLACEMENTS_WAITING, Gauge, "Placements received and waiting for a writer of the order service"),
        (HTTP_REQUESTS, Counter, "HTTP requests answered, by method, route and status"),
        (HTTP_SECONDS, Histogram, "Time to answer an HTTP request, by method, route and status"),
    ]
};

/// Bucket bounds of every `_seconds` histogram: 1 ms to 30 s.
const BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// How long one read of a scrape may take.
const READ_TIMEOUT: Duration = Duration::from_secs(2);

/// The process's recorder, installed on first use.
fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &BUCKETS)
            .expect("the buckets are not empty")
            .build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("another metrics recorder was installed first; /metrics stays empty");
        }
        describe();
        handle
    })
}

/// The `# HELP` line of every series.
fn describe() {
    for (name, kind, help) in SERIES {
        let unit = name.ends_with("_seconds").then_some(metrics::Unit::Seconds);
        match (kind, unit) {
            (Kind::Counter, _) => metrics::describe_counter!(name, help),
            (Kind::Gauge, Some(unit)) => metrics::describe_gauge!(name, unit, help),
            (Kind::Gauge, None) => metrics::describe_gauge!(name, help),
            (Kind::Histogram, Some(unit)) => metrics::describe_histogram!(name, unit, help),
            (Kind::Histogram, None) => metrics::describe_histogram!(name, help),
        }
    }
}

/// Records one service's counters and histograms. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Meter {
    service: Arc<str>,
    /// Compensations recorded by a meter from [`Meter::holding`], until
    /// [`Meter::release`].
    held: Option<Arc<std::sync::Mutex<Vec<Compensation>>>>,
}

/// A compensation attempted: the step, and whether it failed.
type Compensation = (&'static str, bool);

impl Meter {
    pub fn new(service: &str) -> Meter {
        handle();
        Meter {
            service: service.into(),
            held: None,
        }
    }

    /// A meter whose compensations count only once [`Meter::release`]d: for
    /// a transaction that may be rolled back and done again (a batch), so
    /// what it undid is counted when it is committed, and once.
    pub fn holding(&self) -> Meter {
        Meter {
            service: self.service.clone(),
            held: Some(Default::default()),
        }
    }

    /// Counts what this meter held.
    pub fn release(&self) {
        let Some(held) = &self.held else { return };
        let held = std::mem::take(&mut *held.lock().unwrap_or_else(|e| e.into_inner()));
        for (step, failed) in held {
            self.count_compensation(step, failed);
        }
    }

    fn service(&self) -> String {
        self.service.to_string()
    }

    /// One delivery handled: what became of it, how long it took and, for
    /// an applied event, how long after its publish.
    pub fn delivery(
        &self,
        consumer: &str,
        event_type: &str,
        disposition: &'static str,
        took: Duration,
        since_publish: Option<Duration>,
    ) {
        let service = self.service();
        counter!(names::EVENTS, "service" => service.clone(), "consumer" => consumer.to_string(),
            "event_type" => event_type.to_string(), "disposition" => disposition)
        .increment(1);
        histogram!(names::HANDLER_SECONDS, "service" => service.clone(), "consumer" => consumer.to_string(),
            "disposition" => disposition)
        .record(took.as_secs_f64());
        if let Some(latency) = since_publish {
            histogram!(names::EVENT_LATENCY, "service" => service, "consumer" => consumer.to_string())
                .record(latency.as_secs_f64());
        }
    }

    /// An outbox event acknowledged by the broker, `age` after its commit.
    pub fn published(&self, age: Duration) {
        histogram!(names::RELAY_PUBLISH, "service" => self.service()).record(age.as_secs_f64());
    }

    /// A compensation attempted: undone, or failed (to be retried or
    /// dead-lettered).
    pub fn compensation(&self, step: &'static str, failed: bool) {
        match &self.held {
            Some(held) => held
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((step, failed)),
            None => self.count_compensation(step, failed),
        }
    }

    fn count_compensation(&self, step: &'static str, failed: bool) {
        let result = if failed { "failed" } else { "undone" };
        counter!(names::COMPENSATIONS, "service" => self.service(), "step" => step, "result" => result)
            .increment(1);
    }

    /// A saga reached an end.
    pub fn saga_ended(&self, outcome: &'static str) {
        counter!(names::SAGAS_ENDED, "service" => self.service(), "outcome" => outcome)
            .increment(1);
    }

    /// A batch of `events` a lane took together: `committed` in one
    /// transaction, or applied `one_by_one`.
    pub fn batch(&self, consumer: &str, outcome: &'static str, events: usize) {
        counter!(names::BATCHES, "service" => self.service(), "consumer" => consumer.to_string(),
            "outcome" => outcome)
        .increment(1);
        counter!(names::BATCHED_EVENTS, "service" => self.service(), "consumer" => consumer.to_string(),
            "outcome" => outcome)
        .increment(events as u64);
    }

    /// An atomic batch of `events` the relay published: `atomic` (stored
    /// as one) or `one_by_one` (refused, then published one by one).
    pub fn relay_batch(&self, outcome: &'static str, events: usize) {
        counter!(names::RELAY_BATCHES, "service" => self.service(), "outcome" => outcome)
            .increment(1);
        counter!(names::RELAY_BATCHED_EVENTS, "service" => self.service(), "outcome" => outcome)
            .increment(events as u64);
    }

    /// A group of `orders` placements written `committed` in one
    /// transaction, or `one_by_one` after that transaction failed.
    pub fn placement_group(&self, outcome: &'static str, orders: usize) {
        counter!(names::PLACEMENT_GROUPS, "service" => self.service(), "outcome" => outcome)
            .increment(1);
        counter!(names::PLACEMENT_GROUPED, "service" => self.service(), "outcome" => outcome)
            .increment(orders as u64);
    }

    /// Rows of `table` the janitor deleted.
    pub fn janitor(&self, table: &'static str, rows: u64) {
        counter!(names::JANITOR_DELETED, "service" => self.service(), "table" => table)
            .increment(rows);
    }

    /// A snapshot taken, or a stored one ignored.
    pub fn snapshot(&self, outcome: &'static str) {
        counter!(names::SNAPSHOTS, "service" => self.service(), "outcome" => outcome).increment(1);
    }

    /// Stalls reported now.
    pub fn stalls(&self, count: u64) {
        counter!(names::STALLS, "service" => self.service()).increment(count);
    }

    /// Sets a gauge of this service, with extra labels.
    pub fn gauge(&self, name: &'static str, labels: &[(&'static str, String)], value: f64) {
        let mut all = vec![("service", self.service())];
        all.extend(labels.iter().cloned());
        let labels: Vec<metrics::Label> = all
            .into_iter()
            .map(|(k, v)| metrics::Label::new(k, v))
            .collect();
        gauge!(name, labels).set(value);
    }
}

/// A consumer whose backlog a scrape reports.
#[derive(Debug, Clone)]
pub struct Watched {
    pub stream: String,
    pub durable: String,
    /// Set for a projection's consumer: its lag in seconds is reported
    /// under this name.
    pub projection: Option<&'static str>,
}

/// One read of a scrape, setting gauges.
pub type Read<'a> = Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send + 'a>>;

/// A read a scrape makes besides the common ones (the order service's
/// stalled sagas).
pub type Probe = Arc<dyn Fn(Meter) -> Read<'static> + Send + Sync>;

/// What `GET /metrics` reads before it renders.
#[derive(Clone)]
pub struct Scrape {
    pub meter: Meter,
    pub pool: PgPool,
    pub js: jetstream::Context,
    pub subjects: Subjects,
    /// The service's own consumer (whose dead letters it reports).
    pub consumer: String,
    pub watched: Vec<Watched>,
    pub probes: Vec<Probe>,
}

impl Scrape {
    pub fn router(self) -> Router {
        Router::new()
            .route("/metrics", get(render))
            .with_state(Arc::new(self))
    }

    /// Reads every backlog gauge; a read that fails or times out is counted
    /// and logged, and its gauge keeps its last value.
    async fn refresh(&self) {
        let mut reads: Vec<(String, Read<'_>)> = vec![
            ("outbox".into(), Box::pin(self.outbox())),
            ("dead letters".into(), Box::pin(self.dead_letters())),
        ];
        for w in &self.watched {
            reads.push((
                format!("consumer {}", w.durable),
                Box::pin(self.consumer(w)),
            ));
        }
        for (i, probe) in self.probes.iter().enumerate() {
            reads.push((format!("probe {i}"), probe(self.meter.clone())));
        }
        let results = futures::future::join_all(reads.into_iter().map(|(what, read)| async move {
            match tokio::time::timeout(READ_TIMEOUT, read).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err((what, e.to_string())),
                Err(_) => Err((what, format!("no answer within {READ_TIMEOUT:?}"))),
            }
        }))
        .await;
        for (what, error) in results.into_iter().filter_map(Result::err) {
            tracing::warn!(%what, %error, "metrics read failed; its gauges keep their last value");
            counter!(names::SCRAPE_ERRORS, "service" => self.meter.service()).increment(1);
        }
    }

    async fn outbox(&self) -> anyhow::Result<()> {
        let (depth, oldest): (i64, Option<f64>) = sqlx::query_as(
            "SELECT count(*), extract(epoch FROM now() - min(created_at))::float8 FROM outbox",
        )
        .fetch_one(&self.pool)
        .await?;
        self.meter.gauge(names::OUTBOX_DEPTH, &[], depth as f64);
        self.meter
            .gauge(names::OUTBOX_OLDEST, &[], oldest.unwrap_or(0.0).max(0.0));
        Ok(())
    }

    async fn dead_letters(&self) -> anyhow::Result<()> {
        let stream = self
            .js
            .get_stream_no_info(self.subjects.dead_letter_stream())
            .await?;
        let counts = stream
            .info_with_subjects(self.subjects.dead_letter(&self.consumer))
            .await?;
        let total: usize = counts
            .map_ok(|(_, n)| n)
            .try_collect::<Vec<_>>()
            .await?
            .iter()
            .sum();
        self.meter.gauge(
            names::DEAD_LETTERS,
            &[("consumer", self.consumer.clone())],
            total as f64,
        );
        Ok(())
    }

    async fn consumer(&self, w: &Watched) -> anyhow::Result<()> {
        let stream = self.js.get_stream_no_info(&w.stream).await?;
        let mut consumer: jetstream::consumer::PullConsumer = stream
            .get_consumer(&w.durable)
            .await
            .map_err(|e| anyhow::anyhow!(e))?;
        let info = consumer.info().await?.clone();
        let labels = [("consumer", w.durable.clone())];
        self.meter
            .gauge(names::CONSUMER_PENDING, &labels, info.num_pending as f64);
        self.meter.gauge(
            names::CONSUMER_ACK_PENDING,
            &labels,
            info.num_ack_pending as f64,
        );
        if let Some(projection) = w.projection {
            // The oldest event not applied yet is the one after the ack
            // floor (the projection reads the whole stream, unfiltered).
            let lag = if info.num_pending == 0 && info.num_ack_pending == 0 {
                0.0
            } else {
                let next = stream
                    .get_raw_message(info.ack_floor.stream_sequence + 1)
                    .await?;
                age(next.time.unix_timestamp_nanos()).as_secs_f64()
            };
            self.meter.gauge(
                names::PROJECTION_LAG,
                &[("projection", projection.to_string())],
                lag,
            );
        }
        Ok(())
    }
}

/// `GET /metrics`: every series, in Prometheus' text format.
#[utoipa::path(get, path = "/metrics", tag = "health",
    responses((status = 200, description = "Prometheus text exposition format", content_type = "text/plain; version=0.0.4; charset=utf-8", body = String)))]
pub(crate) async fn render(State(scrape): State<Arc<Scrape>>) -> Response {
    scrape.refresh().await;
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        handle().render(),
    )
        .into_response()
}

/// Drains histogram samples into their buckets now and then, so memory
/// stays bounded however rarely `/metrics` is scraped.
pub async fn upkeep(shutdown: tokio_util::sync::CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => handle().run_upkeep(),
        }
    }
}

/// How long ago a broker timestamp (nanoseconds since the epoch) was; zero
/// if it is ahead of this clock.
pub fn age(unix_nanos: i128) -> Duration {
    let then =
        SystemTime::UNIX_EPOCH + Duration::from_nanos(unix_nanos.clamp(0, u64::MAX as i128) as u64);
    SystemTime::now().duration_since(then).unwrap_or_default()
}
