//! Dead letters in the terminal: listed and shown straight from the
//! dead-letter stream; redriven by the order service on the operator's
//! request (`POST /dead-letters/redrive`, with the admin token).

use std::io::Write;

use anyhow::{Context, Result, bail};
use common::{
    consumer::dlq_headers,
    dlq::{Dlq, Filter, Redrive, Redriven},
};
use serde_json::Value;

use crate::{CALL_TIMEOUT, Connection};

pub async fn list(
    dlq: &Dlq,
    filter: &Filter,
    limit: usize,
    out: &mut (dyn Write + Send),
) -> Result<()> {
    let all = dlq.read(filter).await?;
    writeln!(
        out,
        "{:>6}  {:<24}  {:<10}  {:<26}  {:<36}  REASON",
        "SEQ", "DEAD-LETTERED (UTC)", "CONSUMER", "EVENT", "SAGA"
    )?;
    for d in all.iter().take(limit) {
        writeln!(
            out,
            "{:>6}  {:<24}  {:<10}  {:<26}  {:<36}  {}",
            d.seq,
            d.at.format("%Y-%m-%d %H:%M:%S%.3f"),
            d.or_dash(dlq_headers::CONSUMER),
            d.header(dlq_headers::EVENT_TYPE)
                .unwrap_or("(not an event)"),
            d.or_dash(dlq_headers::CORRELATION_ID),
            shorten(d.or_dash(dlq_headers::REASON), 160),
        )?;
    }
    writeln!(
        out,
        "{} of {} dead letter(s)",
        all.len().min(limit),
        all.len()
    )?;
    Ok(())
}

pub async fn show(dlq: &Dlq, seq: u64, out: &mut (dyn Write + Send)) -> Result<()> {
    let d = dlq
        .one(seq)
        .await?
        .with_context(|| format!("no dead letter {seq} (redriven, or never there)"))?;
    writeln!(out, "dead letter {seq}, {}", d.at.to_rfc3339())?;
    writeln!(out, "reason: {}", d.or_dash(dlq_headers::REASON))?;
    writeln!(out, "headers:")?;
    let mut headers: Vec<(String, String)> = d
        .headers
        .iter()
        .flat_map(|(k, vs)| vs.iter().map(move |v| (k.to_string(), v.to_string())))
        .collect();
    headers.sort();
    for (k, v) in headers {
        writeln!(out, "  {k}: {v}")?;
    }
    writeln!(out, "body ({} bytes):", d.body.len())?;
    match serde_json::from_slice::<Value>(&d.body) {
        Ok(v) => writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?,
        Err(_) => writeln!(out, "{}", String::from_utf8_lossy(&d.body))?,
    }
    Ok(())
}

/// Asks the order service to redrive, and prints what became of each.
pub async fn redrive(
    connection: &Connection,
    request: &Redrive,
    out: &mut (dyn Write + Send),
) -> Result<()> {
    let url = "/dead-letters/redrive";
    let body = connection
        .operator_post(url, request, CALL_TIMEOUT * 3)
        .await?;
    let results: Vec<Redriven> = serde_json::from_value(body["results"].clone())
        .with_context(|| format!("POST {url}: an answer without results"))?;
    if results.is_empty() {
        writeln!(out, "no dead letter selected")?;
    }
    for r in &results {
        writeln!(out, "{} {}: {}", r.outcome, r.seq, r.detail)?;
    }
    let left = results
        .iter()
        .filter(|r| r.outcome == "refused" || r.outcome == "failed")
        .count();
    if left > 0 {
        bail!(
            "{left} of {} dead letter(s) not redriven (see above)",
            results.len()
        );
    }
    Ok(())
}

fn shorten(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_string();
    }
    let cut: String = text.chars().take(max - 1).collect();
    format!("{cut}…")
}
