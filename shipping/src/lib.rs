//! Shipping service: one shipment per order, created on InventoryReserved; an
//! address that cannot be delivered to fails the shipment and starts compensation.

mod api;
pub mod domain;
mod handlers;
mod store;

use common::{Config, Service, StartError};
use sqlx::migrate::Migrator;
use tokio_util::sync::CancellationToken;

pub static MIGRATIONS: Migrator = sqlx::migrate!("./migrations");

/// Connects, migrates and builds the service, ready to run.
pub async fn build(config: Config, shutdown: CancellationToken) -> Result<Service, StartError> {
    Service::start(
        config,
        &MIGRATIONS,
        handlers::ShippingHandler,
        api::router,
        shutdown,
    )
    .await
}
