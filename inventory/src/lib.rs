//! Inventory service: stock per product; reserves every line of an order or none
//! on PaymentProcessed, releases the reservation when shipping fails.

pub mod api;
pub mod domain;
mod handlers;
mod store;

use common::{Config, EventKind, Service, StartError, cancels::BeforeStep, cli::NoSettings};
use sqlx::migrate::Migrator;
use tokio_util::sync::CancellationToken;

pub static MIGRATIONS: Migrator = sqlx::migrate!("./migrations");

/// What `inventory --help` says the service is.
pub const ABOUT: &str = "The inventory service: stock per product; reserves every line of an order or none on PaymentProcessed, releases a reservation when shipping fails.";

/// The service's command line (the shared settings only).
pub fn command() -> clap::Command {
    common::cli::command::<NoSettings>("inventory", ABOUT)
}

/// Runs the service as its binary does, its command line from `args`.
pub async fn main(args: impl IntoIterator<Item = std::ffi::OsString>) -> anyhow::Result<()> {
    common::cli::main_with(
        "inventory",
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
        |infra| handlers::InventoryHandler {
            before: BeforeStep::new(infra, EventKind::PaymentProcessed, handlers::StockLocks),
        },
        api::router,
        shutdown,
    )
    .await
}
