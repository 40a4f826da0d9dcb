//! `sagactl`, the operator's tool. It reads the broker the way the services
//! do (the same `NATS_URL` and `SUBJECT_PREFIX`) and asks the order service
//! (`ORDER_URL`, with `ADMIN_TOKEN` for what changes anything); it decides
//! nothing for the saga: it shows dead letters and a saga's timeline, and
//! has dead letters redriven or a saga resolved when an operator says so,
//! each leaving an audit record that the saga's timeline shows. `audit`
//! reads the four services' databases and checks the invariants across them.
//! Every command prints JSON with `--json`, and its exit code says what
//! went wrong ([`failure`]).

pub mod audit;
pub mod console;
pub mod dlq;
pub mod failure;
pub mod saga;

pub use failure::{Failure, exit_code};

use std::{io::Write, net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use common::{Subjects, dlq::Filter};
use uuid::Uuid;

/// How long one call to the broker or the order service may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Inspect and steer the choreography saga: dead letters and timelines.
#[derive(Debug, Parser)]
#[command(name = "sagactl", version)]
pub struct Cli {
    #[command(flatten)]
    pub connection: Connection,
    /// Print JSON instead of tables and lines (an error too, on stderr:
    /// its kind, message and exit code).
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

/// Where the system is: the same variables the services read.
#[derive(Debug, Clone, Args)]
pub struct Connection {
    /// The broker: one server, or a cluster's seeds separated by commas.
    #[arg(
        long,
        env = "NATS_URL",
        default_value = "nats://127.0.0.1:4222",
        global = true
    )]
    pub nats_url: String,
    /// The broker user (`operator` on a broker with users; see `nats/auth.conf`).
    #[arg(long, env = "NATS_USER", global = true)]
    pub nats_user: Option<String>,
    /// Its password: set NATS_PASSWORD (a flag would show in the process list).
    #[arg(
        long,
        env = "NATS_PASSWORD",
        hide_env_values = true,
        global = true,
        hide = true
    )]
    pub nats_password: Option<String>,
    /// The subject prefix of the system (streams are `<PREFIX>_EVENTS`, `<PREFIX>_DLQ`).
    #[arg(long, env = "SUBJECT_PREFIX", default_value = "saga", global = true)]
    pub subject_prefix: String,
    /// The order service's HTTP address (saga timelines).
    #[arg(
        long,
        env = "ORDER_URL",
        default_value = "http://127.0.0.1:8081",
        global = true
    )]
    pub order_url: String,
    /// A file holding the services' admin token, for operator endpoints
    /// (redrive, retry, resolve); or set ADMIN_TOKEN. Never a flag: it
    /// would show in the process list.
    #[arg(long, env = "ADMIN_TOKEN_FILE", global = true)]
    pub admin_token_file: Option<PathBuf>,
    /// The admin token itself: from ADMIN_TOKEN or the file (see
    /// [`Connection::with_admin_token_from_env`]), never from a flag.
    #[arg(skip)]
    pub admin_token: Option<String>,
}

impl Connection {
    /// This connection with the admin token read from `ADMIN_TOKEN`, or
    /// else from `--admin-token-file` (its first line).
    pub fn with_admin_token_from_env(mut self) -> Result<Connection> {
        if self.admin_token.is_some() {
            return Ok(self);
        }
        self.admin_token = match (std::env::var("ADMIN_TOKEN").ok(), &self.admin_token_file) {
            (Some(token), _) if !token.is_empty() => Some(token),
            (_, Some(path)) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    Failure::Usage(format!(
                        "reading the admin token from {}: {e}",
                        path.display()
                    ))
                })?;
                Some(text.lines().next().unwrap_or_default().trim().to_string())
            }
            _ => None,
        };
        Ok(self)
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print a completion script for a shell: `source <(sagactl completions
    /// bash)`, or write it where the shell loads completions from.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Dead letters: events a service could not apply and gave up on.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Retry a halted saga: redrive every dead letter of it (a refund the
    /// gateway refused, say, once it works again). The saga goes on from
    /// there and ends as it would have. Same as `dlq redrive --saga ORDER_ID`.
    Retry {
        order_id: Uuid,
        #[command(flatten)]
        audit: Audit,
    },
    /// Resolve a saga that requires intervention, once an operator has done
    /// by hand what it could not (refunded in the gateway's console, say):
    /// the order becomes MANUALLY_COMPENSATED, payment records the charge as
    /// refunded (without calling the gateway), inventory puts back what it
    /// still holds. Audited (who, the note) in the saga's timeline.
    Resolve {
        order_id: Uuid,
        /// The resolution: the compensation was done by hand.
        #[arg(long, required = true)]
        manually_compensated: bool,
        /// What was done, in the operator's words.
        #[arg(long)]
        note: String,
        /// Who: recorded with the note.
        #[arg(long, env = "SAGACTL_OPERATOR")]
        operator: Option<String>,
    },
    /// Create the streams and durable consumers that are missing, and bring
    /// the others in line with the definitions compiled in (`nats/`),
    /// keeping any limit an operator raised: as the provisioning identity
    /// (NATS_USER=provisioner). The services may only check them. The
    /// compose `provision` service runs it before the services start.
    Provision {
        /// Copies of each stream: 1 on one server, 3 on a cluster.
        #[arg(long, env = "NATS_STREAM_REPLICAS", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=5))]
        replicas: u64,
    },
    /// Check the invariants across the services, from each one's own
    /// database: money charged minus refunded equals the confirmed orders'
    /// total per customer, stock held equals the confirmed quantities per
    /// product, a shipment for every confirmed order and no other, every
    /// saga ended (or younger than --in-flight-for). Prints a table and
    /// every mismatch with its order, customer or product; exits 5 on any
    /// mismatch.
    Audit {
        /// A saga not ended and older than this (seconds) is stuck.
        #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86_400))]
        in_flight_for: u64,
        /// A service's database, as SERVICE=URL (repeatable). Default:
        /// `<SERVICE>_DATABASE_URL`, else `postgres://postgres@127.0.0.1:5432/saga_<service>`.
        #[arg(long = "database", value_name = "SERVICE=URL", value_parser = parse_database)]
        databases: Vec<(String, String)>,
        /// Orders read at once (with the other services' records of them):
        /// what the audit holds in memory.
        #[arg(long, default_value_t = 5_000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        page_size: u32,
    },
    /// Serve the operator's actions to the saga page over HTTP: redrive a
    /// dead letter and retry a halted saga, each with a dry run, under the
    /// operator's broker identity (NATS_USER, NATS_PASSWORD) and behind the
    /// admin token (ADMIN_TOKEN or --admin-token-file, required). The page
    /// finds it when the order service is given its address
    /// (OPERATOR_CONSOLE_URL). Runs until interrupted.
    Console {
        /// Where it listens: loopback unless it must be reached from elsewhere.
        #[arg(long, env = "CONSOLE_ADDR", default_value = "127.0.0.1:8090")]
        listen: SocketAddr,
        /// The origin of the page that may call it (the order service's
        /// address as the browser reaches it); several separated by commas.
        #[arg(long, env = "PAGE_ORIGIN", default_value = "http://127.0.0.1:8081",
              value_delimiter = ',', value_parser = common::http::origin)]
        page_origin: Vec<String>,
        /// Log lines for people (`pretty`) or for a log pipeline (`json`).
        #[arg(long, env = "LOG_FORMAT", default_value = "pretty", value_parser = ["pretty", "text", "json"])]
        log_format: String,
    },
    /// A saga's timeline, in order: every event with the service that
    /// emitted it and its effect, dead letters, operator actions, and the
    /// step it waits at.
    Saga {
        /// The order id (the saga's correlation id).
        order_id: Uuid,
    },
}

/// Who redrives, and why; or only what would be redriven.
#[derive(Debug, Clone, Args)]
pub struct Audit {
    /// Why: recorded in the audit trail and the saga's timeline.
    #[arg(long, required_unless_present = "dry_run")]
    pub note: Option<String>,
    /// Who: recorded with the note.
    #[arg(long, env = "SAGACTL_OPERATOR")]
    pub operator: Option<String>,
    /// Say what would be redriven, and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Redrive dead letters of sagas that have ended (confirmed, cancelled,
    /// resolved by hand) too, for this reason, kept in the audit record.
    /// Without it they are refused: a redrive must not move a settled saga.
    #[arg(long, value_name = "REASON")]
    pub force: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List dead letters, oldest first: sequence, when, consumer, event, saga, reason.
    List {
        #[command(flatten)]
        filter: Filter,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// One dead letter in full: its headers, its reason and its body.
    Show {
        /// Its sequence in the dead-letter stream (first column of `list`).
        seq: u64,
    },
    /// Publish dead letters again, to their event's subject, with a fresh
    /// message id, then remove them from the dead-letter stream (only after
    /// the broker has stored the event and the audit record), under the
    /// operator's broker identity (NATS_USER, NATS_PASSWORD). A dead letter
    /// of a saga that has ended (the order service says) is refused unless
    /// forced.
    ///
    /// An event a consumer already applied is dropped by its idempotency
    /// check: redriving it changes nothing. A dead letter whose bytes are
    /// not an event cannot be redriven as it is: fix them and pass the
    /// corrected event with --seq SEQ --body FILE.
    Redrive {
        /// These dead letters (repeatable); without it, every one the filters select.
        #[arg(long = "seq")]
        seqs: Vec<u64>,
        #[command(flatten)]
        filter: Filter,
        /// The corrected event (a JSON envelope) to publish instead of the
        /// dead letter's bytes; only with exactly one --seq.
        #[arg(long, requires = "seqs")]
        body: Option<PathBuf>,
        #[command(flatten)]
        audit: Audit,
    },
}

impl Connection {
    /// The admin token, or an error that says where to put it.
    pub fn admin_token(&self) -> Result<&str> {
        self.admin_token.as_deref().ok_or_else(|| {
            Failure::Unauthorized(
                "an operator command: set ADMIN_TOKEN, or point --admin-token-file (ADMIN_TOKEN_FILE) at a file holding it"
                    .into(),
            )
            .into()
        })
    }

    /// GETs `path` of the order service (with `token` as the bearer, if
    /// given): its JSON, `None` for a 404, or an error with its message.
    pub async fn order_get(
        &self,
        http: &reqwest::Client,
        path: &str,
        token: Option<&str>,
    ) -> Result<Option<serde_json::Value>> {
        let url = format!("{}{path}", self.order_url.trim_end_matches('/'));
        let mut request = http.get(&url).timeout(CALL_TIMEOUT);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request
            .send()
            .await
            .map_err(|e| failure::of_request(e, &format!("GET {url}")))?;
        let status = response.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let body: serde_json::Value = response.json().await.unwrap_or_default();
        if !status.is_success() {
            let message = body["error"].as_str().unwrap_or("no message");
            return Err(failure::of_status(
                status,
                format!("GET {url}: {status}: {message}"),
            ));
        }
        anyhow::ensure!(body.is_object(), "GET {url}: the answer is not JSON");
        Ok(Some(body))
    }

    /// POSTs `body` to an operator endpoint of the order service with the
    /// admin token: the JSON answer, or an error with the service's message.
    pub async fn operator_post(
        &self,
        path: &str,
        body: &impl serde::Serialize,
        timeout: Duration,
    ) -> Result<serde_json::Value> {
        let token = self.admin_token()?;
        let url = format!("{}{path}", self.order_url.trim_end_matches('/'));
        let response = reqwest::Client::new()
            .post(&url)
            .bearer_auth(token)
            .timeout(timeout)
            .json(body)
            .send()
            .await
            .map_err(|e| failure::of_request(e, &format!("POST {url}")))?;
        let status = response.status();
        let answer: serde_json::Value = response.json().await.unwrap_or_default();
        if !status.is_success() {
            let message = answer["error"].as_str().unwrap_or("no message");
            return Err(failure::of_status(
                status,
                format!("POST {url}: {status}: {message}"),
            ));
        }
        Ok(answer)
    }
}

/// `sagactl` as its binary runs: `args` parsed (a usage error exits 2,
/// as clap does), the command run, an error printed on stderr (as JSON
/// with `--json`), and the exit code that says what went wrong.
pub async fn main(args: impl IntoIterator<Item = std::ffi::OsString>) -> std::process::ExitCode {
    let cli = Cli::parse_from(args);
    let json = cli.json;
    let mut out = std::io::stdout();
    match run(cli, &mut out).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            match json {
                true => eprintln!("{}", failure::as_json(&e)),
                false => eprintln!("error: {e:#}"),
            }
            std::process::ExitCode::from(exit_code(&e))
        }
    }
}

/// Runs one command, writing what it shows to `out`.
pub async fn run(mut cli: Cli, out: &mut (dyn Write + Send)) -> Result<()> {
    // Completions need nothing of the system, not even its token.
    if !matches!(cli.command, Command::Completions { .. }) {
        cli.connection = cli.connection.with_admin_token_from_env()?;
    }
    let subjects = Subjects::new(cli.connection.subject_prefix.clone());
    let json = cli.json;
    match cli.command {
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut command, "sagactl", out);
            Ok(())
        }
        Command::Saga { order_id } => saga::print(&cli.connection, order_id, json, out).await,
        Command::Resolve {
            order_id,
            manually_compensated: _,
            note,
            operator,
        } => {
            let operator = operator.unwrap_or_else(login);
            saga::resolve(&cli.connection, order_id, &operator, &note, json, out).await
        }
        Command::Dlq(DlqCommand::List { filter, limit }) => {
            let dlq = connect(&cli.connection, subjects).await?;
            dlq::list(&dlq, &filter, limit, json, out).await
        }
        Command::Dlq(DlqCommand::Show { seq }) => {
            let dlq = connect(&cli.connection, subjects).await?;
            dlq::show(&dlq, seq, json, out).await
        }
        Command::Dlq(DlqCommand::Redrive {
            seqs,
            filter,
            body,
            audit,
        }) => {
            let body = match body {
                Some(path) => Some(
                    std::fs::read_to_string(&path)
                        .map_err(|e| Failure::Usage(format!("reading {}: {e}", path.display())))?,
                ),
                None => None,
            };
            let request = redrive_request(seqs, &filter, body, audit);
            let dlq = connect(&cli.connection, subjects).await?;
            dlq::redrive(&dlq, &cli.connection, &request, json, out).await
        }
        Command::Audit {
            in_flight_for,
            databases,
            page_size,
        } => {
            let in_flight_for = Duration::from_secs(in_flight_for);
            let report = audit::run(&databases_of(databases), in_flight_for, page_size).await?;
            audit::print(&report, in_flight_for, json, out)
        }
        Command::Provision { replicas } => {
            let nats = nats_client(&cli.connection).await?;
            let js = async_nats::jetstream::new(nats);
            let changed = common::topology::provision(&js, &subjects, replicas as usize).await?;
            if json {
                writeln!(out, "{}", serde_json::json!({ "changed": changed }))?;
                return Ok(());
            }
            if changed.is_empty() {
                writeln!(out, "streams and consumers as provisioned: nothing changed")?;
            }
            for line in changed {
                writeln!(out, "{line}")?;
            }
            Ok(())
        }
        Command::Console {
            listen,
            page_origin,
            log_format,
        } => {
            common::telemetry::init(match log_format.as_str() {
                "json" => common::config::LogFormat::Json,
                _ => common::config::LogFormat::Pretty,
            });
            let nats = nats_client(&cli.connection).await?;
            let console = console::Console::new(nats, &cli.connection)?;
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .map_err(|e| Failure::Usage(format!("listening on {listen}: {e}")))?;
            tracing::info!(
                addr = %listener.local_addr()?,
                page_origins = %page_origin.join(","),
                "console listening"
            );
            let shutdown = tokio_util::sync::CancellationToken::new();
            let stop = shutdown.clone();
            tokio::spawn(async move {
                common::service::shutdown_signal().await;
                stop.cancel();
            });
            console::serve(console, listener, &page_origin, shutdown).await
        }
        Command::Retry { order_id, audit } => {
            let saga = Filter {
                saga: Some(order_id),
                ..Filter::default()
            };
            let request = redrive_request(Vec::new(), &saga, None, audit);
            let dlq = connect(&cli.connection, subjects).await?;
            dlq::redrive(&dlq, &cli.connection, &request, json, out).await
        }
    }
}

fn redrive_request(
    seqs: Vec<u64>,
    filter: &Filter,
    body: Option<String>,
    audit: Audit,
) -> common::dlq::Redrive {
    common::dlq::Redrive {
        seqs,
        filter: filter.clone(),
        body,
        note: audit.note.unwrap_or_default(),
        operator: audit.operator.unwrap_or_else(login),
        dry_run: audit.dry_run,
        force: audit.force,
    }
}

async fn connect(connection: &Connection, subjects: Subjects) -> Result<common::dlq::Dlq> {
    let nats = nats_client(connection).await?;
    Ok(common::dlq::Dlq::new(
        async_nats::jetstream::new(nats),
        subjects,
    ))
}

async fn nats_client(connection: &Connection) -> Result<async_nats::Client> {
    tokio::time::timeout(
        CALL_TIMEOUT,
        common::broker::connect(
            common::broker::with_credentials(
                async_nats::ConnectOptions::new(),
                connection.nats_user.as_deref(),
                connection.nats_password.as_deref(),
            )
            .name("sagactl")
            .connection_timeout(CALL_TIMEOUT),
            &connection.nats_url,
        ),
    )
    .await
    .map_err(|_| {
        Failure::Unreachable(format!(
            "no answer from {} within {CALL_TIMEOUT:?}",
            connection.nats_url
        ))
    })?
    .map_err(|e| failure::of_broker(e, &connection.nats_url))
}

/// `SERVICE=URL`, for a service of the roster.
fn parse_database(arg: &str) -> Result<(String, String), String> {
    let (service, url) = arg
        .split_once('=')
        .ok_or_else(|| format!("expected SERVICE=URL, got {arg:?}"))?;
    if common::roster::find(service).is_none() {
        let known: Vec<&str> = common::roster::names().collect();
        return Err(format!(
            "no service {service:?} (the services: {})",
            known.join(", ")
        ));
    }
    Ok((service.to_string(), url.to_string()))
}

/// Every service's database: given on the command line, else from
/// `<SERVICE>_DATABASE_URL`, else the local default.
fn databases_of(given: Vec<(String, String)>) -> audit::Databases {
    let mut out: audit::Databases = common::roster::SERVICES
        .iter()
        .map(|s| {
            let variable = format!("{}_DATABASE_URL", s.name.to_ascii_uppercase());
            let url = std::env::var(variable)
                .unwrap_or_else(|_| format!("postgres://postgres@127.0.0.1:5432/{}", s.database()));
            (s.name.to_string(), url)
        })
        .collect();
    out.extend(given);
    out
}

/// The login name, for the audit trail when --operator is not given.
fn login() -> String {
    std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_command_takes_json() {
        let id = "01a24960-19da-7164-be6e-6f8edb39d29e";
        for line in [
            "dlq list",
            "dlq show 3",
            "dlq redrive --seq 3 --dry-run",
            &format!("retry {id} --dry-run"),
            &format!("resolve {id} --manually-compensated --note n"),
            "provision",
            "audit",
            "console",
            &format!("saga {id}"),
        ] {
            let argv: Vec<&str> = ["sagactl"]
                .into_iter()
                .chain(line.split(' '))
                .chain(["--json"])
                .collect();
            let cli = Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{line}: {e}"));
            assert!(cli.json, "{line}");
        }
    }

    #[test]
    fn a_redrive_needs_a_note_unless_it_is_a_dry_run() {
        let parse =
            |args: &[&str]| Cli::try_parse_from([&["sagactl", "dlq", "redrive"], args].concat());
        assert!(parse(&["--seq", "3"]).is_err());
        assert!(parse(&["--seq", "3", "--dry-run"]).is_ok());
        assert!(parse(&["--seq", "3", "--note", "fixed"]).is_ok());
        assert!(
            parse(&["--body", "x.json", "--note", "fixed"]).is_err(),
            "--body needs --seq"
        );
    }

    /// Completions for every shell; bash's parses and completes every
    /// command, and none needs the system (an unreadable token file is not
    /// read).
    #[tokio::test]
    async fn completions_name_every_command_and_need_nothing_of_the_system() {
        for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
            let cli = Cli::try_parse_from([
                "sagactl",
                "--admin-token-file",
                "/nonexistent/token",
                "completions",
                shell,
            ])
            .unwrap();
            let mut out = Vec::new();
            run(cli, &mut out).await.unwrap();
            let script = String::from_utf8(out).unwrap();
            for command in Cli::command().get_subcommands() {
                let name = command.get_name();
                assert!(script.contains(name), "{shell} completions miss {name}");
            }
            if shell == "bash" {
                let path =
                    std::env::temp_dir().join(format!("sagactl-{}.bash", std::process::id()));
                std::fs::write(&path, &script).unwrap();
                let checked = std::process::Command::new("bash")
                    .arg("-n")
                    .arg(&path)
                    .output()
                    .unwrap();
                std::fs::remove_file(&path).unwrap();
                assert!(
                    checked.status.success(),
                    "{}",
                    String::from_utf8_lossy(&checked.stderr)
                );
            }
        }
        assert!(Cli::try_parse_from(["sagactl", "completions", "tcsh"]).is_err());
    }
}
