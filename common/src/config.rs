//! Service configuration from environment variables, with local defaults that
//! match `scripts/up.sh` so a service started by hand finds the stack.

use std::{net::SocketAddr, time::Duration};

/// Everything a service needs to reach its infrastructure.
#[derive(Debug, Clone)]
pub struct Config {
    /// A name from [`crate::roster`]: names the consumer, the Redis
    /// idempotency namespace and the dead-letter subject.
    pub service: String,
    /// `DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/saga_<service>`.
    pub database_url: String,
    /// `REDIS_URL`, default `redis://127.0.0.1:6379`.
    pub redis_url: String,
    /// `NATS_URL`, default `nats://127.0.0.1:4222`: one server, or a
    /// cluster's seed servers separated by commas ([`crate::broker::seeds`]).
    pub nats_url: String,
    /// `NATS_USER` and `NATS_PASSWORD`: the service's own user on the
    /// broker ([`crate::permissions`]); unset, it connects without one.
    pub nats_user: Option<String>,
    pub nats_password: Option<String>,
    /// `NATS_STREAM_REPLICAS`, default 1 (1 to 5): copies of each stream a
    /// clustered broker keeps (3 on a 3-node cluster: any one node may die).
    pub nats_stream_replicas: usize,
    /// `HTTP_ADDR`, default `127.0.0.1:<the roster's default port>`.
    pub http_addr: SocketAddr,
    /// `SUBJECT_PREFIX`, default `saga`: first subject token and stream-name prefix.
    pub subject_prefix: String,
    /// `REDIS_KEY_PREFIX`, default the subject prefix.
    pub redis_key_prefix: String,
    /// `LOG_FORMAT`: `pretty` (default) or `json`.
    pub log_format: LogFormat,
    /// `CONSUMER_CONCURRENCY`, default 64 (1 to 4096): events taken from the
    /// broker and not yet acknowledged, at most.
    pub consumer_concurrency: usize,
    /// `CONSUMER_LANES`, default 8 (1 to 256): lanes applying events side by
    /// side; one order's events always go down the same lane, in order.
    pub consumer_lanes: usize,
    /// `CONSUMER_BATCH`, default 64 (1 to 1000): most events a lane applies
    /// in one transaction when several are waiting; 1 applies each alone.
    pub consumer_batch: usize,
    /// `CONSUMER_MAX_DELIVERIES`, default 100: deliveries an event that keeps
    /// failing transiently (database unreachable, timeouts) gets before it is
    /// dead-lettered; with the backoff capped at 30 s that is about 45 minutes.
    /// Permanent failures are dead-lettered after 3.
    pub consumer_max_deliveries: i64,
    /// `OUTBOX_POLL_MS`, default 1000: fallback poll when no commit woke the relay.
    pub outbox_poll: Duration,
    /// `OUTBOX_RELAY`: `on` (default) or `off`. Off keeps committed events in
    /// the outbox unpublished, for maintenance and for crash tests.
    pub outbox_relay_enabled: bool,
    /// `RELAY_LEASE_MS`, default 10000 (1000 to 600000): how long the relay
    /// leader's lease lasts without a renewal (renewed every fifth of it); a
    /// standby leads within about this long of a frozen or hung leader's
    /// last renewal, and at once when the leader's database session is gone.
    pub relay_lease: Duration,
    /// `DATABASE_MAX_CONNECTIONS`, default 16.
    pub database_max_connections: u32,
    /// `SAGA_STALL_AFTER_MS`, default 30 s: how long a saga may wait at one
    /// step before the order service's observer reports it stalled.
    pub stall_after: Duration,
    /// `ADMIN_TOKEN`: what operator endpoints (setting balances and stock,
    /// steering the payment gateway, resolving a saga) require as
    /// `Authorization: Bearer <token>`. Unset: they answer 401 to everyone.
    pub admin_token: Option<String>,
    /// `GATEWAY_RULES` (payment): the simulated gateway's initial rules, JSON
    /// (`{"all":{"refunds":"fail"},"customers":{"bob":{"charges":"timeout"}}}`).
    pub gateway_rules: Option<String>,
    /// `GATEWAY_TIMEOUT_MS` (payment), default 2000: a gateway call that
    /// takes longer has timed out.
    pub gateway_timeout: Duration,
    /// `REFUND_RETRY_MS` (payment), default `1000,2000,4000,8000,16000`: the
    /// delays between attempts of a refund the gateway does not carry out;
    /// after the last, the refund is dead-lettered and the saga halted.
    pub refund_retries: Vec<Duration>,
    /// `SNAPSHOT_EVERY` (order), default 100, 1 to 1,000,000: the order
    /// service snapshots an order's state every this many events, so a load
    /// folds at most this many.
    pub snapshot_every: i64,
    /// `JANITOR_EVERY_MS`, default 1 h (1 s to 1 day): how often the
    /// janitor deletes guard rows and cancel records older than the
    /// streams keep events ([`crate::janitor`]).
    pub janitor_every: Duration,
    /// `JANITOR_MARGIN_MS`, default 2 h (0 to 30 days): how much longer than
    /// the streams hold events the janitor keeps guard rows and cancel
    /// records (clocks differ; an event is dead-lettered up to about 45
    /// minutes after the other consumers applied it).
    pub janitor_margin: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

fn default_port(service: &str) -> u16 {
    crate::roster::find(service).map_or(8080, |s| s.default_port)
}

impl Config {
    /// Defaults for `service`, with no environment applied.
    pub fn local(service: &str) -> Config {
        Config {
            service: service.to_string(),
            database_url: format!("postgres://postgres@127.0.0.1:5432/saga_{service}"),
            redis_url: "redis://127.0.0.1:6379".into(),
            nats_url: "nats://127.0.0.1:4222".into(),
            nats_user: None,
            nats_password: None,
            nats_stream_replicas: 1,
            http_addr: SocketAddr::from(([127, 0, 0, 1], default_port(service))),
            subject_prefix: "saga".into(),
            redis_key_prefix: "saga".into(),
            log_format: LogFormat::Pretty,
            consumer_concurrency: 64,
            consumer_lanes: 8,
            consumer_batch: 64,
            consumer_max_deliveries: 100,
            outbox_poll: Duration::from_millis(1000),
            outbox_relay_enabled: true,
            relay_lease: crate::outbox::LEASE,
            database_max_connections: 16,
            stall_after: Duration::from_secs(30),
            admin_token: None,
            gateway_rules: None,
            gateway_timeout: Duration::from_secs(2),
            refund_retries: [1, 2, 4, 8, 16].map(Duration::from_secs).to_vec(),
            snapshot_every: 100,
            janitor_every: Duration::from_secs(3600),
            janitor_margin: crate::janitor::MARGIN,
        }
    }

    /// Defaults overridden by the process environment.
    pub fn from_env(service: &str) -> Result<Config, ConfigError> {
        Self::from_lookup(service, |k| std::env::var(k).ok())
    }

    /// Defaults overridden by `lookup`; testable without touching the environment.
    pub fn from_lookup(
        service: &str,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let mut c = Config::local(service);
        if let Some(v) = lookup("DATABASE_URL") {
            c.database_url = v;
        }
        if let Some(v) = lookup("REDIS_URL") {
            c.redis_url = v;
        }
        if let Some(v) = lookup("NATS_URL") {
            crate::broker::seeds(&v).map_err(ConfigError)?;
            c.nats_url = v;
        }
        c.nats_user = lookup("NATS_USER").filter(|v| !v.is_empty());
        c.nats_password = lookup("NATS_PASSWORD").filter(|v| !v.is_empty());
        if c.nats_password.is_some() != c.nats_user.is_some() {
            return Err(ConfigError(
                "NATS_USER and NATS_PASSWORD go together: set both or neither".into(),
            ));
        }
        if let Some(v) = lookup("NATS_STREAM_REPLICAS") {
            c.nats_stream_replicas = parse_num("NATS_STREAM_REPLICAS", &v)?;
            if !(1..=5).contains(&c.nats_stream_replicas) {
                return Err(ConfigError(format!(
                    "NATS_STREAM_REPLICAS '{v}': from 1 to 5 (JetStream's limit)"
                )));
            }
        }
        if let Some(v) = lookup("HTTP_ADDR") {
            c.http_addr = v
                .parse()
                .map_err(|e| ConfigError(format!("HTTP_ADDR '{v}': {e}")))?;
        }
        if let Some(v) = lookup("SUBJECT_PREFIX") {
            c.redis_key_prefix = v.clone();
            c.subject_prefix = v;
        }
        if let Some(v) = lookup("REDIS_KEY_PREFIX") {
            c.redis_key_prefix = v;
        }
        if let Some(v) = lookup("LOG_FORMAT") {
            c.log_format = match v.as_str() {
                "json" => LogFormat::Json,
                "pretty" | "text" => LogFormat::Pretty,
                other => {
                    return Err(ConfigError(format!(
                        "LOG_FORMAT '{other}': expected json or pretty"
                    )));
                }
            };
        }
        if let Some(v) = lookup("CONSUMER_CONCURRENCY") {
            c.consumer_concurrency = parse_num("CONSUMER_CONCURRENCY", &v)?.clamp(1, 4096);
        }
        if let Some(v) = lookup("CONSUMER_LANES") {
            c.consumer_lanes = parse_num("CONSUMER_LANES", &v)?.clamp(1, 256);
        }
        if let Some(v) = lookup("CONSUMER_BATCH") {
            c.consumer_batch = parse_num("CONSUMER_BATCH", &v)?.clamp(1, 1000);
        }
        if let Some(v) = lookup("CONSUMER_MAX_DELIVERIES") {
            c.consumer_max_deliveries = parse_num("CONSUMER_MAX_DELIVERIES", &v)?.max(1) as i64;
        }
        if let Some(v) = lookup("OUTBOX_POLL_MS") {
            c.outbox_poll = Duration::from_millis(parse_num("OUTBOX_POLL_MS", &v)? as u64);
        }
        if let Some(v) = lookup("OUTBOX_RELAY") {
            c.outbox_relay_enabled = match v.as_str() {
                "on" | "1" | "true" => true,
                "off" | "0" | "false" => false,
                other => {
                    return Err(ConfigError(format!(
                        "OUTBOX_RELAY '{other}': expected on or off"
                    )));
                }
            };
        }
        if let Some(v) = lookup("RELAY_LEASE_MS") {
            c.relay_lease = Duration::from_millis(
                parse_num("RELAY_LEASE_MS", &v)?.clamp(1_000, 600_000) as u64,
            );
        }
        if let Some(v) = lookup("DATABASE_MAX_CONNECTIONS") {
            c.database_max_connections = parse_num("DATABASE_MAX_CONNECTIONS", &v)?.max(1) as u32;
        }
        if let Some(v) = lookup("SAGA_STALL_AFTER_MS") {
            let ms = parse_num("SAGA_STALL_AFTER_MS", &v)?.clamp(100, 86_400_000);
            c.stall_after = Duration::from_millis(ms as u64);
        }
        if let Some(v) = lookup("ADMIN_TOKEN") {
            if v.chars().count() < 16 || v.chars().any(|ch| ch.is_whitespace() || ch.is_control()) {
                return Err(ConfigError(
                    "ADMIN_TOKEN must be at least 16 characters, without blanks".into(),
                ));
            }
            c.admin_token = Some(v);
        }
        c.gateway_rules = lookup("GATEWAY_RULES");
        if let Some(v) = lookup("GATEWAY_TIMEOUT_MS") {
            let ms = parse_num("GATEWAY_TIMEOUT_MS", &v)?.clamp(10, 600_000);
            c.gateway_timeout = Duration::from_millis(ms as u64);
        }
        if let Some(v) = lookup("REFUND_RETRY_MS") {
            c.refund_retries = v
                .split(',')
                .filter(|s| !s.trim().is_empty())
                .map(|s| parse_num("REFUND_RETRY_MS", s.trim()))
                .map(|ms| ms.map(|ms| Duration::from_millis(ms.clamp(1, 3_600_000) as u64)))
                .collect::<Result<_, _>>()?;
            if c.refund_retries.len() > 50 {
                return Err(ConfigError("REFUND_RETRY_MS: at most 50 delays".into()));
            }
        }
        if let Some(v) = lookup("SNAPSHOT_EVERY") {
            c.snapshot_every = parse_num("SNAPSHOT_EVERY", &v)?.clamp(1, 1_000_000) as i64;
        }
        if let Some(v) = lookup("JANITOR_EVERY_MS") {
            let ms = parse_num("JANITOR_EVERY_MS", &v)?.clamp(1_000, 86_400_000);
            c.janitor_every = Duration::from_millis(ms as u64);
        }
        if let Some(v) = lookup("JANITOR_MARGIN_MS") {
            let ms = parse_num("JANITOR_MARGIN_MS", &v)?.min(30 * 86_400_000);
            c.janitor_margin = Duration::from_millis(ms as u64);
        }
        let valid_prefix = |p: &str| {
            !p.is_empty()
                && p.chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == '-')
        };
        if !valid_prefix(&c.subject_prefix) {
            return Err(ConfigError(format!(
                "SUBJECT_PREFIX '{}': use letters, digits, '_' or '-' only",
                c.subject_prefix
            )));
        }
        Ok(c)
    }
}

fn parse_num(name: &str, v: &str) -> Result<usize, ConfigError> {
    v.parse()
        .map_err(|e| ConfigError(format!("{name} '{v}': {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_point_at_the_local_stack() {
        let c = Config::from_lookup("payment", |_| None).unwrap();
        assert_eq!(
            c.database_url,
            "postgres://postgres@127.0.0.1:5432/saga_payment"
        );
        assert_eq!(c.http_addr.port(), 8082);
        assert_eq!(c.subject_prefix, "saga");
    }

    fn with_prefix(prefix: &str) -> Result<Config, ConfigError> {
        Config::from_lookup("order", |k| {
            (k == "SUBJECT_PREFIX").then(|| prefix.to_string())
        })
    }

    #[test]
    fn the_subject_prefix_also_namespaces_redis_unless_overridden() {
        assert_eq!(with_prefix("t1").unwrap().redis_key_prefix, "t1");
    }

    #[test]
    fn an_admin_token_must_be_long_enough() {
        let token = |v: &str| {
            let v = v.to_string();
            Config::from_lookup("payment", move |k| (k == "ADMIN_TOKEN").then(|| v.clone()))
        };
        assert_eq!(
            Config::from_lookup("payment", |_| None)
                .unwrap()
                .admin_token,
            None
        );
        assert!(
            token("secret")
                .unwrap_err()
                .to_string()
                .contains("ADMIN_TOKEN")
        );
        assert!(token("0123456789 abcdef").is_err());
        assert_eq!(
            token("0123456789abcdef").unwrap().admin_token.as_deref(),
            Some("0123456789abcdef")
        );
    }

    #[test]
    fn the_refund_schedule_is_read_and_bounded() {
        let c = Config::from_lookup("payment", |_| None).unwrap();
        assert_eq!(c.refund_retries, [1, 2, 4, 8, 16].map(Duration::from_secs));
        let c = Config::from_lookup("payment", |k| {
            (k == "REFUND_RETRY_MS").then(|| "100, 200,400".into())
        })
        .unwrap();
        assert_eq!(c.refund_retries, [100, 200, 400].map(Duration::from_millis));
        let bad = Config::from_lookup("payment", |k| {
            (k == "REFUND_RETRY_MS").then(|| "1,x".into())
        });
        assert!(bad.unwrap_err().to_string().contains("REFUND_RETRY_MS"));
    }

    #[test]
    fn a_cluster_is_a_list_of_seeds_and_its_replicas_are_bounded() {
        let c = Config::from_lookup("order", |k| match k {
            "NATS_URL" => Some("nats://a:4222,nats://b:4222".into()),
            "NATS_STREAM_REPLICAS" => Some("3".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(c.nats_stream_replicas, 3);
        assert_eq!(Config::local("order").nats_stream_replicas, 1);
        for bad in ["0", "6", "-1", "three"] {
            let err = Config::from_lookup("order", |k| {
                (k == "NATS_STREAM_REPLICAS").then(|| bad.to_string())
            })
            .unwrap_err();
            assert!(err.to_string().contains("NATS_STREAM_REPLICAS"), "{bad}");
        }
        let err = Config::from_lookup("order", |k| (k == "NATS_URL").then(|| ",".into()));
        assert!(err.unwrap_err().to_string().contains("NATS_URL"));
    }

    #[test]
    fn a_prefix_with_a_dot_is_refused() {
        let err = with_prefix("a.b").unwrap_err();
        assert!(err.to_string().contains("SUBJECT_PREFIX"));
    }
}
