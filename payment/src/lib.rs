//! Payment service: customer accounts; charges on OrderPlaced, refunds as a
//! compensation when inventory cannot reserve or releases a reservation.

pub mod api;
pub mod domain;
pub mod gateway;
mod handlers;
pub mod settings;
mod store;

use std::sync::Arc;

use common::{Config, EventKind, Service, StartError, cancels::BeforeStep};
pub use settings::Settings;
use sqlx::migrate::Migrator;
use tokio_util::sync::CancellationToken;

pub static MIGRATIONS: Migrator = sqlx::migrate!("./migrations");

/// What `payment --help` says the service is.
pub const ABOUT: &str = "The payment service: customer accounts, charges on OrderPlaced and \
refunds as compensations, through a simulated payment gateway.";

/// The service's command line (the shared settings and [`Settings`]).
pub fn command() -> clap::Command {
    common::cli::command::<Settings>("payment", ABOUT)
}

/// Runs the service as its binary does, its command line from `args`.
pub async fn main(args: impl IntoIterator<Item = std::ffi::OsString>) -> anyhow::Result<()> {
    common::cli::main_with("payment", ABOUT, args, build).await
}

/// Connects, migrates and builds the service, ready to run.
pub async fn build(
    config: Config,
    settings: Settings,
    shutdown: CancellationToken,
) -> Result<Service, StartError> {
    let rules: gateway::Rules = match &settings.gateway_rules {
        None => gateway::Rules::default(),
        Some(json) => serde_json::from_str(json)
            .map_err(|e| e.to_string())
            .and_then(|r: gateway::Rules| r.check().map(|()| r))
            .map_err(|e| StartError::Config(format!("GATEWAY_RULES: {e}")))?,
    };
    let gateway = Arc::new(gateway::Gateway::new(rules, settings.gateway_timeout));
    let charging = gateway.clone();
    let handler = |infra: &common::Infra| handlers::PaymentHandler {
        gateway: charging,
        retries: settings.refund_retries.0,
        before: BeforeStep::new(infra, EventKind::OrderPlaced, handlers::AccountLocks),
    };
    let routes = |infra: &common::Infra| api::router(infra, gateway);
    Service::start(config, &MIGRATIONS, handler, routes, shutdown).await
}
