//! A service's command line: the settings every service reads
//! ([`ConfigArgs`]), then the service's own; each is a flag that is also an
//! environment variable. `--help` prints them all and exits, as does
//! `--version`; a bad value is a usage error that names it.

use std::{ffi::OsString, future::Future};

use clap::{Args, CommandFactory, FromArgMatches, Parser};
use tokio_util::sync::CancellationToken;

use crate::{
    config::{Config, ConfigArgs},
    service::{Service, StartError},
};

/// The shared settings and a service's own (`S`).
#[derive(Debug, Parser)]
#[command(version)]
pub struct ServiceCli<S: Args> {
    #[command(flatten)]
    pub config: ConfigArgs,
    #[command(flatten)]
    pub own: S,
}

/// The own settings of a service that reads only the shared ones.
#[derive(Debug, Clone, Default, Args)]
pub struct NoSettings {}

/// `service`'s command line, described by `about`.
pub fn command<S: Args>(service: &'static str, about: &'static str) -> clap::Command {
    ServiceCli::<S>::command()
        .name(service)
        .bin_name(service)
        .about(about)
}

/// `args` (the program's name first) as `service`'s command line; help, the
/// version or a usage error are printed and the process exits, as any
/// command's would.
pub fn parse<S: Args + FromArgMatches>(
    service: &'static str,
    about: &'static str,
    args: impl IntoIterator<Item = OsString>,
) -> ServiceCli<S> {
    let matches = command::<S>(service, about).get_matches_from(args);
    ServiceCli::<S>::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

/// What a service's `main` does: its command line, then
/// [`crate::service::run`] with what `build` makes of it.
pub async fn main_with<S, F, Fut>(
    service: &'static str,
    about: &'static str,
    args: impl IntoIterator<Item = OsString>,
    build: F,
) -> anyhow::Result<()>
where
    S: Args + FromArgMatches,
    F: FnOnce(Config, S, CancellationToken) -> Fut,
    Fut: Future<Output = Result<Service, StartError>>,
{
    let cli = parse::<S>(service, about, args);
    let config = cli.config.resolve(service)?;
    let own = cli.own;
    crate::service::run(config, |config, shutdown| build(config, own, shutdown)).await
}

/// A service's own settings `S` from `flags` alone, the environment left
/// out: what its tests of defaults and ranges parse.
pub fn settings_from_flags<S: Args + FromArgMatches>(
    service: &'static str,
    flags: &[&str],
) -> Result<S, String> {
    let matches = S::augment_args(clap::Command::new(service))
        .mut_args(|a| a.env(None::<&str>))
        .try_get_matches_from(std::iter::once(service).chain(flags.iter().copied()))
        .map_err(|e| e.to_string())?;
    S::from_arg_matches(&matches).map_err(|e| e.to_string())
}
