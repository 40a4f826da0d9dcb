use std::io::{IsTerminal, Write};

use clap::{Parser, Subcommand};

/// The order service; with a subcommand, a maintenance task on its database.
#[derive(Parser)]
#[command(name = "order", version)]
struct Cli {
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        None => common::service::main_with("order", order::build).await,
        Some(Command::RebuildProjection { projection }) => rebuild(&projection).await,
    }
}

async fn rebuild(projection: &str) -> anyhow::Result<()> {
    let config = common::Config::from_env("order")?;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&config.database_url)
        .await?;
    common::service::combined(&order::MIGRATIONS)
        .run(&pool)
        .await?;
    let terminal = std::io::stderr().is_terminal();
    let mut shown: Option<u64> = None;
    let mut progress = |done: u64, total: u64| {
        let percent = (done * 100).checked_div(total).unwrap_or(100);
        if terminal {
            let bar = "#".repeat((percent / 4) as usize);
            eprint!("\r{projection}: [{bar:<25}] {done}/{total}");
            let _ = std::io::stderr().flush();
        } else if shown.is_none_or(|s| percent >= s + 10 || (percent == 100 && s < 100)) {
            shown = Some(percent);
            eprintln!("{projection}: {done}/{total} ({percent}%)");
        }
    };
    let (done, unit) = match projection {
        "orders" => (
            order::projection::rebuild(&pool, &order::projection::OrdersView, &mut progress)
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
                order::catalog::rebuild(&pool, &js, &subjects, &mut progress).await?,
                "catalog events",
            )
        }
        _ => (
            order::projection::rebuild(&pool, &order::projection::CustomerStats, &mut progress)
                .await?,
            "events",
        ),
    };
    if terminal {
        eprintln!();
    }
    println!("rebuilt {projection} from {done} {unit} and swapped it in");
    Ok(())
}
