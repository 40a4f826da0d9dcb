//! JetStream streams and consumers, read from the declarative files in `nats/`
//! (the same files a `nats` CLI user applies with `--config`) and applied
//! idempotently by every service at start-up.

use async_nats::jetstream::{self, consumer::pull, stream};

use std::time::Duration;

use crate::{backoff::backoff, subjects::Subjects};

/// Tries to create or update a stream gets before start-up fails (about
/// 4 s in all).
const STREAM_ATTEMPTS: i64 = 8;

const EVENTS_STREAM: &str = include_str!("../../nats/streams/events.json");
const DLQ_STREAM: &str = include_str!("../../nats/streams/dlq.json");
const CATALOG_STREAM: &str = include_str!("../../nats/streams/catalog.json");

/// Consumer definition file of each service of the roster, by durable name.
pub fn consumer_file(service: &str) -> Option<&'static str> {
    crate::roster::find(service).map(|s| s.consumer)
}

/// Our streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Every saga event (`SAGA_EVENTS`).
    Events,
    /// What consumers could not apply (`SAGA_DLQ`).
    DeadLetters,
    /// The latest catalog event of each product (`SAGA_CATALOG`).
    Catalog,
}

impl Stream {
    /// Its name for this prefix.
    pub fn name(self, subjects: &Subjects) -> String {
        match self {
            Stream::Events => subjects.events_stream(),
            Stream::DeadLetters => subjects.dead_letter_stream(),
            Stream::Catalog => subjects.catalog_stream(),
        }
    }
}

/// A durable consumer that watches a whole stream rather than a service's
/// inputs: the order service's dead-letter watch, its timeline observer and
/// its catalog.
#[derive(Debug, Clone, Copy)]
pub struct WatchSpec {
    /// The durable name, also the file's name in `nats/consumers/`.
    pub name: &'static str,
    /// The stream it watches.
    pub on: Stream,
    definition: &'static str,
}

impl WatchSpec {
    /// The stream it watches, by name.
    pub fn stream(&self, subjects: &Subjects) -> String {
        self.on.name(subjects)
    }
}

/// A watch whose definition is `nats/consumers/<name>.json`.
macro_rules! watch {
    ($name:literal on $on:ident) => {
        WatchSpec {
            name: $name,
            on: Stream::$on,
            definition: include_str!(concat!("../../nats/consumers/", $name, ".json")),
        }
    };
}

/// Halts a pending saga whose event was dead-lettered.
pub const DEAD_LETTER_WATCH: WatchSpec = watch!("order-dead-letters" on DeadLetters);
/// Records every event of every saga in its timeline.
pub const TIMELINE_EVENTS: WatchSpec = watch!("order-timeline" on Events);
/// Records every dead letter of every saga in its timeline.
pub const TIMELINE_DEAD_LETTERS: WatchSpec = watch!("order-timeline-dead-letters" on DeadLetters);
/// Keeps the order service's catalog: the price of every product.
pub const CATALOG_WATCH: WatchSpec = watch!("order-catalog" on Catalog);
/// Every watch, for tests and tools.
pub const WATCHES: [WatchSpec; 4] = [
    DEAD_LETTER_WATCH,
    TIMELINE_EVENTS,
    TIMELINE_DEAD_LETTERS,
    CATALOG_WATCH,
];

#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("topology file for {0} does not parse: {1}")]
    Parse(String, serde_json::Error),
    #[error("no consumer is defined for service '{0}'")]
    NoConsumer(String),
    #[error("applying stream {0}: {1}")]
    Stream(String, String),
    #[error("applying consumer {0}: {1}")]
    Consumer(String, String),
}

/// Every stream, rewritten for the prefix.
pub fn stream_configs(subjects: &Subjects) -> Result<Vec<stream::Config>, TopologyError> {
    [
        ("events", EVENTS_STREAM),
        ("dlq", DLQ_STREAM),
        ("catalog", CATALOG_STREAM),
    ]
    .into_iter()
    .map(|(name, text)| {
        let mut config: stream::Config =
            serde_json::from_str(text).map_err(|e| TopologyError::Parse(name.into(), e))?;
        config.name = subjects.stream_name(&config.name);
        config.subjects = config
            .subjects
            .iter()
            .map(|s| subjects.rewrite_subject(s))
            .collect();
        Ok(config)
    })
    .collect()
}

/// The service's durable pull consumer, rewritten for the prefix.
pub fn consumer_config(subjects: &Subjects, service: &str) -> Result<pull::Config, TopologyError> {
    let text = consumer_file(service).ok_or_else(|| TopologyError::NoConsumer(service.into()))?;
    parse_consumer(subjects, service, text)
}

/// A consumer definition, its filters rewritten for the prefix.
fn parse_consumer(
    subjects: &Subjects,
    name: &str,
    text: &str,
) -> Result<pull::Config, TopologyError> {
    let mut config: pull::Config =
        serde_json::from_str(text).map_err(|e| TopologyError::Parse(name.into(), e))?;
    config.filter_subjects = config
        .filter_subjects
        .iter()
        .map(|s| subjects.rewrite_subject(s))
        .collect();
    if !config.filter_subject.is_empty() {
        config.filter_subject = subjects.rewrite_subject(&config.filter_subject);
    }
    Ok(config)
}

/// Creates or updates every stream, each kept in `replicas` copies (1 on a
/// single server; `NATS_STREAM_REPLICAS`, 3 on a 3-node cluster); safe to
/// run from every service at once. Consumers keep as many copies as their
/// stream.
pub async fn apply_streams(
    js: &jetstream::Context,
    subjects: &Subjects,
    replicas: usize,
) -> Result<(), TopologyError> {
    for mut config in stream_configs(subjects)? {
        config.num_replicas = replicas;
        let name = config.name.clone();
        let mut failures = 0;
        loop {
            match js.create_or_update_stream(config.clone()).await {
                Ok(_) => break,
                // Services starting together on a fresh broker race to create
                // the same stream, and the server may count a create still in
                // flight against the store of the others ("insufficient
                // storage resources"). Once the first create is done, the
                // others' updates succeed: retry, briefly.
                Err(_) if failures < STREAM_ATTEMPTS => {
                    failures += 1;
                    tokio::time::sleep(backoff(failures, Duration::from_secs(1))).await;
                }
                Err(e) => return Err(TopologyError::Stream(name, e.to_string())),
            }
        }
    }
    Ok(())
}

/// One of our durable consumers: a service's inputs, or a watch.
#[derive(Debug, Clone, Copy)]
pub enum Durable<'a> {
    Service(&'a str),
    Watch(&'a WatchSpec),
}

/// Creates (or updates) a durable consumer and returns it.
pub async fn apply_consumer(
    js: &jetstream::Context,
    subjects: &Subjects,
    durable: Durable<'_>,
) -> Result<PullConsumer, TopologyError> {
    let (name, config, stream) = match durable {
        Durable::Service(service) => (
            service,
            consumer_config(subjects, service)?,
            subjects.events_stream(),
        ),
        Durable::Watch(watch) => (
            watch.name,
            watch_config(subjects, watch)?,
            watch.stream(subjects),
        ),
    };
    create_or_update(js, stream, config, name).await
}

type PullConsumer = jetstream::consumer::Consumer<pull::Config>;

/// Create is idempotent for an identical config; update covers a changed file.
async fn create_or_update(
    js: &jetstream::Context,
    stream: String,
    config: pull::Config,
    name: &str,
) -> Result<PullConsumer, TopologyError> {
    let err = |e: &dyn std::fmt::Display| TopologyError::Consumer(name.into(), e.to_string());
    let stream = js.get_stream(&stream).await.map_err(|e| err(&e))?;
    match stream.create_consumer(config.clone()).await {
        Ok(c) => Ok(c),
        Err(_) => stream.update_consumer(config).await.map_err(|e| err(&e)),
    }
}

/// A watch's durable consumer, rewritten for the prefix.
pub fn watch_config(subjects: &Subjects, watch: &WatchSpec) -> Result<pull::Config, TopologyError> {
    parse_consumer(subjects, watch.name, watch.definition)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_service_has_a_consumer_that_parses() {
        let s = Subjects::new("saga");
        for svc in crate::roster::names() {
            let c = consumer_config(&s, svc).unwrap();
            assert_eq!(c.durable_name.as_deref(), Some(svc));
            assert!(!c.filter_subjects.is_empty());
            assert_eq!(c.ack_policy, jetstream::consumer::AckPolicy::Explicit);
        }
    }

    #[test]
    fn consumers_only_filter_on_subjects_their_stream_holds() {
        let s = Subjects::new("x");
        let streams = stream_configs(&s).unwrap();
        let events = &streams[0];
        assert_eq!(events.name, "X_EVENTS");
        for svc in crate::roster::names() {
            for f in consumer_config(&s, svc).unwrap().filter_subjects {
                let aggregate = f.split('.').nth(1).unwrap();
                assert!(events.subjects.contains(&format!("x.{aggregate}.>")), "{f}");
            }
        }
    }

    #[test]
    fn every_event_a_consumer_filters_on_exists_in_the_catalog() {
        let s = Subjects::new("saga");
        let all: Vec<String> = crate::event::EventKind::ALL
            .iter()
            .map(|k| s.filter(*k))
            .collect();
        for svc in crate::roster::names() {
            for f in consumer_config(&s, svc).unwrap().filter_subjects {
                assert!(all.contains(&f), "{svc} filters on unknown subject {f}");
            }
        }
    }

    /// A watch sees its whole stream: the dead-letter ones filter on the
    /// dead-letter subjects, the catalog on the catalog's, the timeline on
    /// none (every event).
    #[test]
    fn every_watch_parses_and_sees_its_whole_stream() {
        let s = Subjects::new("x");
        for w in WATCHES {
            let c = watch_config(&s, &w).unwrap();
            assert_eq!(c.durable_name.as_deref(), Some(w.name));
            assert!(c.filter_subjects.is_empty(), "{}", w.name);
            let expected = match w.on {
                Stream::DeadLetters => "x.dlq.>",
                Stream::Catalog => "x.catalog.>",
                Stream::Events => "",
            };
            assert_eq!(c.filter_subject, expected, "{}", w.name);
        }
    }

    /// The catalog stream keeps exactly the latest event of each product,
    /// for good: a catalog rebuilt from it has every product.
    #[test]
    fn the_catalog_stream_keeps_the_latest_event_of_every_product_for_good() {
        let s = Subjects::new("x");
        let streams = stream_configs(&s).unwrap();
        let catalog = streams.iter().find(|c| c.name == "X_CATALOG").unwrap();
        assert_eq!(catalog.subjects, vec![s.catalog()]);
        assert_eq!(catalog.max_messages_per_subject, 1);
        assert_eq!(catalog.max_age, Duration::ZERO);
        assert!(s.product("a.b").starts_with("x.catalog."));
    }

    /// Streams reserve their max_bytes: the shipped server must hold both,
    /// and the dead-letter stream refuses rather than drops when full.
    #[test]
    fn the_streams_fit_the_shipped_store_and_dead_letters_are_never_dropped() {
        let conf = include_str!("../../nats/nats-server.conf");
        let store = crate::setting(conf, "max_file_store:")
            .map(|v| v.trim())
            .expect("max_file_store in nats-server.conf");
        let gib: u64 = store
            .strip_suffix("GB")
            .expect("max_file_store in GB")
            .parse()
            .unwrap();
        let streams = stream_configs(&Subjects::new("saga")).unwrap();
        let reserved: i64 = streams.iter().map(|s| s.max_bytes).sum();
        assert!(streams.iter().all(|s| s.max_bytes > 0));
        assert!(reserved as u64 <= gib << 30, "{reserved} > {store}");
        let dlq = streams.iter().find(|s| s.name == "SAGA_DLQ").unwrap();
        assert_eq!(dlq.discard, stream::DiscardPolicy::New);
    }

    #[test]
    fn the_server_config_syncs_every_write() {
        let conf = include_str!("../../nats/nats-server.conf");
        assert!(conf.contains("sync_interval: always"));
        // Only its users get in (nats/auth.conf, common::permissions).
        assert!(conf.lines().any(|l| l.trim() == "include auth.conf"));
    }
}
