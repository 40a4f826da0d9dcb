//! JetStream streams and consumers, read from the declarative files in `nats/`
//! (the same files a `nats` CLI user applies with `--config`), provisioned
//! by a separate step with its own identity ([`provision`]) and only
//! checked by the services, which may not change them.

use async_nats::jetstream::{
    self,
    consumer::{self, pull},
    stream,
};

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
    #[error("{0} is missing: {PROVISION_HINT}")]
    Missing(String),
    #[error("consumer {0} is not as its file says ({1}): {PROVISION_HINT}")]
    Different(String, String),
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

/// How an operator (re-)creates what a service finds missing or changed.
pub const PROVISION_HINT: &str =
    "provision the broker (`stack provision`, or the compose `provision` service)";

/// Creates every stream and durable consumer that is missing, and brings
/// existing ones in line with the files, each stream kept in `replicas`
/// copies (1 on a single server; 3 on a 3-node cluster). A limit an
/// operator raised on a running stream (`max_age`, `max_bytes`,
/// `max_msgs`, …) is kept, never lowered back to the file's. Returns what
/// it changed, one line each.
///
/// The provisioning identity runs it (`stack provision`, the compose
/// `provision` service, the test harness); the services may not create or
/// update streams and consumers, and only check them ([`check_streams`],
/// [`bind_consumer`]).
pub async fn provision(
    js: &jetstream::Context,
    subjects: &Subjects,
    replicas: usize,
) -> Result<Vec<String>, TopologyError> {
    let mut changed = Vec::new();
    for mut config in stream_configs(subjects)? {
        config.num_replicas = replicas;
        let name = config.name.clone();
        let existing = match js.get_stream(&name).await {
            Ok(mut stream) => Some(
                stream
                    .info()
                    .await
                    .map_err(|e| TopologyError::Stream(name.clone(), e.to_string()))?
                    .config
                    .clone(),
            ),
            Err(_) => None,
        };
        let wanted = match &existing {
            Some(running) => {
                let file = keeping_raised_limits(config, running);
                let wanted = overlaid(running, &file, &file_keys(&name, subjects)?)
                    .map_err(|e| TopologyError::Stream(name.clone(), e.to_string()))?;
                if &wanted == running {
                    continue;
                }
                wanted
            }
            None => config,
        };
        let mut failures = 0;
        loop {
            match js.create_or_update_stream(wanted.clone()).await {
                Ok(_) => break,
                // The server may still count a create in flight against the
                // store ("insufficient storage resources"): retry, briefly.
                Err(_) if failures < STREAM_ATTEMPTS => {
                    failures += 1;
                    tokio::time::sleep(backoff(failures, Duration::from_secs(1))).await;
                }
                Err(e) => return Err(TopologyError::Stream(name, e.to_string())),
            }
        }
        changed.push(match existing {
            Some(_) => format!("stream {name} updated"),
            None => format!("stream {name} created"),
        });
    }
    let durables = crate::roster::names()
        .map(Durable::Service)
        .chain(WATCHES.iter().map(Durable::Watch));
    for durable in durables {
        let (name, config, stream) = definition(subjects, durable)?;
        let err = |e: &dyn std::fmt::Display| TopologyError::Consumer(name.into(), e.to_string());
        let stream = js.get_stream(&stream).await.map_err(|e| err(&e))?;
        match stream.get_consumer::<pull::Config>(name).await {
            Ok(mut running) => {
                let info = running.info().await.map_err(|e| err(&e))?;
                if differences(&config, &info.config).is_empty() {
                    continue;
                }
                stream.update_consumer(config).await.map_err(|e| err(&e))?;
                changed.push(format!("consumer {name} updated"));
            }
            Err(_) => {
                stream.create_consumer(config).await.map_err(|e| err(&e))?;
                changed.push(format!("consumer {name} created"));
            }
        }
    }
    Ok(changed)
}

/// The settings a stream's file names (its JSON keys), with `name`,
/// `subjects` and `num_replicas`, which provisioning always sets.
fn file_keys(stream: &str, subjects: &Subjects) -> Result<Vec<String>, TopologyError> {
    for (name, text) in [
        ("events", EVENTS_STREAM),
        ("dlq", DLQ_STREAM),
        ("catalog", CATALOG_STREAM),
    ] {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| TopologyError::Parse(name.into(), e))?;
        let file_name = value["name"].as_str().unwrap_or_default();
        if subjects.stream_name(file_name) == stream {
            let mut keys: Vec<String> = value
                .as_object()
                .map(|o| o.keys().cloned().collect())
                .unwrap_or_default();
            keys.extend(["name", "subjects", "num_replicas"].map(String::from));
            return Ok(keys);
        }
    }
    Ok(Vec::new())
}

/// `running` with the settings of `file` that its file names (`keys`):
/// what an operator set that the file says nothing of stays as it is.
fn overlaid(
    running: &stream::Config,
    file: &stream::Config,
    keys: &[String],
) -> serde_json::Result<stream::Config> {
    let mut merged = serde_json::to_value(running)?;
    let file = serde_json::to_value(file)?;
    for key in keys {
        match file.get(key) {
            Some(v) => merged[key.as_str()] = v.clone(),
            None => {
                if let Some(o) = merged.as_object_mut() {
                    o.remove(key);
                }
            }
        }
    }
    serde_json::from_value(merged)
}

/// `config` with every limit `running` has raised above it kept (a limit
/// of 0 or -1 is none at all: the highest).
fn keeping_raised_limits(mut config: stream::Config, running: &stream::Config) -> stream::Config {
    fn unlimited(v: i64) -> bool {
        v <= 0
    }
    let raise = |file: i64, running: i64| {
        if unlimited(running) || (!unlimited(file) && running > file) {
            running
        } else {
            file
        }
    };
    config.max_bytes = raise(config.max_bytes, running.max_bytes);
    config.max_messages = raise(config.max_messages, running.max_messages);
    config.max_messages_per_subject = raise(
        config.max_messages_per_subject,
        running.max_messages_per_subject,
    );
    config.max_message_size = raise(
        config.max_message_size as i64,
        running.max_message_size as i64,
    ) as i32;
    if running.max_age.is_zero() || (!config.max_age.is_zero() && running.max_age > config.max_age)
    {
        config.max_age = running.max_age;
    }
    if running.duplicate_window > config.duplicate_window {
        config.duplicate_window = running.duplicate_window;
    }
    config
}

/// What is wrong with the streams as this service finds them: each one
/// missing, or not taking the subjects its file says (empty: nothing).
/// Limits are not compared: an operator may raise them.
pub async fn check_streams(js: &jetstream::Context, subjects: &Subjects) -> Vec<String> {
    let Ok(configs) = stream_configs(subjects) else {
        return vec!["the stream files do not parse".into()];
    };
    let mut problems = Vec::new();
    for config in configs {
        let name = &config.name;
        match js.get_stream(name).await {
            Ok(mut stream) => match stream.info().await {
                Ok(info) => {
                    let missing: Vec<&String> = config
                        .subjects
                        .iter()
                        .filter(|s| !info.config.subjects.contains(s))
                        .collect();
                    if !missing.is_empty() {
                        problems.push(format!(
                            "stream {name} does not take {missing:?}: {PROVISION_HINT}"
                        ));
                    }
                }
                Err(e) => problems.push(format!("stream {name}: {e}")),
            },
            Err(e) => problems.push(format!("stream {name} is missing ({e}): {PROVISION_HINT}")),
        }
    }
    problems
}

/// One of our durable consumers: a service's inputs, or a watch.
#[derive(Debug, Clone, Copy)]
pub enum Durable<'a> {
    Service(&'a str),
    Watch(&'a WatchSpec),
}

impl<'a> Durable<'a> {
    /// Its durable name.
    pub fn name(&self) -> &'a str {
        match self {
            Durable::Service(service) => service,
            Durable::Watch(spec) => spec.name,
        }
    }
}

/// A durable consumer's name, definition and stream.
fn definition<'a>(
    subjects: &Subjects,
    durable: Durable<'a>,
) -> Result<(&'a str, pull::Config, String), TopologyError> {
    Ok(match durable {
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
    })
}

/// How a running consumer's wiring differs from its file: what it filters
/// on, how it is acknowledged, where it starts. Limits (ack wait, pending)
/// are not compared: an operator may change them.
fn differences(file: &pull::Config, running: &consumer::Config) -> Vec<String> {
    let file = consumer::IntoConsumerConfig::into_consumer_config(file.clone());
    let file = &file;
    let sorted = |c: &consumer::Config| {
        let mut f = c.filter_subjects.clone();
        if !c.filter_subject.is_empty() {
            f.push(c.filter_subject.clone());
        }
        f.sort();
        f
    };
    let mut out = Vec::new();
    if sorted(file) != sorted(running) {
        out.push(format!(
            "filters on {:?}, not {:?}",
            sorted(running),
            sorted(file)
        ));
    }
    if file.ack_policy != running.ack_policy {
        out.push(format!(
            "acks {:?}, not {:?}",
            running.ack_policy, file.ack_policy
        ));
    }
    if file.deliver_policy != running.deliver_policy {
        out.push(format!(
            "delivers {:?}, not {:?}",
            running.deliver_policy, file.deliver_policy
        ));
    }
    out
}

/// The durable consumer as the broker has it, checked against its file: a
/// service reads through it and never creates or changes it. Missing, or
/// wired differently, is an error that says so and how to fix it.
pub async fn bind_consumer(
    js: &jetstream::Context,
    subjects: &Subjects,
    durable: Durable<'_>,
) -> Result<PullConsumer, TopologyError> {
    let (name, config, stream) = definition(subjects, durable)?;
    let stream = js
        .get_stream(&stream)
        .await
        .map_err(|e| TopologyError::Missing(format!("stream {stream} ({e})")))?;
    let mut consumer = stream
        .get_consumer::<pull::Config>(name)
        .await
        .map_err(|e| TopologyError::Missing(format!("consumer {name} ({e})")))?;
    let info = consumer
        .info()
        .await
        .map_err(|e| TopologyError::Consumer(name.into(), e.to_string()))?;
    let differs = differences(&config, &info.config);
    if !differs.is_empty() {
        return Err(TopologyError::Different(name.into(), differs.join("; ")));
    }
    Ok(consumer)
}

type PullConsumer = jetstream::consumer::Consumer<pull::Config>;

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
