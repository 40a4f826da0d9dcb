//! What the payment service reads beyond the shared configuration: the
//! simulated gateway and the refund schedule (flags that are also
//! environment variables; see `docs/configuration.md`).

use std::time::Duration;

use clap::builder::TypedValueParser;

/// The payment service's own settings.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Payment")]
pub struct Settings {
    /// The simulated gateway's initial rules, JSON, e.g.
    /// `{"all":{"refunds":"fail"},"customers":{"bob":{"charges":"timeout","latencyMs":200}}}`
    /// (modes `ok`, `fail`, `timeout`, `lost`); unset: everything goes
    /// through
    #[arg(long, env = "GATEWAY_RULES")]
    pub gateway_rules: Option<String>,
    /// A gateway call that takes longer has timed out, in ms (10 to 600000)
    #[arg(long = "gateway-timeout-ms", env = "GATEWAY_TIMEOUT_MS", value_name = "GATEWAY_TIMEOUT_MS",
          default_value = "2000",
          value_parser = clap::value_parser!(u64).range(10..=600_000).map(Duration::from_millis))]
    pub gateway_timeout: Duration,
    /// The delays between attempts of a refund the gateway does not carry
    /// out, in ms, separated by commas (at most 50, each up to an hour);
    /// after the last, the refund is dead-lettered and the saga halted
    #[arg(long = "refund-retry-ms", env = "REFUND_RETRY_MS", value_name = "REFUND_RETRY_MS",
          default_value = "1000,2000,4000,8000,16000", value_parser = retry_schedule)]
    pub refund_retries: Schedule,
}

/// Delays between attempts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule(pub Vec<Duration>);

fn retry_schedule(v: &str) -> Result<Schedule, String> {
    let delays = v
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| match s.trim().parse::<u64>() {
            Ok(ms @ 1..=3_600_000) => Ok(Duration::from_millis(ms)),
            _ => Err(format!("'{}': each delay is 1 to 3600000 ms", s.trim())),
        })
        .collect::<Result<Vec<_>, _>>()?;
    if delays.len() > 50 {
        return Err("at most 50 delays".into());
    }
    Ok(Schedule(delays))
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            gateway_rules: None,
            gateway_timeout: Duration::from_secs(2),
            refund_retries: Schedule([1, 2, 4, 8, 16].map(Duration::from_secs).to_vec()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(flags: &[&str]) -> Result<Settings, String> {
        common::cli::settings_from_flags("payment", flags)
    }

    #[test]
    fn the_defaults_are_the_documented_ones() {
        let parsed = parse(&[]).unwrap();
        let default = Settings::default();
        assert_eq!(parsed.refund_retries, default.refund_retries);
        assert_eq!(parsed.gateway_timeout, default.gateway_timeout);
        assert_eq!(parsed.gateway_rules, None);
    }

    #[test]
    fn the_refund_schedule_is_read_and_bounded() {
        let s = parse(&[]).unwrap();
        assert_eq!(
            s.refund_retries.0,
            [1, 2, 4, 8, 16].map(Duration::from_secs)
        );
        let s = parse(&["--refund-retry-ms", "100, 200,400"]).unwrap();
        assert_eq!(
            s.refund_retries.0,
            [100, 200, 400].map(Duration::from_millis)
        );
        for bad in ["1,x", "0", "3600001", &vec!["1"; 51].join(",")] {
            let err = parse(&["--refund-retry-ms", bad]).unwrap_err();
            assert!(err.contains("REFUND_RETRY_MS"), "{bad}: {err}");
        }
    }

    #[test]
    fn the_gateway_timeout_is_bounded() {
        assert_eq!(
            parse(&["--gateway-timeout-ms", "200"])
                .unwrap()
                .gateway_timeout,
            Duration::from_millis(200)
        );
        let err = parse(&["--gateway-timeout-ms", "5"]).unwrap_err();
        assert!(err.contains("GATEWAY_TIMEOUT_MS"), "{err}");
    }
}
