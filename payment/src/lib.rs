//! Payment service: customer accounts; charges on OrderPlaced, refunds as a
//! compensation when inventory cannot reserve or releases a reservation.

mod api;
pub mod domain;
pub mod gateway;
mod handlers;
mod store;

use std::sync::Arc;

use common::{Config, Service, StartError};
use sqlx::migrate::Migrator;
use tokio_util::sync::CancellationToken;

pub static MIGRATIONS: Migrator = sqlx::migrate!("./migrations");

/// Connects, migrates and builds the service, ready to run.
pub async fn build(config: Config, shutdown: CancellationToken) -> Result<Service, StartError> {
    let rules: gateway::Rules = match &config.gateway_rules {
        None => gateway::Rules::default(),
        Some(json) => serde_json::from_str(json)
            .map_err(|e| e.to_string())
            .and_then(|r: gateway::Rules| r.check().map(|()| r))
            .map_err(|e| StartError::Config(format!("GATEWAY_RULES: {e}")))?,
    };
    let gateway = Arc::new(gateway::Gateway::new(rules, config.gateway_timeout));
    let handler = handlers::PaymentHandler {
        gateway: gateway.clone(),
        retries: config.refund_retries.clone(),
    };
    let routes = |infra: &common::Infra| api::router(infra, gateway);
    Service::start(config, &MIGRATIONS, handler, routes, shutdown).await
}
