//! How to build and run each service of [`common::roster`]. The roster says
//! what the services are; this is the one place that knows their crates.

use std::{future::Future, pin::Pin};

use common::{Config, Service, StartError};
use tokio_util::sync::CancellationToken;

/// A service being built: connected, migrated, listening, not yet running.
pub type Building = Pin<Box<dyn Future<Output = Result<Service, StartError>> + Send>>;

/// Starts building the service `name` of the roster; `None` for any other name.
pub fn build(name: &str, config: Config, shutdown: CancellationToken) -> Option<Building> {
    Some(match name {
        "order" => Box::pin(order::build(config, shutdown)),
        "payment" => Box::pin(payment::build(config, shutdown)),
        "inventory" => Box::pin(inventory::build(config, shutdown)),
        "shipping" => Box::pin(shipping::build(config, shutdown)),
        _ => return None,
    })
}

/// Runs the service `name` as its own binary would: configuration from the
/// environment, until SIGTERM or Ctrl-C.
pub async fn serve(name: &str) -> anyhow::Result<()> {
    let Some(spec) = common::roster::find(name) else {
        let names: Vec<_> = common::roster::names().collect();
        anyhow::bail!(
            "no service named '{name}' (the roster has {})",
            names.join(", ")
        );
    };
    common::service::main_with(spec.name, |config, shutdown| {
        build(spec.name, config, shutdown).expect("every roster service can be built")
    })
    .await
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
            let building = build(name, Config::local(name), CancellationToken::new());
            assert!(
                building.is_some(),
                "{name} is in the roster but cannot be built"
            );
        }
        assert!(
            build(
                "billing",
                Config::local("billing"),
                CancellationToken::new()
            )
            .is_none()
        );
    }
}
