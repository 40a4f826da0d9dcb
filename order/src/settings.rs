//! What the order service reads beyond the shared configuration (flags
//! that are also environment variables; see `docs/configuration.md`).

use std::time::Duration;

use clap::builder::TypedValueParser;

/// The order service's own settings.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Order")]
pub struct Settings {
    /// An order's state is snapshotted every this many events, so that a
    /// load folds at most this many (1 to 1000000)
    #[arg(long, env = "SNAPSHOT_EVERY", default_value_t = 100,
          value_parser = clap::value_parser!(i64).range(1..=1_000_000))]
    pub snapshot_every: i64,
    /// How long a saga may wait at one step before it is reported stalled,
    /// in ms (100 to 86400000)
    #[arg(long = "saga-stall-after-ms", env = "SAGA_STALL_AFTER_MS",
          value_name = "SAGA_STALL_AFTER_MS", default_value = "30000",
          value_parser = clap::value_parser!(u64).range(100..=86_400_000).map(Duration::from_millis))]
    pub stall_after: Duration,
    /// The operator console (`sagactl console`) the saga page sends
    /// redrives and retries to, as the operator's browser reaches it (an
    /// origin, e.g. http://127.0.0.1:8090); unset, the page shows the
    /// sagactl commands instead
    #[arg(long, env = "OPERATOR_CONSOLE_URL", value_parser = common::http::origin)]
    pub operator_console_url: Option<String>,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            snapshot_every: 100,
            stall_after: Duration::from_secs(30),
            operator_console_url: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(flags: &[&str]) -> Result<Settings, String> {
        common::cli::settings_from_flags("order", flags)
    }

    #[test]
    fn the_defaults_are_the_documented_ones() {
        let parsed = parse(&[]).unwrap();
        let default = Settings::default();
        assert_eq!(parsed.snapshot_every, default.snapshot_every);
        assert_eq!(parsed.stall_after, default.stall_after);
    }

    #[test]
    fn both_are_bounded_and_named_when_refused() {
        for (flag, bad, name) in [
            ("--snapshot-every", "0", "SNAPSHOT_EVERY"),
            ("--snapshot-every", "1000001", "SNAPSHOT_EVERY"),
            ("--saga-stall-after-ms", "99", "SAGA_STALL_AFTER_MS"),
        ] {
            let err = parse(&[flag, bad]).unwrap_err();
            assert!(err.contains(name), "{flag} {bad}: {err}");
        }
    }
}
