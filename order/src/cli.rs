//! The order service's command line: the service (the shared settings and
//! [`Settings`]), or a maintenance task on its database.

use std::ffi::OsString;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use common::ConfigArgs;

use crate::settings::Settings;

/// What `order --help` says the service is.
pub const ABOUT: &str = "The order service: the event-sourced Order aggregate and its read \
models; starts sagas (HTTP or the NATS command) and ends them. With a subcommand, a \
maintenance task on its database.";

#[derive(Parser)]
#[command(name = "order", version, about = ABOUT)]
struct Cli {
    #[command(flatten)]
    config: ConfigArgs,
    #[command(flatten)]
    own: Settings,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Replays every order event (for `catalog`: the catalog stream) into a
    /// copy of a projection's tables and swaps it in, while the service
    /// keeps answering from the old ones (DATABASE_URL, and for `catalog`
    /// NATS_URL and SUBJECT_PREFIX, as for the service).
    RebuildProjection {
        /// `orders` (the read model), `customer-stats` or `catalog`.
        #[arg(value_parser = ["orders", "customer-stats", "catalog"])]
        projection: String,
    },
}

/// The service's command line.
pub fn command() -> clap::Command {
    Cli::command()
}

/// Runs the service, or the maintenance task its command line names, as
/// its binary does.
pub async fn main(args: impl IntoIterator<Item = OsString>) -> anyhow::Result<()> {
    let matches = Cli::command().get_matches_from(args);
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let config = cli.config.resolve("order")?;
    match cli.command {
        None => {
            let own = cli.own;
            common::service::run(config, |config, shutdown| {
                crate::build(config, own, shutdown)
            })
            .await
        }
        Some(Command::RebuildProjection { projection }) => rebuild(config, &projection).await,
    }
}

async fn rebuild(config: common::Config, projection: &str) -> anyhow::Result<()> {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&config.database_url)
        .await?;
    common::service::combined(&crate::MIGRATIONS)
        .run(&pool)
        .await?;
    // A bar on a terminal, a line at every tenth otherwise.
    let unit = if projection == "catalog" {
        "catalog events"
    } else {
        "events"
    };
    let mut shown = common::progress::Progress::stderr(projection, unit, 0);
    let mut progress = |done: u64, total: u64| {
        if total != shown.total() {
            shown.set_total(total);
        }
        shown.set(done);
    };
    let (done, unit) = match projection {
        "orders" => (
            crate::projection::rebuild(&pool, &crate::projection::OrdersView, &mut progress)
                .await?,
            "events",
        ),
        "catalog" => {
            let nats = tokio::time::timeout(
                std::time::Duration::from_secs(10),
                common::broker::connect(
                    common::broker::with_credentials(
                        async_nats::ConnectOptions::new(),
                        config.nats_user.as_deref(),
                        config.nats_password.as_deref(),
                    ),
                    &config.nats_url,
                ),
            )
            .await
            .map_err(|_| {
                anyhow::anyhow!("no answer from NATS at {} within 10 s", config.nats_url)
            })??;
            let js = async_nats::jetstream::new(nats);
            let subjects = common::Subjects::new(config.subject_prefix.clone());
            (
                crate::catalog::rebuild(&pool, &js, &subjects, &mut progress).await?,
                "catalog events",
            )
        }
        _ => (
            crate::projection::rebuild(&pool, &crate::projection::CustomerStats, &mut progress)
                .await?,
            "events",
        ),
    };
    shown.finish();
    println!("rebuilt {projection} from {done} {unit} and swapped it in");
    Ok(())
}
