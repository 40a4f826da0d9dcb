//! How to build and run each service of [`common::roster`]. The roster says
//! what the services are; this is the one place that knows their crates.

use std::{ffi::OsString, future::Future, pin::Pin};

use common::{Config, Service, StartError};
use tokio_util::sync::CancellationToken;

/// A service being built: connected, migrated, listening, not yet running.
pub type Building = Pin<Box<dyn Future<Output = Result<Service, StartError>> + Send>>;

/// What a service of the roster is started with: the shared configuration
/// and, for the services that read any, their own settings (each service
/// takes its own and leaves the others').
#[derive(Debug, Clone)]
pub struct Launch {
    pub config: Config,
    pub order: order::Settings,
    pub payment: payment::Settings,
}

impl Launch {
    /// `config`, and every service's own settings at their defaults.
    pub fn new(config: Config) -> Launch {
        Launch {
            config,
            order: order::Settings::default(),
            payment: payment::Settings::default(),
        }
    }
}

/// Starts building the service `name` of the roster; `None` for any other name.
pub fn build(name: &str, launch: Launch, shutdown: CancellationToken) -> Option<Building> {
    let Launch {
        config,
        order,
        payment,
    } = launch;
    Some(match name {
        "order" => Box::pin(order::build(config, order, shutdown)),
        "payment" => Box::pin(payment::build(config, payment, shutdown)),
        "inventory" => Box::pin(inventory::build(config, shutdown)),
        "shipping" => Box::pin(shipping::build(config, shutdown)),
        _ => return None,
    })
}

/// The command line of the service `name` (`--help` shows it); `None` for
/// a name not in the roster.
pub fn command(name: &str) -> Option<clap::Command> {
    Some(match name {
        "order" => order::command(),
        "payment" => payment::command(),
        "inventory" => inventory::command(),
        "shipping" => shipping::command(),
        _ => return None,
    })
}

/// Runs the service `name` as its own binary would, with `args` (flags
/// after the program's name) as its command line: configuration from them
/// and the environment, until SIGTERM or Ctrl-C.
pub async fn serve(name: &str, args: Vec<OsString>) -> anyhow::Result<()> {
    let args = std::iter::once(OsString::from(name)).chain(args);
    match name {
        "order" => order::main(args).await,
        "payment" => payment::main(args).await,
        "inventory" => inventory::main(args).await,
        "shipping" => shipping::main(args).await,
        _ => {
            let names: Vec<_> = common::roster::names().collect();
            anyhow::bail!(
                "no service named '{name}' (the roster has {})",
                names.join(", ")
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shared migrations and a service's own run against one database
    /// and one `_sqlx_migrations` table: a version used twice stops the
    /// service at start-up.
    #[test]
    fn no_service_migration_reuses_a_version_of_the_shared_ones() {
        let shared: Vec<i64> = common::service::COMMON_MIGRATIONS
            .iter()
            .map(|m| m.version)
            .collect();
        let services = [
            ("order", &order::MIGRATIONS),
            ("payment", &payment::MIGRATIONS),
            ("inventory", &inventory::MIGRATIONS),
            ("shipping", &shipping::MIGRATIONS),
        ];
        assert!(services.iter().map(|s| s.0).eq(common::roster::names()));
        for (name, own) in services {
            for m in own.iter() {
                assert!(
                    !shared.contains(&m.version),
                    "{name}'s migration {} reuses a version of common/migrations",
                    m.version
                );
            }
        }
    }

    /// A service added to the roster without a crate behind it fails here.
    #[test]
    fn every_roster_service_can_be_built() {
        for name in common::roster::names() {
            let building = build(
                name,
                Launch::new(Config::local(name)),
                CancellationToken::new(),
            );
            assert!(
                building.is_some(),
                "{name} is in the roster but cannot be built"
            );
            assert!(command(name).is_some(), "{name} has no command line");
        }
        assert!(
            build(
                "billing",
                Launch::new(Config::local("billing")),
                CancellationToken::new()
            )
            .is_none()
        );
    }
}
