//! Dead letters in the terminal: listed, shown and redriven straight from
//! the dead-letter stream, under the operator's broker identity (no service
//! may publish another service's events). Whether a dead letter's saga has
//! ended is asked of the order service (`GET /orders/{id}`).

use std::io::Write;

use anyhow::{Context, Result, bail};
use common::{
    dlq::dlq_headers,
    dlq::{Dlq, Filter, Redrive, Redriven, Sagas},
};
use serde_json::Value;

use crate::Connection;

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

/// The sagas as the order service tells them: one has ended when its
/// order is confirmed, cancelled or resolved by hand.
struct OrderService<'a> {
    connection: &'a Connection,
    http: reqwest::Client,
}

/// The statuses of an order whose saga has ended.
const ENDED: [&str; 3] = ["CONFIRMED", "CANCELLED", "MANUALLY_COMPENSATED"];

impl Sagas for OrderService<'_> {
    async fn ended(&self, id: uuid::Uuid) -> Result<Option<String>> {
        let path = format!("/orders/{id}");
        let Some(order) = self.connection.order_get(&self.http, &path, None).await? else {
            return Ok(None);
        };
        let state = order["status"].as_str().unwrap_or_default();
        Ok(ENDED.contains(&state).then(|| state.to_string()))
    }
}

/// Redrives under the operator's broker identity, and prints what became
/// of each dead letter.
pub async fn redrive(
    dlq: &Dlq,
    connection: &Connection,
    request: &Redrive,
    out: &mut (dyn Write + Send),
) -> Result<()> {
    let sagas = OrderService {
        connection,
        http: reqwest::Client::new(),
    };
    let results: Vec<Redriven> = dlq.redrive(request, &sagas).await?;
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
