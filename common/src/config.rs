//! Service configuration: command-line flags, each also read from an
//! environment variable (clap), with local defaults that match
//! `scripts/up.sh` so a service started by hand finds the stack. Secrets are
//! read from the environment only, never from flags (a process's arguments
//! are visible to every user of the machine). `docs/configuration.md` is
//! generated from these definitions (`stack config-reference`).

use std::{net::SocketAddr, time::Duration};

use clap::builder::{PossibleValuesParser, TypedValueParser};

/// Everything a service needs to reach its infrastructure, and how its
/// shared runtime (consumer, relay, janitor) behaves. What one service alone
/// reads lives in that service's crate.
#[derive(Debug, Clone)]
pub struct Config {
    /// A name from [`crate::roster`]: names the consumer, the Redis
    /// idempotency namespace and the dead-letter subject.
    pub service: String,
    pub database_url: String,
    pub redis_url: String,
    /// One server, or a cluster's seed servers separated by commas
    /// ([`crate::broker::seeds`]).
    pub nats_url: String,
    /// The service's own user on the broker ([`crate::permissions`]);
    /// unset, it connects without one.
    pub nats_user: Option<String>,
    pub nats_password: Option<String>,
    pub nats_stream_replicas: usize,
    pub http_addr: SocketAddr,
    pub subject_prefix: String,
    pub redis_key_prefix: String,
    pub log_format: LogFormat,
    pub consumer_concurrency: usize,
    pub consumer_lanes: usize,
    pub consumer_batch: usize,
    pub consumer_max_deliveries: i64,
    pub outbox_poll: Duration,
    pub outbox_relay_enabled: bool,
    pub relay_lease: Duration,
    pub database_max_connections: u32,
    /// What operator endpoints require as `Authorization: Bearer <token>`;
    /// unset, they answer 401 to everyone.
    pub admin_token: Option<String>,
    pub janitor_every: Duration,
    pub janitor_margin: Duration,
    /// OTLP/HTTP endpoint traces are exported to, if any.
    pub otlp_endpoint: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

/// The settings every service reads, as flags and environment variables.
/// The doc comments are the `--help` text and the configuration reference.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Every service")]
pub struct ConfigArgs {
    /// The service's own Postgres database
    /// [default: postgres://postgres@127.0.0.1:5432/saga_<service>]
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Redis, for idempotency keys
    #[arg(
        long,
        env = "REDIS_URL",
        default_value = "redis://127.0.0.1:6379",
        hide_env_values = true
    )]
    pub redis_url: String,
    /// The broker: one server, or a cluster's seeds separated by commas (at
    /// most 16)
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// The service's own broker user (with NATS_PASSWORD); unset: no user
    #[arg(long, env = "NATS_USER")]
    pub nats_user: Option<String>,
    /// Copies of each stream (and its consumers) a clustered broker keeps: 3
    /// on a 3-node cluster, so that any one node may die (1 to 5)
    #[arg(long, env = "NATS_STREAM_REPLICAS", default_value_t = 1,
          value_parser = clap::value_parser!(u64).range(1..=5))]
    pub nats_stream_replicas: u64,
    /// Where the HTTP API listens [default: 127.0.0.1:<the service's port>,
    /// 8081 (order) to 8084 (shipping)]
    #[arg(long, env = "HTTP_ADDR")]
    pub http_addr: Option<SocketAddr>,
    /// First token of every subject (`<prefix>.…`) and of the stream names
    /// (`<PREFIX>_EVENTS`, `<PREFIX>_DLQ`): letters, digits, `_`, `-`
    #[arg(long, env = "SUBJECT_PREFIX", default_value = "saga",
          value_parser = subject_prefix)]
    pub subject_prefix: String,
    /// Prefix of the service's Redis keys [default: the subject prefix]
    #[arg(long, env = "REDIS_KEY_PREFIX")]
    pub redis_key_prefix: Option<String>,
    /// Log lines for people (`pretty`) or for a log pipeline (`json`)
    #[arg(long, env = "LOG_FORMAT", default_value = "pretty",
          value_parser = PossibleValuesParser::new(["pretty", "text", "json"])
              .map(|v| if v == "json" { LogFormat::Json } else { LogFormat::Pretty }))]
    pub log_format: LogFormat,
    /// Events taken from the broker and not yet acknowledged, at most (1 to
    /// 4096)
    #[arg(long, env = "CONSUMER_CONCURRENCY", default_value_t = 64,
          value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub consumer_concurrency: u64,
    /// Lanes applying events side by side; one order's events always share a
    /// lane, in order (1 to 256)
    #[arg(long, env = "CONSUMER_LANES", default_value_t = 2,
          value_parser = clap::value_parser!(u64).range(1..=256))]
    pub consumer_lanes: u64,
    /// Most events a lane applies in one transaction when several are
    /// waiting; 1 applies each alone (1 to 1000)
    #[arg(long, env = "CONSUMER_BATCH", default_value_t = 64,
          value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub consumer_batch: u64,
    /// Deliveries an event that keeps failing transiently (database
    /// unreachable, timeouts) gets before it is dead-lettered; with the
    /// backoff capped at 30 s, 100 is about 45 minutes. Permanent failures
    /// are dead-lettered after 3 (1 to 10000)
    #[arg(long, env = "CONSUMER_MAX_DELIVERIES", default_value_t = 100,
          value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub consumer_max_deliveries: u64,
    /// How often the outbox relay looks for unpublished events when no
    /// commit woke it (a fallback: commits wake it at once), in ms (10 to
    /// 600000)
    #[arg(long, env = "OUTBOX_POLL_MS", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(10..=600_000))]
    pub outbox_poll_ms: u64,
    /// `off` keeps committed events in the outbox unpublished (maintenance,
    /// crash tests)
    #[arg(long, env = "OUTBOX_RELAY", default_value = "on", action = clap::ArgAction::Set,
          value_parser = PossibleValuesParser::new(["on", "off", "true", "false", "1", "0"])
              .map(|v| matches!(v.as_str(), "on" | "true" | "1")))]
    pub outbox_relay: bool,
    /// How long the relay leader's lease lasts unrenewed, in ms (renewed
    /// every fifth of it): a standby leads within about this long of a
    /// frozen leader's last renewal, and at once when the leader's database
    /// session is gone (1000 to 600000)
    #[arg(long, env = "RELAY_LEASE_MS", default_value_t = crate::outbox::LEASE.as_millis() as u64,
          value_parser = clap::value_parser!(u64).range(1_000..=600_000))]
    pub relay_lease_ms: u64,
    /// Connections in the service's database pool (1 to 1000)
    #[arg(long, env = "DATABASE_MAX_CONNECTIONS", default_value_t = 16,
          value_parser = clap::value_parser!(u32).range(1..=1_000))]
    pub database_max_connections: u32,
    /// How often the janitor deletes guard rows and cancel records older
    /// than the streams hold events, and sets how long Redis remembers
    /// applied events, in ms (1000 to 86400000: 1 s to 1 day)
    #[arg(long, env = "JANITOR_EVERY_MS", default_value_t = 3_600_000,
          value_parser = clap::value_parser!(u64).range(1_000..=86_400_000))]
    pub janitor_every_ms: u64,
    /// How much longer than the streams hold events the janitor keeps guard
    /// rows and cancel records, in ms (0 to 2592000000: up to 30 days):
    /// clocks differ, and an
    /// event may be dead-lettered about 45 minutes after the other consumers
    /// applied it
    #[arg(long, env = "JANITOR_MARGIN_MS", default_value_t = crate::janitor::MARGIN.as_millis() as u64,
          value_parser = clap::value_parser!(u64).range(0..=30 * 86_400_000))]
    pub janitor_margin_ms: u64,
    /// Where to export traces: an OpenTelemetry collector's OTLP/HTTP
    /// endpoint (`http://host:4318`; `/v1/traces` is added). Unset, trace
    /// context is still carried (and logged) but nothing is exported
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", value_parser = otlp_endpoint)]
    pub otel_exporter_otlp_endpoint: Option<String>,
}

fn otlp_endpoint(v: &str) -> Result<String, String> {
    let rest = v.strip_prefix("http://").ok_or_else(|| {
        "use http://host:port (OTLP over HTTP/protobuf, as a collector on the same network takes it)"
            .to_string()
    })?;
    if rest.is_empty() || v.len() > 512 || v.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("use http://host:port, at most 512 characters".into());
    }
    Ok(v.to_string())
}

/// The secrets a service reads, from its environment only: name, meaning.
pub const SECRETS: [(&str, &str); 2] = [
    (
        "NATS_PASSWORD",
        "The password of NATS_USER on the broker; set both or neither",
    ),
    (
        "ADMIN_TOKEN",
        "What operator endpoints require as `Authorization: Bearer <token>`, 16 characters or \
         more without blanks; unset, they refuse everyone",
    ),
];

fn subject_prefix(v: &str) -> Result<String, String> {
    let valid = !v.is_empty()
        && v.len() <= 64
        && v.chars()
            .all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == '-');
    if valid {
        Ok(v.to_string())
    } else {
        Err(
            "use 1 to 64 letters, digits, '_' or '-' (no dots: the prefix is one subject token)"
                .into(),
        )
    }
}

fn default_port(service: &str) -> u16 {
    crate::roster::find(service).map_or(8080, |s| s.default_port)
}

impl ConfigArgs {
    /// The defaults, as if no flag and no variable were given.
    pub fn defaults() -> ConfigArgs {
        use clap::{FromArgMatches, Parser};
        #[derive(Parser)]
        struct Only {
            #[command(flatten)]
            args: ConfigArgs,
        }
        let matches = <Only as clap::CommandFactory>::command()
            .mut_args(|a| a.env(None::<&str>))
            .try_get_matches_from(["defaults"])
            .expect("every setting has a default");
        Only::from_arg_matches(&matches)
            .expect("the defaults parse")
            .args
    }

    /// The configuration of `service`, with the secrets from the process
    /// environment.
    pub fn resolve(self, service: &str) -> Result<Config, ConfigError> {
        self.resolve_with(service, |k| std::env::var(k).ok())
    }

    /// As [`Self::resolve`], with the secrets from `secret`.
    pub fn resolve_with(
        self,
        service: &str,
        secret: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        crate::broker::seeds(&self.nats_url).map_err(ConfigError)?;
        let nats_user = self.nats_user.filter(|v| !v.is_empty());
        let nats_password = secret("NATS_PASSWORD").filter(|v| !v.is_empty());
        if nats_password.is_some() != nats_user.is_some() {
            return Err(ConfigError(
                "NATS_USER and NATS_PASSWORD go together: set both or neither".into(),
            ));
        }
        let admin_token = secret("ADMIN_TOKEN");
        if let Some(v) = &admin_token
            && (v.chars().count() < 16 || v.chars().any(|ch| ch.is_whitespace() || ch.is_control()))
        {
            return Err(ConfigError(
                "ADMIN_TOKEN must be at least 16 characters, without blanks".into(),
            ));
        }
        Ok(Config {
            service: service.to_string(),
            database_url: self
                .database_url
                .unwrap_or_else(|| format!("postgres://postgres@127.0.0.1:5432/saga_{service}")),
            redis_url: self.redis_url,
            nats_url: self.nats_url,
            nats_user,
            nats_password,
            nats_stream_replicas: self.nats_stream_replicas as usize,
            http_addr: self
                .http_addr
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], default_port(service)))),
            redis_key_prefix: self
                .redis_key_prefix
                .unwrap_or_else(|| self.subject_prefix.clone()),
            subject_prefix: self.subject_prefix,
            log_format: self.log_format,
            consumer_concurrency: self.consumer_concurrency as usize,
            consumer_lanes: self.consumer_lanes as usize,
            consumer_batch: self.consumer_batch as usize,
            consumer_max_deliveries: self.consumer_max_deliveries as i64,
            outbox_poll: Duration::from_millis(self.outbox_poll_ms),
            outbox_relay_enabled: self.outbox_relay,
            relay_lease: Duration::from_millis(self.relay_lease_ms),
            database_max_connections: self.database_max_connections,
            admin_token,
            janitor_every: Duration::from_millis(self.janitor_every_ms),
            janitor_margin: Duration::from_millis(self.janitor_margin_ms),
            otlp_endpoint: self.otel_exporter_otlp_endpoint,
        })
    }
}

impl Config {
    /// Defaults for `service`, with no flag and no environment applied.
    pub fn local(service: &str) -> Config {
        ConfigArgs::defaults()
            .resolve_with(service, |_| None)
            .expect("the defaults are valid")
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, FromArgMatches, Parser};

    use super::*;

    #[derive(Parser)]
    struct Only {
        #[command(flatten)]
        args: ConfigArgs,
    }

    /// `service` configured by `flags` and `secrets`, the process
    /// environment left out; an error as the user would read it.
    fn parse(service: &str, flags: &[&str], secrets: &[(&str, &str)]) -> Result<Config, String> {
        let matches = Only::command()
            .mut_args(|a| a.env(None::<&str>))
            .try_get_matches_from(std::iter::once("svc").chain(flags.iter().copied()))
            .map_err(|e| e.to_string())?;
        let args = Only::from_arg_matches(&matches)
            .map_err(|e| e.to_string())?
            .args;
        args.resolve_with(service, |k| {
            secrets
                .iter()
                .find(|(s, _)| *s == k)
                .map(|(_, v)| v.to_string())
        })
        .map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_point_at_the_local_stack() {
        let c = parse("payment", &[], &[]).unwrap();
        assert_eq!(
            c.database_url,
            "postgres://postgres@127.0.0.1:5432/saga_payment"
        );
        assert_eq!(c.http_addr.port(), 8082);
        assert_eq!(c.subject_prefix, "saga");
        assert_eq!(c.consumer_lanes, 2);
        assert_eq!(c.relay_lease, crate::outbox::LEASE);
        assert!(c.outbox_relay_enabled);
        assert_eq!(Config::local("payment").database_url, c.database_url);
    }

    fn with_prefix(prefix: &str) -> Result<Config, String> {
        parse("order", &["--subject-prefix", prefix], &[])
    }

    #[test]
    fn the_subject_prefix_also_namespaces_redis_unless_overridden() {
        assert_eq!(with_prefix("t1").unwrap().redis_key_prefix, "t1");
        let c = parse(
            "order",
            &["--subject-prefix", "t1", "--redis-key-prefix", "r1"],
            &[],
        )
        .unwrap();
        assert_eq!(
            (c.subject_prefix.as_str(), c.redis_key_prefix.as_str()),
            ("t1", "r1")
        );
    }

    #[test]
    fn an_admin_token_must_be_long_enough() {
        let token = |v: &str| parse("payment", &[], &[("ADMIN_TOKEN", v)]);
        assert_eq!(parse("payment", &[], &[]).unwrap().admin_token, None);
        assert!(token("secret").unwrap_err().contains("ADMIN_TOKEN"));
        assert!(token("0123456789 abcdef").is_err());
        assert_eq!(
            token("0123456789abcdef").unwrap().admin_token.as_deref(),
            Some("0123456789abcdef")
        );
    }

    #[test]
    fn secrets_are_not_flags() {
        for flag in ["--admin-token", "--nats-password"] {
            let err = parse("payment", &[flag, "0123456789abcdef"], &[]).unwrap_err();
            assert!(err.contains("unexpected argument"), "{flag}: {err}");
        }
    }

    #[test]
    fn a_broker_user_and_its_password_go_together() {
        let err = parse("order", &["--nats-user", "order"], &[]).unwrap_err();
        assert!(err.contains("NATS_PASSWORD"), "{err}");
        let c = parse(
            "order",
            &["--nats-user", "order"],
            &[("NATS_PASSWORD", "pw")],
        )
        .unwrap();
        assert_eq!(c.nats_password.as_deref(), Some("pw"));
    }

    #[test]
    fn a_cluster_is_a_list_of_seeds_and_its_replicas_are_bounded() {
        let c = parse(
            "order",
            &[
                "--nats-url",
                "nats://a:4222,nats://b:4222",
                "--nats-stream-replicas",
                "3",
            ],
            &[],
        )
        .unwrap();
        assert_eq!(c.nats_stream_replicas, 3);
        assert_eq!(Config::local("order").nats_stream_replicas, 1);
        for bad in ["0", "6", "-1", "three"] {
            let flag = format!("--nats-stream-replicas={bad}");
            let err = parse("order", &[&flag], &[]).unwrap_err();
            assert!(err.contains("NATS_STREAM_REPLICAS"), "{bad}: {err}");
        }
        let err = parse("order", &["--nats-url", ","], &[]).unwrap_err();
        assert!(err.contains("NATS_URL"), "{err}");
    }

    #[test]
    fn numbers_out_of_their_range_are_refused_by_name() {
        for (flag, bad) in [
            ("--consumer-concurrency", "0"),
            ("--consumer-concurrency", "4097"),
            ("--consumer-lanes", "257"),
            ("--consumer-batch", "x"),
            ("--relay-lease-ms", "999"),
            ("--janitor-every-ms", "1"),
            ("--database-max-connections", "-1"),
        ] {
            let err = parse("order", &[&format!("{flag}={bad}")], &[]).unwrap_err();
            let name = flag
                .trim_start_matches("--")
                .replace('-', "_")
                .to_uppercase();
            assert!(err.contains(&name), "{flag} {bad}: {err}");
        }
    }

    #[test]
    fn the_relay_is_switched_by_a_value() {
        assert!(
            parse("payment", &["--outbox-relay=on"], &[])
                .unwrap()
                .outbox_relay_enabled
        );
        assert!(
            !parse("payment", &["--outbox-relay", "off"], &[])
                .unwrap()
                .outbox_relay_enabled
        );
        let err = parse("payment", &["--outbox-relay=maybe"], &[]).unwrap_err();
        assert!(err.contains("OUTBOX_RELAY"), "{err}");
    }

    #[test]
    fn a_prefix_with_a_dot_is_refused() {
        let err = with_prefix("a.b").unwrap_err();
        assert!(err.contains("SUBJECT_PREFIX"), "{err}");
    }
}
