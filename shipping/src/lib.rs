//! Shipping service: one shipment per order, created on InventoryReserved; an
//! address that cannot be delivered to fails the shipment and starts compensation.

pub mod api;
pub mod domain;
mod handlers;
mod store;

use common::{Config, EventKind, Service, StartError, cancels::BeforeStep, cli::NoSettings};
use sqlx::migrate::Migrator;
use tokio_util::sync::CancellationToken;

pub static MIGRATIONS: Migrator = sqlx::migrate!("./migrations");

/// What `shipping --help` says the service is.
pub const ABOUT: &str = "The shipping service: one shipment per order, created on InventoryReserved; an address that cannot be delivered to fails the shipment and starts compensation.";

/// The service's command line (the shared settings only).
pub fn command() -> clap::Command {
    common::cli::command::<NoSettings>("shipping", ABOUT)
}

/// Runs the service as its binary does, its command line from `args`.
pub async fn main(args: impl IntoIterator<Item = std::ffi::OsString>) -> anyhow::Result<()> {
    common::cli::main_with(
        "shipping",
        ABOUT,
        args,
        |config, NoSettings {}, shutdown| build(config, shutdown),
    )
    .await
}

/// Connects, migrates and builds the service, ready to run.
pub async fn build(config: Config, shutdown: CancellationToken) -> Result<Service, StartError> {
    Service::start(
        config,
        &MIGRATIONS,
        |infra| handlers::ShippingHandler {
            before: BeforeStep::new(infra, EventKind::InventoryReserved, ()),
        },
        api::router,
        shutdown,
    )
    .await
}
