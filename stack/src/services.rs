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
