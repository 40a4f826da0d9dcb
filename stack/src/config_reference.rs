//! `docs/configuration.md`, generated from the services' command lines: the
//! settings every service reads, the secrets, and each service's own. A
//! setting's doc comment is both its `--help` text and its line here, so the
//! two cannot drift apart (`stack/tests/docs.rs` fails when the file is not
//! what this makes; `stack config-reference --write` rewrites it).

use std::fmt::Write;

use clap::{Arg, Args, Command};

/// Where the reference lives, from the repository's root.
pub const PATH: &str = "docs/configuration.md";

const HEAD: &str = "\
# Configuration reference

Every setting of a service is a flag and an environment variable of the same
name (`--consumer-lanes` is `CONSUMER_LANES`); a flag wins over the variable.
`<service> --help` lists them with their current values (for example
`payment --help`, or `stack serve payment --help`), and a bad value stops the
service at once with a message that names it. The defaults fit
`scripts/up.sh`; `stack up` and docker-compose.yml set the database, broker
and user settings for each service they start. Secrets are read from the
environment only.

This file is generated from the code (`stack config-reference --write`);
`stack/tests/docs.rs` fails when it is out of date.

[Back to the README](../README.md) · [All documents](README.md)
";

const TAIL: &str = "
## Logs

`RUST_LOG` (default `info`) filters the log lines, as `tracing`'s
`EnvFilter` reads it. Logs are structured; every line about an event carries
its `correlation_id`, so `grep <order id> .run/*.log` shows one saga across
all four services. SIGTERM drains: HTTP requests and events in flight finish,
the outbox is flushed.

## Threads

`TOKIO_WORKER_THREADS` (default `1`) is how many threads run a service's
work. A service waits on Postgres, the broker and Redis far more than it
computes (at saturation each uses well under one core), and one thread
spares it the wake-ups of threads handing work to each other: fewer
context switches and less CPU per saga ([benchmarks](benchmarks.md)).
Raise it only for a service that keeps one core busy.
";

fn cell(text: &str) -> String {
    text.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace('|', "\\|")
}

fn help(arg: &Arg) -> String {
    let text = arg
        .get_long_help()
        .or(arg.get_help())
        .map(|h| h.to_string())
        .unwrap_or_default();
    let mut text = cell(&text);
    let values: Vec<String> = arg
        .get_possible_values()
        .iter()
        .filter(|v| !v.is_hide_set())
        .map(|v| format!("`{}`", v.get_name()))
        .collect();
    if !values.is_empty() {
        let _ = write!(text, " (one of {})", values.join(", "));
    }
    text
}

fn table(out: &mut String, args: &[&Arg]) {
    out.push_str("| variable | flag | default | meaning |\n|---|---|---|---|\n");
    for arg in args {
        let Some(env) = arg.get_env() else { continue };
        let flag = arg
            .get_long()
            .map_or_else(String::new, |l| format!("`--{l}`"));
        let mut meaning = help(arg);
        let mut default = arg
            .get_default_values()
            .iter()
            .map(|v| format!("`{}`", v.to_string_lossy()))
            .collect::<Vec<_>>()
            .join(", ");
        // A default that depends on the service is written in the help text.
        if let Some((text, said)) = meaning.split_once(" [default: ") {
            default = said.trim_end_matches(']').to_string();
            meaning = text.to_string();
        }
        let default = if default.is_empty() {
            "—".into()
        } else {
            default
        };
        let _ = writeln!(
            out,
            "| `{}` | {flag} | {} | {meaning} |",
            env.to_string_lossy(),
            cell(&default),
        );
    }
}

/// The whole of [`PATH`].
pub fn markdown() -> String {
    let shared = common::ConfigArgs::augment_args(Command::new("shared"));
    let shared_ids: Vec<&str> = shared
        .get_arguments()
        .map(|a| a.get_id().as_str())
        .collect();
    let mut out = String::from(HEAD);
    out.push_str("\n## Every service\n\n");
    table(&mut out, &shared.get_arguments().collect::<Vec<_>>());
    out.push_str(
        "\n## Secrets\n\nFrom the environment only, never a flag: a process's arguments are \
         visible to every user of the machine.\n\n| variable | meaning |\n|---|---|\n",
    );
    for (name, meaning) in common::config::SECRETS {
        let _ = writeln!(out, "| `{name}` | {} |", cell(meaning));
    }
    for name in common::roster::names() {
        let command = crate::services::command(name).expect("every roster service has one");
        let own: Vec<&Arg> = command
            .get_arguments()
            .filter(|a| a.get_env().is_some() && !shared_ids.contains(&a.get_id().as_str()))
            .collect();
        if own.is_empty() {
            continue;
        }
        let _ = write!(out, "\n## {name} only\n\n");
        table(&mut out, &own);
        let subcommands: Vec<String> = command
            .get_subcommands()
            .map(|s| format!("`{name} {}`", s.get_name()))
            .collect();
        if !subcommands.is_empty() {
            let _ = writeln!(
                out,
                "\nMaintenance tasks, with the same settings: {} (`{name} help <task>`).",
                subcommands.join(", ")
            );
        }
    }
    out.push_str(TAIL);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_setting_of_every_service_is_in_the_reference() {
        let text = markdown();
        for name in common::roster::names() {
            for arg in crate::services::command(name).unwrap().get_arguments() {
                if let Some(env) = arg.get_env() {
                    let env = env.to_string_lossy();
                    assert!(text.contains(&format!("| `{env}` |")), "{name}: {env}");
                }
            }
        }
        for (secret, _) in common::config::SECRETS {
            assert!(text.contains(&format!("| `{secret}` |")), "{secret}");
        }
    }

    /// `(A to B)` in a setting's help: the bounds its parser enforces.
    fn bounds(help: &str) -> Option<(u64, u64)> {
        let (_, rest) = help.split_once('(')?;
        let (range, _) = rest.split_once([')', ':'])?;
        let (low, high) = range.split_once(" to ")?;
        Some((low.trim().parse().ok()?, high.trim().parse().ok()?))
    }

    #[test]
    fn the_range_a_setting_documents_is_the_range_it_accepts() {
        let mut checked = 0;
        for name in common::roster::names() {
            let command = crate::services::command(name)
                .unwrap()
                .mut_args(|a| a.env(None::<&str>));
            for arg in command.get_arguments() {
                let (Some(long), Some((low, high))) = (arg.get_long(), bounds(&help(arg))) else {
                    continue;
                };
                let parse = |v: u64| {
                    command
                        .clone()
                        .try_get_matches_from([name.to_string(), format!("--{long}={v}")])
                        .is_ok()
                };
                assert!(
                    parse(low) && parse(high),
                    "{name} --{long}: {low} to {high}"
                );
                assert!(!parse(high + 1), "{name} --{long} above {high}");
                assert!(low == 0 || !parse(low - 1), "{name} --{long} below {low}");
                checked += 1;
            }
        }
        assert!(checked >= 20, "only {checked} ranges found");
    }
}
