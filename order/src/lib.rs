//! Order service: the event-sourced Order aggregate with a CQRS read model.
//! It starts sagas (`POST /orders` or the NATS command), pricing every line
//! from its copy of inventory's catalog, and ends them: ShipmentCreated
//! confirms, PaymentFailed or PaymentRefunded cancels.

pub mod api;
pub mod capability;
pub mod catalog;
pub mod cli;
mod dead_letters;
pub mod domain;
mod handlers;
pub mod observer;
mod page;
pub mod place;
pub mod placement_keys;
pub mod pricing;
pub mod projection;
pub mod read_model;
mod responder;
pub mod settings;
pub mod snapshot;
pub mod store;
pub mod timeline;
mod watch;

use std::sync::Arc;

use common::{
    Config, Infra, Service, StartError,
    meter::{Watched, names},
    roster, topology,
};
use projection::{CustomerStats, OrdersView, Projection};
use sqlx::migrate::Migrator;
use tokio_util::sync::CancellationToken;

pub static MIGRATIONS: Migrator = sqlx::migrate!("./migrations");

pub use cli::{command, main};
pub use settings::Settings;

/// Connects, migrates and builds the service, ready to run.
pub async fn build(
    config: Config,
    settings: Settings,
    shutdown: CancellationToken,
) -> Result<Service, StartError> {
    let infra = Infra::connect(config, &MIGRATIONS).await?;
    let snapshots = store::Snapshots {
        every: settings.snapshot_every,
        meter: infra.meter.clone(),
    };
    let writer = place::Writer {
        pool: infra.pool.clone(),
        subjects: infra.subjects.clone(),
        outbox: infra.outbox.clone(),
        max_payload: infra.max_payload(),
        snapshots: snapshots.clone(),
    };
    let placer = place::Placer::start(
        writer,
        place::writers(infra.config.database_max_connections),
    );
    let handler = handlers::OrderHandler {
        snapshots: snapshots.clone(),
    };
    let responder = responder::responder(
        infra.nats.clone(),
        placer.clone(),
        infra.health.clone(),
        shutdown.clone(),
    )
    .await
    .map_err(|e| StartError::Nats(e.to_string()))?;
    let source = watch::Source {
        js: infra.js.clone(),
        subjects: infra.subjects.clone(),
        health: infra.health.clone(),
    };
    let watch = dead_letters::DeadLetterWatch {
        pool: infra.pool.clone(),
        subjects: infra.subjects.clone(),
        max_payload: infra.max_payload(),
        outbox: infra.outbox.clone(),
        snapshots,
    }
    .start(source.clone(), shutdown.clone())
    .await?;
    let catalog = catalog::CatalogWatch {
        pool: infra.pool.clone(),
        js: infra.js.clone(),
        subjects: infra.subjects.clone(),
        max_payload: infra.max_payload(),
    }
    .start(source.clone(), shutdown.clone())
    .await?;
    let stall_after = settings.stall_after;
    let observer = observer::Observer {
        pool: infra.pool.clone(),
        meter: infra.meter.clone(),
        stall_after,
    }
    .start(source, shutdown.clone())
    .await?;
    let page = page::Page::new(settings.operator_console_url.as_deref());
    let routes = api::router(placer.clone(), stall_after, infra.admin(), page);
    let mut service = Service::build(&infra, handler, routes, shutdown.clone()).await?;
    service.spawn_with(responder);
    service.spawn_with(watch);
    service.spawn_with(observer);
    service.spawn_with(catalog);
    service.spawn_with(projection::follow(
        infra.pool.clone(),
        projection::OrdersView,
        infra.outbox.follower(),
        shutdown.clone(),
    ));
    service.spawn_with(projection::follow(
        infra.pool.clone(),
        projection::CustomerStats,
        infra.outbox.follower(),
        shutdown,
    ));
    report_metrics(&mut service, &infra, placer, stall_after);
    Ok(service)
}

/// What the order service, the saga's owner, adds to `/metrics`: the
/// backlog of every service's consumer (a stopped service cannot report its
/// own, which is when it grows), its watches' (the timeline's as a
/// projection lag), the stalled sagas and the placements waiting.
fn report_metrics(
    service: &mut Service,
    infra: &Infra,
    placer: place::Placer,
    stall_after: std::time::Duration,
) {
    for name in roster::names().filter(|n| *n != infra.config.service) {
        service.watch_metrics(Watched {
            stream: infra.subjects.events_stream(),
            durable: name.to_string(),
            projection: None,
        });
    }
    for watch in topology::WATCHES {
        service.watch_metrics(Watched {
            stream: watch.stream(&infra.subjects),
            durable: watch.name.to_string(),
            projection: (watch.name == topology::TIMELINE_EVENTS.name).then_some("timeline"),
        });
    }
    let pool = infra.pool.clone();
    service.probe_metrics(Arc::new(move |meter| {
        let pool = pool.clone();
        let waiting = placer.waiting();
        Box::pin(async move {
            meter.gauge(names::PLACEMENTS_WAITING, &[], waiting as f64);
            let before = observer::stalled_before(stall_after);
            let stalled = timeline::store::count_stalled(&pool, before).await?;
            meter.gauge(names::SAGAS_STALLED, &[], stalled as f64);
            for name in [OrdersView::NAME, CustomerStats::NAME] {
                let lag = projection::lag(&pool, name).await?;
                meter.gauge(names::PROJECTION_LAG, &[("projection", name.into())], lag);
            }
            Ok(())
        })
    }));
}
