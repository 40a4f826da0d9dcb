//! The Prometheus files shipped for operators: the scrape configurations
//! (generated from the roster) load, and every alert fires past its
//! threshold and stays quiet at it (`prometheus/alerts.test.yml`), and
//! each has a description and a runbook section in docs/operating.md.

use std::collections::BTreeSet;

use anyhow::Result;
use common::meter::SERIES;
use stack::{infra::promtool, repo_root};

fn read(path: &str) -> Result<String> {
    Ok(std::fs::read_to_string(repo_root().join(path))?)
}

#[tokio::test]
async fn the_scrape_configurations_and_the_alert_rules_load() -> Result<()> {
    let out = promtool(&["check", "config", "prometheus/prometheus.yml"], b"").await?;
    assert!(out.contains("SUCCESS: 11 rules found"), "{out}");
    // Its rule file is where the compose file mounts it, not here.
    promtool(
        &[
            "check",
            "config",
            "--syntax-only",
            "docker/prometheus/prometheus.yml",
        ],
        b"",
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn every_alert_fires_past_its_threshold_and_not_at_it() -> Result<()> {
    promtool(&["test", "rules", "prometheus/alerts.test.yml"], b"").await?;
    let alerts = read("prometheus/alerts.yml")?;
    let tests = read("prometheus/alerts.test.yml")?;
    let defined: Vec<&str> = alerts
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    assert_eq!(defined.len(), 11, "{defined:?}");
    for alert in defined {
        assert!(
            tests.contains(&format!("alertname: {alert}\n")),
            "{alert} has no test in prometheus/alerts.test.yml"
        );
    }
    Ok(())
}

/// A rule over a series the services do not export would never fire.
#[test]
fn the_rules_use_only_series_the_services_export() -> Result<()> {
    let exported: BTreeSet<&str> = SERIES.iter().map(|(name, ..)| *name).collect();
    let alerts = read("prometheus/alerts.yml")?;
    let used: BTreeSet<String> = alerts
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .flat_map(|l| {
            l.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("saga_"))
                .map(|w| {
                    ["_bucket", "_count", "_sum"]
                        .iter()
                        .find_map(|s| w.strip_suffix(s))
                        .unwrap_or(w)
                        .to_string()
                })
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(used.len() >= 8, "{used:?}");
    for series in &used {
        assert!(
            exported.contains(series.as_str()),
            "alerts.yml uses {series}, which no service exports"
        );
    }
    Ok(())
}

/// Every alert says what it means and links its runbook: a section of
/// docs/operating.md named after it, which exists.
#[test]
fn every_alert_has_a_description_and_a_runbook_section() -> Result<()> {
    let alerts = read("prometheus/alerts.yml")?;
    let operating = read("docs/operating.md")?;
    let headings: BTreeSet<String> = operating
        .lines()
        .filter_map(|l| l.strip_prefix("#### "))
        .map(|h| h.trim().to_lowercase())
        .collect();
    let blocks: Vec<&str> = alerts.split("- alert: ").skip(1).collect();
    assert_eq!(blocks.len(), 11);
    for block in blocks {
        let name = block.lines().next().unwrap_or_default().trim();
        assert!(
            block.contains("description: \""),
            "{name} has no description"
        );
        let runbook = format!("runbook: \"docs/operating.md#{}\"", name.to_lowercase());
        assert!(block.contains(&runbook), "{name} does not link {runbook}");
        assert!(
            headings.contains(&name.to_lowercase()),
            "docs/operating.md has no runbook section `#### {name}`"
        );
    }
    Ok(())
}

/// The rules about processes name every service of the roster: one added
/// to the roster and not to the rules would go unwatched.
#[test]
fn the_process_rules_name_every_service_of_the_roster() -> Result<()> {
    let alerts = read("prometheus/alerts.yml")?;
    let jobs = common::roster::names().collect::<Vec<_>>().join("|");
    assert_eq!(
        alerts.matches(&format!("up{{job=~\"{jobs}\"}}")).count(),
        2,
        "SagaServiceDown and SagaMetricsAbsent watch up{{job=~\"{jobs}\"}}"
    );
    for name in common::roster::names() {
        assert!(
            alerts.contains(&format!("absent(up{{job=\"{name}\"}})")),
            "SagaServiceAbsent does not watch {name}"
        );
    }
    Ok(())
}
